"""nvmetd's durable state as one typed document: the target the user applied, the disks with their lifecycle
state, the VMs with their attachments, nvmetd's ports, and the OPI and offload sections.

Why: the store holds a JSON dict that every caller read with its own `.get(..., default)`; a disk written
without a state (clone_disk did that) then meant "ready" only because each reader said so. Here the defaults are
said once, a file is checked whole on load (a field error names its path), and `save` writes the document back
in the stored form, so a file nvmetd wrote round-trips unchanged (no spurious generation bump).

Migration of files written by earlier nvmetds (format 1, the same format): a disk without `state` is ready, an
attachment without `backend` is on the engine, ports written as TOML numbers become strings; `transaction`
writes them back in the current shape on the next change. Pools are not in this document: each pool's record is
its own ledger (backends/ledger.py), found by the name a disk gives.

Validating every VM costs time proportional to the host: the attach/detach path (nvmetd/manager.py, measured by
bench.attach) reads single entries with `disk()` and `vm()`; whole-document loads are for the full reconcile,
start-up, status and tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nvmetd.opi.state import OpiState
from nvmetd.vms import Ports, Vm
from target.model import TargetState, parse_state
from target.store import FORMAT_VERSION, StateStore
from target.tracked import peek


class DiskState(StrEnum):
    """A disk's lifecycle: journalled before its volume exists and before its volume goes, so that a crash in
    between is rolled back (creating) or finished (deleting) at the next start."""

    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"


class Disk(BaseModel):
    model_config = ConfigDict(extra="allow")  # what another component records of a disk is kept as found
    pool: str
    state: DiskState = DiskState.READY  # files from before every writer recorded a state

    @property
    def ready(self) -> bool:
        return self.state is DiskState.READY


class StateDocument(BaseModel):
    # extra="allow": a section this model does not type yet (added by another component) is kept as found
    model_config = ConfigDict(extra="allow")
    format: Literal[1] = FORMAT_VERSION
    generation: int = 0
    target: TargetState = Field(default_factory=TargetState)
    disks: dict[str, Disk] = Field(default_factory=dict)
    vms: dict[str, Vm] = Field(default_factory=dict)
    ports: Ports | None = None  # nvmetd.toml's [ports] as last applied; None: the defaults
    opi: OpiState | None = None
    offload: dict[str, dict[str, Any]] | None = None  # nvmetd/opi/offload.py's entries (typed there, with grpc)

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value: object) -> TargetState:
        return value if isinstance(value, TargetState) else parse_state(value)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> StateDocument:
        return cls.model_validate(raw)

    def to_raw(self) -> dict[str, Any]:
        """The stored form, as nvmetd's writers have always shaped it (target canonical, ports as set)."""
        raw = self.model_dump(mode="json", exclude={"target", "ports", "opi", "offload"})
        raw["target"] = self.target.canonical().model_dump(mode="json")
        if self.ports is not None:
            raw["ports"] = self.ports.model_dump(mode="json", exclude_unset=True)
        if self.opi is not None:
            raw["opi"] = self.opi.model_dump(mode="json")
        if self.offload is not None:
            raw["offload"] = self.offload
        return raw

    def ready_disks(self) -> dict[str, Disk]:
        return {name: d for name, d in self.disks.items() if d.ready}


def load(store: StateStore) -> StateDocument:
    return StateDocument.from_raw(store.load())


@contextlib.contextmanager
def transaction(store: StateStore) -> Iterator[StateDocument]:
    """The store's locked read-modify-write, typed: saved (generation + 1) only if the stored form changed."""
    with store.transaction() as raw:
        doc = StateDocument.from_raw(raw)
        yield doc
        new = doc.to_raw()
        new["generation"] = raw["generation"]  # the store bumps it when something else changed
        raw.clear()
        raw.update(new)


def disk(raw: dict[str, Any], name: str) -> Disk | None:
    """One disk of a stored document, typed, without validating the others or copying them (the attach path)."""
    entry = peek(raw, "disks", name)
    return None if entry is None else Disk.model_validate(entry)


def disks(raw: dict[str, Any]) -> dict[str, Disk]:
    return {name: Disk.model_validate(entry) for name, entry in raw.get("disks", {}).items()}


def vm(raw: dict[str, Any], name: str) -> Vm | None:
    entry = raw.get("vms", {}).get(name)
    return None if entry is None else Vm.model_validate(entry)
