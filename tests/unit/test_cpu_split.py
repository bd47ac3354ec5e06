"""The CPU ledger of offload mode's figures (nvmetd/opi/cpu_split.py): names of kernel threads, and the split
of one job's busy time into guest, DPU cgroup and the rest, as read from this machine's /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmetd.opi import cpu_split
from nvmetd.opi.cpu_split import Sample


@pytest.mark.parametrize(("comm", "group"), [
    ("kworker/1:2H-nvme_tcp_wq", "kworker/1:*H-nvme_tcp_wq"),
    ("kworker/u4:0-nvmet_tcp_wq", "kworker/u4:*-nvmet_tcp_wq"),
    ("kworker/0:1", "kworker/0:*"), ("ksoftirqd/1", "ksoftirqd"), ("rcu_preempt", "rcu_preempt"),
    ("jbd2/vda1-8", "jbd2"), ("kthreadd", "kthreadd"),
])
def test_kernel_threads_group_by_name(comm: str, group: str) -> None:
    assert cpu_split._group(comm) == group


def test_split_takes_guest_and_dpu_out_of_the_total() -> None:
    # thread 7 ran 1,000 us and was renamed by its new work; 8 was idle; 9 is new
    before = Sample(busy=1_000, dpu=100, guest=50, kthreads={"7": ("kworker/1:*-events", 10), "8": ("x", 5)})
    after = Sample(busy=11_000, dpu=4_100, guest=2_050,
                   kthreads={"7": ("kworker/1:*H-nvme_tcp_wq", 1_010), "8": ("x", 5), "9": ("x", 200)})
    s = cpu_split.split(before, after, ios=100)
    assert (s.total, s.dpu, s.guest, s.host) == (100, 40, 20, 40)
    assert s.kthreads == {"kworker/1:*H-nvme_tcp_wq": 10, "x": 2}  # largest first, per thread, by its name now
    assert "host outside both 40" in s.lines()[0] and "nvme_tcp_wq 10" in s.lines()[1]


def test_samples_from_this_machine_only_grow(tmp_path: Path) -> None:
    """This process is the guest, a sleeping child stands for the DPU's cgroup; only the guest burns CPU."""
    import subprocess
    import sys

    # the child's interpreter start-up is CPU too (~16 ms, in one CI run more than this process burned below):
    # sample only once it says it is about to sleep
    child = subprocess.Popen([sys.executable, "-c", "import time; print('asleep', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "asleep"
        cg = tmp_path / "cg"
        cg.mkdir()
        (cg / "cgroup.procs").write_text(f"{child.pid}\n")
        a = cpu_split.sample(cg)
        sum(i * i for i in range(300_000))  # some CPU in this process
        b = cpu_split.sample(cg)
    finally:
        child.kill()
        child.wait()
    assert b.guest - a.guest > 1000 and b.busy - a.busy >= b.guest - a.guest  # us
    assert b.dpu >= a.dpu > 0 and b.dpu - a.dpu < b.guest - a.guest
    assert all(us >= 0 and name for name, us in a.kthreads.values())
    s = cpu_split.split(a, b, ios=10)
    assert s.guest > 0 and s.host >= 0 and s.total >= s.guest
