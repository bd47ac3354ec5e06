"""Namespaces: what backs each NSID and the per-namespace facts Identify reports."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import uuid
from dataclasses import dataclass

from .topology import Topology, topology_for_fd

BLKGETSIZE64 = 0x80081272
NS_UUID_ROOT = uuid.UUID("6f0e4a8e-3c1b-5d57-9a7e-7668686e766d")


class NamespaceError(Exception):
    """A namespace cannot be created from what was given (user error, reported without a traceback)."""


class Kind:
    FILE = 0
    BLOCK = 1
    NULL = 2


@dataclass
class Namespace:
    nsid: int
    kind: int
    fd: int  # -1 for the null namespace; owned by this object
    lba_size: int
    nblocks: int
    readonly: bool
    topology: Topology
    name: str
    iops_limit: int = 0
    bps_limit: int = 0

    @property
    def lba_shift(self) -> int:
        return self.lba_size.bit_length() - 1

    @property
    def uuid(self) -> uuid.UUID:
        """Stable across engine restarts for the same backing name and NSID."""
        return uuid.uuid5(NS_UUID_ROOT, f"{self.name}#{self.nsid}")

    def used_blocks(self) -> int:
        if self.kind != Kind.FILE:
            return self.nblocks
        return min(self.nblocks, (os.fstat(self.fd).st_blocks * 512) // self.lba_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_lba_size(lba_size: int) -> None:
    if lba_size not in (512, 1024, 2048, 4096):
        raise NamespaceError(f"LBA size {lba_size} is not one of 512, 1024, 2048, 4096")


def namespace_from_fd(nsid: int, fd: int, name: str, readonly: bool = False, lba_size: int = 0) -> Namespace:
    """Take ownership of fd (a regular file or block device)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        topo = topology_for_fd(fd)
        kind = Kind.BLOCK
        lba = topo.logical_block
        if lba_size and lba_size != lba:
            raise NamespaceError(f"{name}: block device logical block is {lba}, cannot expose {lba_size}")
    elif stat.S_ISREG(st.st_mode):
        lba = lba_size or 512
        _check_lba_size(lba)
        topo = topology_for_fd(fd, lba)
        size = st.st_size
        kind = Kind.FILE
    else:
        raise NamespaceError(f"{name}: not a regular file or block device")
    _check_lba_size(lba)
    if size < lba:
        raise NamespaceError(f"{name}: size {size} is smaller than one {lba}-byte block")
    return Namespace(nsid, kind, fd, lba, size // lba, readonly, topo, name)


def open_namespace(nsid: int, path: str, readonly: bool = False, lba_size: int = 0) -> Namespace:
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(f"cannot open {path}: {exc.strerror}") from None
    try:
        return namespace_from_fd(nsid, fd, path, readonly, lba_size)
    except Exception:
        os.close(fd)
        raise


def null_namespace(nsid: int, size_bytes: int, lba_size: int = 4096) -> Namespace:
    """Like null_blk: completes I/O without touching data; measures the engine, not storage."""
    _check_lba_size(lba_size)
    if size_bytes < lba_size:
        raise NamespaceError("null namespace size must be at least one block")
    topo = Topology(lba_size, lba_size, 0, 0, False)
    return Namespace(nsid, Kind.NULL, -1, lba_size, size_bytes // lba_size, False, topo, f"null{nsid}")
