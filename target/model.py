"""The desired state of the whole nvmet tree, validated before anything touches configfs.

A field left as None is not managed: nvmetd leaves the kernel's value alone. Fields that matter for safety have
explicit defaults instead (allow_any_host is False unless asked for). Errors name the field, e.g.
`subsystems.0.namespaces.1.device_path: must be an absolute path`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from target import validate

Nqn = Annotated[str, AfterValidator(validate.kernel_nqn)]
Uuid = Annotated[str, AfterValidator(validate.uuid_str)]
DevicePath = Annotated[str, AfterValidator(validate.device_path)]
DhchapKey = Annotated[str, AfterValidator(validate.dhchap_key)]

Trtype = Literal["tcp", "rdma", "loop", "fc", "vhost"]
Adrfam = Literal["ipv4", "ipv6", "ib", "fc", ""]
Treq = Literal["not specified", "required", "not required"]
AnaState = Literal["optimized", "non-optimized", "inaccessible", "persistent-loss", "change"]
DhchapHash = Literal["hmac(sha256)", "hmac(sha384)", "hmac(sha512)"]
DhGroup = Literal["null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"]

MAX_ANA_GRPID = 128
_VERSION_RE = re.compile(r"^\d{1,3}\.\d{1,3}(\.\d{1,3})?$")


class StateError(ValueError):
    """A desired state that cannot be valid; the message names the field."""


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Host(_Node):
    nqn: Nqn
    dhchap_key: DhchapKey | None = None
    dhchap_ctrl_key: DhchapKey | None = None
    dhchap_hash: DhchapHash | None = None
    dhchap_dhgroup: DhGroup | None = None

    @model_validator(mode="after")
    def _ctrl_key_needs_key(self) -> Host:
        if self.dhchap_ctrl_key and not self.dhchap_key:
            raise ValueError("dhchap_ctrl_key (bidirectional auth) needs dhchap_key as well")
        return self

    def __repr_args__(self):  # keep secrets out of reprs and logs
        for name, value in super().__repr_args__():
            yield name, ("<secret>" if name in ("dhchap_key", "dhchap_ctrl_key") and value else value)


class Namespace(_Node):
    nsid: int = Field(ge=1, le=0xFFFFFFFE)
    device_path: DevicePath | None = None
    device_uuid: Uuid | None = None
    device_nguid: Uuid | None = None
    enable: bool = True
    buffered_io: bool = False
    ana_grpid: int = Field(default=1, ge=1, le=MAX_ANA_GRPID)
    resv_enable: bool | None = None

    @model_validator(mode="after")
    def _enabled_needs_device(self) -> Namespace:
        if self.enable and not self.device_path:
            raise ValueError("an enabled namespace needs device_path")
        return self


class Passthru(_Node):
    device_path: DevicePath
    enable: bool = True
    admin_timeout: int | None = Field(default=None, ge=0)
    io_timeout: int | None = Field(default=None, ge=0)
    clear_ids: bool | None = None


class Subsystem(_Node):
    nqn: Nqn
    allow_any_host: bool = False
    serial: str | None = Field(default=None, min_length=1, max_length=20)
    model: str | None = Field(default=None, min_length=1, max_length=40)
    firmware: str | None = Field(default=None, min_length=1, max_length=8)
    ieee_oui: str | None = None
    cntlid_min: int | None = Field(default=None, ge=1, le=0xFFEF)
    cntlid_max: int | None = Field(default=None, ge=1, le=0xFFEF)
    version: str | None = None
    qid_max: int | None = Field(default=None, ge=1, le=128)
    pi_enable: bool | None = None
    allowed_hosts: list[Nqn] = Field(default_factory=list)
    namespaces: list[Namespace] = Field(default_factory=list)
    passthru: Passthru | None = None

    @field_validator("serial", "model", "firmware")
    @classmethod
    def _printable_ascii(cls, value: str | None) -> str | None:
        if value is not None and not all(" " <= c <= "~" for c in value):
            raise ValueError(f"{value!r} must be printable ASCII")
        if value is not None and value != value.strip(" "):
            raise ValueError(f"{value!r} has leading or trailing spaces (the kernel pads these fields itself)")
        return value

    @field_validator("ieee_oui")
    @classmethod
    def _oui(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            number = int(value, 16)
        except ValueError:
            raise ValueError(f"{value!r} is not a hexadecimal OUI") from None
        if not 0 <= number <= 0xFFFFFF:
            raise ValueError(f"{value!r} is more than 24 bits")
        return f"0x{number:06x}"

    @field_validator("version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _VERSION_RE.match(value):
            raise ValueError(f"{value!r} is not an NVMe version like 1.3 or 2.0")
        return value.removesuffix(".0") if value.count(".") == 2 else value  # the kernel prints 1.3.0 as 1.3

    @model_validator(mode="after")
    def _consistent(self) -> Subsystem:
        if self.allow_any_host and self.allowed_hosts:
            raise ValueError("allow_any_host and allowed_hosts exclude each other (the kernel refuses both)")
        if len(set(self.allowed_hosts)) != len(self.allowed_hosts):
            raise ValueError("allowed_hosts lists a host twice")
        nsids = [ns.nsid for ns in self.namespaces]
        if len(set(nsids)) != len(nsids):
            raise ValueError("two namespaces share an nsid")
        if self.passthru is not None and self.namespaces:
            raise ValueError("a passthru subsystem cannot have namespaces of its own")
        if self.cntlid_min is not None and self.cntlid_max is not None and self.cntlid_min > self.cntlid_max:
            raise ValueError("cntlid_min is above cntlid_max")
        return self


class AnaGroup(_Node):
    grpid: int = Field(ge=1, le=MAX_ANA_GRPID)
    state: AnaState = "optimized"


class Referral(_Node):
    name: Annotated[str, AfterValidator(lambda v: validate.safe_name(v, "referral name"))]
    trtype: Trtype
    adrfam: Adrfam = ""
    traddr: str = ""
    trsvcid: str = ""
    treq: Treq | None = None
    portid: int = Field(default=0, ge=0, le=0xFFFE)
    enable: bool = True

    @model_validator(mode="after")
    def _address(self) -> Referral:
        _check_address(self.trtype, self.adrfam, self.traddr, self.trsvcid)
        return self


class Port(_Node):
    id: int = Field(ge=0, le=0xFFFE)
    trtype: Trtype
    adrfam: Adrfam = ""
    traddr: str = ""
    trsvcid: str = ""
    treq: Treq | None = None
    tsas: str | None = None
    inline_data_size: int | None = Field(default=None, ge=-1)
    max_queue_size: int | None = Field(default=None, ge=-1)
    pi_enable: bool | None = None
    subsystems: list[Nqn] = Field(default_factory=list)
    ana_groups: list[AnaGroup] = Field(default_factory=list)
    referrals: list[Referral] = Field(default_factory=list)

    @field_validator("inline_data_size", "max_queue_size")
    @classmethod
    def _transport_default(cls, value: int | None) -> int | None:
        """-1 asks for the transport's default, which an enabled port reports as the real number: unmanaged."""
        return None if value == -1 else value

    @model_validator(mode="after")
    def _consistent(self) -> Port:
        _check_address(self.trtype, self.adrfam, self.traddr, self.trsvcid)
        if len(set(self.subsystems)) != len(self.subsystems):
            raise ValueError("subsystems lists a subsystem twice")
        grpids = [g.grpid for g in self.ana_groups]
        if len(set(grpids)) != len(grpids):
            raise ValueError("two ana_groups share a grpid")
        names = [r.name for r in self.referrals]
        if len(set(names)) != len(names):
            raise ValueError("two referrals share a name")
        return self

    def ana_state(self, grpid: int) -> str | None:
        for group in self.ana_groups:
            if group.grpid == grpid:
                return group.state
        return "optimized" if grpid == 1 else None


def _check_address(trtype: str, adrfam: str, traddr: str, trsvcid: str) -> None:
    if trtype in ("loop", "vhost"):  # vhost: guests bind through /dev/vhost-nvme (kernel_patches/)
        if adrfam or traddr or trsvcid:
            raise ValueError(f"a {trtype} port takes no adrfam, traddr or trsvcid")
        return
    if trtype in ("tcp", "rdma"):
        if adrfam not in ("ipv4", "ipv6"):
            raise ValueError(f"a {trtype} port needs adrfam ipv4 or ipv6")
        validate.ip_for_family(traddr, adrfam)
        validate.tcp_port(trsvcid)
        return
    if trtype == "fc":
        if adrfam != "fc":
            raise ValueError("an fc port needs adrfam fc")
        validate.fc_addr(traddr)


class TargetState(_Node):
    """The whole tree. Lists are keyed by nqn / id / nsid; cross-references are checked here."""

    discovery_nqn: Nqn | None = None
    hosts: list[Host] = Field(default_factory=list)
    subsystems: list[Subsystem] = Field(default_factory=list)
    ports: list[Port] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> TargetState:
        hosts = {h.nqn for h in self.hosts}
        subsystems = {s.nqn for s in self.subsystems}
        if len(hosts) != len(self.hosts):
            raise ValueError("hosts lists an nqn twice")
        if len(subsystems) != len(self.subsystems):
            raise ValueError("subsystems lists an nqn twice")
        if len({p.id for p in self.ports}) != len(self.ports):
            raise ValueError("ports lists an id twice")
        for sub in self.subsystems:
            for host in sub.allowed_hosts:
                if host not in hosts:
                    raise ValueError(f"subsystem {sub.nqn} allows host {host}, which is not in hosts")
        groups = {1} | {g.grpid for p in self.ports for g in p.ana_groups}
        for sub in self.subsystems:
            for ns in sub.namespaces:
                if ns.ana_grpid not in groups:
                    raise ValueError(f"subsystem {sub.nqn} namespace {ns.nsid} uses ANA group {ns.ana_grpid}, "
                                     "which no port defines")
        for port in self.ports:
            for nqn in port.subsystems:
                if nqn not in subsystems:
                    raise ValueError(f"port {port.id} exports subsystem {nqn}, which is not in subsystems")
        return self

    def subsystem(self, nqn: str) -> Subsystem | None:
        return next((s for s in self.subsystems if s.nqn == nqn), None)

    def port(self, port_id: int) -> Port | None:
        return next((p for p in self.ports if p.id == port_id), None)

    def host(self, nqn: str) -> Host | None:
        return next((h for h in self.hosts if h.nqn == nqn), None)

    def canonical(self) -> TargetState:
        """The same state in a stable order, so stored files and exports diff cleanly."""
        data = self.model_dump()
        data["hosts"].sort(key=lambda h: h["nqn"])
        data["ports"].sort(key=lambda p: p["id"])
        data["subsystems"].sort(key=lambda s: s["nqn"])
        for sub in data["subsystems"]:
            sub["namespaces"].sort(key=lambda n: n["nsid"])
            sub["allowed_hosts"].sort()
        for port in data["ports"]:
            port["subsystems"].sort()
            port["ana_groups"].sort(key=lambda g: g["grpid"])
            port["referrals"].sort(key=lambda r: r["name"])
        return TargetState.model_validate(data)


def parse_state(data: object) -> TargetState:
    """Validate untrusted input; raise StateError with every problem on one line each, field first."""
    try:
        return TargetState.model_validate(data)
    except ValidationError as exc:
        raise StateError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "state"
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)
