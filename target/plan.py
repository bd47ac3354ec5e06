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
class Op:
    action: str  # mkdir | rmdir | write | link | unlink
    path: str  # directory, or link path
    obj: str  # the object whose status this op decides (its path)
    label: str
    attr: str | None = None
    value: str | None = None
    target: str | None = None
    deps: tuple[str, ...] = ()  # objects that must exist and not be failed/pending
    wait_device: str | None = None  # a device that must be present (namespace/passthru enable)
    wait_port: str | None = None  # a port whose address must be present (port link = port enable)
    secret: bool = False
    creates: bool = False  # failure means the object does not exist: dependents are skipped

    def describe(self) -> str:
        if self.action == "write":
            shown = "<secret>" if self.secret else repr(self.value)
            return f"set {self.path}/{self.attr} = {shown}"
        if self.action == "link":
            return f"link {self.path} -> {self.target}"
        return f"{self.action} {self.path}"


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
                removals.append(Op("unlink", lp, lp, f"subsystem {nqn} on {ppath}"))
    if prune:
        for refs in live.referrals.values():
            removals += [Op("rmdir", r, r, f"referral {r}") for r in refs if r not in desired.referrals]
        for groups in live.ana_groups.values():
            removals += [Op("rmdir", g, g, f"ANA group {g}") for g in groups
                         if g not in desired.ana_groups and not g.endswith("/ana_groups/1")]
        for nss in live.namespaces.values():
            removals += [Op("rmdir", n, n, f"namespace {n}") for n in nss if n not in desired.namespaces]
        for spath in live.subsystems:
            ppath = f"{spath}/passthru"
            # the kernel refuses passthru on a subsystem with namespaces: no need to read those
            if ppath not in desired.passthru and not live.namespaces[spath] and live.attr(ppath, "enable") == "1":
                removals.append(Op("write", ppath, ppath, f"passthru {spath}", "enable", "0"))
        for spath, hosts in live.allowed_hosts.items():
            for host in hosts:
                lp = f"{spath}/allowed_hosts/{host}"
                if lp not in desired_links:
                    removals.append(Op("unlink", lp, lp, f"host {host} allowed on {spath}"))
        removals += [Op("rmdir", s, s, s) for s in live.subsystems if s not in desired.subsystems]
        removals += [Op("rmdir", p, p, p) for p in live.ports if p not in desired.ports]
        removals += [Op("rmdir", h, h, h) for h in live.hosts if h not in desired.hosts]

    # --- creation and changes, dependency order ---
    if desired.discovery_nqn is not None and live.discovery_nqn() != desired.discovery_nqn:
        changes.append(Op("write", "", "discovery_nqn", "discovery NQN", "discovery_nqn", desired.discovery_nqn))
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
        op = Op("link", lp, lp, label, target=target, deps=deps, wait_port=wait_port)
        (links_late if owner.kind == "port" else changes).append(op)

    return removals + changes + links_late


def _node_ops(node: Node, live: LiveTree, live_objects: set[str], deps: tuple[str | None, ...]) -> list[Op]:
    ops: list[Op] = []
    dep = tuple(d for d in deps if d)
    exists = node.implicit or node.path in live_objects
    if not exists:
        ops.append(Op("mkdir", node.path, node.path, node.label, deps=dep, creates=True))
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
        ops.append(Op("write", node.path, node.path, node.label, "enable", "0", deps=dep_self))
    for spec, value in writes:
        ops.append(Op("write", node.path, node.path, node.label, spec.file, value, deps=dep_self,
                      secret=spec.secret))
    if node.enable is not None and (needs_disable or live_enable != node.enable):
        wait = node.device if node.enable == "1" and node.kind in ("namespace", "passthru") else None
        ops.append(Op("write", node.path, node.path, node.label, "enable", node.enable, deps=dep_self,
                      wait_device=wait))
    return ops


def describe(ops: list[Op]) -> list[str]:
    return [op.describe() for op in ops]


__all__ = ["Op", "describe", "layout", "plan"]
