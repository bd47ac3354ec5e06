"""Volumes as LVM thin LVs in one thin pool over a volume group of one or more devices (multi-drive pooling).

The thin pool zeroes newly provisioned chunks (`--zero y`), so a partial write into a fresh chunk never exposes what an
earlier, deleted volume left there; volumes are discarded before removal so their chunks go back to the pool at once.
Compression and dedup come from VDO: each such volume is a VDO LV in its own VDO pool LV beside the thin pool (LVM
2.03.16 cannot put a thin pool on VDO), which is why VDO volumes have no thin snapshots here.
Thick volumes are linear LVs, zeroed (`blkdiscard --zeroout`) before they are removed.

Layouts: `stripe` (the default: the PVs' capacity adds up, none is redundant) or `mirror` (raid1 over two or more
PVs: the thin pool's data and metadata and every thick LV are raid1 LVs with one image per PV, so a VM's disk keeps
serving when all but one drive are lost). Its redundancy comes from dm-raid (`lvs` health and sync): clean,
recovering (a leg resyncing), degraded (a PV missing or a leg failed); `repair` brings back a PV that is present
again under its stable path (`vgextend --restoremissing`, then `lvchange --refresh`, which reloads the raid tables
with the returned leg and lets dm-raid resync what it missed).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from backends.base import Backend, Record
from backends.errors import BackendError, ToolError
from backends.model import PoolStatus
from backends.run import out, run

THIN_POOL = "thinpool"
LVS_FIELDS = "lv_name,lv_size,data_percent,metadata_percent,lv_attr,segtype,pool_lv,origin"
LAYOUTS = ("stripe", "mirror")
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
        layout = options.get("layout") or "stripe"
        if layout not in LAYOUTS:
            raise BackendError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)} for an LVM pool")
        if layout == "mirror" and len(devices) < 2:
            raise BackendError("an LVM mirror needs two or more devices")
        _lvm(devices, ["pvcreate", "--yes", *devices])
        _lvm(devices, ["vgcreate", "--yes", "--physicalextentsize", "1m", vg, *devices])
        try:
            if layout == "mirror":
                _mirrored_thin_pool(devices, vg, percent)
            else:
                _lvm(devices, ["lvcreate", "--yes", "--type", "thin-pool", "--extents", f"{percent}%VG",
                               "--zero", "y", "--chunksize", "64k", "--name", THIN_POOL, vg])
        except BackendError:
            _lvm(devices, ["vgremove", "--yes", "--force", vg], check=False)
            raise
        return {"vg": vg, "devices": devices, "layout": layout,
                "vdo_physical": int(options.get("vdo_physical", DEFAULT_VDO_PHYSICAL))}

    def _lvm(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return _lvm(self.config["devices"], argv, check)

    @property
    def mirrored(self) -> bool:
        return self.config.get("layout") == "mirror"

    def status(self) -> PoolStatus:
        st = super().status()
        st.layout = self.config.get("layout", "stripe")
        if self.mirrored:
            health = mirror_health(self.config["devices"], self.vg)
            st.members, st.redundancy = health["members"], health["redundancy"]
        return st

    def repair(self) -> list[str]:
        """Bring back PVs that are present again (same stable path): LVM forgets they were missing, and the raid
        LVs' tables are reloaded (`lvchange --refresh`: the thin pool with its data and metadata, each thick LV),
        so dm-raid takes the returned leg back and resyncs it. Returns the PVs brought back."""
        if not self.mirrored:
            raise BackendError(f"pool {self.name!r} is an LVM stripe: it has no redundant members to repair")
        run(["udevadm", "settle", "--timeout", "10"], check=False)
        back = [dev for dev, state in mirror_health(self.config["devices"], self.vg)["members"].items()
                if state != "ONLINE" and Path(dev).exists()]
        for dev in back:
            self._lvm(["vgextend", "--restoremissing", self.vg, dev], check=False)  # only if LVM marked it missing
        if back:
            rows = _report(["lvs", "--devices", ",".join(self.config["devices"]), "-o", "lv_name,segtype",
                            self.vg], "lv")
            for row in rows:
                if row["segtype"] in ("raid1", "thin-pool"):
                    self._lvm(["lvchange", "--refresh", f"{self.vg}/{row['lv_name']}"])
        return back

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
            kind = ["--type", "raid1", "--mirrors", str(len(self.config["devices"]) - 1), "--nosync"] \
                if self.mirrored else ["--type", "linear"]  # nosync: zeroed below, every leg alike
            self._lvm(["lvcreate", "--yes", *kind, "--size", f"{backing_bytes}b", "--name", lv, self.vg])
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


def _mirrored_thin_pool(devices: list[str], vg: str, percent: int) -> None:
    """A thin pool whose data and metadata are raid1 LVs (one image per PV): `percent` of the VG is what the
    copies take together, and the metadata gets 1/64 of the data (at least 8 MiB)."""
    mirrors = str(len(devices) - 1)
    size = int(_report(["vgs", "--devices", ",".join(devices), "-o", "vg_size", vg], "vg")[0]["vg_size"])
    data = size * percent // 100 // len(devices) >> 20 << 20
    meta = max(8 << 20, data // 64 >> 20 << 20)
    for name, bytes_ in ((THIN_POOL, data - meta), (f"{THIN_POOL}_meta", meta)):
        _lvm(devices, ["lvcreate", "--yes", "--type", "raid1", "--mirrors", mirrors, "--nosync",
                       "--size", f"{bytes_}b", "--name", name, vg])
    _lvm(devices, ["lvconvert", "--yes", "--type", "thin-pool", "--poolmetadata", f"{vg}/{THIN_POOL}_meta",
                   "--zero", "y", "--chunksize", "64k", f"{vg}/{THIN_POOL}"])


def _leg_health(devices: list[str], vg: str) -> dict[str, str]:
    """dm-raid's view of each PV (by its real path): the worst health character of its legs over all raid LVs
    (`A` alive and in sync, `a` alive and resyncing, `D` dead: a failed leg, even once the drive is back)."""
    rows = {r["lv_name"].strip("[]"): r for r in _report(
        ["lvs", "--all", "--devices", ",".join(devices), "-o", "lv_name,segtype,devices,lv_dm_path", vg], "lv")}
    worst: dict[str, str] = {}
    for row in rows.values():
        if row["segtype"] != "raid1" or not row.get("lv_dm_path"):
            continue
        status = run(["dmsetup", "status", Path(row["lv_dm_path"]).name], check=False).stdout.split()
        health = status[5] if len(status) > 5 and status[2] == "raid" else ""
        images = [d.split("(")[0].strip("[]") for d in row["devices"].split(",") if d]
        for image, char in zip(images, health, strict=False):
            pv = rows.get(image, {}).get("devices", "").split("(")[0]
            if pv.startswith("/"):
                real = os.path.realpath(pv)
                worst[real] = max(worst.get(real, "A"), char, key="AaD".find)
    return worst


def mirror_health(devices: list[str], vg: str) -> dict[str, Any]:
    """Each PV's state and the pool's redundancy: MISSING (gone, or LVM has it missing), FAULTED (present, but
    dm-raid failed its leg: `repair` takes it back), RESYNCING, ONLINE; the pool is `degraded` while a PV is
    missing or faulted, `recovering` while a leg resyncs, `clean` when every leg is alive and in sync."""
    pvs = _report(["pvs", "--devices", ",".join(devices), "-o", "pv_name,pv_missing,vg_name"], "pv")
    present = {os.path.realpath(r["pv_name"]) for r in pvs
               if r.get("vg_name") == vg and r["pv_name"].startswith("/") and not r.get("pv_missing")}
    legs = _leg_health(devices, vg)
    members: dict[str, str] = {}
    for dev in devices:
        real = os.path.realpath(dev)
        if not Path(dev).exists() or real not in present:
            members[dev] = "MISSING"
        else:
            members[dev] = {"D": "FAULTED", "a": "RESYNCING"}.get(legs.get(real, "A"), "ONLINE")
    states = set(members.values())
    if states & {"MISSING", "FAULTED"}:
        return {"members": members, "redundancy": "degraded"}
    return {"members": members, "redundancy": "recovering" if "RESYNCING" in states else "clean"}
