"""The CPU ledger of offload mode's figures (nvmetd/opi/cpu_split.py): names of kernel threads, and the split
of one job's busy time into guest, DPU cgroup and the rest, as read from this machine's /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmetd.opi import cpu_split
from nvmetd.opi.cpu_split import Sample, Thread


@pytest.mark.parametrize(("comm", "group"), [
    ("kworker/1:2H-nvme_tcp_wq", "kworker/1:*H-nvme_tcp_wq"),
    ("kworker/u4:0-nvmet_tcp_wq", "kworker/u4:*-nvmet_tcp_wq"),
    ("kworker/0:1", "kworker/0:*"), ("ksoftirqd/1", "ksoftirqd"), ("rcu_preempt", "rcu_preempt"),
    ("jbd2/vda1-8", "jbd2"), ("kthreadd", "kthreadd"),
])
def test_kernel_threads_group_by_name(comm: str, group: str) -> None:
    assert cpu_split._group(comm) == group


def test_split_takes_guest_and_dpu_out_of_the_total() -> None:
    # 7 ran 1,000 us and was renamed by its new work; 8 was idle; 9 is new; 3 (a guest thread) and 4 exited
    before = Sample({"1": Thread("guest", "python3", 40), "3": Thread("guest", "grpc", 5_000),
                     "2": Thread("dpu", "nvmetd", 100), "7": Thread("kthread", "kworker/1:*-events", 10),
                     "8": Thread("kthread", "x", 5), "4": Thread("other", "sh", 9_000)})
    after = Sample({"1": Thread("guest", "python3", 2_040), "2": Thread("dpu", "nvmetd", 4_100),
                    "7": Thread("kthread", "kworker/1:*H-nvme_tcp_wq", 1_010), "8": Thread("kthread", "x", 5),
                    "9": Thread("kthread", "x", 200), "5": Thread("other", "sh", 800)})
    s = cpu_split.split(before, after, ios=100)
    assert (s.total, s.dpu, s.guest, s.host) == (80, 40, 20, 20)
    assert s.kthreads == {"kworker/1:*H-nvme_tcp_wq": 10, "x": 2}  # largest first, per thread, by its name now
    assert "host outside both 20" in s.lines()[0] and "nvme_tcp_wq 10" in s.lines()[1]


def test_a_reused_thread_id_counts_from_zero() -> None:
    s = cpu_split.split(Sample({"7": Thread("other", "a", 9_000)}), Sample({"7": Thread("other", "b", 300)}), 1)
    assert s.host == 300


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
    s = cpu_split.split(a, b, ios=1)
    assert s.guest > 1000 and s.total >= s.guest + s.dpu  # us
    assert 0 <= s.dpu < s.guest and any(t.role == "dpu" and t.name for t in a.threads.values())
    assert all(t.us >= 0 and t.name for t in a.threads.values())
    assert {t.role for t in b.threads.values()} >= {"guest", "dpu"}
