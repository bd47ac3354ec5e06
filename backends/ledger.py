"""nvmetd's own record of a pool: its settings, tenants' quotas, volumes, snapshots and in-flight intents.

It reuses `target.store.StateStore` (one JSON document, atomic replace, exclusive flock for a read-modify-write, 0600):
accounting for LVM and files must survive restarts and two callers must not both take the last byte of a quota.
The `intents` section is the crash journal: an operation is written there before its first step and removed after
its last, so `Backend.recover()` knows what to roll back (create) or finish (delete) after a crash.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from target.store import StateStore

LEDGER_FILE = "ledger.json"


class Ledger(StateStore):
    def __init__(self, state_dir: Path) -> None:
        super().__init__(Path(state_dir) / LEDGER_FILE)

    def load(self) -> dict[str, Any]:
        doc = super().load()
        if "target" in doc and not doc.get("pool"):
            doc.pop("target")  # StateStore's empty document is shaped for the target state; a ledger has none
        for section in ("tenants", "volumes", "intents"):
            doc.setdefault(section, {})
        return doc

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        with self.transaction() as doc:
            yield doc


def new_intent_id() -> str:
    return uuid.uuid4().hex[:12]
