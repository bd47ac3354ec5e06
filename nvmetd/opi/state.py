"""The OPI objects as nvmetd stores them (`opi` in the state document) and what they become in the kernel tree.

One state, two APIs: OPI subsystems, namespaces and fabrics controllers are composed into the same TargetState the
VMs' subsystems are (Manager.effective), PCIE controllers into vhost-nvme engines (Manager.engine_specs), and the
disks OPI namespaces use are held like attached disks (never released or deleted under them).

Resource names follow opi-api (AIP-122): `nvmeSubsystems/{id}`, `nvmeSubsystems/{id}/nvmeControllers/{id}`,
`nvmeSubsystems/{id}/nvmeNamespaces/{id}`, `nvmeRemoteControllers/{id}`, `nvmeRemoteControllers/{id}/nvmePaths/{id}`.
A namespace's volume is a nvmetd disk (its name) or a namespace of a remote controller
(`nvmeRemoteControllers/{id}/nvmeRemoteNamespaces/{nsid}`), the block device libnvme's connection gives.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from target import validate
from target.model import Host, Namespace, Port, Subsystem, TargetState

# AIP-122 resource ids: lower-case letters, digits and '-', starting with a letter, at most 63 characters.
ID_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
REMOTE_NS_RE = re.compile(rf"nvmeRemoteControllers/({ID_RE.pattern})/nvmeRemoteNamespaces/([1-9][0-9]{{0,9}})",
                          re.ASCII)
FIRST_PORT_ID = 1000  # OPI fabrics controllers' nvmet ports; below are the operator's and nvmetd's own (442x)
SYS_NVME = Path("/sys/class/nvme")


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"{what} {value[:40]!r} is not a resource id (lower-case letters, digits and '-', "
                         "starting with a letter, at most 63 characters)")
    return value


def parse_name(name: str, *collections: str) -> list[str]:
    """The ids in a resource name of the given shape; ValueError names what is wrong."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 2 * len(collections) or parts[0::2] != list(collections):
        shape = "/".join(f"{c}/{{id}}" for c in collections)
        raise ValueError(f"name {str(name)[:80]!r} is not of the form {shape}")
    return [check_id(i, f"{c[:-1]} id") for c, i in zip(collections, parts[1::2], strict=True)]


class _Obj(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpiNamespace(_Obj):
    host_nsid: int = Field(ge=1, le=1024)
    volume: str  # a nvmetd disk name or nvmeRemoteControllers/{id}/nvmeRemoteNamespaces/{nsid}
    uuid: str | None = None
    nguid: str | None = None
    eui64: int = 0

    @field_validator("volume")
    @classmethod
    def _volume(cls, value: str) -> str:
        if REMOTE_NS_RE.fullmatch(value):
            return value
        from backends import names
        from backends.errors import BackendError

        try:
            return names.name(value, "volume_name_ref (a nvmetd disk)")
        except BackendError as exc:
            raise ValueError(f"{exc}; or nvmeRemoteControllers/{{id}}/nvmeRemoteNamespaces/{{nsid}}") from None


class OpiController(_Obj):
    trtype: Literal["pcie", "tcp", "rdma"]
    cntlid: int = 0
    # pcie: the emulated function a VM sees (port, physical and virtual function)
    pcie_port: int = 0
    pf: int = 0
    vf: int = 0
    # tcp / rdma: the nvmet port the controller listens on
    adrfam: str = ""
    traddr: str = ""
    trsvcid: str = ""
    port_id: int = 0
    max_nsq: int = 0
    max_ncq: int = 0


class OpiSubsystem(_Obj):
    nqn: str
    serial: str = ""
    model: str = ""
    max_namespaces: int = 0
    hostnqn: str = ""  # the host allowed to connect over fabrics; none: nobody (never allow_any_host)
    controllers: dict[str, OpiController] = Field(default_factory=dict)
    namespaces: dict[str, OpiNamespace] = Field(default_factory=dict)

    _nqn = field_validator("nqn")(classmethod(lambda cls, v: validate.nqn(v)))


class OpiPath(_Obj):
    trtype: Literal["tcp", "rdma", "loop"]
    adrfam: str = ""
    traddr: str = ""
    trsvcid: str = ""
    subnqn: str
    hostnqn: str


class OpiRemoteController(_Obj):
    multipath: int = 0
    hdgst: bool = False
    ddgst: bool = False
    io_queues_count: int = 0
    queue_size: int = 0
    paths: dict[str, OpiPath] = Field(default_factory=dict)


class OpiState(_Obj):
    subsystems: dict[str, OpiSubsystem] = Field(default_factory=dict)
    remote_controllers: dict[str, OpiRemoteController] = Field(default_factory=dict)


def load(doc: dict[str, Any]) -> OpiState:
    return OpiState.model_validate(doc.get("opi", {}))


def store(doc: dict[str, Any], state: OpiState) -> None:
    doc["opi"] = state.model_dump()


# ---------------------------------------------------------------------- what the Manager composes
def disks(doc: dict[str, Any]) -> dict[str, list[str]]:
    """nvmetd disk -> the OPI namespaces that use it (so it is activated, never released or deleted under them)."""
    users: dict[str, list[str]] = {}
    for sid, sub in load(doc).subsystems.items():
        for nid, ns in sub.namespaces.items():
            if not REMOTE_NS_RE.fullmatch(ns.volume):
                users.setdefault(ns.volume, []).append(f"nvmeSubsystems/{sid}/nvmeNamespaces/{nid}")
    return users


def remote_device(doc: dict[str, Any], volume: str) -> str:
    """The block device of a remote namespace: found by the remote subsystem NQN and NSID in sysfs (device
    numbers are not stable). A path that is not connected gives a path that does not exist: the namespace is
    then `pending` in the reconcile, as a late local device is."""
    match = REMOTE_NS_RE.fullmatch(volume)
    assert match is not None
    rc = load(doc).remote_controllers.get(match.group(1))
    nsid = int(match.group(2))
    missing = f"/dev/disk/by-nvmetd-opi/{match.group(1)}-n{nsid}"
    if rc is None or not rc.paths:
        return missing
    subnqns = {p.subnqn for p in rc.paths.values()}
    for ctrl in sorted(SYS_NVME.glob("nvme*")):
        try:
            if (ctrl / "subsysnqn").read_text().strip() not in subnqns:
                continue
        except OSError:
            continue
        for ns in sorted(ctrl.glob("nvme*n*")):
            try:
                if int((ns / "nsid").read_text()) == nsid and Path("/dev", ns.name).exists():
                    return f"/dev/{ns.name}"
            except (OSError, ValueError):
                continue
    return missing


def merge(state: TargetState, doc: dict[str, Any], devices: dict[str, str]) -> TargetState:
    """The effective tree plus the OPI subsystems and their fabrics controllers' ports.

    A controller whose address is already a port of the tree (nvmetd's VM port, the operator's) joins that port:
    nvmet cannot have two ports on one address."""
    opi = load(doc)
    if not opi.subsystems:
        return state
    data = state.model_dump()
    for sid, sub in sorted(opi.subsystems.items()):
        if not in_kernel(sub):
            continue
        namespaces = []
        for _nid, ns in sorted(sub.namespaces.items(), key=lambda kv: kv[1].host_nsid):
            path = remote_device(doc, ns.volume) if REMOTE_NS_RE.fullmatch(ns.volume) else devices[ns.volume]
            namespaces.append(Namespace(nsid=ns.host_nsid, device_path=path,
                                        device_uuid=ns.uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                                                                 f"opi/{sid}/{ns.host_nsid}")),
                                        device_nguid=ns.nguid).model_dump())
        if sub.hostnqn and all(h["nqn"] != sub.hostnqn for h in data["hosts"]):
            data["hosts"].append(Host(nqn=sub.hostnqn).model_dump())
        data["subsystems"].append(Subsystem(
            nqn=sub.nqn, allowed_hosts=[sub.hostnqn] if sub.hostnqn else [], model=sub.model or None,
            serial=sub.serial or None, namespaces=namespaces).model_dump())
        for ctrl in sub.controllers.values():
            if ctrl.trtype == "pcie":
                continue
            same = next((p for p in data["ports"] if (p["trtype"], p["traddr"], p["trsvcid"])
                         == (ctrl.trtype, ctrl.traddr, ctrl.trsvcid)), None)
            if same is None:
                same = Port(id=ctrl.port_id, trtype=ctrl.trtype, adrfam=ctrl.adrfam, traddr=ctrl.traddr,
                            trsvcid=ctrl.trsvcid).model_dump()
                data["ports"].append(same)
            if sub.nqn not in same["subsystems"]:
                same["subsystems"].append(sub.nqn)
    return TargetState.model_validate(data)


def in_kernel(sub: OpiSubsystem) -> bool:
    """The kernel target holds an OPI subsystem only while it has a TCP/RDMA controller: without a port nobody
    could reach it, and a PCIE function is served by the vhost-nvme engine. So a DPU's nvmetd whose functions are
    all PCIE needs no nvmet of its own (in the one-kernel simulation it must not touch the host's tree)."""
    return any(c.trtype != "pcie" for c in sub.controllers.values())


def pcie_uuid(port: int, pf: int, vf: int) -> str:
    """The stable name of an emulated PCIe function's vhost-nvme engine (its socket is `<uuid>.sock` in the
    engines' run directory): a host that asked for function (port, pf, vf) finds its socket without asking."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"opi-pcie:{port}:{pf}:{vf}"))


def engine_specs(doc: dict[str, Any], devices: dict[str, str]) -> list[Any]:
    """One vhost-nvme engine per PCIE controller, serving its subsystem's namespaces (the DPU's emulated NVMe
    function: the VM's queues are in its memory, the engine serves them)."""
    from nvmetd.vhost import EngineSpec
    from nvmetd.vms import Vm

    specs = []
    for sid, sub in sorted(load(doc).subsystems.items()):
        namespaces = {}
        for ns in sub.namespaces.values():
            path = remote_device(doc, ns.volume) if REMOTE_NS_RE.fullmatch(ns.volume) else devices[ns.volume]
            namespaces[ns.host_nsid] = (ns.volume.replace("/", "_"), path)
        for cid, ctrl in sorted(sub.controllers.items()):
            if ctrl.trtype == "pcie" and namespaces:
                vm = Vm(name=f"opi.{sid}.{cid}"[:64], uuid=pcie_uuid(ctrl.pcie_port, ctrl.pf, ctrl.vf),
                        dhchap_key="-")
                specs.append(EngineSpec(vm, namespaces))
    return specs


def next_port_id(doc: dict[str, Any], state: OpiState, trtype: str, traddr: str, trsvcid: str) -> int:
    """The nvmet port id for a new fabrics controller: the one already used for that address, else the lowest
    free id from FIRST_PORT_ID, kept in the controller record so ports never renumber under connected hosts."""
    used = {p.get("id") for p in doc.get("target", {}).get("ports", [])}
    for sub in state.subsystems.values():
        for ctrl in sub.controllers.values():
            if ctrl.trtype != "pcie":
                if (ctrl.trtype, ctrl.traddr, ctrl.trsvcid) == (trtype, traddr, trsvcid):
                    return ctrl.port_id
                used.add(ctrl.port_id)
    return next(i for i in range(FIRST_PORT_ID, 0xFFFE) if i not in used)
