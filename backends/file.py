"""Volumes as files: sparse (thin) or fully allocated (thick), the default that needs nothing installed.

nvmet serves a regular file directly as a namespace. Snapshots and clones are copies that share blocks where the
filesystem can reflink (btrfs, XFS) and are sparse full copies elsewhere: correct everywhere, instant on some.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backends.base import Backend, Record
from backends.errors import BackendError
from backends.run import run

SNAPSHOT_DIR = ".snapshots"


class FileBackend(Backend):
    kind = "file"

    @classmethod
    def make_pool(cls, name: str, devices: list[str], options: dict[str, Any]) -> dict[str, Any]:
        if len(devices) != 1:
            raise BackendError("a file pool takes exactly one directory (on a real filesystem or tmpfs)")
        root = Path(devices[0])
        if not root.is_absolute():
            raise BackendError(f"file pool directory {root} must be an absolute path")
        (root / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)  # volume files hold tenants' data
        capacity = options.get("capacity")
        return {"root": str(root), "capacity": int(capacity) if capacity else None}

    @property
    def root(self) -> Path:
        return Path(self.config["root"])

    def remove_pool(self) -> None:
        for leftover in (self.root / SNAPSHOT_DIR).iterdir():
            leftover.unlink()
        (self.root / SNAPSHOT_DIR).rmdir()

    def pool_usage(self) -> tuple[int, int, float]:
        capacity = self.config.get("capacity")
        if capacity:
            used = sum(p.stat().st_blocks * 512 for p in [*self.root.glob("*.img"),
                                                          *(self.root / SNAPSHOT_DIR).glob("*.img")])
            size = capacity
        else:
            st = os.statvfs(self.root)
            size, used = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bavail) * st.f_frsize
        return size, used, 100.0 * used / size if size else 100.0

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.img"

    def _snap_path(self, name: str, snap: str) -> Path:
        return self.root / SNAPSHOT_DIR / f"{name}@{snap}.img"

    def _make(self, vol: Record, backing_bytes: int) -> None:
        path = self._path(vol["name"])
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise BackendError(f"{path} exists but the ledger does not know it: run recovery or remove it") from None
        try:
            _truncate(fd, backing_bytes, path)
            if not vol["thin"]:
                _allocate(fd, 0, backing_bytes, path)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _destroy(self, vol: Record) -> None:
        path = self._path(vol["name"])
        if path.exists():
            # a filesystem mounted without online discard frees the blocks with the data still in them, and the
            # next tenant's file (or anyone reading the device) gets them: overwrite the data first
            _zero_data(path)
            # give the blocks back (and discard them where the filesystem passes discards down) before unlinking
            run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(max(path.stat().st_size, 1)),
                 str(path)], check=False)
            path.unlink()

    def _resize(self, vol: Record, backing_bytes: int) -> None:
        path = self._path(vol["name"])
        fd = os.open(path, os.O_RDWR)
        try:
            old = os.fstat(fd).st_size
            _truncate(fd, backing_bytes, path)
            if not vol["thin"] and backing_bytes > old:
                _allocate(fd, old, backing_bytes - old, path)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _snapshot(self, vol: Record, snap: str) -> None:
        dst = self._snap_path(vol["name"], snap)
        _copy(self._path(vol["name"]), dst)
        os.chmod(dst, 0o400)

    def _destroy_snapshot(self, vol: Record, snap: str) -> None:
        self._snap_path(vol["name"], snap).unlink(missing_ok=True)

    def _clone(self, origin: Record, snap: str, vol: Record) -> None:
        dst = self._path(vol["name"])
        if dst.exists():
            raise BackendError(f"{dst} exists but the ledger does not know it: run recovery or remove it")
        _copy(self._snap_path(origin["name"], snap), dst)
        os.chmod(dst, 0o600)
        if not vol["thin"]:
            fd = os.open(dst, os.O_RDWR)
            try:
                _allocate(fd, 0, os.fstat(fd).st_size, dst)
            finally:
                os.close(fd)

    def _raw_device(self, vol: Record) -> str:
        return str(self._path(vol["name"]))

    def _usage(self, vol: Record) -> tuple[int, float]:
        try:
            return self._path(vol["name"]).stat().st_blocks * 512, 1.0
        except FileNotFoundError:
            return 0, 1.0


def _truncate(fd: int, size: int, path: Path) -> None:
    """The filesystem's own limit (EFBIG: ext4 stops at 16 TiB) is a refusal with a reason, not a crash."""
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as exc:
        raise BackendError(f"cannot make {path} {size} bytes long: {getattr(exc, 'strerror', None) or exc}") from None


def _allocate(fd: int, offset: int, length: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        raise BackendError(f"cannot allocate {length} bytes for {path}: {exc.strerror}") from None


def _zero_data(path: Path, chunk: int = 1 << 20) -> None:
    """Overwrite every data range of the file with zeros, in place, and make it durable.

    Only the ranges SEEK_DATA finds (a sparse file costs what it holds). In place is what ext4 and XFS do for a
    plain overwrite; a copy-on-write filesystem (btrfs, reflinked XFS) writes elsewhere, and there only discard
    (mount -o discard, or fstrim) reaches the old blocks."""
    zeros = bytes(chunk)
    fd = os.open(path, os.O_WRONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            while start < end:
                start += os.pwrite(fd, zeros[:min(chunk, end - start)], start)
            offset = end
        os.fsync(fd)
    except OSError as exc:
        raise BackendError(f"cannot zero {path} before deleting it: {exc.strerror}") from None
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path) -> None:
    run(["cp", "--reflink=auto", "--sparse=always", "--no-preserve=all", str(src), str(dst)])
