"""Which /dev/rbdN maps an image is read from krbd's sysfs files, as `rbd device list` reads them: only the head of
that image in that pool's default namespace counts (a snapshot mapping or another namespace's image of the same name
is another device)."""

from __future__ import annotations

from pathlib import Path

from backends.rbd import mapped_device


def _dev(root: Path, n: int, pool: str, name: str, snap: str = "-", ns: str | None = "") -> None:
    d = root / str(n)
    d.mkdir(parents=True)
    for field, value in (("pool", pool), ("name", name), ("current_snap", snap)):
        (d / field).write_text(value + "\n")
    if ns is not None:
        (d / "pool_ns").write_text(ns + "\n")


def test_only_the_head_of_that_image_in_that_pool(tmp_path: Path) -> None:
    _dev(tmp_path, 0, "nvmetd-ceph", "vm1-root", snap="s1")
    _dev(tmp_path, 1, "other", "vm1-root")
    _dev(tmp_path, 2, "nvmetd-ceph", "vm1-root", ns="tenant")
    assert mapped_device("nvmetd-ceph", "vm1-root", tmp_path) is None
    _dev(tmp_path, 3, "nvmetd-ceph", "vm1-root")
    _dev(tmp_path, 4, "nvmetd-ceph", "vm1-root-2", ns=None)  # a kernel without pool_ns
    assert mapped_device("nvmetd-ceph", "vm1-root", tmp_path) == "/dev/rbd3"
    assert mapped_device("nvmetd-ceph", "vm1-root-2", tmp_path) == "/dev/rbd4"


def test_no_rbd_module_means_nothing_mapped(tmp_path: Path) -> None:
    assert mapped_device("p", "i", tmp_path / "absent") is None

