"""Names and sizes that reach tool argv, dataset names, LV names and paths.

A name becomes a file name, an LV name and a ZFS dataset component, so it takes the strictest common rule: letters,
digits, `.`, `_`, `-`, first character alphanumeric (so never `..`, `/`, NUL or an option-like `-x`). `:` (allowed by
`target.validate.safe_name`) is refused because LVM does not accept it; `@` and `+` are kept free as separators.
"""

from __future__ import annotations

import re

from backends.errors import BackendError
from target.validate import safe_name

MAX_NAME = 64
MIB = 1 << 20
MAX_SIZE = 1 << 60  # 1 EiB: far above any real volume, far below what ftruncate/lvcreate can be handed (2^63)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def name(value: str, what: str = "volume name") -> str:
    try:
        safe_name(value, what, MAX_NAME)
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    if ":" in value:
        raise BackendError(f"{what} {value!r} may not contain ':' (LVM refuses it)")
    return value


def size(value: int | str, what: str = "size") -> int:
    """Bytes, a positive multiple of 1 MiB: every backend can then honour it exactly (LVM extents are 1 MiB here)."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise BackendError(f"{what} {value!r} is not a size (examples: 1073741824, 512M, 10G)")
        value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BackendError(f"{what} must be a positive number of bytes")
    if value % MIB:
        raise BackendError(f"{what} {value} is not a multiple of 1 MiB (1048576 bytes)")
    if value > MAX_SIZE:
        raise BackendError(f"{what} {value} is more than 1 EiB ({MAX_SIZE} bytes)")
    return value


def human(nbytes: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"
