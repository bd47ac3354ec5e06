"""diff, status and export compute what they print without opening a volume: no pool.attach (LV activation, LUKS
open), and no configfs change. Host side: a real file pool, nvmetd's Manager on a fake configfs tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import pools
from backends.base import Backend
from nvmetd.manager import Manager
from nvmetd.target_ops import TargetOps
from nvmetd.vhost import VhostEngines
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel


def test_read_only_commands_open_no_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeKernel(tmp_path / "nvmet")
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=tmp_path / "pools")
    manager = Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"),
                      pools_root=tmp_path / "pools", keys_dir=tmp_path / "keys", host_connect=False,
                      vhost=VhostEngines(tmp_path / "vhost"))
    manager.create_disk("d0", "files", "4M")
    manager.attach("vm0", "d0", "tcp")
    ops = TargetOps(manager)
    device = next(iter(manager.effective(manager.store.load()).subsystems)).namespaces[0].device_path

    opened: list[str] = []
    monkeypatch.setattr(Backend, "attach", lambda self, name: opened.append(name) or f"/dev/opened/{name}")
    changes_before = manager.cfs.counters.changes
    assert ops.drift() == {"drift": []}
    status = ops.status()
    assert status["drift"] == 0 and status["desired"]["namespaces"] == 1
    exported = ops.export()["config"]
    assert exported["subsystems"][0]["namespaces"][0]["device_path"] == device
    assert ops.plan({})["changes"] == []  # the VMs' subsystems are part of every plan
    assert opened == [] and manager.cfs.counters.changes == changes_before
    manager.effective(manager.store.load())  # what a reconcile does: it opens every attached volume
    assert opened == ["d0"]
