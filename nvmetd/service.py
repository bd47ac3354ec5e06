"""nvmetd: the system service. Owns the desired state, reconciles the kernel to it at start, on every change
and on a timer (repairing drift), and serves the API on a Unix socket.

Stopping or restarting nvmetd never touches the kernel target: guests keep doing I/O while it is away.
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nvmetd import ns_health
from nvmetd.changelog import ChangeLog
from nvmetd.errors import UserError
from nvmetd.manager import DEFAULT_KEYS_DIR, Manager
from nvmetd.readiness import ServiceReadiness
from nvmetd.vhost import DEFAULT_RUN_DIR, VhostEngines
from nvmetd.vms import Ports
from target.configfs import NVMET_ROOT, ConfigFS
from target.store import DEFAULT_PATH, StateStore

log = logging.getLogger("nvmetd")

DEFAULT_SOCKET = Path("/run/nvmetd/nvmetd.sock")
DEFAULT_CONFIG = Path("/etc/nvmetd/nvmetd.toml")


class KeyValueFormatter(logging.Formatter):
    """One line per event with structured fields; journald (JOURNAL_STREAM) adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if "JOURNAL_STREAM" not in os.environ:
            fields = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), **fields}
        return " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())


def load_config(path: Path) -> dict[str, Any]:
    """Read and check the configuration, so a broken file is refused whole before any of it is used."""
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        config = tomllib.load(f)
    ports = config.get("ports")
    if ports is not None:
        if not isinstance(ports, dict):
            raise ValueError(f"{path}: [ports] must be a table")
        try:
            checked = Ports.model_validate(ports)
            # the kernel ports they become must be valid too (address family, service id), or every
            # reconcile after the reload would fail
            for transport in ("tcp", "loop", *(("rdma",) if checked.rdma_address else ())):
                checked.port(transport, [])
        except ValidationError as exc:
            raise ValueError(f"{path}: " + "; ".join(
                "ports" + "".join(f".{x}" for x in e["loc"]) + f": {e['msg']}" for e in exc.errors())) from None
    group = config.get("socket_group")
    if group is not None and not isinstance(group, str):
        raise ValueError(f"{path}: socket_group must be a string")
    vhost = config.get("vhost")
    if vhost is not None:
        if not isinstance(vhost, dict):
            raise ValueError(f"{path}: [vhost] must be a table")
        try:
            config["vhost"] = VhostConfig.model_validate(vhost).model_dump(exclude_none=True)
        except ValidationError as exc:
            raise ValueError(f"{path}: " + "; ".join(
                "vhost" + "".join(f".{x}" for x in e["loc"]) + f": {e['msg']}" for e in exc.errors())) from None
    dpu = config.get("dpu")
    if dpu is not None:
        from nvmetd.opi.offload import DpuConfig

        if not isinstance(dpu, dict):
            raise ValueError(f"{path}: [dpu] must be a table")
        try:
            config["dpu"] = DpuConfig.model_validate(dpu).check().model_dump(exclude_none=True)
        except ValidationError as exc:
            raise ValueError(f"{path}: " + "; ".join(
                "dpu" + "".join(f".{x}" for x in e["loc"]) + f": {e['msg']}" for e in exc.errors())) from None
        except (ValueError, UserError) as exc:
            raise ValueError(f"{path}: dpu: {exc}") from None
    opi = config.get("opi")
    if opi is not None:
        from nvmetd.opi.server import OpiConfig

        if not isinstance(opi, dict):
            raise ValueError(f"{path}: [opi] must be a table")
        try:
            config["opi"] = OpiConfig.model_validate(opi).check().model_dump(exclude_none=True)
        except ValidationError as exc:
            raise ValueError(f"{path}: " + "; ".join(
                "opi" + "".join(f".{x}" for x in e["loc"]) + f": {e['msg']}" for e in exc.errors())) from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return config


class VhostConfig(BaseModel):
    """[vhost] in nvmetd.toml."""

    model_config = ConfigDict(extra="forbid", strict=True)
    auto: bool = False  # the hypervisor's QEMU has the vhost-user-nvme device: --transport auto picks vhost
    socket_group: str | None = None  # QEMU's group: it gets the engine sockets (0660)
    poll_us: int | None = Field(default=None, ge=1, le=1_000_000)  # engine busy-poll cap
    # who serves --transport vhost: the in-kernel nvmet-vhost when it loads (auto), always it, or the engine
    backend: Literal["auto", "kernel", "engine"] = "auto"


def bind_socket(path: Path, group: str | None) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(128)
    return sock


class Service:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = load_config(args.config)
        store = StateStore(args.state)
        vhost = self.config.get("vhost", {})
        self.manager = Manager(store, ConfigFS(args.configfs), pools_root=args.pools_root, keys_dir=args.keys_dir,
                               host_connect=not args.no_host_connect,
                               vhost=VhostEngines(args.vhost_dir, poll_us=vhost.get("poll_us"),
                                                  socket_group=vhost.get("socket_group")),
                               vhost_auto=bool(vhost.get("auto", False)),
                               vhost_backend=vhost.get("backend", "auto"))
        self.manager.changes = ChangeLog(args.change_log)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload = threading.Event()
        from sdnotify import SystemdNotifier

        self.notifier = SystemdNotifier()
        self.readiness = ServiceReadiness(self.notifier.notify, f"serving on {args.socket}")

    def apply_config(self) -> None:
        self.manager.vhost_auto = bool(self.config.get("vhost", {}).get("auto", False))
        self.manager.vhost_backend = self.config.get("vhost", {}).get("backend", "auto")
        self.manager.dpu = dict(self.config.get("dpu", {}))
        ports = self.config.get("ports")
        if ports is not None:
            stored = Ports.model_validate(ports).model_dump(exclude_unset=True)
            with self.manager.lock, self.manager.store.transaction() as doc:
                doc["ports"] = stored

    def reload_config(self) -> None:
        """SIGHUP: take the new configuration whole, or keep the old one whole (a broken file changes nothing)."""
        log.info("SIGHUP: reloading %s", self.args.config)
        try:
            config = load_config(self.args.config)
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            log.error("reload of %s failed, keeping the old configuration: %s", self.args.config, exc)
            return
        self.config = config
        self.apply_config()
        log.info("reloaded %s", self.args.config)

    def reconcile_loop(self) -> None:
        """Boot restore first (waiting for late devices/addresses), then repair drift every interval. nvmetd is
        READY only once a restore or reconcile converged; until then STATUS= says what it is waiting for."""
        try:
            result = self.manager.boot(wait=self.args.restore_timeout)
            log.info("restore finished: converged=%s writes=%d", result.converged, result.writes)
            self.readiness.converged(result, "restore")
        except Exception as exc:
            log.exception("restore failed")
            self.readiness.failed(f"restore failed: {exc}")
        while not self.stop.is_set():
            self.wake.wait(self.args.drift_interval)
            self.wake.clear()
            if self.stop.is_set():
                break
            try:
                if self.reload.is_set():
                    self.reload.clear()
                    self.reload_config()
                result = self.manager.reconcile()
                if result.writes:
                    log.warning("repaired drift: %d configfs changes", result.writes)
                if self.manager.cfs.exists():
                    with self.manager.lock:  # a device replaced under a namespace: nvmet must re-open it
                        for line in ns_health.reopen_replaced(self.manager.cfs):
                            log.warning("%s", line)
                self.readiness.converged(result, "reconcile")
            except Exception as exc:
                log.exception("reconcile failed")
                self.readiness.failed(f"reconcile failed: {exc}")

    def watchdog_loop(self, reconciler: threading.Thread) -> None:
        """Ping at half the watchdog interval while the reconcile thread lives, so a dead loop gets us restarted."""
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        except ValueError:
            usec = 0
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return
        while not self.stop.wait(usec / 2e6):
            if reconciler.is_alive():
                self.notifier.notify("WATCHDOG=1")

    def on_hup(self, *_: object) -> None:
        """Only flags the reload: the work (file I/O, the store lock, logging) happens in the reconcile thread,
        never inside a signal handler that may have interrupted the main thread holding those locks."""
        self.reload.set()
        self.wake.set()

    def start_opi(self) -> Any:
        """The OPI storage API (gRPC, nvmetd/opi/) on the same Manager: one state, two APIs."""
        from nvmetd.opi.server import OpiConfig, build

        config = OpiConfig.model_validate(self.config.get("opi", {}))
        socket_path = self.args.opi_socket or Path(config.socket or str(self.args.socket.parent / "opi.sock"))
        opi = build(self.manager, socket_path, config)
        opi.start()
        log.info("OPI storage API on %s%s", socket_path, f" and {config.tcp} (mutual TLS)" if config.tcp else "")
        return opi

    def run(self) -> int:
        import uvicorn

        from nvmetd.api import create_app

        self.apply_config()
        group = self.args.socket_group or self.config.get("socket_group")
        with self.manager.store.locked():  # `nvmetctl --offline` checks the socket under this lock
            sock = bind_socket(self.args.socket, group)
        reconciler = threading.Thread(target=self.reconcile_loop, name="reconcile", daemon=True)
        reconciler.start()
        threading.Thread(target=self.watchdog_loop, args=(reconciler,), name="watchdog", daemon=True).start()
        signal.signal(signal.SIGHUP, self.on_hup)
        config = uvicorn.Config(create_app(self.manager), log_config=None, access_log=False, lifespan="off")
        server = uvicorn.Server(config)

        def ready() -> None:
            while not server.started and not self.stop.is_set():
                time.sleep(0.05)
            log.info("serving on %s", self.args.socket)
            self.readiness.serving()

        threading.Thread(target=ready, daemon=True).start()
        opi = self.start_opi()
        try:
            server.run(sockets=[sock])
        finally:
            opi.stop(grace=2)
            self.stop.set()
            self.wake.set()
            self.notifier.notify("STOPPING=1")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvmetd", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML configuration (ports, group)")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("NVMETD_STATE", DEFAULT_PATH)))
    parser.add_argument("--socket", type=Path, default=Path(os.environ.get("NVMETD_SOCKET", DEFAULT_SOCKET)))
    parser.add_argument("--socket-group", help="group that may use the API socket (mode 0660)")
    parser.add_argument("--pools-root", type=Path, default=None, help="backend pools' state directory")
    parser.add_argument("--keys-dir", type=Path, default=DEFAULT_KEYS_DIR)
    parser.add_argument("--vhost-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="vhost-nvme engine sockets, pid files and logs (one engine per VM)")
    parser.add_argument("--configfs", type=Path, default=NVMET_ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--drift-interval", type=float, default=30.0, help="seconds between drift repairs")
    parser.add_argument("--restore-timeout", type=float, default=120.0,
                        help="seconds to wait at start for late devices and addresses")
    parser.add_argument("--no-host-connect", action="store_true",
                        help="never connect loop attachments on this host (return parameters only)")
    parser.add_argument("--change-log", type=Path, default=None,
                        help="append each disk/VM call, in the order it took effect, to this JSON-lines file")
    parser.add_argument("--opi-socket", type=Path, default=None,
                        help="the OPI storage API's Unix socket (default: opi.sock beside --socket)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    os.umask(0o077)
    try:
        return Service(args).run()
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
        log.error("cannot start: %s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
