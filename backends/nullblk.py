"""Volumes as memory-backed null_blk devices (configfs `nullb`): no storage stack behind them, for measuring the
path above (nvmet, transports, the guest) without a disk's cost in the numbers.

Data lives in host RAM, so the pool's capacity is a RAM budget counted in logical bytes. There is no copy-on-write:
snapshots and clones are full copies into new null_blk devices (zero chunks skipped). null_blk names its disk after
the configfs directory (at most 31 characters), so each volume gets a short generated one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from backends import names
from backends.base import Backend, Record
from backends.errors import BackendError
from backends.run import run

NULLB = Path("/sys/kernel/config/nullb")
DEFAULT_CAPACITY = 1 << 30
COPY_CHUNK = 1 << 20


def load_module() -> None:
    if not NULLB.is_dir():
        # nr_devices=0: no unmanaged nullb0 appears beside the ones nvmetd makes
        run(["modprobe", "null_blk", "nr_devices=0"])
    if not NULLB.is_dir():
        raise BackendError(f"{NULLB} is missing: this kernel has no null_blk configfs (CONFIG_BLK_DEV_NULL_BLK)")


class NullBlkBackend(Backend):
    kind = "nullblk"
    supports_encryption = False
    supports_thick = False

    @classmethod
    def make_pool(cls, name: str, devices: list[str], options: dict[str, Any]) -> dict[str, Any]:
        if devices:
            raise BackendError("a null_blk pool takes no devices: its volumes live in RAM")
        load_module()
        return {"capacity": int(options.get("capacity") or DEFAULT_CAPACITY),
                "blocksize": int(options.get("blocksize", 4096))}

    def remove_pool(self) -> None:
        """Nothing outlives the volumes."""

    def pool_usage(self) -> tuple[int, int, float]:
        doc = self.ledger.load()
        used = sum(v["size"] * (1 + len(v["snapshots"])) for v in doc["volumes"].values())
        size = self.config["capacity"]
        return size, used, 100.0 * used / size

    @staticmethod
    def _item(key: str) -> Path:
        return NULLB / key

    def _device(self, key: str) -> str:
        named = Path("/dev", key)
        if named.exists():
            return str(named)
        try:
            index = (self._item(key) / "index").read_text().strip()
        except FileNotFoundError:
            raise BackendError(f"null_blk device {key} is gone (was the host rebooted? its data was in RAM)") from None
        return f"/dev/nullb{index}"

    def _new_device(self, key: str, size: int) -> None:
        load_module()
        item = self._item(key)
        item.mkdir()
        (item / "size").write_text(str(size // names.MIB))
        (item / "blocksize").write_text(str(self.config["blocksize"]))
        (item / "memory_backed").write_text("1")
        (item / "discard").write_text("1")
        (item / "power").write_text("1")
        run(["udevadm", "settle", "--timeout", "10"], check=False)
        if not Path(self._device(key)).exists():
            raise BackendError(f"null_blk device for {key} did not appear")

    def _remove_device(self, key: str) -> None:
        item = self._item(key)
        if item.is_dir():
            (item / "power").write_text("0")
            item.rmdir()

    def _key(self, *parts: str) -> str:
        """A short disk name derived from the names, so recovery finds the device of an unfinished create."""
        return "nvmetd" + uuid.uuid5(uuid.NAMESPACE_OID, "+".join((self.name, *parts))).hex[:16]

    def _make(self, vol: Record, backing_bytes: int) -> None:
        self._new_device(self._key(vol["name"]), backing_bytes)

    def _destroy(self, vol: Record) -> None:
        self._remove_device(self._key(vol["name"]))

    def _resize(self, vol: Record, backing_bytes: int) -> None:
        """null_blk takes a new size only while powered off, which would pull the disk from under a namespace."""
        if vol["attached"]:
            raise BackendError(f"null_blk volume {vol['name']!r} can only be resized while detached")
        item = self._item(self._key(vol["name"]))
        if int((item / "size").read_text()) * names.MIB == backing_bytes:
            return
        (item / "power").write_text("0")
        (item / "size").write_text(str(backing_bytes // names.MIB))
        (item / "power").write_text("1")
        run(["udevadm", "settle", "--timeout", "10"], check=False)

    def _snapshot(self, vol: Record, snap: str) -> None:
        key = self._key(vol["name"], snap)
        self._new_device(key, vol["size"])
        _copy(self._raw_device(vol), self._device(key), vol["size"])

    def _destroy_snapshot(self, vol: Record, snap: str) -> None:
        self._remove_device(self._key(vol["name"], snap))

    def _clone(self, origin: Record, snap: str, vol: Record) -> None:
        self._make(vol, vol["size"])
        _copy(self._device(self._key(origin["name"], snap)), self._raw_device(vol), vol["size"])

    def _raw_device(self, vol: Record) -> str:
        return self._device(self._key(vol["name"]))

    def _usage(self, vol: Record) -> tuple[int, float]:
        return vol["size"], 1.0  # null_blk does not report its page count: the logical size bounds it


def _copy(src: str, dst: str, size: int) -> None:
    """Copy a device, skipping all-zero chunks (the destination is fresh and reads zeros there already)."""
    zero = bytes(COPY_CHUNK)
    fin, fout = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        for offset in range(0, size, COPY_CHUNK):
            chunk = os.pread(fin, COPY_CHUNK, offset)
            if chunk != zero[: len(chunk)]:
                os.pwrite(fout, chunk, offset)
        os.fsync(fout)
    finally:
        os.close(fin)
        os.close(fout)
