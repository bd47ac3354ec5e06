"""Talking to a Ceph cluster: credentials, bounded waits, errors a user can act on.

Questions and changes go through one cached librados connection (backends.ceph_session): monitor commands as JSON,
image operations through librbd. Only mapping an image to /dev/rbdN stays with the `rbd` CLI, which is how krbd is
driven (it resolves the monitors and hands the key to the kernel keyring).

The keyring is passed as a *path* (never its contents, never on argv as a secret) and must be 0600: a world-readable
Ceph key lets anyone on the host read and overwrite every disk in the pool. It is never logged: error messages quote
only the tool or command and its first words, and a failure's text is scrubbed of anything that looks like a key.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from backends import ceph_session
from backends.errors import BackendError, ToolError, UnavailableError
from backends.run import run

CONNECT_TIMEOUT = 60  # seconds to reach a monitor and authenticate before a command gives up: a dead cluster must
# not hang nvmetd, but a loaded or emulated host can need tens of seconds for the cephx handshake
_KEY_RE = re.compile(r"[A-Za-z0-9+/]{38}==")  # a cephx secret (base64 of 28 bytes)
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\S+ [0-9a-f]+ +-?\d+ ")  # "2026-12-01T21:16:06.617+0000 7ff4 -1 "
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_T = TypeVar("_T")
_UNREACHABLE = ("timed out", "error connecting to the cluster", "connection refused", "no route to host",
                "monclient", "errno 110", "errno 111")


@dataclass(frozen=True)
class Client:
    """Who we are to the cluster: its config file, our keyring and cephx user (`client.<user>`)."""

    conf: str
    keyring: str
    user: str = "admin"
    connect_timeout: int = CONNECT_TIMEOUT

    # ------------------------------------------------------------------ checks before any change
    def check(self) -> list[str]:
        """Config and keyring usable, a monitor answering: else UnavailableError naming the cause. Returns the
        cluster's pool names: the probe is a question the caller has anyway."""
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
        return list(self.command("osd pool ls") or [])

    # ------------------------------------------------------------------ librados: monitor and manager commands
    def _session(self) -> Any:
        return ceph_session.connect(self.conf, self.keyring, self.user, self.connect_timeout)

    def _guard(self, what: str, call: Callable[[], _T]) -> _T:
        """Run a binding call; its exceptions become one line naming the cause (a lost monitor also drops the
        cached connection, so the next call makes a new one)."""
        rados = ceph_session.binding("rados")
        try:
            return call()
        except rados.Error as exc:
            text = str(exc)
            if isinstance(exc, rados.TimedOut | rados.ConnectionShutdown) or "connecting" in text.lower():
                ceph_session.forget(self.conf, self.keyring, self.user, self.connect_timeout)
            self._fail("ceph", [what], f"{type(exc).__name__}: {text}", getattr(exc, "errno", None) or 1)

    def command(self, prefix: str, timeout: float = 120, **args: Any) -> Any:
        """A monitor command (`pg ...`: a manager's) by its JSON form, e.g. command("osd pool set", pool="p",
        var="size", val="3"); returns its JSON answer, if any."""
        cmd = json.dumps({"prefix": prefix, "format": "json", **args})

        def call() -> tuple[int, bytes, str]:
            conn = self._session()
            send = conn.mgr_command if prefix.startswith("pg ") else conn.mon_command
            return send(cmd, b"", timeout=int(timeout))

        ret, out, err = self._guard(prefix, call)
        if ret != 0:
            self._fail("ceph", [prefix], f"Error {os.strerror(-ret) if ret < 0 else ret}: {err}", ret)
        return json.loads(out) if out.strip() else None

    def instance_id(self) -> int:
        """Our client's global id (`client.<id>` in a watcher list)."""
        return int(self._guard("instance id", lambda: self._session().get_instance_id()))

    # ------------------------------------------------------------------ librbd: images
    @contextmanager
    def ioctx(self, pool: str) -> Iterator[Any]:
        """An I/O context on a Ceph pool (closed after the block)."""
        ctx = self._guard(f"open pool {pool}", lambda: self._session().open_ioctx(pool))
        try:
            yield ctx
        finally:
            ctx.close()

    def images(self, what: str, pool: str, call: Callable[[Any, Any], _T]) -> _T:
        """`call(rbd_module, ioctx)` on `pool`; librbd's errors (ImageNotFound, ImageBusy, ...) as one line."""
        rbd = ceph_session.binding("rbd")
        with self.ioctx(pool) as ctx:
            try:
                return self._guard(what, lambda: call(rbd, ctx))
            except rbd.Error as exc:
                self._fail("rbd", [what], f"{type(exc).__name__}: {exc}", getattr(exc, "errno", None) or 1)

    # ------------------------------------------------------------------ the rbd CLI: krbd mapping
    def args(self) -> list[str]:
        return ["--conf", self.conf, "--keyring", self.keyring, "--id", self.user,
                "--client_mount_timeout", str(self.connect_timeout), "--rados_mon_op_timeout", "60"]

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
