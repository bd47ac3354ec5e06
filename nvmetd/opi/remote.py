"""NvmeRemoteControllerService: the backend connections to NVMe-oF storage targets, made with libnvme.

A remote controller is one remote subsystem; each NvmePath is a kernel NVMe/TCP (or RDMA) connection to it from
this machine. Its namespaces are block devices here (`nvmeRemoteControllers/{id}/nvmeRemoteNamespaces/{nsid}`)
that an NvmeNamespace can be backed by: the front end then re-exports the remote namespace (nvmet or the vhost
engine) and this machine is the DPU in between. Connections are made with ctrl_loss_tmo = -1 (the kernel keeps
reconnecting a dropped path), and the reconcile reconnects a path that is gone (after a reboot).
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from nvmetd import initiator
from nvmetd.opi import state as opi_state
from nvmetd.opi.common import Refused, Service, checked, exists, in_use, invalid, new_id, not_found, page, parse
from nvmetd.opi.stats import volume_stats
from nvmetd.opi.stubs import backend_nvme_pb2 as pb
from nvmetd.opi.stubs import backend_nvme_pb2_grpc as pb_grpc
from nvmetd.opi.stubs import opicommon_pb2 as common
from target import validate

log = logging.getLogger("nvmetd.opi.remote")

RCS = "nvmeRemoteControllers"
TRTYPES = {common.NVME_TRANSPORT_TYPE_TCP: "tcp", common.NVME_TRANSPORT_TYPE_RDMA: "rdma"}
TRTYPE_ENUM = {v: k for k, v in TRTYPES.items()}
ADRFAM = {common.NVME_ADDRESS_FAMILY_IPV4: "ipv4", common.NVME_ADDRESS_FAMILY_IPV6: "ipv6"}
ADRFAM_ENUM = {v: k for k, v in ADRFAM.items()}


def default_hostnqn(rc_id: str) -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuidlib.uuid5(uuidlib.NAMESPACE_URL, f'opi-rc:{rc_id}')}"


# ---------------------------------------------------------------------- the kernel's connections (sysfs)
def _address(ctrl: Path) -> dict[str, str]:
    text = (ctrl / "address").read_text().strip()
    return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)


def path_controllers(path: opi_state.OpiPath) -> list[Path]:
    """The kernel controllers (/sys/class/nvme/nvmeX) that are this path's connection."""
    found = []
    for ctrl in sorted(opi_state.SYS_NVME.glob("nvme*")):
        try:
            if ((ctrl / "subsysnqn").read_text().strip() == path.subnqn
                    and (ctrl / "transport").read_text().strip() == path.trtype
                    and _address(ctrl).get("traddr") == path.traddr
                    and _address(ctrl).get("trsvcid") == path.trsvcid):
                found.append(ctrl)
        except OSError:
            continue
    return found


def connect(path: opi_state.OpiPath, rc: opi_state.OpiRemoteController) -> str:
    if path_controllers(path):
        return path_controllers(path)[0].name
    try:
        from libnvme import nvme
    except ImportError as exc:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                      f"libnvme's Python bindings are not installed ({exc})") from None
    import subprocess

    for module in ("nvme-fabrics", initiator.HOST_MODULES[path.trtype]):
        subprocess.run(["modprobe", "-q", module], check=False, capture_output=True)
    root = nvme.root()
    host = nvme.host(root, hostnqn=path.hostnqn, hostid=initiator.host_id_for(path.hostnqn))
    ctrl = nvme.ctrl(root, subsysnqn=path.subnqn, transport=path.trtype, traddr=path.traddr,
                     trsvcid=path.trsvcid)
    cfg: dict[str, Any] = {"ctrl_loss_tmo": -1, "reconnect_delay": 1, "hdr_digest": rc.hdgst,
                           "data_digest": rc.ddgst}
    if rc.io_queues_count:
        cfg["nr_io_queues"] = rc.io_queues_count
    try:
        ctrl.connect(host, cfg)
    except Exception as exc:  # libnvme raises a bare Exception with the kernel's reason
        raise Refused(grpc.StatusCode.UNAVAILABLE,
                      f"connect to {path.subnqn} at {path.trtype} {path.traddr}:{path.trsvcid} failed: {exc}"
                      ) from None
    log.info("connected %s at %s %s:%s as %s", path.subnqn, path.trtype, path.traddr, path.trsvcid, ctrl.name)
    return str(ctrl.name)


def disconnect(path: opi_state.OpiPath) -> None:
    for ctrl in path_controllers(path):
        (ctrl / "delete_controller").write_text("1")
        log.info("disconnected %s (%s)", ctrl.name, path.subnqn)


def reconnect_all(doc: dict[str, Any]) -> None:
    """Reconcile: every stored path connected (after a reboot, or a connection deleted by hand)."""
    for rc_id, rc in opi_state.load(doc).remote_controllers.items():
        for path_id, path in rc.paths.items():
            if not path_controllers(path):
                try:
                    connect(path, rc)
                except Refused as exc:
                    log.warning("%s/%s/nvmePaths/%s: %s", RCS, rc_id, path_id, exc)


def remote_namespaces(rc: opi_state.OpiRemoteController) -> dict[int, Path]:
    namespaces: dict[int, Path] = {}
    for path in rc.paths.values():
        for ctrl in path_controllers(path):
            for ns in sorted(ctrl.glob("nvme*n*")):
                try:
                    namespaces.setdefault(int((ns / "nsid").read_text()), ns)
                except (OSError, ValueError):
                    continue
    return namespaces


def _attr(ns: Path, name: str) -> str:
    try:
        return (ns / name).read_text().strip()
    except OSError:
        return ""


class Remote(Service, pb_grpc.NvmeRemoteControllerServiceServicer):
    # ------------------------------------------------------------------ remote controllers
    def _rc(self, name: str) -> tuple[str, opi_state.OpiRemoteController]:
        (rid,) = parse(name, RCS)
        rc = self.state().remote_controllers.get(rid)
        if rc is None:
            raise not_found("remote controller", name)
        return rid, rc

    @staticmethod
    def _rc_msg(rid: str, rc: opi_state.OpiRemoteController) -> Any:
        return pb.NvmeRemoteController(name=f"{RCS}/{rid}", multipath=rc.multipath,
                                       io_queues_count=rc.io_queues_count, queue_size=rc.queue_size,
                                       tcp=pb.TcpController(hdgst=rc.hdgst, ddgst=rc.ddgst))

    def CreateNvmeRemoteController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> str:
            msg = request.nvme_remote_controller
            if msg.tcp.psk:
                raise Refused(grpc.StatusCode.UNIMPLEMENTED, "nvme_remote_controller.tcp.psk: TLS paths are not "
                              "served by this API")
            if msg.io_queues_count < 0 or msg.queue_size < 0:
                raise invalid("io_queues_count and queue_size must not be negative")
            rid = new_id(request.nvme_remote_controller_id, opi.remote_controllers, "nvme_remote_controller_id")
            opi.remote_controllers[rid] = opi_state.OpiRemoteController(
                multipath=msg.multipath, hdgst=msg.tcp.hdgst, ddgst=msg.tcp.ddgst,
                io_queues_count=msg.io_queues_count, queue_size=msg.queue_size)
            return rid

        def run() -> Any:
            rid = self.change(mutate, lambda _: [])
            return self._rc_msg(rid, self.state().remote_controllers[rid])

        return self.handle(context, run)

    def DeleteNvmeRemoteController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            (rid,) = parse(request.name, RCS)

            def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> None:
                rc = opi.remote_controllers.get(rid)
                if rc is None:
                    if request.allow_missing:
                        return
                    raise not_found("remote controller", request.name)
                if rc.paths:
                    raise in_use(f"{request.name} still has {len(rc.paths)} paths: delete them first")
                del opi.remote_controllers[rid]

            self.change(mutate, lambda _: [])
            return empty_pb2.Empty()

        return self.handle(context, run)

    def GetNvmeRemoteController(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.handle(context, lambda: self._rc_msg(*self._rc(request.name)))

    def ListNvmeRemoteControllers(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            items, token = page(sorted(self.state().remote_controllers.items()), request.page_size,
                                request.page_token)
            return pb.ListNvmeRemoteControllersResponse(
                nvme_remote_controllers=[self._rc_msg(r, x) for r, x in items], next_page_token=token)

        return self.handle(context, run)

    def ResetNvmeRemoteController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            _rid, rc = self._rc(request.name)
            for path in rc.paths.values():
                for ctrl in path_controllers(path):
                    (ctrl / "reset_controller").write_text("1")
            return empty_pb2.Empty()

        return self.handle(context, run)

    def StatsNvmeRemoteController(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            _rid, rc = self._rc(request.name)
            devices = [f"/dev/{ns.name}" for ns in remote_namespaces(rc).values()]
            return pb.StatsNvmeRemoteControllerResponse(stats=volume_stats(devices))

        return self.handle(context, run)

    def ListNvmeRemoteNamespaces(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            rid, rc = self._rc(request.parent)
            items, token = page(sorted(remote_namespaces(rc).items()), request.page_size, request.page_token)
            return pb.ListNvmeRemoteNamespacesResponse(
                nvme_remote_namespaces=[self._remote_ns_msg(rid, n, ns) for n, ns in items], next_page_token=token)

        return self.handle(context, run)

    @staticmethod
    def _remote_ns_msg(rid: str, nsid: int, ns: Path) -> Any:
        eui = _attr(ns, "eui")
        return pb.NvmeRemoteNamespace(name=f"{RCS}/{rid}/nvmeRemoteNamespaces/{nsid}", nsid=nsid,
                                      uuid=_attr(ns, "uuid"), nguid=_attr(ns, "nguid"),
                                      eui64=int(eui.replace(" ", ""), 16) % 2**63 if eui else 0)

    def GetNvmeRemoteNamespace(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            m = opi_state.REMOTE_NS_RE.fullmatch(request.name)
            if m is None:
                raise invalid(f"name {request.name[:80]!r} is not of the form "
                              f"{RCS}/{{id}}/nvmeRemoteNamespaces/{{nsid}}")
            rid, rc = self._rc(f"{RCS}/{m.group(1)}")
            ns = remote_namespaces(rc).get(int(m.group(2)))
            if ns is None:
                raise not_found("remote namespace", request.name)
            return self._remote_ns_msg(rid, int(m.group(2)), ns)

        return self.handle(context, run)

    # ------------------------------------------------------------------ paths
    @staticmethod
    def _path_msg(rid: str, pid: str, path: opi_state.OpiPath) -> Any:
        return pb.NvmePath(name=f"{RCS}/{rid}/nvmePaths/{pid}", trtype=TRTYPE_ENUM[path.trtype],
                           traddr=path.traddr, fabrics=pb.FabricsPath(
                               trsvcid=int(path.trsvcid), subnqn=path.subnqn, hostnqn=path.hostnqn,
                               adrfam=ADRFAM_ENUM[path.adrfam]))

    def _path(self, name: str) -> tuple[str, str, opi_state.OpiPath]:
        rid, pid = parse(name, RCS, "nvmePaths")
        rc = self.state().remote_controllers.get(rid)
        if rc is None or pid not in rc.paths:
            raise not_found("path", name)
        return rid, pid, rc.paths[pid]

    def CreateNvmePath(self, request: Any, context: grpc.ServicerContext) -> Any:
        def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> tuple[str, str]:
            (rid,) = parse(request.parent, RCS)
            rc = opi.remote_controllers.get(rid)
            if rc is None:
                raise not_found("remote controller", request.parent)
            msg = request.nvme_path
            trtype = TRTYPES.get(msg.trtype)
            if trtype is None:
                raise invalid(f"nvme_path.trtype {common.NvmeTransportType.Name(msg.trtype)} is not served here "
                              "(TCP or RDMA)")
            adrfam = ADRFAM.get(msg.fabrics.adrfam)
            if adrfam is None:
                raise invalid("nvme_path.fabrics.adrfam must be IPV4 or IPV6")
            if msg.fabrics.source_traddr or msg.fabrics.source_trsvcid:
                raise Refused(grpc.StatusCode.UNIMPLEMENTED, "nvme_path.fabrics.source_traddr/source_trsvcid are "
                              "not served")
            path = opi_state.OpiPath(
                trtype=trtype, adrfam=adrfam,
                traddr=checked(lambda: validate.ip_for_family(msg.traddr, adrfam), "nvme_path.traddr"),
                trsvcid=checked(lambda: validate.tcp_port(str(msg.fabrics.trsvcid)), "nvme_path.fabrics.trsvcid"),
                subnqn=checked(lambda: validate.nqn(msg.fabrics.subnqn), "nvme_path.fabrics.subnqn"),
                hostnqn=checked(lambda: validate.nqn(msg.fabrics.hostnqn or default_hostnqn(rid)),
                                "nvme_path.fabrics.hostnqn"))
            if path.subnqn == validate.DISCOVERY_NQN:
                raise invalid("nvme_path.fabrics.subnqn: a path goes to a storage subsystem, not to discovery")
            if any(p.subnqn != path.subnqn for p in rc.paths.values()):
                raise invalid(f"{request.parent} is a controller of {next(iter(rc.paths.values())).subnqn}; "
                              "a path to another subsystem needs a remote controller of its own")
            if any((p.trtype, p.traddr, p.trsvcid) == (path.trtype, path.traddr, path.trsvcid)
                   for p in rc.paths.values()):
                raise exists(f"{request.parent} has a path to {path.traddr}:{path.trsvcid} already")
            pid = new_id(request.nvme_path_id, rc.paths, "nvme_path_id")
            connect(path, rc)  # before it is stored: a path that cannot connect is refused, nothing recorded
            rc.paths[pid] = path
            return rid, pid

        def run() -> Any:
            rid, pid = self.change(mutate, lambda _: [])
            return self._path_msg(rid, pid, self.state().remote_controllers[rid].paths[pid])

        return self.handle(context, run)

    def DeleteNvmePath(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            rid, pid = parse(request.name, RCS, "nvmePaths")
            removed: list[opi_state.OpiPath] = []

            def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> None:
                rc = opi.remote_controllers.get(rid)
                if rc is None or pid not in rc.paths:
                    if request.allow_missing:
                        return
                    raise not_found("path", request.name)
                if len(rc.paths) == 1:
                    for sid, sub in opi.subsystems.items():
                        for nid, ns in sub.namespaces.items():
                            if ns.volume.startswith(f"{RCS}/{rid}/"):
                                raise in_use(f"{request.name} is the last path of {ns.volume}, the volume of "
                                             f"nvmeSubsystems/{sid}/nvmeNamespaces/{nid}: delete that first")
                removed.append(rc.paths.pop(pid))

            self.change(mutate, lambda _: [])
            for path in removed:
                disconnect(path)
            return empty_pb2.Empty()

        return self.handle(context, run)

    def GetNvmePath(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.handle(context, lambda: self._path_msg(*self._path(request.name)))

    def ListNvmePaths(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            rid, rc = self._rc(request.parent)
            items, token = page(sorted(rc.paths.items()), request.page_size, request.page_token)
            return pb.ListNvmePathsResponse(nvme_paths=[self._path_msg(rid, p, x) for p, x in items],
                                            next_page_token=token)

        return self.handle(context, run)

    def StatsNvmePath(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            _rid, _pid, path = self._path(request.name)
            devices = [f"/dev/{ns.name}" for ctrl in path_controllers(path) for ns in sorted(ctrl.glob("nvme*n*"))]
            if not devices:
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"{request.name} is not connected now")
            return pb.StatsNvmePathResponse(stats=volume_stats(devices))

        return self.handle(context, run)
