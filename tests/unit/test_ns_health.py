"""The namespace health probe on the host: what it says for a readable file, a vanished path and a non-device, and
that only enabled namespaces are probed. Errors and stalls of real devices are proven in the rig
(tests/kernel/test_storage_faults.py)."""

from __future__ import annotations

from pathlib import Path

from nvmetd import ns_health
from nvmetd.cli import _health_text
from target.model import parse_state

SUB = "nqn.2026-11.io.nvmetd:health"


def test_probe_states(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8192))
    assert ns_health.probe(str(disk)) == ns_health.Health("ok")
    assert ns_health.probe(str(tmp_path / "gone.img")).state == "missing"
    assert ns_health.probe(str(tmp_path)).state == "missing"  # a directory is no backing device


def test_only_enabled_namespaces_are_probed_and_problems_are_named(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    live = parse_state({"subsystems": [{"nqn": SUB, "allow_any_host": True, "namespaces": [
        {"nsid": 1, "device_path": str(disk)},
        {"nsid": 2, "device_path": str(tmp_path / "gone.img")},
        {"nsid": 3, "device_path": str(tmp_path / "off.img"), "enable": False}]}]})
    rows = ns_health.namespaces(live)
    assert [(r["nsid"], r["state"]) for r in rows] == [(1, "ok"), (2, "missing")]
    text = _health_text(rows)
    assert "1 of 2 enabled namespaces answer" in text and f"{SUB} nsid 2: missing" in text


def test_a_path_that_names_another_device_is_replaced(tmp_path: Path) -> None:
    disk = tmp_path / "swap.img"
    disk.write_bytes(bytes(4096))
    live = parse_state({"subsystems": [{"nqn": SUB, "allow_any_host": True,
                                        "namespaces": [{"nsid": 7, "device_path": str(disk)}]}]})
    assert ns_health.namespaces(live)[0]["state"] == "ok"  # remembered
    disk.rename(tmp_path / "gone.img")
    assert ns_health.namespaces(live)[0]["state"] == "missing"
    (tmp_path / "new.img").write_bytes(bytes(4096))
    (tmp_path / "new.img").rename(disk)  # another file under the same path: nvmet still holds the old one
    assert ns_health.namespaces(live)[0]["state"] == "replaced"
