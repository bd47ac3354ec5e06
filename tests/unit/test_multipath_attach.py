"""`attach --multipath` on a fake configfs tree: the VM's subsystem on the tcp port (ANA group 1 optimized) and on
the standby port (ANA group 1 non-optimized), recorded in the store, undone by detach, refused for other
transports, and what the scoped attach leaves is what the full reconcile wants."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import pools
from nvmetd.errors import UserError
from nvmetd.manager import Manager
from nvmetd.vms import Ports
from target.apply import diff
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel


@pytest.fixture
def manager(tmp_path: Path) -> Manager:
    FakeKernel(tmp_path / "nvmet")
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=tmp_path / "pools")
    mgr = Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"),
                  pools_root=tmp_path / "pools", keys_dir=tmp_path / "keys", host_connect=False)
    for disk in ("d1", "d2"):
        mgr.create_disk(disk, "files", "4M")
    return mgr


def test_multipath_exports_on_two_ports_with_ana_states(manager: Manager) -> None:
    ports, root = Ports(), manager.cfs.root
    result = manager.attach("vm1", "d1", "tcp", multipath=True)
    assert [(p["trsvcid"], p["ana_state"]) for p in result.paths] == [
        (ports.tcp_port, "optimized"), (ports.tcp_standby_port, "non-optimized")]
    assert manager.store.load()["vms"]["vm1"]["attachments"]["d1"]["multipath"] is True
    primary, standby = root / "ports" / str(ports.tcp_id), root / "ports" / str(ports.tcp_standby_id)
    for port in (primary, standby):
        assert (port / "subsystems" / result.subsystem_nqn).exists()
    assert (standby / "addr_trsvcid").read_text().strip() == ports.tcp_standby_port
    assert (standby / "ana_groups" / "1" / "ana_state").read_text().strip() == "non-optimized"
    assert (primary / "ana_groups" / "1" / "ana_state").read_text().strip() == "optimized"
    assert diff(manager.effective(manager.store.load()), manager.cfs) == []

    manager.detach("vm1", "d1")
    assert not standby.exists() and not primary.exists()
    assert diff(manager.effective(manager.store.load()), manager.cfs) == []


def test_plain_tcp_disks_stay_off_the_standby_port(manager: Manager) -> None:
    manager.attach("vm1", "d1", "tcp", multipath=True)
    plain = manager.attach("vm2", "d2", "tcp")
    assert plain.paths is None
    standby = manager.cfs.root / "ports" / str(Ports().tcp_standby_id) / "subsystems"
    assert [p.name for p in standby.iterdir()] == [manager.attach("vm1", "d1", "tcp", multipath=True).subsystem_nqn]
    manager.detach("vm1", "d1")  # the standby port goes with its last multipath disk; vm2's tcp port stays
    assert not standby.parent.exists()
    assert (manager.cfs.root / "ports" / str(Ports().tcp_id) / "subsystems" / plain.subsystem_nqn).exists()
    assert diff(manager.effective(manager.store.load()), manager.cfs) == []


def test_multipath_refused_off_tcp_and_when_it_would_change(manager: Manager) -> None:
    with pytest.raises(UserError, match="--multipath needs --transport tcp"):
        manager.attach("vm1", "d1", "loop", multipath=True)
    assert "vm1" not in manager.store.load().get("vms", {})
    manager.attach("vm1", "d1", "tcp")
    with pytest.raises(UserError, match="without multipath; detach it first"):
        manager.attach("vm1", "d1", "tcp", multipath=True)
