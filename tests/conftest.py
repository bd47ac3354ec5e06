"""Shared fixtures. Kernel tests (marker `kernel`) need nvmet: `make test` runs them inside the 6.12 rig VM.

Under CI=true a kernel test that finds no nvmet fails instead of skipping: an unproven claim is a red build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

from target.configfs import NVMET_ROOT, ConfigFS

# Property tests judge outcomes, never speed: no per-example deadline (a loaded 2-core host or a TCG guest makes a
# 1 ms example take 500 ms), and a fixed derivation of examples so a red run can be replayed.
settings.register_profile("nvmetd", deadline=None, derandomize=True)
settings.load_profile("nvmetd")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """In the rig, name the running test in the file rig/vm.py reads when the VM times out."""
    progress = os.environ.get("NVMETD_RIG_PROGRESS")
    if progress:
        Path(progress).write_text(nodeid + "\n")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"kernel test cannot run under CI: {reason}")
    pytest.skip(f"{reason} (run `make test`, which boots the 6.12 rig VM)")


def modprobe(*modules: str) -> None:
    subprocess.run(["modprobe", "-a", *modules], check=True, capture_output=True)


@pytest.fixture(scope="session")
def nvmet_kernel() -> ConfigFS:
    if os.geteuid() != 0:
        _unavailable("kernel tests need root")
    if shutil.which("modprobe") is None:
        _unavailable("no modprobe")
    subprocess.run(["modprobe", "-a", "nvmet", "nvmet-tcp", "nvme-loop", "nvme-tcp", "nvme-fabrics", "loop"],
                   check=False, capture_output=True)
    if not NVMET_ROOT.is_dir():
        _unavailable("this kernel has no nvmet configfs tree")
    return ConfigFS()


def wipe(root: Path = NVMET_ROOT) -> None:
    """Tear the tree down by hand (not through the code under test), so a buggy planner cannot hide leftovers."""
    subprocess.run(["nvme", "disconnect-all"], check=False, capture_output=True)
    for port in root.glob("ports/*"):
        for link in [*port.glob("subsystems/*"), *port.glob("referrals/*")]:
            (link.unlink if link.is_symlink() else link.rmdir)()
        for group in port.glob("ana_groups/*"):
            if group.name != "1":
                group.rmdir()
        port.rmdir()
    for sub in root.glob("subsystems/*"):
        for link in sub.glob("allowed_hosts/*"):
            link.unlink()
        for ns in sub.glob("namespaces/*"):
            ns.rmdir()
        (sub / "passthru" / "enable").write_text("0")
        sub.rmdir()
    for host in root.glob("hosts/*"):
        host.rmdir()


@pytest.fixture
def cfs(nvmet_kernel: ConfigFS) -> ConfigFS:
    """A clean nvmet tree before and after the test."""
    wipe()
    yield ConfigFS()
    wipe()


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory on tmpfs: backing files on the rig's overlay root give broken namespaces (kernel-rig.md)."""
    base = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else tmp_path_factory.mktemp("scratch")
    base.mkdir(parents=True, exist_ok=True)
    path = Path(subprocess.run(["mktemp", "-d", "-p", str(base)], check=True, capture_output=True,
                               text=True).stdout.strip())
    yield path
    shutil.rmtree(path, ignore_errors=True)
