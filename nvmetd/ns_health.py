"""Is each enabled namespace's backing device answering? A read probe, because configfs cannot tell.

nvmet keeps serving a namespace whose device errors, stalls or has been removed: the kernel tree looks exactly as
configured, and only the host sees I/O errors. So `status` and the metrics read one 4 KiB block of every enabled
namespace's device_path with O_DIRECT (around the page cache, which would hide a dead device) on a worker thread,
and wait at most `timeout` seconds for it. Outcomes:

- `ok`: the read returned.
- `missing`: the device_path no longer exists (or is no block device or regular file).
- `io-error`: the read failed; the errno is the detail.
- `stalled`: the read did not return within the timeout (a probe still running from an earlier call counts too,
  so a stuck device holds one probe thread, never one per status call).
- `replaced`: the path answers, but it names another device than when this nvmetd last saw the namespace healthy
  (a drive pulled and put back, a dm or loop device recreated). nvmet still holds the one that went away and fails
  every I/O on it; the next reconcile (the drift timer, or POST /v1/reconcile) disables and re-enables the
  namespace so that nvmet opens the device the path names now. What a device is, is remembered from the first
  healthy probe or reconcile after nvmetd started: a swap before that is not seen.

The probe only reads, and only what nvmet already opened: it activates nothing and opens no LUKS mapping.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from dataclasses import asdict, dataclass
from typing import Any

PROBE_BYTES = 4096
DEFAULT_TIMEOUT = 2.0
STATES = ("ok", "missing", "io-error", "stalled", "replaced")

_inflight: dict[str, threading.Thread] = {}
_lock = threading.Lock()
_seen: dict[tuple[str, int], tuple[str, int, int]] = {}  # (subsystem, nsid) -> (path, device identity) when healthy


@dataclass(frozen=True)
class Health:
    state: str
    detail: str = ""


def _read(path: str, result: list[Health]) -> None:
    buf = mmap.mmap(-1, PROBE_BYTES)
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a filesystem without O_DIRECT (a buffered_io file namespace)
                raise
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        result.append(Health("ok"))
    except FileNotFoundError:
        result.append(Health("missing", f"{path} does not exist"))
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        result.append(Health("io-error", f"reading {path}: {name} ({exc.strerror})"))
    finally:
        buf.close()


def probe(path: str, timeout: float = DEFAULT_TIMEOUT) -> Health:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Health("missing", f"{path} does not exist")
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        return Health("missing", f"{path} is neither a block device nor a file")
    with _lock:
        running = _inflight.get(path)
        if running is not None and running.is_alive():
            return Health("stalled", f"a read of {path} has not returned yet")
        result: list[Health] = []
        worker = threading.Thread(target=_read, args=(path, result), name="ns-health", daemon=True)
        _inflight[path] = worker
        worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return Health("stalled", f"a {PROBE_BYTES}-byte read of {path} took longer than {timeout:g} s")
    with _lock:
        if _inflight.get(path) is worker:
            del _inflight[path]
    return result[0]


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_rdev, 0) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


def _judge(subsystem: str, nsid: int, path: str, health: Health) -> Health:
    if health.state != "ok":
        return health
    now = _identity(path)
    with _lock:
        known = _seen.get((subsystem, nsid))
        if known is not None and known[0] == path and now is not None and known[1:] != now:
            return Health("replaced", f"{path} now names another device than the one nvmet opened (removed and "
                                      "added back?); the next reconcile re-opens it")
        if now is not None:
            _seen[(subsystem, nsid)] = (path, *now)
    return health


def namespaces(live: Any, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """Health of every enabled namespace of a live TargetState (read back from configfs)."""
    rows = []
    for sub in live.subsystems:
        for ns in sub.namespaces:
            if not ns.enable or not ns.device_path:
                continue
            health = _judge(sub.nqn, ns.nsid, ns.device_path, probe(ns.device_path, timeout))
            rows.append({"subsystem": sub.nqn, "nsid": ns.nsid, "device_path": ns.device_path, **asdict(health)})
    return rows


def reopen_replaced(cfs: Any) -> list[str]:
    """After a reconcile: make nvmet re-open every namespace whose device was replaced under it (disable, enable),
    and remember what each healthy namespace's path names. Returns what it re-opened, for the log."""
    from target.live import read_state

    done = []
    for row in namespaces(read_state(cfs)):
        if row["state"] != "replaced":
            continue
        rel = f"subsystems/{row['subsystem']}/namespaces/{row['nsid']}"
        cfs.write(rel, "enable", "0")
        cfs.write(rel, "enable", "1")
        now = _identity(row["device_path"])
        if now is not None:
            with _lock:
                _seen[(row["subsystem"], row["nsid"])] = (row["device_path"], *now)
        done.append(f"{row['subsystem']} nsid {row['nsid']}: re-opened {row['device_path']} (device replaced)")
    return done
