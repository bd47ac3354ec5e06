"""Crash points: for every step nvmetd names (nvmetd/crashpoints.py), run the operation in a forked child armed to
SIGKILL itself at that step, then start up again (Manager.boot, what nvmetd runs at start) and prove convergence:
no orphan volume, subsystem, host or key file, the journal closed, the kernel tree equal to the store field by
field, and the retried request answering the same twice with the effect of one call. Shared by the host run (fake
tree) and the kernel run.

A child that finishes without dying fails the step: the kill must land where the step says, not at random.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends import pools
from nvmetd import crashpoints
from nvmetd.manager import Manager
from target.configfs import ConfigFS
from target.store import StateStore
from tests import contention

VM = "vmc"


def manager(base: Path, cfs: ConfigFS) -> Manager:
    return Manager(StateStore(base / "state.json"), cfs, pools_root=base / "pools", keys_dir=base / "keys",
                   host_connect=False)


def _answer(value: Any) -> Any:
    """What a client sees, minus what changes by itself (allocation, the random DH-CHAP key file content)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("allocated_bytes", "compression_ratio")}
    return value


Scenario = tuple[Callable[[Manager], None], Callable[[Manager], Any], Callable[[Manager], str | None]]


def scenario(step: str, disk: str, reboot: Callable[[], None]) -> Scenario:
    """(setup, the operation, the check that its effect happened exactly once) for a step."""
    kind = step.split(".")[0]
    make = lambda m: m.create_disk(disk, "files", "4M")  # noqa: E731
    attach = lambda m: m.attach(VM, disk, "tcp", contention.vm_uuid(VM))  # noqa: E731

    def disks(m: Manager) -> dict[str, Any]:
        return m.store.load().get("disks", {})

    def attached(m: Manager) -> dict[str, Any]:
        return m.store.load().get("vms", {}).get(VM, {}).get("attachments", {})

    if kind == "create":
        return (lambda m: None, make,
                lambda m: None if disks(m).get(disk, {}).get("state", "ready") == "ready" and disk in disks(m)
                else f"{disk} not ready after the retried create")
    if kind == "delete":
        return (make, lambda m: m.delete_disk(disk),
                lambda m: None if disk not in disks(m) else f"{disk} still in the store after delete")
    if kind == "resize":
        return (make, lambda m: m.resize_disk(disk, "8M"),
                lambda m: None if m._pool("files").info(disk).logical_bytes == 8 << 20 else "not 8 MiB")
    if kind == "attach":
        return (make, attach, lambda m: None if disk in attached(m) else f"{disk} not attached")
    if kind in ("detach", "reconcile"):
        def setup(m: Manager) -> None:
            make(m)
            attach(m)
        return (setup, lambda m: m.detach(VM, disk),
                lambda m: None if disk not in attached(m) else f"{disk} still attached")

    def boot_setup(m: Manager) -> None:  # a host that rebooted: state on disk, empty kernel tree
        make(m)
        attach(m)
        reboot()
    return (boot_setup, lambda m: m.boot(wait=0).converged,
            lambda m: None if disk in attached(m) else f"{disk} lost its attachment over the reboot")


def converged(m: Manager) -> list[str]:
    """No orphans, both journals closed (the store's disk states, the pool's intents), kernel = store."""
    doc = m.store.load()
    problems = []
    open_journal = {n: e["state"] for n, e in doc.get("disks", {}).items() if e.get("state", "ready") != "ready"}
    if open_journal:
        problems.append(f"journal not closed: {open_journal}")
    intents = m._pool("files").ledger.load()["intents"]
    if intents:  # what start-up recovery (Backend.recover) must finish or roll back
        problems.append(f"the pool's crash journal still holds {sorted(intents)}")
    volumes = set(m._pool("files").volumes())
    ready = {n for n, e in doc.get("disks", {}).items() if e.get("state", "ready") == "ready"}
    if volumes != ready:
        problems.append(f"volumes {sorted(volumes)} != disks in the store {sorted(ready)}")
    keys = {p.name for p in m.keys_dir.iterdir()} if m.keys_dir.is_dir() else set()
    stray = keys - {f"{vm}.dhchap" for vm in doc.get("vms", {})}
    if stray:
        problems.append(f"key files of no VM: {sorted(stray)}")
    problems += contention.kernel_vs_store(m.store, m.cfs, m.pools_root)
    return problems


def crash_at(step: str, base: Path, cfs_factory: Callable[[], ConfigFS], reboot: Callable[[], None],
             index: int) -> list[str]:
    """One step: set up, crash there in a child, start up again, retry; the problems found (empty: converged).
    `reboot` empties the kernel tree as a host reboot would."""
    disk = f"x{index}"
    setup, op, effect = scenario(step, disk, reboot)
    setup(manager(base, cfs_factory()))
    pid = os.fork()
    if pid == 0:  # the nvmetd that dies
        code = 0
        try:
            crashpoints.arm(step)
            op(manager(base, cfs_factory()))
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        return [f"{step}: the operation was not killed at its step (exit status {status:#x})"]
    restarted = manager(base, cfs_factory())
    boot = restarted.boot(wait=0)
    problems = [] if boot.converged else [f"{step}: start-up did not converge: {boot.to_dict()}"]
    problems += [f"{step}: after start-up: {p}" for p in converged(restarted)]  # before any retry repairs it
    answers = []
    for _ in range(2):
        try:
            answers.append(_answer(op(restarted)))
        except Exception as exc:  # e.g. delete of a disk the start-up finished deleting
            answers.append(f"{type(exc).__name__}: {exc}")
    if answers[0] != answers[1]:
        problems.append(f"{step}: the retried request answered {answers[0]!r}, then {answers[1]!r}")
    if (wrong := effect(restarted)) is not None:
        problems.append(f"{step}: {wrong}")
    problems += [f"{step}: after the retries: {p}" for p in converged(restarted)]
    return problems


def setup_world(base: Path) -> None:
    pools.create_pool("file", "files", devices=[str(base / "files")], root=base / "pools")
