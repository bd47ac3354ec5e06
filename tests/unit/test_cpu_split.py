"""The CPU ledger of offload mode's figures (nvmetd/opi/cpu_split.py): names of kernel threads, and the split
of one job's busy time into guest, DPU cgroup and the rest, as read from this machine's /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmetd.opi import cpu_split
from nvmetd.opi.cpu_split import Sample


@pytest.mark.parametrize(("comm", "group"), [
    ("kworker/1:2H-nvme_tcp_wq", "nvme_tcp_wq"), ("kworker/u4:0-nvmet_tcp_wq", "nvmet_tcp_wq"),
    ("kworker/0:1", "kworker"), ("ksoftirqd/1", "ksoftirqd"), ("rcu_preempt", "rcu_preempt"),
    ("jbd2/vda1-8", "jbd2"), ("kthreadd", "kthreadd"),
])
def test_kernel_threads_group_by_name(comm: str, group: str) -> None:
    assert cpu_split._group(comm) == group


def test_split_takes_guest_and_dpu_out_of_the_total() -> None:
    before = Sample(busy=1_000, dpu=100, guest=50, kthreads={"nvme_tcp_wq": 10, "kworker": 5})
    after = Sample(busy=11_000, dpu=4_100, guest=2_050, kthreads={"nvme_tcp_wq": 1_010, "kworker": 5, "new": 200})
    s = cpu_split.split(before, after, ios=100)
    assert (s.total, s.dpu, s.guest, s.host) == (100, 40, 20, 40)
    assert s.kthreads == {"nvme_tcp_wq": 10, "new": 2}  # largest first, idle threads left out
    assert "host outside both 40" in s.lines()[0] and "nvme_tcp_wq 10" in s.lines()[1]


def test_samples_from_this_machine_only_grow(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.stat").write_text("usage_usec 7\nuser_usec 5\nsystem_usec 2\n")
    a = cpu_split.sample(cg)
    sum(i * i for i in range(200_000))  # some CPU in this process
    b = cpu_split.sample(cg)
    assert a.dpu == b.dpu == 7 and b.guest > a.guest and b.busy >= a.busy
    assert all(b.kthreads.get(k, 0) >= v for k, v in a.kthreads.items() if k in b.kthreads)
    (cg / "cpu.stat").write_text("user_usec 5\n")
    with pytest.raises(RuntimeError, match="usage_usec"):
        cpu_split.sample(cg)
