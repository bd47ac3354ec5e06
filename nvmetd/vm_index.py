"""Which VMs have which disk, and which of nvmetd's ports any VM uses: kept with the stored document, not walked.

Why: an attach asks "is this disk another VM's?", a detach "does any VM still use this disk?", and both "which
ports must stay?" (nvmetd/vm_scope.py). Answering by walking every VM's attachments made each change cost
O(VMs): those walks were most of what an attach on a 2,500-VM host cost over one on an empty host
(bench.attach_host, fake tree: 2.3 ms with no VM, 7.6 ms with 2,500). The summary here is built once
per document read from the files and then rolled forward by each change's record (target/store.py `derived`),
and a transaction's own, not yet saved, rows are applied on top of it (`for_doc`). Anything it cannot prove it
describes (a plain dict, a section assigned whole) is summarised from every row: slower, never wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nvmetd.vms import KERNEL_TRANSPORTS, STANDBY
from target.tracked import Changes, committed_rows, touched_rows

SECTION = "vms"
PORT_EXPORTS = frozenset({*KERNEL_TRANSPORTS, "tls", STANDBY})  # nvmetd ports that exist while a VM uses them

Row = tuple[tuple[str, ...], tuple[str, ...]]  # one VM: its disks, and the export of each attachment


def exports(attachment: Mapping[str, Any]) -> Iterator[str]:
    """The nvmetd ports one stored attachment is on: its transport (`tls` for the TLS port), and the standby
    port too when it is multipath."""
    yield "tls" if attachment.get("tls") else str(attachment.get("transport"))
    if attachment.get("multipath"):
        yield STANDBY


def summary(row: Mapping[str, Any]) -> Row:
    """A stored VM (a dict of the document, read without validation) as the index keeps it."""
    attachments = row.get("attachments", {})
    return tuple(attachments), tuple(e for a in attachments.values() for e in exports(a))


MAX_DEPTH = 64  # layers before a summary is flattened into one: lookups stay short, a change copies nothing


@dataclass(frozen=True)
class _Layer:
    """What one change made different (rows and users of the VMs and disks it touched), over `parent`.

    Why layers: copying the whole summary per change (10,000 disks) was itself a cost that grew with the host;
    a layer holds only what changed, and every MAX_DEPTH changes the chain is merged into one (amortised)."""

    parent: _Layer | None
    rows: dict[str, Row | None]  # VM -> its summary; None: no such VM
    users: dict[str, frozenset[str]]  # disk -> its VMs; empty: none
    counts: dict[str, int]  # export -> attachments on it (whole: a handful of keys)
    depth: int
    dead: tuple[str, ...] = ()  # keys of `rows` or `users` this layer marks gone (None, empty): dropped by `flat`

    def row(self, name: str) -> Row | None:
        layer: _Layer | None = self
        while layer is not None:
            if name in layer.rows:
                return layer.rows[name]
            layer = layer.parent
        return None

    def disk_users(self, disk: str) -> frozenset[str]:
        layer: _Layer | None = self
        while layer is not None:
            if disk in layer.users:
                return layer.users[disk]
            layer = layer.parent
        return frozenset()

    def flat(self) -> _Layer:
        """One layer with the same content (and no parent)."""
        chain = []
        layer: _Layer | None = self
        while layer is not None:
            chain.append(layer)
            layer = layer.parent
        rows: dict[str, Row | None] = {}
        users: dict[str, frozenset[str]] = {}
        for layer in reversed(chain):  # dict updates, in C: no Python loop over every VM and disk
            rows.update(layer.rows)
            users.update(layer.users)
        for layer in chain:
            for key in layer.dead:
                if key in rows and rows[key] is None:
                    del rows[key]
                if key in users and not users[key]:
                    del users[key]
        return _Layer(None, rows, users, dict(self.counts), 0)


_EMPTY = _Layer(None, {}, {}, {}, 0)


@dataclass(frozen=True)
class VmIndex:
    """The summary of one `vms` section; never changed in place (`changed` makes a new one)."""

    section: Mapping[str, Any] | None  # the section described: `for_doc` trusts it only for this very object
    layer: _Layer

    @classmethod
    def build(cls, section: Mapping[str, Any] | None) -> VmIndex:
        return cls(section, _EMPTY).changed(section, dict(committed_rows(section or {})))

    def changed(self, section: Mapping[str, Any] | None, rows: Mapping[str, Mapping[str, Any] | None],
                flatten: bool = True) -> VmIndex:
        """The summary of `section`, which differs from the one described only in `rows` (None: deleted).
        `flatten`: merge the layers when they are too many (not for a transaction's short-lived summary, which
        would otherwise merge them on every change while the store's chain stands at MAX_DEPTH)."""
        base = self.layer
        own: dict[str, Row | None] = {}
        users: dict[str, frozenset[str]] = {}
        counts = dict(base.counts)
        for name, row in rows.items():
            disks, ports = own[name] if name in own else base.row(name) or ((), ())
            for disk in disks:
                users[disk] = (users[disk] if disk in users else base.disk_users(disk)) - {name}
            _count(counts, ports, -1)
            own[name] = None
            if row is not None:
                own[name] = disks, ports = summary(row)
                for disk in disks:
                    users[disk] = (users[disk] if disk in users else base.disk_users(disk)) | {name}
                _count(counts, ports, +1)
        dead = tuple(k for k, v in own.items() if v is None) + tuple(k for k, v in users.items() if not v)
        layer = _Layer(base, own, users, counts, base.depth + 1, dead)
        return VmIndex(section, layer.flat() if flatten and layer.depth > MAX_DEPTH else layer)

    def disk_users(self, disk: str) -> list[str]:
        return sorted(self.layer.disk_users(disk))

    def attached(self, disk: str) -> bool:
        return bool(self.layer.disk_users(disk))

    def vm_disks(self, name: str) -> tuple[str, ...]:
        row = self.layer.row(name)
        return row[0] if row is not None else ()

    def transports_in_use(self) -> set[str]:
        """nvmetd ports (a kernel transport, `tls`, or the multipath standby port) any VM has a disk on."""
        return {e for e, n in self.layer.counts.items() if n} & PORT_EXPORTS

    def users_by_disk(self) -> dict[str, list[str]]:
        """disk -> its VMs, every disk attached (tests compare it with a walk over the document)."""
        return {d: sorted(u) for d, u in sorted(self.layer.flat().users.items())}


def _count(counts: dict[str, int], ports: Iterable[str], step: int) -> None:
    for port in ports:
        counts[port] = counts.get(port, 0) + step
        if not counts[port]:
            del counts[port]


class _Spec:
    """How the store keeps a VmIndex with its committed document (target.store.Derived)."""

    key = "nvmetd.vm_index"

    def build(self, doc: dict[str, Any]) -> VmIndex:
        return VmIndex.build(dict.get(doc, SECTION))

    def update(self, value: VmIndex, old: dict[str, Any], new: dict[str, Any], record: Changes) -> VmIndex | None:
        if value.section is not dict.get(old, SECTION) or SECTION in record.get("top", {}) \
                or SECTION in record.get("deltop", ()):
            return None  # not the summary of `old`, or the section replaced whole: rebuilt when asked
        rows = {name: dict.get(new, SECTION, {}).get(name) for name in record.get("rows", {}).get(SECTION, {})}
        rows.update({name: None for name in record.get("del", {}).get(SECTION, ())})
        section = dict.get(new, SECTION)
        return value.changed(section, rows) if rows or section is not value.section else value


SPEC = _Spec()


def for_doc(base: VmIndex, doc: Mapping[str, Any]) -> VmIndex:
    """The summary of `doc`'s VMs: `base` (the store's, for the committed document `doc` was loaded from) with
    the rows `doc` has reached applied on top; built from every row when `doc` is not a view of that document."""
    section = dict.get(doc, SECTION) if isinstance(doc, dict) else doc.get(SECTION)
    rows = touched_rows(section, base.section)
    if rows is None:
        return VmIndex.build(section)
    return base.changed(section, rows, flatten=False) if rows else base
