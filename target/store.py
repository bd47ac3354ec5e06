"""The durable desired state: one JSON document, replaced atomically, changed only under a lock.

Two writers never lose each other's changes (the democratic-csi #504 failure): every change is a
read-modify-write inside `transaction()`, which holds an exclusive flock for the whole cycle and bumps a
generation counter; `compare_and_swap` lets a caller that read earlier refuse to overwrite newer work. The file
holds DH-CHAP keys, so it and its directory are private (0600/0700).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from target.model import TargetState, parse_state

DEFAULT_PATH = Path("/var/lib/nvmetd/state.json")
FORMAT_VERSION = 1


class StoreError(Exception):
    """The state file is unreadable or was changed by someone else in between."""


class ConflictError(StoreError):
    pass


def _empty() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "generation": 0, "target": TargetState().model_dump(mode="json")}


class StateStore:
    def __init__(self, path: Path = DEFAULT_PATH, empty: Callable[[], dict[str, Any]] | None = None) -> None:
        """`empty`: the document of a file never written (default: nvmetd's desired state with an empty target;
        backends/ledger.py keeps a pool's record in the same kind of file, shaped its own way)."""
        self.path = Path(path)
        self._empty = empty or _empty
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._held = threading.local()  # how deep this thread is inside locked()

    # --- reading ---
    def load(self) -> dict[str, Any]:
        """The current document (a fresh empty one if none was ever written)."""
        return self._read()[0]

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The document and the text it was parsed from (None: no file yet)."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return self._empty(), None
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.path} is not valid JSON ({exc}); refusing to overwrite it") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
            raise StoreError(f"{self.path} has an unknown format {doc.get('format') if isinstance(doc, dict) else '?'}")
        return doc, raw

    def target(self) -> TargetState:
        return parse_state(self.load().get("target", {}))

    # --- writing ---
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The exclusive lock; re-entrant in one thread (a command holding it for its whole run, such as
        `nvmetctl --offline`, still makes transactions), exclusive between threads and processes."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            yield
        finally:
            self._held.depth = 0
            os.close(fd)  # closing drops the flock

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Yield the document for changing in place; it is saved (generation + 1) if it changed.

        Nested in a transaction of the same thread, it yields the outer document and the outer one saves: a
        batch of changes (a pool attaching a thousand volumes) is one write, and an inner change is never lost
        to the outer one writing back what it read before."""
        with self.locked():
            outer = getattr(self._held, "doc", None)
            if outer is not None:
                yield outer
                return
            doc, raw = self._read()
            # the serialised form, not a deep copy, is the "before": json's C encoder is an order of magnitude
            # faster than copy.deepcopy, and this runs on every change of a document that grows with the host.
            # A file this class wrote is that form already, marked by its one newline at the end; any other (an
            # earlier version's indented file, one written by hand) is serialised here, so reading changes nothing.
            own = raw is not None and raw.endswith("\n") and "\n" not in raw[:-1]
            before = raw[:-1] if own else _serialise(doc)
            generation = doc["generation"]
            self._held.doc = doc
            try:
                yield doc
            finally:
                self._held.doc = None
            if _serialise(doc) != before:
                doc["generation"] = generation + 1
                self._write(doc)

    def compare_and_swap(self, generation: int, doc: dict[str, Any]) -> int:
        """Save `doc` only if the stored generation is still `generation`; return the new generation."""
        with self.locked():
            current = self.load()["generation"]
            if current != generation:
                raise ConflictError(f"state changed meanwhile (generation {current}, expected {generation})")
            doc = {**doc, "generation": generation + 1, "format": FORMAT_VERSION}
            self._write(doc)
            return doc["generation"]

    def _write(self, doc: dict[str, Any]) -> None:
        data = (_serialise(doc) + "\n").encode()  # the newline marks the file as written here (transaction)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def _serialise(doc: dict[str, Any]) -> str:
    """Compact on purpose: with `indent` json falls back to its pure-Python encoder (10x slower on a state of
    thousands of VMs, written on every attach)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def set_target(doc: dict[str, Any], state: TargetState) -> None:
    doc["target"] = state.canonical().model_dump(mode="json")
