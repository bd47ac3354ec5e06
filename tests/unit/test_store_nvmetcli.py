"""The durable store (atomic, locked, CAS) and the nvmetcli file format."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from target.model import Subsystem, TargetState, parse_state
from target.nvmetcli import export_config, import_config
from target.store import ConflictError, StateStore, StoreError, set_target

FIXTURES = Path(__file__).parent.parent / "fixtures" / "nvmetcli"


def test_nvmetcli_full_file_round_trips_exactly() -> None:
    text = (FIXTURES / "full-6.12.json").read_text()
    config = json.loads(text)
    out = export_config(import_config(config))
    assert out == config
    assert json.dumps(out, indent=2, sort_keys=True) + "\n" == text


def test_nvmetcli_partial_file_imports() -> None:
    config = {"hosts": [{"nqn": "nqn.2026-11.io.nvmetd:h"}],
              "ports": [{"addr": {"trtype": "loop", "adrfam": "", "traddr": "", "trsvcid": "",
                                  "treq": "not specified"}, "portid": 1, "referrals": [],
                         "subsystems": ["nqn.2026-11.io.nvmetd:s"]}],
              "subsystems": [{"allowed_hosts": ["nqn.2026-11.io.nvmetd:h"], "attr": {"allow_any_host": "0"},
                              "namespaces": [{"device": {"path": "/dev/nvme0n1"}, "enable": 1, "nsid": 1}],
                              "nqn": "nqn.2026-11.io.nvmetd:s"}]}
    state = import_config(config)
    assert state.subsystems[0].namespaces[0].device_path == "/dev/nvme0n1"
    assert state.subsystems[0].serial is None  # not in the file: left to the kernel


def test_nvmetcli_bad_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"subsystems\.0\.nqn"):
        import_config({"subsystems": [{"nqn": "../../etc", "attr": {}}]})


def test_transaction_is_atomic_private_and_versioned(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state" / "state.json")
    with store.transaction() as doc:
        set_target(doc, parse_state({"subsystems": [{"nqn": "nqn.2026-11.io.nvmetd:a"}]}))
    assert store.load()["generation"] == 1
    assert (store.path.stat().st_mode & 0o777) == 0o600
    with store.transaction():
        pass  # unchanged: no write, no new generation
    assert store.load()["generation"] == 1
    assert [p.name for p in store.path.parent.iterdir() if p.name.startswith(".state.json.")] == []


def test_compare_and_swap_refuses_stale_writers(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    doc = store.load()
    gen = store.compare_and_swap(doc["generation"], doc)
    with pytest.raises(ConflictError):
        store.compare_and_swap(doc["generation"], doc)
    assert store.load()["generation"] == gen


def test_threads_lose_no_update(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")

    def add(prefix: str) -> None:
        for i in range(30):
            with store.transaction() as doc:
                state = parse_state(doc["target"])
                state.subsystems.append(Subsystem(nqn=f"nqn.2026-11.io.nvmetd:{prefix}{i}"))
                set_target(doc, TargetState.model_validate(state.model_dump()))

    threads = [threading.Thread(target=add, args=(p,)) for p in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.target().subsystems) == 60


def test_corrupt_state_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        StateStore(path).load()
    assert path.read_text() == "{not json"


def test_nvmetcli_saves_and_examples_parse_passthru_null_is_none() -> None:
    """nvmetcli's save on 6.12 writes a "(null)" passthru for every subsystem: no passthru. Its examples' names
    (testnqn, hostnqn) are taken, with a warning each; a name that starts like an NQN stays strict."""
    from target import validate

    fixtures = Path(__file__).parent.parent / "fixtures/nvmetcli"
    files = sorted(fixtures.glob("save-6.12-*.json")) + sorted((fixtures / "examples").glob("*.json"))
    assert len(files) == 7
    for path in files:
        config = json.loads(path.read_text())
        with validate.collect_warnings() as warnings:
            state = import_config(config)
        assert all(s.passthru is None for s in state.subsystems)
        assert {w.split("'")[1] for w in warnings} == {s.nqn for s in state.subsystems} | {h.nqn for h in state.hosts}
        if path.name.startswith("save-"):
            assert export_config(state, passthru_placeholder=True) == config
    with pytest.raises(ValueError, match="not an NQN"):
        validate.kernel_nqn("nqn.testnqn")  # starts like an NQN: must be one
    with pytest.raises(ValueError, match="not an NQN"):
        validate.nqn("testnqn")  # nvmetd's own NQNs (the VMs') are checked strictly
