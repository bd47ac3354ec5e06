"""The store's files: a base document (`state.json`, replaced atomically) and a journal of the changes since
(`state.json.journal`, appended and fsynced), so that one change writes one line, not the whole document.

Crash safety: the journal is JSON lines. Its first line names the base it follows (inode, size, mtime_ns and
generation of the base file), so a journal left by a crash between writing a new base and replacing the journal,
or one whose base was replaced by hand, is recognised and ignored. Each further line is one transaction with its
generation; it is written with one write() and fsynced before the transaction returns, so a kill or a crash
leaves it whole or not there: an incomplete last line (no newline, or not JSON) is a write that never finished
and is ignored (and cut off by the next writer). A base is written as before (temp file, fsync, rename, directory
fsync), then a new journal with only its header (the same way): compaction, when the journal grows past the
base's size, and whenever there is no base yet.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNAL_FORMAT = 1
MIN_COMPACT_BYTES = 256 * 1024


class JournalError(Exception):
    pass


@dataclass(frozen=True)
class BaseId:
    """Which base file a journal follows (a file replaced by rename or rewritten by hand differs in one)."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> BaseId:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    def as_list(self) -> list[int]:
        return [self.ino, self.size, self.mtime_ns]


def journal_path(base: Path) -> Path:
    return base.with_name(base.name + ".journal")


def serialise(doc: Any) -> str:
    """Compact on purpose: with `indent` json falls back to its pure-Python encoder (10x slower)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@dataclass
class Tail:
    records: list[dict[str, Any]]
    consumed: int  # bytes of whole lines read (where the next record starts)
    ino: int | None  # the journal file's inode (None: no journal)
    follows: bool  # the journal's header names this base (else it is stale and ignored)


def read_journal(path: Path, base: BaseId | None, offset: int = 0, ino: int | None = None) -> Tail:
    """The records of the journal from `offset` (0: from its header, which must name `base`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Tail([], 0, None, False)
    try:
        st = os.fstat(fd)
        if ino is not None and st.st_ino != ino:
            raise JournalError("the journal was replaced")  # the caller re-reads everything
        os.lseek(fd, offset, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    lines = data.split(b"\n")
    complete, consumed, records = lines[:-1], offset, []
    follows = True
    for i, line in enumerate(complete):
        try:
            entry = json.loads(line)
        except ValueError:
            if i == len(complete) - 1 and not lines[-1]:
                break  # a last line that never finished (zeros after a crash): ignored, cut off by the next writer
            raise JournalError(f"{path}: line at byte {consumed} is not JSON; refusing to go on") from None
        if offset == 0 and i == 0:
            follows = (entry.get("journal") == JOURNAL_FORMAT and base is not None
                       and entry.get("base") == base.as_list())
            if not follows:
                return Tail([], consumed + len(line) + 1, st.st_ino, False)
        else:
            records.append(entry)
        consumed += len(line) + 1
    return Tail(records, consumed, st.st_ino, follows)


def write_base(path: Path, doc: dict[str, Any]) -> BaseId:
    """Replace the base atomically and durably, then start an empty journal that follows it."""
    _replace(path, (serialise(doc) + "\n").encode())
    base = BaseId.of(os.stat(path))
    header = {"journal": JOURNAL_FORMAT, "base": base.as_list(), "generation": doc.get("generation", 0)}
    _replace(journal_path(path), (json.dumps(header) + "\n").encode())
    return base


def append(path: Path, record: str, at: int) -> os.stat_result:
    """Append one serialised record to the journal after byte `at` (anything beyond it is an unfinished write:
    cut off)."""
    line = (record + "\n").encode()
    fd = os.open(journal_path(path), os.O_WRONLY | os.O_APPEND)
    try:
        if os.fstat(fd).st_size != at:
            os.ftruncate(fd, at)
        os.write(fd, line)
        os.fsync(fd)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
