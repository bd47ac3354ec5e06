"""`nvmetctl --offline`: the target commands on a host where nvmetd is not running.

nvmetd is the only writer of configfs and of the store while it runs. Offline, nvmetctl runs nvmetd's own code
(TargetOps on a Manager) in its process, holding the store's lock for the whole command, and refuses while a
daemon accepts connections on the socket. nvmetd binds its socket under the same lock, so a daemon starting
meanwhile waits until the offline command is done, and the check cannot race with its start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvmetd.client import daemon_alive
from nvmetd.errors import SystemProblem

if TYPE_CHECKING:
    from nvmetd.target_ops import TargetOps


@contextlib.contextmanager
def session(state: Path, socket: Path, configfs: Path, pools_root: Path | None) -> Iterator[TargetOps]:
    """nvmetd's target commands in this process, under the store's lock, refused while a daemon serves."""
    from nvmetd.manager import Manager
    from nvmetd.target_ops import TargetOps
    from target.configfs import ConfigFS
    from target.store import StateStore

    store = StateStore(state)
    with store.locked():
        if daemon_alive(socket):
            raise SystemProblem(f"nvmetd is running (socket {socket}) and is the only writer of the target: "
                                "drop --offline to go through it")
        yield TargetOps(Manager(store, ConfigFS(configfs), pools_root=pools_root, host_connect=False))


def run(state: Path, socket: Path, configfs: Path, pools_root: Path | None, command: str, body: Any = None,
        query: dict[str, Any] | None = None) -> Any:
    """One target command, named as the CLI names it, with the API's body and query."""
    query = query or {}
    with session(state, socket, configfs, pools_root) as ops:
        commands = {
            "apply": lambda: ops.apply(body),
            "plan": lambda: ops.plan(body),
            "drift": ops.drift,
            "repair": ops.repair,
            "restore": lambda: ops.restore(float(body["timeout"])),
            "status": ops.status,
            "export": lambda: ops.export(**query),
            "import": lambda: ops.import_nvmetcli(body, **query),
        }
        return commands[command]()
