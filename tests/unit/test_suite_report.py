"""`make test`'s last line: a kernel suite that did not run, or skipped tests, is said loudly and fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rig.suite_report import read_counts, verdict

REPO = Path(__file__).resolve().parents[2]


def _junit(tmp_path: Path, body: str) -> Path:
    """A real pytest run of `body` (a test module) with its JUnit report, as scripts/test produces one."""
    (tmp_path / "test_sample.py").write_text(body)
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junit-xml={junit}",
                    "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")], cwd=tmp_path,
                   capture_output=True, check=False)
    return junit


def test_all_skipped_is_loud_and_fails(tmp_path: Path) -> None:
    junit = _junit(tmp_path, "import pytest\ndef test_a():\n    pytest.skip('no nvmet')\ndef test_b():\n    pass\n")
    line, code = verdict(read_counts(junit), 0, allow_skip=False)
    assert code != 0 and line.startswith("!!! KERNEL SUITE INCOMPLETE: 1 of 2 kernel tests ran")
    line, code = verdict(read_counts(junit), 0, allow_skip=True)
    assert code == 0 and "NVMETD_ALLOW_SKIP=1" in line and line.startswith("!!!")


def test_no_report_means_it_did_not_run(tmp_path: Path) -> None:
    line, code = verdict(read_counts(tmp_path / "missing.xml"), 2, allow_skip=False)
    assert code != 0 and line.startswith("!!! THE KERNEL SUITE DID NOT RUN: the rig exited 2")
    assert verdict(None, 124, allow_skip=False)[0].startswith("!!! THE KERNEL SUITE DID NOT RUN: the rig VM timed")


@pytest.mark.parametrize(("body", "rig_status", "want_code", "start"), [
    ("def test_a():\n    pass\n", 0, 0, "kernel suite passed: 1 of 1"),
    ("def test_a():\n    assert False\n", 1, 1, "kernel suite FAILED: 1 of 1 kernel tests ran, 1 failed"),
    ("def test_a():\n    pass\n", 124, 1, "!!! KERNEL SUITE KILLED"),
])
def test_verdicts(tmp_path: Path, body: str, rig_status: int, want_code: int, start: str) -> None:
    line, code = verdict(read_counts(_junit(tmp_path, body)), rig_status, allow_skip=True)
    assert (code, line[:len(start)]) == (want_code, start)


def test_scripts_test_ends_with_the_verdict() -> None:
    """The verdict is the script's last command and decides its status (a newcomer reads the last line)."""
    lines = [ln for ln in (REPO / "scripts" / "test").read_text().splitlines() if ln.strip()]
    assert lines[-2].startswith('"$PY" -m rig.suite_report "$JUNIT" "$rig_status" || status=1')
    assert lines[-1] == "exit $status"
