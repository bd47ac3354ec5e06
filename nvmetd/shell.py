"""`nvmetctl shell`: an interactive tree of the nvmet target (like nvmetcli's), built on configshell-fb.

Nodes mirror configfs (subsystems/namespaces, ports, hosts) as the kernel holds them, and `diff`, `repair`
compare with nvmetd's desired state. It changes the kernel only through `repair`, which applies the stored desired
state; a hand-made change here would be undone by the next reconcile anyway. What it reads and what `repair`
writes come from a `Tree`: nvmetd's API (nvmetctl's default) or, offline, `Local` on configfs itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from configshell import ConfigNode, ConfigShell

from target.configfs import ConfigFS
from target.model import TargetState


class Tree(Protocol):
    def live(self) -> TargetState: ...
    def drift(self) -> list[str]: ...
    def repair(self) -> dict[str, Any]: ...


class Local:
    """The tree on this host's configfs, against a desired state (offline, and the unit tests' fake tree)."""

    def __init__(self, cfs: ConfigFS, desired: Callable[[], TargetState]) -> None:
        self.cfs = cfs
        self.desired = desired

    def live(self) -> TargetState:
        from target.live import read_state

        return read_state(self.cfs)

    def drift(self) -> list[str]:
        from target.apply import diff

        return diff(self.desired(), self.cfs)

    def repair(self) -> dict[str, Any]:
        from target.apply import apply_state

        return apply_state(self.desired(), self.cfs).to_dict()


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
    def __init__(self, shell: ConfigShell, tree: Tree) -> None:
        super().__init__("/", shell=shell)
        self.tree = tree
        self.refresh()

    def refresh(self) -> None:
        for child in list(self.children):
            self.remove_child(child)
        live = self.tree.live()
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
        changes = self.tree.drift()
        self.shell.con.display("\n".join(changes) or "no drift")

    def ui_command_repair(self) -> None:
        """Apply the desired state (undo hand edits)."""
        result = self.tree.repair()
        self.shell.con.display(f"converged={result['converged']} configfs changes={result['writes']}")
        self.refresh()


def build(tree: Tree, preferences_dir: str | None = None) -> ConfigShell:
    shell = ConfigShell(preferences_dir)
    # configshell's Console binds sys.stdout when it is imported; write to the stdout of now instead
    shell.con._stdout = sys.stdout
    Root(shell, tree)
    return shell


def run(tree: Tree, commands: list[str] | None = None, preferences_dir: str | None = None) -> None:
    shell = build(tree, preferences_dir)
    if commands:
        for line in commands:
            shell.run_cmdline(line)
    else:
        shell.run_interactive()
