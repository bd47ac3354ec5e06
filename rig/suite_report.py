"""`python -m rig.suite_report JUNIT_XML RIG_STATUS`: the last line of `make test` about the kernel suite.

A newcomer's `make test` once skipped every kernel test (no rig, no CI=true) and still exited 0: the claims those
tests carry were never checked and nothing said so. This reads the kernel run's JUnit report and says, loudly,
whether the suite ran in full; exit 0 only if it did (or NVMETD_ALLOW_SKIP=1 accepts that it did not).
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Counts:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0


def read_counts(junit: Path) -> Counts | None:
    """The totals of a pytest --junit-xml report; None if there is none (the run never got that far)."""
    try:
        root = ET.parse(junit).getroot()  # noqa: S314 - our own pytest wrote it
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = Counts()
    for s in suites:
        out.tests += int(s.get("tests", 0))
        out.failures += int(s.get("failures", 0))
        out.errors += int(s.get("errors", 0))
        out.skipped += int(s.get("skipped", 0))
        out.seconds += float(s.get("time", 0))
    return out


def verdict(counts: Counts | None, rig_status: int, allow_skip: bool) -> tuple[str, int]:
    """(the line to print, exit status): 0 when the suite ran in full and passed; 1 when it failed; 4 when it did
    not run or skipped tests, unless allow_skip."""
    skip_code = 0 if allow_skip else 4
    hint = " (accepted: NVMETD_ALLOW_SKIP=1)" if allow_skip else " (set NVMETD_ALLOW_SKIP=1 to accept that)"
    if counts is None or counts.tests == 0:
        why = "the rig VM timed out" if rig_status == 124 else f"the rig exited {rig_status} before any test ran"
        return f"!!! THE KERNEL SUITE DID NOT RUN: {why}; no kernel claim was checked{hint}", skip_code
    ran = counts.tests - counts.skipped
    summary = (f"{ran} of {counts.tests} kernel tests ran, {counts.failures + counts.errors} failed, "
               f"{counts.skipped} skipped, in {counts.seconds:.0f} s")
    if rig_status == 124:
        return f"!!! KERNEL SUITE KILLED BY THE RIG'S TIMEOUT: {summary}", 1
    if counts.failures or counts.errors or rig_status != 0:
        return f"kernel suite FAILED: {summary}", 1
    if counts.skipped:
        return f"!!! KERNEL SUITE INCOMPLETE: {summary}{hint}", skip_code
    return f"kernel suite passed: {summary}", 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    line, code = verdict(read_counts(Path(argv[0])), int(argv[1]), os.environ.get("NVMETD_ALLOW_SKIP") == "1")
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
