"""PROTOCOL.md over `/dev/vhost-nvme`: the kernel back-end takes the same requests as ioctls.

The request numbers are the ioctl numbers (magic 0xAF) and the payloads are the kernel structs, except where the
socket form carries a file descriptor: the kernel form has the fd in the struct, and memory is named by an address
in the caller's address space instead of an fd + offset. This channel maps those fds itself (MAP_SHARED, so the
same pages the front-end uses), which keeps every front-end byte-for-byte the same for both back-ends.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from pathlib import Path

from . import protocol as p

DEVICE = Path("/dev/vhost-nvme")
MAGIC = 0xAF

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (MAGIC << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


VHOST_MEMORY_HEAD = struct.Struct("<II")  # struct vhost_memory: nregions, padding (+ regions)
VHOST_MEMORY_REGION = struct.Struct("<QQQQ")  # gpa, size, userspace_addr, flags_padding
FD_SLOT = struct.Struct("<Ii")  # index, fd
S32 = struct.Struct("<i")

IOCTL = {
    p.Req.SET_OWNER: _io(0x01),
    p.Req.SET_MEM_TABLE: _iow(0x03, VHOST_MEMORY_HEAD.size),
    p.Req.GET_INFO: _ior(0x45, p.INFO.size),
    p.Req.SET_FEATURES: _iow(0x46, 8),
    p.Req.BIND: _iow(0x47, p.BIND.size),
    p.Req.SET_DB_MIRROR: _iow(0x48, 16),
    p.Req.SET_KICK: _iow(0x49, FD_SLOT.size),
    p.Req.SET_VECTOR_CALL: _iow(0x4A, FD_SLOT.size),
    p.Req.REG_READ: _iowr(0x4B, p.REG.size),
    p.Req.REG_WRITE: _iow(0x4C, p.REG.size),
    p.Req.RESET: _iow(0x4D, p.RESET.size),
    p.Req.SET_EVENT_FD: _iow(0x4E, S32.size),
    p.Req.GET_EVENT: _ior(0x4F, p.EVENT.size),
    p.Req.GET_STATS: _ior(0x53, p.STATS.size),
}
_READS = {p.Req.GET_INFO: p.INFO.size, p.Req.GET_EVENT: p.EVENT.size, p.Req.GET_STATS: p.STATS.size}


def available(device: Path = DEVICE) -> bool:
    return device.exists()


class KernelChannel:
    """One open `/dev/vhost-nvme`: one controller, alive while the file is open (and owned by this process)."""

    def __init__(self, device: Path | str = DEVICE) -> None:
        self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        self._maps: list[mmap.mmap] = []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for m in self._maps:
            m.close()
        self._maps.clear()

    def _map(self, fd: int, offset: int, size: int) -> int:
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return ctypes.addressof(ctypes.c_char.from_buffer(m))

    def _payload(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        """The socket form's payload rewritten as the kernel struct."""
        if req == p.Req.SET_MEM_TABLE:
            n, _ = p.MEM_TABLE_HEAD.unpack_from(payload)
            if n != len(fds):
                raise OSError(errno.EBADF, "SET_MEM_TABLE needs one fd per region")
            out = VHOST_MEMORY_HEAD.pack(n, 0)
            for i in range(n):
                at = p.MEM_TABLE_HEAD.size + i * p.MEM_REGION.size
                gpa, size, _va, offset = p.MEM_REGION.unpack_from(payload, at)
                out += VHOST_MEMORY_REGION.pack(gpa, size, self._map(fds[i], offset, size), 0)
            return out
        if req == p.Req.SET_DB_MIRROR:
            offset, size = p.DB_MIRROR.unpack(payload)
            if len(fds) != 1:
                raise OSError(errno.EBADF, "SET_DB_MIRROR needs the mirror page's fd")
            return struct.pack("<QQ", self._map(fds[0], offset, size), size)
        if req in (p.Req.SET_KICK, p.Req.SET_VECTOR_CALL):
            index, _flags = p.FD_SLOT.unpack(payload)
            return FD_SLOT.pack(index, fds[0] if fds else p.NO_FD)
        if req == p.Req.SET_EVENT_FD:
            return S32.pack(fds[0] if fds else p.NO_FD)
        return payload

    def call(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """Like a socket round trip: the reply data on success, OSError(errno) on refusal."""
        number = IOCTL.get(req)
        if number is None:
            raise OSError(errno.ENOSYS, f"the kernel back-end has no request {req:#x}")
        arg = bytearray(_READS[req]) if req in _READS else bytearray(self._payload(req, payload, fds or []))
        if not arg:
            fcntl.ioctl(self.fd, number, 0)
            return b""
        # a mutable buffer is passed as a pointer, whatever its size (struct vhost_memory is variable-sized)
        fcntl.ioctl(self.fd, number, arg, True)
        if req == p.Req.REG_READ:
            return p.U64.pack(p.REG.unpack(bytes(arg))[2])
        return bytes(arg) if req in _READS else b""
