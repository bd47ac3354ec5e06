"""nvmetd's own record of a pool: its settings, tenants' quotas, volumes, snapshots and in-flight intents.

It is kept in a `target.store.StateStore` file (one JSON document, atomic replace, exclusive flock for a
read-modify-write, 0600) shaped as a ledger, not as the target state: accounting for LVM and files must survive
restarts and two callers must not both take the last byte of a quota. The `intents` section is the crash
journal: an operation is written there before its first step and removed after its last, so `Backend.recover()`
knows what to roll back (create) or finish (delete) after a crash.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from target.store import FORMAT_VERSION, StateStore

LEDGER_FILE = "ledger.json"
SECTIONS = ("tenants", "volumes", "intents")


def _empty() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "generation": 0, **{section: {} for section in SECTIONS}}


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self._file = StateStore(Path(state_dir) / LEDGER_FILE, empty=_empty, sections=SECTIONS)
        self.path = self._file.path

    def load(self) -> dict[str, Any]:
        doc = self._file.load()
        _add_sections(doc)
        return doc

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self._file.locked()

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        """A read-modify-write under the lock, saved if it changed."""
        with self._file.transaction() as doc:
            _add_sections(doc)
            yield doc


def _add_sections(doc: dict[str, Any]) -> None:
    """A ledger written before a section existed gets it empty. Tested with `in`, not setdefault: reaching a
    section through the view copies it (every volume of the pool), which a caller that reads one row or none
    should not pay."""
    for section in SECTIONS:
        if section not in doc:
            doc[section] = {}


def new_intent_id() -> str:
    return uuid.uuid4().hex[:12]
