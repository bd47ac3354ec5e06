"""The disks the benchmark exports: made here until the project's backend registry (backends/) can make them.

THE SEAM: `provision(backend, name, size, workdir)` is the only place the harness asks for a disk, and `Disk` is
all it keeps. When backends/ has a registry, `provision` looks the name up there first and wraps what it returns in
a `Disk`; nothing else in the harness changes. The three kinds here cover the cheap, dependency-free cases:

- `file`:    a sparse file on tmpfs, exported as an nvmet *file* namespace (the kernel's vfs path).
- `loop`:    the same file behind a loop device, exported as a *block* namespace (the bio path).
- `nullblk`: a memory-backed null_blk device (configfs), a block device with almost no cost of its own, so what is
             left is the cost of the path. Memory-backed, so data survives and the integrity jobs can check it.

Backing files belong on tmpfs: on the rig's overlay root a file namespace is broken (kernel-rig.md).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NULLB_ROOT = Path("/sys/kernel/config/nullb")


class DiskError(Exception):
    """A disk could not be made (missing module, no loop device, no memory): says what to do."""


@dataclass
class Disk:
    backend: str
    device_path: str  # what nvmet exports and what the baseline runs fio on
    size: int
    backing_path: str  # the bytes behind device_path: where a corruption test writes garbage
    cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def destroy(self) -> None:
        """Undo creation in reverse order; every step runs even if one fails."""
        errors = []
        while self.cleanup:
            try:
                self.cleanup.pop()()
            except (OSError, subprocess.CalledProcessError) as exc:
                errors.append(str(exc))
        if errors:
            raise DiskError(f"cleaning up {self.device_path}: {'; '.join(errors)}")


def _run(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except FileNotFoundError:
        raise DiskError(f"{argv[0]} is not installed: run `make setup`") from None
    except subprocess.CalledProcessError as exc:
        raise DiskError(f"{' '.join(argv)} failed: {exc.stderr.strip()}") from None


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def file_disk(name: str, size: int, workdir: Path) -> Disk:
    path = _sparse_file(workdir / f"{name}.img", size)
    return Disk("file", str(path), size, str(path), [lambda: path.unlink(missing_ok=True)])


def loop_disk(name: str, size: int, workdir: Path) -> Disk:
    path = _sparse_file(workdir / f"{name}.img", size)
    disk = Disk("loop", "", size, str(path), [lambda: path.unlink(missing_ok=True)])
    subprocess.run(["modprobe", "-q", "loop"], check=False, capture_output=True)
    dev = _run("losetup", "--find", "--show", str(path))
    disk.cleanup.append(lambda: _run("losetup", "--detach", dev) and None)
    disk.device_path = dev
    return disk


def nullblk_disk(name: str, size: int, workdir: Path) -> Disk:
    # nr_devices=0: loading it plainly would also create a nullb0 nobody asked for
    subprocess.run(["modprobe", "-q", "null_blk", "nr_devices=0"], check=False, capture_output=True)
    if not NULLB_ROOT.is_dir():
        raise DiskError(f"{NULLB_ROOT} is missing: this kernel has no null_blk with configfs (modprobe null_blk)")
    node = NULLB_ROOT / name  # the configfs name becomes the disk name: /dev/<name>
    try:
        node.mkdir()
    except FileExistsError:
        raise DiskError(f"null_blk device {name} already exists (left by an earlier run?): "
                        f"echo 0 > {node}/power; rmdir {node}") from None
    disk = Disk("nullblk", f"/dev/{name}", size, f"/dev/{name}", [node.rmdir])
    for attr, value in (("size", str(max(1, size >> 20))), ("memory_backed", "1"), ("discard", "1"),
                        ("power", "1")):
        try:
            (node / attr).write_text(value)
        except OSError as exc:
            disk.destroy()
            raise DiskError(f"null_blk {name}: cannot set {attr}={value}: {exc.strerror}") from None
    disk.cleanup.append(lambda: (node / "power").write_text("0") and None)
    if not _wait_for(Path(disk.device_path)):
        disk.destroy()
        raise DiskError(f"null_blk {name} was created but {disk.device_path} did not appear")
    return disk


def _wait_for(path: Path, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


PROVISIONERS: dict[str, Callable[[str, int, Path], Disk]] = {
    "file": file_disk,
    "loop": loop_disk,
    "nullblk": nullblk_disk,
}


def provision(backend: str, name: str, size: int, workdir: Path) -> Disk:
    """Make a disk of `size` bytes. The one seam where backends/ plugs in (see the module docstring)."""
    maker = PROVISIONERS.get(backend)
    if maker is None:
        raise DiskError(f"unknown backend {backend!r} (known: {', '.join(PROVISIONERS)})")
    return maker(name, size, workdir)


def write_behind(disk: Disk, offset: int, data: bytes) -> None:
    """Write straight into the backing store, past nvmet: what a corruption test (or a bad disk) does."""
    _behind(disk, offset, len(data), lambda buf: data)


def read_behind(disk: Disk, offset: int, length: int) -> bytes:
    got: list[bytes] = []
    _behind(disk, offset, length, lambda buf: got.append(bytes(buf)) or None)
    return got[0]


def _behind(disk: Disk, offset: int, length: int, change: Callable[[memoryview], bytes | None]) -> None:
    """Read [offset, offset+length) of the backing store, let `change` replace it, write it back if it did.

    Block devices go through O_DIRECT in whole 4 KiB blocks, so no page cache sits between this and nvmet's bios;
    a file on tmpfs has only its page cache, which nvmet's file namespace reads too.
    """
    import mmap

    path = disk.backing_path
    block = stat.S_ISBLK(os.stat(path).st_mode)
    start = offset - offset % 4096 if block else offset
    end = -(-(offset + length) // 4096) * 4096 if block else offset + length
    buf = mmap.mmap(-1, end - start)
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if block else 0))
    try:
        os.preadv(fd, [buf], start)
        view = memoryview(buf)[offset - start:offset - start + length]
        new = change(view)
        if new is not None:
            if len(new) != length:
                raise ValueError("a change must keep the length")
            view[:] = new
            os.pwritev(fd, [buf], start)
            os.fsync(fd)
        view.release()
    finally:
        os.close(fd)
