"""The vhost-nvme control protocol (see PROTOCOL.md): framing, message numbers and payload layouts.

Everything a QEMU device or a kernel module must mirror is defined here once; the engine server and the
guest driver both use these helpers, so the documented layouts are the executed ones.
"""

from __future__ import annotations

import array
import contextlib
import errno
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum

VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
HEADER = struct.Struct("<III")  # request, flags, size
REPLY_HEAD = struct.Struct("<iI")  # result (0 or -errno), reserved
MAX_PAYLOAD = 4096
MAX_FDS = 8


class Req(IntEnum):
    SET_OWNER = 0x01  # = VHOST_SET_OWNER nr
    SET_MEM_TABLE = 0x03  # = VHOST_SET_MEM_TABLE nr
    GET_INFO = 0x45
    SET_FEATURES = 0x46
    BIND = 0x47
    SET_DB_MIRROR = 0x48
    SET_KICK = 0x49
    SET_VECTOR_CALL = 0x4A
    REG_READ = 0x4B
    REG_WRITE = 0x4C
    RESET = 0x4D
    SET_EVENT_FD = 0x4E
    GET_EVENT = 0x4F
    NS_ATTACH = 0x50
    NS_DETACH = 0x51
    NS_SET_LIMITS = 0x52
    GET_STATS = 0x53
    NS_LIST = 0x54


class Feature(IntEnum):
    DBBUF = 1 << 0  # engine executes Doorbell Buffer Config itself
    DB_MIRROR = 1 << 1  # doorbell values come through the mirror page
    KICK_PER_QID = 1 << 2
    CALL_PER_VECTOR = 1 << 3
    NS_FD = 1 << 4  # NS_ATTACH carries the backing fd
    EVENTS = 1 << 5


ALL_FEATURES = int(
    Feature.DBBUF | Feature.DB_MIRROR | Feature.KICK_PER_QID | Feature.CALL_PER_VECTOR | Feature.NS_FD
    | Feature.EVENTS
)


class ResetKind(IntEnum):
    CONTROLLER = 0  # FLR / PCI reset: as CC.EN 1->0, and registers to power-on values
    STOP = 1  # VM stop: quiesce, complete in-flight I/O, process nothing new
    START = 2  # resume after STOP


class Event(IntEnum):
    DBBUF_ON = 1
    QUEUE_CREATED = 2
    QUEUE_DELETED = 3
    FATAL = 4
    NS_CHANGED = 5
    READY = 6  # CSTS.RDY changed; data = new CSTS


KICK_ALL_IO = 0xFFFFFFFF
NO_FD = -1

# payload layouts
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # gpa, size, front-end VA (informational), mmap_offset
INFO = struct.Struct("<IIQHHHBB")  # version, max_ns, features, max_ioq, mqes, max_vectors, mdts, rsvd
U64 = struct.Struct("<Q")
BIND = struct.Struct("<256s256s")
DB_MIRROR = struct.Struct("<QQ")  # mmap_offset, size (4096)
FD_SLOT = struct.Struct("<II")  # qid or vector, flags
REG = struct.Struct("<IIQ")  # offset, size, value
RESET = struct.Struct("<II")  # kind, reserved
EVENT = struct.Struct("<IIQ")  # type, id (qid/nsid), data
NS_ATTACH = struct.Struct("<IIQIIQQi256s")
# nsid, flags, null_size, lba_size, policy, iops, bps, fd (kernel form; -1 on the socket), name
NS_FLAG_READONLY = 1 << 0
NS_FLAG_NULL = 1 << 1
NS_ID = struct.Struct("<II")  # nsid, reserved
NS_LIMITS = struct.Struct("<IIQQ")  # nsid, reserved, iops, bps
STATS = struct.Struct("<QQQQQQQ")  # cqes, signals, kicks, sleeps, polls, invalid_doorbells, poll_window_ns
STATS_V1 = struct.Struct("<QQQQQQ")  # the same without poll_window_ns (engines before the adaptive window)
NS_LIST_HEAD = struct.Struct("<II")  # count, reserved
NS_ENTRY = struct.Struct("<IIQ96s")  # nsid, flags (NS_FLAG_*), size in bytes, name (NUL padded, truncated)


class ProtocolError(Exception):
    """The peer sent something this protocol version does not allow."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def send_msg(sock: socket.socket, request: int, payload: bytes = b"", fds: list[int] | None = None,
             reply: bool = False) -> None:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = VERSION | (FLAG_REPLY if reply else 0)
    data = HEADER.pack(request, flags, len(payload)) + payload
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> Message:
    """Receive one message; fds may only ride on the header's first bytes (as vhost-user)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    if not data:
        raise ConnectionError("peer closed the connection")
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if len(data) < HEADER.size:
        data += _recv_exact(sock, HEADER.size - len(data))
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        for fd in fds:
            _close(fd)
        raise ProtocolError(f"unsupported protocol version {flags & FLAG_VERSION_MASK}")
    if size > MAX_PAYLOAD:
        for fd in fds:
            _close(fd)
        raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD}")
    payload = _recv_exact(sock, size) if size else b""
    return Message(request, flags, payload, list(fds))


def _close(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)


def reply_payload(result: int, data: bytes = b"") -> bytes:
    return REPLY_HEAD.pack(result, 0) + data


def parse_reply(msg: Message) -> tuple[int, bytes]:
    if len(msg.payload) < REPLY_HEAD.size:
        raise ProtocolError("short reply")
    result, _ = REPLY_HEAD.unpack_from(msg.payload)
    return result, msg.payload[REPLY_HEAD.size:]


def errno_name(result: int) -> str:
    return errno.errorcode.get(-result, str(result))
