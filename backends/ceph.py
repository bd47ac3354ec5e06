"""Talking to a Ceph cluster with its own CLIs (`ceph`, `rbd`): credentials, bounded waits, errors a user can act on.

The keyring is passed as a *path* (never its contents, never on argv as a secret) and must be 0600: a world-readable
Ceph key lets anyone on the host read and overwrite every disk in the pool. It is never logged: error messages quote
only the tool and its first arguments, and a failing tool's output is scrubbed of anything that looks like a key.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from backends.errors import BackendError, ToolError, UnavailableError
from backends.run import run

CONNECT_TIMEOUT = 60  # seconds to reach a monitor and authenticate before a command gives up: a dead cluster must
# not hang nvmetd, but a loaded or emulated host can need tens of seconds for the cephx handshake
_KEY_RE = re.compile(r"[A-Za-z0-9+/]{38}==")  # a cephx secret (base64 of 28 bytes)
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\S+ [0-9a-f]+ +-?\d+ ")  # "2026-12-01T21:16:06.617+0000 7ff4 -1 "
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNREACHABLE = ("timed out", "error connecting to the cluster", "connection refused", "no route to host",
                "monclient", "errno 110", "errno 111")


@dataclass(frozen=True)
class Client:
    """Who we are to the cluster: its config file, our keyring and cephx user (`client.<user>`)."""

    conf: str
    keyring: str
    user: str = "admin"
    connect_timeout: int = CONNECT_TIMEOUT

    def args(self) -> list[str]:
        return ["--conf", self.conf, "--keyring", self.keyring, "--id", self.user,
                "--client_mount_timeout", str(self.connect_timeout), "--rados_mon_op_timeout", "60"]

    # ------------------------------------------------------------------ checks before any change
    def check(self) -> list[str]:
        """Config and keyring usable, a monitor answering: else UnavailableError naming the cause. Returns the
        cluster's pool names: the probe is a question the caller has anyway (one CLI start-up, not two)."""
        if not _USER_RE.match(self.user):
            raise BackendError(f"ceph user {self.user!r} is not a cephx user name (letters, digits, . _ -)")
        conf = Path(self.conf)
        if not conf.is_file():
            raise UnavailableError(f"ceph config {self.conf} does not exist (give the cluster's ceph.conf)")
        try:
            text = conf.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UnavailableError(f"ceph config {self.conf} cannot be read: {exc}") from None
        if not re.search(r"^\s*mon[ _]host\s*=\s*\S", text, re.MULTILINE):
            raise UnavailableError(f"ceph config {self.conf} names no monitor (mon_host = ...)")
        keyring = Path(self.keyring)
        if not keyring.is_file():
            raise UnavailableError(f"ceph keyring {self.keyring} does not exist (client.{self.user}'s keyring)")
        mode = stat.S_IMODE(os.stat(keyring).st_mode)
        if mode & 0o077:
            raise UnavailableError(f"ceph keyring {self.keyring} is mode {mode:04o}: it must be 0600 (readable "
                                   "by its owner only), it holds the cluster key")
        return list(self.ceph_json("osd", "pool", "ls") or [])

    # ------------------------------------------------------------------ commands
    def _run(self, tool: str, argv: list[str], timeout: float) -> str:
        proc = run([tool, *self.args(), *argv], check=False, timeout=timeout)
        if proc.returncode == 0:
            return proc.stdout
        self._fail(tool, argv, proc.stderr.strip() or proc.stdout.strip(), proc.returncode)

    def _fail(self, tool: str, argv: list[str], output: str, returncode: int) -> NoReturn:
        detail = _scrub(output)
        lines = [_LOG_PREFIX.sub("", line).strip() for line in detail.splitlines() if line.strip()]
        tail = lines[-1] if lines else f"exit status {returncode}"
        low = detail.lower()
        where = f"{tool} {' '.join(argv[:3])}"
        if "permission denied" in low or "errno 13" in low:
            raise UnavailableError(f"ceph refused client.{self.user} with keyring {self.keyring}: {tail}")
        if any(word in low for word in _UNREACHABLE):
            raise UnavailableError(f"ceph monitor unreachable ({self.mon_hosts()}) from {self.conf}: {where}: {tail}")
        raise ToolError(f"{where} failed: {tail}")

    def ceph(self, *argv: str, timeout: float = 120) -> str:
        return self._run("ceph", list(argv), timeout)

    def ceph_batch(self, commands: list[list[str]], timeout: float = 300) -> None:
        """Several commands in one `ceph` process (it reads them from stdin): most of a command's cost is the CLI's
        start-up (a Python interpreter, a cephx handshake), seconds each on a loaded or emulated host. The exit
        status does not say whether a command failed, its "Error ..." line on stderr does; a failure stops
        nothing after it, so callers read back what they meant to set."""
        for argv in commands:
            if any(not arg or any(c.isspace() for c in arg) for arg in argv):
                raise BackendError(f"ceph command {argv[:3]} has an empty or blank argument")
        script = "".join(" ".join(argv) + "\n" for argv in commands)
        proc = run(["ceph", *self.args()], check=False, input_bytes=script.encode(), timeout=timeout)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error ")]
        if proc.returncode != 0 or errors:
            self._fail("ceph", commands[0], "\n".join(errors) or proc.stderr.strip(), proc.returncode)

    def ceph_json(self, *argv: str, timeout: float = 120) -> Any:
        return json.loads(self.ceph(*argv, "--format", "json", timeout=timeout) or "null")

    def rbd(self, *argv: str, timeout: float = 300) -> str:
        return self._run("rbd", list(argv), timeout)

    def rbd_json(self, *argv: str) -> Any:
        return json.loads(self.rbd(*argv, "--format", "json") or "null")

    def mon_hosts(self) -> str:
        try:
            match = re.search(r"^\s*mon[ _]host\s*=\s*(.+)$", Path(self.conf).read_text(), re.MULTILINE)
        except OSError:
            return "no config"
        return match.group(1).strip() if match else "no mon_host"


def _scrub(text: str) -> str:
    return _KEY_RE.sub("<key>", text)


def redundancy(pg_states: list[str]) -> str:
    """One word for a pool's placement groups: clean, recovering (copies being rebuilt), degraded (fewer copies than
    the pool's size, nothing rebuilding yet) or unavailable (some PG not active: I/O to it blocks)."""
    if not pg_states:
        return "unknown"
    if any("active" not in s.split("+") for s in pg_states):
        return "unavailable"
    if all(s == "active+clean" for s in pg_states):
        return "clean"
    if any(w in s for s in pg_states for w in ("recover", "backfill")):
        return "recovering"
    if any(w in s for s in pg_states for w in ("degraded", "undersized")):
        return "degraded"
    return "clean" if all("clean" in s for s in pg_states) else "recovering"
