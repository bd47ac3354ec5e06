"""A detached disk whose volume was removed behind nvmetd's back (a pool edited by hand, a test's teardown) must
not stop the restore of everything else: before, the start-up restore failed on it ("pool has no volume") and
nvmetd stayed NOT READY for every VM on the host; `disk list` failed whole. On a fake configfs tree (the
reconcile logic only)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backends import pools
from nvmetd.manager import Manager
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel


def test_restore_converges_past_a_detached_disk_without_volume(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    FakeKernel(tmp_path / "nvmet")
    root = tmp_path / "pools"
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=root)
    manager = Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"), pools_root=root,
                      keys_dir=tmp_path / "keys", host_connect=False)
    for name in ("kept", "gone"):
        manager.create_disk(name, "files", "1M")
    manager.attach("vm1", "kept", transport="tcp")
    pools.open_pool("files", root).delete("gone")  # behind nvmetd's back
    with caplog.at_level(logging.WARNING, logger="nvmetd.manager"):
        result = manager.boot(wait=0)
    assert result.converged
    assert "no volume for the detached disk(s) gone" in caplog.text
    listed = {d["name"]: d for d in manager.list_disks()}
    assert listed["kept"]["attached_to"] == ["vm1"] and "missing" not in listed["kept"]
    assert "no volume" in listed["gone"]["missing"]
