"""Where the CPU of a guest job went, in the one-kernel simulation of a host and its DPU.

The figure offload mode is about is the host CPU per I/O outside the guest (QEMU plus the guest's own driver) and
outside the DPU. Here: the CPU time of every thread of this kernel (the scheduler's exact runtime), minus the
DPU's processes (its cgroup: its nvmetd and vhost-nvme engines), minus the guest process. What is left is the rest
of this kernel's work, kernel threads included and listed apart by name (a kworker is named after the workqueue it
ran last, so `nvme_tcp_wq` is the DPU's NVMe/TCP initiator and `nvmet_tcp_wq` the storage target's side; an idle
worker keeps the name of its last work, so the split by name is approximate). Softirq work is charged to the
thread it interrupted; a thread that exits during the job takes its time in the job with it (an under-count).

What one kernel cannot show: the DPU's kernel work (the NVMe/TCP initiator's workers, the block layer under its
engine, the softirqs of the veth pair) runs on this kernel and is charged to no cgroup, so it lands on the host's
side of the ledger: the host figure here is an upper bound of what a real DPU would leave on the host. Nor does
it show PCIe/DMA costs or VM exits: the guest driver plays QEMU and the guest in one process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PF_KTHREAD = 0x00200000


def _group(comm: str) -> str:
    """kworker/1:2H-nvme_tcp_wq -> kworker/1:*H-nvme_tcp_wq (a pool's workers, by the workqueue they ran last);
    ksoftirqd/1 -> ksoftirqd; jbd2/vda1-8 -> jbd2."""
    if comm.startswith("kworker/"):
        return re.sub(r":\d+", ":*", comm)
    return comm.split("/", 1)[0] or comm


def _threads(pid: str) -> Iterator[tuple[str, str, int, bool]]:
    """(tid, name, ns on CPU, is a kernel thread) of each thread of pid; /proc/PID/task/TID/schedstat's first
    field is the scheduler's own runtime: exact, where /proc/stat's ticks under-count on an emulated, loaded CPU."""
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        try:
            runtime = int((task / "schedstat").read_text().split()[0])
            text = (task / "stat").read_text()
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        comm = text[text.index("(") + 1:text.rindex(")")]
        flags = int(text[text.rindex(")") + 2:].split()[6])  # field 9
        yield task.name, comm, runtime, bool(flags & PF_KTHREAD)


@dataclass(frozen=True)
class Thread:
    role: str  # "guest" (this process), "dpu" (a process of the DPU's cgroup), "kthread" or "other"
    name: str  # name group (_group)
    us: int  # on CPU since it started


@dataclass
class Sample:
    """The CPU time of every live thread, by thread id: a job's cost is the sum of per-thread differences, so a
    thread that exits between two samples takes only its own time with it (an under-count) instead of making a
    process's or the machine's sum go backwards (one CI run: guest -1,419 us/IO after pytest threads ended)."""

    threads: dict[str, Thread] = field(default_factory=dict)


def sample(dpu_cgroup: Path | None) -> Sample:
    dpu_pids = set((dpu_cgroup / "cgroup.procs").read_text().split()) if dpu_cgroup is not None else set()
    me = str(os.getpid())
    threads: dict[str, Thread] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        for tid, comm, ns, kthread in _threads(proc.name):
            role = ("guest" if proc.name == me else "dpu" if proc.name in dpu_pids
                    else "kthread" if kthread else "other")
            threads[tid] = Thread(role, _group(comm), ns // 1000)
    return Sample(threads)


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


def _ran(before: Thread | None, after: Thread) -> int:
    """A thread new since `before` ran all its time in between; a smaller runtime than before is a reused id."""
    return after.us - before.us if before is not None and before.us <= after.us else after.us


def split(before: Sample, after: Sample, ios: int) -> Split:
    by_role = {"guest": 0, "dpu": 0, "kthread": 0, "other": 0}
    threads: dict[str, float] = {}
    for tid, thread in after.threads.items():
        ran = _ran(before.threads.get(tid), thread)
        by_role[thread.role] += ran
        if thread.role == "kthread" and ran > 0:  # grouped by the name it has now
            threads[thread.name] = threads.get(thread.name, 0.0) + ran / ios
    total = sum(by_role.values())
    return Split(ios, total / ios, by_role["dpu"] / ios, by_role["guest"] / ios,
                 (by_role["kthread"] + by_role["other"]) / ios,
                 dict(sorted(threads.items(), key=lambda kv: -kv[1])))
