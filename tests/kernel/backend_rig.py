"""Kernel-test helpers for backends: loop devices on tmpfs, exporting volumes through target/, raw-device scans."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends import Backend, BackendError, create_pool, destroy_pool
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import TargetState, parse_state
from tests.conftest import IN_CI, wipe
from tests.kernel import hostside

HOST = "nqn.2014-08.org.nvmexpress:uuid:3a0c1f2e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
SUB = "nqn.2026-11.io.nvmetd:backends"
MIB = 1 << 20


def need(*tools: str) -> None:
    """A missing tool skips on a developer machine and fails under CI (an unproven claim is a red build)."""
    for tool in tools:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            if IN_CI:
                pytest.fail(f"{tool} is not installed (run scripts/setup)")
            pytest.skip(f"{tool} is not installed (run scripts/setup)")


class Loops:
    """Sparse files on tmpfs with loop devices over them; all detached at teardown."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.devices: list[str] = []

    def make(self, name: str, size: int) -> str:
        path = self.scratch / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(["losetup", "--find", "--show", str(path)], check=True, capture_output=True,
                             text=True).stdout.strip()
        self.devices.append(dev)
        return dev

    def close(self) -> None:
        for dev in self.devices:
            subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)


@pytest.fixture
def loops(scratch: Path) -> Iterator[Loops]:
    subprocess.run(["modprobe", "loop"], check=False, capture_output=True)
    made = Loops(scratch)
    yield made
    made.close()


def export(cfs: ConfigFS, namespaces: dict[int, str]) -> dict[int, Path]:
    """Serve `namespaces` (nsid -> device_path) over nvme-tcp 127.0.0.1:4420, connect, return nsid -> /dev node."""
    state = parse_state({
        "hosts": [{"nqn": HOST}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                        "namespaces": [{"nsid": n, "device_path": p} for n, p in sorted(namespaces.items())]}],
        "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
                   "subsystems": [SUB]}],
    })
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
    hostside.connect("tcp", SUB, HOST, "127.0.0.1", "4420")
    return {n: hostside.namespace_device(SUB, n, "tcp") for n in namespaces}


def unexport(cfs: ConfigFS) -> None:
    """Disconnect and remove every namespace: a zvol or LV still served cannot be removed (zpool export hangs)."""
    hostside.disconnect(SUB)
    result = apply_state(TargetState(), cfs)
    assert result.converged, result.to_dict()


def write_direct(path: str | Path, data: bytes, offset: int = 0) -> None:
    import mmap

    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def device_size(path: str | Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def contains(path: str | Path, needle: bytes, chunk: int = 8 * MIB) -> bool:
    """Scan a whole raw device or file for `needle` (< 4 KiB), around the page cache; chunks overlap by 4 KiB."""
    assert len(needle) < 4096
    size = device_size(path)
    offset = 0
    while offset < size:
        data = hostside.direct_read(path, max(min(chunk + 4096, size - offset) // 4096 * 4096, 4096), offset)
        if needle in data:
            return True
        offset += chunk
    return False


def compressible(size: int) -> bytes:
    line = b"nvmetd compressible test data: the quick brown fox jumps over the lazy dog 0123456789\n"
    lines = b"".join(line.replace(b"0123456789", f"{i:010d}".encode()) for i in range(size // len(line) + 1))
    return lines[:size]


TOOLS = {"file": ["mkfs.ext4"], "lvm": ["lvcreate", "cryptsetup"], "zfs": ["zfs", "zpool"], "nullblk": []}
PoolFactory = Callable[..., tuple[Backend, list[str]]]


@pytest.fixture
def make_pool(nvmet_kernel: ConfigFS, scratch: Path, loops: Loops) -> Iterator[PoolFactory]:
    """make_pool(kind, **options) -> (backend, raw devices under it). Torn down with the nvmet tree cleared first."""
    made: list[Backend] = []
    mounts: list[Path] = []
    state = scratch / "state"

    def factory(kind: str, devices: int = 2, device_size: int = 128 * MIB, **options) -> tuple[Backend, list[str]]:
        need(*TOOLS[kind])
        name = f"t{kind}{len(made)}"
        raw: list[str] = []
        if kind == "file":
            dev = loops.make(f"{name}-fs", 256 * MIB)
            mnt = scratch / f"{name}-mnt"
            mnt.mkdir()
            subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=1,nodiscard", dev], check=True)
            subprocess.run(["mount", dev, str(mnt)], check=True)
            mounts.append(mnt)
            raw, pool_devices = [dev], [str(mnt / "pool")]
        elif kind == "nullblk":
            pool_devices = []
        else:
            raw = [loops.make(f"{name}-{i}", device_size) for i in range(devices)]
            pool_devices = raw
        backend = create_pool(kind, name, pool_devices, root=state, **options)
        made.append(backend)
        return backend, raw

    yield factory
    wipe()  # namespaces first: a served zvol makes zpool destroy hang
    for backend in reversed(made):
        try:
            destroy_pool(backend.name, root=state, force=True)
        except BackendError as exc:
            print(f"teardown: {exc}")
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], check=False)
