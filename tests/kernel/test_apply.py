"""The control plane against the real 6.12 nvmet: apply, connect, I/O, idempotence, drift, teardown, ACL."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from target.apply import apply_state, diff
from target.configfs import ConfigFS
from target.live import read_state
from target.model import TargetState, parse_state
from tests.kernel import hostside

pytestmark = pytest.mark.kernel

HOST_A = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:66666666-7777-8888-9999-000000000000"
SUB_FILE = "nqn.2026-11.io.nvmetd:test-file"
SUB_LOOPDEV = "nqn.2026-11.io.nvmetd:test-loopdev"


def make_file(path: Path, size: int = 64 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_loopdev(backing: Path) -> str:
    make_file(backing)
    return subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def loopdev(scratch: Path):
    dev = make_loopdev(scratch / "loopdev.img")
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def full_state(scratch: Path, loopdev: str) -> TargetState:
    return parse_state({
        "hosts": [{"nqn": HOST_A}, {"nqn": HOST_B}],
        "subsystems": [
            {"nqn": SUB_FILE, "allowed_hosts": [HOST_A], "serial": "nvmetd0001", "model": "nvmetd test",
             "namespaces": [
                 {"nsid": 1, "device_path": str(make_file(scratch / "ns1.img")),
                  "device_uuid": "0a0b0c0d-0000-4000-8000-000000000001"},
                 {"nsid": 2, "device_path": str(make_file(scratch / "ns2.img")), "ana_grpid": 2},
             ]},
            {"nqn": SUB_LOOPDEV, "allowed_hosts": [HOST_A, HOST_B],
             "namespaces": [{"nsid": 1, "device_path": loopdev}]},
        ],
        "ports": [
            {"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
             "subsystems": [SUB_FILE, SUB_LOOPDEV], "ana_groups": [{"grpid": 2, "state": "non-optimized"}]},
            {"id": 2, "trtype": "loop", "subsystems": [SUB_FILE, SUB_LOOPDEV]},
        ],
    })


def test_apply_connect_and_verify_io(cfs: ConfigFS, scratch: Path, loopdev: str) -> None:
    state = full_state(scratch, loopdev)
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
    assert result.writes > 0

    live = read_state(cfs)
    assert {s.nqn for s in live.subsystems} == {SUB_FILE, SUB_LOOPDEV}
    sub = live.subsystem(SUB_FILE)
    assert sub.allow_any_host is False and sub.allowed_hosts == [HOST_A] and sub.serial == "nvmetd0001"
    assert live.port(1).ana_state(2) == "non-optimized"

    hostside.connect("tcp", SUB_FILE, HOST_A, "127.0.0.1", "4420")
    hostside.connect("loop", SUB_LOOPDEV, HOST_B)
    try:
        tcp_dev = hostside.namespace_device(SUB_FILE, 1, "tcp")
        loop_dev = hostside.namespace_device(SUB_LOOPDEV, 1, "loop")
        hostside.write_read_verify(tcp_dev, seed=1)
        digest = hostside.write_read_verify(loop_dev, seed=2)
        # the bytes really landed on the backing loop device, not in some cache of the path
        assert hashlib.sha256(hostside.direct_read(loopdev, 4 << 20)).hexdigest() == digest
        uuid = Path(f"/sys/block/{tcp_dev.name}/uuid").read_text().strip()
        assert uuid == "0a0b0c0d-0000-4000-8000-000000000001"
    finally:
        hostside.disconnect(SUB_FILE)
        hostside.disconnect(SUB_LOOPDEV)


def test_reapply_is_zero_writes_and_drift_is_repaired(cfs: ConfigFS, scratch: Path, loopdev: str) -> None:
    state = full_state(scratch, loopdev)
    assert apply_state(state, cfs).converged
    again = apply_state(state, cfs)
    assert again.converged and again.writes == 0 and again.planned == []

    # someone edits configfs by hand: an extra host allowed, a namespace disabled, a stray subsystem
    root = Path(cfs.root)
    (root / f"subsystems/{SUB_FILE}/allowed_hosts/{HOST_B}").symlink_to(root / f"hosts/{HOST_B}")
    (root / f"subsystems/{SUB_LOOPDEV}/namespaces/1/enable").write_text("0")
    (root / "subsystems/nqn.2026-11.io.nvmetd:stray").mkdir()
    drift = diff(state, cfs)
    assert f"unlink subsystems/{SUB_FILE}/allowed_hosts/{HOST_B}" in drift
    assert f"set subsystems/{SUB_LOOPDEV}/namespaces/1/enable = '1'" in drift
    assert "rmdir subsystems/nqn.2026-11.io.nvmetd:stray" in drift
    assert len(drift) == 3

    repaired = apply_state(state, cfs)
    assert repaired.converged and repaired.writes == 3
    assert diff(state, cfs) == []


def test_remove_everything_leaves_an_empty_tree(cfs: ConfigFS, scratch: Path, loopdev: str) -> None:
    assert apply_state(full_state(scratch, loopdev), cfs).converged
    result = apply_state(TargetState(), cfs)
    assert result.converged, result.to_dict()
    root = Path(cfs.root)
    assert [list((root / d).iterdir()) for d in ("hosts", "subsystems", "ports")] == [[], [], []]


def test_host_outside_the_acl_is_refused(cfs: ConfigFS, scratch: Path) -> None:
    state = parse_state({
        "hosts": [{"nqn": HOST_A}],
        "subsystems": [{"nqn": SUB_FILE, "allowed_hosts": [HOST_A],
                        "namespaces": [{"nsid": 1, "device_path": str(make_file(scratch / "a.img"))}]}],
        "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
                   "subsystems": [SUB_FILE]}],
    })
    assert apply_state(state, cfs).converged
    refused = hostside.connect("tcp", SUB_FILE, HOST_B, "127.0.0.1", "4420", check=False)
    assert refused.returncode != 0
    assert hostside.controllers(SUB_FILE) == []
    hostside.connect("tcp", SUB_FILE, HOST_A, "127.0.0.1", "4420")
    try:
        assert len(hostside.controllers(SUB_FILE)) == 1
    finally:
        hostside.disconnect(SUB_FILE)


def test_namespace_device_change_disables_first(cfs: ConfigFS, scratch: Path) -> None:
    first, second = make_file(scratch / "first.img"), make_file(scratch / "second.img", 32 << 20)
    base = {"subsystems": [{"nqn": SUB_FILE, "allow_any_host": True,
                            "namespaces": [{"nsid": 1, "device_path": str(first)}]}]}
    assert apply_state(parse_state(base), cfs).converged
    base["subsystems"][0]["namespaces"][0]["device_path"] = str(second)
    changed = apply_state(parse_state(base), cfs)
    assert changed.converged, changed.to_dict()
    assert changed.planned == [f"set subsystems/{SUB_FILE}/namespaces/1/enable = '0'",
                               f"set subsystems/{SUB_FILE}/namespaces/1/device_path = '{second}'",
                               f"set subsystems/{SUB_FILE}/namespaces/1/enable = '1'"]


def test_port_address_change_relinks(cfs: ConfigFS, scratch: Path) -> None:
    state = {"subsystems": [{"nqn": SUB_FILE, "allow_any_host": True,
                             "namespaces": [{"nsid": 1, "device_path": str(make_file(scratch / "p.img"))}]}],
             "ports": [{"id": 7, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
                        "subsystems": [SUB_FILE]}]}
    assert apply_state(parse_state(state), cfs).converged
    state["ports"][0]["trsvcid"] = "4421"
    moved = apply_state(parse_state(state), cfs)
    assert moved.converged, moved.to_dict()
    assert moved.planned[0] == f"unlink ports/7/subsystems/{SUB_FILE}"
    assert moved.planned[-1] == f"link ports/7/subsystems/{SUB_FILE} -> subsystems/{SUB_FILE}"
    hostside.connect("tcp", SUB_FILE, HOST_A, "127.0.0.1", "4421")
    hostside.disconnect(SUB_FILE)


def test_one_failing_object_does_not_stop_the_others(cfs: ConfigFS, scratch: Path) -> None:
    good = make_file(scratch / "good.img")
    state = parse_state({"subsystems": [
        {"nqn": SUB_FILE, "allow_any_host": True, "namespaces": [
            {"nsid": 1, "device_path": str(scratch / "missing.img")},
            {"nsid": 2, "device_path": str(good)}]},
        {"nqn": SUB_LOOPDEV, "allow_any_host": True, "namespaces": [{"nsid": 1, "device_path": str(good)}]},
    ]})
    result = apply_state(state, cfs)
    assert not result.converged
    bad = result.objects[f"subsystems/{SUB_FILE}/namespaces/1"]
    assert bad.status == "pending" and "missing.img" in bad.reason
    assert result.objects[f"subsystems/{SUB_FILE}/namespaces/2"].status == "changed"
    assert result.objects[f"subsystems/{SUB_LOOPDEV}/namespaces/1"].status == "changed"
    assert (Path(cfs.root) / f"subsystems/{SUB_FILE}/namespaces/2/enable").read_text().strip() == "1"
