"""systemd's side of sd_notify for tests: what READY=1, STATUS= and WATCHDOG=1 nvmetd sent, and from which pid
(test_service_ops and test_readiness both listen; a helper module so that neither imports the other)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Notifications:
    """A NOTIFY_SOCKET the way systemd runs one: a datagram socket that learns each sender's pid (SO_PASSCRED)."""

    path: Path
    messages: list[tuple[float, int, str]] = field(default_factory=list)  # (monotonic time, sender pid, text)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        creds = struct.calcsize("3i")
        while not self.stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            self.messages.append((time.monotonic(), pid, data.decode()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def from_pid(self, pid: int, since: float = 0.0) -> list[tuple[float, str]]:
        return [(t, m) for t, p, m in list(self.messages) if p == pid and t >= since]
