"""A software DPU for tests and benchmarks: nvmetd in OPI-server mode in a network namespace of its own (a veth
pair to this host's namespace, addresses we assign on it), in a cgroup pinned to one CPU, with no kernel target of
its own (`--configfs` points nowhere: it only initiates NVMe/TCP and serves PCIE functions with vhost-nvme
engines). Run as root, on a kernel with nvmet (the rig).

One kernel serves both sides: the DPU's kernel work (nvme-tcp initiator, block layer) runs in kernel threads that
no cgroup is charged for, so a CPU split measured here is an upper bound for the host's share, not a DPU's
physical separation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from nvmetd.opi.stubs import frontend_nvme_pb2 as fpb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as fgrpc

NETNS = "nvmetd-dpu"
HOST_IP, DPU_IP = "192.168.240.1", "192.168.240.2"  # only on the veth pair made here
DPU_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:d9a0e1f2-3333-4b4c-8d8e-9f0a1b2c3d4e"
CGROUP = Path("/sys/fs/cgroup/nvmetd-dpu")
HOST_VETH, DPU_VETH = "nvd-h", "nvd-d"


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def make_network() -> None:
    remove_network()
    _run("ip", "netns", "add", NETNS)
    _run("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", DPU_VETH)
    _run("ip", "link", "set", DPU_VETH, "netns", NETNS)
    _run("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_VETH)
    _run("ip", "link", "set", HOST_VETH, "up")
    for cmd in (["addr", "add", f"{DPU_IP}/30", "dev", DPU_VETH], ["link", "set", DPU_VETH, "up"],
                ["link", "set", "lo", "up"]):
        _run("ip", "netns", "exec", NETNS, "ip", *cmd)


def remove_network() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    subprocess.run(["ip", "link", "del", HOST_VETH], capture_output=True, check=False)


def make_cgroup(cpu: str = "1") -> None:
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        _run("mount", "-t", "cgroup2", "none", "/sys/fs/cgroup")
    Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+cpuset +cpu")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpuset.cpus").write_text(cpu)


def remove_cgroup() -> None:
    """Kill what is left in the DPU's cgroup (its engines: only processes this software DPU started)."""
    if not CGROUP.is_dir():
        return
    for pid in (CGROUP / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    # an engine killed with dirty pages of a remote namespace writes them back as it closes the device: slow
    # under emulation, so its exit takes a while
    deadline = time.monotonic() + 120
    while True:
        try:
            CGROUP.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class SoftDpu:
    """The DPU's nvmetd; its OPI socket is `opi`, its engines' sockets appear in `vhost_dir`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.vhost_dir = Path(tempfile.mkdtemp(prefix="dpu-", dir="/tmp"))  # short: AF_UNIX paths
        self.opi = base / "opi.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the DPU's nvmetd without waiting for it (its start-up can overlap other work)."""
        (self.base / "nvmetd.toml").write_text("")
        with open(self.base / "dpu.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", NETNS, sys.executable, "-m", "nvmetd.service", "--state",
                 str(self.base / "state.json"), "--socket", str(self.base / "nvmetd.sock"), "--opi-socket",
                 str(self.opi), "--pools-root", str(self.base / "pools"), "--keys-dir", str(self.base / "keys"),
                 "--vhost-dir", str(self.vhost_dir), "--configfs", str(self.base / "no-kernel-target"),
                 "--config", str(self.base / "nvmetd.toml"), "--restore-timeout", "1", "--drift-interval", "3600"],
                stdout=log, stderr=subprocess.STDOUT)
        (CGROUP / "cgroup.procs").write_text(str(self.proc.pid))  # before its engines start: they inherit it

    def wait_ready(self, timeout: float = 300.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the DPU's nvmetd exited: " + self.log_tail())
            try:
                with grpc.insecure_channel(f"unix:{self.opi}") as ch:
                    fgrpc.FrontendNvmeServiceStub(ch).ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(), timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.3)
        raise RuntimeError("the DPU's nvmetd did not answer: " + self.log_tail())

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.base / "dpu.log").read_text()[-chars:]
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def host_config(self, storage_port: str = "4470") -> str:
        """The [dpu] table of the host's nvmetd.toml that points at this DPU."""
        return (f'[dpu]\nendpoint = "unix:{self.opi}"\nstorage_address = "{HOST_IP}"\n'
                f'storage_port = "{storage_port}"\nhostnqn = "{DPU_HOSTNQN}"\nvhost_dir = "{self.vhost_dir}"\n')
