"""Unix-socket server speaking PROTOCOL.md for one controller.

Every request is answered synchronously (R2): register accesses and queue setup are rare, and the hot path
never crosses this socket.  Several connections may share a controller (front-end and management plane);
when the connection that installed the memory table goes away, the controller is reset and the memory
unmapped, because nobody vouches for those pages any more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable

from . import protocol as p
from .controller import Controller, EngineError
from .namespace import NamespaceError, namespace_from_fd, null_namespace
from .nvme_spec import MAX_NS, MAX_QID, MAX_VECTORS, MDTS, MQES
from .protocol import Message, ProtocolError, Req

log = logging.getLogger(__name__)

Handler = Callable[[Message], tuple[int, bytes]]


class EngineServer:
    def __init__(self, path: str, controller: Controller) -> None:
        self.path = path
        self.ctrl = controller
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock.bind(path)
        self._sock.listen(8)
        self._mem_owner: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._handlers: dict[int, Handler] = {
            Req.SET_OWNER: lambda m: (0, b""),
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.GET_INFO: self._get_info,
            Req.SET_FEATURES: self._set_features,
            Req.BIND: self._bind,
            Req.SET_DB_MIRROR: self._set_db_mirror,
            Req.SET_KICK: self._set_kick,
            Req.SET_VECTOR_CALL: self._set_call,
            Req.REG_READ: self._reg_read,
            Req.REG_WRITE: self._reg_write,
            Req.RESET: self._reset,
            Req.SET_EVENT_FD: self._set_event_fd,
            Req.GET_EVENT: self._get_event,
            Req.NS_ATTACH: self._ns_attach,
            Req.NS_DETACH: self._ns_detach,
            Req.NS_SET_LIMITS: self._ns_set_limits,
            Req.GET_STATS: self._get_stats,
            Req.NS_LIST: self._ns_list,
        }

    def serve_in_thread(self) -> EngineServer:
        self._thread = threading.Thread(target=self.serve_forever, name="vn-accept", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve_conn, args=(conn,), name="vn-conn", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._thread:
            self._thread.join(timeout=5)

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            while True:
                msg = p.recv_msg(conn)
                try:
                    result, data = self._dispatch(msg, conn)
                finally:
                    for fd in msg.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                p.send_msg(conn, msg.request, p.reply_payload(result, data), reply=True)
        except (ConnectionError, OSError, ProtocolError) as exc:
            if not self._closed:
                log.info("connection closed: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
                owner = self._mem_owner is conn
                if owner:
                    self._mem_owner = None
            if owner and not self._closed:
                self.ctrl.clear_mem_table()
            conn.close()

    def _dispatch(self, msg: Message, conn: socket.socket) -> tuple[int, bytes]:
        handler = self._handlers.get(msg.request)
        if handler is None:
            return -errno.ENOSYS, b""
        try:
            if msg.request == Req.SET_MEM_TABLE:
                result = handler(msg)
                if result[0] == 0:
                    with self._lock:
                        self._mem_owner = conn
                return result
            return handler(msg)
        except struct.error:
            return -errno.EINVAL, b""
        except OSError as exc:
            return -(exc.errno or errno.EIO), b""
        except (EngineError, NamespaceError) as exc:
            log.warning("%s", exc)
            return -errno.EINVAL, b""

    # ---- handlers --------------------------------------------------------------------------------
    def _features(self) -> int:
        return p.ALL_FEATURES if self.ctrl.dbbuf else p.ALL_FEATURES & ~p.Feature.DBBUF

    def _get_info(self, msg: Message) -> tuple[int, bytes]:
        return 0, p.INFO.pack(p.VERSION, MAX_NS, self._features(), MAX_QID - 1, MQES, MAX_VECTORS, MDTS, 0)

    def _set_features(self, msg: Message) -> tuple[int, bytes]:
        (acked,) = p.U64.unpack_from(msg.payload)
        return (-errno.EINVAL if acked & ~self._features() else 0), b""

    def _bind(self, msg: Message) -> tuple[int, bytes]:
        subnqn, _hostnqn = p.BIND.unpack_from(msg.payload)
        nqn = subnqn.split(b"\0", 1)[0].decode("ascii", "replace")
        if nqn:
            import dataclasses

            self.ctrl.identity = dataclasses.replace(self.ctrl.identity, subnqn=nqn)
        return 0, b""

    def _set_mem_table(self, msg: Message) -> tuple[int, bytes]:
        n, _ = p.MEM_TABLE_HEAD.unpack_from(msg.payload)
        if n != len(msg.fds) or n > 8:
            return -errno.EINVAL, b""
        regions = []
        for i in range(n):
            gpa, size, _va, offset = p.MEM_REGION.unpack_from(msg.payload, p.MEM_TABLE_HEAD.size + i * 32)
            regions.append((msg.fds[i], offset, gpa, size))
        self.ctrl.set_mem_table(regions)
        return 0, b""

    def _set_db_mirror(self, msg: Message) -> tuple[int, bytes]:
        offset, size = p.DB_MIRROR.unpack_from(msg.payload)
        if len(msg.fds) != 1 or size != 4096:
            return -errno.EINVAL, b""
        self.ctrl.set_db_mirror(msg.fds[0], offset)
        return 0, b""

    def _set_kick(self, msg: Message) -> tuple[int, bytes]:
        qid, _flags = p.FD_SLOT.unpack_from(msg.payload)
        fd = msg.fds[0] if msg.fds else -1
        qids = range(1, MAX_QID) if qid == p.KICK_ALL_IO else [qid]
        for q in qids:
            self.ctrl.set_kick(q, fd)
        return 0, b""

    def _set_call(self, msg: Message) -> tuple[int, bytes]:
        vector, _flags = p.FD_SLOT.unpack_from(msg.payload)
        self.ctrl.set_call(vector, msg.fds[0] if msg.fds else -1)
        return 0, b""

    def _reg_read(self, msg: Message) -> tuple[int, bytes]:
        offset, size, _ = p.REG.unpack_from(msg.payload)
        return 0, p.U64.pack(self.ctrl.reg_read(offset, size))

    def _reg_write(self, msg: Message) -> tuple[int, bytes]:
        offset, size, value = p.REG.unpack_from(msg.payload)
        self.ctrl.reg_write(offset, size, value)
        return 0, b""

    def _reset(self, msg: Message) -> tuple[int, bytes]:
        kind, _ = p.RESET.unpack_from(msg.payload)
        self.ctrl.reset(p.ResetKind(kind))
        return 0, b""

    def _set_event_fd(self, msg: Message) -> tuple[int, bytes]:
        self.ctrl.set_event_fd(msg.fds[0] if msg.fds else -1)
        return 0, b""

    def _get_event(self, msg: Message) -> tuple[int, bytes]:
        ev = self.ctrl.pop_event()
        if ev is None:
            return -errno.EAGAIN, b""
        return 0, p.EVENT.pack(*ev)

    def _ns_attach(self, msg: Message) -> tuple[int, bytes]:
        nsid, flags, null_size, lba_size, _policy, iops, bps, _fd, name = p.NS_ATTACH.unpack_from(msg.payload)
        label = name.split(b"\0", 1)[0].decode("utf-8", "replace") or f"ns{nsid}"
        if flags & p.NS_FLAG_NULL:
            ns = null_namespace(nsid, null_size, lba_size or 4096)
        else:
            if len(msg.fds) != 1:
                return -errno.EBADF, b""
            fd = os.dup(msg.fds[0])
            try:
                ns = namespace_from_fd(nsid, fd, label, bool(flags & p.NS_FLAG_READONLY), lba_size)
            except Exception:
                os.close(fd)
                raise
        ns.iops_limit, ns.bps_limit = iops, bps
        try:
            self.ctrl.attach_namespace(ns)
        except Exception:
            ns.close()
            raise
        return 0, p.NS_ID.pack(nsid, 0)

    def _ns_detach(self, msg: Message) -> tuple[int, bytes]:
        nsid, _ = p.NS_ID.unpack_from(msg.payload)
        self.ctrl.detach_namespace(nsid)
        return 0, b""

    def _ns_set_limits(self, msg: Message) -> tuple[int, bytes]:
        nsid, _, iops, bps = p.NS_LIMITS.unpack_from(msg.payload)
        self.ctrl.set_limits(nsid, iops, bps)
        return 0, b""

    def _get_stats(self, msg: Message) -> tuple[int, bytes]:
        s = self.ctrl.stats()
        return 0, p.STATS.pack(s["cqes"], s["signals"], s["kicks"], s["sleeps"], s["polls"],
                               s["invalid_doorbells"], s["poll_window_ns"])

    def _ns_list(self, msg: Message) -> tuple[int, bytes]:
        entries = []
        for nsid, ns in sorted(self.ctrl.namespaces.items()):
            flags = (p.NS_FLAG_READONLY if ns.readonly else 0) | (p.NS_FLAG_NULL if ns.fd < 0 else 0)
            entries.append(p.NS_ENTRY.pack(nsid, flags, ns.nblocks * ns.lba_size, ns.name.encode()[:95]))
        return 0, p.NS_LIST_HEAD.pack(len(entries), 0) + b"".join(entries)
