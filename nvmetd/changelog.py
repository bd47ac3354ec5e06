"""The order in which nvmetd's changes took effect: one JSON line per disk or VM call, written under the Manager's
lock with the store's generation after it, whether the call succeeded or was refused.

Why: concurrent clients make the order of effects invisible from outside (a response can arrive after a later
call's), so the claim "parallel calls end as some serial order would" needs that order recorded where it is
decided. Off unless `nvmetd --change-log PATH` asks for it (tests, audits); it holds names and sizes, never keys.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ChangeLog:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        assert self.path is not None
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def recorded(op: str) -> Callable[[F], F]:
    """Run a Manager method under its lock and record it (op, arguments, outcome, generation) in call order."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            with self.lock:
                entry: dict[str, Any] = {"op": op, "args": list(args), "kwargs": kwargs}
                try:
                    result = method(self, *args, **kwargs)
                except Exception as exc:
                    entry["error"] = type(exc).__name__
                    raise
                finally:
                    if self.changes.path is not None:  # off: no parse of the whole state per call
                        entry["generation"] = self.store.load().get("generation", 0)
                        self.changes.record(entry)
                return result

        return call  # type: ignore[return-value]

    return wrap
