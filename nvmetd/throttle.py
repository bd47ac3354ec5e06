"""Per-disk I/O limits on the kernel target: blk-throttle on the disk's own block device.

Why this way: nvmet submits a namespace's bios from its own kernel workers, which sit in the root cgroup, so
cgroup v2 `io.max` (per cgroup) never sees a tenant. blk-throttle's cgroup v1 interface takes limits for the
root group per block device (`blkio.throttle.*_device`, "MAJ:MIN value"), and those apply to every bio sent to
that device, nvmet's included. So the device is the tenant:

- a disk whose volume is a block device of its own (LV, zvol, LUKS mapping, RBD image, null_blk) is limited on
  that very device. Nothing is stacked on it, so its namespace never moves, and a disk never limited costs
  exactly what it cost before. Removing the last limit deletes its rules, but the kernel keeps blk-throttle
  active on a queue once it had a rule (until the device goes), and under cgroup v1 counts every bio there:
  bench.limits_overhead measures that `removed` path. Until 2026-12-02 every limited disk got a dm-linear device
  of its own instead, kept after its limits were removed, at 1.12-1.15x the CPU per I/O.
- a file disk has no device of its own (its bios reach the filesystem's shared device), so a limited one is
  served through a loop device over its file (direct I/O, so the page cache does not absorb what the limit should
  see). The loop device stays while the disk is attached: removing the last limit changes no device path.

Changing a limit is one write to a cgroup file and takes effect on the running namespace (no reconnect); a limit
of 0 removes it. A rule lives as long as its device: gone when a volume is closed or destroyed.

The v1 blkio hierarchy can be mounted only while cgroup v2 does not use the io controller (no `io` in any
cgroup.subtree_control); otherwise this refuses with the reason.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from nvmetd.errors import SystemProblem

BLKIO_MOUNT = Path("/run/nvmetd/blkio")
MAX_IOPS = 10_000_000
MAX_MBPS = 1_000_000  # 1 TB/s: anything above is a typo
LOOP_MAJOR = 7


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
    mount_blkio()


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


def loop_devices(sys_block: Path = Path("/sys/block")) -> dict[str, str]:
    """Backing file -> loop device, of every bound loop device (sysfs: no process per lookup)."""
    found: dict[str, str] = {}
    for attr in sys_block.glob("loop*/loop/backing_file"):
        try:
            found[attr.read_text().strip()] = f"/dev/{attr.parent.parent.name}"
        except OSError:  # unbound between the glob and the read
            continue
    return found


def is_file(backing: str) -> bool:
    """A file disk: it has no block device of its own to carry its rules."""
    return not Path(backing).is_block_device()


def served_device(backing: str, limited: bool, loops: dict[str, str]) -> str:
    """What the namespace of a disk the kernel target serves opens: the volume itself, or for a file disk that
    is (or was, while attached) limited, its loop device (made here if missing; idempotent)."""
    if not is_file(backing):
        return backing
    resolved = str(Path(backing).resolve())
    if resolved in loops:
        return loops[resolved]
    if not limited:
        return backing
    if not Path("/dev/loop-control").exists():  # a host without udev's static nodes: no autoload on first use
        subprocess.run(["modprobe", "-q", "loop"], capture_output=True, check=False)
    loops[resolved] = _run(["losetup", "--find", "--show", "--direct-io=on", resolved])
    return loops[resolved]


def majmin(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def apply(device: str, limits: Limits, mount: Path = BLKIO_MOUNT) -> None:
    """Write the limits of one device (0 deletes a rule); takes effect on I/O in flight."""
    try:
        root = mount_blkio(mount)
    except SystemProblem:
        if limits.per_direction():
            raise
        return  # no hierarchy here, so no rule of ours to delete
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


def release(backing: str) -> None:
    """A disk no longer served by the kernel target (after its namespace is gone, before its volume closes): a
    file disk's loop device is detached (its rules go with it); a block device's rules are deleted, so the volume
    carries none into whatever opens it next."""
    if is_file(backing):
        loop = loop_devices().get(str(Path(backing).resolve()))
        if loop is not None:
            subprocess.run(["losetup", "--detach", loop], capture_output=True, check=False)
    elif Path(backing).exists():
        apply(backing, Limits())
