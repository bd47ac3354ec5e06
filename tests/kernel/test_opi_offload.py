"""Offload mode end to end on the real kernel, with a software DPU.

The DPU is a second nvmetd (OPI server mode, no kernel target of its own: `--configfs` points nowhere) in a
network namespace of its own, behind a veth pair with addresses of our own, and in a cgroup pinned to CPU 1
(nvmetd/opi/softdpu.py). This host's nvmetd is the storage target (an LVM thin volume on a loop device) and the
control plane: `nvmetctl attach vm1 disk --transport dpu` makes it export the disk over NVMe/TCP to the DPU's
host NQN and ask the DPU (OPI) for a remote controller + path + subsystem + namespace + PCIE controller. The guest
(vhost_nvme.guest, playing QEMU + the guest's NVMe driver) then does I/O through the DPU's vhost-nvme engine:
VM queues -> DPU engine -> DPU's kernel NVMe/TCP initiator -> veth -> nvmet -> LVM thin.

Every block is checked by crc32c when read back through the guest and, after a guest Flush, on the thin volume
itself. The DPU's engine writes through its page cache (a Flush is its fdatasync), so before each phase that
must reach storage the DPU's cache of the remote namespace is dropped: those reads then cross the path.

Killing the DPU's nvmetd does not stop the guest's I/O; the storage path dropping (the target removes the port's
link to the export) and coming back is survived without a verify error, and the I/O issued meanwhile is shown to
wait for it; pydpu reads the DPU's stats; detach removes both sides. The host CPU per I/O outside the guest and the
DPU's cgroup is printed (nvmetd/opi/cpu_split.py says what one kernel serving both sides can and cannot show).
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import google_crc32c
import grpc
import pytest
from pydpu import storage

from nvmetd.opi import cpu_split
from nvmetd.opi.offload import EXPORT_PREFIX
from nvmetd.opi.softdpu import CGROUP, DPU_HOSTNQN, HOST_IP
from target.configfs import ConfigFS
from target.store import read_document
from tests.kernel import hostside
from tests.kernel.opi_world import OpiWorld
from vhost_nvme.guest import GuestDriver
from vhost_nvme.guest.driver import sqe
from vhost_nvme.nvme_spec import IoOpc

pytestmark = pytest.mark.kernel

BLOCK = 4096
DISK_BYTES = 64 << 20
DROP_SECONDS = 3.0  # how long the storage path stays down
JOB_PAIRS = 150  # 4 KiB write + read pairs of the measured guest job


class Guest:
    """The VM: a guest driver on the engine's socket that remembers the crc32c of every block it wrote."""

    def __init__(self, sock: str, seed: int) -> None:
        self.g = GuestDriver(sock, timeout=180)  # a dropped path stalls I/O until it reconnects
        self.g.enable()
        self.g.create_io_queue(1, 64)
        self.lba = self.g.lba_size(1)
        self.rng = random.Random(seed)
        self.written: dict[int, int] = {}  # byte offset -> crc32c

    def write(self, offset: int) -> None:
        data = self.rng.randbytes(BLOCK)
        assert self.g.write(1, 1, offset // self.lba, data, lba_size=self.lba).status == 0, offset
        self.written[offset] = google_crc32c.value(data)

    def check(self, offset: int) -> None:
        cqe, data = self.g.read(1, 1, offset // self.lba, BLOCK // self.lba, lba_size=self.lba)
        assert cqe.status == 0 and google_crc32c.value(data) == self.written[offset], f"offset {offset}"

    def flush(self) -> None:
        assert self.g.run(1, sqe(IoOpc.FLUSH, nsid=1)).status == 0

    def burst(self, count: int) -> None:
        """count random blocks written, flushed, and every block written so far read back and verified."""
        for _ in range(count):
            self.write(self.rng.randrange(DISK_BYTES // BLOCK) * BLOCK)
        self.flush()
        for offset in list(self.written):
            self.check(offset)

    def job(self, pairs: int) -> int:
        """The measured job: QD1 4 KiB write then read of the same block; returns the I/O count."""
        for i in range(pairs):
            offset = (i % 1024) * BLOCK
            self.write(offset)
            self.check(offset)
        return 2 * pairs


def drop_cache(device: Path) -> None:
    """Evict the DPU's cached pages of the remote namespace (one kernel: its page cache is this one's)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def on_volume(path: str, written: dict[int, int]) -> None:
    """The blocks are on the storage target's thin volume (read below every cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for offset, crc in written.items():
            assert google_crc32c.value(os.pread(fd, BLOCK, offset)) == crc, f"{path} offset {offset}"
    finally:
        os.close(fd)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (the engine's parent, the first DPU nvmetd, is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_offload_vm_disk_through_software_dpu(opi_world: OpiWorld, cfs: ConfigFS,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    host, dpu = opi_world.host, opi_world.dpu
    assert host.request("POST", "/v1/disks", {"name": "vmdisk", "pool": "thin", "size": "64M"}).status_code == 200
    res = host.ctl_json("attach", "vm1", "vmdisk", "--transport", "dpu")
    assert res["transport"] == "dpu" and res["nsid"] == 1 and Path(res["vhost_socket"]).is_socket()
    assert any("nvmeControllers/pcie" in n for n in res["notes"])
    export = next(s for s in cfs.listdir("subsystems") if s.startswith(EXPORT_PREFIX))
    assert cfs.listdir(f"subsystems/{export}/allowed_hosts") == [DPU_HOSTNQN]
    assert cfs.read(f"subsystems/{export}", "attr_allow_any_host").strip() == "0"
    port = next(p for p in cfs.listdir("ports") if cfs.read(f"ports/{p}", "addr_traddr").strip() == HOST_IP)
    # no data path on the host: no engine of the host's nvmetd; the DPU's engine runs in the DPU's netns and
    # cgroup, on its CPU only
    assert not list((host.base.parent / "host-vhost").glob("*.sock"))
    engine_pid = int(next(dpu.vhost_dir.glob("*.pid")).read_text())
    assert dpu.proc is not None and netns(dpu.proc.pid) != netns(os.getpid())
    assert netns(engine_pid) == netns(dpu.proc.pid)
    assert str(engine_pid) in (CGROUP / "cgroup.procs").read_text().split()
    assert "Cpus_allowed_list:\t1\n" in Path(f"/proc/{engine_pid}/status").read_text()
    remote = hostside.namespace_device(export, 1, "tcp")  # the DPU's initiator's view of the export
    volume = host.request("GET", "/v1/disks/vmdisk").json()["device_path"]

    guest = Guest(res["vhost_socket"], seed=13)
    try:
        guest.burst(16)
        on_volume(volume, guest.written)

        # the host CPU per I/O outside the guest and the DPU, for one QD1 job (printed, not judged)
        before = cpu_split.sample(CGROUP)
        ios = guest.job(JOB_PAIRS)
        cost = cpu_split.split(before, cpu_split.sample(CGROUP), ios)
        with capsys.disabled():
            print("\noffload, one kernel serving host and DPU (host figure = upper bound, see cpu_split.py):")
            for line in cost.lines():
                print("  " + line)
        # the guest drove the job and the DPU's engine served it: both show up in their own share
        assert cost.ios == ios and cost.guest > 0 and cost.dpu > 0 and cost.total >= cost.guest + cost.dpu

        # the DPU's stats, read by pydpu: once flushed, the remote controller's counters saw every block written
        guest.flush()
        rc = storage.NvmeRemoteController(multipath=0, hdgst=False, ddgst=False)
        rc.name = res["notes"][0].split("created ", 1)[1].split(", ")[0]
        stats = rc.stats(f"unix:{dpu.opi}").stats
        assert stats.write_ops_count > 0 and stats.write_bytes_count >= len(guest.written) * BLOCK

        dpu.kill9()  # the DPU's control plane dies: the guest's queues and the engine do not
        drop_cache(remote)
        guest.burst(8)
        on_volume(volume, guest.written)
        dpu.spawn()  # a new DPU nvmetd starts up (and adopts the engine) while the path drops and returns

        # the storage path drops (the target unlinks the export from its port) and returns
        drop_cache(remote)
        link = f"ports/{port}/subsystems/{export}"
        cfs.unlink(link)
        errors: list[BaseException] = []

        def during_drop() -> None:
            try:
                guest.burst(4)  # reads miss the dropped cache, the Flush needs storage: all wait for the path
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        worker = threading.Thread(target=during_drop)
        worker.start()
        worker.join(DROP_SECONDS)
        assert worker.is_alive(), "the guest's I/O finished while the storage path was down: it never used it"
        cfs.symlink(f"subsystems/{export}", link)
        worker.join(timeout=300)
        assert not worker.is_alive() and errors == [], errors
        guest.burst(4)
        on_volume(volume, guest.written)
    finally:
        guest.g.close()

    dpu.wait_ready()
    state = read_document(dpu.base / "state.json")
    with pytest.raises(grpc.RpcError) as err:  # the restarted DPU kept its objects; a duplicate changes nothing
        storage.NvmeSubsystem(nqn=res["subsystem_nqn"]).create(f"unix:{dpu.opi}")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert read_document(dpu.base / "state.json") == state
    out = host.ctl_json("detach", "vm1", "vmdisk")
    assert out["detached"]
    assert not any(s.startswith(EXPORT_PREFIX) for s in cfs.listdir("subsystems"))
    assert not any(cfs.read(f"ports/{p}", "addr_traddr").strip() == HOST_IP for p in cfs.listdir("ports"))
    assert not list(dpu.vhost_dir.glob("*.sock")) and not running(engine_pid)
    assert not hostside.controllers(export)
    assert host.request("DELETE", "/v1/disks/vmdisk").status_code == 200
