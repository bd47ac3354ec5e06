"""ZFS pool layouts (backends/zfs.py): what `pool create --layout` refuses before any zpool command runs, and how a
pool's health from `zpool status -j` reads as redundancy. The real mirror losing a drive is
tests/kernel/test_drives.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import zfs
from backends.errors import BackendError
from backends.zfs import ZfsBackend, redundancy


@pytest.mark.parametrize("devices, layout, why", [
    (["/dev/a"], "mirror", "two or more"),
    (["/dev/a", "/dev/b"], "raidz9", "not one of stripe, mirror"),
    ([], "mirror", "one or more"),
])
def test_layouts_refused_before_zfs_is_touched(devices: list[str], layout: str, why: str) -> None:
    with pytest.raises(BackendError, match=why):
        ZfsBackend.make_pool("p", devices, {"layout": layout})


def _health(state: str, members: dict[str, str], resilvering: bool = False) -> dict:
    return {"state": state, "members": members, "resilvering": resilvering}


def test_redundancy_of_a_mirror_follows_its_members() -> None:
    both = {"/dev/a": "ONLINE", "/dev/b": "ONLINE"}
    assert redundancy("mirror", _health("ONLINE", both)) == "clean"
    assert redundancy("mirror", _health("DEGRADED", {"/dev/a": "ONLINE", "/dev/b": "REMOVED"})) == "degraded"
    # a member not ONLINE is degraded even before ZFS changed the pool's own state
    assert redundancy("mirror", _health("ONLINE", {"/dev/a": "ONLINE", "/dev/b": "FAULTED"})) == "degraded"
    assert redundancy("mirror", _health("ONLINE", both, resilvering=True)) == "recovering"
    assert redundancy("mirror", _health("SUSPENDED", both)) == "unavailable"
    assert redundancy("stripe", _health("ONLINE", both)) == ""
    assert redundancy("stripe", _health("UNAVAIL", {"/dev/a": "REMOVED"})) == "unavailable"


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "zfs"


@pytest.mark.parametrize("fixture, state, drive2, resilvering", [
    ("status-degraded.json", "DEGRADED", "REMOVED", False),  # drive 2 pulled (seen in the rig, ZFS 2.3.2)
    ("status-resilvered.json", "ONLINE", "ONLINE", False),  # plugged back, online, resilver FINISHED
])
def test_pool_health_reads_zpool_status_json(monkeypatch: pytest.MonkeyPatch, fixture: str, state: str,
                                             drive2: str, resilvering: bool) -> None:
    monkeypatch.setattr(zfs, "load_module", lambda: None)
    monkeypatch.setattr(zfs, "out", lambda argv: (FIXTURES / fixture).read_text())
    health = zfs.pool_health("tz")
    by_id = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvmetd-drive{}-part1"
    assert health == {"state": state, "resilvering": resilvering,
                      "members": {by_id.format(1): "ONLINE", by_id.format(2): drive2}}
