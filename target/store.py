"""The durable desired state: one JSON document, changed only under a lock, each change costing what changed.

Two writers never lose each other's changes (the democratic-csi #504 failure): every change is a
read-modify-write inside `transaction()`, which holds an exclusive flock for the whole cycle and bumps a
generation counter; `compare_and_swap` lets a caller that read earlier refuse to overwrite newer work. The file
holds DH-CHAP keys, so it and its directory are private (0600/0700).

Why it is not re-read and rewritten whole on every change: at 2,500 VMs with 10,000 namespaces that was most of
an attach (bench.attach). The parsed document stays in memory per file (shared by every StateStore of the
path), revalidated by stat (inode, size, mtime_ns of the base; inode and length of the journal), so a write by
another process (`nvmetctl --offline`, a pool's CLI) is seen; a transaction yields a view that copies only what
it touches (target/tracked.py) and saves only the changed rows, as one fsynced line of the journal
(target/journal.py: base file + journal, compacted into a new base when the journal outgrows it). A file of an
earlier version (a base with no journal, indented or not) loads as it is; its first change starts its journal.

Summaries of the document that a change would otherwise recompute by walking every row (which disk each VM has,
which ports are in use: nvmetd/vm_index.py) are kept with the committed document (`derived`): built once, then
rolled forward by each change's record, by this process or read from the journal; a document read afresh (another
process compacted, a file replaced by hand) starts without them, so they are rebuilt from what was read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from target import journal
from target.journal import BaseId, JournalError
from target.model import TargetState, parse_state
from target.tracked import Changes, Tracked, apply, changes

DEFAULT_PATH = Path("/var/lib/nvmetd/state.json")
FORMAT_VERSION = 1
DEFAULT_SECTIONS = ("vms", "disks")  # nvmetd's document: its rows, saved one by one


class StoreError(Exception):
    """The state file is unreadable or was changed by someone else in between."""


class ConflictError(StoreError):
    pass


T = TypeVar("T")


class Derived(Protocol[T]):
    """A summary of the committed document that follows it change by change (StateStore.derived)."""

    key: str  # one summary per key and document

    def build(self, doc: dict[str, Any]) -> T:
        """The summary of `doc`, from all of it."""
        ...

    def update(self, value: T, old: dict[str, Any], new: dict[str, Any], record: Changes) -> T | None:
        """The summary of `new` (`old` with `record` applied), from `value` (the summary of `old`) and what the
        record touched; None: rebuild it when next asked. Never changes `value` in place (a reader may hold it)."""
        ...


def _empty() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "generation": 0, "target": TargetState().model_dump(mode="json")}


@dataclass(frozen=True)
class _Committed:
    """A file's document as last read or written by this process, and which files it came from."""

    doc: dict[str, Any]  # shared by every view: never changed in place
    base: BaseId
    journal_ino: int | None
    consumed: int  # journal bytes read (whole lines)
    follows: bool  # the journal is this base's (else: stale, the next write starts a new one)
    derived: dict[str, tuple[Derived[Any], Any]] = field(default_factory=dict, compare=False)  # key -> summary


_CACHE: dict[str, _Committed] = {}
_CACHE_LOCK = threading.Lock()


class StateStore:
    def __init__(self, path: Path = DEFAULT_PATH, empty: Callable[[], dict[str, Any]] | None = None,
                 sections: Iterable[str] = DEFAULT_SECTIONS) -> None:
        """`empty`: the document of a file never written (default: nvmetd's desired state with an empty target;
        backends/ledger.py keeps a pool's record in the same kind of file, shaped its own way). `sections`: the
        top-level keys that hold rows (one VM, one disk, one volume): a change saves the changed rows only."""
        self.path = Path(path)
        self._empty = empty or _empty
        self._sections = tuple(sections)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.journal_path = journal.journal_path(self.path)
        self._key = os.path.abspath(self.path)
        self._held = threading.local()  # how deep this thread is inside locked()

    # --- reading ---
    def load(self) -> dict[str, Any]:
        """The current document (a fresh empty one if none was ever written): a view whose values the caller
        may change freely (they are copied on first access; nothing is saved outside `transaction`)."""
        committed = self._current()
        return Tracked(committed.doc if committed else self._empty(), self._sections)

    def target(self) -> TargetState:
        return parse_state(self.load().get("target", {}))

    def derived(self, spec: Derived[T]) -> T:
        """`spec`'s summary of the committed document (the one a transaction opened now is based on): built the
        first time, then kept up to date by every change instead of being rebuilt."""
        committed = self._current()
        if committed is None:
            return spec.build(self._empty())
        entry = committed.derived.get(spec.key)
        if entry is None:
            entry = (spec, spec.build(committed.doc))
            committed.derived[spec.key] = entry  # two threads racing build it twice, harmlessly
        return entry[1]

    def _current(self) -> _Committed | None:
        """The committed document, re-read only as far as the files changed since (None: no file yet)."""
        with _CACHE_LOCK:
            cached = _CACHE.get(self._key)
        try:
            base = BaseId.of(os.stat(self.path))
        except FileNotFoundError:
            return None
        if cached is not None and cached.base == base:
            try:
                jst: os.stat_result | None = os.stat(self.journal_path)
            except FileNotFoundError:
                jst = None
            jino = jst.st_ino if jst is not None else None
            if jino == cached.journal_ino and jst is not None and jst.st_size == cached.consumed:
                return cached
            if jst is None and cached.journal_ino is None:
                return cached
            if cached.follows and jino == cached.journal_ino and jst is not None and jst.st_size > cached.consumed:
                return self._read_tail(cached)
        return self._read_all()

    def _read_tail(self, cached: _Committed) -> _Committed | None:
        try:
            tail = journal.read_journal(self.journal_path, cached.base, cached.consumed, cached.journal_ino)
        except JournalError:
            return self._read_all()
        if tail.consumed == cached.consumed:
            return cached  # only an unfinished line beyond: nothing committed yet
        doc, derived = cached.doc, cached.derived
        for record in tail.records:
            old, doc = doc, self._replay(doc, record, in_place=False)
            derived = _rolled(derived, old, doc, record)
        return self._remember(replace(cached, doc=doc, consumed=tail.consumed, derived=derived))

    def _read_all(self) -> _Committed | None:
        for _ in range(20):  # a compaction by another process between reading the base and its journal: again
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                base = BaseId.of(os.fstat(fd))
                with os.fdopen(os.dup(fd), "rb") as f:
                    raw = f.read()
            finally:
                os.close(fd)
            doc = self._parse(raw)
            try:
                tail = journal.read_journal(self.journal_path, base)
            except JournalError as exc:
                raise StoreError(f"{exc}") from None
            try:
                if BaseId.of(os.stat(self.path)) != base:
                    continue
            except FileNotFoundError:
                continue
            for record in tail.records:
                doc = self._replay(doc, record, in_place=True)
            return self._remember(_Committed(doc, base, tail.ino, tail.consumed, tail.follows))
        raise StoreError(f"{self.path} keeps changing while it is read")

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{self.path} is not valid JSON ({exc}); refusing to overwrite it") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
            raise StoreError(f"{self.path} has an unknown format {doc.get('format') if isinstance(doc, dict) else '?'}")
        return doc

    def _replay(self, doc: dict[str, Any], record: dict[str, Any], in_place: bool) -> dict[str, Any]:
        generation = record.get("g")
        if generation != doc.get("generation", 0) + 1:
            raise StoreError(f"{self.journal_path}: record of generation {generation} does not follow "
                             f"{doc.get('generation', 0)}; refusing to go on")
        doc = apply(doc, record, in_place=in_place)
        doc["generation"] = generation
        return doc

    def _remember(self, committed: _Committed) -> _Committed:
        with _CACHE_LOCK:
            _CACHE[self._key] = committed
        return committed

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
        to the outer one writing back what it read before. An exception leaves the stored document as it was."""
        with self.locked():
            outer = getattr(self._held, "doc", None)
            if outer is not None:
                yield outer
                return
            committed = self._current()
            view = Tracked(committed.doc if committed else self._empty(), self._sections)
            generation = view.get("generation", 0)
            self._held.doc = view
            try:
                yield view
            finally:
                self._held.doc = None
            change = changes(view)
            change.get("top", {}).pop("generation", None)
            change = {k: v for k, v in change.items() if v}
            if change:
                record = {**change, "g": generation + 1}
                self._commit(committed, record, view)
                view["generation"] = generation + 1

    def compare_and_swap(self, generation: int, doc: dict[str, Any]) -> int:
        """Save `doc` only if the stored generation is still `generation`; return the new generation."""
        with self.locked():
            committed = self._current()
            current = committed.doc["generation"] if committed else self._empty()["generation"]
            if current != generation:
                raise ConflictError(f"state changed meanwhile (generation {current}, expected {generation})")
            new = json.loads(journal.serialise({**doc, "generation": generation + 1, "format": FORMAT_VERSION}))
            self._write_base(new)
            return new["generation"]

    def _commit(self, committed: _Committed | None, record: dict[str, Any], view: Tracked) -> None:
        if committed is None:  # no file yet: the whole (small) document is the first base
            self._write_base(json.loads(journal.serialise(view)) | {"generation": record["g"]})
            return
        line = journal.serialise(record)
        record = json.loads(line)  # what a reader of the file gets (lists, not tuples; str, not StrEnum)
        doc = apply(committed.doc, record)
        doc["generation"] = record["g"]
        derived = _rolled(committed.derived, committed.doc, doc, record)
        if not committed.follows or committed.consumed > max(journal.MIN_COMPACT_BYTES, committed.base.size):
            self._write_base(doc, derived)  # compaction (or a journal that is not this base's): one whole write
            return
        st = journal.append(self.path, line, committed.consumed)
        self._remember(replace(committed, doc=doc, journal_ino=st.st_ino, consumed=st.st_size, derived=derived))

    def _write_base(self, doc: dict[str, Any], derived: dict[str, tuple[Derived[Any], Any]] | None = None) -> None:
        base = journal.write_base(self.path, doc)
        jst = os.stat(self.journal_path)
        self._remember(_Committed(doc, base, jst.st_ino, jst.st_size, True, dict(derived or {})))


def _rolled(derived: dict[str, tuple[Derived[Any], Any]], old: dict[str, Any], new: dict[str, Any],
            record: Changes) -> dict[str, tuple[Derived[Any], Any]]:
    """The summaries of `new` from those of `old` (a new dict: `old`'s stay as they were, for its readers)."""
    rolled: dict[str, tuple[Derived[Any], Any]] = {}
    for key, (spec, value) in tuple(derived.items()):  # a reader may add one meanwhile (derived())
        value = spec.update(value, old, new, record)
        if value is not None:
            rolled[key] = (spec, value)
    return rolled


def set_target(doc: dict[str, Any], state: TargetState) -> None:
    doc["target"] = state.canonical().model_dump(mode="json")


def read_document(path: Path) -> dict[str, Any] | None:
    """The stored document read afresh from the files (base and journal), not from this process's memory: for
    tests and tools that look at what is on disk (None: no file)."""
    store = StateStore(path)
    store._remember = lambda committed: committed  # type: ignore[method-assign]  # nothing kept
    committed = store._read_all()
    return None if committed is None else committed.doc


def stored_files(path: Path) -> list[Path]:
    """The files that hold the document (base and journal): what a scan for leaked secrets must read."""
    return [p for p in (Path(path), journal.journal_path(Path(path))) if p.exists()]
