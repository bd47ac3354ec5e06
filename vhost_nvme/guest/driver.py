"""The guest driver: enables the controller through the protocol, creates queues, submits and reaps.

It checks everything the engine sends back (phase, SQ id, CID, SQ head), so tests fail on a protocol
violation even when the data happens to be right.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from .. import protocol as p
from .._guest_c import ffi, lib
from ..nvme_spec import PAGE_SIZE, AdminOpc, Cns, Fid, IoOpc, Reg
from .memory import GuestMemory

DEFAULT_LAYOUT = [(0x1000_0000, 48 << 20), (0x8_0000_0000, 16 << 20)]
CC_ENABLE = 1 | (6 << 16) | (4 << 20)  # EN, IOSQES 6, IOCQES 4, MPS 0, CSS NVM


class GuestDriverError(Exception):
    """The engine did something a correct controller must not do (or did not answer in time)."""


@dataclass
class Cqe:
    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # DW3[31:17]: SCT<<8 | SC, DNR at bit 14
    phase: int

    @property
    def code(self) -> int:
        return self.status & 0x7FF

    @property
    def dnr(self) -> bool:
        return bool(self.status & 0x4000)

    @classmethod
    def unpack(cls, raw: bytes) -> Cqe:
        dw0, dw1, dw2, dw3 = struct.unpack("<IIII", raw)
        return cls(dw0, dw1, dw2 & 0xFFFF, dw2 >> 16, dw3 & 0xFFFF, dw3 >> 17, (dw3 >> 16) & 1)


@dataclass
class IoQueue:
    qid: int
    size: int
    vector: int
    ien: bool
    sq_gpa: int
    cq_gpa: int
    vq: object  # struct vg_queue *
    outstanding: set[int] = field(default_factory=set)
    next_cid: int = 0
    completed: dict[int, Cqe] = field(default_factory=dict)

    def alloc_cid(self) -> int:
        for _ in range(65536):
            cid = self.next_cid
            self.next_cid = (self.next_cid + 1) & 0xFFFF
            if cid not in self.outstanding and cid != 0xFFFF:
                return cid
        raise GuestDriverError("no free command identifier")


def sqe(opc: int, cid: int = 0, nsid: int = 0, prp1: int = 0, prp2: int = 0, cdw10: int = 0, cdw11: int = 0,
        cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, flags: int = 0) -> bytes:
    return struct.pack("<BBHIIIQQQIIIIII", opc, flags, cid, nsid, 0, 0, 0, prp1, prp2,
                       cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)


class SocketChannel:
    """The engine's back-end: PROTOCOL.md messages on a Unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(socket_path)

    def call(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        p.send_msg(self.sock, req, payload, fds)
        msg = p.recv_msg(self.sock)
        if not msg.is_reply or msg.request != req:
            raise GuestDriverError(f"reply to {req:#x} came back as {msg.request:#x} flags {msg.flags:#x}")
        result, data = p.parse_reply(msg)
        if result < 0:
            name = p.Req(req).name if req in p.Req.__members__.values() else hex(req)
            raise OSError(-result, f"engine refused request {name}: {p.errno_name(result)}")
        return data

    def close(self) -> None:
        self.sock.close()


class GuestDriver:
    """A test guest on either back-end: `socket_path` (the engine) or `channel` (e.g. the kernel's
    KernelChannel), optionally bound to a subsystem as a host (`bind=(subsystem NQN, host NQN)`)."""

    def __init__(self, socket_path: str | None = None, layout: list[tuple[int, int]] | None = None,
                 timeout: float = 5.0, channel: SocketChannel | None = None,
                 bind: tuple[str, str] | None = None) -> None:
        self.timeout = timeout
        self.mem = GuestMemory(layout or DEFAULT_LAYOUT)
        if channel is None:
            if socket_path is None:
                raise ValueError("a GuestDriver needs a socket path or a channel")
            channel = SocketChannel(socket_path)
        self.channel = channel
        self.kick = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(64)]
        self.call: dict[int, int] = {}
        self.queues: dict[int, IoQueue] = {}
        self.dbbuf: tuple[int, int] | None = None
        try:
            self._bring_up(bind)
        except BaseException:
            # a refused bind must not leave the channel open: an open /dev/vhost-nvme pins the nvmet-vhost module
            # (and the engine's session) until this process exits
            self.close()
            raise

    def _bring_up(self, bind: tuple[str, str] | None) -> None:
        info = self.call_engine(p.Req.GET_INFO)
        (self.version, self.max_ns, self.features, self.max_ioq, self.mqes, self.max_vectors,
         self.mdts, _) = p.INFO.unpack(info)
        self.call_engine(p.Req.SET_FEATURES, p.U64.pack(self.features))
        self.call_engine(p.Req.SET_OWNER)
        if bind:
            self.call_engine(p.Req.BIND, p.BIND.pack(bind[0].encode(), bind[1].encode()))
        self._send_mem_table()
        self.mirror_fd = os.memfd_create("vn-db-mirror", os.MFD_CLOEXEC)
        os.ftruncate(self.mirror_fd, PAGE_SIZE)
        import mmap

        self.mirror = mmap.mmap(self.mirror_fd, PAGE_SIZE)
        self.mirror_ptr = ffi.cast("uint32_t *", ffi.from_buffer(self.mirror))
        self.call_engine(p.Req.SET_DB_MIRROR, p.DB_MIRROR.pack(0, PAGE_SIZE), [self.mirror_fd])
        for qid in range(64):
            self.call_engine(p.Req.SET_KICK, p.FD_SLOT.pack(qid, 0), [self.kick[qid]])
        self._ensure_vector(0)

    # ---- protocol --------------------------------------------------------------------------------
    def call_engine(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        return self.channel.call(req, payload, fds)

    def _send_mem_table(self) -> None:
        payload = p.MEM_TABLE_HEAD.pack(len(self.mem.regions), 0)
        for r in self.mem.regions:
            payload += p.MEM_REGION.pack(r.gpa, r.size, 0, 0)
        self.call_engine(p.Req.SET_MEM_TABLE, payload, [r.fd for r in self.mem.regions])

    def _ensure_vector(self, vector: int) -> int:
        if vector not in self.call:
            self.call[vector] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.call_engine(p.Req.SET_VECTOR_CALL, p.FD_SLOT.pack(vector, 0), [self.call[vector]])
        return self.call[vector]

    def reg_read(self, offset: int, size: int = 4) -> int:
        return p.U64.unpack(self.call_engine(p.Req.REG_READ, p.REG.pack(offset, size, 0)))[0]

    def reg_write(self, offset: int, value: int, size: int = 4) -> None:
        self.call_engine(p.Req.REG_WRITE, p.REG.pack(offset, size, value))

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.channel.close()
        mirror = getattr(self, "mirror_fd", None)
        for fd in [*self.kick, *self.call.values(), *([] if mirror is None else [mirror])]:
            os.close(fd)

    # ---- controller bring-up ---------------------------------------------------------------------
    def _new_vq(self, qid: int, size: int, sq_gpa: int, cq_gpa: int):
        vq = ffi.new("struct vg_queue *")
        vq.qid, vq.size, vq.phase = qid, size, 1
        vq.sq = self.mem.ptr(sq_gpa, size * 64)
        vq.cq = self.mem.ptr(cq_gpa, size * 16)
        vq.mirror_sq = self.mirror_ptr + qid * 2
        vq.mirror_cq = self.mirror_ptr + qid * 2 + 1
        vq.kick_fd = self.kick[qid]
        if self.dbbuf and qid:
            self._attach_shadow(vq)
        return vq

    def _attach_shadow(self, vq) -> None:
        shadow, ei = self.dbbuf  # type: ignore[misc]
        vq.shadow_sq = ffi.cast("uint32_t *", self.mem.ptr(shadow + vq.qid * 8))
        vq.shadow_cq = ffi.cast("uint32_t *", self.mem.ptr(shadow + vq.qid * 8 + 4))
        vq.ei_sq = ffi.cast("uint32_t *", self.mem.ptr(ei + vq.qid * 8))
        vq.ei_cq = ffi.cast("uint32_t *", self.mem.ptr(ei + vq.qid * 8 + 4))

    def enable(self, admin_size: int = 32) -> None:
        sq_gpa = self.mem.alloc(admin_size * 64)
        cq_gpa = self.mem.alloc(admin_size * 16)
        self.reg_write(Reg.AQA, (admin_size - 1) | ((admin_size - 1) << 16))
        self.reg_write(Reg.ASQ, sq_gpa, 8)
        self.reg_write(Reg.ACQ, cq_gpa, 8)
        self.reg_write(Reg.CC, CC_ENABLE)
        self._wait_csts(1, 1)
        self.queues[0] = IoQueue(0, admin_size, 0, True, sq_gpa, cq_gpa, self._new_vq(0, admin_size, sq_gpa,
                                                                                      cq_gpa))

    def disable(self) -> None:
        self.reg_write(Reg.CC, self.reg_read(Reg.CC) & ~1)
        self._wait_csts(1, 0)
        self.queues.clear()
        self.dbbuf = None

    def _wait_csts(self, mask: int, want: int) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            csts = self.reg_read(Reg.CSTS)
            if csts & 2:
                raise GuestDriverError(f"controller fatal status (CSTS={csts:#x})")
            if csts & mask == want:
                return csts
            if time.monotonic() > deadline:
                raise GuestDriverError(f"CSTS stuck at {csts:#x}")
            time.sleep(0.001)

    # ---- submission and completion ---------------------------------------------------------------
    def submit(self, qid: int, cmd: bytes, ring: bool = True) -> int:
        """Returns the CID assigned (the CID field of cmd is overwritten)."""
        q = self.queues[qid]
        cid = q.alloc_cid()
        raw = bytearray(cmd)
        struct.pack_into("<H", raw, 2, cid)
        if lib.vg_submit(q.vq, bytes(raw), int(ring)) < 0:
            raise GuestDriverError(f"SQ {qid} is full")
        q.outstanding.add(cid)
        return cid

    def ring(self, qid: int) -> None:
        lib.vg_ring_sq(self.queues[qid].vq)

    def reap(self, qid: int) -> list[Cqe]:
        q = self.queues[qid]
        buf = ffi.new("uint8_t[]", 64 * 16)
        out = []
        while True:
            n = lib.vg_reap(q.vq, buf, 64, 1)
            for i in range(n):
                cqe = Cqe.unpack(bytes(ffi.buffer(buf + i * 16, 16)))
                self._check(q, cqe)
                out.append(cqe)
            if n < 64:
                return out

    def _check(self, q: IoQueue, cqe: Cqe) -> None:
        if cqe.sqid != q.qid:
            raise GuestDriverError(f"CQE on CQ {q.qid} names SQ {cqe.sqid}")
        if cqe.sqhd >= q.size:
            raise GuestDriverError(f"CQE SQ head {cqe.sqhd} outside queue of {q.size}")
        if cqe.cid not in q.outstanding:
            raise GuestDriverError(f"CQE for CID {cqe.cid} that is not outstanding on SQ {q.qid}")
        q.outstanding.discard(cqe.cid)
        q.completed[cqe.cid] = cqe

    def wait(self, qid: int, cid: int) -> Cqe:
        q = self.queues[qid]
        deadline = time.monotonic() + self.timeout
        while cid not in q.completed:
            if not self.reap(qid) and cid not in q.completed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestDriverError(f"no completion for CID {cid} on queue {qid}")
                if q.ien:
                    fd = self.call[q.vector]
                    poller = select.poll()  # not select(): a host running many test guests has fds > 1024
                    poller.register(fd, select.POLLIN)
                    if poller.poll(min(left, 0.05) * 1000):
                        os.eventfd_read(fd)
                else:
                    time.sleep(0.0001)
        return q.completed.pop(cid)

    def wait_all(self, qid: int) -> list[Cqe]:
        q = self.queues[qid]
        deadline = time.monotonic() + self.timeout
        got: list[Cqe] = []
        while q.outstanding:
            got += self.reap(qid)
            if q.outstanding:
                if time.monotonic() > deadline:
                    raise GuestDriverError(f"{len(q.outstanding)} commands never completed on queue {qid}")
                time.sleep(0.0002)
        for c in got:
            q.completed.pop(c.cid, None)
        return got

    def run(self, qid: int, cmd: bytes) -> Cqe:
        return self.wait(qid, self.submit(qid, cmd))

    def admin(self, opc: int, **fields: int) -> Cqe:
        return self.run(0, sqe(opc, **fields))

    # ---- admin helpers ---------------------------------------------------------------------------
    def identify(self, cns: int, nsid: int = 0) -> tuple[Cqe, bytes]:
        buf = self.mem.alloc(PAGE_SIZE)
        self.mem.write(buf, b"\xa5" * PAGE_SIZE)  # so "left untouched" is detectable
        cqe = self.admin(AdminOpc.IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns)
        return cqe, self.mem.read(buf, PAGE_SIZE)

    def lba_size(self, nsid: int) -> int:
        """The namespace's LBA size in bytes (Identify Namespace: FLBAS selects an LBA format, LBADS its size)."""
        cqe, data = self.identify(Cns.NAMESPACE, nsid=nsid)
        if cqe.status:
            raise GuestDriverError(f"Identify Namespace {nsid} failed with status {cqe.status:#x}")
        return 1 << data[128 + 4 * (data[26] & 0xF) + 2]

    def get_log(self, lid: int, nbytes: int, nsid: int = 0xFFFFFFFF, offset: int = 0,
                rae: bool = False) -> tuple[Cqe, bytes]:
        buf = self.mem.alloc(nbytes)
        prp1, prp2 = self.prps(buf, nbytes)
        numd = nbytes // 4 - 1
        cqe = self.admin(AdminOpc.GET_LOG_PAGE, nsid=nsid, prp1=prp1, prp2=prp2,
                         cdw10=lid | (int(rae) << 15) | ((numd & 0xFFFF) << 16), cdw11=numd >> 16,
                         cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)
        return cqe, self.mem.read(buf, nbytes)

    def set_num_queues(self, n: int) -> Cqe:
        return self.admin(AdminOpc.SET_FEATURES, cdw10=Fid.NUM_QUEUES, cdw11=(n - 1) | ((n - 1) << 16))

    def create_io_queue(self, qid: int, size: int = 64, vector: int | None = None, ien: bool = True,
                        region: int = 0) -> IoQueue:
        vector = qid if vector is None else vector
        self._ensure_vector(vector)
        cq_gpa = self.mem.alloc(size * 16, region)
        sq_gpa = self.mem.alloc(size * 64, region)
        cqe = self.admin(AdminOpc.CREATE_CQ, prp1=cq_gpa, cdw10=qid | ((size - 1) << 16),
                         cdw11=1 | (int(ien) << 1) | (vector << 16))
        if cqe.status:
            raise GuestDriverError(f"Create I/O CQ {qid} failed with status {cqe.status:#x}")
        cqe = self.admin(AdminOpc.CREATE_SQ, prp1=sq_gpa, cdw10=qid | ((size - 1) << 16),
                         cdw11=1 | (qid << 16))
        if cqe.status:
            raise GuestDriverError(f"Create I/O SQ {qid} failed with status {cqe.status:#x}")
        q = IoQueue(qid, size, vector, ien, sq_gpa, cq_gpa, self._new_vq(qid, size, sq_gpa, cq_gpa))
        self.queues[qid] = q
        return q

    def delete_io_queue(self, qid: int) -> None:
        for opc in (AdminOpc.DELETE_SQ, AdminOpc.DELETE_CQ):
            cqe = self.admin(opc, cdw10=qid)
            if cqe.status:
                raise GuestDriverError(f"delete queue {qid} (opcode {opc:#x}) failed: {cqe.status:#x}")
        del self.queues[qid]

    def enable_dbbuf(self) -> Cqe:
        """Linux's order: queues first, then Doorbell Buffer Config with zeroed buffers."""
        shadow, ei = self.mem.alloc(PAGE_SIZE), self.mem.alloc(PAGE_SIZE)
        cqe = self.admin(AdminOpc.DBBUF_CONFIG, prp1=shadow, prp2=ei)
        if cqe.status == 0:
            self.dbbuf = (shadow, ei)
            for qid, q in self.queues.items():
                if qid:
                    self._attach_shadow(q.vq)
        return cqe

    def traps(self) -> int:
        return sum(q.vq.traps for q in self.queues.values())

    # ---- I/O helpers -----------------------------------------------------------------------------
    def scratch(self) -> tuple[int, int]:
        """One reusable data buffer (MDTS-sized) and PRP list page for the synchronous helpers."""
        if not hasattr(self, "_scratch"):
            self._scratch = (self.mem.alloc(PAGE_SIZE << self.mdts), self.mem.alloc(PAGE_SIZE))
        return self._scratch

    def prps(self, gpa: int, nbytes: int, pages: list[int] | None = None,
             list_page: int | None = None) -> tuple[int, int]:
        """PRP1/PRP2 for a buffer: contiguous from gpa, or the given page list (first may have an offset)."""
        if pages is None:
            first = gpa
            n_rest = max(0, -(-(nbytes - (PAGE_SIZE - gpa % PAGE_SIZE)) // PAGE_SIZE))
            base = gpa - gpa % PAGE_SIZE
            pages = [first] + [base + PAGE_SIZE * (i + 1) for i in range(n_rest)]
        if len(pages) == 1:
            return pages[0], 0
        if len(pages) == 2:
            return pages[0], pages[1]
        if list_page is not None:
            self.mem.write(list_page, struct.pack(f"<{len(pages) - 1}Q", *pages[1:]))
            return pages[0], list_page
        return pages[0], self.build_prp_list(pages[1:])

    def build_prp_list(self, entries: list[int], first_page_entries: int = PAGE_SIZE // 8) -> int:
        """A PRP list; the first list may start at an offset so only first_page_entries fit, which forces
        the chain pointer (later list pages always start page aligned, as the spec requires)."""
        cap = first_page_entries
        chunks = []
        rest = list(entries)
        while rest:
            if len(rest) <= cap:
                chunks.append(rest)
                rest = []
            else:
                chunks.append(rest[: cap - 1])
                rest = rest[cap - 1:]
            cap = PAGE_SIZE // 8
        pages = [self.mem.alloc(PAGE_SIZE) for _ in chunks]
        pages[0] += PAGE_SIZE - first_page_entries * 8
        for i, chunk in enumerate(chunks):
            ents = list(chunk) + ([pages[i + 1]] if i + 1 < len(chunks) else [])
            self.mem.write(pages[i], struct.pack(f"<{len(ents)}Q", *ents))
        return pages[0]

    def write(self, qid: int, nsid: int, slba: int, data: bytes, lba_size: int = 512,
              fua: bool = False) -> Cqe:
        buf, lst = self.scratch()
        self.mem.write(buf, data)
        prp1, prp2 = self.prps(buf, len(data), list_page=lst)
        nlb = len(data) // lba_size
        return self.run(qid, sqe(IoOpc.WRITE, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                                 cdw11=slba >> 32, cdw12=(nlb - 1) | (int(fua) << 30)))

    def read(self, qid: int, nsid: int, slba: int, nlb: int, lba_size: int = 512) -> tuple[Cqe, bytes]:
        n = nlb * lba_size
        buf, lst = self.scratch()
        self.mem.write(buf, b"\x5a" * n)
        prp1, prp2 = self.prps(buf, n, list_page=lst)
        cqe = self.run(qid, sqe(IoOpc.READ, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                                cdw11=slba >> 32, cdw12=nlb - 1))
        return cqe, self.mem.read(buf, n)


__all__ = ["Cns", "Cqe", "GuestDriver", "GuestDriverError", "IoQueue", "sqe"]
