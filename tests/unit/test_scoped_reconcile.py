"""An attach or detach plans and reads only that VM's objects (nvmetd/vm_scope.py, target/scope.py), on a fake
configfs tree: configfs reads per attach do not grow with the VMs on the host, and what the scoped change leaves
is exactly what the full reconcile wants (a full diff afterwards is empty)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import pools
from nvmetd.manager import Manager
from nvmetd.vms import Attachment, new_vm
from target.apply import diff
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel


class Host:
    def __init__(self, base: Path) -> None:
        FakeKernel(base / "nvmet")
        self.pools_root = base / "pools"
        pools.create_pool("file", "files", devices=[str(base / "files")], root=self.pools_root)
        self.cfs = FakeFS(root=base / "nvmet")
        self.store = StateStore(base / "state.json")
        self.manager = Manager(self.store, self.cfs, pools_root=self.pools_root, keys_dir=base / "keys",
                               host_connect=False)
        self.vms = 0

    def grow_to(self, count: int) -> None:
        """Background VMs with one tcp disk each, in one transaction and one full reconcile."""
        pool = pools.open_pool("files", self.pools_root)
        names = [f"bg{i:03d}" for i in range(self.vms, count)]
        for name in names:
            pool.create(name, "1M")
        with self.store.transaction() as doc:
            for name in names:
                vm = new_vm(f"vm-{name}")
                vm.attachments[name] = Attachment(nsid=1, transport="tcp")
                doc.setdefault("vms", {})[vm.name] = vm.model_dump()
                doc.setdefault("disks", {})[name] = {"pool": "files", "state": "ready"}
        assert self.manager.reconcile().converged
        self.vms = count

    def full_diff(self) -> list[str]:
        return diff(self.manager.effective(self.store.load()), self.cfs)

    def reads(self, fn) -> int:
        before = self.cfs.counters.reads
        fn()
        return self.cfs.counters.reads - before


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    h.manager.create_disk("probe", "files", "4M")
    h.manager.create_disk("probe2", "files", "4M")
    return h


def test_reads_per_attach_do_not_grow_with_vms(host: Host) -> None:
    measured = {}
    for size in (5, 50):
        host.grow_to(size)
        attach = host.reads(lambda: host.manager.attach("probe-vm", "probe", "loop"))
        assert host.full_diff() == []
        second = host.reads(lambda: host.manager.attach("probe-vm", "probe2", "loop"))
        assert host.full_diff() == []
        detach = host.reads(lambda: host.manager.detach("probe-vm", "probe2"))
        detach_last = host.reads(lambda: host.manager.detach("probe-vm", "probe"))
        assert host.full_diff() == []
        measured[size] = (attach, second, detach, detach_last)
    assert measured[5] == measured[50], measured
    # a full reconcile reads the whole tree: it does grow (this is what the scoped path avoids)
    full = host.reads(host.manager.reconcile)
    assert full > 10 * max(measured[50]), (full, measured)


def test_last_vm_on_a_port_takes_the_port_away_and_leaves_others(host: Host) -> None:
    host.grow_to(3)
    tcp_links = sorted((host.cfs.root / "ports" / "4420" / "subsystems").iterdir())
    host.manager.attach("probe-vm", "probe", "loop")
    assert (host.cfs.root / "ports" / "4421").is_dir()
    host.manager.detach("probe-vm", "probe")
    assert not (host.cfs.root / "ports" / "4421").exists()  # no VM uses loop any more
    assert sorted((host.cfs.root / "ports" / "4420" / "subsystems").iterdir()) == tcp_links
    host.manager.attach("probe-vm", "probe", "tcp")
    host.manager.detach("probe-vm", "probe")
    assert sorted((host.cfs.root / "ports" / "4420" / "subsystems").iterdir()) == tcp_links
    assert host.full_diff() == []


def test_hand_edit_of_a_port_is_repaired_by_the_full_check(host: Host) -> None:
    """The kept port attributes are dropped at each full reconcile (start, timer), which repairs a hand edit."""
    host.grow_to(2)
    host.manager.attach("probe-vm", "probe", "tcp")
    (host.cfs.root / "ports" / "4420" / "addr_traddr").write_text("127.0.0.9\n")
    assert host.full_diff() != []
    assert host.manager.reconcile().converged
    assert host.full_diff() == []
