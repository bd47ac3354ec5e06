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
STATES = ("ok", "missing", "io-error", "stalled")

_inflight: dict[str, threading.Thread] = {}
_lock = threading.Lock()


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


def namespaces(live: Any, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """Health of every enabled namespace of a live TargetState (read back from configfs)."""
    rows = []
    for sub in live.subsystems:
        for ns in sub.namespaces:
            if not ns.enable or not ns.device_path:
                continue
            rows.append({"subsystem": sub.nqn, "nsid": ns.nsid, "device_path": ns.device_path,
                         **asdict(probe(ns.device_path, timeout))})
    return rows
