"""The document a store hands out: a dict that copies only what its caller touches, so a change costs what changed.

Why: a host with 2,500 VMs and 10,000 namespaces keeps megabytes of state; parsing it, copying it and serialising
it twice to find what one attach changed made that attach grow with the host (bench.attach). Here the committed
document stays parsed in memory (target/store.py) and is shared, never changed in place; a `Tracked` view of it
copies a value (a top-level key, or one row of a section such as `vms` or `volumes`) the first time the caller
reaches it, and `changes()` compares only the copied values with the committed ones. Reading through the dict
interface is always safe: iterating a section (`items()`, `values()`, `dict(section)`) copies every row, which
is correct and as slow as before; `committed_rows()` iterates without copying, for readers on hot paths.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

_MISSING = object()


def deep_copy(value: Any) -> Any:
    """A copy of a JSON-shaped value (dicts, lists, scalars): several times faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value


class Tracked(dict):
    """A view of `base`; values reached by the caller are private copies, the rest are `base`'s own objects."""

    def __init__(self, base: Mapping[str, Any], sections: Iterable[str] = ()) -> None:
        super().__init__(base)
        self._base = base
        self._sections = frozenset(sections)  # keys whose values are sections of rows, tracked row by row
        self._owned: set[str] = set()  # keys whose values are the caller's (copied or assigned)
        self._gone: set[str] = set()  # keys deleted

    def _own(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if key not in self._owned:
            self._owned.add(key)
            value = Tracked(value) if key in self._sections and type(value) is dict else deep_copy(value)
            dict.__setitem__(self, key, value)
        return value

    # --- reading: every value handed out is the caller's own ---
    def __getitem__(self, key: str) -> Any:
        return self._own(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self._own(key) if dict.__contains__(self, key) else default

    def __iter__(self) -> Iterator[str]:  # defined so dict(view) and {**view} go through __getitem__
        return dict.__iter__(self)

    def _own_all(self) -> None:
        """Every value the caller's: the rows not reached yet copied in one pickle round trip (a section of
        thousands of rows, several times faster than copying row by row)."""
        rest = {k: v for k, v in dict.items(self) if k not in self._owned}
        if not rest:
            return
        plain = {k: v for k, v in rest.items() if k not in self._sections}
        copies = pickle.loads(pickle.dumps(plain, pickle.HIGHEST_PROTOCOL))  # noqa: S301 (our own bytes, in memory)
        for key, value in copies.items():
            dict.__setitem__(self, key, value)
            self._owned.add(key)
        for key in rest.keys() - plain.keys():
            self._own(key)

    def items(self):  # type: ignore[override]
        self._own_all()
        return dict.items(self)

    def values(self):  # type: ignore[override]
        self._own_all()
        return dict.values(self)

    # --- writing ---
    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        self._owned.add(key)
        self._gone.discard(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if not dict.__contains__(self, key):
            self[key] = default
        return self._own(key)

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        self._owned.discard(key)
        self._gone.add(key)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        if dict.__contains__(self, key):
            value = self._own(key)
            del self[key]
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[str, Any]:
        key = next(reversed(list(dict.keys(self))))
        return key, self.pop(key)

    def clear(self) -> None:
        self._gone.update(dict.keys(self))
        self._owned.clear()
        dict.clear(self)

    def update(self, other: Any = (), **kw: Any) -> None:  # type: ignore[override]
        pairs = other.items() if isinstance(other, Mapping) else other
        for key, value in [*pairs, *kw.items()]:
            self[key] = value

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        self._own_all()
        return dict(dict.items(self))

    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return deep_copy(self)

    def __reduce__(self):  # pickled as the plain dict it stands for
        return (dict, (self.copy(),))

    def __or__(self, other: Any) -> dict[str, Any]:
        return {**self.copy(), **other}

    def __ior__(self, other: Any) -> Tracked:
        self.update(other)
        return self


def committed_rows(section: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """(key, row) of a section without copying the rows: for reading only (a row changed through this is not
    saved, and would be the committed object itself). The hot paths that scan every VM use it."""
    return dict.items(section) if isinstance(section, dict) else section.items()


def peek(doc: Mapping[str, Any], *keys: str) -> Any:
    """The value at `keys` (a section, then a row) of a document or view, or None: read without copying it or
    the section around it, so it is not the caller's to change (it may be the committed document's own).

    Why: reaching one disk's row through the view copies its whole section first (10,000 disks on a large host,
    or a pool ledger's volumes) when the caller only validates or reads that row."""
    value: Any = doc
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = dict.get(value, key)
    return value


def touched_rows(section: Any, base: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The rows of `section` that may differ from `base` ({key: row, or None where deleted}) when `section` is
    `base` itself or a view of it; None when it is neither (then only reading every row says what it holds).

    Why: a summary kept for the committed section (nvmetd/vm_index.py) is corrected by the few rows a
    transaction reached, instead of being recomputed from every row."""
    if base is None:
        return None
    if section is base:
        return {}
    if not isinstance(section, Tracked) or section._base is not base:
        return None
    rows = {key: dict.__getitem__(section, key) for key in section._owned}
    rows.update({key: None for key in section._gone if not dict.__contains__(section, key)})
    return rows


Changes = dict[str, Any]


def changes(view: Tracked) -> Changes:
    """What the caller changed against the committed document: {"top": {key: value}, "deltop": [...],
    "rows": {section: {key: row}}, "del": {section: [key, ...]}} (empty parts left out)."""
    base = view._base
    top: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    dels: dict[str, list[str]] = {}
    for key in view._owned:
        value = dict.__getitem__(view, key)
        old = base.get(key, _MISSING)
        if key in view._sections and isinstance(old, dict) and isinstance(value, dict):
            changed, deleted = _section_changes(value, old)
            if changed:
                rows[key] = changed
            if deleted:
                dels[key] = deleted
        elif old is _MISSING or old != value:
            top[key] = value
    deltop = [k for k in view._gone if k in base and not dict.__contains__(view, k)]
    out: Changes = {}
    for name, part in (("top", top), ("deltop", deltop), ("rows", rows), ("del", dels)):
        if part:
            out[name] = part
    return out


def _section_changes(value: dict[str, Any], old: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    if isinstance(value, Tracked) and value._base is old:
        keys: Iterable[str] = value._owned
        gone = [k for k in value._gone if k in old and not dict.__contains__(value, k)]
    else:  # a section assigned whole: compared row by row (dict equality, in C)
        keys = dict.keys(value)
        gone = [k for k in old if k not in value]
    changed = {}
    for key in keys:
        row = dict.__getitem__(value, key)
        if old.get(key, _MISSING) != row:
            changed[key] = row
    return changed, gone


def apply(doc: dict[str, Any], change: Changes, in_place: bool = False) -> dict[str, Any]:
    """`doc` with `change` applied; copy-on-write unless `in_place` (the committed document is shared by views
    taken before, so it is never changed in place once handed out). Changed values are copied in: the caller's
    objects stay the caller's."""
    new = doc if in_place else dict(doc)
    for key, value in change.get("top", {}).items():
        new[key] = deep_copy(value)
    for key in change.get("deltop", ()):
        new.pop(key, None)
    touched = set(change.get("rows", {})) | set(change.get("del", {}))
    for name in touched:
        section = new.get(name)
        section = {} if not isinstance(section, dict) else (section if in_place else dict(section))
        for key, row in change.get("rows", {}).get(name, {}).items():
            section[key] = deep_copy(row)
        for key in change.get("del", {}).get(name, ()):
            section.pop(key, None)
        new[name] = section
    return new
