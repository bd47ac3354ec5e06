"""FrontendNvmeService: the NVMe subsystems, controllers and namespaces a host (or a VM) sees.

NvmeSubsystem -> an nvmet subsystem (only its spec's hostnqn may connect; none: nobody, never allow_any_host).
NvmeController PCIE -> a vhost-nvme engine serving the subsystem's namespaces from the VM's memory (the DPU's
emulated NVMe function); TCP/RDMA -> an nvmet port with the subsystem linked.
NvmeNamespace -> an nvmet namespace (and the engine's namespace) on a nvmetd disk or a remote namespace.
Update* are not served (UNIMPLEMENTED, gRPC's default): delete and create again.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import empty_pb2

from nvmetd import state_doc
from nvmetd.opi import state as opi_state
from nvmetd.opi.common import Refused, Service, checked, exists, in_use, invalid, new_id, not_found, page, parse
from nvmetd.opi.stats import volume_stats
from nvmetd.opi.stubs import frontend_nvme_pb2 as pb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as pb_grpc
from nvmetd.opi.stubs import opicommon_pb2 as common
from nvmetd.vms import SUBSYSTEM_PREFIX
from target import validate

SUBS = "nvmeSubsystems"
TRTYPES = {common.NVME_TRANSPORT_TYPE_PCIE: "pcie", common.NVME_TRANSPORT_TYPE_TCP: "tcp",
           common.NVME_TRANSPORT_TYPE_RDMA: "rdma"}
TRTYPE_ENUM = {v: k for k, v in TRTYPES.items()}
ADRFAM = {common.NVME_ADDRESS_FAMILY_IPV4: "ipv4", common.NVME_ADDRESS_FAMILY_IPV6: "ipv6"}
ADRFAM_ENUM = {v: k for k, v in ADRFAM.items()}


def _text(value: str, field: str, max_len: int) -> str:
    if len(value) > max_len or not value.isascii() or not value.isprintable():
        raise invalid(f"{field} must be printable ASCII of at most {max_len} characters")
    return value


def _subsystem(opi: opi_state.OpiState, sid: str, name: str) -> opi_state.OpiSubsystem:
    sub = opi.subsystems.get(sid)
    if sub is None:
        raise not_found("subsystem", name)
    return sub


def subsystem_msg(sid: str, sub: opi_state.OpiSubsystem) -> pb.NvmeSubsystem:
    return pb.NvmeSubsystem(name=f"{SUBS}/{sid}", spec=pb.NvmeSubsystemSpec(
        nqn=sub.nqn, serial_number=sub.serial, model_number=sub.model, max_namespaces=sub.max_namespaces,
        hostnqn=sub.hostnqn), status=pb.NvmeSubsystemStatus(firmware_revision="nvmetd"))


class Frontend(Service, pb_grpc.FrontendNvmeServiceServicer):
    # ------------------------------------------------------------------ subsystems
    def CreateNvmeSubsystem(self, request: Any, context: grpc.ServicerContext) -> Any:
        def mutate(doc: dict[str, Any], opi: opi_state.OpiState) -> str:
            spec = request.nvme_subsystem.spec
            nqn = checked(lambda: validate.nqn(spec.nqn), "nvme_subsystem.spec.nqn")
            if nqn.startswith(SUBSYSTEM_PREFIX) or nqn == validate.DISCOVERY_NQN:
                raise invalid(f"nvme_subsystem.spec.nqn: {nqn} is reserved (nvmetd's VM subsystems, discovery)")
            if spec.hostnqn:
                checked(lambda: validate.nqn(spec.hostnqn), "nvme_subsystem.spec.hostnqn")
            if spec.psk:
                raise Refused(grpc.StatusCode.UNIMPLEMENTED, "nvme_subsystem.spec.psk: TLS PSKs are not served by "
                              "this API (nvmetd's TLS support is configured on its ports)")
            if spec.max_namespaces < 0:
                raise invalid("nvme_subsystem.spec.max_namespaces must not be negative")
            sid = new_id(request.nvme_subsystem_id, opi.subsystems, "nvme_subsystem_id")
            taken = {s.nqn for s in opi.subsystems.values()} | {
                s.get("nqn") for s in doc.get("target", {}).get("subsystems", [])}
            if nqn in taken:
                raise exists(f"a subsystem with NQN {nqn} exists already")
            opi.subsystems[sid] = opi_state.OpiSubsystem(
                nqn=nqn, serial=_text(spec.serial_number, "serial_number", 20),
                model=_text(spec.model_number, "model_number", 40), max_namespaces=spec.max_namespaces,
                hostnqn=spec.hostnqn)
            return sid

        def run() -> Any:
            sid = self.change(mutate, lambda sid: [self.state().subsystems[sid].nqn])
            return subsystem_msg(sid, self.state().subsystems[sid])

        return self.handle(context, run)

    def DeleteNvmeSubsystem(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            (sid,) = parse(request.name, SUBS)

            def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> None:
                sub = opi.subsystems.get(sid)
                if sub is None:
                    if request.allow_missing:
                        return
                    raise not_found("subsystem", request.name)
                if sub.controllers or sub.namespaces:
                    raise in_use(f"{request.name} still has {len(sub.controllers)} controllers and "
                                 f"{len(sub.namespaces)} namespaces: delete them first")
                del opi.subsystems[sid]

            self.change(mutate, lambda _: [])
            return empty_pb2.Empty()

        return self.handle(context, run)

    def GetNvmeSubsystem(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            (sid,) = parse(request.name, SUBS)
            return subsystem_msg(sid, _subsystem(self.state(), sid, request.name))

        return self.handle(context, run)

    def ListNvmeSubsystems(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            subs = sorted(self.state().subsystems.items())
            items, token = page(subs, request.page_size, request.page_token)
            return pb.ListNvmeSubsystemsResponse(nvme_subsystems=[subsystem_msg(s, x) for s, x in items],
                                                 next_page_token=token)

        return self.handle(context, run)

    def StatsNvmeSubsystem(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            (sid,) = parse(request.name, SUBS)
            sub = _subsystem(self.state(), sid, request.name)
            return pb.StatsNvmeSubsystemResponse(stats=self._stats(sub.namespaces.values()))

        return self.handle(context, run)

    def _stats(self, namespaces: Any) -> Any:
        doc = self.manager.store.load()
        devices = self.manager.devices(doc)
        paths = [opi_state.remote_device(doc, ns.volume) if opi_state.REMOTE_NS_RE.fullmatch(ns.volume)
                 else devices[ns.volume] for ns in namespaces]
        return volume_stats(paths)

    # ------------------------------------------------------------------ controllers
    def CreateNvmeController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def mutate(doc: dict[str, Any], opi: opi_state.OpiState) -> tuple[str, str]:
            (sid,) = parse(request.parent, SUBS)
            sub = _subsystem(opi, sid, request.parent)
            spec = request.nvme_controller.spec
            if spec.HasField("min_limit") or spec.HasField("max_limit"):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "min_limit/max_limit: this nvmetd has no QoS "
                              "limits for the kernel target (nvmet's bios bypass cgroup io.max)")
            trtype = TRTYPES.get(spec.trtype)
            if trtype is None:
                raise invalid(f"nvme_controller.spec.trtype {common.NvmeTransportType.Name(spec.trtype)} is not "
                              "served here (PCIE, TCP or RDMA)")
            cid = new_id(request.nvme_controller_id, sub.controllers, "nvme_controller_id")
            ctrl = opi_state.OpiController(trtype=trtype, cntlid=spec.nvme_controller_id, max_nsq=spec.max_nsq,
                                           max_ncq=spec.max_ncq)
            if trtype == "pcie":
                pcie = spec.pcie_id
                ctrl.pcie_port, ctrl.pf, ctrl.vf = (pcie.port_id.value, pcie.physical_function.value,
                                                    pcie.virtual_function.value)
                if min(ctrl.pcie_port, ctrl.pf, ctrl.vf) < 0:
                    raise invalid("nvme_controller.spec.pcie_id: port, physical and virtual function must be >= 0")
                for other in opi.subsystems.values():
                    for c in other.controllers.values():
                        if c.trtype == "pcie" and (c.pcie_port, c.pf, c.vf) == (ctrl.pcie_port, ctrl.pf, ctrl.vf):
                            raise exists(f"PCIe function port {ctrl.pcie_port} pf {ctrl.pf} vf {ctrl.vf} has a "
                                         "controller already")
            else:
                fab = spec.fabrics_id
                adrfam = ADRFAM.get(fab.adrfam)
                if adrfam is None:
                    raise invalid("nvme_controller.spec.fabrics_id.adrfam must be IPV4 or IPV6")
                ctrl.adrfam = adrfam
                ctrl.traddr = checked(lambda: validate.ip_for_family(fab.traddr, adrfam),
                                      "nvme_controller.spec.fabrics_id.traddr")
                ctrl.trsvcid = checked(lambda: validate.tcp_port(fab.trsvcid),
                                       "nvme_controller.spec.fabrics_id.trsvcid")
                if any((c.trtype, c.traddr, c.trsvcid) == (trtype, ctrl.traddr, ctrl.trsvcid)
                       for c in sub.controllers.values()):
                    raise exists(f"{request.parent} has a controller on {trtype} {ctrl.traddr}:{ctrl.trsvcid}")
                ctrl.port_id = opi_state.next_port_id(doc, opi, trtype, ctrl.traddr, ctrl.trsvcid)
            sub.controllers[cid] = ctrl
            return sid, cid

        def needles(ids: tuple[str, str]) -> list[str]:
            ctrl = self.state().subsystems[ids[0]].controllers[ids[1]]
            if ctrl.trtype == "pcie":
                return [f"vhost/{opi_state.pcie_uuid(ctrl.pcie_port, ctrl.pf, ctrl.vf)}"]
            return [f"ports/{ctrl.port_id}", self.state().subsystems[ids[0]].nqn]

        def run() -> Any:
            sid, cid = self.change(mutate, needles)
            return self._controller_msg(sid, cid, self.state().subsystems[sid].controllers[cid])

        return self.handle(context, run)

    def _controller_msg(self, sid: str, cid: str, ctrl: opi_state.OpiController) -> Any:
        spec = pb.NvmeControllerSpec(trtype=TRTYPE_ENUM[ctrl.trtype], nvme_controller_id=ctrl.cntlid,
                                     max_nsq=ctrl.max_nsq, max_ncq=ctrl.max_ncq)
        if ctrl.trtype == "pcie":
            from google.protobuf.wrappers_pb2 import Int32Value

            spec.pcie_id.CopyFrom(common.PciEndpoint(port_id=Int32Value(value=ctrl.pcie_port),
                                                     physical_function=Int32Value(value=ctrl.pf),
                                                     virtual_function=Int32Value(value=ctrl.vf)))
            vm_uuid = opi_state.pcie_uuid(ctrl.pcie_port, ctrl.pf, ctrl.vf)
            from vhost_nvme.client import EngineClient

            active = EngineClient(self.manager.vhost.run_dir / f"{vm_uuid}.sock").alive()
        else:
            spec.fabrics_id.CopyFrom(common.FabricsEndpoint(traddr=ctrl.traddr, trsvcid=ctrl.trsvcid,
                                                            adrfam=ADRFAM_ENUM[ctrl.adrfam]))
            active = self.manager.cfs.isdir(f"ports/{ctrl.port_id}")
        return pb.NvmeController(name=f"{SUBS}/{sid}/nvmeControllers/{cid}", spec=spec,
                                 status=pb.NvmeControllerStatus(active=active))

    def DeleteNvmeController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            sid, cid = parse(request.name, SUBS, "nvmeControllers")

            def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> None:
                sub = opi.subsystems.get(sid)
                if sub is None or cid not in sub.controllers:
                    if request.allow_missing:
                        return
                    raise not_found("controller", request.name)
                del sub.controllers[cid]

            self.change(mutate, lambda _: [])
            return empty_pb2.Empty()

        return self.handle(context, run)

    def _controller(self, name: str) -> tuple[str, str, opi_state.OpiController]:
        sid, cid = parse(name, SUBS, "nvmeControllers")
        ctrl = self.state().subsystems.get(sid, opi_state.OpiSubsystem(nqn="nqn.2014-08.invalid:x")
                                           ).controllers.get(cid)
        if ctrl is None:
            raise not_found("controller", name)
        return sid, cid, ctrl

    def GetNvmeController(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.handle(context, lambda: self._controller_msg(*self._controller(request.name)))

    def ListNvmeControllers(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            (sid,) = parse(request.parent, SUBS)
            sub = _subsystem(self.state(), sid, request.parent)
            items, token = page(sorted(sub.controllers.items()), request.page_size, request.page_token)
            return pb.ListNvmeControllersResponse(
                nvme_controllers=[self._controller_msg(sid, c, x) for c, x in items], next_page_token=token)

        return self.handle(context, run)

    def StatsNvmeController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            sid, _cid, _ctrl = self._controller(request.name)
            return pb.StatsNvmeControllerResponse(stats=self._stats(self.state().subsystems[sid].namespaces.values()))

        return self.handle(context, run)

    # ------------------------------------------------------------------ namespaces
    def CreateNvmeNamespace(self, request: Any, context: grpc.ServicerContext) -> Any:
        def mutate(doc: dict[str, Any], opi: opi_state.OpiState) -> tuple[str, str]:
            (sid,) = parse(request.parent, SUBS)
            sub = _subsystem(opi, sid, request.parent)
            spec = request.nvme_namespace.spec
            nid = new_id(request.nvme_namespace_id, sub.namespaces, "nvme_namespace_id")
            used = {n.host_nsid for n in sub.namespaces.values()}
            nsid = spec.host_nsid or next(i for i in range(1, 1025) if i not in used)
            if not 1 <= nsid <= 1024:
                raise invalid(f"nvme_namespace.spec.host_nsid {nsid} is not 1-1024")
            if nsid in used:
                raise exists(f"{request.parent} has a namespace with host_nsid {nsid} already")
            if sub.max_namespaces and len(sub.namespaces) >= sub.max_namespaces:
                raise in_use(f"{request.parent} has max_namespaces={sub.max_namespaces} namespaces already")
            ns = checked(lambda: opi_state.OpiNamespace(
                host_nsid=nsid, volume=spec.volume_name_ref, eui64=spec.eui64,
                uuid=validate.uuid_str(spec.uuid) if spec.uuid else None,
                nguid=validate.uuid_str(spec.nguid) if spec.nguid else None), "nvme_namespace.spec")
            self._check_volume(doc, opi, ns.volume)
            sub.namespaces[nid] = ns
            return sid, nid

        def run() -> Any:
            sid, nid = self.change(mutate, self._namespace_keys)
            return self._namespace_msg(sid, nid, self.state().subsystems[sid].namespaces[nid])

        return self.handle(context, run)

    def _namespace_keys(self, ids: tuple[str, str]) -> list[str]:
        """Where a new namespace shows up in the reconcile: nvmet's namespace and the subsystem's engines."""
        sub = self.state().subsystems[ids[0]]
        return [f"{sub.nqn}/namespaces/{sub.namespaces[ids[1]].host_nsid}"] + [
            f"vhost/{opi_state.pcie_uuid(c.pcie_port, c.pf, c.vf)}" for c in sub.controllers.values()
            if c.trtype == "pcie"]

    def _check_volume(self, doc: dict[str, Any], opi: opi_state.OpiState, volume: str) -> None:
        match = opi_state.REMOTE_NS_RE.fullmatch(volume)
        if match:
            if match.group(1) not in opi.remote_controllers:
                raise not_found("remote controller", f"nvmeRemoteControllers/{match.group(1)}")
        else:
            entry = state_doc.disk(doc, volume)
            if entry is None or not entry.ready:
                raise not_found("volume (nvmetd disk)", volume)
            users = [vm for vm, v in doc.get("vms", {}).items() if volume in v.get("attachments", {})]
            if users:
                raise in_use(f"volume {volume} is attached to VM {users[0]}; a disk serves one user")
        for sid, sub in opi.subsystems.items():
            for nid, ns in sub.namespaces.items():
                if ns.volume == volume:
                    raise in_use(f"volume {volume} is namespace {SUBS}/{sid}/nvmeNamespaces/{nid} already")

    def _namespace_msg(self, sid: str, nid: str, ns: opi_state.OpiNamespace) -> Any:
        sub = self.state().subsystems[sid]
        rel = f"subsystems/{sub.nqn}/namespaces/{ns.host_nsid}"
        enabled = (self.manager.cfs.isdir(rel) and (self.manager.cfs.read(rel, "enable") or "").strip() == "1"
                   ) or self._engine_serves(sub, ns.host_nsid)
        return pb.NvmeNamespace(
            name=f"{SUBS}/{sid}/nvmeNamespaces/{nid}",
            spec=pb.NvmeNamespaceSpec(host_nsid=ns.host_nsid, volume_name_ref=ns.volume, uuid=ns.uuid or "",
                                      nguid=ns.nguid or "", eui64=ns.eui64),
            status=pb.NvmeNamespaceStatus(
                state=pb.NvmeNamespaceStatus.STATE_ENABLED if enabled else pb.NvmeNamespaceStatus.STATE_DISABLED,
                oper_state=pb.NvmeNamespaceStatus.OPER_STATE_ONLINE if enabled
                else pb.NvmeNamespaceStatus.OPER_STATE_OFFLINE))

    def _engine_serves(self, sub: opi_state.OpiSubsystem, nsid: int) -> bool:
        from vhost_nvme.client import EngineClient

        for ctrl in sub.controllers.values():
            if ctrl.trtype == "pcie":
                client = EngineClient(self.manager.vhost.run_dir
                                      / f"{opi_state.pcie_uuid(ctrl.pcie_port, ctrl.pf, ctrl.vf)}.sock")
                if client.alive() and nsid in client.namespaces():
                    return True
        return False

    def _namespace(self, name: str) -> tuple[str, str, opi_state.OpiNamespace]:
        sid, nid = parse(name, SUBS, "nvmeNamespaces")
        sub = self.state().subsystems.get(sid)
        if sub is None or nid not in sub.namespaces:
            raise not_found("namespace", name)
        return sid, nid, sub.namespaces[nid]

    def DeleteNvmeNamespace(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            sid, nid = parse(request.name, SUBS, "nvmeNamespaces")

            def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> None:
                sub = opi.subsystems.get(sid)
                if sub is None or nid not in sub.namespaces:
                    if request.allow_missing:
                        return
                    raise not_found("namespace", request.name)
                del sub.namespaces[nid]

            self.change(mutate, lambda _: [])
            return empty_pb2.Empty()

        return self.handle(context, run)

    def GetNvmeNamespace(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.handle(context, lambda: self._namespace_msg(*self._namespace(request.name)))

    def ListNvmeNamespaces(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            (sid,) = parse(request.parent, SUBS)
            sub = _subsystem(self.state(), sid, request.parent)
            items, token = page(sorted(sub.namespaces.items()), request.page_size, request.page_token)
            return pb.ListNvmeNamespacesResponse(
                nvme_namespaces=[self._namespace_msg(sid, n, x) for n, x in items], next_page_token=token)

        return self.handle(context, run)

    def StatsNvmeNamespace(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            _sid, _nid, ns = self._namespace(request.name)
            return pb.StatsNvmeNamespaceResponse(stats=self._stats([ns]))

        return self.handle(context, run)
