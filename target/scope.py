"""A part of the live tree: only the hosts, subsystems and port links a change is about.

Why: a full apply lists and reads every object (about 9 configfs reads per VM on an nvmetd host), so one VM's
attach cost grew with the number of VMs. A change that concerns one subsystem plans against this view instead:
it lists only that subsystem's namespaces and allowed hosts, looks up only that subsystem's links on the given
ports, and reads only the attributes of those objects. Planning with prune against it removes what is stale in
the scope and nothing outside it (other subsystems' links on a shared port are simply not seen). The full-tree
check still runs at start and on the drift timer, with a plain LiveTree.

Port attributes are the one thing every VM shares; `port_attrs` lets the caller keep what was read of them
across changes (a dict it owns, dropped at each full check) so that they are not read again per attach.
`forget_touched` drops what a change wrote, so the kept view never holds a value the caller itself changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

from target import layout
from target.configfs import ConfigFS
from target.live import LiveTree
from target.plan import Op


class ScopedLiveTree(LiveTree):
    def __init__(self, cfs: ConfigFS, hosts: Iterable[str], subsystems: Iterable[str], ports: Iterable[int],
                 port_attrs: dict[tuple[str, str], str | None] | None = None) -> None:
        super().__init__(cfs)
        self._hosts = [layout.host_path(n) for n in hosts]
        self._subsystems = [layout.subsystem_path(n) for n in subsystems]
        self._ports = [layout.port_path(p) for p in ports]
        self._port_attrs = port_attrs if port_attrs is not None else {}

    def attr(self, path: str, file: str) -> str | None:
        if path in self._ports:
            key = (path, file)
            if key not in self._port_attrs:
                self._port_attrs[key] = self.cfs.read(path, file)
            return self._port_attrs[key]
        return super().attr(path, file)

    @cached_property
    def hosts(self) -> list[str]:
        return [h for h in self._hosts if self.cfs.isdir(h)]

    @cached_property
    def subsystems(self) -> list[str]:
        return [s for s in self._subsystems if self.cfs.isdir(s)]

    @cached_property
    def ports(self) -> list[str]:
        return [p for p in self._ports if self.cfs.isdir(p)]

    @cached_property
    def port_subsystems(self) -> dict[str, list[str]]:
        """Only the scope's own links on each port (an isdir per link, not a listing of every export)."""
        nqns = [s.split("/", 1)[1] for s in self._subsystems]
        return {p: [n for n in nqns if self.cfs.isdir(f"{p}/subsystems/{n}")] for p in self.ports}

    def forget_touched(self, ops: Iterable[Op]) -> None:
        """Also drop kept port attributes of every port the change wrote to, created or removed."""
        ops = list(ops)
        super().forget_touched(ops)
        touched = {op.path for op in ops} | {op.obj for op in ops}
        for key in [k for k in self._port_attrs if k[0] in touched]:
            del self._port_attrs[key]
