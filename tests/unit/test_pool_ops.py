"""What `nvmetctl pool create` refuses before a backend sees it (pure checks on the host)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmetd.errors import UserError
from nvmetd.pool_ops import _check_devices


def test_a_file_pool_takes_an_existing_empty_directory_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _check_devices("file", [str(empty)])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    for devices, why in [([str(tmp_path / "busy")], "not empty"), ([str(tmp_path / "missing")], "not a directory"),
                         (["relative"], "absolute"), ([str(empty), str(empty)], "exactly one"),
                         ([f"{empty}/../empty"], "absolute path without '..'")]:
        with pytest.raises(UserError, match=why):
            _check_devices("file", devices)


def test_lvm_and_zfs_take_block_devices_and_nullblk_none(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    for kind in ("lvm", "zfs"):
        with pytest.raises(UserError, match="not a block device"):
            _check_devices(kind, [str(tmp_path / "f")])
        with pytest.raises(UserError, match="block devices"):
            _check_devices(kind, [])
    _check_devices("nullblk", [])
    with pytest.raises(UserError, match="takes no devices"):
        _check_devices("nullblk", ["/dev/null"])
