"""Offload mode (`nvmetctl attach VM DISK --transport dpu --dpu ENDPOINT`): a DPU serves the VM's disk, this host
keeps no data path of its own.

This host's nvmetd is the storage side: it exports the disk over NVMe/TCP to the DPU's host NQN only (an OPI
subsystem of its own state, one per VM, on `[dpu] storage_address`). Then it drives the DPU's OPI endpoint as any
OPI client would: a remote controller and path back to that export (the DPU's kernel NVMe/TCP initiator), a
subsystem, a namespace backed by the remote namespace, and a PCIE controller: the emulated NVMe function whose
queues live in the VM's memory (on our software DPU, a vhost-nvme engine; QEMU gets its socket). Detach deletes
both sides. OPI paths carry no DH-CHAP key, so the export admits the DPU's host NQN without one: the network
between host and DPU is the trust boundary (as it is for the SmartNIC products that OPI drives).
"""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import Int32Value
from pydantic import BaseModel, ConfigDict, Field

from nvmetd.errors import SystemProblem, Unsupported, UserError
from nvmetd.manager import AttachResult, Manager
from nvmetd.opi import state as opi_state
from nvmetd.opi.common import Refused, Service
from nvmetd.opi.stubs import backend_nvme_pb2 as bpb
from nvmetd.opi.stubs import backend_nvme_pb2_grpc as bgrpc
from nvmetd.opi.stubs import frontend_nvme_pb2 as fpb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as fgrpc
from nvmetd.opi.stubs import opicommon_pb2 as common
from nvmetd.vms import vhost_device_id
from target import validate

EXPORT_PREFIX = "nqn.2026-11.io.nvmetd:offload:"  # this host's storage export of a VM's disks
DPU_PREFIX = "nqn.2026-11.io.nvmetd:dpu:"  # the DPU's subsystem the VM sees
NAMESPACE_WAIT = 30.0  # a new namespace on a connected path appears on the DPU after the target's AEN


class DpuConfig(BaseModel):
    """[dpu] in nvmetd.toml."""

    model_config = ConfigDict(extra="forbid", strict=True)
    endpoint: str | None = None  # the DPU's OPI endpoint: unix:/path, or address:port (then mutual TLS)
    storage_address: str | None = None  # where the DPU reaches this host's storage export (NVMe/TCP)
    storage_port: str = "4470"
    hostnqn: str | None = None  # the DPU's initiator host NQN: the only host the export admits
    vhost_dir: str = "/run/nvmetd-dpu/vhost"  # where the DPU's emulated functions (engine sockets) appear
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    timeout: float = Field(default=120.0, gt=0)

    def check(self) -> DpuConfig:
        if self.storage_address is not None:
            family = "ipv6" if ":" in self.storage_address else "ipv4"
            validate.ip_for_family(self.storage_address, family)
        validate.tcp_port(self.storage_port)
        if self.hostnqn is not None:
            validate.nqn(self.hostnqn)
        if self.endpoint is not None:
            check_endpoint(self.endpoint, self)
        return self


def check_endpoint(endpoint: str, config: DpuConfig) -> str:
    if endpoint.startswith("unix:"):
        if not endpoint[5:].startswith("/") or ".." in endpoint.split("/"):
            raise UserError(f"DPU endpoint {endpoint!r}: unix: needs an absolute path")
        return endpoint
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"DPU endpoint {endpoint!r} is neither unix:/path nor address:port")
    if not (config.tls_cert and config.tls_key and config.tls_ca):
        raise UserError(f"DPU endpoint {endpoint} is TCP: set [dpu] tls_cert, tls_key and tls_ca (mutual TLS)")
    return endpoint


class OffloadEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uuid: str
    endpoint: str
    vf: int
    disks: dict[str, int] = Field(default_factory=dict)  # disk -> NSID


def _channel(endpoint: str, config: DpuConfig) -> grpc.Channel:
    if endpoint.startswith("unix:"):
        return grpc.insecure_channel(endpoint)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(config.tls_ca or "").read_bytes(), private_key=Path(config.tls_key or "").read_bytes(),
        certificate_chain=Path(config.tls_cert or "").read_bytes())
    return grpc.secure_channel(endpoint, creds)


def _ok_if_exists(call: Any, request: Any, timeout: float) -> None:
    """A create retried after a partial attach finds its object: that is the object we want."""
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def _ok_if_missing(call: Any, request: Any, timeout: float) -> None:
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise


class Offload(Service):
    def __init__(self, manager: Manager) -> None:
        super().__init__(manager)
        self.config = DpuConfig.model_validate(getattr(manager, "dpu", {}) or {}).check()

    # ------------------------------------------------------------------ this host's storage export
    def _export(self, vm_uuid: str, disk: str, nsid: int) -> None:
        cfg = self.config
        sid = f"offload-{vm_uuid}"

        def mutate(doc: dict[str, Any], opi: opi_state.OpiState) -> None:
            sub = opi.subsystems.setdefault(sid, opi_state.OpiSubsystem(
                nqn=EXPORT_PREFIX + vm_uuid, hostnqn=cfg.hostnqn or "", model="nvmetd offload export"))
            if "tcp" not in sub.controllers:
                family = "ipv6" if ":" in (cfg.storage_address or "") else "ipv4"
                sub.controllers["tcp"] = opi_state.OpiController(
                    trtype="tcp", adrfam=family, traddr=cfg.storage_address or "", trsvcid=cfg.storage_port,
                    port_id=opi_state.next_port_id(doc, opi, "tcp", cfg.storage_address or "", cfg.storage_port))
            sub.namespaces.setdefault(f"n{nsid}", opi_state.OpiNamespace(host_nsid=nsid, volume=disk))

        self.change(mutate, lambda _: [EXPORT_PREFIX + vm_uuid])

    def _unexport(self, vm_uuid: str, nsid: int) -> None:
        sid = f"offload-{vm_uuid}"

        def mutate(_doc: dict[str, Any], opi: opi_state.OpiState) -> None:
            sub = opi.subsystems.get(sid)
            if sub is None:
                return
            sub.namespaces.pop(f"n{nsid}", None)
            if not sub.namespaces:
                del opi.subsystems[sid]

        self.change(mutate, lambda _: [])

    # ------------------------------------------------------------------ the DPU
    def _dpu_create(self, endpoint: str, entry: OffloadEntry, nsid: int) -> list[str]:
        cfg, t, u = self.config, self.config.timeout, entry.uuid
        rc, sub = f"nvmeRemoteControllers/vm-{u}", f"nvmeSubsystems/vm-{u}"
        with _channel(endpoint, cfg) as channel:
            front, back = fgrpc.FrontendNvmeServiceStub(channel), bgrpc.NvmeRemoteControllerServiceStub(channel)
            _ok_if_exists(back.CreateNvmeRemoteController, bpb.CreateNvmeRemoteControllerRequest(
                nvme_remote_controller_id=f"vm-{u}", nvme_remote_controller=bpb.NvmeRemoteController(
                    multipath=bpb.NVME_MULTIPATH_DISABLE)), t)
            family = (common.NVME_ADDRESS_FAMILY_IPV6 if ":" in (cfg.storage_address or "")
                      else common.NVME_ADDRESS_FAMILY_IPV4)
            _ok_if_exists(back.CreateNvmePath, bpb.CreateNvmePathRequest(
                parent=rc, nvme_path_id="p0", nvme_path=bpb.NvmePath(
                    trtype=common.NVME_TRANSPORT_TYPE_TCP, traddr=cfg.storage_address, fabrics=bpb.FabricsPath(
                        trsvcid=int(cfg.storage_port), subnqn=EXPORT_PREFIX + u, hostnqn=cfg.hostnqn,
                        adrfam=family))), t)
            _ok_if_exists(front.CreateNvmeSubsystem, fpb.CreateNvmeSubsystemRequest(
                nvme_subsystem_id=f"vm-{u}", nvme_subsystem=fpb.NvmeSubsystem(spec=fpb.NvmeSubsystemSpec(
                    nqn=DPU_PREFIX + u, model_number="nvmetd DPU disk", serial_number=u.replace("-", "")[:20]))),
                t)
            request = fpb.CreateNvmeNamespaceRequest(parent=sub, nvme_namespace_id=f"n{nsid}", nvme_namespace=(
                fpb.NvmeNamespace(spec=fpb.NvmeNamespaceSpec(
                    host_nsid=nsid, volume_name_ref=f"{rc}/nvmeRemoteNamespaces/{nsid}"))))
            deadline = time.monotonic() + NAMESPACE_WAIT
            while True:  # the remote namespace shows up on the DPU once the target's AEN is handled
                try:
                    _ok_if_exists(front.CreateNvmeNamespace, request, t)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            _ok_if_exists(front.CreateNvmeController, fpb.CreateNvmeControllerRequest(
                parent=sub, nvme_controller_id="pcie", nvme_controller=fpb.NvmeController(
                    spec=fpb.NvmeControllerSpec(trtype=common.NVME_TRANSPORT_TYPE_PCIE, pcie_id=common.PciEndpoint(
                        port_id=Int32Value(value=0), physical_function=Int32Value(value=0),
                        virtual_function=Int32Value(value=entry.vf))))), t)
        return [rc, f"{rc}/nvmePaths/p0", sub, f"{sub}/nvmeNamespaces/n{nsid}", f"{sub}/nvmeControllers/pcie"]

    def _dpu_delete(self, endpoint: str, entry: OffloadEntry, nsid: int, last: bool) -> None:
        t, u = self.config.timeout, entry.uuid
        rc, sub = f"nvmeRemoteControllers/vm-{u}", f"nvmeSubsystems/vm-{u}"
        with _channel(endpoint, self.config) as channel:
            front, back = fgrpc.FrontendNvmeServiceStub(channel), bgrpc.NvmeRemoteControllerServiceStub(channel)
            _ok_if_missing(front.DeleteNvmeNamespace, fpb.DeleteNvmeNamespaceRequest(
                name=f"{sub}/nvmeNamespaces/n{nsid}"), t)
            if last:
                _ok_if_missing(front.DeleteNvmeController, fpb.DeleteNvmeControllerRequest(
                    name=f"{sub}/nvmeControllers/pcie"), t)
                _ok_if_missing(front.DeleteNvmeSubsystem, fpb.DeleteNvmeSubsystemRequest(name=sub), t)
                _ok_if_missing(back.DeleteNvmePath, bpb.DeleteNvmePathRequest(name=f"{rc}/nvmePaths/p0"), t)
                _ok_if_missing(back.DeleteNvmeRemoteController, bpb.DeleteNvmeRemoteControllerRequest(name=rc), t)

    # ------------------------------------------------------------------ attach / detach
    def attach(self, vm_name: str, disk: str, endpoint: str | None, vm_uuid: str | None,
               memory: str | None) -> AttachResult:
        cfg = self.config
        validate.safe_name(vm_name, "VM name")
        endpoint = check_endpoint(endpoint or cfg.endpoint or "", cfg) if (endpoint or cfg.endpoint) else None
        if endpoint is None:
            raise UserError("--transport dpu needs --dpu ENDPOINT (or [dpu] endpoint in nvmetd.toml)")
        if not cfg.storage_address or not cfg.hostnqn:
            raise Unsupported("offload mode needs [dpu] storage_address and hostnqn in nvmetd.toml: where the DPU "
                              "reaches this host's storage export, and the DPU's host NQN")
        with self.manager.lock:
            doc = self.manager.store.load()
            self.manager._disk_pool(doc, disk)
            if vm_name in doc.get("vms", {}):
                raise UserError(f"VM {vm_name!r} has disks on this host's transports; a VM is offloaded whole")
            offload = {k: OffloadEntry.model_validate(v) for k, v in doc.get("offload", {}).items()}
            for other, e in offload.items():
                if other != vm_name and disk in e.disks:
                    raise UserError(f"disk {disk!r} is attached to VM {other!r}; a disk serves one VM")
            entry = offload.get(vm_name) or OffloadEntry(
                uuid=validate.uuid_str(vm_uuid) if vm_uuid else str(uuidlib.uuid4()), endpoint=endpoint,
                vf=next(i for i in range(1, 4096) if i not in {e.vf for e in offload.values()}))
            if entry.endpoint != endpoint:
                raise UserError(f"VM {vm_name!r} is offloaded to {entry.endpoint}, not {endpoint}")
            if disk not in entry.disks and disk in opi_state.disks(doc):
                raise UserError(f"disk {disk!r} is the volume of {opi_state.disks(doc)[disk][0]} (OPI API)")
            nsid = entry.disks.get(disk) or next(i for i in range(1, 1025) if i not in entry.disks.values())
            new = disk not in entry.disks
            self._export(entry.uuid, disk, nsid)
            try:
                created = self._dpu_create(endpoint, entry, nsid)
            except grpc.RpcError as exc:
                if new:  # take back what this attach made, on the DPU and here
                    with contextlib.suppress(grpc.RpcError):
                        self._dpu_delete(endpoint, entry, nsid, last=not entry.disks)
                    self._unexport(entry.uuid, nsid)
                raise SystemProblem(f"the DPU at {endpoint} refused: {exc.code().name}: {exc.details()}") from None
            except Refused as exc:
                raise SystemProblem(str(exc)) from None
            entry.disks[disk] = nsid
            with self.manager.store.transaction() as d:
                d.setdefault("offload", {})[vm_name] = entry.model_dump()
        return self._result(vm_name, disk, entry, nsid, endpoint, created, memory)

    def _result(self, vm_name: str, disk: str, entry: OffloadEntry, nsid: int, endpoint: str,
                created: list[str], memory: str | None) -> AttachResult:
        from vhost_nvme.qemu_args import device_args, shared_memory_args

        sock = str(Path(self.config.vhost_dir) / f"{opi_state.pcie_uuid(0, 0, entry.vf)}.sock")
        qemu = (shared_memory_args(memory) if memory else []) + device_args(
            sock, dev_id=vhost_device_id(vm_name), subnqn=DPU_PREFIX + entry.uuid)
        why = (f"dpu: the DPU at {endpoint} emulates the VM's NVMe function (PCIe vf {entry.vf}) and reaches the "
               "disk over NVMe/TCP; this host keeps no data path of its own")
        notes = [f"the DPU created {', '.join(created)}",
                 f"this host exports {disk} as namespace {nsid} of {EXPORT_PREFIX}{entry.uuid} on "
                 f"{self.config.storage_address}:{self.config.storage_port} to {self.config.hostnqn} only"]
        return AttachResult(vm_name, disk, "dpu", why, DPU_PREFIX + entry.uuid, "", nsid, "", "", "", None, qemu,
                            vhost_socket=sock, notes=notes)

    def detach(self, vm_name: str, disk: str) -> dict[str, Any]:
        with self.manager.lock:
            doc = self.manager.store.load()
            raw = doc.get("offload", {}).get(vm_name)
            entry = OffloadEntry.model_validate(raw)
            nsid = entry.disks.get(disk)
            if nsid is None:
                return {"vm": vm_name, "disk": disk, "detached": False, "converged": True}
            last = len(entry.disks) == 1
            try:
                self._dpu_delete(entry.endpoint, entry, nsid, last)
            except grpc.RpcError as exc:
                raise SystemProblem(f"the DPU at {entry.endpoint} refused: {exc.code().name}: {exc.details()}"
                                    ) from None
            self._unexport(entry.uuid, nsid)
            with self.manager.store.transaction() as d:
                if last:
                    d["offload"].pop(vm_name, None)
                else:
                    d["offload"][vm_name]["disks"].pop(disk, None)
        return {"vm": vm_name, "disk": disk, "detached": True, "converged": True,
                "dpu_removed": [f"nvmeSubsystems/vm-{entry.uuid}/nvmeNamespaces/n{nsid}"]
                + ([f"nvmeSubsystems/vm-{entry.uuid}", f"nvmeRemoteControllers/vm-{entry.uuid}"] if last else [])}
