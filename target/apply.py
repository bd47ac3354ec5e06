"""Execute a plan against configfs, object by object, and say what happened to each.

One failing object (a missing device, an address not yet on this host) never stops the others: its own later
operations and those of objects that depend on it are skipped with the reason, everything else goes ahead.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

from target.configfs import ConfigFS, ConfigfsError
from target.layout import FlatState, flatten
from target.live import LiveTree
from target.model import TargetState
from target.plan import Link, Mkdir, Op, Rmdir, Unlink, Write, plan
from target.status import CONVERGED, Status

log = logging.getLogger("nvmetd.target")

OK, CHANGED, REMOVED, FAILED, PENDING, SKIPPED = (Status.OK, Status.CHANGED, Status.REMOVED, Status.FAILED,
                                                 Status.PENDING, Status.SKIPPED)


@dataclass
class ObjectStatus:
    status: Status
    label: str
    reason: str = ""
    blocking: bool = False  # the object does not exist (or is not ready): dependents cannot proceed

    def to_dict(self) -> dict[str, str]:
        out = {"status": self.status, "object": self.label}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class ApplyResult:
    objects: dict[str, ObjectStatus] = field(default_factory=dict)
    writes: int = 0  # configfs changes made (writes, mkdirs, rmdirs, links, unlinks)
    planned: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return all(s.status in CONVERGED for s in self.objects.values())

    def by_status(self, status: Status) -> dict[str, ObjectStatus]:
        return {k: v for k, v in self.objects.items() if v.status == status}

    def to_dict(self) -> dict[str, object]:
        return {"converged": self.converged, "writes": self.writes,
                "objects": {k: v.to_dict() for k, v in sorted(self.objects.items())}}


class Readiness:
    """Whether a device or a port's address is present. Restore passes one that knows udev and netlink."""

    def device_missing(self, path: str) -> str | None:
        import os

        return None if os.path.exists(path) else f"device {path} is not present"

    def address_missing(self, adrfam: str, traddr: str) -> str | None:
        return None


def apply_state(desired: TargetState, cfs: ConfigFS, prune: bool = True,
                readiness: Readiness | None = None, dry_run: bool = False,
                live: LiveTree | None = None) -> ApplyResult:
    """Plan against `live` (the whole tree by default; a target.scope.ScopedLiveTree for one VM's change) and
    execute."""
    flat = flatten(desired)
    live = live if live is not None else LiveTree(cfs)
    ops = plan(flat, live, prune=prune)
    result = ApplyResult(planned=[op.describe() for op in ops])
    if dry_run:
        return result
    before = cfs.counters.changes
    _execute(ops, flat, cfs, live, readiness or Readiness(), result)
    live.forget_touched(ops)
    result.writes = cfs.counters.changes - before
    for nodes in (flat.hosts, flat.ports, flat.ana_groups, flat.referrals, flat.subsystems, flat.namespaces,
                  flat.passthru):
        for path, node in nodes.items():
            result.objects.setdefault(path, ObjectStatus(OK, node.label))
    return result


def _execute(ops: list[Op], flat: FlatState, cfs: ConfigFS, live: LiveTree, ready: Readiness,
             result: ApplyResult) -> None:
    status = result.objects
    for op in ops:
        blocked = next((d for d in op.deps if d in status and status[d].blocking and d != op.obj), None)
        if blocked is not None:
            dep = status[blocked]
            kind = PENDING if dep.status == PENDING else SKIPPED
            _mark(status, op, kind, f"waits for {dep.label}: {dep.reason}", blocking=True)
            continue
        if op.obj in status and status[op.obj].blocking:
            continue
        waiting = _not_ready(op, flat, ready)
        if waiting:
            _mark(status, op, PENDING, waiting, blocking=True)
            continue
        try:
            _do(op, cfs)
        except ConfigfsError as exc:
            reason = _explain(op, exc, flat)
            log.warning("%s: %s", op.label, reason)
            _mark(status, op, FAILED, reason, blocking=op.creates)
            continue
        log.debug("%s", op.describe())
        if op.obj not in status:
            status[op.obj] = ObjectStatus(REMOVED if op.removes else CHANGED, op.label)


def _do(op: Op, cfs: ConfigFS) -> None:
    match op:
        case Mkdir():
            cfs.mkdir(op.path)
        case Rmdir():
            cfs.rmdir(op.path)
        case Write():
            cfs.write(op.path, op.attr, op.value)
        case Link():
            cfs.symlink(op.target, op.path)
        case Unlink():
            cfs.unlink(op.path)


def _mark(status: dict[str, ObjectStatus], op: Op, kind: Status, reason: str, blocking: bool) -> None:
    current = status.get(op.obj)
    if current is not None and current.status == FAILED:
        return
    status[op.obj] = ObjectStatus(kind, op.label, reason, blocking)


def _not_ready(op: Op, flat: FlatState, ready: Readiness) -> str | None:
    if isinstance(op, Write) and op.wait_device:
        return ready.device_missing(op.wait_device)
    if isinstance(op, Link) and op.wait_port:
        port = flat.port_models.get(op.wait_port)
        if port is not None and port.trtype in ("tcp", "rdma"):
            return ready.address_missing(port.adrfam, port.traddr)
    return None


def _explain(op: Op, exc: ConfigfsError, flat: FlatState) -> str:
    """Turn a bare errno into something a person can act on."""
    what = op.describe()
    if isinstance(op, Write) and op.attr == "enable" and op.value == "1":
        node = flat.namespaces.get(op.path) or flat.passthru.get(op.path)
        device = node.device if node else None
        if exc.errno == errno.ENOENT:
            return f"cannot enable: device {device} does not exist"
        return f"cannot enable with device {device}: {exc.strerror}"
    if isinstance(op, Link) and op.wait_port:
        port = flat.port_models.get(op.wait_port)
        addr = f"{port.traddr}:{port.trsvcid}" if port else op.wait_port
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"address {addr} is not present on this host"
        if exc.errno == errno.EADDRINUSE:
            return f"address {addr} is already in use"
        return f"cannot enable port {addr} ({port.trtype if port else '?'}): {exc.strerror}"
    if isinstance(op, Rmdir) and exc.errno == errno.ENOTEMPTY:
        return f"{what}: still has children (refused by the kernel)"
    if isinstance(op, Write) and op.secret:
        return f"the kernel rejected {op.path}/{op.attr}: {exc.strerror}"
    return f"{what}: {exc.strerror}"


def diff(desired: TargetState, cfs: ConfigFS, prune: bool = True) -> list[str]:
    """What apply would do, in order; empty when the kernel already matches."""
    return [op.describe() for op in plan(flatten(desired), LiveTree(cfs), prune=prune)]
