"""When nvmetd tells systemd it is READY: only once the API serves AND the kernel matches the desired state.

Reporting READY after a failed restore let systemd and the agent see a healthy service that was not serving its
VMs' disks. Until a restore or reconcile converges, STATUS= says why nvmetd is not ready (the first objects that
are pending or failed, with their reasons); a later failure after READY is shown in STATUS= too (systemd has no
way to take READY back).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from target.apply import ApplyResult
from target.status import NOT_THERE

log = logging.getLogger("nvmetd.readiness")


def why_not_converged(result: ApplyResult, what: str) -> str:
    bad = [s for s in result.objects.values() if s.status in NOT_THERE]
    detail = "; ".join(f"{s.status} {s.label}" + (f": {s.reason}" if s.reason else "") for s in bad[:3])
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    return f"{what} did not converge: {detail or 'no object reported'}{more}"


class ServiceReadiness:
    def __init__(self, notify: Callable[[str], object], serving_status: str) -> None:
        self._notify = notify
        self._serving_status = serving_status
        self._lock = threading.Lock()
        self._serving = False
        self._problem: str | None = "restore has not finished"
        self.ready_sent = False
        self._last: str | None = None

    def serving(self) -> None:
        """The API socket answers."""
        with self._lock:
            self._serving = True
            self._announce()

    def converged(self, result: ApplyResult, what: str) -> None:
        with self._lock:
            self._problem = None if result.converged else why_not_converged(result, what)
            self._announce()

    def failed(self, problem: str) -> None:
        with self._lock:
            self._problem = problem
            self._announce()

    @property
    def problem(self) -> str | None:
        return self._problem

    def _announce(self) -> None:
        if self._problem is not None:
            status = f"NOT READY: {self._problem}"
            if self._serving:
                self._notify(f"STATUS={status}")
            if status != self._last:
                log.warning("%s", status)
            self._last = status
            return
        self._last = None
        if not self._serving:
            return
        if not self.ready_sent:
            self.ready_sent = True
            self._notify(f"READY=1\nSTATUS={self._serving_status}")
            log.info("ready: %s", self._serving_status)
        else:
            self._notify(f"STATUS={self._serving_status}")
