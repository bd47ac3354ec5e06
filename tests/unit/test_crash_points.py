"""Every named crash step on the host (fake configfs tree, real store and file pool, forked children killed by
SIGKILL at the step); tests/crash_points.py says what convergence means. The kernel run is
tests/kernel/test_crash_points.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from nvmetd.crashpoints import STEPS
from tests import crash_points
from tests.unit.fakes import FakeFS, FakeKernel


def test_every_crash_step_converges_after_restart(tmp_path: Path) -> None:
    tree = tmp_path / "nvmet"
    FakeKernel(tree)
    crash_points.setup_world(tmp_path)

    def reboot() -> None:
        shutil.rmtree(tree)
        FakeKernel(tree)

    problems, covered = [], set()
    for i, step in enumerate(STEPS):
        found = crash_points.crash_at(step, tmp_path, lambda: FakeFS(root=tree), reboot, i)
        problems += found
        if not any("was not killed" in p for p in found):
            covered.add(step)
    print(f"crash points: {len(covered)} distinct steps covered of {len(STEPS)}")
    assert not problems, "\n".join(problems)
    assert covered == set(STEPS)
