"""Block topology of a namespace's backing store, passed up to the guest in Identify Namespace.

The guest should see the real logical/physical block size, optimal I/O size and deallocate granularity of
what is underneath (OP4's layer-bypass point), not a generic 512-byte disk that hides a 4 KiB filesystem or
a 64 KiB-stripe device.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

SYSFS = Path("/sys")


@dataclass(frozen=True)
class Topology:
    logical_block: int
    physical_block: int
    optimal_io: int  # 0 = not reported
    discard_granularity: int  # 0 = no deallocate support
    is_block_device: bool


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def block_device_topology(major: int, minor: int, sysfs: Path = SYSFS) -> Topology:
    """Read the queue limits of a block device from sysfs (partitions resolve to their disk's queue)."""
    dev = (sysfs / "dev" / "block" / f"{major}:{minor}").resolve()
    queue = dev / "queue"
    if not queue.is_dir():
        queue = dev.parent / "queue"
    logical = _read_int(queue / "logical_block_size") or 512
    physical = _read_int(queue / "physical_block_size") or logical
    discard_max = _read_int(queue / "discard_max_bytes")
    return Topology(
        logical_block=logical,
        physical_block=max(physical, logical),
        optimal_io=_read_int(queue / "optimal_io_size"),
        discard_granularity=_read_int(queue / "discard_granularity") if discard_max else 0,
        is_block_device=True,
    )


def file_topology(st: os.stat_result, logical_block: int) -> Topology:
    """A regular file: the filesystem block is the write, hole-punch and optimal unit."""
    blksize = max(st.st_blksize, logical_block)
    return Topology(
        logical_block=logical_block,
        physical_block=blksize,
        optimal_io=blksize,
        discard_granularity=blksize,
        is_block_device=False,
    )


def topology_for_fd(fd: int, logical_block: int = 512, sysfs: Path = SYSFS) -> Topology:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return block_device_topology(os.major(st.st_rdev), os.minor(st.st_rdev), sysfs)
    return file_topology(st, logical_block)
