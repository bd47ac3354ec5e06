"""`nvmetctl shell`: an interactive tree of the nvmet target (like nvmetcli's), built on configshell-fb.

Nodes mirror configfs (subsystems/namespaces, ports, hosts) as the kernel holds them, and `diff`, `repair`
compare with nvmetd's desired state. It changes the kernel only through `repair`, which applies the stored desired
state; a hand-made change here would be undone by the next reconcile anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from configshell import ConfigNode, ConfigShell

from target.apply import apply_state, diff
from target.configfs import ConfigFS
from target.live import read_state
from target.model import TargetState


class _Node(ConfigNode):
    def __init__(self, name: str, parent: ConfigNode, info: dict[str, object] | None = None) -> None:
        super().__init__(name, parent)
        self._info = info or {}

    def summary(self) -> tuple[str, bool | None]:
        text = ", ".join(f"{k}={v}" for k, v in self._info.items() if k in ("device_path", "enable", "trtype",
                                                                              "traddr", "trsvcid", "allow_any_host"))
        return text, None

    def ui_command_info(self) -> None:
        """Show every attribute of this object."""
        for key, value in self._info.items():
            if "key" in key and value:
                value = "<secret>"
            self.shell.con.display(f"{key}: {value}")


class Root(ConfigNode):
    def __init__(self, shell: ConfigShell, cfs: ConfigFS, desired: Callable[[], TargetState]) -> None:
        super().__init__("/", shell=shell)
        self.cfs = cfs
        self.desired = desired
        self.refresh()

    def refresh(self) -> None:
        for child in list(self.children):
            self.remove_child(child)
        live = read_state(self.cfs)
        subs = ConfigNode("subsystems", self)
        for sub in live.subsystems:
            node = _Node(sub.nqn, subs, sub.model_dump(exclude={"namespaces", "passthru"}))
            nss = ConfigNode("namespaces", node)
            for ns in sub.namespaces:
                _Node(str(ns.nsid), nss, ns.model_dump())
        ports = ConfigNode("ports", self)
        for port in live.ports:
            _Node(str(port.id), ports, port.model_dump())
        hosts = ConfigNode("hosts", self)
        for host in live.hosts:
            _Node(host.nqn, hosts, host.model_dump())

    def ui_command_refresh(self) -> None:
        """Re-read the live tree from configfs."""
        self.refresh()

    def ui_command_diff(self) -> None:
        """What differs between nvmetd's desired state and the live kernel."""
        changes = diff(self.desired(), self.cfs)
        self.shell.con.display("\n".join(changes) or "no drift")

    def ui_command_repair(self) -> None:
        """Apply the desired state (undo hand edits)."""
        result = apply_state(self.desired(), self.cfs)
        self.shell.con.display(f"converged={result.converged} configfs changes={result.writes}")
        self.refresh()


def build(cfs: ConfigFS, desired: Callable[[], TargetState], preferences_dir: str | None = None) -> ConfigShell:
    shell = ConfigShell(preferences_dir)
    # configshell's Console binds sys.stdout when it is imported; write to the stdout of now instead
    shell.con._stdout = sys.stdout
    Root(shell, cfs, desired)
    return shell


def run(cfs: ConfigFS, desired: Callable[[], TargetState], commands: list[str] | None = None,
        preferences_dir: str | None = None) -> None:
    shell = build(cfs, desired, preferences_dir)
    if commands:
        for line in commands:
            shell.run_cmdline(line)
    else:
        shell.run_interactive()
