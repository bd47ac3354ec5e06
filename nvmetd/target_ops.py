"""The target tree's commands (apply, plan, drift, repair, restore, status, import, export), run by nvmetd.

The API serves them (nvmetd/api_target.py) and `nvmetctl --offline` runs the very same code on a host without the
daemon, so there is one implementation of each, whoever calls it. Read-only commands (plan, drift, status,
export) compute the VMs' device paths from the pools' ledgers without opening a volume: printing what would
change must not activate an LV or open a LUKS mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nvmetd import ns_health
from nvmetd.errors import SystemProblem, UserError
from nvmetd.vms import SUBSYSTEM_PREFIX, compose
from target.apply import diff
from target.features import require
from target.live import read_state
from target.model import TargetState, parse_state
from target.nvmetcli import export_config, import_config
from target.store import set_target

if TYPE_CHECKING:
    from nvmetd.manager import Manager

SECRET_FIELDS = ("dhchap_key", "dhchap_ctrl_key")


class TargetOps:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    # ------------------------------------------------------------------ read-only
    def _cfs(self):
        from target.configfs import NVMET_ROOT
        from target.features import load_modules

        cfs = self.manager.cfs
        if not cfs.exists() and str(cfs.root) == str(NVMET_ROOT):
            load_modules(TargetState())
        if not cfs.exists():
            raise SystemProblem(f"{cfs.root} does not exist: this kernel has no nvmet (modprobe nvmet failed or "
                                "configfs is not mounted)")
        return cfs

    def _peek_devices(self, doc: dict[str, Any]) -> dict[str, str]:
        """Disk -> the path its namespace names, from the ledgers only (no activation, no LUKS open)."""
        m = self.manager
        devices: dict[str, str] = {}
        for vm in m._vms(doc).values():
            for disk in vm.attachments:
                if disk not in devices:
                    devices[disk] = m._pool(m._disk_pool(doc, disk)).open_path(disk)
        return devices

    def desired(self, base: TargetState | None = None) -> TargetState:
        """The tree the kernel should hold (with `base` in place of the stored declared tree, for a plan)."""
        doc = self.manager.store.load()
        declared = parse_state(doc.get("target", {})) if base is None else base
        return compose(declared, self.manager._vms(doc), self._peek_devices(doc), self.manager._ports(doc))

    def plan(self, doc: dict[str, Any]) -> dict[str, Any]:
        state, warnings = _parse(parse_state, doc)
        _check_reserved(state)
        cfs = self._cfs()
        require(state, cfs)
        return _with(warnings, {"changes": diff(self.desired(state), cfs)})

    def drift(self) -> dict[str, Any]:
        return {"drift": diff(self.desired(), self._cfs())}

    def status(self) -> dict[str, Any]:
        desired = self.desired()
        cfs = self._cfs()
        live = read_state(cfs)
        return {
            "state_file": str(self.manager.store.path), "generation": self.manager.store.load()["generation"],
            "desired": _counts(desired),
            "live": {**_counts(live),
                     "enabled_namespaces": sum(1 for s in live.subsystems for n in s.namespaces if n.enable)},
            "drift": len(diff(desired, cfs)),
            "health": ns_health.namespaces(live),
        }

    def export(self, live: bool = False, nvmetcli: bool = False, with_secrets: bool = False) -> dict[str, Any]:
        """The desired (or live) tree; DH-CHAP keys only when asked for. `secrets_omitted` counts what was left
        out, so the CLI can say so."""
        state = read_state(self._cfs()) if live else self.desired()
        omitted = 0
        if not with_secrets:
            hosts = []
            for h in state.hosts:
                secret = {f: None for f in SECRET_FIELDS if getattr(h, f)}
                omitted += len(secret)
                hosts.append(h.model_copy(update=secret))
            state = state.model_copy(update={"hosts": hosts})
        if nvmetcli:
            data = export_config(state, passthru_placeholder=self._kernel_has_passthru())
        else:
            data = state.canonical().model_dump(mode="json", exclude_none=True)
        return {"config": data, "secrets_omitted": omitted}

    def _kernel_has_passthru(self) -> bool:
        """Whether live subsystems have a passthru directory (read only: no probe subsystem is made)."""
        cfs = self.manager.cfs
        return cfs.exists() and any(cfs.isdir(f"subsystems/{s}/passthru") for s in cfs.listdir("subsystems"))

    # ------------------------------------------------------------------ changes (nvmetd's lock, the store's lock)
    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        state, warnings = _parse(parse_state, doc)
        return _with(warnings, self._apply(state))

    def _apply(self, state: TargetState) -> dict[str, Any]:
        _check_reserved(state)
        require(state, self._cfs())
        return self.manager.apply_base(state).to_dict()

    def import_nvmetcli(self, config: dict[str, Any], apply: bool = True) -> dict[str, Any]:
        state, warnings = _parse(import_config, config)
        if apply:
            return _with(warnings, self._apply(state))
        _check_reserved(state)
        with self.manager.lock, self.manager.store.transaction() as doc:
            set_target(doc, state)
        return _with(warnings, {"imported": True, "subsystems": len(state.subsystems)})

    def repair(self) -> dict[str, Any]:
        self._cfs()
        return self.manager.reconcile().to_dict()

    def restore(self, timeout: float) -> dict[str, Any]:
        """Boot-time restore: apply what is ready, wait up to `timeout` for late devices and addresses."""
        return self.manager.reconcile(wait=timeout).to_dict()


def _parse(parse: Any, doc: Any) -> tuple[TargetState, list[str]]:
    """Parse a document, with the warnings of its validation (names the kernel takes that are not NQNs)."""
    from target.validate import collect_warnings

    with collect_warnings() as warnings:
        state = parse(doc)
    return state, warnings


def _with(warnings: list[str], result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "warnings": warnings} if warnings else result


def _check_reserved(state: TargetState) -> None:
    if any(s.nqn.startswith(SUBSYSTEM_PREFIX) for s in state.subsystems):
        raise UserError(f"subsystem names starting with {SUBSYSTEM_PREFIX} are reserved for nvmetd's VMs")


def _counts(state: TargetState) -> dict[str, int]:
    return {"subsystems": len(state.subsystems), "ports": len(state.ports), "hosts": len(state.hosts),
            "namespaces": sum(len(s.namespaces) for s in state.subsystems)}
