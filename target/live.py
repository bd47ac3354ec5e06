"""The live nvmet tree, read from configfs.

LiveTree lists the structure once and reads attributes only when asked (and only once), so a diff touches the
attributes the desired state manages, not all of them: re-checking 1,000 unchanged subsystems stays cheap.
`read_state` reads everything into a TargetState for export and drift reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from typing import TYPE_CHECKING

from target import layout
from target.configfs import ConfigFS
from target.model import AnaGroup, Host, Namespace, Passthru, Port, Referral, Subsystem, TargetState

if TYPE_CHECKING:
    from target.plan import Op


class LiveTree:
    def __init__(self, cfs: ConfigFS) -> None:
        self.cfs = cfs
        self._cache: dict[tuple[str, str], str | None] = {}

    def attr(self, path: str, file: str) -> str | None:
        key = (path, file)
        if key not in self._cache:
            self._cache[key] = self.cfs.read(path, file)
        return self._cache[key]

    def forget(self, path: str, file: str) -> None:
        self._cache.pop((path, file), None)

    def forget_touched(self, ops: Iterable[Op]) -> None:
        """After an apply: what was read of an object the apply wrote to, created or removed is stale."""
        touched = {op.path for op in ops} | {op.obj for op in ops}
        for key in [k for k in self._cache if k[0] in touched]:
            del self._cache[key]

    @cached_property
    def hosts(self) -> list[str]:
        return [f"hosts/{n}" for n in self.cfs.listdir("hosts")]

    @cached_property
    def ports(self) -> list[str]:
        return [f"ports/{n}" for n in self.cfs.listdir("ports")]

    @cached_property
    def subsystems(self) -> list[str]:
        return [f"subsystems/{n}" for n in self.cfs.listdir("subsystems")]

    @cached_property
    def namespaces(self) -> dict[str, list[str]]:
        return {s: [f"{s}/namespaces/{n}" for n in self.cfs.listdir(f"{s}/namespaces")] for s in self.subsystems}

    @cached_property
    def ana_groups(self) -> dict[str, list[str]]:
        return {p: [f"{p}/ana_groups/{n}" for n in self.cfs.listdir(f"{p}/ana_groups")] for p in self.ports}

    @cached_property
    def referrals(self) -> dict[str, list[str]]:
        return {p: [f"{p}/referrals/{n}" for n in self.cfs.listdir(f"{p}/referrals")] for p in self.ports}

    @cached_property
    def allowed_hosts(self) -> dict[str, list[str]]:
        return {s: self.cfs.listdir(f"{s}/allowed_hosts") for s in self.subsystems}

    @cached_property
    def port_subsystems(self) -> dict[str, list[str]]:
        return {p: self.cfs.listdir(f"{p}/subsystems") for p in self.ports}

    @cached_property
    def objects(self) -> set[str]:
        found = set(self.hosts) | set(self.ports) | set(self.subsystems)
        for group in (self.namespaces, self.ana_groups, self.referrals):
            for paths in group.values():
                found.update(paths)
        return found

    @cached_property
    def links(self) -> set[str]:
        found = {f"{s}/allowed_hosts/{h}" for s, hosts in self.allowed_hosts.items() for h in hosts}
        found |= {f"{p}/subsystems/{n}" for p, subs in self.port_subsystems.items() for n in subs}
        return found

    def discovery_nqn(self) -> str | None:
        return self.attr("", "discovery_nqn")

    def _fields(self, path: str, specs: tuple[layout.Attr, ...]) -> dict[str, object]:
        values = {}
        for spec in specs:
            if self.cfs.has_attr(path, spec.file):
                values[spec.name] = layout.decode(spec, self.attr(path, spec.file))
        return values


def read_state(cfs: ConfigFS) -> TargetState:
    """The whole live tree as a TargetState (every attribute read, passthru included when enabled or set)."""
    live = LiveTree(cfs)
    hosts = [Host.model_construct(nqn=p.split("/", 1)[1], **_clean(live._fields(p, layout.HOST_ATTRS)))
             for p in live.hosts]
    subsystems = []
    for spath in live.subsystems:
        fields = live._fields(spath, layout.SUBSYSTEM_ATTRS)
        namespaces = []
        for npath in live.namespaces[spath]:
            nfields = live._fields(npath, layout.NAMESPACE_ATTRS)
            enabled = live.attr(npath, "enable") == "1"
            namespaces.append(Namespace.model_construct(
                nsid=int(npath.rsplit("/", 1)[1]), enable=enabled, **{k: v for k, v in nfields.items()}))
        passthru = None
        ppath = f"{spath}/passthru"
        if cfs.isdir(ppath):
            pfields = live._fields(ppath, layout.PASSTHRU_ATTRS)
            if pfields.get("device_path"):
                passthru = Passthru.model_construct(enable=live.attr(ppath, "enable") == "1", **pfields)
        subsystems.append(Subsystem.model_construct(
            nqn=spath.split("/", 1)[1], allowed_hosts=live.allowed_hosts[spath], namespaces=namespaces,
            passthru=passthru, **fields))
    ports = []
    for ppath in live.ports:
        fields = live._fields(ppath, layout.PORT_ATTRS)
        groups = [AnaGroup(grpid=int(g.rsplit("/", 1)[1]), state=live.attr(g, "ana_state") or "optimized")
                  for g in live.ana_groups[ppath]]
        refs = []
        for rpath in live.referrals[ppath]:
            rfields = live._fields(rpath, layout.REFERRAL_ATTRS)
            refs.append(Referral.model_construct(name=rpath.rsplit("/", 1)[1],
                                                 enable=live.attr(rpath, "enable") == "1", **rfields))
        ports.append(Port.model_construct(id=int(ppath.split("/", 1)[1]), subsystems=live.port_subsystems[ppath],
                                          ana_groups=groups, referrals=refs, **fields))
    return TargetState.model_construct(discovery_nqn=live.discovery_nqn(), hosts=hosts, subsystems=subsystems,
                                       ports=ports)


def _clean(fields: dict[str, object]) -> dict[str, object]:
    """Empty DH-CHAP keys read back as ''; the model says None."""
    return {k: (v if v != "" else None) for k, v in fields.items()}
