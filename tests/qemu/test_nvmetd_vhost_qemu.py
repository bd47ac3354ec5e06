"""`nvmetctl attach VM DISK --transport vhost` end to end: the real nvmetd service starts the VM's engine, the
QEMU arguments it returns boot a TCG guest whose stock nvme driver sees the disk, a further attach appears in the
running guest as a new namespace, detach removes it, and a kill -9 of nvmetd does not interrupt the guest's I/O.

The vhost path needs no nvmet, so nvmetd runs on this machine's own kernel (its desired kernel tree is empty).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import pools
from tests.kernel.service_fixture import Daemon
from vhost_nvme.vm import VM

from .conftest import GUEST_APPEND

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    run_dir = Path(tempfile.mkdtemp(prefix="nvv-", dir="/tmp"))  # short: engine sockets are AF_UNIX paths
    d = Daemon(tmp_path, extra_args=["--vhost-dir", str(run_dir), "--no-host-connect"])
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=d.pools_root)
    d.start()
    yield d
    try:
        for vm in d.ctl_json("vm", "list"):
            for disk in vm["disks"]:
                d.ctl("detach", vm["name"], disk, check=False)
    finally:
        d.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def file_sha(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def guest_sha(out: str) -> str:
    m = re.search(r"^([0-9a-f]{64})\s", out, re.M)
    assert m, out
    return m.group(1)


def test_attach_vhost_boots_guest_and_hot_attaches(qemu: Path, daemon: Daemon, tmp_path: Path) -> None:
    daemon.ctl("disk", "create", "root", "--pool", "files", "--size", "32M")
    daemon.ctl("disk", "create", "data", "--pool", "files", "--size", "16M")
    first = daemon.ctl_json("attach", "guest1", "root", "--transport", "vhost", "--memory", "512M")
    assert first["transport"] == "vhost" and first["nsid"] == 1
    root_file = Path(daemon.ctl_json("disk", "show", "root")["device_path"])

    vm = VM(tmp_path / "vm", device_args=first["qemu_args"], append=GUEST_APPEND, qemu=qemu)
    try:
        out = vm.check("cat /sys/class/nvme/nvme0/subsysnqn /sys/block/nvme0n1/size")
        subnqn, size = out.split()
        assert subnqn == first["subsystem_nqn"]  # the VM's own subsystem NQN, as on the nvmet path
        assert int(size) * 512 == 32 * MiB

        want = guest_sha(vm.check("dd if=/dev/urandom of=/tmp/p bs=1M count=2 2>/dev/null && sha256sum /tmp/p"))
        vm.check("dd if=/tmp/p of=/dev/nvme0n1 bs=1M seek=3 oflag=direct 2>/dev/null && sync")
        assert file_sha(root_file, 3 * MiB, 2 * MiB) == want  # the guest's data is in nvmetd's disk

        # a second disk while the guest runs: a new namespace on the same controller, no new device
        second = daemon.ctl_json("attach", "guest1", "data", "--transport", "vhost")
        assert second["nsid"] == 2 and second["vhost_socket"] == first["vhost_socket"]
        out = vm.check("for i in $(seq 120); do [ -b /dev/nvme0n2 ] && break; sleep 0.5; done; "
                       "cat /sys/block/nvme0n2/size; ls /sys/class/nvme", timeout=120)
        lines = out.split()
        assert int(lines[0]) * 512 == 16 * MiB and lines[1:] == ["nvme0"]
        vm.check("echo hot-attached | dd of=/dev/nvme0n2 bs=4k seek=7 conv=sync oflag=direct 2>/dev/null")
        data_file = Path(daemon.ctl_json("disk", "show", "data")["device_path"])
        with open(data_file, "rb") as f:
            f.seek(7 * 4096)
            assert f.read(12) == b"hot-attached"

        # nvmetd dies and comes back: the engine and the guest's I/O carry on, the new nvmetd adopts the engine
        pid_file = Path(first["vhost_socket"]).with_suffix(".pid")
        pid = pid_file.read_text()
        daemon.kill9()
        got = guest_sha(vm.check("dd if=/dev/nvme0n1 bs=1M skip=3 count=2 iflag=direct 2>/dev/null | sha256sum"))
        assert got == want  # served while nvmetd is down
        daemon.start()
        assert daemon.ctl_json("vm", "show", "guest1")["disks"]["data"]["nsid"] == 2
        assert pid_file.read_text() == pid

        # detach: the namespace leaves the running guest
        daemon.ctl("detach", "guest1", "data")
        out = vm.check("for i in $(seq 120); do [ -b /dev/nvme0n2 ] || break; sleep 0.5; done; ls /dev", timeout=120)
        assert "nvme0n2" not in out.split() and "nvme0n1" in out.split()
        got = guest_sha(vm.check("dd if=/dev/nvme0n1 bs=1M skip=3 count=2 iflag=direct 2>/dev/null | sha256sum"))
        assert got == want
    finally:
        vm.close()


def test_qmp_hotplugs_the_vhost_controller_into_a_running_guest(qemu: Path, daemon: Daemon, tmp_path: Path) -> None:
    """`attach --qmp` plugs the VM's controller with its first vhost disk; `detach --qmp` of its last one unplugs
    it. The guest starts with no NVMe device at all, only shared RAM and an empty PCIe root port."""
    daemon.ctl("disk", "create", "hot", "--pool", "files", "--size", "16M")
    qmp_sock = Path(tempfile.mkdtemp(prefix="nvq-", dir="/tmp")) / "qmp.sock"
    args = ["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-machine", "memory-backend=mem",
            "-device", "pcie-root-port,id=rp1,chassis=1,slot=1", "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    vm = VM(tmp_path / "vm", device_args=args, append=GUEST_APPEND, qemu=qemu)
    try:
        assert vm.run("ls /sys/class/nvme")[1].strip() == ""
        result = daemon.ctl_json("attach", "guest2", "hot", "--transport", "vhost", "--qmp", str(qmp_sock),
                                 "--qmp-bus", "rp1")
        assert result["hotplugged"] == {"device_id": "nvmetd-vm-guest2", "plugged": True, "bus": "rp1"}
        out = vm.check("for i in $(seq 120); do [ -b /dev/nvme0n1 ] && break; sleep 0.5; done; "
                       "cat /sys/class/nvme/nvme0/subsysnqn /sys/block/nvme0n1/size", timeout=120)
        subnqn, size = out.split()
        assert subnqn == result["subsystem_nqn"] and int(size) * 512 == 16 * MiB
        vm.check("echo plugged-in | dd of=/dev/nvme0n1 bs=4k seek=3 conv=sync oflag=direct 2>/dev/null")
        with open(daemon.ctl_json("disk", "show", "hot")["device_path"], "rb") as f:
            f.seek(3 * 4096)
            assert f.read(10) == b"plugged-in"

        daemon.ctl("detach", "guest2", "hot", "--qmp", str(qmp_sock))
        out = vm.check("for i in $(seq 120); do [ -e /sys/class/nvme/nvme0 ] || break; sleep 0.5; done; "
                       "ls /sys/class/nvme", timeout=120)
        assert out.strip() == ""
        assert daemon.ctl_json("vm", "show", "guest2")["disks"] == {}
        assert not Path(result["vhost_socket"]).exists()  # the VM's last vhost disk is gone: so is its engine
    finally:
        vm.close()
        shutil.rmtree(qmp_sock.parent, ignore_errors=True)
