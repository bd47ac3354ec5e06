"""Fixtures for the vhost-user-nvme device tests: the patched QEMU (built by qemu_patches/build.sh, cached),
engine processes and TCG guests.

These tests run in `make test`'s host suite.  When something they need is missing (the 6.12 kernel,
busybox-static, a C compiler), they skip on a developer machine and FAIL under CI=true.  A failing QEMU build
always fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_nvme.vm import VM, EngineProcess, VMError, guest_kernel, qemu_binary

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The guest driver's I/O timeout: how long a command lost with a killed engine waits before the guest
# looks at CSTS (sees CFS) and resets the controller.  Linux's default is 30 s.
GUEST_APPEND = "nvme_core.io_timeout=4 nvme_core.admin_timeout=10"


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"vhost-user-nvme test cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu() -> Path:
    for tool in ("gcc", "cpio", "gzip", "patch", "ninja"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (scripts/setup installs qemu_patches/apt-packages.txt)")
    if not Path("/bin/busybox").exists():
        unavailable("busybox-static is not installed")
    if not Path("/usr/share/seabios/bios-256k.bin").exists() or not Path("/usr/share/qemu/kvmvapic.bin").exists():
        unavailable("seabios / qemu-system-data firmware is not installed")
    try:
        guest_kernel()
    except VMError as exc:
        unavailable(str(exc))
    binary = qemu_binary(build=True)  # raises (fails the test) when the build fails
    assert binary.is_file() and os.access(binary, os.X_OK), binary
    return binary


@pytest.fixture(scope="module")
def vmdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vm")


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Rig:
    """An engine process and the guest on its socket."""

    def __init__(self, qemu: Path, workdir: Path, name: str, dbbuf: bool = True, size: int = 64 << 20,
                 poll_us: int | None = None) -> None:
        self.workdir = workdir
        self.image = make_image(workdir / f"{name}-ns1.img", size)
        self.sock = workdir / f"{name}.sock"
        self.engine = EngineProcess(self.sock, [self.image], name=name, dbbuf=dbbuf, poll_us=poll_us)
        try:
            self.vm = VM(workdir / name, engine_sock=self.sock, append=GUEST_APPEND, qemu=qemu)
        except BaseException:
            self.engine.stop()
            raise

    def close(self) -> None:
        try:
            self.vm.close()
        finally:
            self.engine.stop()


@pytest.fixture(scope="module")
def rig(qemu: Path, vmdir: Path) -> Iterator[Rig]:
    r = Rig(qemu, vmdir, "vn")
    yield r
    r.close()
