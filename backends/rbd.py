"""Distributed disks: volumes as thin RBD images in a replicated Ceph pool, mapped with the kernel RBD client (krbd)
so nvmet exports a plain block device (`/dev/rbdN`), as for a zvol or an LV.

Pool = a Ceph pool nvmetd creates (`ceph_pool`, default `nvmetd-<name>`) plus how to reach the cluster (`conf`,
`keyring` 0600, `user`). Replication defaults to **size 3, min_size 1**: three copies on three failure domains
(`failure_domain`: `host` in production, `osd` for a one-host test cluster), and I/O goes on while only one copy is
up, so guests are not interrupted with two copies offline. What min_size 1 trades: while one copy is the only one,
every acknowledged write exists once; losing that last OSD before recovery has re-copied it loses those writes
(min_size 2 would block I/O at the second failure instead). Recovery starts as soon as the OSDs return.

Images have layering (instant clones of protected snapshots), exclusive-lock, object-map, fast-diff and deep-flatten,
all understood by krbd in 6.12. Attach maps the image; the exclusive-lock feature lets one client write at a time,
and attach refuses an image another client (another host's nvmetd) has mapped: moving a VM's disk is detach there,
attach here. The map uses automatic lock transitions, not `--exclusive`: librbd's own resize and snapshot need the
lock for a moment, and a krbd holding it exclusively would refuse them, making live grow and snapshots impossible.

Encryption: the shared LUKS2 layer (dm-crypt) on the mapped device, not RBD's own LUKS format, because that format is
implemented only in librbd (rbd-nbd, QEMU's rbd driver): krbd cannot open it, so nvmet could not export it.
Compression: BlueStore compresses the whole Ceph pool (`compression`: lz4, snappy, zlib, zstd; mode aggressive); a
volume's compression is the pool's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from backends import names
from backends.base import Backend, Record
from backends.ceph import CONNECT_TIMEOUT, Client, redundancy
from backends.errors import BackendError, ToolError
from backends.model import PoolStatus, VolumeInfo
from backends.run import run

FEATURES = ("LAYERING", "EXCLUSIVE_LOCK", "OBJECT_MAP", "FAST_DIFF", "DEEP_FLATTEN")  # librbd's RBD_FEATURE_*
COMPRESSIONS = ("off", "lz4", "snappy", "zlib", "zstd")
FAILURE_DOMAINS = ("osd", "host", "chassis", "rack", "row", "pdu", "pod", "room", "datacenter", "zone", "region")
_T = TypeVar("_T")
SYS_RBD = Path("/sys/bus/rbd/devices")
DEFAULT_SIZE, DEFAULT_MIN_SIZE = 3, 1


def _pos_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BackendError(f"{what} must be a whole number from {low} to {high}, not {value!r}")
    return value


def _features(rbd: Any) -> int:
    bits = 0
    for name in FEATURES:
        bits |= getattr(rbd, f"RBD_FEATURE_{name}")
    return bits


def _check_pool(client: Client, ceph_pool: str, settings: dict[str, str]) -> None:
    """Read the new pool back: a monitor accepts a setting it then adjusts (pg counts, a size past the OSDs)."""
    found = [p for p in client.command("osd pool ls", detail="detail") if p.get("pool_name") == ceph_pool]
    if not found:
        raise BackendError(f"ceph pool {ceph_pool!r} was not created (see the monitor's log)")
    pool = found[0]
    have = {k: str(pool.get(k, pool.get("options", {}).get(k, ""))) for k in settings}
    wrong = {k: (v, have[k]) for k, v in settings.items() if have[k] != v}
    if "rbd" not in pool.get("application_metadata", {}):
        wrong["application"] = ("rbd", ",".join(pool.get("application_metadata", {})) or "none")
    if wrong:
        raise BackendError(f"ceph pool {ceph_pool!r} did not take its settings: "
                           + ", ".join(f"{k} is {h!r}, not {w!r}" for k, (w, h) in wrong.items()))


def mapped_device(pool: str, image: str, sysfs: Path = SYS_RBD) -> str | None:
    """The /dev/rbdN mapping the head (no snapshot, default namespace) of `pool/image`, if krbd maps it."""
    for dev in sorted(sysfs.glob("[0-9]*")) if sysfs.exists() else []:
        try:
            fields = {f: (dev / f).read_text().strip() for f in ("pool", "name", "current_snap")}
            ns = (dev / "pool_ns").read_text().strip() if (dev / "pool_ns").exists() else ""
        except OSError:  # unmapped meanwhile
            continue
        if (fields["pool"], fields["name"], fields["current_snap"], ns) == (pool, image, "-", ""):
            return f"/dev/rbd{dev.name}"
    return None


def _remove(client: Client, ceph_pool: str) -> None:
    client.command("osd pool rm", pool=ceph_pool, pool2=ceph_pool, yes_i_really_really_mean_it=True)


class RbdBackend(Backend):
    kind = "rbd"
    compressions = COMPRESSIONS
    supports_thick = False  # RBD images are always thin
    _facts: dict[str, Any] | None = None  # pool-wide answers kept for the length of one list()

    # ------------------------------------------------------------------ the pool
    @classmethod
    def make_pool(cls, name: str, devices: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """Check the cluster is reachable with our key, then create the Ceph pool and its CRUSH rule.

        A failure after the Ceph pool exists removes it again: nothing half-made survives on either side."""
        if devices:
            raise BackendError("an rbd pool takes no devices: its OSDs are the Ceph cluster's (give conf, keyring)")
        unknown = set(options) - {"conf", "keyring", "user", "ceph_pool", "size", "min_size", "failure_domain",
                                  "compression", "pg_num", "connect_timeout"}
        if unknown:
            raise BackendError(f"rbd pool options {sorted(unknown)} are unknown")
        if not options.get("conf") or not options.get("keyring"):
            raise BackendError("an rbd pool needs conf (the cluster's ceph.conf) and keyring (0600)")
        timeout = _pos_int(options.get("connect_timeout", CONNECT_TIMEOUT), "connect_timeout (seconds)", 1, 3600)
        client = Client(str(options["conf"]), str(options["keyring"]), str(options.get("user", "admin")), timeout)
        ceph_pool = names.name(str(options.get("ceph_pool") or f"nvmetd-{name}"), "ceph pool name")
        size = _pos_int(options.get("size", DEFAULT_SIZE), "size (copies)", 1, 10)
        min_size = _pos_int(options.get("min_size", DEFAULT_MIN_SIZE), "min_size", 1, size)
        pg_num = _pos_int(options.get("pg_num", 32), "pg_num", 1, 32768)
        domain = str(options.get("failure_domain", "host"))
        if domain not in FAILURE_DOMAINS:
            raise BackendError(f"failure_domain {domain!r} is not one of {', '.join(FAILURE_DOMAINS)}")
        compression = str(options.get("compression", "off"))
        if compression not in COMPRESSIONS:
            raise BackendError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if ceph_pool in client.check():
            raise BackendError(f"ceph pool {ceph_pool!r} exists already: nvmetd creates its pools itself "
                               "(choose another ceph_pool)")
        rule = f"nvmetd-{domain}"
        settings = {"size": str(size), "min_size": str(min_size), "pg_autoscale_mode": "off"}
        if compression != "off":
            settings |= {"compression_mode": "aggressive", "compression_algorithm": compression}
        client.command("osd crush rule create-replicated", name=rule, root="default", type=domain)
        try:
            client.command("osd pool create", pool=ceph_pool, pg_num=pg_num, pgp_num=pg_num,
                           pool_type="replicated", rule=rule)
            for var, val in settings.items():
                client.command("osd pool set", pool=ceph_pool, var=var, val=val)
            client.command("osd pool application enable", pool=ceph_pool, app="rbd")
            _check_pool(client, ceph_pool, settings)
        except BackendError:
            if ceph_pool in client.command("osd pool ls"):
                _remove(client, ceph_pool)
            raise
        return {"conf": client.conf, "keyring": client.keyring, "user": client.user, "connect_timeout": timeout,
                "ceph_pool": ceph_pool,
                "size": size, "min_size": min_size, "failure_domain": domain, "compression": compression}

    @property
    def client(self) -> Client:
        return Client(self.config["conf"], self.config["keyring"], self.config["user"],
                      int(self.config.get("connect_timeout", CONNECT_TIMEOUT)))

    @property
    def ceph_pool(self) -> str:
        return self.config["ceph_pool"]

    def remove_pool(self) -> None:
        _remove(self.client, self.ceph_pool)

    def list(self, names: list[str] | None = None) -> list[VolumeInfo]:
        """The pool-wide facts each disk's info reads (df, the placement groups' acting sets) asked once per
        listing, not once per disk: two cluster commands for the pool instead of two per disk."""
        self._facts = {}
        try:
            return super().list(names)
        finally:
            self._facts = None

    def _once(self, key: str, ask: Callable[[], _T]) -> _T:
        if self._facts is None:
            return ask()
        if key not in self._facts:
            self._facts[key] = ask()
        return self._facts[key]

    def _df(self) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            for pool in self.client.command("df", detail="detail")["pools"]:
                if pool["name"] == self.ceph_pool:
                    return pool["stats"]
            raise BackendError(f"ceph pool {self.ceph_pool!r} is gone from the cluster")
        return self._once("df", ask)

    def pool_usage(self) -> tuple[int, int, float]:
        stats = self._df()
        stored, avail = int(stats["stored"]), int(stats["max_avail"])
        return stored + avail, stored, 100.0 * float(stats["percent_used"])

    def _pgs(self) -> list[dict[str, Any]]:
        def ask() -> list[dict[str, Any]]:
            doc = self.client.command("pg ls-by-pool", poolstr=self.ceph_pool)
            return doc.get("pg_stats", []) if isinstance(doc, dict) else doc
        return self._once("pgs", ask)

    def copies(self) -> int:
        """Copies that exist right now of the least-replicated object: the smallest acting set over the pool's
        placement groups (a disk's objects are spread over all of them)."""
        pgs = self._pgs()
        return min((len(pg["acting"]) for pg in pgs), default=0)

    def status(self) -> PoolStatus:
        st = super().status()
        st.redundancy = redundancy([pg["state"] for pg in self._pgs()])
        return st

    def _info(self, vol: Record) -> VolumeInfo:
        info = super()._info(vol)
        info.copies, info.copies_wanted = self.copies(), int(self.config["size"])
        return info

    def _check_options(self, thin: bool, encrypted: bool, compression: str) -> None:
        super()._check_options(thin, encrypted, compression)
        if compression != self.config["compression"]:
            raise BackendError(f"rbd pool {self.name!r} compresses with {self.config['compression']!r} (BlueStore "
                               f"compresses the whole Ceph pool); a volume on it cannot have {compression!r}")

    # ------------------------------------------------------------------ images (librbd)
    def _image(self, vol: Record | str) -> str:
        return f"{self.ceph_pool}/{vol if isinstance(vol, str) else vol['name']}"

    def _rbd(self, what: str, call: Callable[[Any, Any], _T]) -> _T:
        return self.client.images(what, self.ceph_pool, call)

    def _on_image(self, vol: Record, what: str, call: Callable[[Any], _T], read_only: bool = False) -> _T:
        """`call(image)` on the volume's image, opened for the call and closed after it."""
        def opened(rbd: Any, ctx: Any) -> _T:
            with rbd.Image(ctx, vol["name"], read_only=read_only) as image:
                return call(image)
        return self._rbd(f"{what} {self._image(vol)}", opened)

    def _exists(self, vol: Record) -> bool:
        """Opening the one image (read-only: no lock, a mapped image opens too) rather than listing the pool, whose
        directory grows with every disk and was read at each create, delete and snapshot."""
        def probe(rbd: Any, ctx: Any) -> bool:
            try:
                rbd.Image(ctx, vol["name"], read_only=True).close()
            except rbd.ImageNotFound:
                return False
            return True
        return self._rbd(f"look up {self._image(vol)}", probe)

    def _make(self, vol: Record, backing_bytes: int) -> None:
        if not self._exists(vol):
            self._rbd(f"create {self._image(vol)}", lambda rbd, ctx: rbd.RBD().create(
                ctx, vol["name"], backing_bytes, old_format=False, features=_features(rbd)))

    def _destroy(self, vol: Record) -> None:
        self._unmap(vol)
        if self._exists(vol):
            self._rbd(f"rm {self._image(vol)}", lambda rbd, ctx: rbd.RBD().remove(ctx, vol["name"]))

    def _resize(self, vol: Record, backing_bytes: int) -> None:
        self._on_image(vol, "resize", lambda image: image.resize(backing_bytes, allow_shrink=True))
        dev = self._mapped(vol)
        if dev:
            self._wait_size(dev, backing_bytes)

    def _wait_size(self, dev: str, want: int, timeout: float = 60.0) -> None:
        """krbd learns of the new size from the image header's watch notification, a moment later: wait for it,
        so the nvmet namespace revalidated next reads the new size."""
        sysfs = Path("/sys/block") / Path(dev).name / "size"
        deadline = time.monotonic() + timeout
        while int(sysfs.read_text()) * 512 != want:
            if time.monotonic() > deadline:
                raise BackendError(f"{dev} still has {int(sysfs.read_text()) * 512} bytes, not {want}, "
                                   f"{timeout:.0f} s after the resize")
            time.sleep(0.2)

    def _snapshot(self, vol: Record, snap: str) -> None:
        def make(image: Any) -> None:
            image.create_snap(snap)
            image.protect_snap(snap)  # a layered clone may be made from it (clone format 1, which every krbd maps)
        self._on_image(vol, f"snapshot @{snap}", make)

    def _snaps(self, vol: Record) -> list[str]:
        if not self._exists(vol):
            return []
        return self._on_image(vol, "snapshots", lambda image: [s["name"] for s in image.list_snaps()], read_only=True)

    def _destroy_snapshot(self, vol: Record, snap: str) -> None:
        def remove(image: Any) -> None:
            if snap not in [s["name"] for s in image.list_snaps()]:
                return
            if image.is_protected_snap(snap):
                image.unprotect_snap(snap)
            image.remove_snap(snap)
        if self._exists(vol):
            self._on_image(vol, f"remove @{snap}", remove)

    def _clone(self, origin: Record, snap: str, vol: Record) -> None:
        if not self._exists(vol):
            self._rbd(f"clone {self._image(origin)}@{snap}", lambda rbd, ctx: rbd.RBD().clone(
                ctx, origin["name"], snap, ctx, vol["name"], features=_features(rbd)))

    # ------------------------------------------------------------------ mapping (krbd)
    def _mapped(self, vol: Record) -> str | None:
        """krbd's own record of what it maps (`rbd device list` reads the same files): no CLI start-up, which
        costs seconds on a loaded or emulated host and ran several times per attach."""
        return mapped_device(self.ceph_pool, vol["name"])

    def _activate(self, vol: Record) -> None:
        if self._mapped(vol):
            return
        ours = self.client.instance_id()  # our own open of the header, to ask, is a watcher too
        listed = self._on_image(vol, "watchers", lambda image: list(image.watchers_list()), read_only=True)
        watchers = [w for w in listed if int(w.get("id", -1)) != ours]
        if watchers:
            who = ", ".join(f"client.{w.get('id')} at {w.get('addr')}" for w in watchers)
            raise BackendError(f"rbd image {self._image(vol)} is open elsewhere ({who}): another host has it "
                               "attached; detach it there first (the exclusive lock is handed over on attach)")
        if not Path("/sys/bus/rbd").exists():
            run(["modprobe", "rbd"])
        self.client.rbd("device", "map", self._image(vol))
        run(["udevadm", "settle", "--timeout", "10"], check=False)

    def _raw_device(self, vol: Record) -> str:
        dev = self._mapped(vol)
        if dev is None:
            self._activate(vol)  # LUKS format/erase at create/delete need the device for a moment
            dev = self._mapped(vol)
        if dev is None:
            raise BackendError(f"rbd image {self._image(vol)} mapped but no /dev/rbd device appeared")
        return dev

    def _unmap(self, vol: Record) -> None:
        dev = self._mapped(vol)
        if dev:
            self.client.rbd("device", "unmap", dev)

    def create(self, name: str, size: int | str, tenant: str = "default", thin: bool = True,
               encrypted: bool = False, compression: str | None = None, **options: Any) -> VolumeInfo:
        """`compression` "off" (the API's default) means the pool's: BlueStore compresses the whole pool."""
        if compression in (None, "off"):
            compression = self.config["compression"]
        info = super().create(name, size, tenant, thin, encrypted, compression, **options)
        self._release_unattached(name)
        return info

    def clone(self, name: str, snap: str, new_name: str, tenant: str | None = None) -> VolumeInfo:
        info = super().clone(name, snap, new_name, tenant)
        self._release_unattached(new_name)
        return info

    def _release_unattached(self, name: str) -> None:
        vol = self.ledger.load()["volumes"].get(name)
        if vol and not vol["attached"]:
            self._unmap(vol)

    def detach(self, name: str) -> None:
        super().detach(name)
        with self.ledger.locked():
            vol = self._get(self.ledger.load(), name)
        try:
            self._unmap(vol)
        except ToolError as exc:
            raise BackendError(f"{self._image(vol)} is still in use (an nvmet namespace?): {exc}") from None

    def _usage(self, vol: Record) -> tuple[int, float]:
        """Bytes the image has written (what `rbd du` reports: whole objects from the object map, fast-diff)."""
        def used(image: Any) -> int:
            extents: list[int] = []
            image.diff_iterate(0, image.size(), None, lambda _off, length, exists: extents.append(length * exists),
                               include_parent=False, whole_object=True)
            return sum(extents)
        try:
            written = self._on_image(vol, "du", used, read_only=True)
        except ToolError:
            return 0, 1.0
        stats = self._df()
        packed, raw = int(stats.get("compress_bytes_used", 0)), int(stats.get("compress_under_bytes", 0))
        return written, (raw / packed) if packed else 1.0
