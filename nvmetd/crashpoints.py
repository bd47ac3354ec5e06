"""Fault injection for crash-consistency tests: `NVMETD_CRASH_AT=<step>` makes nvmetd SIGKILL itself when it
reaches that named step of an operation, as a power cut or kill -9 would, with nothing flushed or cleaned up.

Not compiled out, just a dictionary lookup of an environment variable read once: without it set, each step costs
one comparison. The steps are listed here so a test can iterate every one and know it covered them all.
"""

from __future__ import annotations

import os
import signal

ENV = "NVMETD_CRASH_AT"

STEPS = (
    "create.after_journal",   # disk recorded as "creating", no volume yet
    "create.in_pool",         # inside the pool (create or clone): volume made, the pool's own intent still open
    "create.after_volume",    # volume made, the disk not yet marked ready
    "delete.after_journal",   # disk marked "deleting", volume still there
    "delete.after_volume",    # volume gone, the disk still in the store
    "resize.after_grow",      # volume grown, nvmet not yet told (revalidate_size)
    "attach.after_store",     # attachment recorded, kernel not yet reconciled
    "attach.after_reconcile",  # namespace live, no key file or answer yet
    "detach.after_store",     # attachment removed from the store, namespace still live
    "reconcile.after_kernel",  # kernel reconciled, volumes of detached disks not yet released
    "boot.after_recover",     # start-up: pools recovered, journal not yet finished
    "boot.after_journal",     # start-up: journal finished, kernel not yet restored
)

_armed = os.environ.get(ENV) or None


def crash_point(step: str) -> None:
    """Die here, by SIGKILL, if this is the step NVMETD_CRASH_AT names."""
    if _armed is not None and _armed == step:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(step: str | None) -> None:
    """For a forked test child (which inherits the parent's reading of the environment): set the step."""
    global _armed
    if step is not None and step not in STEPS:
        raise ValueError(f"unknown crash step {step!r}; known: {', '.join(STEPS)}")
    _armed = step
