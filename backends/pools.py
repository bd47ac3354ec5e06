"""Creating, opening and destroying pools; each pool keeps its ledger and keys under its own state directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from backends import names
from backends.base import DEFAULT_FILL_THRESHOLD, Backend
from backends.errors import BackendError, NotFoundError
from backends.ledger import Ledger

DEFAULT_STATE_ROOT = Path("/var/lib/nvmetd/backends")
MAX_POOL_NAME = 32  # dm names, LVM VG names and null_blk disk names are short


def _kinds() -> dict[str, type[Backend]]:
    from backends.file import FileBackend
    from backends.lvm import LvmBackend
    from backends.nullblk import NullBlkBackend
    from backends.rbd import RbdBackend
    from backends.zfs import ZfsBackend

    return {b.kind: b for b in (FileBackend, LvmBackend, ZfsBackend, NullBlkBackend, RbdBackend)}


def state_root(root: Path | None = None) -> Path:
    return Path(root or os.environ.get("NVMETD_BACKENDS_DIR") or DEFAULT_STATE_ROOT)


def _pool_name(name: str) -> str:
    names.name(name, "pool name")
    if len(name) > MAX_POOL_NAME:
        raise BackendError(f"pool name {name!r} is {len(name)} characters; at most {MAX_POOL_NAME}")
    return name


def create_pool(kind: str, name: str, devices: list[str] | None = None, root: Path | None = None,
                fill_threshold: float = DEFAULT_FILL_THRESHOLD, **options: Any) -> Backend:
    """Create a pool of `kind` (file, lvm, zfs, nullblk, rbd) on `devices` and remember it under the state root."""
    kinds = _kinds()
    if kind not in kinds:
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(sorted(kinds))}")
    name = _pool_name(name)
    if not 0 < float(fill_threshold) <= 100:
        raise BackendError("fill_threshold is a percentage in (0, 100]")
    state_dir = state_root(root) / name
    ledger = Ledger(state_dir)
    with ledger.change() as doc:
        if doc.get("pool"):
            raise BackendError(f"a pool named {name!r} exists already ({doc['pool']['kind']})")
        doc["pool"] = {"kind": kind, "name": name, "devices": list(devices or []), "state": "creating",
                       "fill_threshold": float(fill_threshold), "options": options, "config": {}}
    os.chmod(state_dir, 0o700)
    try:
        config = kinds[kind].make_pool(name, list(devices or []), options)
    except BackendError:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    with ledger.change() as doc:
        doc["pool"].update(config=config, state="ready")
    return open_pool(name, root)


def open_pool(name: str, root: Path | None = None) -> Backend:
    name = _pool_name(name)
    state_dir = state_root(root) / name
    pool = Ledger(state_dir).load().get("pool")
    if not pool:
        raise NotFoundError(f"no pool named {name!r} under {state_root(root)}")
    if pool["state"] != "ready":
        raise BackendError(f"pool {name!r} was not completely created (a crash?): destroy it with force and retry")
    return _kinds()[pool["kind"]](name, state_dir, pool["config"], pool["fill_threshold"])


def list_pools(root: Path | None = None) -> list[str]:
    base = state_root(root)
    return sorted(p.parent.name for p in base.glob("*/ledger.json")) if base.is_dir() else []


def destroy_pool(name: str, root: Path | None = None, force: bool = False) -> None:
    """Destroy a pool. With force, its volumes and snapshots go too (their data is destroyed)."""
    backend = open_pool(name, root)
    doc = backend.ledger.load()
    if doc["volumes"] and not force:
        raise BackendError(f"pool {name!r} still has volumes {sorted(doc['volumes'])}: delete them or use force")
    backend.recover()
    for vol_name in _dependents_first(doc["volumes"]):
        vol = backend.ledger.load()["volumes"][vol_name]
        if vol["attached"]:
            backend.detach(vol_name)
        for snap in list(vol["snapshots"]):
            backend.delete_snapshot(vol_name, snap)
        backend.delete(vol_name)
    backend.remove_pool()
    shutil.rmtree(backend.state_dir, ignore_errors=True)


def _dependents_first(volumes: dict[str, Any]) -> list[str]:
    """Clones before their origins, so every snapshot is free of clones when its turn comes."""
    order: list[str] = []

    def visit(vol_name: str) -> None:
        if vol_name in order:
            return
        for snap in volumes[vol_name]["snapshots"].values():
            for clone in snap["clones"]:
                if clone in volumes:
                    visit(clone)
        order.append(vol_name)

    for vol_name in sorted(volumes):
        visit(vol_name)
    return order
