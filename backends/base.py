"""The one volume interface. Policy lives here (names, quotas, fill threshold, LUKS, crash journal); each backend
only supplies the storage primitives (`_make`, `_destroy`, `_resize`, ...), which must be idempotent so that
`recover()` can repeat a step a crash interrupted.

Every multi-step operation writes its intent to the ledger before its first step and removes it with the same ledger
write that records the result. After a crash `recover()` rolls back an unfinished create, snapshot or clone (nothing
half-made survives) and finishes an unfinished delete or grow (a half-deleted disk never comes back with its data).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from backends import luks, names
from backends.errors import BackendError, NotFoundError, PoolFullError, QuotaError
from backends.keys import KeyStore
from backends.ledger import Ledger, new_intent_id
from backends.model import PoolStatus, VolumeInfo
from nvmetd.crashpoints import crash_point
from target.tracked import peek

Record = dict[str, Any]
MAX_SNAPSHOT_NAME = 48
DEFAULT_FILL_THRESHOLD = 90.0


class Backend(ABC):
    kind: ClassVar[str]
    compressions: ClassVar[tuple[str, ...]] = ("off",)
    native_encryption: ClassVar[bool] = False  # ZFS encrypts itself; the others get LUKS2
    supports_encryption: ClassVar[bool] = True
    supports_thick: ClassVar[bool] = True

    def __init__(self, name: str, state_dir: Path, config: dict[str, Any], fill_threshold: float) -> None:
        self.name = name
        self.state_dir = Path(state_dir)
        self.config = config
        self.fill_threshold = float(fill_threshold)
        self.ledger = Ledger(self.state_dir)
        self.keys = KeyStore(self.state_dir / "keys")

    # ------------------------------------------------------------------ storage primitives (per backend)
    @classmethod
    @abstractmethod
    def make_pool(cls, name: str, devices: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """Create the pool on `devices`; return the settings to remember (written to the ledger)."""

    @abstractmethod
    def remove_pool(self) -> None:
        """Destroy the pool itself (its volumes are gone already)."""

    @abstractmethod
    def pool_usage(self) -> tuple[int, int, float]:
        """(size, used bytes, fill percent); fill may exceed used/size (e.g. thin metadata filling first)."""

    @abstractmethod
    def _make(self, vol: Record, backing_bytes: int) -> None: ...

    @abstractmethod
    def _destroy(self, vol: Record) -> None:
        """Remove the volume so that no later volume can read its data; a no-op if it does not exist."""

    @abstractmethod
    def _resize(self, vol: Record, backing_bytes: int) -> None: ...

    @abstractmethod
    def _snapshot(self, vol: Record, snap: str) -> None: ...

    @abstractmethod
    def _destroy_snapshot(self, vol: Record, snap: str) -> None:
        """A no-op if the snapshot does not exist."""

    @abstractmethod
    def _clone(self, origin: Record, snap: str, vol: Record) -> None: ...

    @abstractmethod
    def _raw_device(self, vol: Record) -> str:
        """The file or block device holding the volume's (for LUKS: encrypted) data."""

    @abstractmethod
    def _usage(self, vol: Record) -> tuple[int, float]:
        """(allocated bytes, compression ratio)."""

    def _activate(self, vol: Record) -> None:
        """Make `_raw_device` usable (activate an LV, load a ZFS key); idempotent."""
        return None

    def _apply_tenant_quota(self, tenant: str, max_bytes: int | None) -> None:
        """Backends that can enforce quotas themselves (ZFS) do it here, in addition to the ledger's check."""
        return None

    def _check_options(self, thin: bool, encrypted: bool, compression: str) -> None:
        if compression not in self.compressions:
            raise BackendError(f"{self.kind} pool {self.name!r} offers compression {', '.join(self.compressions)}; "
                               f"not {compression!r}")
        if encrypted and not self.supports_encryption:
            raise BackendError(f"{self.kind} volumes cannot be encrypted")
        if not thin and not self.supports_thick:
            raise BackendError(f"{self.kind} volumes are always thin here; use a file or ZFS pool for thick ones")

    # ------------------------------------------------------------------ helpers
    def mapname(self, volume: str) -> str:
        return f"nvmetd+{self.name}+{volume}"

    def _luks(self, vol: Record) -> bool:
        return bool(vol["encrypted"]) and not self.native_encryption

    def _backing(self, vol: Record, size: int | None = None) -> int:
        return (size or vol["size"]) + (luks.HEADER_BYTES if self._luks(vol) else 0)

    def _get(self, doc: dict[str, Any], volume: str) -> Record:
        vol = doc["volumes"].get(volume)
        if vol is None:
            raise NotFoundError(f"{self.kind} pool {self.name!r} has no volume {volume!r}")
        return vol

    def _busy(self, doc: dict[str, Any], volume: str) -> None:
        for intent in doc["intents"].values():
            if intent.get("volume") == volume:
                raise BackendError(f"volume {volume!r} has an unfinished {intent['op']} (a crash?); "
                                   f"run recovery (Backend.recover) first")

    def _tenant_usage(self, doc: dict[str, Any], tenant: str) -> tuple[int, int]:
        """Logical bytes and disks held by `tenant`, counting in-flight creates and grows (reservations)."""
        total, disks = 0, 0
        for vol in doc["volumes"].values():
            if vol["tenant"] == tenant:
                total += vol["size"]
                disks += 1
        for intent in doc["intents"].values():
            rec = intent.get("record")
            if intent["op"] == "create" and rec and rec["tenant"] == tenant:
                total += rec["size"]
                disks += 1
            elif intent["op"] == "grow" and intent.get("tenant") == tenant:
                total += max(0, intent["to"] - intent["from"])
        return total, disks

    def _check_quota(self, doc: dict[str, Any], tenant: str, add_bytes: int, add_disks: int) -> None:
        quota = doc["tenants"].get(tenant, {})
        used, disks = self._tenant_usage(doc, tenant)
        max_bytes, max_disks = quota.get("max_bytes"), quota.get("max_disks")
        if max_bytes is not None and add_bytes > 0 and used + add_bytes > max_bytes:
            raise QuotaError(
                f"tenant {tenant!r} would exceed its quota of {names.human(max_bytes)} logical bytes on pool "
                f"{self.name!r}: it holds {names.human(used)} and asks for {names.human(add_bytes)} more; "
                f"delete or shrink a disk, or raise the quota (set_quota)")
        if max_disks is not None and add_disks > 0 and disks + add_disks > max_disks:
            raise QuotaError(
                f"tenant {tenant!r} would exceed its quota of {max_disks} disks on pool {self.name!r} "
                f"(it has {disks}); delete a disk or raise the quota (set_quota)")

    def _check_fill(self) -> None:
        size, _, fill = self.pool_usage()
        if fill >= self.fill_threshold:
            raise PoolFullError(
                f"{self.kind} pool {self.name!r} is {fill:.1f}% full, at or past its fill threshold of "
                f"{self.fill_threshold:g}% (size {names.human(size)}): new volumes, snapshots, clones and growth "
                f"are refused; free space (delete volumes or snapshots), add a device, or raise the threshold")

    def _new_record(self, name: str, size: int, tenant: str, thin: bool, encrypted: bool, compression: str,
                    options: dict[str, Any], origin: str | None = None) -> Record:
        return {"name": name, "size": size, "tenant": tenant, "thin": thin, "encrypted": encrypted,
                "compression": compression, "options": options, "origin": origin, "snapshots": {},
                "attached": False, "created": time.time()}

    # ------------------------------------------------------------------ volumes
    def create_many(self, names_: list[str], size: int | str, tenant: str = "default") -> None:
        """Thin, unencrypted volumes of one size, journalled and committed in one ledger transaction each way
        (a benchmark's thousands of background disks; `create` rewrites the ledger three times per volume).
        A crash in between leaves intents that `recover()` rolls back, as for `create`."""
        tenant = names.name(tenant, "tenant name")
        size = names.size(size)
        vols = [self._new_record(names.name(n), size, tenant, True, False, "off", {}) for n in names_]
        intents: dict[str, Record] = {}
        with self.ledger.change() as doc:
            for vol in vols:
                if vol["name"] in doc["volumes"]:
                    raise BackendError(f"{self.kind} pool {self.name!r} already has a volume {vol['name']!r}")
                self._busy(doc, vol["name"])
            self._check_quota(doc, tenant, size * len(vols), len(vols))
            self._check_fill()
            for vol in vols:
                intent = new_intent_id()
                intents[intent] = vol
                doc["intents"][intent] = {"op": "create", "volume": vol["name"], "record": vol, "time": time.time()}
        for vol in vols:
            self._make(vol, self._backing(vol))
        with self.ledger.change() as doc:
            for intent, vol in intents.items():
                doc["volumes"][vol["name"]] = vol
                doc["intents"].pop(intent, None)

    def create(self, name: str, size: int | str, tenant: str = "default", thin: bool = True,
               encrypted: bool = False, compression: str = "off", **options: Any) -> VolumeInfo:
        name = names.name(name)
        tenant = names.name(tenant, "tenant name")
        size = names.size(size)
        self._check_options(thin, encrypted, compression)
        vol = self._new_record(name, size, tenant, thin, encrypted, compression, options)
        intent = self._begin_create(vol)
        try:
            if encrypted:
                self.keys.create(name)
            self._make(vol, self._backing(vol))
            if self._luks(vol):
                luks.format_device(self._raw_device(vol), self.keys.path(name))
        except BackendError:
            self._rollback_create(vol)
            self._end(intent)
            raise
        crash_point("create.in_pool")
        self._commit_create(intent, vol)
        return self.info(name)

    def _begin_create(self, vol: Record, origin: tuple[str, str] | None = None) -> str:
        with self.ledger.change() as doc:
            if vol["name"] in doc["volumes"]:
                raise BackendError(f"{self.kind} pool {self.name!r} already has a volume {vol['name']!r}")
            self._busy(doc, vol["name"])
            if origin:
                src = self._get(doc, origin[0])
                if origin[1] not in src["snapshots"]:
                    raise NotFoundError(f"volume {origin[0]!r} has no snapshot {origin[1]!r}")
            self._check_quota(doc, vol["tenant"], vol["size"], 1)
            self._check_fill()
            intent = new_intent_id()
            doc["intents"][intent] = {"op": "create", "volume": vol["name"], "record": vol, "time": time.time()}
        return intent

    def _commit_create(self, intent: str, vol: Record) -> None:
        with self.ledger.change() as doc:
            doc["volumes"][vol["name"]] = vol
            if vol["origin"]:
                src_name, snap = vol["origin"].split("@", 1)
                src = doc["volumes"].get(src_name)
                if src and snap in src["snapshots"]:
                    src["snapshots"][snap]["clones"].append(vol["name"])
            doc["intents"].pop(intent, None)

    def _end(self, intent: str) -> None:
        with self.ledger.change() as doc:
            doc["intents"].pop(intent, None)

    def _rollback_create(self, vol: Record) -> None:
        luks.close(self.mapname(vol["name"]))
        self._destroy(vol)
        self.keys.destroy(vol["name"])

    def check_delete(self, name: str) -> None:
        """What `delete` would refuse whatever the caller does first (snapshots), asked before a caller journals its
        own intent to delete: a refusal must leave the caller's record as it was. Attachment is not checked:
        callers detach first. A volume the pool does not have is not refused (deleting its record is the fix)."""
        vol = peek(self.ledger.load(), "volumes", name)
        if vol is not None:
            _refuse_snapshots(vol)

    def delete(self, name: str) -> None:
        """Destroy a volume and its data. Refused while attached or while it has snapshots."""
        with self.ledger.change() as doc:
            vol = self._get(doc, name)
            self._busy(doc, name)
            if vol["attached"]:
                raise BackendError(f"volume {name!r} is attached (a namespace may still use it): remove the "
                                   "namespace and detach it first")
            _refuse_snapshots(vol)
            intent = new_intent_id()
            doc["intents"][intent] = {"op": "delete", "volume": name, "record": vol, "time": time.time()}
        self._finish_delete(intent, vol)

    def _finish_delete(self, intent: str, vol: Record) -> None:
        luks.close(self.mapname(vol["name"]))
        if self._luks(vol) and self._exists_raw(vol):
            luks.erase(self._raw_device(vol))
        self._destroy(vol)
        self.keys.destroy(vol["name"])
        with self.ledger.change() as doc:
            doc["volumes"].pop(vol["name"], None)
            if vol["origin"]:
                src_name, snap = vol["origin"].split("@", 1)
                src = doc["volumes"].get(src_name)
                if src and snap in src["snapshots"] and vol["name"] in src["snapshots"][snap]["clones"]:
                    src["snapshots"][snap]["clones"].remove(vol["name"])
            doc["intents"].pop(intent, None)

    def _exists_raw(self, vol: Record) -> bool:
        try:
            return Path(self._raw_device(vol)).exists()
        except BackendError:
            return False

    def grow(self, name: str, new_size: int | str, force: bool = False) -> VolumeInfo:
        """Change the logical size. Shrinking cuts data off the end, so it needs `force` (and no encryption)."""
        new_size = names.size(new_size, "new size")
        with self.ledger.change() as doc:
            vol = self._get(doc, name)
            self._busy(doc, name)
            old = vol["size"]
            if new_size == old:
                return self.info(name, doc)
            if new_size < old:
                if not force:
                    raise BackendError(f"shrinking {name!r} from {names.human(old)} to {names.human(new_size)} "
                                       "would cut off the data past the new end; refused (use force to shrink)")
                if self._luks(vol):
                    raise BackendError(f"{name!r} is LUKS-encrypted: shrinking it is not supported")
            else:
                self._check_quota(doc, vol["tenant"], new_size - old, 0)
                self._check_fill()
            intent = new_intent_id()
            doc["intents"][intent] = {"op": "grow", "volume": name, "tenant": vol["tenant"], "from": old,
                                      "to": new_size, "time": time.time()}
        try:
            self._finish_grow(intent, vol, new_size)
        except BackendError:
            # refused before anything changed (the size is still the old one): no intent left to block the volume
            self._end(intent)
            raise
        return self.info(name)

    def _finish_grow(self, intent: str, vol: Record, new_size: int) -> None:
        self._resize(vol, self._backing(vol, new_size))
        if self._luks(vol) and vol["attached"]:
            luks.resize(self.mapname(vol["name"]), self.keys.path(vol["name"]))
        with self.ledger.change() as doc:
            if vol["name"] in doc["volumes"]:
                doc["volumes"][vol["name"]]["size"] = new_size
            doc["intents"].pop(intent, None)

    # ------------------------------------------------------------------ snapshots and clones
    def snapshot(self, name: str, snap: str) -> None:
        snap = names.name(snap, "snapshot name")
        if len(snap) > MAX_SNAPSHOT_NAME:
            raise BackendError(f"snapshot name {snap[:20]!r}... is {len(snap)} characters; at most "
                               f"{MAX_SNAPSHOT_NAME}")
        with self.ledger.change() as doc:
            vol = self._get(doc, name)
            self._busy(doc, name)
            if snap in vol["snapshots"]:
                raise BackendError(f"volume {name!r} already has a snapshot {snap!r}")
            self._check_fill()
            intent = new_intent_id()
            doc["intents"][intent] = {"op": "snapshot", "volume": name, "snapshot": snap, "record": None,
                                      "time": time.time()}
        try:
            self._snapshot(vol, snap)
        except BackendError:
            self._destroy_snapshot(vol, snap)
            self._end(intent)
            raise
        with self.ledger.change() as doc:
            doc["volumes"][name]["snapshots"][snap] = {"created": time.time(), "size": vol["size"], "clones": []}
            doc["intents"].pop(intent, None)

    def delete_snapshot(self, name: str, snap: str) -> None:
        with self.ledger.change() as doc:
            vol = self._get(doc, name)
            self._busy(doc, name)
            if snap not in vol["snapshots"]:
                raise NotFoundError(f"volume {name!r} has no snapshot {snap!r}")
            clones = vol["snapshots"][snap]["clones"]
            if clones:
                raise BackendError(f"snapshot {name}@{snap} has clones {clones}: delete them first")
            intent = new_intent_id()
            doc["intents"][intent] = {"op": "delete-snapshot", "volume": name, "snapshot": snap, "record": None,
                                      "time": time.time()}
        self._destroy_snapshot(vol, snap)
        with self.ledger.change() as doc:
            doc["volumes"][name]["snapshots"].pop(snap, None)
            doc["intents"].pop(intent, None)

    def clone(self, name: str, snap: str, new_name: str, tenant: str | None = None) -> VolumeInfo:
        """A new writable volume holding the snapshot's data; it shares the origin's key when encrypted."""
        new_name = names.name(new_name)
        with self.ledger.change() as doc:
            origin = dict(self._get(doc, name))
        tenant = names.name(tenant or origin["tenant"], "tenant name")
        size = origin["snapshots"].get(snap, {}).get("size", origin["size"])
        vol = self._new_record(new_name, size, tenant, origin["thin"], origin["encrypted"], origin["compression"],
                               origin["options"], origin=f"{name}@{snap}")
        intent = self._begin_create(vol, origin=(name, snap))
        try:
            if vol["encrypted"]:
                self.keys.create(new_name, source=name)
            self._clone(origin, snap, vol)
        except BackendError:
            self._rollback_create(vol)
            self._end(intent)
            raise
        crash_point("create.in_pool")
        self._commit_create(intent, vol)
        return self.info(new_name)

    # ------------------------------------------------------------------ attach / detach
    def attach(self, name: str) -> str:
        """Open the volume for a namespace and return the path its `device_path` must name."""
        with self.ledger.change() as doc:
            vol = self._get(doc, name)
            self._busy(doc, name)
            path = self._open(vol)
            vol["attached"] = True
        return path

    def attach_many(self, names: list[str]) -> dict[str, str]:
        """`attach` for many volumes in one ledger transaction: a full reconcile of a host with thousands of disks
        would otherwise rewrite the whole ledger once per disk (quadratic in the number of disks)."""
        paths: dict[str, str] = {}
        failure: BaseException | None = None
        with self.ledger.change():  # the attaches' own changes nest in it: one write
            for name in names:
                try:
                    paths[name] = self.attach(name)
                except BaseException as exc:  # what was opened before it stays recorded as attached
                    failure = exc
                    break
        if failure is not None:
            raise failure
        return paths

    def _open(self, vol: Record) -> str:
        self._activate(vol)
        if self._luks(vol):
            return luks.open_device(self._raw_device(vol), self.keys.path(vol["name"]), self.mapname(vol["name"]))
        return self._raw_device(vol)

    def detach(self, name: str) -> None:
        with self.ledger.change() as doc:
            vol = self._get(doc, name)
            luks.close(self.mapname(name))
            vol["attached"] = False

    def detach_many(self, names: list[str]) -> None:
        """`detach` for many volumes in one ledger transaction (see attach_many)."""
        if not names:
            return
        failure: BaseException | None = None
        with self.ledger.change():
            for name in names:
                try:
                    self.detach(name)
                except BaseException as exc:
                    failure = exc
                    break
        if failure is not None:
            raise failure

    def device_path(self, name: str) -> str:
        """What an attached volume's namespace points at."""
        with self.ledger.locked():
            vol = self._get(self.ledger.load(), name)
        if not vol["attached"]:
            raise BackendError(f"volume {name!r} is not attached: attach it first")
        return self._volume_path(vol)

    def open_path(self, name: str) -> str:
        """The path `attach` returns, computed without opening anything: what read-only callers (diff, status,
        export) put in the desired tree, so that printing it never activates a volume or opens a LUKS mapping."""
        return self._volume_path(self._get(self.ledger.load(), name))

    def opened(self, name: str, doc: dict[str, Any] | None = None) -> str | None:
        """The device path of an attached (open) volume, None if it is closed: the ledger alone answers, for
        callers that only decide whether to close it (`info` also measures usage: Ceph round trips per RBD image,
        for every detached disk at every reconcile). A volume the pool does not have is not open: nothing to
        close, and one such disk must not stop the reconcile of every other."""
        vol = peek(self.ledger.load() if doc is None else doc, "volumes", name)
        return self._volume_path(vol) if vol is not None and vol["attached"] else None

    def _peek(self, doc: dict[str, Any], name: str) -> Record:
        """A volume's record, to read: through `peek`, so the pool's other volumes are not copied to read one."""
        vol = peek(doc, "volumes", name)
        if vol is None:
            raise NotFoundError(f"{self.kind} pool {self.name!r} has no volume {name!r}")
        return vol

    def _volume_path(self, vol: Record) -> str:
        return str(luks.MAPPER / self.mapname(vol["name"])) if self._luks(vol) else self._raw_device(vol)

    # ------------------------------------------------------------------ reporting and quotas
    def info(self, name: str, doc: dict[str, Any] | None = None) -> VolumeInfo:
        if doc is None:
            doc = self.ledger.load()
        return self._info(self._peek(doc, name))

    def _info(self, vol: Record) -> VolumeInfo:
        allocated, ratio = self._usage(vol)
        path = self._volume_path(vol) if vol["attached"] else None
        return VolumeInfo(name=vol["name"], tenant=vol["tenant"], logical_bytes=vol["size"],
                          allocated_bytes=allocated, compression_ratio=round(ratio, 2), thin=vol["thin"],
                          encrypted=vol["encrypted"], compression=vol["compression"], origin=vol["origin"],
                          snapshots=sorted(vol["snapshots"]), attached=vol["attached"], device_path=path)

    def list(self, names: list[str] | None = None) -> list[VolumeInfo]:
        """Every volume, or those of `names` the pool has (a name it lacks is left out, not an error)."""
        doc = self.ledger.load()
        if names is None:
            return [self._info(vol) for _, vol in sorted(doc["volumes"].items())]
        return [self._info(vol) for n in sorted(names) if (vol := peek(doc, "volumes", n)) is not None]

    def set_quota(self, tenant: str, max_bytes: int | str | None = None, max_disks: int | None = None) -> None:
        tenant = names.name(tenant, "tenant name")
        limit = names.size(max_bytes, "quota") if max_bytes is not None else None
        if max_disks is not None and (isinstance(max_disks, bool) or not isinstance(max_disks, int)
                                      or max_disks < 0):
            raise BackendError("the disk quota must be a whole number >= 0")
        self._apply_tenant_quota(tenant, limit)
        with self.ledger.change() as doc:
            doc["tenants"][tenant] = {"max_bytes": limit, "max_disks": max_disks}

    def status(self) -> PoolStatus:
        doc = self.ledger.load()
        size, used, fill = self.pool_usage()
        accepting = fill < self.fill_threshold
        tenants: dict[str, dict[str, int | None]] = {}
        for tenant in sorted({v["tenant"] for v in doc["volumes"].values()} | set(doc["tenants"])):
            used_bytes, disks = self._tenant_usage(doc, tenant)
            quota = doc["tenants"].get(tenant, {})
            tenants[tenant] = {"logical_bytes": used_bytes, "disks": disks, "max_bytes": quota.get("max_bytes"),
                               "max_disks": quota.get("max_disks")}
        reason = "" if accepting else (f"{fill:.1f}% full, at or past the {self.fill_threshold:g}% threshold: "
                                       "new allocations refused")
        return PoolStatus(name=self.name, kind=self.kind, size_bytes=size, used_bytes=used,
                          fill_percent=round(fill, 2), fill_threshold_percent=self.fill_threshold,
                          accepting_allocations=accepting, reason=reason, volumes=len(doc["volumes"]),
                          tenants=tenants)

    # ------------------------------------------------------------------ crash recovery
    def recover(self) -> list[str]:
        """Finish or roll back what a crash interrupted, then make LUKS mappings match the attached flags.

        Run at start-up (boot restore) before any namespace is restored. Returns what it did, for the log.
        """
        done: list[str] = []
        doc = self.ledger.load()
        for intent_id, intent in sorted(doc["intents"].items(), key=lambda kv: kv[1].get("time", 0)):
            done.append(self._recover_one(intent_id, intent, doc))
        doc = self.ledger.load()
        for mapname in luks.open_mappings(f"nvmetd+{self.name}+"):
            vol = doc["volumes"].get(mapname.rsplit("+", 1)[-1])
            if vol is None or not vol["attached"]:
                luks.close(mapname)
                done.append(f"closed stale mapping {mapname}")
        for vol in doc["volumes"].values():
            if vol["attached"]:
                self._open(vol)
        return done

    def _recover_one(self, intent_id: str, intent: dict[str, Any], doc: dict[str, Any]) -> str:
        op, name = intent["op"], intent["volume"]
        if op == "create":
            self._rollback_create(intent["record"])
            self._end(intent_id)
            return f"rolled back unfinished create of {name}"
        if op == "delete":
            self._finish_delete(intent_id, intent["record"])
            return f"finished interrupted delete of {name}"
        vol = doc["volumes"].get(name)
        if vol is None:
            self._end(intent_id)
            return f"dropped {op} intent for vanished volume {name}"
        if op == "snapshot":
            self._destroy_snapshot(vol, intent["snapshot"])
            self._end(intent_id)
            return f"rolled back unfinished snapshot {name}@{intent['snapshot']}"
        if op == "delete-snapshot":
            self._destroy_snapshot(vol, intent["snapshot"])
            with self.ledger.change() as fresh:
                fresh["volumes"][name]["snapshots"].pop(intent["snapshot"], None)
                fresh["intents"].pop(intent_id, None)
            return f"finished interrupted delete of {name}@{intent['snapshot']}"
        if op == "grow":
            self._finish_grow(intent_id, vol, intent["to"])
            return f"finished interrupted resize of {name} to {intent['to']} bytes"
        raise BackendError(f"ledger holds an unknown intent {op!r}; was it written by a newer nvmetd?")

    def volumes(self) -> Iterator[str]:
        yield from sorted(self.ledger.load()["volumes"])


def _refuse_snapshots(vol: Record) -> None:
    """The one refusal both `check_delete` and `delete` make: a volume's snapshots go first."""
    if vol["snapshots"]:
        raise BackendError(f"volume {vol['name']!r} has snapshots {sorted(vol['snapshots'])}: delete them first "
                           "(`nvmetctl disk snapshot-delete`)")
