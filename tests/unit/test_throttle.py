"""nvmetd/throttle.py's choice of the device a disk's namespace opens (the kernel proof is in the rig:
tests/kernel/test_tls_limits.py)."""

from __future__ import annotations

from pathlib import Path

from nvmetd import throttle


def _sysfs(tmp_path: Path, loops: dict[str, str]) -> Path:
    for name, backing in loops.items():
        (tmp_path / name / "loop").mkdir(parents=True)
        (tmp_path / name / "loop" / "backing_file").write_text(backing + "\n")
    (tmp_path / "loop9").mkdir()  # an unbound loop device has no loop/ directory
    return tmp_path


def test_loop_devices_are_found_by_backing_file(tmp_path: Path) -> None:
    sys_block = _sysfs(tmp_path / "sys", {"loop0": "/pool/a.img", "loop3": "/pool/b.img"})
    assert throttle.loop_devices(sys_block) == {"/pool/a.img": "/dev/loop0", "/pool/b.img": "/dev/loop3"}


def test_a_file_disk_keeps_its_loop_device_after_its_limits_go(tmp_path: Path) -> None:
    """Removing the last limit must not move a live namespace: the loop device stays until detach."""
    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 4096)
    loops = {str(image.resolve()): "/dev/loop5"}
    assert throttle.served_device(str(image), limited=False, loops=loops) == "/dev/loop5"
    assert throttle.served_device(str(image), limited=True, loops=loops) == "/dev/loop5"


def test_a_file_disk_never_limited_is_served_from_its_file(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 4096)
    assert throttle.served_device(str(image), limited=False, loops={}) == str(image)


def test_a_block_device_is_its_own_tenant() -> None:
    """Whatever the limits, nothing is stacked on a block device (here any block device this host has)."""
    block = next((str(p) for p in Path("/dev").glob("*") if p.is_block_device()), None)
    assert block is not None, "this host has no block device at all"
    assert not throttle.is_file(block)
    assert throttle.served_device(block, limited=True, loops={}) == block
