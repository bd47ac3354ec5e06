"""On the real kernel: an attach or detach reads only that VM's objects, so its configfs reads are the same with
5 and with 50 VMs on the host (counted, not timed), the new namespace is usable over loop, and what the scoped
change leaves is exactly what a full reconcile wants (a full diff afterwards is empty)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from backends import pools
from nvmetd.manager import Manager
from nvmetd.vms import SUBSYSTEM_PREFIX, Attachment, new_vm
from target.apply import diff
from target.configfs import ConfigFS
from target.store import StateStore
from tests.kernel import hostside

pytestmark = pytest.mark.kernel


def _read_first_block(device: str) -> None:
    buf = mmap.mmap(-1, 4096)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == 4096
    finally:
        os.close(fd)


def test_attach_reads_do_not_grow_with_vms(cfs: ConfigFS, scratch: Path) -> None:
    root = scratch / "pools"
    pools.create_pool("file", "files", devices=[str(scratch / "files")], root=root)
    store = StateStore(scratch / "state.json")
    manager = Manager(store, cfs, pools_root=root, keys_dir=scratch / "keys")
    manager.create_disk("probe", "files", "16M")
    pool = pools.open_pool("files", root)
    grown = 0
    measured: dict[int, tuple[int, int]] = {}
    try:
        for size in (5, 50):
            names = [f"bg{i:02d}" for i in range(grown, size)]
            for name in names:
                pool.create(name, "1M")
            with store.transaction() as doc:
                for name in names:
                    vm = new_vm(f"vm-{name}")
                    vm.attachments[name] = Attachment(nsid=1, transport="tcp")
                    doc.setdefault("vms", {})[vm.name] = vm.model_dump()
                    doc.setdefault("disks", {})[name] = {"pool": "files", "state": "ready"}
            assert manager.reconcile().converged
            grown = size
            before = cfs.counters.reads
            result = manager.attach("probe-vm", "probe", "loop")
            attach_reads = cfs.counters.reads - before
            assert result.device is not None
            _read_first_block(result.device)  # usable: the host side sees the namespace and reads it
            assert diff(manager.effective(store.load()), cfs) == []
            before = cfs.counters.reads
            assert manager.detach("probe-vm", "probe")["converged"]
            measured[size] = (attach_reads, cfs.counters.reads - before)
            assert diff(manager.effective(store.load()), cfs) == []
            subsystems = [s for s in cfs.listdir("subsystems") if s.startswith(SUBSYSTEM_PREFIX)]
            assert len(subsystems) == size  # the probe VM's subsystem went, every other VM's stayed
        print(f"configfs reads per attach/detach: 5 VMs {measured[5]}, 50 VMs {measured[50]}")
        assert measured[5] == measured[50]
    finally:
        for sub in cfs.listdir("subsystems"):
            hostside.disconnect(sub)
