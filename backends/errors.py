"""Errors a user can act on: each message says what was refused and what to do instead, never a traceback."""

from __future__ import annotations


class BackendError(Exception):
    """A refused or failed volume operation; str() is the whole user-facing message."""


class NotFoundError(BackendError):
    pass


class QuotaError(BackendError):
    """A tenant's quota of logical bytes or of disks would be exceeded."""


class PoolFullError(BackendError):
    """The pool is past its fill threshold: new allocations are refused before guests get write errors."""


class ToolError(BackendError):
    """An external tool (lvm, zfs, cryptsetup, losetup) failed; carries its stderr, never a secret."""


class UnavailableError(BackendError):
    """The storage system itself cannot be used (bad cluster config, missing keyring, unreachable monitor): exit
    code 3, like any other "the system cannot" error, not a refusal of the request."""
