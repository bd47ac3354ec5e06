"""The management plane's side of PROTOCOL.md: what nvmetd (and the tests) say to a running engine.

A second connection next to the front-end's: it never installs a memory table, so closing it never resets the
controller. Each call opens its own connection, because an engine may be restarted between two calls.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import protocol as p


class EngineUnavailable(OSError):
    """Nobody answers on the socket (engine not started, or dead)."""


@dataclass(frozen=True)
class NamespaceEntry:
    nsid: int
    name: str
    size: int
    readonly: bool
    null: bool


@dataclass(frozen=True)
class Stats:
    cqes: int
    signals: int
    kicks: int
    sleeps: int
    polls: int
    invalid_doorbells: int
    poll_window_ns: int = 0  # 0 from engines that predate the adaptive window


class EngineClient:
    def __init__(self, sock: Path | str, timeout: float = 30.0) -> None:
        self.sock = str(sock)
        self.timeout = timeout

    @contextlib.contextmanager
    def _conn(self) -> Iterator[socket.socket]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.sock)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise EngineUnavailable(exc.errno, f"no vhost-nvme engine on {self.sock}") from None
            yield s
        finally:
            s.close()

    def call(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        with self._conn() as s:
            p.send_msg(s, req, payload, fds)
            result, data = p.parse_reply(p.recv_msg(s))
        if result < 0:
            raise OSError(-result, f"engine refused {p.Req(req).name}: {p.errno_name(result)}")
        return data

    def alive(self) -> bool:
        try:
            self.call(p.Req.GET_INFO)
            return True
        except (OSError, ConnectionError, p.ProtocolError):
            return False

    def stats(self) -> Stats:
        data = self.call(p.Req.GET_STATS)
        return Stats(*(p.STATS if len(data) >= p.STATS.size else p.STATS_V1).unpack_from(data))

    def namespaces(self) -> dict[int, NamespaceEntry]:
        data = self.call(p.Req.NS_LIST)
        count, _ = p.NS_LIST_HEAD.unpack_from(data)
        out = {}
        for i in range(count):
            nsid, flags, size, name = p.NS_ENTRY.unpack_from(data, p.NS_LIST_HEAD.size + i * p.NS_ENTRY.size)
            out[nsid] = NamespaceEntry(nsid, name.split(b"\0", 1)[0].decode("utf-8", "replace"), size,
                                       bool(flags & p.NS_FLAG_READONLY), bool(flags & p.NS_FLAG_NULL))
        return out

    def attach(self, nsid: int, path: Path | str, name: str = "", readonly: bool = False) -> None:
        """NS_ATTACH with the backing fd by SCM_RIGHTS: the engine gets exactly the access opened here."""
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            label = (name or Path(path).name).encode()[:255]
            flags = p.NS_FLAG_READONLY if readonly else 0
            self.call(p.Req.NS_ATTACH, p.NS_ATTACH.pack(nsid, flags, 0, 0, 0, 0, 0, -1, label), [fd])
        finally:
            os.close(fd)

    def detach(self, nsid: int) -> None:
        self.call(p.Req.NS_DETACH, p.NS_ID.pack(nsid, 0))

    def set_limits(self, nsid: int, iops: int, bps: int) -> None:
        """NS_SET_LIMITS: the namespace's token bucket (reads and writes together; 0 = unlimited)."""
        self.call(p.Req.NS_SET_LIMITS, p.NS_LIMITS.pack(nsid, 0, iops, bps))
