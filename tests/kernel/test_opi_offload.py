"""Offload mode end to end on the real kernel, with a software DPU.

The DPU is a second nvmetd (OPI server mode, no kernel target of its own: `--configfs` points nowhere) in a
network namespace of its own, behind a veth pair with addresses of our own, and in a cgroup pinned to CPU 1.
This host's nvmetd is the storage target (an LVM thin volume on a loop device) and the control plane:
`nvmetctl attach vm1 disk --transport dpu` makes it export the disk over NVMe/TCP to the DPU's host NQN and ask
the DPU (OPI, pydpu's stubs) for a remote controller + path + subsystem + namespace + PCIE controller. The guest
(vhost_nvme.guest, playing QEMU + the guest's NVMe driver) then does I/O through the DPU's vhost-nvme engine:
VM queues -> DPU engine -> DPU's kernel NVMe/TCP initiator -> veth -> nvmet -> LVM thin.
Killing the DPU's nvmetd does not stop the guest's I/O; the storage path dropping and coming back is survived
without a verify error; detach removes both sides.

One kernel serves both sides here: the DPU's kernel work (nvme-tcp, the block layer) and the target's (nvmet) run
in the same kernel, so the CPU split between "host" and "DPU" is simulated, not physical (see the report).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest

from backends import pools
from nvmetd.opi.stubs import frontend_nvme_pb2 as fpb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as fgrpc
from target.configfs import ConfigFS
from tests.kernel.backend_rig import Loops, need
from tests.kernel.service_fixture import Daemon
from vhost_nvme.guest import GuestDriver

pytestmark = pytest.mark.kernel

NETNS = "nvmetd-dpu"
HOST_IP, DPU_IP = "192.168.240.1", "192.168.240.2"  # on the veth pair this test creates, nowhere else
DPU_HOST = "nqn.2014-08.org.nvmexpress:uuid:d9a0e1f2-3333-4b4c-8d8e-9f0a1b2c3d4e"
CGROUP = Path("/sys/fs/cgroup/nvmetd-dpu")
MIB = 1 << 20


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


class SoftDpu:
    """The software DPU: nvmetd in OPI-server mode in its own netns and cgroup (CPU 1)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.vhost_dir = Path(tempfile.mkdtemp(prefix="dpu-", dir="/tmp"))  # short: AF_UNIX paths
        self.opi = base / "opi.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.base / "nvmetd.toml").write_text("")
        log = open(self.base / "dpu.log", "ab")  # noqa: SIM115 (the daemon's whole life)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, sys.executable, "-m", "nvmetd.service", "--state",
             str(self.base / "state.json"), "--socket", str(self.base / "nvmetd.sock"), "--opi-socket",
             str(self.opi), "--pools-root", str(self.base / "pools"), "--keys-dir", str(self.base / "keys"),
             "--vhost-dir", str(self.vhost_dir), "--configfs", str(self.base / "no-kernel-target"),
             "--config", str(self.base / "nvmetd.toml"), "--restore-timeout", "1", "--drift-interval", "3600"],
            stdout=log, stderr=subprocess.STDOUT)
        (CGROUP / "cgroup.procs").write_text(str(self.proc.pid))  # before its engines start: they inherit it
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.base / "dpu.log").read_text()
            try:
                with grpc.insecure_channel(f"unix:{self.opi}") as ch:
                    fgrpc.FrontendNvmeServiceStub(ch).ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(), timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.3)
        raise AssertionError("the DPU's nvmetd did not answer: " + (self.base / "dpu.log").read_text())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def world(cfs: ConfigFS, scratch: Path):
    need("lvcreate", "ip")
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    run("ip", "netns", "add", NETNS)
    run("ip", "link", "add", "nvd-h", "type", "veth", "peer", "name", "nvd-d")
    run("ip", "link", "set", "nvd-d", "netns", NETNS)
    run("ip", "addr", "add", f"{HOST_IP}/30", "dev", "nvd-h")
    run("ip", "link", "set", "nvd-h", "up")
    for cmd in (["addr", "add", f"{DPU_IP}/30", "dev", "nvd-d"], ["link", "set", "nvd-d", "up"],
                ["link", "set", "lo", "up"]):
        run("ip", "netns", "exec", NETNS, "ip", *cmd)
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        run("mount", "-t", "cgroup2", "none", "/sys/fs/cgroup")
    Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+cpuset")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpuset.cpus").write_text("1")
    dpu_base = scratch / "dpu"
    dpu_base.mkdir()
    dpu = SoftDpu(dpu_base)
    host = Daemon(scratch / "host")
    (scratch / "host").mkdir()
    (scratch / "host" / "nvmetd.toml").write_text(
        f'[dpu]\nendpoint = "unix:{dpu.opi}"\nstorage_address = "{HOST_IP}"\nstorage_port = "4470"\n'
        f'hostnqn = "{DPU_HOST}"\nvhost_dir = "{dpu.vhost_dir}"\n')
    loops = Loops(scratch)
    subprocess.run(["modprobe", "loop"], check=False, capture_output=True)
    pools.create_pool("lvm", "thin", [loops.make("pv", 512 * MIB)], root=host.pools_root)
    host.extra_args = ["--vhost-dir", str(scratch / "host-vhost")]
    dpu.start()
    host.start()
    try:
        yield host, dpu
    finally:
        host.stop()
        if dpu.proc and dpu.proc.poll() is None:
            dpu.kill9()
        for pid in (CGROUP / "cgroup.procs").read_text().split():  # the DPU's engines: only what we started
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["nvme", "disconnect-all"], capture_output=True, check=False)
        time.sleep(0.5)
        CGROUP.rmdir()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
        pools.destroy_pool("thin", root=host.pools_root, force=True)
        loops.close()


def io(g: GuestDriver, slba: int, seed: int, size: int = 256 * 1024) -> None:
    """Write a pattern through the guest's queue, read it back, compare crc32 and bytes."""
    data = (seed.to_bytes(4, "little") * (size // 4))[:size]
    assert g.write(1, 1, slba, data).status == 0
    cqe, back = g.read(1, 1, slba, size // 512)
    assert cqe.status == 0 and zlib.crc32(back) == zlib.crc32(data) and back == data


def test_offload_vm_disk_through_software_dpu(world: tuple[Daemon, SoftDpu], cfs: ConfigFS) -> None:
    host, dpu = world
    host.ctl("disk", "create", "vmdisk", "--pool", "thin", "--size", "64M")
    res = host.ctl_json("attach", "vm1", "vmdisk", "--transport", "dpu")
    assert res["transport"] == "dpu" and res["nsid"] == 1 and Path(res["vhost_socket"]).is_socket()
    assert any("nvmeControllers/pcie" in n for n in res["notes"])
    export = next(s for s in cfs.listdir("subsystems") if s.startswith("nqn.2026-11.io.nvmetd:offload:"))
    assert cfs.listdir(f"subsystems/{export}/allowed_hosts") == [DPU_HOST]
    port = next(p for p in cfs.listdir("ports") if cfs.read(f"ports/{p}", "addr_traddr").strip() == HOST_IP)
    # no data path on the host: no engine of the host's nvmetd, and the DPU's engine is in the DPU's cgroup
    assert not list((host.base / "host-vhost").glob("*.sock"))
    engine_pid = int(next(dpu.vhost_dir.glob("*.pid")).read_text())
    assert str(engine_pid) in (CGROUP / "cgroup.procs").read_text().split()

    g = GuestDriver(res["vhost_socket"])
    try:
        g.enable()
        g.create_io_queue(1, 64)
        io(g, 0, 1)
        disk = host.ctl_json("disk", "show", "vmdisk")["device_path"]
        with open(disk, "rb", buffering=0) as f:  # the bytes are on the LVM thin volume of the storage target
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read(4) == (1).to_bytes(4, "little")

        dpu.kill9()  # the DPU's control plane dies: the guest's queues do not
        io(g, 4096, 2)

        # the storage path drops (the target unlinks the port) and returns: the guest's write waits, then lands
        link = f"ports/{port}/subsystems/{export}"
        cfs.unlink(link)
        done: list[BaseException | None] = []

        def late_io() -> None:
            try:
                io(g, 8192, 3)
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        t = threading.Thread(target=late_io)
        t.start()
        time.sleep(2)
        cfs.symlink(f"subsystems/{export}", link)
        t.join(timeout=120)
        assert done == [None], done
        io(g, 0, 4)
    finally:
        g.close()

    dpu.start()  # a new DPU nvmetd adopts the running engine; detach removes both sides
    out = host.ctl_json("detach", "vm1", "vmdisk")
    assert out["detached"]
    assert not any(s.startswith("nqn.2026-11.io.nvmetd:offload:") for s in cfs.listdir("subsystems"))
    assert not any(cfs.read(f"ports/{p}", "addr_traddr").strip() == HOST_IP for p in cfs.listdir("ports"))
    assert not list(dpu.vhost_dir.glob("*.sock"))
    assert not [c for c in Path("/sys/class/nvme").glob("nvme*")
                if (c / "subsysnqn").read_text().strip() == export]
