"""Loop devices over files, found again by their backing file so a restart can detach what it attached."""

from __future__ import annotations

import json
from pathlib import Path

from backends.run import out, run


def attach(path: Path) -> str:
    existing = find(path)
    if existing:
        return existing[0]
    return out(["losetup", "--find", "--show", str(path)]).strip()


def find(path: Path) -> list[str]:
    listing = json.loads(out(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"]) or "{}")
    target = str(Path(path).resolve())
    return [d["name"] for d in listing.get("loopdevices", [])
            if (d.get("back-file") or "").removesuffix(" (deleted)") == target]


def detach(path: Path) -> None:
    for dev in find(path):
        run(["losetup", "--detach", dev], check=False)


def refresh(path: Path) -> None:
    """After a backing file grew: tell its loop device(s) to re-read the size."""
    for dev in find(path):
        run(["losetup", "--set-capacity", dev])
