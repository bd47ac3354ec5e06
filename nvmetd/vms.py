"""VMs, their disks and attachments, and how they become nvmet objects.

Each VM gets one subsystem of its own whose only allowed host is the VM's host NQN (derived from its UUID, never
allow_any_host), with a DH-CHAP key of its own. Attaching a disk adds a namespace to that subsystem, so a guest
that is already connected sees a new namespace (the kernel's namespace-changed event), not a new controller; a VM
can never reach another VM's subsystem.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from target import validate
from target.model import AnaGroup, Host, Namespace, Port, Subsystem, TargetState

SUBSYSTEM_PREFIX = "nqn.2026-11.io.nvmetd:vm:"
Transport = Literal["tcp", "loop", "rdma", "vhost"]
KERNEL_TRANSPORTS = ("tcp", "loop", "rdma")  # served by nvmet; "vhost" by nvmetd's engine or nvmet-vhost
# the second path of a `--multipath` disk: the VM's subsystem on another tcp port whose ANA group is non-optimized,
# so a host with native NVMe multipath uses the tcp port (optimized) and fails over to this one when it goes away
STANDBY = "tcp-standby"


def vm_hostnqn(vm_uuid: str) -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{vm_uuid}"


def vm_subsystem(vm_uuid: str) -> str:
    return f"{SUBSYSTEM_PREFIX}{vm_uuid}"


def vhost_device_id(vm_name: str) -> str:
    """The QEMU id of a VM's vhost-user-nvme controller (in attach's QEMU arguments and for QMP hot-plug)."""
    from nvmetd.qmp import qemu_id

    return qemu_id("nvmetd-vm-", vm_name)


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nsid: int = Field(ge=1, le=1024)
    transport: Transport
    tls: bool = False  # tcp only: exported on the TLS port (treq required, tsas tls1.3)
    # vhost only: who serves the controller (nvmetd.vhost_kernel); state files from before it mean the engine
    backend: Literal["engine", "kernel"] = "engine"
    # tcp only: the VM's subsystem is also on the standby port (ANA non-optimized), a second path for the host
    multipath: bool = False

    @model_validator(mode="after")
    def _multipath_is_tcp(self) -> Attachment:
        if self.multipath and self.transport != "tcp":
            raise ValueError(f"multipath needs transport tcp (two tcp ports with ANA groups), not {self.transport}")
        if self.multipath and self.tls:
            raise ValueError("multipath and tls: the standby port is plain tcp; use one or the other")
        return self

    @property
    def in_kernel(self) -> bool:
        """Served by nvmet: a fabrics transport, or vhost on the kernel back-end."""
        return self.transport in KERNEL_TRANSPORTS or (self.transport == "vhost" and self.backend == "kernel")

    @property
    def export(self) -> str:
        """The nvmetd port this disk is exported on: its transport, or `tls` for the TLS port."""
        return "tls" if self.tls else self.transport


class Vm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    uuid: str
    dhchap_key: str
    tls_psk: str | None = None  # interchange format; minted at the first TLS attach, replaced by rotation
    attachments: dict[str, Attachment] = Field(default_factory=dict)  # disk name -> attachment

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate.safe_name(value, "VM name")

    def __repr_args__(self):  # keep secrets out of reprs and logs
        for name, value in super().__repr_args__():
            yield name, ("<secret>" if name in ("dhchap_key", "tls_psk") and value else value)

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return validate.uuid_str(value)

    @property
    def hostnqn(self) -> str:
        return validate.nqn(vm_hostnqn(self.uuid))  # nvmetd's own NQNs: the spec's form, strictly

    @property
    def subnqn(self) -> str:
        return validate.nqn(vm_subsystem(self.uuid))

    @property
    def vhost_hostnqn(self) -> str:
        from nvmetd.vhost_kernel import vhost_hostnqn

        return vhost_hostnqn(self.uuid)

    def vhost_backend(self) -> Literal["engine", "kernel"] | None:
        """The back-end of the VM's vhost controller, if it has vhost disks."""
        return next((a.backend for a in self.attachments.values() if a.transport == "vhost"), None)

    def next_nsid(self) -> int:
        used = {a.nsid for a in self.attachments.values()}
        return next(n for n in range(1, 1025) if n not in used)


def new_vm(name: str, vm_uuid: str | None = None) -> Vm:
    return Vm(name=name, uuid=vm_uuid or str(uuidlib.uuid4()),
              dhchap_key=validate.make_dhchap_key(os.urandom(32), 1))


class Ports(BaseModel):
    """Where VM subsystems are exported; ids are reserved for nvmetd's own ports."""

    # TOML configurations naturally write `tcp_port = 4420`
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    tcp_id: int = 4420
    tcp_address: str = "127.0.0.1"
    tcp_port: str = "4420"
    loop_id: int = 4421
    rdma_id: int = 4422
    rdma_address: str | None = None
    rdma_port: str = "4420"
    vhost_id: int = 4423
    # TLS needs a port of its own: treq/tsas are per port, and plain-TCP VMs must keep working
    tls_id: int = 4425
    tls_address: str | None = None  # default: tcp_address
    tls_port: str = "4430"
    tcp_standby_id: int = 4424  # multipath's second path: same address as tcp, its own service id
    tcp_standby_port: str = "4432"

    @model_validator(mode="after")
    def _distinct_ids(self) -> Ports:
        ids = [self.tcp_id, self.loop_id, self.rdma_id, self.vhost_id, self.tls_id, self.tcp_standby_id]
        if len(set(ids)) != len(ids):
            raise ValueError(f"ports: nvmetd's port ids must differ (tcp, loop, rdma, vhost, tls, standby: {ids})")
        return self

    def ids(self) -> dict[str, int]:
        """nvmetd's port id per export (transport, `tls`, or the multipath standby port)."""
        return {"tcp": self.tcp_id, "loop": self.loop_id, "rdma": self.rdma_id, "vhost": self.vhost_id,
                "tls": self.tls_id, STANDBY: self.tcp_standby_id}

    def port(self, transport: str, subsystems: list[str]) -> Port:
        if transport == STANDBY:
            family = "ipv6" if ":" in self.tcp_address else "ipv4"
            return Port(id=self.tcp_standby_id, trtype="tcp", adrfam=family, traddr=self.tcp_address,
                        trsvcid=self.tcp_standby_port, subsystems=subsystems,
                        ana_groups=[AnaGroup(grpid=1, state="non-optimized")])
        if transport == "tls":
            address = self.tls_address or self.tcp_address
            return Port(id=self.tls_id, trtype="tcp", adrfam="ipv6" if ":" in address else "ipv4", traddr=address,
                        trsvcid=self.tls_port, treq="required", tsas="tls1.3", subsystems=subsystems)
        if transport == "tcp":
            family = "ipv6" if ":" in self.tcp_address else "ipv4"
            return Port(id=self.tcp_id, trtype="tcp", adrfam=family, traddr=self.tcp_address,
                        trsvcid=self.tcp_port, subsystems=subsystems)
        if transport == "rdma":
            if not self.rdma_address:
                raise ValueError("no rdma address is configured (ports.rdma_address)")
            family = "ipv6" if ":" in self.rdma_address else "ipv4"
            return Port(id=self.rdma_id, trtype="rdma", adrfam=family, traddr=self.rdma_address,
                        trsvcid=self.rdma_port, subsystems=subsystems)
        if transport == "vhost":  # /dev/vhost-nvme binds to subsystems exported here (kernel_patches/)
            return Port(id=self.vhost_id, trtype="vhost", subsystems=subsystems)
        return Port(id=self.loop_id, trtype="loop", subsystems=subsystems)


def compose(base: TargetState, vms: dict[str, Vm], devices: dict[str, str], ports: Ports) -> TargetState:
    """The effective desired tree: what the operator declared plus one subsystem per VM with disks.

    `devices` maps disk name -> the file or block device its namespace opens (from the backend).
    """
    data: dict[str, Any] = base.model_dump()
    exported: dict[str, list[str]] = {"tcp": [], "loop": [], "rdma": [], "vhost": [], "tls": [], STANDBY: []}
    for vm in sorted(vms.values(), key=lambda v: v.name):
        kernel = {disk: a for disk, a in vm.attachments.items() if a.in_kernel}
        if not kernel:
            continue  # engine-served vhost disks are nvmetd's own engine's, not the kernel target's
        if vm.vhost_backend() == "kernel":
            # the kernel transport does no DH-CHAP: a host NQN of its own, without a key, and no fabric port
            # (attach refuses to mix; nvmetd.vhost_kernel says why)
            host = vm.vhost_hostnqn
            data["hosts"].append(Host(nqn=host).model_dump())
        else:
            host = vm.hostnqn
            data["hosts"].append(Host(nqn=host, dhchap_key=vm.dhchap_key).model_dump())
        namespaces = [Namespace(nsid=a.nsid, device_path=devices[disk],
                                device_uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{vm.uuid}/{disk}")))
                      for disk, a in sorted(kernel.items())]
        data["subsystems"].append(Subsystem(nqn=vm.subnqn, allowed_hosts=[host], model="nvmetd virtual disk",
                                            serial=vm.uuid.replace("-", "")[:20],
                                            namespaces=namespaces).model_dump())
        for transport in sorted({a.export for a in kernel.values()}):
            exported[transport].append(vm.subnqn)
        if any(a.multipath for a in kernel.values()):
            exported[STANDBY].append(vm.subnqn)
    for transport, subs in exported.items():
        if subs:
            data["ports"].append(ports.port(transport, subs).model_dump())
    return TargetState.model_validate(data)
