"""Real NVMe drives (the rig's emulated `-device nvme` controllers): an nvmet passthru subsystem on one, and a ZFS
mirror over two that keeps a VM's disk serving while a drive is hot-removed and resilvers when it comes back.

Everything goes through a real nvmetd (`nvmetctl apply`, `pool create --layout mirror`, `attach`), and drives are
pulled and re-plugged through QEMU's QMP (`device_del`/`device_add`, relayed by the rig: rig/drives.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from target.configfs import ConfigFS
from tests.conftest import wipe
from tests.kernel import drives, hostside
from tests.kernel.backend_rig import need
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

PT_NQN = "nqn.2026-11.io.nvmetd:passthru-drive0"
PT_HOST = "nqn.2014-08.org.nvmexpress:uuid:7d1c0b7e-1f0a-4c55-9d55-0a1b2c3d4e5f"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:0badc0de-0000-4000-8000-000000000bad"
QEMU_MODEL = "QEMU NVMe Ctrl"
MIRROR = "mirror"
ZPOOL = f"nvmetd-{MIRROR}"


@pytest.fixture(scope="module")
def daemon(nvmet_kernel: ConfigFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One nvmetd for this module's tests: its start-up (a FastAPI import under TCG) is the costliest step."""
    base = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else tmp_path_factory.mktemp("drives")
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon(Path(tempfile.mkdtemp(prefix="drives-", dir=base)))  # tmpfs in the rig, not the overlay root
    (d.base / "nvmetd.toml").write_text("")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.base, ignore_errors=True)


def _fio(device: Path, *extra: str) -> subprocess.Popen[str]:
    """crc32c-verified I/O: every 4 KiB written carries its offset and checksum, checked when read back."""
    return subprocess.Popen(
        ["fio", "--name=drives", f"--filename={device}", "--direct=1", "--ioengine=libaio", "--iodepth=4",
         "--bs=16k", "--verify=crc32c", "--verify_interval=4k", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fio_done(proc: subprocess.Popen[str], timeout: float = 900, stopped: bool = False) -> dict:
    """fio's result; `stopped`: we ended it with SIGINT, which fio answers with exit 128 (a verify failure is exit
    1 and an error in the job), so 128 is accepted then, and only then."""
    out, err = proc.communicate(timeout=timeout)
    ok = (0, 128) if stopped else (0,)
    assert proc.returncode in ok and "verify:" not in err, f"fio failed (exit {proc.returncode}): {err.strip()[-800:]}"
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def _written(device: Path) -> int:
    """Sectors written to `device` so far (the host side of the VM's disk): evidence that I/O is flowing."""
    return int((Path("/sys/block") / device.name / "stat").read_text().split()[6])


def _wait(what: str, done, timeout: float = 300.0, interval: float = 0.5):
    print(f"drives: waiting for {what}", flush=True)  # with -s, the log says where a slow run is
    deadline = time.monotonic() + timeout
    while True:
        value = done()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def test_passthru_subsystem_on_a_real_drive(daemon: Daemon, cfs: ConfigFS) -> None:
    serial = drives.require(1)[0]
    ctrl = drives.controller(serial)
    assert ctrl, f"drive {serial} is not in /sys/class/nvme"
    state = {"hosts": [{"nqn": PT_HOST}, {"nqn": STRANGER}],
             "subsystems": [{"nqn": PT_NQN, "allowed_hosts": [PT_HOST],
                             "passthru": {"device_path": f"/dev/{ctrl}", "enable": True}}],
             "ports": [{"id": 7, "trtype": "loop", "subsystems": [PT_NQN]}]}
    (daemon.base / "pt.json").write_text(json.dumps(state))
    daemon.ctl("apply", str(daemon.base / "pt.json"))
    assert cfs.read(f"subsystems/{PT_NQN}/passthru", "enable") == "1"
    assert cfs.read(f"subsystems/{PT_NQN}/passthru", "device_path") == f"/dev/{ctrl}"

    refused = hostside.connect("loop", PT_NQN, STRANGER, check=False)
    assert refused.returncode != 0 and not hostside.controllers(PT_NQN), "a host not allowed got in"
    hostside.connect("loop", PT_NQN, PT_HOST)
    try:
        dev = hostside.namespace_device(PT_NQN, 1, "loop", timeout=60)
        (fabric,) = hostside.controllers(PT_NQN, "loop")
        ident = json.loads(subprocess.run(["nvme", "id-ctrl", f"/dev/{fabric}", "-o", "json"], check=True,
                                          capture_output=True, text=True).stdout)
        # the drive itself answers Identify: its serial and model, not nvmet's own
        assert ident["sn"].strip() == serial and ident["mn"].strip() == QEMU_MODEL, ident
        assert (hostside.SYS_NVME / fabric / "serial").read_text().strip() == serial
        _fio_done(_fio(dev, "--rw=randwrite", "--size=16M"))
        # what the host wrote through the fabric is on the drive: read it back on the drive's own namespace
        _fio_done(_fio(Path(f"/dev/{ctrl}n1"), "--rw=read", "--size=16M"))
    finally:
        hostside.disconnect(PT_NQN)
    (daemon.base / "empty.json").write_text(json.dumps({}))
    daemon.ctl("apply", str(daemon.base / "empty.json"))
    assert PT_NQN not in cfs.listdir("subsystems")


def _pool(daemon: Daemon) -> dict:
    return daemon.ctl_json("pool", "show", MIRROR)


def _member(show: dict, drive: Path) -> str:
    """The state of the member on `drive` (ZFS labels a whole disk and names its partition: `...-part1`)."""
    (state,) = [v for k, v in show["members"].items() if k in (str(drive), f"{drive}-part1")]
    return state


@pytest.fixture
def mirror(daemon: Daemon, cfs: ConfigFS) -> Iterator[list[Path]]:
    """A ZFS mirror pool over drives 1 and 2 (their /dev/disk/by-id paths: the same after a re-plug)."""
    need("zpool", "fio")
    serials = drives.require(3)[1:3]
    paths = [drives.stable_path(s) for s in serials]
    try:
        yield paths
    finally:
        wipe()  # a zvol still an enabled namespace makes `zpool destroy` hang unkillably (kernel-rig.md)
        for index, serial in enumerate(serials, start=1):
            if drives.controller(serial) is None:
                drives.put_back(index)
        subprocess.run(["zpool", "destroy", "-f", ZPOOL], check=False, capture_output=True)


def test_zfs_mirror_keeps_serving_through_drive_loss_and_resilvers(daemon: Daemon, mirror: list[Path]) -> None:
    created = daemon.ctl_json("pool", "create", MIRROR, "--kind", "zfs", "--layout", "mirror", *map(str, mirror))
    assert created["layout"] == "mirror" and created["redundancy"] == "clean", created
    assert len(created["members"]) == 2 and all(_member(created, d) == "ONLINE" for d in mirror), created
    # the ARC keeps no data of this pool: every read below is answered by a drive, never from memory
    subprocess.run(["zfs", "set", "primarycache=metadata", f"{ZPOOL}/nvmetd"], check=True, capture_output=True)
    daemon.ctl("disk", "create", "d1", "--pool", MIRROR, "--size", "32M", "--thick")
    dev = Path(daemon.ctl_json("attach", "vm1", "d1", "--transport", "loop")["device"])

    # writes with inline verification (every block read back soon after it is written), running until stopped
    fio = _fio(dev, "--rw=randwrite", "--size=24M", "--loops=100000", "--verify_backlog=64")
    try:
        start = _written(dev)
        _wait("fio writing", lambda: _written(dev) > start + 8192)
        drives.pull(2)
        show = _wait("pool degraded", lambda: (p := _pool(daemon))["redundancy"] == "degraded" and p)
        assert _member(show, mirror[1]) == "REMOVED" and _member(show, mirror[0]) == "ONLINE", show
        # nvmetd's own status (GET /v1/status: what an agent polls) says so too
        assert daemon.request("GET", "/v1/status").json()["pools"][MIRROR]["redundancy"] == "degraded"
        # the VM's disk keeps serving on one drive
        after = _written(dev)
        _wait("fio writing on the degraded pool", lambda: fio.poll() is None and _written(dev) > after + 8192)

        assert drives.put_back(2) == mirror[1]
        repaired = daemon.ctl_json("pool", "repair", MIRROR)
        assert [o.removesuffix("-part1") for o in repaired["onlined"]] == [str(mirror[1])], repaired
        _wait("resilvered", lambda: _pool(daemon)["redundancy"] == "clean", timeout=600)
        assert fio.poll() is None, "fio stopped while the pool was degraded or resilvering"
    finally:
        fio.send_signal(signal.SIGINT)
    job = _fio_done(fio, stopped=True)
    assert job["write"]["io_bytes"] > 24 << 20  # more than one pass went through the drive loss

    # the re-added drive holds every block: with the other drive pulled, all reads come from it
    drives.pull(1)
    _wait("pool degraded on drive 2 alone", lambda: _pool(daemon)["redundancy"] == "degraded")
    _fio_done(_fio(dev, "--rw=read", "--size=24M"))
    assert drives.put_back(1) == mirror[0]
    daemon.ctl("pool", "repair", MIRROR)
    _wait("resilvered", lambda: _pool(daemon)["redundancy"] == "clean", timeout=600)

    daemon.ctl("detach", "vm1", "d1")
    daemon.ctl("disk", "delete", "d1")
    daemon.ctl("pool", "destroy", MIRROR)


LVM_MIRROR = "lvmirror"


@pytest.fixture
def lvm_mirror(daemon: Daemon, cfs: ConfigFS) -> Iterator[list[Path]]:
    """Drives 1 and 2 (stable paths) for an LVM raid1 pool; afterwards both drives are back and the VG is gone."""
    need("lvcreate", "fio")
    serials = drives.require(3)[1:3]
    paths = [drives.stable_path(s) for s in serials]
    # the drives come as the ZFS mirror test left them (a GPT label of zpool's): a used drive is the user's to wipe,
    # pool create rightly refuses a partitioned device
    subprocess.run(["wipefs", "--all", *map(str, paths)], check=True, capture_output=True)
    try:
        yield paths
    finally:
        wipe()
        for index, serial in enumerate(serials, start=1):
            if drives.controller(serial) is None:
                drives.put_back(index)
        subprocess.run(["vgremove", "--yes", "--force", f"nvmetd_{LVM_MIRROR}"], check=False, capture_output=True)


def test_lvm_raid1_keeps_serving_through_drive_loss_and_repairs(daemon: Daemon, lvm_mirror: list[Path]) -> None:
    """The same promise on LVM: a thin disk in a thin pool whose data and metadata are raid1 over two drives."""
    created = daemon.ctl_json("pool", "create", LVM_MIRROR, "--kind", "lvm", "--layout", "mirror",
                              *map(str, lvm_mirror))
    assert created["layout"] == "mirror" and created["redundancy"] == "clean", created
    assert created["members"] == {str(d): "ONLINE" for d in lvm_mirror}, created
    daemon.ctl("disk", "create", "l1", "--pool", LVM_MIRROR, "--size", "24M")
    dev = Path(daemon.ctl_json("attach", "vm2", "l1", "--transport", "loop")["device"])

    fio = _fio(dev, "--rw=randwrite", "--size=16M", "--loops=100000", "--verify_backlog=64")
    try:
        start = _written(dev)
        _wait("fio writing", lambda: _written(dev) > start + 4096)
        drives.pull(2)
        show = _wait("pool degraded", lambda: (p := daemon.ctl_json("pool", "show", LVM_MIRROR))["redundancy"]
                     == "degraded" and p)
        assert show["members"] == {str(lvm_mirror[0]): "ONLINE", str(lvm_mirror[1]): "MISSING"}, show
        after = _written(dev)
        _wait("fio writing on the degraded pool", lambda: fio.poll() is None and _written(dev) > after + 4096)

        assert drives.put_back(2) == lvm_mirror[1]
        # back, but its leg was failed by dm-raid: still degraded until repaired
        show = daemon.ctl_json("pool", "show", LVM_MIRROR)
        assert show["redundancy"] == "degraded" and show["members"][str(lvm_mirror[1])] != "ONLINE", show
        repaired = daemon.ctl_json("pool", "repair", LVM_MIRROR)
        assert repaired["onlined"] == [str(lvm_mirror[1])], repaired
        _wait("resynced", lambda: daemon.ctl_json("pool", "show", LVM_MIRROR)["redundancy"] == "clean",
              timeout=600)
        assert fio.poll() is None, "fio stopped while the pool was degraded or resyncing"
    finally:
        fio.send_signal(signal.SIGINT)
    job = _fio_done(fio, stopped=True)
    assert job["write"]["io_bytes"] > 16 << 20  # more than one pass went through the drive loss

    # the re-added drive holds every block: with the other drive pulled, all reads come from it
    drives.pull(1)
    _wait("pool degraded on drive 2 alone",
          lambda: daemon.ctl_json("pool", "show", LVM_MIRROR)["redundancy"] == "degraded")
    _fio_done(_fio(dev, "--rw=read", "--size=16M"))
    assert drives.put_back(1) == lvm_mirror[0]
    daemon.ctl("pool", "repair", LVM_MIRROR)  # LVM changes no VG while one of its PVs is missing
    daemon.ctl("detach", "vm2", "l1")
    daemon.ctl("disk", "delete", "l1")
    daemon.ctl("pool", "destroy", LVM_MIRROR)
