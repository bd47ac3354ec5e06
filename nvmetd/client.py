"""nvmetctl's HTTP client for nvmetd's Unix socket: the standard library's http.client, nothing more.

The CLI is started once per disk by hypervisor agents, so its start-up is part of every attach: httpx (and the
pydantic and FastAPI stack behind the server) cost more to import than the request costs to serve.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode


class ApiError(Exception):
    """nvmetd refused the request (status >= 400); the message is its one-line answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(Exception):
    """No nvmetd answers on the socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("nvmetd", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def api_path(segments: tuple[str, ...], query: dict[str, Any] | None = None) -> str:
    """The request's raw path. `quote(safe="")` encodes `/ ? # %` and every control or non-ASCII character, so a
    name can never add a segment, a query or a fragment; the dots of a `.` or `..` segment are encoded too, since
    RFC 3986 clients remove dot segments before sending."""
    parts = [quote(seg, safe="") for seg in segments]
    path = "/" + "/".join(p.replace(".", "%2E") if p in (".", "..") else p for p in parts)
    if query:
        path += "?" + urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()})
    return path


def daemon_alive(path: Path) -> bool:
    """Whether a process accepts connections on the socket (a stale socket file refuses them)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def request(sock: Path, method: str, segments: tuple[str, ...], body: Any = None,
            query: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    conn = _UnixConnection(sock, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        conn.request(method, api_path(segments, query), body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as exc:
        raise Unreachable(f"nvmetd is not running (nothing answers on {sock}: {exc.strerror or exc}); start "
                          "it, or use --offline for the target commands") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        data = raw.decode(errors="replace")
    if resp.status >= 400:
        message = data.get("error", data) if isinstance(data, dict) else data
        raise ApiError(resp.status, str(message))
    return data
