"""What happened to one object of the tree in an apply: a StrEnum, importable without the rest of target/.

Why a module of its own: `nvmetctl` (start-up measured per call) and the metrics exporter judge the statuses
nvmetd reports; they import this, not target.apply (which pulls in the pydantic model of the tree).
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    REMOVED = "removed"
    PENDING = "pending"  # waiting for a device or an address: the drift timer or restore retries it
    FAILED = "failed"
    SKIPPED = "skipped"  # depends on an object that failed

    @property
    def converged(self) -> bool:
        return self in CONVERGED


CONVERGED = frozenset({Status.OK, Status.CHANGED, Status.REMOVED})
NOT_THERE = frozenset({Status.FAILED, Status.PENDING, Status.SKIPPED})  # the kernel does not hold the object
ORDER = (Status.OK, Status.CHANGED, Status.REMOVED, Status.PENDING, Status.FAILED, Status.SKIPPED)  # as printed
