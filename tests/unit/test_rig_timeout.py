"""The rig's timeout stops the whole VM, not only virtme-ng: a run once reported "killed" while QEMU, a grandchild
that kept the output pipe open, ran the VM to its end. A real process tree stands in for vng + QEMU here: a parent
that starts a child which ignores SIGTERM and holds the pipe, as QEMU does; the kernel suite's own guest is not
needed to show the group is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rig.vm import supervise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose (killed, not yet reaped by its orphaned parent); reaped meanwhile: gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_group_and_names_the_running_test(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    progress = tmp_path / "progress"
    child_pid = tmp_path / "child.pid"
    script = (f"trap '' TERM; (trap '' TERM; echo $BASHPID > {child_pid}; "
              f"echo tests/kernel/test_x.py::test_hangs > {progress}; exec sleep 600) & wait")
    started = time.monotonic()
    status = supervise(["bash", "-c", script], dict(os.environ), timeout=2, progress=progress)
    assert status == 124
    assert time.monotonic() - started < 60, "the relay kept reading after the kill: a child held the pipe"
    err = capfd.readouterr().err
    assert "killed (QEMU included); it was running tests/kernel/test_x.py::test_hangs" in err
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the grandchild (QEMU's place) survived the timeout"
    assert not progress.exists()


def test_a_finished_vm_gives_its_own_status(tmp_path: Path) -> None:
    assert supervise(["bash", "-c", "exit 7"], dict(os.environ), timeout=60, progress=tmp_path / "p") == 7


def test_a_killed_rig_takes_the_vm_with_it(tmp_path: Path) -> None:
    """SIGKILL runs no code in the rig: the leash (the group's leader) must still take down the VM's grandchild."""
    child_pid = tmp_path / "child.pid"
    script = f"(trap '' TERM; echo $BASHPID > {child_pid}; exec sleep 600) & wait"
    rig = subprocess.Popen([sys.executable, "-c",
                            "import os, sys; from rig.vm import supervise; "
                            f"supervise(['bash', '-c', {script!r}], dict(os.environ), 600, "
                            f"__import__('pathlib').Path({str(tmp_path / 'p')!r}))"],
                           cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not child_pid.exists() or not child_pid.read_text().strip():
        assert time.monotonic() < deadline and rig.poll() is None, "the VM stand-in never started"
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    assert _alive(pid)
    rig.kill()
    rig.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the VM's grandchild outlived a rig killed with SIGKILL"
