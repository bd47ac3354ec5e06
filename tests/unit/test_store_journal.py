"""The store saves a change as one journal line, keeps the parsed document in memory, and stays crash-safe.

A kill -9 between any two writes leaves the old or the new state (children killed at random points of a write
loop), two processes lose no update, a state file of an earlier version loads and migrates, and a change made
by another process (or by hand) is seen by a process that has the document cached.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from target import journal
from target.store import StateStore, StoreError, read_document, stored_files
from target.tracked import Tracked, changes

ctx = multiprocessing.get_context("fork")


def _add_vms(path: str, prefix: str, count: int) -> None:
    store = StateStore(Path(path))
    for i in range(count):
        with store.transaction() as doc:
            doc.setdefault("vms", {})[f"{prefix}{i}"] = {"n": i, "attachments": {"d": {"nsid": 1}}}


def test_a_change_appends_one_line_with_only_the_changed_row(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.transaction() as doc:
        doc["vms"] = {f"vm{i}": {"n": i} for i in range(100)}
    base = path.read_text()
    with store.transaction() as doc:
        doc["vms"]["vm7"]["n"] = 70
        assert doc["vms"]["vm8"] == {"n": 8}  # read, not changed
    assert path.read_text() == base  # the base is not rewritten
    lines = store.journal_path.read_text().splitlines()
    assert len(lines) == 2  # the header and one record
    record = json.loads(lines[1])
    assert record == {"g": 2, "rows": {"vms": {"vm7": {"n": 70}}}}
    assert read_document(path)["vms"]["vm7"] == {"n": 70} and read_document(path)["generation"] == 2
    with store.transaction() as doc:
        del doc["vms"]["vm3"]
        doc.setdefault("ports", {})["tcp_port"] = "4420"
    assert json.loads(store.journal_path.read_text().splitlines()[2]) == {
        "g": 3, "del": {"vms": ["vm3"]}, "top": {"ports": {"tcp_port": "4420"}}}
    fresh = read_document(path)
    assert "vm3" not in fresh["vms"] and fresh["ports"] == {"tcp_port": "4420"} and len(fresh["vms"]) == 99


def test_no_change_no_write_and_an_exception_saves_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    with store.transaction() as doc:
        doc["vms"] = {"a": {"n": 1}}
    size = store.journal_path.stat().st_size
    with store.transaction() as doc:
        doc["vms"]["a"]["n"] = 1  # the same value
        list(doc["vms"].items())
    with pytest.raises(RuntimeError), store.transaction() as doc:
        doc["vms"]["a"]["n"] = 2
        raise RuntimeError("the caller failed")
    assert store.journal_path.stat().st_size == size
    assert store.load()["vms"] == {"a": {"n": 1}} and store.load()["generation"] == 1


def test_views_are_private_and_the_cache_is_not_changed_through_them(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    with store.transaction() as doc:
        doc["vms"] = {"a": {"attachments": {"d": {"nsid": 1}}}}
    view = store.load()
    view["vms"]["a"]["attachments"]["d"]["nsid"] = 9  # a reader changing what it loaded
    for _, vm in view["vms"].items():
        vm["attachments"].clear()
    assert store.load()["vms"]["a"]["attachments"]["d"]["nsid"] == 1
    with store.transaction() as doc:
        kept = doc["vms"]["a"]
        kept["x"] = 1
    kept["x"] = 2  # after the transaction: the caller's object, not the committed one
    assert store.load()["vms"]["a"]["x"] == 1 == read_document(store.path)["vms"]["a"]["x"]


def test_changes_compares_only_what_was_touched() -> None:
    base = {"generation": 1, "vms": {f"v{i}": {"n": i} for i in range(1000)}, "target": {"hosts": []}}
    view = Tracked(base, ["vms"])
    view["vms"]["v1"]["n"] = 10
    view["vms"]["new"] = {"n": -1}
    view["vms"].pop("v2")
    assert len(view["vms"]._owned) == 2  # v1 and new: the other rows were neither copied nor compared
    assert changes(view) == {"rows": {"vms": {"v1": {"n": 10}, "new": {"n": -1}}}, "del": {"vms": ["v2"]}}
    assert base["vms"]["v1"] == {"n": 1} and "v2" in base["vms"]  # the committed document is untouched


def test_another_process_change_is_seen_by_a_cached_reader(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.transaction() as doc:
        doc["vms"] = {"a": {"n": 1}}
    assert store.load()["vms"]["a"] == {"n": 1}  # cached now
    child = ctx.Process(target=_add_vms, args=(str(path), "child", 3))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert sorted(store.load()["vms"]) == ["a", "child0", "child1", "child2"]  # the journal's new tail
    assert store.load()["generation"] == 4
    # a hand edit of the base (as an operator restoring a copy would) drops the journal that followed the old base
    path.write_text(json.dumps({"format": 1, "generation": 9, "vms": {"restored": {}}}, indent=2))
    assert store.load()["vms"] == {"restored": {}} and store.load()["generation"] == 9
    with store.transaction() as doc:
        doc["vms"]["later"] = {}
    assert read_document(path)["vms"] == {"restored": {}, "later": {}}


def test_an_earlier_version_state_file_loads_and_migrates(tmp_path: Path) -> None:
    """A state file as nvmetd wrote it before the journal (indented by hand or compact): loaded as it is; the
    first change rewrites it in the current form with a journal that follows it."""
    path = tmp_path / "state.json"
    old = {"format": 1, "generation": 41, "target": {"hosts": [], "ports": [], "subsystems": []},
           "vms": {"vm1": {"name": "vm1"}}, "disks": {"d1": {"pool": "p"}}}
    path.write_text(json.dumps(old, indent=2) + "\n")
    path.chmod(0o600)
    store = StateStore(path)
    assert store.load() == old and not store.journal_path.exists()
    with store.transaction() as doc:
        doc["disks"]["d1"]["state"] = "ready"
    migrated = path.read_text()  # the first change rewrites the base in the current (compact) form
    assert migrated.count("\n") == 1 and json.loads(migrated) == {**old, "generation": 42,
                                                                 "disks": {"d1": {"pool": "p", "state": "ready"}}}
    with store.transaction() as doc:
        doc["vms"]["vm1"]["uuid"] = "u"
    assert path.read_text() == migrated  # from then on, changes go to the journal
    assert read_document(path)["vms"]["vm1"] == {"name": "vm1", "uuid": "u"} and read_document(path)["generation"] == 43
    assert os.stat(store.journal_path).st_mode & 0o777 == 0o600 == os.stat(path).st_mode & 0o777


def test_compaction_writes_a_new_base_and_a_fresh_journal(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    for i in range(400):  # each line ~1 KiB: past the 256 KiB threshold
        with store.transaction() as doc:
            doc.setdefault("vms", {})[f"vm{i}"] = {"pad": "x" * 1000}
    assert store.journal_path.stat().st_size < journal.MIN_COMPACT_BYTES + 4096
    assert len(json.loads(path.read_text())["vms"]) > 200  # compacted into the base at least once
    fresh = read_document(path)
    assert len(fresh["vms"]) == 400 and fresh["generation"] == 400
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert stored_files(path) == [path, store.journal_path]


def test_an_unfinished_last_line_is_ignored_and_cut_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.transaction() as doc:
        doc["vms"] = {"a": {}}
    with store.transaction() as doc:
        doc["vms"]["b"] = {}
    good = store.journal_path.read_bytes()
    for torn in (b'{"g":3,"rows":{"vms":{"c"', b"\0" * 40, b"\0" * 40 + b"\n"):
        store.journal_path.write_bytes(good + torn)
        assert sorted(read_document(path)["vms"]) == ["a", "b"]
    with store.transaction() as doc:
        doc["vms"]["c"] = {}
    assert store.journal_path.read_bytes().startswith(good) and read_document(path)["generation"] == 3
    assert sorted(read_document(path)["vms"]) == ["a", "b", "c"]
    store.journal_path.write_bytes(good + b"garbage\n" + b'{"g":3}\n')  # damage in the middle: refused
    with pytest.raises(StoreError, match="not JSON"):
        read_document(path)


def _writer_loop(path: str, start: int) -> None:
    store = StateStore(Path(path))
    i = start
    while True:
        with store.transaction() as doc:
            doc.setdefault("vms", {})[f"vm{i}"] = {"n": i}
            doc["counter"] = i
        i += 1
        if i % 7 == 0:  # deletes and a big row now and then, so that compaction (a new base) happens often
            with store.transaction() as doc:
                doc["vms"].pop(f"vm{i - 5}", None)
                doc["big"] = str(i) * (60000 // len(str(i)))


def test_kill_9_at_random_points_leaves_old_or_new_state(tmp_path: Path) -> None:
    """A writer killed mid-write, 80 times: the file always loads, the generation only grows, every record
    counted is whole (the counter and the newest VM agree), and the next writer goes on from there."""
    path = tmp_path / "state.json"
    last_generation, next_i, bases = 0, 0, set()
    for round_no in range(80):
        child = ctx.Process(target=_writer_loop, args=(str(path), next_i))
        child.start()
        time.sleep(0.02 + (round_no % 7) * 0.013)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        doc = read_document(path)
        if doc is None:
            continue
        assert doc["generation"] >= last_generation
        last_generation = doc["generation"]
        counter = doc.get("counter")
        if counter is not None:
            assert f"vm{counter}" in doc["vms"] and doc["vms"][f"vm{counter}"] == {"n": counter}
            assert all(f"vm{j}" in doc["vms"] for j in range(max(0, counter - 3), counter + 1)
                       if (j + 5) % 7 != 0 or j + 5 > counter)
            next_i = counter + 1
        assert StateStore(path).load() == doc  # a cached reader in this process agrees with the files
        bases.add((path.stat().st_ino, path.stat().st_mtime_ns))
    assert last_generation > 40
    assert len(bases) > 3  # bases were written (compactions) during the run, not only journal lines


def test_two_processes_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.load()  # cached before the others write
    children = [ctx.Process(target=_add_vms, args=(str(path), p, 60)) for p in "ab"]
    for c in children:
        c.start()
    _add_vms(str(path), "c", 60)
    for c in children:
        c.join(60)
        assert c.exitcode == 0
    doc = store.load()
    assert len(doc["vms"]) == 180 and doc["generation"] == 180
    assert read_document(path) == doc


def test_a_typed_transaction_with_untyped_sections_is_saved(tmp_path: Path) -> None:
    """nvmetd.state_doc's typed transaction changing a value pydantic keeps untyped (offload entries): saved,
    and the committed document is not changed behind the store's back."""
    from nvmetd import state_doc

    store = StateStore(tmp_path / "state.json")
    with store.transaction() as doc:
        doc["offload"] = {"vm1": {"dpu": {"endpoint": "a"}}}
    with state_doc.transaction(store) as typed:
        typed.offload["vm1"]["dpu"]["endpoint"] = "b"
    assert read_document(store.path)["offload"] == {"vm1": {"dpu": {"endpoint": "b"}}} == store.load()["offload"]
