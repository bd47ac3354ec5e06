"""Storage faults under a served namespace, made with the kernel's own targets: dm-flakey (every I/O fails) and
dm-delay (every I/O stalls), swapped in under a live nvmet namespace by a table reload, as a dying or hanging drive
would behave; and a scsi_debug disk deleted from the SCSI bus under an enabled namespace (a pulled drive), then
rescanned (put back, under another /dev name: the namespace's device_path is a symlink, as /dev/disk/by-id is).
A real nvmetd serves the namespaces over nvme-loop; fio with crc32c verify runs on the host's /dev/nvme nodes
before, during and after each fault.

What must hold: errors reach the host as I/O errors, never as data that verifies wrong (what was acknowledged before
the fault reads back intact after it); `nvmetctl status` (text and --json) and /metrics name the namespace's health;
the kernel logs no oops, BUG or WARNING; once the device is healthy again the same namespace serves I/O with no
restart of nvmetd and no reconnect (a pulled and re-added drive: nvmetd's drift timer re-opens the namespace).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from target.configfs import ConfigFS
from tests.conftest import wipe
from tests.kernel import hostside
from tests.kernel.backend_rig import MIB, need
from tests.kernel.service_fixture import Daemon
from tests.kernel.test_vhost_kernel import KERNEL_TROUBLE, _dmesg

pytestmark = pytest.mark.kernel

HOST = "nqn.2014-08.org.nvmexpress:uuid:5f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
SUB = "nqn.2026-11.io.nvmetd:faults"
DM = "nvmetd-fault"
DISK = 16 * MIB
STALL_MS = 3000  # longer than the health probe waits (2 s), far below the host's I/O timeout (30 s)


@dataclass
class Served:
    daemon: Daemon
    loop: str
    dev: Path  # the host's block device for namespace 1 (on the dm device)
    drive_link: Path  # namespace 2's device_path: a symlink to the scsi_debug disk

    def table(self, target: str, *args: str) -> None:
        """Swap the dm table under the live namespace (suspend flushes what a delay target holds)."""
        line = f"0 {DISK // 512} {target} {' '.join([self.loop, '0', *args])}"
        subprocess.run(["dmsetup", "suspend", DM], check=True, capture_output=True)
        subprocess.run(["dmsetup", "reload", DM, "--table", line], check=True, capture_output=True)
        subprocess.run(["dmsetup", "resume", DM], check=True, capture_output=True)


def _scsi_debug_disks() -> list[tuple[str, str]]:
    """(scsi host, disk name) of every scsi_debug disk."""
    found = []
    for block in Path("/sys/bus/pseudo/drivers/scsi_debug").glob("adapter*/host*/target*/*/block/*"):
        found.append((block.parents[3].name, block.name))
    return sorted(found)


@pytest.fixture(scope="module")
def served(nvmet_kernel: ConfigFS) -> Iterator[Served]:
    need("dmsetup", "fio")
    subprocess.run(["modprobe", "-a", "dm-flakey", "dm-delay", "loop"], check=True, capture_output=True)
    wipe()
    base = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(subprocess.run(["mktemp", "-d", "-p", str(base), "faults.XXXX"], check=True,
                                  capture_output=True, text=True).stdout.strip())
    image = scratch / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["dmsetup", "create", DM, "--table", f"0 {DISK // 512} linear {loop} 0"], check=True,
                   capture_output=True)
    subprocess.run(["modprobe", "scsi_debug", f"dev_size_mb={DISK // MIB}", "num_tgts=1", "max_luns=1"],
                   check=True, capture_output=True)
    drive_link = scratch / "drive"
    wait_for("the scsi_debug disk", lambda: bool(_scsi_debug_disks()))
    drive_link.symlink_to(Path("/dev") / _scsi_debug_disks()[0][1])
    daemon = Daemon(scratch / "d", extra_args=["--drift-interval", "3"])  # the timer re-opens replaced devices
    daemon.base.mkdir()
    (daemon.base / "nvmetd.toml").write_text("")
    state = scratch / "state.json"
    state.write_text(json.dumps({
        "hosts": [{"nqn": HOST}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                        "namespaces": [{"nsid": 1, "device_path": f"/dev/mapper/{DM}"},
                                       {"nsid": 2, "device_path": str(drive_link)}]}],
        "ports": [{"id": 9, "trtype": "loop", "subsystems": [SUB]}]}))
    try:
        daemon.start()
        daemon.ctl("apply", str(state))
        hostside.connect("loop", SUB, HOST)
        yield Served(daemon, loop, hostside.namespace_device(SUB, 1, "loop"), drive_link)
    finally:
        hostside.disconnect(SUB)
        daemon.stop()
        wipe()
        subprocess.run(["modprobe", "-r", "scsi_debug"], check=False, capture_output=True)
        subprocess.run(["dmsetup", "remove", "--force", DM], check=False, capture_output=True)
        subprocess.run(["losetup", "--detach", loop], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


@pytest.fixture(autouse=True)
def kernel_log_clean(served: Served) -> Iterator[None]:
    before = len(_dmesg())
    yield
    trouble = [line for line in _dmesg()[before:] if KERNEL_TROUBLE.search(line)]
    assert not trouble, "kernel log:\n" + "\n".join(trouble)


def fio(dev: Path, rw: str, offset: int, size: int = 2 * MIB, verify_only: bool = False,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """One fio job with crc32c headers in every 4 KiB (the same seed each time: verify_only re-reads a region)."""
    argv = ["fio", "--name=fault", f"--filename={dev}", f"--offset={offset}", f"--size={size}", f"--rw={rw}",
            "--bs=64k", "--iodepth=8", "--ioengine=libaio", "--direct=1", "--verify=crc32c",
            "--verify_interval=4k", "--verify_fatal=1", "--verify_dump=0", "--verify_state_save=0",
            "--randrepeat=1", "--randseed=1515"]
    if verify_only:
        argv.append("--verify_only")
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)


def mismatches(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """fio's words for data that came back but differs from what was written."""
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if re.search(r"verify: bad|bad magic|crc32c: verify failed|verify type mismatch", line)]


def health(daemon: Daemon, nsid: int = 1) -> dict:
    rows = daemon.ctl_json("status")["health"]
    [row] = [r for r in rows if r["subsystem"] == SUB and r["nsid"] == nsid]
    return row


def healthy_metric(daemon: Daemon) -> dict[str, float]:
    body = daemon.request("GET", "/metrics").text
    found = {}
    for line in body.splitlines():
        if line.startswith("nvmetd_namespace_healthy{") and f'subsystem="{SUB}"' in line:
            state = re.search(r'state="([^"]+)"', line).group(1)
            if 'nsid="1"' in line:
                found[state] = float(line.rsplit(" ", 1)[1])
    return found


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    """Event-based: poll until true; the timeout only fails a hung test."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:g} s")
        time.sleep(0.3)


def _status_text(daemon: Daemon) -> str:
    return daemon.ctl("status").stdout


def test_failing_device_gives_host_io_errors_never_bad_data_and_recovers(served: Served) -> None:
    daemon, dev = served.daemon, served.dev
    before = fio(dev, "write", 0)
    assert before.returncode == 0, before.stdout + before.stderr
    assert health(daemon)["state"] == "ok" and healthy_metric(daemon) == {"ok": 1.0}

    served.table("flakey", "0", "3600")  # up 0 s, down 3600 s: every read and write fails
    try:
        failed_write = fio(dev, "write", 4 * MIB)
        failed_read = fio(dev, "read", 0, verify_only=True)
        row = health(daemon)
        text = _status_text(daemon)
        metric = healthy_metric(daemon)
    finally:
        served.table("linear")
    for proc in (failed_write, failed_read):
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"fio saw no error on a failing device:\n{out}"
        assert re.search(r"Input/output error|err=\s*5\b", out), out
        assert not mismatches(proc), out
    assert row["state"] == "io-error" and "EIO" in row["detail"], row
    assert f"{SUB} nsid 1: io-error" in text, text
    assert metric == {"io-error": 0.0}, metric

    # the fault cleared: what was acknowledged before it is intact, and new I/O works on the same connection
    wait_for("health ok after the fault", lambda: health(daemon)["state"] == "ok")
    intact = fio(dev, "read", 0, verify_only=True)
    assert intact.returncode == 0 and not mismatches(intact), intact.stdout + intact.stderr
    again = fio(dev, "write", 4 * MIB)
    assert again.returncode == 0, again.stdout + again.stderr
    assert healthy_metric(daemon) == {"ok": 1.0}


def test_stalled_device_is_reported_and_io_completes_intact(served: Served) -> None:
    daemon, dev = served.daemon, served.dev
    assert fio(dev, "write", 8 * MIB).returncode == 0
    served.table("delay", str(STALL_MS))
    try:
        row = health(daemon)
        metric = healthy_metric(daemon)
        slow = fio(dev, "read", 8 * MIB, size=MIB, verify_only=True)  # slow, not failed
    finally:
        served.table("linear")
    assert row["state"] == "stalled", row
    assert metric.get("stalled") == 0.0, metric
    assert slow.returncode == 0 and not mismatches(slow), slow.stdout + slow.stderr
    wait_for("health ok after the stall", lambda: health(daemon)["state"] == "ok")
    assert fio(dev, "write", 8 * MIB).returncode == 0


def test_pulled_drive_fails_io_is_reported_and_reopened_when_it_comes_back(served: Served) -> None:
    daemon = served.daemon
    dev = hostside.namespace_device(SUB, 2, "loop")
    written = fio(dev, "write", 0)
    assert written.returncode == 0, written.stdout + written.stderr
    assert health(daemon, 2)["state"] == "ok"
    [(host, disk)] = _scsi_debug_disks()
    Path(f"/sys/block/{disk}/device/delete").write_text("1")  # the drive leaves the bus under nvmet
    wait_for("the pulled drive gone", lambda: not _scsi_debug_disks())
    row = health(daemon, 2)
    assert row["state"] == "missing", row
    failed = fio(dev, "read", 0, verify_only=True)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and not mismatches(failed), out

    Path(f"/sys/class/scsi_host/{host}/scan").write_text("- - -")  # put back: a new sd node for the same data
    wait_for("the drive back", lambda: bool(_scsi_debug_disks()))
    [(_, again)] = _scsi_debug_disks()
    served.drive_link.unlink()
    served.drive_link.symlink_to(Path("/dev") / again)
    wait_for("nvmetd re-opened the namespace", lambda: "re-opened" in daemon.log_text())
    assert health(daemon, 2)["state"] == "ok"
    dev = hostside.namespace_device(SUB, 2, "loop")
    intact = fio(dev, "read", 0, verify_only=True)
    assert intact.returncode == 0 and not mismatches(intact), intact.stdout + intact.stderr
    assert fio(dev, "write", 4 * MIB).returncode == 0
