"""Where the CPU of a guest job went, in the one-kernel simulation of a host and its DPU.

The figure offload mode is about is the host CPU per I/O outside the guest (QEMU plus the guest's own driver) and
outside the DPU. Here: every busy tick the kernel accounts (/proc/stat user, nice, system, irq, softirq), minus
the DPU cgroup's usage (its nvmetd and vhost-nvme engines), minus the guest process. What is left is the rest of
this kernel's work, kernel threads included, listed apart by name (a kworker is named after the workqueue it ran
last, so `nvme_tcp_wq` is the DPU's NVMe/TCP initiator and `nvmet_tcp_wq` the storage target's side; an idle
worker keeps the name of its last work, so the split by name is approximate).

What one kernel cannot show: the DPU's kernel work (the NVMe/TCP initiator's workers, the block layer under its
engine, the softirqs of the veth pair) runs on this kernel and is charged to no cgroup, so it lands on the host's
side of the ledger: the host figure here is an upper bound of what a real DPU would leave on the host. Nor does
it show PCIe/DMA costs or VM exits: the guest driver plays QEMU and the guest in one process.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

PF_KTHREAD = 0x00200000
TICK_USEC = 1_000_000 // os.sysconf("SC_CLK_TCK")


def busy_usec() -> int:
    """All CPUs' busy time: user, nice, system, irq, softirq (not idle, iowait, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) * TICK_USEC


def cgroup_usec(cgroup: Path) -> int:
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    raise RuntimeError(f"{cgroup}/cpu.stat has no usage_usec")


def self_usec() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int((r.ru_utime + r.ru_stime) * 1_000_000)


def _group(comm: str) -> str:
    """kworker/1:2H-nvme_tcp_wq -> nvme_tcp_wq; ksoftirqd/1 -> ksoftirqd; kworker/u4:0 -> kworker."""
    if comm.startswith("kworker/"):
        return comm.split("-", 1)[1] if "-" in comm else "kworker"
    return comm.split("/", 1)[0] or comm


def kthread_usec() -> dict[str, int]:
    """CPU time of every live kernel thread, summed by name group."""
    out: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        rest = text[text.rindex(")") + 2:].split()
        if not int(rest[6]) & PF_KTHREAD:  # field 9: flags
            continue
        key = _group(comm)
        out[key] = out.get(key, 0) + (int(rest[11]) + int(rest[12])) * TICK_USEC  # utime, stime
    return out


@dataclass
class Sample:
    busy: int
    dpu: int
    guest: int
    kthreads: dict[str, int] = field(default_factory=dict)


def sample(dpu_cgroup: Path | None) -> Sample:
    return Sample(busy_usec(), cgroup_usec(dpu_cgroup) if dpu_cgroup is not None else 0, self_usec(),
                  kthread_usec())


@dataclass
class Split:
    ios: int
    total: float  # every CPU's busy time, us per I/O
    dpu: float  # the DPU cgroup's
    guest: float  # the guest process's (QEMU + guest driver)
    host: float  # the rest: this host outside the guest and the DPU, kernel threads included
    kthreads: dict[str, float]  # of `host`, kernel threads by name (us per I/O), largest first

    def lines(self, top: int = 4) -> list[str]:
        named = ", ".join(f"{k} {v:.0f}" for k, v in list(self.kthreads.items())[:top])
        return [f"{self.ios} I/Os: total {self.total:.0f} us/IO = guest {self.guest:.0f} + DPU cgroup "
                f"{self.dpu:.0f} + host outside both {self.host:.0f}",
                f"  of which kernel threads {sum(self.kthreads.values()):.0f} us/IO ({named or 'none'})"]


def split(before: Sample, after: Sample, ios: int) -> Split:
    total, dpu, guest = after.busy - before.busy, after.dpu - before.dpu, after.guest - before.guest
    threads = {k: (v - before.kthreads.get(k, 0)) / ios for k, v in after.kthreads.items()
               if v - before.kthreads.get(k, 0) > 0}
    return Split(ios, total / ios, dpu / ios, guest / ios, max(total - dpu - guest, 0) / ios,
                 dict(sorted(threads.items(), key=lambda kv: -kv[1])))
