"""What the backends report: plain dataclasses so the API layer can serialise them with `asdict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VolumeInfo:
    name: str
    tenant: str
    logical_bytes: int
    allocated_bytes: int
    compression_ratio: float
    thin: bool
    encrypted: bool
    compression: str
    origin: str | None  # "volume@snapshot" for clones
    snapshots: list[str] = field(default_factory=list)
    attached: bool = False
    device_path: str | None = None  # what a namespace points at, while attached
    copies: int | None = None  # replicated pools (rbd): copies of its data that exist right now
    copies_wanted: int | None = None  # ... and how many the pool keeps when healthy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PoolStatus:
    name: str
    kind: str
    size_bytes: int
    used_bytes: int
    fill_percent: float
    fill_threshold_percent: float
    accepting_allocations: bool
    reason: str = ""
    volumes: int = 0
    tenants: dict[str, dict[str, int | None]] = field(default_factory=dict)
    redundancy: str = ""  # replicated pools (rbd, ZFS mirror): clean, recovering, degraded or unavailable
    layout: str = ""  # pools over several devices (zfs): stripe or mirror
    members: dict[str, str] = field(default_factory=dict)  # device -> state (zfs: ONLINE, REMOVED, FAULTED, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
