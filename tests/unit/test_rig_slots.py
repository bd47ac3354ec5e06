"""The rig's machine-wide VM slots: a second run waits while the only slot is held, and gets it once freed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rig.vm import rig_slot

HOLDER = """
import sys, time
from pathlib import Path
from rig.vm import rig_slot
lock_dir = Path(sys.argv[1])
with rig_slot("1", lock_dir):
    print("held", flush=True)
    time.sleep(1)
    (lock_dir / "releasing").touch()
"""


def test_second_run_waits_for_the_slot(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with rig_slot("1", tmp_path):
        assert (tmp_path / "releasing").exists(), "the slot was handed out while another run held it"
    assert holder.wait(timeout=30) == 0


def test_two_slots_let_two_runs_in(tmp_path: Path) -> None:
    with rig_slot("2", tmp_path), rig_slot("2", tmp_path):  # would wait forever with one slot
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nvmetd-rig-slot.0", "nvmetd-rig-slot.1"]
