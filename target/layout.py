"""Where each model field lives in configfs and how its value is spelled there.

Desired and live state are both turned into the same flat form, one Node per configfs directory with its
attribute files in write order, so the planner compares strings exactly as the kernel prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from target.model import Host, Namespace, Passthru, Port, Referral, Subsystem, TargetState


@dataclass(frozen=True)
class Attr:
    name: str  # model field
    file: str  # configfs attribute
    kind: str = "str"  # str | bool | int | path | padded (the kernel pads with spaces)
    quiesce: bool = False  # the kernel refuses a change while the object is enabled / the port is in use
    secret: bool = False


HOST_ATTRS = (
    Attr("dhchap_hash", "dhchap_hash"),
    Attr("dhchap_dhgroup", "dhchap_dhgroup"),
    Attr("dhchap_key", "dhchap_key", secret=True),
    Attr("dhchap_ctrl_key", "dhchap_ctrl_key", secret=True),
)
SUBSYSTEM_ATTRS = (
    Attr("cntlid_min", "attr_cntlid_min", "int"),
    Attr("cntlid_max", "attr_cntlid_max", "int"),
    Attr("serial", "attr_serial", "padded"),
    Attr("model", "attr_model", "padded"),
    Attr("firmware", "attr_firmware", "padded"),
    Attr("ieee_oui", "attr_ieee_oui"),
    Attr("version", "attr_version"),
    Attr("qid_max", "attr_qid_max", "int"),
    Attr("pi_enable", "attr_pi_enable", "bool"),
    Attr("allow_any_host", "attr_allow_any_host", "bool"),
)
NAMESPACE_ATTRS = (
    Attr("device_path", "device_path", "path", quiesce=True),
    Attr("device_uuid", "device_uuid", quiesce=True),
    Attr("device_nguid", "device_nguid", quiesce=True),
    Attr("buffered_io", "buffered_io", "bool", quiesce=True),
    Attr("resv_enable", "resv_enable", "bool", quiesce=True),
    Attr("ana_grpid", "ana_grpid", "int"),
)
PASSTHRU_ATTRS = (
    Attr("device_path", "device_path", "path", quiesce=True),
    Attr("clear_ids", "clear_ids", "bool", quiesce=True),
    Attr("admin_timeout", "admin_timeout", "int"),
    Attr("io_timeout", "io_timeout", "int"),
)
PORT_ATTRS = (
    Attr("trtype", "addr_trtype", quiesce=True),
    Attr("adrfam", "addr_adrfam", quiesce=True),
    Attr("traddr", "addr_traddr", quiesce=True),
    Attr("trsvcid", "addr_trsvcid", quiesce=True),
    Attr("treq", "addr_treq", quiesce=True),
    Attr("tsas", "addr_tsas", quiesce=True),
    Attr("inline_data_size", "param_inline_data_size", "int", quiesce=True),
    Attr("max_queue_size", "param_max_queue_size", "int", quiesce=True),
    Attr("pi_enable", "param_pi_enable", "bool", quiesce=True),
)
REFERRAL_ATTRS = (
    Attr("trtype", "addr_trtype", quiesce=True),
    Attr("adrfam", "addr_adrfam", quiesce=True),
    Attr("traddr", "addr_traddr", quiesce=True),
    Attr("trsvcid", "addr_trsvcid", quiesce=True),
    Attr("treq", "addr_treq", quiesce=True),
    Attr("portid", "addr_portid", "int", quiesce=True),
)
ANA_ATTRS = (Attr("state", "ana_state"),)


# What a freshly made directory already holds (read off 6.12; tests/fixtures/configfs-6.12-probe.txt). Writing
# these into a new directory changes nothing, so the planner skips them; a wrong entry would show up as a write
# on re-apply, which the kernel tests forbid.
FRESH_DEFAULTS: dict[tuple[str, str], str] = {
    ("subsystem", "attr_allow_any_host"): "0",
    ("subsystem", "attr_pi_enable"): "0",
    ("namespace", "buffered_io"): "0",
    ("namespace", "ana_grpid"): "1",
    ("port", "addr_treq"): "not specified",
    ("port", "param_pi_enable"): "0",
    ("referral", "addr_treq"): "not specified",
    ("host", "dhchap_hash"): "hmac(sha256)",
    ("host", "dhchap_dhgroup"): "null",
}


def encode(attr: Attr, value: object) -> str:
    if attr.kind == "bool":
        return "1" if value else "0"
    return str(value)


def normalize(attr: Attr, raw: str | None) -> str | None:
    """The live value in the form `encode` produces, so equal means equal."""
    if raw is not None and attr.kind == "padded":
        return raw.rstrip(" ")
    return raw


def decode(attr: Attr, raw: str | None) -> object:
    raw = normalize(attr, raw)
    if raw is None:
        return None
    if attr.kind == "bool":
        return raw.strip() == "1"
    if attr.kind == "int":
        return int(raw)
    if attr.kind == "path":
        return None if raw in ("(null)", "") else raw
    return raw


@dataclass
class Node:
    """One configfs directory as the desired state wants it."""

    kind: str
    path: str
    label: str  # how a person names it: "namespace nqn...:s1/1"
    attrs: list[tuple[Attr, str]] = field(default_factory=list)
    enable: str | None = None  # written last, after all attributes
    implicit: bool = False  # exists without mkdir (passthru, ANA group 1)
    parent: str | None = None
    device: str | None = None  # must exist before enable
    links: list[tuple[str, str, str]] = field(default_factory=list)  # (link path, target path, label)


def host_path(nqn: str) -> str:
    return f"hosts/{nqn}"


def subsystem_path(nqn: str) -> str:
    return f"subsystems/{nqn}"


def port_path(port_id: int) -> str:
    return f"ports/{port_id}"


def _attrs(obj: object, specs: tuple[Attr, ...]) -> list[tuple[Attr, str]]:
    return [(a, encode(a, getattr(obj, a.name))) for a in specs if getattr(obj, a.name) is not None]


def host_node(host: Host) -> Node:
    return Node("host", host_path(host.nqn), f"host {host.nqn}", _attrs(host, HOST_ATTRS))


def subsystem_node(sub: Subsystem) -> Node:
    path = subsystem_path(sub.nqn)
    links = [(f"{path}/allowed_hosts/{h}", host_path(h), f"host {h} allowed on {sub.nqn}")
             for h in sub.allowed_hosts]
    return Node("subsystem", path, f"subsystem {sub.nqn}", _attrs(sub, SUBSYSTEM_ATTRS), links=links)


def namespace_node(sub: Subsystem, ns: Namespace) -> Node:
    parent = subsystem_path(sub.nqn)
    return Node("namespace", f"{parent}/namespaces/{ns.nsid}", f"namespace {sub.nqn}/{ns.nsid}",
                _attrs(ns, NAMESPACE_ATTRS), enable="1" if ns.enable else "0", parent=parent,
                device=ns.device_path)


def passthru_node(sub: Subsystem, pt: Passthru) -> Node:
    parent = subsystem_path(sub.nqn)
    return Node("passthru", f"{parent}/passthru", f"passthru {sub.nqn}", _attrs(pt, PASSTHRU_ATTRS),
                enable="1" if pt.enable else "0", implicit=True, parent=parent, device=pt.device_path)


def port_node(port: Port) -> Node:
    path = port_path(port.id)
    links = [(f"{path}/subsystems/{nqn}", subsystem_path(nqn), f"subsystem {nqn} on port {port.id}")
             for nqn in port.subsystems]
    return Node("port", path, f"port {port.id}", _attrs(port, PORT_ATTRS), links=links)


def ana_node(port: Port, grpid: int, state: str) -> Node:
    path = port_path(port.id)
    return Node("ana_group", f"{path}/ana_groups/{grpid}", f"ANA group {grpid} on port {port.id}",
                [(ANA_ATTRS[0], state)], implicit=grpid == 1, parent=path)


def referral_node(port: Port, ref: Referral) -> Node:
    path = port_path(port.id)
    return Node("referral", f"{path}/referrals/{ref.name}", f"referral {ref.name} on port {port.id}",
                _attrs(ref, REFERRAL_ATTRS), enable="1" if ref.enable else "0", parent=path)


@dataclass
class FlatState:
    hosts: dict[str, Node]
    ports: dict[str, Node]
    ana_groups: dict[str, Node]
    referrals: dict[str, Node]
    subsystems: dict[str, Node]
    namespaces: dict[str, Node]
    passthru: dict[str, Node]
    discovery_nqn: str | None
    port_models: dict[str, Port]


def flatten(state: TargetState) -> FlatState:
    flat = FlatState({}, {}, {}, {}, {}, {}, {}, state.discovery_nqn, {})
    for host in state.hosts:
        node = host_node(host)
        flat.hosts[node.path] = node
    for port in state.ports:
        node = port_node(port)
        flat.ports[node.path] = node
        flat.port_models[node.path] = port
        for group in port.ana_groups:
            ana = ana_node(port, group.grpid, group.state)
            flat.ana_groups[ana.path] = ana
        for ref in port.referrals:
            rnode = referral_node(port, ref)
            flat.referrals[rnode.path] = rnode
    for sub in state.subsystems:
        node = subsystem_node(sub)
        flat.subsystems[node.path] = node
        for ns in sub.namespaces:
            nnode = namespace_node(sub, ns)
            flat.namespaces[nnode.path] = nnode
        if sub.passthru is not None:
            pnode = passthru_node(sub, sub.passthru)
            flat.passthru[pnode.path] = pnode
    return flat
