"""Guest RAM as sealed memfd regions at fixed guest-physical addresses, as QEMU's memfd backend does."""

from __future__ import annotations

import fcntl
import mmap
import os

from .._guest_c import ffi
from ..nvme_spec import PAGE_SIZE

F_ADD_SEALS = 1033
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004


class Region:
    def __init__(self, gpa: int, size: int) -> None:
        self.gpa = gpa
        self.size = size
        self.fd = os.memfd_create("vn-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, size)
        self.ptr = ffi.cast("uint8_t *", ffi.from_buffer(self.map))
        self._next = 0

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.gpa + self.size


class GuestMemory:
    def __init__(self, layout: list[tuple[int, int]]) -> None:
        self.regions = [Region(gpa, size) for gpa, size in layout]

    def _region(self, gpa: int, n: int = 1) -> Region:
        for r in self.regions:
            if r.contains(gpa, n):
                return r
        raise ValueError(f"guest address {gpa:#x}+{n} is not in guest memory")

    def alloc(self, nbytes: int, region: int = 0) -> int:
        """Page-aligned, zeroed; never freed (a test guest's lifetime is short)."""
        r = self.regions[region]
        pages = -(-nbytes // PAGE_SIZE)
        if r._next + pages * PAGE_SIZE > r.size:
            raise MemoryError(f"guest region {region} exhausted")
        gpa = r.gpa + r._next
        r._next += pages * PAGE_SIZE
        r.map[gpa - r.gpa:gpa - r.gpa + pages * PAGE_SIZE] = bytes(pages * PAGE_SIZE)
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        r = self._region(gpa, len(data))
        r.map[gpa - r.gpa:gpa - r.gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        r = self._region(gpa, n)
        return bytes(r.map[gpa - r.gpa:gpa - r.gpa + n])

    def ptr(self, gpa: int, n: int = 1):
        r = self._region(gpa, n)
        return r.ptr + (gpa - r.gpa)
