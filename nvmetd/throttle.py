"""Per-disk I/O limits on the kernel target: a dm-linear device per limited disk, throttled by blk-throttle.

Why this way: nvmet submits a namespace's bios from its own kernel workers, which sit in the root cgroup, so
cgroup v2 `io.max` (per cgroup) never sees a tenant. blk-throttle's cgroup v1 interface takes limits for the
root group per block device (`blkio.throttle.*_device`, "MAJ:MIN value"), and those apply to every bio sent to
that device, nvmet's included. Giving each limited disk a dm-linear device of its own makes the device the
tenant: its namespace opens /dev/mapper/nvmetd-lim-<disk>, and the limit on that device limits exactly that
disk. Changing a limit is one write to a cgroup file and takes effect on the running namespace (no reconnect);
a limit of 0 removes it. Measured in the 6.12 rig (null_blk behind dm-linear, nvme-loop, fio): see the README.

The v1 blkio hierarchy can be mounted only while cgroup v2 does not use the io controller (no `io` in any
cgroup.subtree_control); otherwise this refuses with the reason. A file-backed disk gets a loop device first
(dm needs a block device), with direct I/O so the page cache does not absorb what the limit should see.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from nvmetd.errors import SystemProblem

BLKIO_MOUNT = Path("/run/nvmetd/blkio")
DM_PREFIX = "nvmetd-lim-"
MAX_IOPS = 10_000_000
MAX_MBPS = 1_000_000  # 1 TB/s: anything above is a typo


class Limits(BaseModel):
    """None = unlimited. MB/s are 10^6 bytes per second.

    riops/wiops/rmbps/wmbps limit one direction: blk-throttle's kind, for disks the kernel target serves.
    rwiops/rwmbps limit reads and writes together: the vhost engine's token bucket (NS_SET_LIMITS), for disks the
    engine serves. Each mechanism enforces its own kind exactly and cannot do the other's, so a disk's limits must
    be of the kind its path enforces (Manager refuses the rest rather than pretending)."""

    model_config = ConfigDict(extra="forbid")
    riops: int | None = Field(default=None, ge=1, le=MAX_IOPS)
    wiops: int | None = Field(default=None, ge=1, le=MAX_IOPS)
    rmbps: int | None = Field(default=None, ge=1, le=MAX_MBPS)
    wmbps: int | None = Field(default=None, ge=1, le=MAX_MBPS)
    rwiops: int | None = Field(default=None, ge=1, le=MAX_IOPS)
    rwmbps: int | None = Field(default=None, ge=1, le=MAX_MBPS)

    def per_direction(self) -> list[str]:
        return [k for k in ("riops", "wiops", "rmbps", "wmbps") if getattr(self, k)]

    def combined(self) -> list[str]:
        return [k for k in ("rwiops", "rwmbps") if getattr(self, k)]

    def engine(self) -> tuple[int, int]:
        """(IOPS, bytes/s) for the engine's NS_SET_LIMITS; 0 = unlimited."""
        return self.rwiops or 0, (self.rwmbps or 0) * 1_000_000

    def files(self) -> dict[str, int]:
        """blkio file -> value (0 = no limit)."""
        return {"blkio.throttle.read_iops_device": self.riops or 0,
                "blkio.throttle.write_iops_device": self.wiops or 0,
                "blkio.throttle.read_bps_device": (self.rmbps or 0) * 1_000_000,
                "blkio.throttle.write_bps_device": (self.wmbps or 0) * 1_000_000}


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemProblem(f"{argv[0]} {argv[1]}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout.strip()


def check_available() -> None:
    """Before a limit is stored: a stored limit this host cannot enforce would fail every later reconcile."""
    if not _device_mapper():
        raise SystemProblem("limits: this kernel has no device-mapper (dm-mod), which kernel-target limits need")
    mount_blkio()


def _device_mapper() -> bool:
    """device-mapper is there, loading dm-mod first if it is a module not loaded yet (as nvmet's modules are)."""
    if "device-mapper" not in Path("/proc/misc").read_text():
        subprocess.run(["modprobe", "-q", "dm-mod"], capture_output=True, check=False)
    return "device-mapper" in Path("/proc/misc").read_text()


def mount_blkio(mount: Path = BLKIO_MOUNT) -> Path:
    if (mount / "blkio.throttle.read_iops_device").exists():
        return mount
    mount.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "cgroup", "-o", "blkio", "nvmetd-blkio", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemProblem("limits: cannot mount the cgroup v1 blkio hierarchy (is cgroup v2's io controller in "
                            f"use? it must not be, for blk-throttle's per-device root limits): {proc.stderr.strip()}")
    return mount


def dm_name(disk: str) -> str:
    return DM_PREFIX + disk


def _block_device(backing: str) -> str:
    """dm needs a block device: a file gets a loop device (direct I/O), found again by its backing file."""
    path = Path(backing)
    if path.is_block_device():
        return backing
    for line in _run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"]).splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip() == str(path.resolve()):
            return parts[0]
    return _run(["losetup", "--find", "--show", "--direct-io=on", str(path)])


def exists(disk: str) -> bool:
    return Path("/dev/mapper", dm_name(disk)).exists()


def device_for(disk: str, backing: str) -> str:
    """The throttled device for `disk` (made if missing; idempotent): /dev/mapper/nvmetd-lim-<disk>."""
    mapper = Path("/dev/mapper", dm_name(disk))
    if mapper.exists():
        return str(mapper)
    if not _device_mapper():  # after a reboot, before any limit was changed
        raise SystemProblem("limits: this kernel has no device-mapper (dm-mod), which kernel-target limits need")
    block = _block_device(backing)
    sectors = _run(["blockdev", "--getsz", block])
    _run(["dmsetup", "create", dm_name(disk), "--table", f"0 {int(sectors)} linear {block} 0"])
    _run(["dmsetup", "mknodes", dm_name(disk)])
    return str(mapper)


def majmin(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def apply(device: str, limits: Limits, mount: Path = BLKIO_MOUNT) -> None:
    """Write the limits of one device; takes effect on I/O in flight."""
    root = mount_blkio(mount)
    dev = majmin(device)
    for name, value in limits.files().items():
        (root / name).write_text(f"{dev} {value}\n")


def current(device: str, mount: Path = BLKIO_MOUNT) -> dict[str, int]:
    dev = majmin(device)
    found: dict[str, int] = {}
    for name in Limits().files():
        for line in (mount / name).read_text().splitlines():
            if line.split()[0] == dev:
                found[name] = int(line.split()[1])
    return found


def release(disk: str) -> None:
    """Remove the disk's dm device and its loop device, if any (after its namespace is gone)."""
    name = dm_name(disk)
    if not Path("/dev/mapper", name).exists():
        return
    table = _run(["dmsetup", "table", name]).split()
    _run(["dmsetup", "remove", name])
    if len(table) >= 4 and table[2] == "linear":
        under = table[3]
        major, minor = (int(x) for x in under.split(":")) if ":" in under else (None, None)
        if major == 7:  # a loop device made by _block_device
            subprocess.run(["losetup", "--detach", f"/dev/loop{minor}"], capture_output=True, check=False)
