"""Where namespaces live: volumes on files, LVM thin pools, ZFS zvols and null_blk, behind one interface.

`open_pool(name)` / `create_pool(kind, name, ...)` give a `Backend`; its `attach(volume)` returns the file or block
device that a `target.model.Namespace.device_path` points at.
"""

from backends.base import Backend
from backends.errors import BackendError, NotFoundError, PoolFullError, QuotaError
from backends.pools import create_pool, destroy_pool, open_pool

__all__ = ["Backend", "BackendError", "NotFoundError", "PoolFullError", "QuotaError", "create_pool", "destroy_pool",
           "open_pool"]
