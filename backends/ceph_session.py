"""Ceph's own Python bindings (librados, librbd) and one cached cluster connection per process and identity.

Why not the `ceph` and `rbd` CLIs for every question: each call is a process start-up (a Python interpreter for
`ceph`), a cephx handshake and a monitor session, seconds of CPU on a loaded or emulated host, several times per
attach. One librados connection, opened at the first question and kept, answers a monitor command in milliseconds.
The bindings (python3-rados, python3-rbd) are Ceph's and ship only with the distribution, built for its Python
(bookworm: 3.11, the venv's too); they are loaded by path, alone, so nothing else in the system's dist-packages
shadows the venv's packages.

A forked child never uses its parent's connection (librados' threads do not survive a fork): the cache is per pid.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from backends.errors import UnavailableError

DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
OP_TIMEOUT = 300  # seconds an OSD operation may block (a PG with no copy up) before it fails instead of hanging

_lock = threading.Lock()
_sessions: dict[tuple[str, str, str, int], tuple[int, Any]] = {}


def binding(name: str) -> ModuleType:
    """`rados` or `rbd`, Debian's build of Ceph's Cython bindings (rbd's imports rados: loaded first)."""
    if name not in ("rados", "rbd"):
        raise ValueError(f"no Ceph binding {name!r}")
    if name in sys.modules:
        return sys.modules[name]
    if name == "rbd":
        binding("rados")
    path = DIST_PACKAGES / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not path.exists():
        raise UnavailableError(f"python3-{name} for this Python is not installed ({path} is missing): "
                               "run scripts/setup")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def connect(conf: str, keyring: str, user: str, timeout: int) -> Any:
    """The connected `rados.Rados` for this identity, made on first use. Raises the binding's own errors: the
    caller (backends.ceph.Client) turns them into a line naming the cause."""
    key = (conf, keyring, user, timeout)
    with _lock:
        found = _sessions.get(key)
        if found and found[0] == os.getpid() and found[1].state == "connected":
            return found[1]
        rados = binding("rados")
        conn = rados.Rados(conffile=conf, rados_id=user, conf={
            "keyring": keyring, "client_mount_timeout": str(timeout), "rados_mon_op_timeout": "60",
            "rados_osd_op_timeout": str(OP_TIMEOUT), "admin_socket": "", "log_file": "", "log_to_stderr": "false",
            "err_to_stderr": "false"})
        try:
            conn.connect(timeout=timeout)
        except BaseException:
            conn.shutdown()
            raise
        _sessions[key] = (os.getpid(), conn)
        return conn


def forget(conf: str, keyring: str, user: str, timeout: int) -> None:
    """Drop a connection that failed in a way a new one may not (a monitor session lost, a timeout)."""
    with _lock:
        found = _sessions.pop((conf, keyring, user, timeout), None)
    if found and found[0] == os.getpid():
        found[1].shutdown()
