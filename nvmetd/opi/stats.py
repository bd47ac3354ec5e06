"""OPI VolumeStats from the kernel's own per-device counters (/sys/dev/block/MAJ:MIN/stat).

A namespace's backing block device (LVM thin LV, zvol, the remote namespace's /dev/nvmeXnY) counts every I/O
nvmet or the vhost engine sends it; a file-backed namespace has no device of its own to count, so asking for its
stats is refused rather than answered with zeros.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc

from nvmetd.opi.common import Refused
from nvmetd.opi.stubs import opicommon_pb2 as common

INT32_MAX = 2**31 - 1  # VolumeStats' fields are int32: a counter past it is reported as the maximum


def device_counters(path: str) -> dict[str, int]:
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                      f"{path} is a file, not a block device: the kernel keeps no I/O counters for it")
    fields = [int(x) for x in Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/stat")
              .read_text().split()]
    # Documentation/block/stat.rst: reads, merges, sectors, ticks; writes ...; in_flight, io_ticks, queue;
    # discards, merges, sectors, ticks
    discards = fields[11:15] if len(fields) >= 15 else [0, 0, 0, 0]
    return {"read_ops_count": fields[0], "read_bytes_count": fields[2] * 512, "read_latency_ticks": fields[3],
            "write_ops_count": fields[4], "write_bytes_count": fields[6] * 512, "write_latency_ticks": fields[7],
            "unmap_ops_count": discards[0], "unmap_bytes_count": discards[2] * 512,
            "unmap_latency_ticks": discards[3]}


def volume_stats(paths: list[str]) -> common.VolumeStats:
    total: dict[str, int] = {}
    for path in paths:
        try:
            counters = device_counters(path)
        except FileNotFoundError:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"{path} is not there (a remote path not connected?)"
                          ) from None
        for key, value in counters.items():
            total[key] = total.get(key, 0) + value
    return common.VolumeStats(**{k: min(v, INT32_MAX) for k, v in total.items()})
