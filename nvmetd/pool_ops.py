"""Pools through nvmetd (`nvmetctl pool create|list|show|destroy`): the backends' pools, made and removed by the one
process that also owns the disks living in them.

Devices are checked before a backend sees them: a file pool takes an existing, empty directory (the backend makes
it private, 0700, so it must not be a directory that holds anything else), LVM and ZFS take block devices only.
A pool that still holds disks is never destroyed: delete them first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvmetd.errors import UserError

if TYPE_CHECKING:
    from nvmetd.manager import Manager


def _check_devices(kind: str, devices: list[str]) -> None:
    for dev in devices:
        if not os.path.isabs(dev) or "\x00" in dev or ".." in Path(dev).parts:
            raise UserError(f"device {dev!r} must be an absolute path without '..'")
    if kind == "file":
        if len(devices) != 1:
            raise UserError("a file pool takes exactly one directory")
        root = Path(devices[0])
        if not root.is_dir() or root.is_symlink():
            raise UserError(f"{root} is not a directory: make an empty one for the pool first")
        if any(root.iterdir()):
            raise UserError(f"{root} is not empty: a file pool takes a directory of its own")
    elif kind in ("lvm", "zfs"):
        if not devices:
            raise UserError(f"an {kind} pool takes one or more block devices")
        for dev in devices:
            try:
                mode = os.stat(dev).st_mode
            except OSError:
                raise UserError(f"{dev} does not exist") from None
            if not stat.S_ISBLK(mode):
                raise UserError(f"{dev} is not a block device")
    elif devices:
        raise UserError(f"a {kind} pool takes no devices")


def _pools():
    from backends import pools

    return pools


def create_pool(m: Manager, kind: str, name: str, devices: list[str], fill_threshold: float,
                options: dict[str, Any]) -> dict[str, Any]:
    pools = _pools()
    with m.lock:
        if name in pools.list_pools(m.pools_root):
            raise UserError(f"a pool named {name!r} exists already")
        _check_devices(kind, devices)
        if options.get("layout") not in (None, "stripe") and kind != "zfs":
            raise UserError(f"a {kind} pool has no layout {options['layout']!r}: layouts are for zfs pools")
        return pools.create_pool(kind, name, devices, root=m.pools_root, fill_threshold=fill_threshold,
                                 **options).status().to_dict()


def list_pools(m: Manager) -> list[dict[str, Any]]:
    return [pool_info(m, name) for name in _pools().list_pools(m.pools_root)]


def pool_info(m: Manager, name: str) -> dict[str, Any]:
    info = m._pool(name).status().to_dict()
    info["disks"] = sorted(d for d, e in m.store.load().get("disks", {}).items() if e.get("pool") == name)
    return info


def repair_pool(m: Manager, name: str) -> dict[str, Any]:
    """Put a redundant pool's members that are present again back online; answers the pool as it is then."""
    with m.lock:
        backend = m._pool(name)
        if not hasattr(backend, "repair"):
            raise UserError(f"pool {name!r} ({backend.kind}) has no members to repair")
        onlined = backend.repair()
        info = pool_info(m, name)
        info["onlined"] = onlined
        return info


def destroy_pool(m: Manager, name: str) -> dict[str, Any]:
    with m.lock:
        disks = pool_info(m, name)["disks"]
        if disks:
            raise UserError(f"pool {name!r} holds disks {', '.join(disks)}: delete them first")
        _pools().destroy_pool(name, m.pools_root)
        return {"destroyed": name}
