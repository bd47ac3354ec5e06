"""Every named crash step on the real kernel: the operation runs in a forked child armed to SIGKILL itself at the
step (nvmetd/crashpoints.py), then start-up (Manager.boot, what nvmetd runs first) must converge: no orphan
volume, subsystem, host or key file, the journal closed, the nvmet tree equal to the store field by field, a
retried request answering the same twice (tests/crash_points.py). Forks, not 11 daemon start-ups (tens of seconds
each under TCG); the real daemon then starts once on the result and must find nothing to repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmetd.crashpoints import STEPS
from target.configfs import ConfigFS
from target.store import StateStore
from tests import contention, crash_points
from tests.conftest import wipe
from tests.kernel import hostside
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel


def test_every_crash_step_converges_after_restart(cfs: ConfigFS, scratch: Path) -> None:
    crash_points.setup_world(scratch)
    problems, covered = [], set()
    for i, step in enumerate(STEPS):
        found = crash_points.crash_at(step, scratch, ConfigFS, wipe, i)
        problems += found
        if not any("was not killed" in p for p in found):
            covered.add(step)
    print(f"crash points (kernel): {len(covered)} distinct steps covered of {len(STEPS)}")
    assert not problems, "\n".join(problems)
    assert covered == set(STEPS)
    # the real daemon on what the crashes left: its start-up converges and changes nothing
    generation = StateStore(scratch / "state.json").load()["generation"]
    (scratch / "nvmetd.toml").write_text("")
    d = Daemon(scratch)
    try:
        d.start()
        status = d.wait_converged()
        assert status["generation"] == generation, "start-up changed the state after the crash-free boot"
        assert contention.kernel_vs_store(StateStore(scratch / "state.json"), cfs, scratch / "pools") == []
        assert "Traceback" not in d.log_text()
    finally:
        d.stop()
        for sub in cfs.listdir("subsystems"):
            hostside.disconnect(sub)


