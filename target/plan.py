"""The delta: the ordered operations that turn the live tree into the desired one.

Order is what the kernel demands: hosts before the links that allow them, a namespace disabled before its device
changes, a port's subsystems unlinked before its address changes (and relinked after), removals in reverse
dependency order. Nothing is emitted for what already holds, so an unchanged state plans to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from target import layout
from target.layout import FlatState, Node
from target.live import LiveTree


@dataclass(frozen=True)
class _Op:
    """What every operation has: the path it acts on and the object whose status it decides."""

    path: str  # directory, or link path
    obj: str  # the object whose status this op decides (its path)
    label: str
    deps: tuple[str, ...] = ()  # objects that must exist and not be failed/pending

    @property
    def creates(self) -> bool:
        """Failure means the object does not exist: dependents are skipped."""
        return False

    @property
    def removes(self) -> bool:
        return False


@dataclass(frozen=True)
class Mkdir(_Op):
    @property
    def creates(self) -> bool:
        return True

    def describe(self) -> str:
        return f"mkdir {self.path}"


@dataclass(frozen=True)
class Rmdir(_Op):
    @property
    def removes(self) -> bool:
        return True

    def describe(self) -> str:
        return f"rmdir {self.path}"


@dataclass(frozen=True, kw_only=True)
class Write(_Op):
    attr: str
    value: str
    secret: bool = False  # never shown: describe() and errors say <secret>
    wait_device: str | None = None  # a device that must be present (namespace/passthru enable)

    def describe(self) -> str:
        shown = "<secret>" if self.secret else repr(self.value)
        return f"set {self.path}/{self.attr} = {shown}"


@dataclass(frozen=True, kw_only=True)
class Link(_Op):
    target: str
    wait_port: str | None = None  # a port whose address must be present (port link = port enable)

    def describe(self) -> str:
        return f"link {self.path} -> {self.target}"


@dataclass(frozen=True)
class Unlink(_Op):
    @property
    def removes(self) -> bool:
        return True

    def describe(self) -> str:
        return f"unlink {self.path}"


Op = Mkdir | Rmdir | Write | Link | Unlink  # one variant per configfs action, each with only the fields it uses


def plan(desired: FlatState, live: LiveTree, prune: bool = True) -> list[Op]:
    removals: list[Op] = []
    changes: list[Op] = []
    links_late: list[Op] = []
    live_objects = live.objects
    live_links = live.links

    # Ports whose attributes change must be disabled (all subsystems unlinked) first.
    quiesced_ports = set()
    for path, node in desired.ports.items():
        if path in live_objects and live.port_subsystems.get(path) and any(
                spec.quiesce and layout.normalize(spec, live.attr(path, spec.file)) != value
                for spec, value in node.attrs):
            quiesced_ports.add(path)

    desired_links = {lp: (t, label, node) for nodes in (desired.subsystems, desired.ports)
                     for node in nodes.values() for lp, t, label in node.links}

    # --- removals, reverse dependency order ---
    for ppath, subs in live.port_subsystems.items():
        for nqn in subs:
            lp = f"{ppath}/subsystems/{nqn}"
            if (prune or lp in desired_links) and (lp not in desired_links or ppath in quiesced_ports):
                removals.append(Unlink(lp, lp, f"subsystem {nqn} on {ppath}"))
    if prune:
        for refs in live.referrals.values():
            removals += [Rmdir(r, r, f"referral {r}") for r in refs if r not in desired.referrals]
        for groups in live.ana_groups.values():
            removals += [Rmdir(g, g, f"ANA group {g}") for g in groups
                         if g not in desired.ana_groups and not g.endswith("/ana_groups/1")]
        for nss in live.namespaces.values():
            removals += [Rmdir(n, n, f"namespace {n}") for n in nss if n not in desired.namespaces]
        for spath in live.subsystems:
            ppath = f"{spath}/passthru"
            # the kernel refuses passthru on a subsystem with namespaces: no need to read those
            if ppath not in desired.passthru and not live.namespaces[spath] and live.attr(ppath, "enable") == "1":
                removals.append(Write(ppath, ppath, f"passthru {spath}", attr="enable", value="0"))
        for spath, hosts in live.allowed_hosts.items():
            for host in hosts:
                lp = f"{spath}/allowed_hosts/{host}"
                if lp not in desired_links:
                    removals.append(Unlink(lp, lp, f"host {host} allowed on {spath}"))
        removals += [Rmdir(s, s, s) for s in live.subsystems if s not in desired.subsystems]
        removals += [Rmdir(p, p, p) for p in live.ports if p not in desired.ports]
        removals += [Rmdir(h, h, h) for h in live.hosts if h not in desired.hosts]

    # --- creation and changes, dependency order ---
    if desired.discovery_nqn is not None and live.discovery_nqn() != desired.discovery_nqn:
        changes.append(Write("", "discovery_nqn", "discovery NQN", attr="discovery_nqn",
                             value=desired.discovery_nqn))
    for node in desired.hosts.values():
        changes += _node_ops(node, live, live_objects, ())
    for node in desired.ports.values():
        changes += _node_ops(node, live, live_objects, ())
    for node in desired.ana_groups.values():
        changes += _node_ops(node, live, live_objects, (node.parent,))
    for node in desired.referrals.values():
        changes += _node_ops(node, live, live_objects, (node.parent,))
    for node in desired.subsystems.values():
        changes += _node_ops(node, live, live_objects, ())
    for node in desired.namespaces.values():
        changes += _node_ops(node, live, live_objects, (node.parent,))
    for node in desired.passthru.values():
        changes += _node_ops(node, live, live_objects, (node.parent,))

    # --- links last: allowed hosts, then port exports (which enable the port) ---
    for lp, (target, label, owner) in desired_links.items():
        if lp in live_links and not (owner.kind == "port" and owner.path in quiesced_ports):
            continue
        deps = (owner.path, target)
        wait_port = owner.path if owner.kind == "port" else None
        op = Link(lp, lp, label, deps=deps, target=target, wait_port=wait_port)
        (links_late if owner.kind == "port" else changes).append(op)

    return removals + changes + links_late


def _node_ops(node: Node, live: LiveTree, live_objects: set[str], deps: tuple[str | None, ...]) -> list[Op]:
    ops: list[Op] = []
    dep = tuple(d for d in deps if d)
    exists = node.implicit or node.path in live_objects
    if not exists:
        ops.append(Mkdir(node.path, node.path, node.label, deps=dep))
    dep_self = (*dep, node.path) if not exists else dep
    # A fresh directory already holds the kernel's defaults; empty strings cannot be written at all (EFAULT).
    if exists:
        writes = [(spec, value) for spec, value in node.attrs
                  if layout.normalize(spec, live.attr(node.path, spec.file)) != value]
    else:
        writes = [(spec, value) for spec, value in node.attrs
                  if value != "" and layout.FRESH_DEFAULTS.get((node.kind, spec.file)) != value]
    live_enable = live.attr(node.path, "enable") if exists and node.enable is not None else None
    needs_disable = node.enable is not None and live_enable == "1" and any(s.quiesce for s, _ in writes)
    if needs_disable:
        ops.append(Write(node.path, node.path, node.label, deps=dep_self, attr="enable", value="0"))
    for spec, value in writes:
        ops.append(Write(node.path, node.path, node.label, deps=dep_self, attr=spec.file, value=value,
                         secret=spec.secret))
    if node.enable is not None and (needs_disable or live_enable != node.enable):
        wait = node.device if node.enable == "1" and node.kind in ("namespace", "passthru") else None
        ops.append(Write(node.path, node.path, node.label, deps=dep_self, attr="enable", value=node.enable,
                         wait_device=wait))
    return ops


def describe(ops: list[Op]) -> list[str]:
    return [op.describe() for op in ops]


__all__ = ["Link", "Mkdir", "Op", "Rmdir", "Unlink", "Write", "describe", "layout", "plan"]
