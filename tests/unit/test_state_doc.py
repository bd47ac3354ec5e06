"""The typed state document (nvmetd/state_doc.py) on the files nvmetd writes and the files it wrote before:
a current file round-trips without a write, an old one migrates on the next change, a bad one is refused by
field, and every disk writer (clone included) records a lifecycle state. Host side: a real file pool, nvmetd's
Manager on a fake configfs tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from backends import pools
from nvmetd import state_doc
from nvmetd.manager import Manager
from nvmetd.state_doc import DiskState, StateDocument
from nvmetd.vhost import VhostEngines
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel

UUID = "11111111-2222-3333-4444-555555555555"
KEY = "DHHC-1:00:" + "A" * 44 + ":"


@pytest.fixture
def manager(tmp_path: Path) -> Manager:
    FakeKernel(tmp_path / "nvmet")
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=tmp_path / "pools")
    return Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"),
                   pools_root=tmp_path / "pools", keys_dir=tmp_path / "keys", host_connect=False,
                   vhost=VhostEngines(tmp_path / "vhost"))


def test_every_disk_writer_records_a_state_and_a_typed_no_op_writes_nothing(manager: Manager) -> None:
    manager.create_disk("d0", "files", "4M")
    manager.attach("vm0", "d0", "tcp")
    manager.snapshot_disk("d0", "s1")
    manager.clone_disk("d0", "s1", "d1")
    raw = manager.store.load()
    assert {name: d["state"] for name, d in raw["disks"].items()} == {"d0": "ready", "d1": "ready"}
    doc = state_doc.load(manager.store)
    assert doc.disks["d1"].state is DiskState.READY and doc.vms["vm0"].attachments["d0"].transport == "tcp"
    assert doc.to_raw() == raw  # the stored form is what nvmetd's writers write
    before = manager.store.path.read_bytes()
    with state_doc.transaction(manager.store) as typed:
        assert set(typed.ready_disks()) == {"d0", "d1"}
    assert manager.store.path.read_bytes() == before  # no change: no write, no generation bump


def test_a_file_of_an_earlier_nvmetd_migrates_on_the_next_change(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    old = {"format": 1, "generation": 7, "target": {"hosts": [], "subsystems": [], "ports": []},
           "disks": {"cloned": {"pool": "files"}, "gone": {"pool": "files", "state": "deleting"}},
           "vms": {"vm0": {"name": "vm0", "uuid": UUID, "dhchap_key": KEY,
                           "attachments": {"cloned": {"nsid": 1, "transport": "vhost"}}}},
           "ports": {"tcp_port": 4420, "tcp_address": "127.0.0.1"},
           "later": {"kept": True}}  # a section a newer component added: kept as found
    store.path.write_text(json.dumps(old, indent=1))
    doc = state_doc.load(store)
    assert doc.disks["cloned"].state is DiskState.READY and doc.disks["gone"].state is DiskState.DELETING
    assert set(doc.ready_disks()) == {"cloned"}
    assert doc.vms["vm0"].attachments["cloned"].backend == "engine"
    assert doc.ports is not None and doc.ports.tcp_port == "4420"
    with state_doc.transaction(store) as typed:
        typed.disks["new"] = state_doc.Disk(pool="files", state=DiskState.CREATING)
    raw = store.load()
    assert raw["generation"] == 8 and raw["later"] == {"kept": True}
    assert raw["disks"] == {"cloned": {"pool": "files", "state": "ready"},
                            "gone": {"pool": "files", "state": "deleting"},
                            "new": {"pool": "files", "state": "creating"}}
    assert raw["vms"]["vm0"]["attachments"]["cloned"] == {"nsid": 1, "transport": "vhost", "backend": "engine",
                                                          "tls": False, "multipath": False}
    assert raw["ports"] == {"tcp_port": "4420", "tcp_address": "127.0.0.1"}  # what was set, not the defaults


@pytest.mark.parametrize(("section", "value", "where"), [
    ("disks", {"d0": {"pool": "files", "state": "half-made"}}, "disks.d0.state"),
    ("vms", {"vm0": {"name": "../x", "uuid": UUID, "dhchap_key": KEY}}, "vms.vm0.name"),
    ("format", 2, "format"),
])
def test_a_bad_file_is_refused_by_field(section: str, value: object, where: str) -> None:
    raw = {"format": 1, "generation": 0, section: value}
    with pytest.raises(ValidationError) as exc:
        StateDocument.from_raw(raw)
    assert where in {".".join(str(p) for p in e["loc"]) for e in exc.value.errors()}


def test_a_disk_mid_create_is_no_disk_to_attach(manager: Manager) -> None:
    with manager.store.transaction() as raw:
        raw.setdefault("disks", {})["half"] = {"pool": "files", "state": DiskState.CREATING.value}
    with pytest.raises(Exception, match="no disk named 'half'"):
        manager.attach("vm0", "half", "tcp")
    assert [d["name"] for d in manager.list_disks()] == []
