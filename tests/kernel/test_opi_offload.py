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
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from backends import pools
from nvmetd.opi import softdpu
from nvmetd.opi.softdpu import CGROUP, DPU_HOSTNQN, HOST_IP, SoftDpu
from target.configfs import ConfigFS
from tests.kernel.backend_rig import Loops, need
from tests.kernel.service_fixture import Daemon
from vhost_nvme.guest import GuestDriver

pytestmark = [pytest.mark.kernel, pytest.mark.long]

MIB = 1 << 20


@pytest.fixture
def world(cfs: ConfigFS, scratch: Path):
    need("lvcreate", "ip")
    softdpu.make_network()
    softdpu.make_cgroup()
    dpu = SoftDpu(scratch / "dpu")
    host = Daemon(scratch / "host")
    (scratch / "host").mkdir()
    (scratch / "host" / "nvmetd.toml").write_text(dpu.host_config())
    loops = Loops(scratch)
    subprocess.run(["modprobe", "loop"], check=False, capture_output=True)
    pools.create_pool("lvm", "thin", [loops.make("pv", 512 * MIB)], root=host.pools_root)
    host.extra_args = ["--vhost-dir", str(scratch / "host-vhost")]
    try:
        dpu.start()
        host.start()
        yield host, dpu
    finally:
        host.stop()
        dpu.kill9()
        softdpu.remove_cgroup()  # the DPU's engines: only processes the software DPU started
        subprocess.run(["nvme", "disconnect-all"], capture_output=True, check=False)
        softdpu.remove_network()
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
    assert cfs.listdir(f"subsystems/{export}/allowed_hosts") == [DPU_HOSTNQN]
    port = next(p for p in cfs.listdir("ports") if cfs.read(f"ports/{p}", "addr_traddr").strip() == HOST_IP)
    # no data path on the host: no engine of the host's nvmetd, and the DPU's engine is in the DPU's cgroup
    assert not list((host.base / "host-vhost").glob("*.sock"))
    engine_pid = int(next(dpu.vhost_dir.glob("*.pid")).read_text())
    assert str(engine_pid) in (CGROUP / "cgroup.procs").read_text().split()

    g = GuestDriver(res["vhost_socket"], timeout=120)  # a dropped path stalls I/O until it reconnects
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
