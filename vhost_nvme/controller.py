"""The NVMe controller model: register file, admin queue, features, logs and asynchronous events.

The engine owns the whole controller (PROTOCOL.md, R1): the front-end forwards register accesses and
doorbells and wires memory and interrupts.  Admin commands are rare, so they are executed here in Python;
I/O queues are processed by the C workers, which this class configures only while they are paused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ._engine_c import ffi, lib
from .identify import (
    ControllerIdentity,
    active_ns_list,
    identify_controller,
    identify_namespace,
    ns_descriptor_list,
)
from .namespace import Namespace
from .nvme_spec import (
    AEC_NS_ATTR,
    AEN_NS_CHANGED,
    DNR,
    ERR_LOG_ENTRIES,
    MAX_NS,
    MAX_QID,
    MAX_VECTORS,
    MQES,
    NVME_VERSION,
    PAGE_SIZE,
    AdminOpc,
    Cns,
    Fid,
    Lid,
    Reg,
    Status,
)
from .protocol import Event, ResetKind

log = logging.getLogger(__name__)

SQE = struct.Struct("<BBHIIIQQQIIIIII")
CAP = MQES | (1 << 16) | (0x0F << 24) | (1 << 37)  # MQES, CQR, TO 7.5 s, CSS NVM; DSTRD/MPS 0
CC_EN = 1
CSTS_RDY = 1
CSTS_CFS = 1 << 1
CSTS_SHST_DONE = 2 << 2
POLICIES = {"auto": 0, "psync": 1, "uring": 2}


def serial_for(name: str) -> str:
    """The controller's serial number: derived from its name only, so it is stable across engine restarts
    (a front-end that reconnects, or a guest that resets, finds the same controller)."""
    return f"VN{int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10**12:012d}"


class EngineError(Exception):
    """The engine cannot do what was asked (reported to users without a traceback)."""


@dataclass
class Command:
    opc: int
    flags: int
    cid: int
    nsid: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def parse(cls, raw: bytes) -> Command:
        f = SQE.unpack(raw)
        return cls(f[0], f[1], f[2], f[3], f[7], f[8], *f[9:15])


def _err(status: int) -> tuple[int, int]:
    return status | DNR, 0


class Controller:
    def __init__(self, name: str, workers: int = 1, poll_us: int = 200, policy: str = "auto",
                 dbbuf: bool = True, poll_adaptive: bool = True) -> None:
        """dbbuf=False: do not advertise Doorbell Buffer Config (OACS bit 8) and reject opcode 0x7C, so a
        guest rings every doorbell through the front-end (the baseline for measuring shadow doorbells).

        poll_us caps the workers' busy-poll window, which adapts to the guest's submission gaps (a guest
        slower than the window would otherwise trap on every command); poll_adaptive=False fixes the
        window at poll_us instead."""
        if poll_us < 0:
            raise EngineError(f"poll time must not be negative, got {poll_us} us")
        if policy not in POLICIES:
            raise EngineError(f"unknown submission policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.name = name
        self.policy = policy
        self.dbbuf = dbbuf
        self._c = lib.vn_ctrl_new(workers, poll_us)
        if self._c == ffi.NULL:
            raise EngineError(f"cannot create engine controller (workers must be 1..8, got {workers})")
        lib.vn_ctrl_set_poll(self._c, poll_us, int(poll_adaptive))  # workers start paused: safe
        rc = lib.vn_ctrl_start(self._c)
        if rc < 0:
            lib.vn_ctrl_free(self._c)
            raise EngineError(f"cannot start engine workers: {os.strerror(-rc)}")
        lib.vn_ctrl_resume(self._c)
        self._lock = threading.RLock()
        self._pause_depth = 0
        self._stopped = False
        self._closing = False
        self.identity = ControllerIdentity(
            serial=serial_for(name),
            model="nvmetd vhost-nvme",
            firmware="0.1.0",
            subnqn=f"nqn.2024-01.io.nvmetd:vhost:{name}"[:223],
        )
        self.namespaces: dict[int, Namespace] = {}
        self.probes: dict[int, dict[str, float]] = {}
        self._events: deque[tuple[int, int, int]] = deque(maxlen=256)
        self._event_fd = -1
        self._admin_kick = -1
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._error_log: deque[bytes] = deque(maxlen=ERR_LOG_ENTRIES)
        self._error_count = 0
        self._power_cycles = 1
        self._reset_registers()
        self._thread = threading.Thread(target=self._admin_loop, name=f"vn-admin-{name}", daemon=True)
        self._thread.start()

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        lib.vn_ctrl_free(self._c)
        for ns in self.namespaces.values():
            ns.close()
        self.namespaces.clear()
        for fd in (self._wake, self._admin_kick, self._event_fd):
            if fd >= 0:
                os.close(fd)

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Workers quiesced (in-flight I/O completed); re-entrant, resumes only at the outermost exit."""
        if self._pause_depth == 0:
            lib.vn_ctrl_pause(self._c)
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0 and not self._stopped:
                lib.vn_ctrl_resume(self._c)

    def _reset_registers(self) -> None:
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self._reset_queue_state()

    def _reset_queue_state(self) -> None:
        self.sqs: dict[int, int] = {}  # qid -> cqid
        self.cqs: dict[int, int] = {}  # qid -> vector
        self.nsqa = self.ncqa = MAX_QID - 1
        self._nq_set = False
        self.features = {Fid.VOLATILE_WC: 1, Fid.IRQ_COALESCE: 0, Fid.ASYNC_EVENT_CFG: 0, Fid.KEEP_ALIVE: 0}
        self._aer_cids: list[int] = []
        self._aen_queue: deque[int] = deque()
        self._changed_ns: set[int] = set()
        self._ns_aen_masked = False
        self._backlog: deque[tuple[int, int, int]] = deque()
        self.dbbuf_on = False
        lib.vn_set_wce(self._c, 1)

    # ---- front-end plumbing (protocol messages) --------------------------------------------------
    def set_mem_table(self, regions: list[tuple[int, int, int, int]]) -> None:
        """regions: (fd, mmap_offset, gpa, size).  Replaces the table; the caller keeps its fds."""
        with self._lock, self._paused():
            lib.vn_mem_clear(self._c)
            for fd, offset, gpa, size in regions:
                rc = lib.vn_mem_add(self._c, fd, offset, gpa, size)
                if rc < 0:
                    lib.vn_mem_clear(self._c)
                    raise OSError(-rc, f"memory region gpa={gpa:#x} size={size:#x}: {os.strerror(-rc)}")
            self._revalidate_queues()

    def _revalidate_queues(self) -> None:
        """Queue rings cache host addresses, so a new memory table under live queues means a reset."""
        if self.cqs or self.sqs or self.csts & CSTS_RDY:
            log.warning("%s: memory table replaced while queues exist; resetting the controller", self.name)
            self._controller_reset(keep_regs=False)

    def clear_mem_table(self) -> None:
        with self._lock, self._paused():
            if self.cc & CC_EN:
                self._controller_reset(keep_regs=False)
            lib.vn_mem_clear(self._c)

    def set_db_mirror(self, fd: int, offset: int) -> None:
        with self._lock, self._paused():
            rc = lib.vn_set_db_mirror(self._c, fd, offset)
            if rc < 0:
                raise OSError(-rc, f"doorbell mirror page: {os.strerror(-rc)}")

    def set_kick(self, qid: int, fd: int) -> None:
        """fd < 0 removes; qid 0 is served by the admin thread, the rest by the C workers."""
        with self._lock:
            if qid == 0:
                if self._admin_kick >= 0:
                    os.close(self._admin_kick)
                self._admin_kick = os.dup(fd) if fd >= 0 else -1
                os.eventfd_write(self._wake, 1)
                return
            if not 0 < qid < MAX_QID:
                raise OSError(22, f"kick qid {qid} out of range")
            with self._paused():
                rc = lib.vn_set_kick(self._c, qid, fd)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))

    def set_call(self, vector: int, fd: int) -> None:
        with self._lock, self._paused():
            rc = lib.vn_set_call(self._c, vector, fd)
            if rc < 0:
                raise OSError(-rc, f"call vector {vector}: {os.strerror(-rc)}")

    def set_event_fd(self, fd: int) -> None:
        with self._lock:
            if self._event_fd >= 0:
                os.close(self._event_fd)
            self._event_fd = os.dup(fd) if fd >= 0 else -1

    def pop_event(self) -> tuple[int, int, int] | None:
        with self._lock:
            return self._events.popleft() if self._events else None

    def _emit(self, event: Event, ident: int = 0, data: int = 0) -> None:
        self._events.append((int(event), ident, data))
        if self._event_fd >= 0:
            os.eventfd_write(self._event_fd, 1)

    def stop(self) -> None:
        with self._lock:
            if not self._stopped:
                self._stopped = True
                lib.vn_ctrl_pause(self._c)

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                self._stopped = False
                lib.vn_ctrl_resume(self._c)
                os.eventfd_write(self._wake, 1)

    def reset(self, kind: ResetKind) -> None:
        if kind == ResetKind.STOP:
            self.stop()
        elif kind == ResetKind.START:
            self.start()
        else:
            with self._lock, self._paused():
                self._controller_reset(keep_regs=False)

    # ---- registers -------------------------------------------------------------------------------
    def _regs_bytes(self) -> bytearray:
        b = bytearray(0x40)
        struct.pack_into("<Q", b, Reg.CAP, CAP)
        struct.pack_into("<I", b, Reg.VS, NVME_VERSION)
        struct.pack_into("<I", b, Reg.CC, self.cc)
        struct.pack_into("<I", b, Reg.CSTS, self.csts)
        struct.pack_into("<I", b, Reg.AQA, self.aqa)
        struct.pack_into("<Q", b, Reg.ASQ, self.asq)
        struct.pack_into("<Q", b, Reg.ACQ, self.acq)
        return b

    def reg_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size:
            raise OSError(22, "register access must be 4 or 8 bytes, naturally aligned")
        with self._lock:
            if offset >= Reg.DOORBELLS:
                return 0  # doorbells are write-only
            if offset + size > 0x40:
                return 0  # reserved / CMB registers read as zero
            return int.from_bytes(self._regs_bytes()[offset:offset + size], "little")

    def reg_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size:
            raise OSError(22, "register access must be 4 or 8 bytes, naturally aligned")
        with self._lock:
            if offset >= Reg.DOORBELLS:
                self._doorbell_write(offset, value & 0xFFFFFFFF)
                return
            if offset + size > 0x40:
                return
            b = self._regs_bytes()
            b[offset:offset + size] = value.to_bytes(size, "little")
            new_cc = struct.unpack_from("<I", b, Reg.CC)[0]
            if not self.cc & CC_EN:
                self.aqa = struct.unpack_from("<I", b, Reg.AQA)[0] & 0x0FFF0FFF
                self.asq = struct.unpack_from("<Q", b, Reg.ASQ)[0] & ~0xFFF
                self.acq = struct.unpack_from("<Q", b, Reg.ACQ)[0] & ~0xFFF
            if offset <= Reg.CC < offset + size:
                self._write_cc(new_cc)

    def _doorbell_write(self, offset: int, value: int) -> None:
        """Slow path for front-ends without a mirror page: the value is stored exactly as a trap would."""
        slot = (offset - Reg.DOORBELLS) // 4
        if slot >= MAX_QID * 2:
            return
        lib.vn_db_mirror_write(self._c, slot, value)
        if slot < 2:
            os.eventfd_write(self._wake, 1)
        else:
            lib.vn_doorbell_wake(self._c, slot // 2)

    def _write_cc(self, new: int) -> None:
        old = self.cc
        self.cc = new
        if new & CC_EN and not old & CC_EN:
            self._enable()
        elif old & CC_EN and not new & CC_EN:
            with self._paused():
                self._controller_reset(keep_regs=True)
            return
        shn = (new >> 14) & 3
        if shn and not (old >> 14) & 3 and self.csts & CSTS_RDY:
            self._shutdown()

    def _enable(self) -> None:
        css, mps, ams = (self.cc >> 4) & 7, (self.cc >> 7) & 0xF, (self.cc >> 11) & 7
        asqs, acqs = (self.aqa & 0xFFF) + 1, ((self.aqa >> 16) & 0xFFF) + 1
        problem = None
        if css or mps or ams:
            problem = f"unsupported CC (CSS={css} MPS={mps} AMS={ams})"
        elif not 2 <= asqs <= MQES + 1 or not 2 <= acqs <= MQES + 1:
            problem = f"admin queue sizes {asqs}/{acqs} outside 2..{MQES + 1}"
        else:
            with self._paused():
                if lib.vn_cq_create(self._c, 0, self.acq, acqs, 0, 1) < 0:
                    problem = f"admin CQ at {self.acq:#x} is not in guest memory"
                elif lib.vn_sq_create(self._c, 0, self.asq, asqs, 0) < 0:
                    lib.vn_cq_delete(self._c, 0)
                    problem = f"admin SQ at {self.asq:#x} is not in guest memory"
        if problem:
            log.warning("%s: enable failed: %s", self.name, problem)
            self.csts = CSTS_CFS
            self._emit(Event.FATAL, 0, self.csts)
            return
        self.csts = CSTS_RDY
        self._emit(Event.READY, 0, self.csts)
        os.eventfd_write(self._wake, 1)

    def _shutdown(self) -> None:
        with self._paused():
            for nsid in self.namespaces:
                lib.vn_ns_flush(self._c, nsid)
        self.csts = (self.csts & ~(3 << 2)) | CSTS_SHST_DONE

    def _controller_reset(self, keep_regs: bool) -> None:
        """Caller holds the lock and has paused the workers (in-flight I/O is complete)."""
        for qid in range(MAX_QID):
            lib.vn_sq_delete(self._c, qid)
            lib.vn_cq_delete(self._c, qid)
        lib.vn_dbbuf_clear(self._c)
        for slot in range(MAX_QID * 2):
            lib.vn_db_mirror_write(self._c, slot, 0)
        if keep_regs:
            self.csts = 0
            self._reset_queue_state()
        else:
            self._reset_registers()
        self._emit(Event.READY, 0, self.csts)

    # ---- namespaces ------------------------------------------------------------------------------
    def attach_namespace(self, ns: Namespace, probe: bool = True) -> None:
        """Takes ownership of ns (and its fd)."""
        with self._lock:
            if not 0 < ns.nsid <= MAX_NS:
                raise EngineError(f"NSID {ns.nsid} outside 1..{MAX_NS}")
            if ns.nsid in self.namespaces:
                raise EngineError(f"NSID {ns.nsid} is already attached")
            with self._paused():
                rc = lib.vn_ns_attach(self._c, ns.nsid, ns.fd, ns.kind, ns.nblocks, ns.lba_shift,
                                      int(ns.readonly), POLICIES[self.policy])
                if rc < 0:
                    raise EngineError(f"cannot attach NSID {ns.nsid}: {os.strerror(-rc)}")
                if probe and self.policy == "auto" and ns.fd >= 0:
                    p = ffi.new("struct vn_probe *")
                    lib.vn_ns_probe(self._c, ns.nsid, p)
                    self.probes[ns.nsid] = {
                        "psync_iops": p.psync_iops, "uring_iops_qd1": p.uring_iops_qd1,
                        "uring_iops_qd32": p.uring_iops_qd32, "uring_min_batch": p.uring_min_batch,
                    }
                lib.vn_ns_set_limits(self._c, ns.nsid, ns.iops_limit, ns.bps_limit)
            self.namespaces[ns.nsid] = ns
            self._ns_changed(ns.nsid)

    def detach_namespace(self, nsid: int) -> None:
        with self._lock:
            if nsid not in self.namespaces:
                raise EngineError(f"NSID {nsid} is not attached")
            with self._paused():
                lib.vn_ns_detach(self._c, nsid)
            self.namespaces.pop(nsid).close()
            self._ns_changed(nsid)

    def set_limits(self, nsid: int, iops: int, bps: int) -> None:
        with self._lock:
            if nsid not in self.namespaces:
                raise EngineError(f"NSID {nsid} is not attached")
            lib.vn_ns_set_limits(self._c, nsid, iops, bps)
            self.namespaces[nsid].iops_limit = iops
            self.namespaces[nsid].bps_limit = bps

    def set_uring_min_batch(self, nsid: int, min_batch: int) -> None:
        """Override the probe's choice (tests exercise both submission paths this way)."""
        with self._lock, self._paused():
            lib.vn_ns_set_uring_min_batch(self._c, nsid, min_batch)

    def _ns_changed(self, nsid: int) -> None:
        self._emit(Event.NS_CHANGED, nsid)
        if not self.csts & CSTS_RDY:
            return
        self._changed_ns.add(nsid)
        if self.features[Fid.ASYNC_EVENT_CFG] & AEC_NS_ATTR and not self._ns_aen_masked:
            self._ns_aen_masked = True  # until the host reads the Changed Namespace List
            self._aen_queue.append(AEN_NS_CHANGED)
            self._deliver_aens()

    # ---- statistics ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        s = ffi.new("struct vn_ctrl_stats *")
        lib.vn_ctrl_get_stats(self._c, s)
        keys = ("cqes", "signals", "kicks", "sleeps", "polls", "invalid_doorbells", "poll_window_ns")
        return {k: getattr(s, k) for k in keys}

    def ns_stats(self, nsid: int) -> dict[str, int]:
        s = ffi.new("struct vn_ns_stats *")
        lib.vn_ns_get_stats(self._c, nsid, s)
        return {k: getattr(s, k) for k in ("reads", "writes", "read_bytes", "write_bytes", "others", "errors",
                                            "throttled", "psync_ios", "uring_ios")}

    # ---- admin queue -----------------------------------------------------------------------------
    def _admin_loop(self) -> None:
        while True:
            fds = [self._wake] + ([self._admin_kick] if self._admin_kick >= 0 else [])
            try:
                ready, _, _ = select.select(fds, [], [], 0.5)
            except OSError:
                ready = []  # the kick fd was replaced under us; retry with the new set
            for fd in ready:
                with contextlib.suppress(OSError):
                    os.eventfd_read(fd) if fd == self._wake else os.read(fd, 8)
            with self._lock:
                if self._closing:
                    return
                if not self._stopped and self.csts & CSTS_RDY:
                    self._process_admin()

    def _post(self, cid: int, status: int, dw0: int) -> bool:
        return lib.vn_cq_post(self._c, 0, 0, cid, status, dw0 & 0xFFFFFFFF) == 0

    def _process_admin(self) -> None:
        while self._backlog:
            if not self._post(*self._backlog[0]):
                return
            self._backlog.popleft()
        raw = ffi.new("uint8_t[64]")
        while True:
            rc = lib.vn_sq_fetch(self._c, 0, raw)
            if rc <= 0:
                return
            cmd = Command.parse(bytes(raw))
            try:
                result = self._exec_admin(cmd)
            except Exception:
                log.exception("%s: admin opcode %#x failed", self.name, cmd.opc)
                result = (Status.INTERNAL, 0)
            if result is None:
                continue  # held (AER)
            status, dw0 = result
            if status:
                self._log_error(0, cmd.cid, status, cmd.nsid)
            if self._backlog or not self._post(cmd.cid, status, dw0):
                self._backlog.append((cmd.cid, status, dw0))

    def _log_error(self, sqid: int, cid: int, status: int, nsid: int, lba: int = 0) -> None:
        self._error_count += 1
        entry = bytearray(64)
        struct.pack_into("<QHHHHQI", entry, 0, self._error_count, sqid, cid, status << 1, 0xFFFF, lba, nsid)
        self._error_log.appendleft(bytes(entry))

    def _drain_engine_errors(self) -> None:
        e = ffi.new("struct vn_err *")
        while lib.vn_err_pop(self._c, e):
            self._log_error(e.sqid, e.cid, e.status, e.nsid, e.lba)

    def _to_guest(self, cmd: Command, data: bytes) -> int:
        buf = ffi.from_buffer(data)
        return lib.vn_prp_copy(self._c, cmd.prp1, cmd.prp2, buf, len(data), 1)

    def _exec_admin(self, cmd: Command) -> tuple[int, int] | None:
        if cmd.flags & 0xC3:
            return _err(Status.INVALID_FIELD)  # fused or SGL: PRP only
        handler = {
            AdminOpc.IDENTIFY: self._identify,
            AdminOpc.CREATE_CQ: self._create_cq,
            AdminOpc.CREATE_SQ: self._create_sq,
            AdminOpc.DELETE_SQ: self._delete_sq,
            AdminOpc.DELETE_CQ: self._delete_cq,
            AdminOpc.GET_FEATURES: self._get_features,
            AdminOpc.SET_FEATURES: self._set_features,
            AdminOpc.GET_LOG_PAGE: self._get_log_page,
            AdminOpc.ASYNC_EVENT: self._async_event,
            AdminOpc.ABORT: lambda c: (0, 1),  # DW0 bit 0: command not aborted
            AdminOpc.KEEP_ALIVE: lambda c: (0, 0),
            AdminOpc.DBBUF_CONFIG: self._dbbuf_config if self.dbbuf else None,
        }.get(cmd.opc)
        if handler is None:
            return _err(Status.INVALID_OPCODE)
        return handler(cmd)

    def _identify(self, cmd: Command) -> tuple[int, int]:
        cns = cmd.cdw10 & 0xFF
        if cns == Cns.CONTROLLER:
            data = identify_controller(self.identity, self.dbbuf)
        elif cns == Cns.NAMESPACE:
            if not 0 < cmd.nsid <= MAX_NS:
                return _err(Status.INVALID_NS)
            ns = self.namespaces.get(cmd.nsid)
            data = identify_namespace(ns) if ns else bytes(PAGE_SIZE)  # inactive NSID: zeros
        elif cns == Cns.ACTIVE_NS_LIST:
            if cmd.nsid >= 0xFFFFFFFE:
                return _err(Status.INVALID_NS)
            data = active_ns_list(list(self.namespaces), cmd.nsid)
        elif cns == Cns.NS_DESC_LIST:
            ns = self.namespaces.get(cmd.nsid)
            if ns is None:
                return _err(Status.INVALID_NS)
            data = ns_descriptor_list(ns)
        else:
            return _err(Status.INVALID_FIELD)
        return self._to_guest(cmd, data), 0

    def _create_cq(self, cmd: Command) -> tuple[int, int]:
        qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        pc, ien, iv = cmd.cdw11 & 1, (cmd.cdw11 >> 1) & 1, cmd.cdw11 >> 16
        if not 0 < qid <= self.ncqa or qid in self.cqs:
            return _err(Status.INVALID_QID)
        if not 2 <= qsize <= MQES + 1:
            return _err(Status.INVALID_QSIZE)
        if iv >= MAX_VECTORS:
            return _err(Status.INVALID_VECTOR)
        if not pc or cmd.prp1 & (PAGE_SIZE - 1) or (self.cc >> 20) & 0xF != 4:
            return _err(Status.INVALID_FIELD)
        with self._paused():
            if lib.vn_cq_create(self._c, qid, cmd.prp1, qsize, iv, ien) < 0:
                return _err(Status.DATA_XFER_ERROR)
        self.cqs[qid] = iv
        self._emit(Event.QUEUE_CREATED, qid, 1 << 32 | iv)
        return 0, 0

    def _create_sq(self, cmd: Command) -> tuple[int, int]:
        qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        pc, cqid = cmd.cdw11 & 1, cmd.cdw11 >> 16
        if not 0 < qid <= self.nsqa or qid in self.sqs:
            return _err(Status.INVALID_QID)
        if cqid == 0 or cqid not in self.cqs:
            return _err(Status.CQ_INVALID)
        if not 2 <= qsize <= MQES + 1:
            return _err(Status.INVALID_QSIZE)
        if not pc or cmd.prp1 & (PAGE_SIZE - 1) or (self.cc >> 16) & 0xF != 6:
            return _err(Status.INVALID_FIELD)
        with self._paused():
            if lib.vn_sq_create(self._c, qid, cmd.prp1, qsize, cqid) < 0:
                return _err(Status.DATA_XFER_ERROR)
        self.sqs[qid] = cqid
        self._emit(Event.QUEUE_CREATED, qid, cqid)
        return 0, 0

    def _delete_sq(self, cmd: Command) -> tuple[int, int]:
        qid = cmd.cdw10 & 0xFFFF
        if qid not in self.sqs:
            return _err(Status.INVALID_QID)
        with self._paused():  # completes everything in flight on it first
            lib.vn_sq_delete(self._c, qid)
        del self.sqs[qid]
        self._emit(Event.QUEUE_DELETED, qid, 0)
        return 0, 0

    def _delete_cq(self, cmd: Command) -> tuple[int, int]:
        qid = cmd.cdw10 & 0xFFFF
        if qid not in self.cqs:
            return _err(Status.INVALID_QID)
        if qid in self.sqs.values():
            return _err(Status.INVALID_QUEUE_DELETION)
        with self._paused():
            lib.vn_cq_delete(self._c, qid)
        del self.cqs[qid]
        self._emit(Event.QUEUE_DELETED, qid, 1 << 32)
        return 0, 0

    def _get_features(self, cmd: Command) -> tuple[int, int]:
        fid, sel = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 7
        if sel == 3:
            return 0, 0x4  # supported capabilities: changeable, not saveable
        if sel > 3:
            return _err(Status.INVALID_FIELD)
        if fid == Fid.NUM_QUEUES:
            return 0, ((self.ncqa - 1) << 16) | (self.nsqa - 1)
        if fid == Fid.IRQ_CONFIG:
            iv = cmd.cdw11 & 0xFFFF
            return (0, iv) if iv < MAX_VECTORS else _err(Status.INVALID_FIELD)
        if fid in self.features:
            default = {Fid.VOLATILE_WC: 1}.get(fid, 0)
            return 0, default if sel == 1 else self.features[fid]
        return _err(Status.INVALID_FIELD)

    def _set_features(self, cmd: Command) -> tuple[int, int]:
        fid = cmd.cdw10 & 0xFF
        if cmd.cdw10 >> 31:
            return _err(Status.FEATURE_NOT_SAVEABLE)
        if fid == Fid.NUM_QUEUES:
            nsqr, ncqr = cmd.cdw11 & 0xFFFF, cmd.cdw11 >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                return _err(Status.INVALID_FIELD)
            if self.sqs or self.cqs:
                return _err(Status.CMD_SEQ_ERROR)
            self.nsqa, self.ncqa = min(nsqr + 1, MAX_QID - 1), min(ncqr + 1, MAX_QID - 1)
            return 0, ((self.ncqa - 1) << 16) | (self.nsqa - 1)
        if fid == Fid.VOLATILE_WC:
            self.features[fid] = cmd.cdw11 & 1
            lib.vn_set_wce(self._c, cmd.cdw11 & 1)
            return 0, 0
        if fid == Fid.IRQ_COALESCE:
            self.features[fid] = cmd.cdw11 & 0xFFFF
            return 0, 0
        if fid == Fid.IRQ_CONFIG:
            return (0, 0) if (cmd.cdw11 & 0xFFFF) < MAX_VECTORS else _err(Status.INVALID_FIELD)
        if fid == Fid.ASYNC_EVENT_CFG:
            self.features[fid] = cmd.cdw11 & AEC_NS_ATTR
            return 0, 0
        if fid == Fid.KEEP_ALIVE:
            self.features[fid] = cmd.cdw11
            return 0, 0
        return _err(Status.INVALID_FIELD)

    def _get_log_page(self, cmd: Command) -> tuple[int, int]:
        lid, rae = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 15) & 1
        numd = (((cmd.cdw11 & 0xFFFF) << 16) | (cmd.cdw10 >> 16)) + 1
        offset = cmd.cdw12 | (cmd.cdw13 << 32)
        if lid == Lid.ERROR:
            self._drain_engine_errors()
            page = b"".join(self._error_log).ljust(64 * ERR_LOG_ENTRIES, b"\0")
        elif lid == Lid.SMART:
            page = self._smart_log()
        elif lid == Lid.CHANGED_NS:
            ids = sorted(self._changed_ns)
            ids = [0xFFFFFFFF] if len(ids) > 1024 else ids
            page = struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0")
            if not rae:
                self._changed_ns.clear()
                self._ns_aen_masked = False
        else:
            return _err(Status.INVALID_LOG_PAGE)
        if offset % 4 or offset > len(page):
            return _err(Status.INVALID_FIELD)
        data = page[offset:offset + numd * 4].ljust(numd * 4, b"\0")
        return self._to_guest(cmd, data), 0

    def _smart_log(self) -> bytes:
        self._drain_engine_errors()
        total = {"reads": 0, "writes": 0, "read_bytes": 0, "write_bytes": 0, "errors": 0}
        for nsid in self.namespaces:
            st = self.ns_stats(nsid)
            for k in total:
                total[k] += st[k]
        b = bytearray(512)
        struct.pack_into("<BHBBB", b, 0, 0, 313, 100, 10, 0)
        units = lambda n: -(-n // 512000)  # noqa: E731 - data units are 1000 x 512 bytes, rounded up
        struct.pack_into("<QQ", b, 32, units(total["read_bytes"]), 0)
        struct.pack_into("<QQ", b, 48, units(total["write_bytes"]), 0)
        struct.pack_into("<QQ", b, 64, total["reads"], 0)
        struct.pack_into("<QQ", b, 80, total["writes"], 0)
        struct.pack_into("<QQ", b, 112, self._power_cycles, 0)
        struct.pack_into("<QQ", b, 176, self._error_count, 0)
        return bytes(b)

    def _async_event(self, cmd: Command) -> tuple[int, int] | None:
        if len(self._aer_cids) >= 4:
            return _err(Status.AER_LIMIT)
        self._aer_cids.append(cmd.cid)
        self._deliver_aens()
        return None

    def _deliver_aens(self) -> None:
        while self._aer_cids and self._aen_queue:
            cid, dw0 = self._aer_cids.pop(0), self._aen_queue.popleft()
            if self._backlog or not self._post(cid, 0, dw0):
                self._backlog.append((cid, 0, dw0))

    def _dbbuf_config(self, cmd: Command) -> tuple[int, int]:
        mask = PAGE_SIZE - 1
        if not cmd.prp1 or not cmd.prp2 or cmd.prp1 & mask or cmd.prp2 & mask:
            return _err(Status.INVALID_FIELD)
        with self._paused():
            if lib.vn_dbbuf_set(self._c, cmd.prp1, cmd.prp2) < 0:
                return _err(Status.INVALID_FIELD)
        self.dbbuf_on = True
        self._emit(Event.DBBUF_ON, 0, 0)
        return 0, 0
