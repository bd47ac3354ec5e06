"""The kernel's own verdict on a test: its log and taint flags, and the nvmet-vhost module the vhost tests need.

Here rather than in a test module so that no test imports another (pytest would collect the imported module's
fixtures into the importer, autouse ones included). tests/kernel/conftest.py offers the fixtures by name; a module
whose every test must leave a clean kernel log says `pytest.mark.usefixtures("clean_kernel_log")`.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from target.configfs import ConfigFS
from tests.conftest import IN_CI
from vhost_nvme.kernel import DEVICE

KERNEL_TROUBLE = re.compile(r"Oops|BUG:|WARNING:|general protection|Call Trace|KASAN|UBSAN|lockdep|"
                            r"refcount_t|list_(add|del) corruption|soft lockup|hung_task", re.IGNORECASE)

# taint flags a kernel sets for good: they survive a kernel log that TCG's "hpet: Lost RTC interrupts" floods
TAINT_DIE, TAINT_WARN, TAINT_SOFTLOCKUP = 1 << 7, 1 << 9, 1 << 14


def dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


def taint() -> int:
    return int(Path("/proc/sys/kernel/tainted").read_text())


def trouble_since(before: int) -> list[str]:
    """Lines of the kernel log after the first `before` that show an oops, a WARN, a lockdep report..."""
    return [line for line in dmesg()[before:] if KERNEL_TROUBLE.search(line)]


@pytest.fixture(scope="module")
def vhost_module(nvmet_kernel: ConfigFS) -> None:
    proc = subprocess.run(["modprobe", "nvmet-vhost"], capture_output=True, text=True, check=False)
    if proc.returncode or not DEVICE.exists():
        why = proc.stderr.strip() or f"no {DEVICE}"
        message = f"nvmet-vhost does not load ({why}): run kernel_patches/build.sh"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def clean_kernel_log(vhost_module: None) -> Iterator[None]:
    """Fails the test on an oops, BUG, WARNING or lockdep/KASAN report, or a taint flag it made the kernel set."""
    before, flags = len(dmesg()), taint()
    yield
    trouble = trouble_since(before)
    assert not trouble, "kernel log:\n" + "\n".join(trouble)
    new = taint() & ~flags & (TAINT_DIE | TAINT_WARN | TAINT_SOFTLOCKUP)
    assert not new, f"the kernel tainted itself during the test (flags {new:#x}: oops/WARN/soft lockup)"
