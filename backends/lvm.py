"""Volumes as LVM thin LVs in one thin pool over a volume group of one or more devices (multi-drive pooling).

The thin pool zeroes newly provisioned chunks (`--zero y`), so a partial write into a fresh chunk never exposes what an
earlier, deleted volume left there; volumes are discarded before removal so their chunks go back to the pool at once.
Compression and dedup come from VDO: each such volume is a VDO LV in its own VDO pool LV beside the thin pool (LVM
2.03.16 cannot put a thin pool on VDO), which is why VDO volumes have no thin snapshots here.
Thick volumes are linear LVs, zeroed (`blkdiscard --zeroout`) before they are removed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from backends.base import Backend, Record
from backends.errors import BackendError, ToolError
from backends.run import out, run

THIN_POOL = "thinpool"
LVS_FIELDS = "lv_name,lv_size,data_percent,metadata_percent,lv_attr,segtype,pool_lv,origin"
DEFAULT_VDO_PHYSICAL = 6 << 30  # VDO's index and slabs need several GiB; keep the PVs sparse
VDO_CONFIG = "allocation/vdo_slab_size_mb=128 allocation/vdo_index_memory_size_mb=256"


def _lvm(devices: list[str], argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Every LVM command sees only the pool's own PVs (`--devices`): it scans less, and it can never pick up an LVM
    signature a tenant wrote inside a volume (a nested VG showing up on the host)."""
    return run([argv[0], "--devices", ",".join(devices), *argv[1:]], check=check)


def _report(argv: list[str], key: str) -> list[dict[str, str]]:
    doc = json.loads(out([*argv, "--reportformat", "json", "--units", "b", "--nosuffix"]))
    rows: list[dict[str, str]] = []
    for report in doc.get("report", []):
        rows.extend(report.get(key, []))
    return rows


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else 0.0
    except ValueError:
        return 0.0


class LvmBackend(Backend):
    kind = "lvm"
    compressions = ("off", "vdo")

    @classmethod
    def make_pool(cls, name: str, devices: list[str], options: dict[str, Any]) -> dict[str, Any]:
        if not devices:
            raise BackendError("an LVM pool needs one or more block devices")
        vg = options.get("vg") or f"nvmetd_{name}"
        percent = int(options.get("thin_pool_percent", 90))
        if not 1 <= percent <= 95:
            raise BackendError("thin_pool_percent must be 1-95 (the rest of the VG holds metadata and VDO pools)")
        _lvm(devices, ["pvcreate", "--yes", *devices])
        _lvm(devices, ["vgcreate", "--yes", "--physicalextentsize", "1m", vg, *devices])
        try:
            _lvm(devices, ["lvcreate", "--yes", "--type", "thin-pool", "--extents", f"{percent}%VG", "--zero", "y",
                           "--chunksize", "64k", "--name", THIN_POOL, vg])
        except BackendError:
            _lvm(devices, ["vgremove", "--yes", "--force", vg], check=False)
            raise
        return {"vg": vg, "devices": devices,
                "vdo_physical": int(options.get("vdo_physical", DEFAULT_VDO_PHYSICAL))}

    def _lvm(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return _lvm(self.config["devices"], argv, check)

    @property
    def vg(self) -> str:
        return self.config["vg"]

    def remove_pool(self) -> None:
        self._lvm(["vgremove", "--yes", "--force", self.vg])
        self._lvm(["pvremove", "--yes", *self.config["devices"]], check=False)

    def _lvs(self, lv: str | None = None) -> list[dict[str, str]]:
        target = f"{self.vg}/{lv}" if lv else self.vg
        try:
            return _report(["lvs", "--devices", ",".join(self.config["devices"]), "-o", LVS_FIELDS, target], "lv")
        except ToolError:
            if lv is None:
                raise
            return []

    def pool_usage(self) -> tuple[int, int, float]:
        # lvs asks dm-thin for its status without a commit, so blocks of a just-removed LV still count for up to a
        # second; a plain `dmsetup status` commits the pool metadata first
        run(["dmsetup", "status", "--target", "thin-pool"], check=False)
        rows = self._lvs(THIN_POOL)
        if not rows:
            raise BackendError(f"thin pool {self.vg}/{THIN_POOL} is missing: is the VG {self.vg} active?")
        size = int(_num(rows[0]["lv_size"]))
        data, meta = _num(rows[0]["data_percent"]), _num(rows[0]["metadata_percent"])
        return size, int(size * data / 100), max(data, meta)

    # --- naming: '+' cannot appear in a volume or snapshot name, so these never collide
    @staticmethod
    def _lv(name: str) -> str:
        return f"v.{name}"

    @staticmethod
    def _snap_lv(name: str, snap: str) -> str:
        return f"s.{name}+{snap}"

    @staticmethod
    def _vdo_pool(name: str) -> str:
        return f"p.{name}"

    def _dev(self, lv: str) -> str:
        return f"/dev/{self.vg}/{lv}"

    def _exists(self, lv: str) -> bool:
        return bool(self._lvs(lv))

    def _check_options(self, thin: bool, encrypted: bool, compression: str) -> None:
        super()._check_options(thin, encrypted, compression)
        if compression == "vdo" and encrypted:
            raise BackendError("LVM volumes cannot be both VDO-compressed and encrypted (ciphertext does not "
                               "compress); use a ZFS pool, which compresses before it encrypts")
        if compression == "vdo" and not thin:
            raise BackendError("VDO volumes are thin by nature; leave thin on")

    def _make(self, vol: Record, backing_bytes: int) -> None:
        lv = self._lv(vol["name"])
        if vol["compression"] == "vdo":
            self._lvm(["lvcreate", "--yes", "--type", "vdo", "--name", lv,
                       "--size", f"{self.config['vdo_physical']}b", "--virtualsize", f"{backing_bytes}b",
                       "--compression", "y", "--deduplication", "y", "--config", VDO_CONFIG,
                       f"{self.vg}/{self._vdo_pool(vol['name'])}"])
        elif vol["thin"]:
            self._lvm(["lvcreate", "--yes", "--type", "thin", "--virtualsize", f"{backing_bytes}b",
                       "--thinpool", THIN_POOL, "--name", lv, self.vg])
        else:
            self._lvm(["lvcreate", "--yes", "--type", "linear", "--size", f"{backing_bytes}b", "--name", lv,
                       self.vg])
            # a linear LV reuses extents another LV had: zero it now as well as at delete
            run(["blkdiscard", "--zeroout", self._dev(lv)])

    def _destroy(self, vol: Record) -> None:
        lv = self._lv(vol["name"])
        if vol["compression"] == "vdo":
            if self._exists(self._vdo_pool(vol["name"])):
                self._lvm(["lvremove", "--yes", f"{self.vg}/{self._vdo_pool(vol['name'])}"])
            return
        rows = self._lvs(lv)
        if not rows:
            return
        if rows[0]["lv_attr"][4:5] != "a":
            self._lvm(["lvchange", "--activate", "y", "--ignoreactivationskip", f"{self.vg}/{lv}"])
        if vol["thin"]:
            run(["blkdiscard", self._dev(lv)], check=False)  # unprovision now; the pool zeroes chunks on reuse
        else:
            run(["blkdiscard", "--zeroout", self._dev(lv)])
        self._lvm(["lvremove", "--yes", f"{self.vg}/{lv}"])

    def _resize(self, vol: Record, backing_bytes: int) -> None:
        lv = self._lv(vol["name"])
        rows = self._lvs(lv)
        if not rows:
            raise BackendError(f"LV {self.vg}/{lv} is missing")
        current = int(_num(rows[0]["lv_size"]))
        if current < backing_bytes:
            self._lvm(["lvextend", "--size", f"{backing_bytes}b", f"{self.vg}/{lv}"])
        elif current > backing_bytes:
            self._lvm(["lvreduce", "--yes", "--force", "--size", f"{backing_bytes}b", f"{self.vg}/{lv}"])

    def _snapshot(self, vol: Record, snap: str) -> None:
        if vol["compression"] == "vdo" or not vol["thin"]:
            raise BackendError(f"volume {vol['name']!r} is {'VDO' if vol['thin'] else 'thick'}: LVM snapshots "
                               "here are thin snapshots of thin volumes; use a thin volume or a ZFS pool")
        self._lvm(["lvcreate", "--yes", "--snapshot", "--setactivationskip", "y", "--name",
                   self._snap_lv(vol["name"], snap), f"{self.vg}/{self._lv(vol['name'])}"])

    def _destroy_snapshot(self, vol: Record, snap: str) -> None:
        lv = self._snap_lv(vol["name"], snap)
        if self._exists(lv):
            self._lvm(["lvremove", "--yes", f"{self.vg}/{lv}"])

    def _clone(self, origin: Record, snap: str, vol: Record) -> None:
        self._lvm(["lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--name", self._lv(vol["name"]),
                   f"{self.vg}/{self._snap_lv(origin['name'], snap)}"])
        self._activate(vol)

    def _activate(self, vol: Record) -> None:
        lv = self._lv(vol["name"])
        rows = self._lvs(lv)
        if not rows:
            raise BackendError(f"LV {self.vg}/{lv} is missing (was the VG {self.vg} imported?)")
        if rows[0]["lv_attr"][4:5] != "a":
            self._lvm(["lvchange", "--activate", "y", "--ignoreactivationskip", f"{self.vg}/{lv}"])
        run(["udevadm", "settle", "--timeout", "10"], check=False)
        if not Path(self._dev(lv)).exists():
            raise BackendError(f"{self._dev(lv)} did not appear (is udev running?)")

    def _vdo_usage(self, vol: Record) -> tuple[int, float]:
        """From VDO's own counters: LVM 2.03.16 cannot parse the 6.12 in-kernel dm-vdo status (its VDOSaving% is
        empty), so ask `vdostats`, which reads the device's stats message."""
        dm = f"{self.vg.replace('-', '--')}-{self._vdo_pool(vol['name']).replace('-', '--')}-vpool"
        proc = run(["vdostats", "--verbose", f"/dev/mapper/{dm}"], check=False)
        stats: dict[str, int] = {}
        for line in proc.stdout.splitlines():
            key, sep, value = line.partition(" : ")
            if sep and value.strip().isdigit():
                stats[key.strip()] = int(value)
        data, logical = stats.get("data blocks used", 0), stats.get("logical blocks used", 0)
        block = stats.get("block size", 4096)
        return data * block, (logical / data) if data else 1.0

    def _raw_device(self, vol: Record) -> str:
        return self._dev(self._lv(vol["name"]))

    def _usage(self, vol: Record) -> tuple[int, float]:
        rows = self._lvs(self._lv(vol["name"]))
        if not rows:
            return 0, 1.0
        size = _num(rows[0]["lv_size"])
        if vol["compression"] == "vdo":
            return self._vdo_usage(vol)
        if vol["thin"]:
            return int(size * _num(rows[0]["data_percent"]) / 100), 1.0
        return int(size), 1.0
