"""The store's summary of the VMs (nvmetd/vm_index.py) always equals a walk over every VM of the document.

The walk here is the code the summary replaced (which VM has which disk, which of nvmetd's ports any VM uses).
Checked after random sequences of attaches, detaches, VM deletions, unrelated changes, whole-section writes,
compactions and merges of the summary's layers; inside a transaction (the view's own rows on top of the stored
summary); after another process changed the files (journal lines it appended, a base it rewrote); and through
the Manager, whose attach must refuse a disk another process has just given to another VM.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmetd import vm_index
from nvmetd.errors import UserError
from nvmetd.vms import STANDBY
from target import journal
from target.store import StateStore, read_document

ctx = multiprocessing.get_context("fork")
VMS = ["a", "b", "c", "d"]
DISKS = [f"d{i}" for i in range(6)]


def walk(vms: Mapping[str, Any] | None) -> tuple[dict[str, list[str]], set[str]]:
    """Every VM's attachments read one by one: disk -> VMs, and the ports in use (as before the summary)."""
    users: dict[str, list[str]] = {}
    used: set[str] = set()
    for name, row in (vms or {}).items():
        for disk, att in row.get("attachments", {}).items():
            users.setdefault(disk, []).append(name)
            used.add("tls" if att.get("tls") else att.get("transport"))
            if att.get("multipath"):
                used.add(STANDBY)
    return {d: sorted(u) for d, u in sorted(users.items())}, used & {"tcp", "loop", "rdma", "tls", STANDBY}


def summary(index: vm_index.VmIndex) -> tuple[dict[str, list[str]], set[str]]:
    return index.users_by_disk(), index.transports_in_use()


def check_stored(store: StateStore) -> None:
    assert summary(store.derived(vm_index.SPEC)) == walk((read_document(store.path) or {}).get("vms"))


ops = st.lists(st.one_of(
    st.tuples(st.just("attach"), st.sampled_from(VMS), st.sampled_from(DISKS),
              st.sampled_from(["tcp", "loop", "rdma", "vhost"]), st.booleans(), st.booleans()),
    st.tuples(st.just("detach"), st.sampled_from(VMS), st.sampled_from(DISKS)),
    st.tuples(st.just("delete"), st.sampled_from(VMS)),
    st.tuples(st.just("disks"), st.sampled_from(DISKS)),
    st.tuples(st.just("assign"), st.sampled_from(VMS), st.sampled_from(DISKS)),
    st.tuples(st.just("read"), st.sampled_from(VMS)),
), max_size=40)


def change(doc: dict[str, Any], op: tuple[Any, ...]) -> None:
    """One operation on a transaction's view, shaped as nvmetd stores VMs."""
    kind = op[0]
    if kind == "attach":
        _, vm, disk, transport, tls, multipath = op
        att = {"nsid": 1, "transport": transport, "tls": tls and transport == "tcp",
               "multipath": multipath and transport == "tcp" and not tls}
        doc.setdefault("vms", {}).setdefault(vm, {"name": vm, "attachments": {}})["attachments"][disk] = att
    elif kind == "detach" and op[1] in doc.get("vms", {}):
        doc["vms"][op[1]]["attachments"].pop(op[2], None)
    elif kind == "delete":
        doc.get("vms", {}).pop(op[1], None)
    elif kind == "disks":
        doc.setdefault("disks", {})[op[1]] = {"pool": "p", "state": "ready"}
    elif kind == "assign":  # the section written whole (a record's `top`, not its rows)
        doc["vms"] = {op[1]: {"name": op[1], "attachments": {op[2]: {"nsid": 1, "transport": "loop"}}}}
    elif kind == "read":
        doc.get("vms", {}).get(op[1])  # reached, not changed


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(min_value=0, max_value=600), st.integers(min_value=1, max_value=8))
def test_the_summary_equals_a_walk_after_any_sequence(sequence: list[tuple[Any, ...]], compact: int,
                                                      depth: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(journal, "MIN_COMPACT_BYTES", compact), \
            mock.patch.object(vm_index, "MAX_DEPTH", depth):  # layers merged within a sequence too
        store = StateStore(Path(tmp) / "state.json")
        for op in sequence:
            with store.transaction() as doc:
                base = store.derived(vm_index.SPEC)  # as the Manager takes it: the document this view is of
                change(doc, op)
                assert summary(vm_index.for_doc(base, doc)) == walk(doc.get("vms"))
            assert summary(vm_index.for_doc(base, doc)) == walk(doc.get("vms"))  # after the save, as detach uses it
            check_stored(store)


def test_a_plain_document_is_walked_not_trusted() -> None:
    stored = {"vms": {"a": {"attachments": {"d0": {"nsid": 1, "transport": "tcp"}}}}}
    base = vm_index.VmIndex.build(stored["vms"])
    other = {"vms": {"b": {"attachments": {"d1": {"nsid": 1, "transport": "rdma", "multipath": False}}}}}
    assert summary(vm_index.for_doc(base, other)) == walk(other["vms"]) == ({"d1": ["b"]}, {"rdma"})
    assert vm_index.for_doc(base, stored) is base


def test_layers_are_merged_and_stay_equal(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    for i in range(3 * vm_index.MAX_DEPTH):
        with store.transaction() as doc:
            doc.setdefault("vms", {})[f"vm{i}"] = {"attachments": {f"disk{i}": {"nsid": 1, "transport": "tcp"}}}
            if i % 3 == 0:
                doc["vms"].pop(f"vm{i - 1}", None)
        index = store.derived(vm_index.SPEC)
        assert index.layer.depth <= vm_index.MAX_DEPTH
    check_stored(store)


def _child_attach(path: str, vm: str, disk: str) -> None:
    with StateStore(Path(path)).transaction() as doc:
        doc.setdefault("vms", {})[vm] = {"name": vm, "attachments": {disk: {"nsid": 1, "transport": "tcp"}}}


def _in_child(target: Any, *args: Any) -> None:
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join()
    assert proc.exitcode == 0


def test_another_process_changes_are_rolled_in_or_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.transaction() as doc:
        doc["vms"] = {"a": {"name": "a", "attachments": {"d0": {"nsid": 1, "transport": "loop"}}}}
    check_stored(store)
    _in_child(_child_attach, str(path), "b", "d1")  # a journal line this process did not write
    assert store.derived(vm_index.SPEC).disk_users("d1") == ["b"]
    check_stored(store)
    raw = read_document(path)
    raw["vms"]["c"] = {"name": "c", "attachments": {"d2": {"nsid": 1, "transport": "rdma"}}}
    raw["generation"] += 1
    journal.write_base(path, raw)  # a new base (another process compacting, or a hand edit)
    assert store.derived(vm_index.SPEC).transports_in_use() == {"loop", "tcp", "rdma"}
    check_stored(store)


def test_attach_refuses_a_disk_another_process_just_gave_to_another_vm(tmp_path: Path) -> None:
    from tests.unit.test_scoped_reconcile import Host

    host = Host(tmp_path)
    host.manager.create_disk("shared", "files", "1M")
    host.manager.attach("vm1", "shared", transport="tcp")
    host.manager.detach("vm1", "shared")
    assert not host.manager.store.derived(vm_index.SPEC).attached("shared")  # cached, then changed elsewhere
    _in_child(_child_attach, str(host.store.path), "vm-elsewhere", "shared")
    with pytest.raises(UserError, match="attached to VM 'vm-elsewhere'"):
        host.manager.attach("vm1", "shared", transport="tcp")
    check_stored(host.store)


def test_the_manager_keeps_it_equal_through_attach_detach_and_delete(tmp_path: Path) -> None:
    from tests.unit.test_scoped_reconcile import Host

    host = Host(tmp_path)
    host.grow_to(3)
    m = host.manager
    for name in ("p0", "p1", "p2"):
        m.create_disk(name, "files", "1M")
    m.attach("x", "p0", transport="tcp")
    m.attach("x", "p1", transport="loop")
    m.attach("y", "p2", transport="tcp", multipath=True)
    check_stored(host.store)
    assert m.store.derived(vm_index.SPEC).transports_in_use() == {"tcp", "loop", STANDBY}
    m.detach("y", "p2")
    m.delete_disk("p2")
    m.detach("x", "p1")
    check_stored(host.store)
    assert m.store.derived(vm_index.SPEC).transports_in_use() == {"tcp"}
    assert host.full_diff() == []
