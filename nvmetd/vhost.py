"""One vhost-nvme engine per VM that has vhost disks, kept in step with the stored attachments.

The vhost path bypasses the kernel target: the VM's NVMe queues live in its own memory and nvmetd's engine
(vhost_nvme/) serves them from the disk's file or block device. Engines run in a session of their own, so a
restart or a kill -9 of nvmetd never stops a guest's I/O; the next reconcile adopts a running engine through its
socket (NS_LIST) and only attaches or detaches the namespaces that differ. New disks become new namespaces of the
same controller (the guest gets a Namespace Attribute Changed event), exactly as on the nvmet path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nvmetd.vms import Vm
from target.apply import CHANGED, FAILED, OK, REMOVED, ObjectStatus
from vhost_nvme.client import EngineClient
from vhost_nvme.nvme_spec import MAX_NS

log = logging.getLogger("nvmetd.vhost")

DEFAULT_RUN_DIR = Path("/run/nvmetd/vhost")
START_TIMEOUT = 60.0  # the engine imports cffi and its compiled data plane; slow under emulation
MAX_VHOST_NSID = MAX_NS
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL


@dataclass(frozen=True)
class EngineSpec:
    """What one VM's engine should serve: nsid -> (disk name, file or block device), and nsid -> (IOPS, bytes/s)
    for its token bucket (left out: unlimited)."""

    vm: Vm
    namespaces: dict[int, tuple[str, str]]
    limits: dict[int, tuple[int, int]] = field(default_factory=dict)


class VhostEngines:
    def __init__(self, run_dir: Path = DEFAULT_RUN_DIR, poll_us: int | None = None,
                 socket_group: str | None = None) -> None:
        """socket_group: the group QEMU runs in (e.g. libvirt-qemu); it gets the run directory and the engine
        sockets (mode 0660), nobody else does."""
        self.run_dir = run_dir
        self.poll_us = poll_us
        self.socket_group = socket_group
        self.owner = ""  # the state file whose VMs these engines serve (set by the Manager)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # (vm uuid, nsid) -> the (IOPS, bytes/s) last set on that namespace by this process: the engine does not
        # report them, so a new nvmetd sets each namespace's limits once, then only what changed
        self._limits_set: dict[tuple[str, int], tuple[int, int]] = {}

    # Paths are named after the VM's UUID: validated, short enough for a Unix socket path, and stable.
    def socket_path(self, vm: Vm) -> Path:
        return self.run_dir / f"{vm.uuid}.sock"

    def _pid_path(self, vm_uuid: str) -> Path:
        return self.run_dir / f"{vm_uuid}.pid"

    def client(self, vm: Vm) -> EngineClient:
        return EngineClient(self.socket_path(vm))

    # ------------------------------------------------------------------ reconcile
    def reconcile(self, specs: list[EngineSpec]) -> dict[str, ObjectStatus]:
        """Bring every engine to its spec and stop engines of VMs that have no vhost disk any more.

        One VM's failure is reported against that VM and never stops the others (as the kernel applier does)."""
        self._reap()
        statuses: dict[str, ObjectStatus] = {}
        wanted = {spec.vm.uuid for spec in specs}
        for spec in specs:
            key, label = f"vhost/{spec.vm.uuid}", f"vhost engine of VM {spec.vm.name}"
            try:
                changed = self._converge(spec)
                statuses[key] = ObjectStatus(CHANGED if changed else OK, label)
            except Exception as exc:  # reported per object; the daemon keeps serving the other VMs
                log.error("%s: %s", label, exc)
                statuses[key] = ObjectStatus(FAILED, label, str(exc), blocking=True)
        if self.run_dir.is_dir():
            for pidfile in sorted(self.run_dir.glob("*.pid")):
                if pidfile.stem not in wanted and self._owned(pidfile.stem):
                    self._stop(pidfile.stem)
                    statuses[f"vhost/{pidfile.stem}"] = ObjectStatus(REMOVED, f"vhost engine {pidfile.stem}")
        return statuses

    def _converge(self, spec: EngineSpec) -> bool:
        client = self.client(spec.vm)
        changed = False
        if not client.alive():
            self._start(spec.vm)
            changed = True
        current = client.namespaces()
        for nsid, entry in current.items():
            want = spec.namespaces.get(nsid)
            if want is None or want[0] != entry.name:
                client.detach(nsid)
                self._limits_set.pop((spec.vm.uuid, nsid), None)
                log.info("vm=%s nsid=%d disk=%s: namespace detached from the vhost engine", spec.vm.name, nsid,
                         entry.name)
                changed = True
        current = client.namespaces()
        for nsid, (disk, path) in sorted(spec.namespaces.items()):
            if nsid not in current:
                client.attach(nsid, path, disk)
                self._limits_set.pop((spec.vm.uuid, nsid), None)
                log.info("vm=%s nsid=%d disk=%s: namespace attached to the vhost engine", spec.vm.name, nsid, disk)
                changed = True
        for nsid, (disk, _path) in sorted(spec.namespaces.items()):
            want, key = spec.limits.get(nsid, (0, 0)), (spec.vm.uuid, nsid)
            if self._limits_set.get(key) != want:
                client.set_limits(nsid, *want)  # takes effect on the running queues (vn_ns_set_limits)
                self._limits_set[key] = want
                log.info("vm=%s nsid=%d disk=%s: engine limits %d IOPS, %d bytes/s (0: none)", spec.vm.name, nsid,
                         disk, *want)
        return changed

    # ------------------------------------------------------------------ processes
    def _start(self, vm: Vm) -> None:
        self._stop(vm.uuid)  # a stale engine that no longer answers, if any
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        sock = self.socket_path(vm)
        if len(os.fsencode(sock)) > UNIX_PATH_MAX:
            raise RuntimeError(f"vhost engine socket path {sock} is longer than a Unix socket path may be "
                               f"({UNIX_PATH_MAX} bytes): choose a shorter --vhost-dir")
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        argv = [sys.executable, "-m", "vhost_nvme.engine", "--socket", str(sock), "--name", vm.uuid]
        if self.poll_us is not None:
            argv += ["--poll-us", str(self.poll_us)]
        with open(self.run_dir / f"{vm.uuid}.log", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._children[vm.uuid] = proc
        (self.run_dir / f"{vm.uuid}.owner").write_text(self.owner)
        tmp = self._pid_path(vm.uuid).with_suffix(".pid.tmp")
        tmp.write_text(f"{proc.pid}\n")
        tmp.replace(self._pid_path(vm.uuid))
        client = EngineClient(sock)
        deadline = time.monotonic() + START_TIMEOUT
        while not client.alive():
            if proc.poll() is not None:
                raise RuntimeError(f"the vhost-nvme engine exited with status {proc.returncode}; "
                                   f"see {self.run_dir / (vm.uuid + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vhost-nvme engine did not answer on {sock} within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        self._share(sock)
        log.info("vm=%s pid=%d socket=%s: vhost engine started", vm.name, proc.pid, sock)

    def _share(self, sock: Path) -> None:
        if self.socket_group is None:
            return
        import grp

        gid = grp.getgrnam(self.socket_group).gr_gid
        os.chown(self.run_dir, -1, gid)
        os.chown(sock, -1, gid)
        os.chmod(sock, 0o660)

    def _owned(self, vm_uuid: str) -> bool:
        """Only engines started for this state are stopped as orphans: another Manager sharing the run directory
        (a benchmark, a second nvmetd on another state file) must never take a running guest's disks away."""
        try:
            return (self.run_dir / f"{vm_uuid}.owner").read_text() == self.owner
        except OSError:
            return False

    def _engine_pid(self, vm_uuid: str) -> int | None:
        """The pid in the pid file, if that process is still this VM's engine (pids get reused)."""
        try:
            pid = int(self._pid_path(vm_uuid).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        sock = str(self.run_dir / f"{vm_uuid}.sock").encode()
        return pid if b"vhost_nvme.engine" in cmdline and sock in cmdline else None

    def _stop(self, vm_uuid: str) -> None:
        pid = self._engine_pid(vm_uuid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self._engine_pid(vm_uuid) is not None and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)
            if self._engine_pid(vm_uuid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            log.info("vm_uuid=%s pid=%d: vhost engine stopped", vm_uuid, pid)
        self._reap()
        for suffix in (".pid", ".sock", ".owner"):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / f"{vm_uuid}{suffix}").unlink()

    def _reap(self) -> None:
        """Collect engines started by this process that have exited (no zombies)."""
        for vm_uuid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[vm_uuid]
