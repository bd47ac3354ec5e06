"""Volumes as ZFS zvols: thin (`-s`) or thick, lz4/zstd compression, aes-256-gcm native encryption, instant
snapshots and clones (SmartOS's provisioning trick).

Layout: `<zpool>/nvmetd/<tenant>/<volume>`. The tenant dataset carries the tenant's byte quota as a ZFS `quota`, so
ZFS itself stops a tenant's writes (thick reservations, snapshots and data) at the quota, on top of the ledger's check
of logical sizes. zvols are made with `volmode=dev`: the host never scans a guest's partition table.
A zvol that is an enabled nvmet namespace keeps the pool busy (`zpool export` hangs): remove namespaces first.

Layouts: `stripe` (the default: every device adds capacity, none is redundant) or `mirror` (one N-way mirror over
all devices: a pool that keeps serving when all but one drive are lost). A mirror reports its redundancy from ZFS
(`zpool status -j`): clean, recovering (resilvering), degraded or unavailable; `repair` puts members that are back
(a drive re-plugged under the same stable path) online, which starts their resilver.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from backends.base import Backend, Record
from backends.errors import BackendError
from backends.model import PoolStatus
from backends.run import out, run

ROOT_DATASET = "nvmetd"
VOLBLOCKSIZES = ("4K", "8K", "16K", "32K", "64K", "128K")
ZVOL_DEV = Path("/dev/zvol")
LAYOUTS = ("stripe", "mirror")
TXG_DEFER_SIZE = 2  # OpenZFS: txgs a freed block waits before it is allocatable (and trimmable) again
TRIM_EXTENT_MIN = Path("/sys/module/zfs/parameters/zfs_trim_extent_bytes_min")
log = logging.getLogger(__name__)


def _get(dataset: str, *props: str) -> dict[str, str]:
    rows = out(["zfs", "get", "-Hp", "-o", "property,value", ",".join(props), dataset]).splitlines()
    return dict(row.split("\t", 1) for row in rows if "\t" in row)


def _exists(dataset: str) -> bool:
    return run(["zfs", "list", "-H", "-o", "name", dataset], check=False).returncode == 0


def load_module() -> None:
    if not Path("/sys/module/zfs").exists():
        run(["modprobe", "zfs"])


class ZfsBackend(Backend):
    kind = "zfs"
    compressions = ("off", "lz4", "zstd")
    native_encryption = True

    @classmethod
    def make_pool(cls, name: str, devices: list[str], options: dict[str, Any]) -> dict[str, Any]:
        if not devices:
            raise BackendError("a ZFS pool needs one or more block devices or files")
        layout = options.get("layout") or "stripe"
        if layout not in LAYOUTS:
            raise BackendError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)} for a ZFS pool")
        if layout == "mirror" and len(devices) < 2:
            raise BackendError("a ZFS mirror needs two or more devices")
        load_module()
        zpool = options.get("zpool") or f"nvmetd-{name}"
        vdevs = ["mirror", *devices] if layout == "mirror" else devices
        # cachefile=none: nvmetd imports its pools itself at boot, by name, instead of relying on zpool.cache
        run(["zpool", "create", "-f", "-o", "ashift=12", "-o", "cachefile=none", "-O", "mountpoint=none",
             "-O", "canmount=off", zpool, *vdevs])
        run(["zfs", "create", "-o", "mountpoint=none", "-o", "canmount=off", f"{zpool}/{ROOT_DATASET}"])
        return {"zpool": zpool, "devices": devices, "layout": layout}

    @property
    def zpool(self) -> str:
        return self.config["zpool"]

    def _tenant_ds(self, tenant: str) -> str:
        return f"{self.zpool}/{ROOT_DATASET}/{tenant}"

    def _ds(self, vol: Record) -> str:
        return f"{self._tenant_ds(vol['tenant'])}/{vol['name']}"

    def remove_pool(self) -> None:
        run(["zpool", "destroy", "-f", self.zpool])

    def pool_usage(self) -> tuple[int, int, float]:
        load_module()
        row = out(["zpool", "list", "-Hp", "-o", "size,allocated", self.zpool]).split()
        size, used = int(row[0]), int(row[1])
        return size, used, 100.0 * used / size if size else 100.0

    def status(self) -> PoolStatus:
        st = super().status()
        st.layout = self.config.get("layout", "stripe")
        health = pool_health(self.zpool)
        st.members = health["members"]
        st.redundancy = redundancy(st.layout, health)
        return st

    def repair(self) -> list[str]:
        """Bring back members that are present again but not ONLINE (`zpool online`, then `zpool clear` of their
        error counts): ZFS resilvers what they missed. Returns the members it put online."""
        load_module()
        run(["udevadm", "settle", "--timeout", "10"], check=False)  # a re-plugged disk's partition links
        back = [path for path, state in pool_health(self.zpool)["members"].items()
                if state != "ONLINE" and Path(path).exists()]
        for path in back:
            run(["zpool", "online", self.zpool, path])
            run(["zpool", "clear", self.zpool, path], check=False)
        return back

    def _ensure_tenant(self, tenant: str) -> str:
        ds = self._tenant_ds(tenant)
        if not _exists(ds):
            quota = self.ledger.load()["tenants"].get(tenant, {}).get("max_bytes")
            run(["zfs", "create", "-o", "mountpoint=none", "-o", "canmount=off",
                 "-o", f"quota={quota if quota else 'none'}", ds])
        return ds

    def _apply_tenant_quota(self, tenant: str, max_bytes: int | None) -> None:
        ds = self._ensure_tenant(tenant)
        run(["zfs", "set", f"quota={max_bytes if max_bytes else 'none'}", ds])

    def _props(self, vol: Record) -> list[str]:
        props = ["-o", "volmode=dev", "-o", f"compression={vol['compression']}"]
        if vol["encrypted"]:
            props += ["-o", "encryption=aes-256-gcm", "-o", "keyformat=raw",
                      "-o", f"keylocation=file://{self.keys.zfs_key(vol['name'])}"]
        return props

    def _make(self, vol: Record, backing_bytes: int) -> None:
        self._ensure_tenant(vol["tenant"])
        argv = ["zfs", "create", "-V", str(backing_bytes), *self._props(vol)]
        block = str(vol["options"].get("volblocksize", "")).upper()
        if block:
            if block not in VOLBLOCKSIZES:
                raise BackendError(f"volblocksize {block} is not one of {', '.join(VOLBLOCKSIZES)}")
            argv += ["-o", f"volblocksize={block}"]
        if vol["thin"]:
            argv.append("-s")
        run([*argv, self._ds(vol)])
        self._wait_dev(vol)

    def _destroy(self, vol: Record) -> None:
        ds = self._ds(vol)
        if _exists(ds):
            run(["zfs", "destroy", "-r", ds])
            self._settle_frees()
            self._trim()

    def _settle_frees(self) -> None:
        """Destroyed blocks are freed in later txgs (async destroy): sync until `freeing` is 0, so the fill level
        the threshold check reads is current."""
        for _ in range(20):
            run(["zpool", "sync", self.zpool])
            freeing = out(["zpool", "get", "-Hp", "-o", "value", "freeing", self.zpool]).strip()
            if freeing in ("0", "-", ""):
                return

    def _trim(self) -> None:
        """ZFS frees a destroyed zvol's blocks without touching them: no later zvol can read them (unwritten blocks
        read as zeros), but the vdevs keep the old data. TRIM the freed space and wait, so that a device that
        discards (SSDs, thin LUNs, loop files) forgets it too; vdevs without discard keep it (ciphertext only, for
        an encrypted zvol). Stock OpenZFS (2.3.2 and its master in 2026-12) skips the first 4 MiB of every
        metaslab after the first here, while reporting "100% trimmed": kernel_patches/zfs/ has the fix."""
        _trim_every_extent()
        for _ in range(TXG_DEFER_SIZE + 1):  # freed blocks sit in the defer tree, untrimmable, for 2 txgs
            run(["zpool", "sync", self.zpool])
        proc = run(["zpool", "trim", "-w", self.zpool], check=False)
        if proc.returncode != 0 and "support trim" not in proc.stderr:
            raise BackendError(f"zpool trim {self.zpool} failed after deleting a zvol: {proc.stderr.strip()}")

    def _resize(self, vol: Record, backing_bytes: int) -> None:
        run(["zfs", "set", f"volsize={backing_bytes}", self._ds(vol)])

    def _snapshot(self, vol: Record, snap: str) -> None:
        run(["zfs", "snapshot", f"{self._ds(vol)}@{snap}"])

    def _destroy_snapshot(self, vol: Record, snap: str) -> None:
        if _exists(f"{self._ds(vol)}@{snap}"):
            run(["zfs", "destroy", f"{self._ds(vol)}@{snap}"])

    def _clone(self, origin: Record, snap: str, vol: Record) -> None:
        self._ensure_tenant(vol["tenant"])
        # a clone shares the origin's encryption root (and key): only volmode and compression are its own
        argv = ["zfs", "clone", "-o", "volmode=dev", "-o", f"compression={vol['compression']}"]
        if not vol["thin"]:
            argv += ["-o", "refreservation=auto"]
        run([*argv, f"{self._ds(origin)}@{snap}", self._ds(vol)])
        self._wait_dev(vol)

    def _activate(self, vol: Record) -> None:
        ds = self._ds(vol)
        if vol["encrypted"]:
            props = _get(ds, "keystatus", "encryptionroot")
            if props.get("keystatus") == "unavailable":
                run(["zfs", "load-key", props["encryptionroot"]])
        self._wait_dev(vol)

    def _wait_dev(self, vol: Record, timeout: float = 30.0) -> None:
        path = ZVOL_DEV / self._ds(vol)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise BackendError(f"{path} did not appear within {timeout:.0f} s (is udev running with ZFS's "
                                   "rules?)")
            run(["udevadm", "settle", "--timeout", "5"], check=False)
            time.sleep(0.1)

    def _raw_device(self, vol: Record) -> str:
        return str(ZVOL_DEV / self._ds(vol))

    def _usage(self, vol: Record) -> tuple[int, float]:
        ds = self._ds(vol)
        if not _exists(ds):
            return 0, 1.0
        props = _get(ds, "referenced", "compressratio")
        return int(props.get("referenced", 0)), float(props.get("compressratio", "1").rstrip("x") or 1)


def pool_health(zpool: str) -> dict[str, Any]:
    """The pool's state, whether a resilver runs, and each leaf device's state, from `zpool status -j`."""
    load_module()
    doc = json.loads(out(["zpool", "status", "-j", "-P", zpool]))
    pool = doc["pools"][zpool]
    members: dict[str, str] = {}

    def leaves(node: dict[str, Any]) -> None:
        children = node.get("vdevs") or {}
        if not children and node.get("vdev_type") not in ("root", "mirror"):
            members[node.get("path") or node.get("name", "?")] = node.get("state", "UNKNOWN")
        for child in children.values():
            leaves(child)

    for top in (pool.get("vdevs") or {}).values():
        leaves(top)
    scan = pool.get("scan_stats") or {}
    resilvering = (str(scan.get("function", "")).upper() == "RESILVER"
                   and str(scan.get("state", "")).upper() == "SCANNING")
    return {"state": pool.get("state", "UNKNOWN"), "resilvering": resilvering, "members": members}


def redundancy(layout: str, health: dict[str, Any]) -> str:
    """clean, recovering, degraded or unavailable: the words an rbd pool uses, so `pool show` reads the same."""
    if health["state"] in ("FAULTED", "UNAVAIL", "SUSPENDED"):
        return "unavailable"
    if health["resilvering"]:
        return "recovering"
    if health["state"] == "DEGRADED" or any(s != "ONLINE" for s in health["members"].values()):
        return "degraded"
    return "clean" if layout == "mirror" else ""


def _trim_every_extent() -> None:
    """OpenZFS's TRIM passes over free extents smaller than zfs_trim_extent_bytes_min (32 KiB by default): a
    destroyed zvol's blocks between metadata blocks stayed on the vdev (16 KiB of them in the rig, 2026-12-04).
    A host-wide module parameter, so lowered, never raised: extents are whole sectors, so 512 means all of them."""
    try:
        if int(TRIM_EXTENT_MIN.read_text()) > 512:
            TRIM_EXTENT_MIN.write_text("512")
            log.info("zfs_trim_extent_bytes_min lowered to 512: TRIM reaches every freed extent")
    except (OSError, ValueError) as exc:
        log.warning("cannot lower zfs_trim_extent_bytes_min (%s): TRIM skips freed extents below it", exc)
