"""Contention: 8 clients on the same 4 VMs, the same disks and one port, random mixes of attach, detach, disk
create, delete, resize and snapshot against a real nvmetd over its socket (shared by the host and kernel tests).

Judged three ways:
- the change log (nvmetd --change-log, written under the Manager's lock) holds every call exactly once, in an
  order whose generations never go back, ending at the store's generation; its outcomes match the responses;
- a serial replay of the log, in that order, by a fresh Manager on a fresh (fake) tree and pool gives each call
  the same outcome and the same end state (disks, VMs, attachments and their NSIDs, volume sizes, snapshots);
- the kernel tree equals what the store says, field by field: each VM's subsystem, allowed host, namespaces with
  their device paths and enable, the one port's links, the hosts; nothing more.
"""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends import pools
from nvmetd.changelog import ChangeLog
from nvmetd.manager import Manager
from nvmetd.vms import SUBSYSTEM_PREFIX, Vm
from target.configfs import ConfigFS
from target.live import read_state
from target.store import StateStore
from tests import api_fuzz

VMS = [f"vm{i}" for i in range(4)]
DISKS = [f"c{i}" for i in range(6)]
CLIENTS = 8
OPS = ["attach"] * 3 + ["detach"] * 2 + ["create"] * 2 + ["delete", "resize", "snapshot"]
METHODS = {"create": "create_disk", "delete": "delete_disk", "resize": "resize_disk", "snapshot": "snapshot_disk",
           "clone": "clone_disk", "attach": "attach", "detach": "detach"}


def vm_uuid(vm: str) -> str:
    """Fixed per VM name, so the replay's VMs have the same host and subsystem NQNs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"nvmetd-contention/{vm}"))


@dataclass
class Call:
    client: int
    op: str
    method: str
    path: str
    body: dict[str, Any] | None
    status: int = 0


def plan(calls: int, seed: int = 20261201) -> list[list[Call]]:
    """Each client's calls, all aimed at the same few names so they contend."""
    out = []
    for c in range(CLIENTS):
        rng = random.Random(seed + c)
        mine = []
        for i in range(calls // CLIENTS + (c < calls % CLIENTS)):
            op, vm, disk = rng.choice(OPS), rng.choice(VMS), rng.choice(DISKS)
            if op == "attach":
                mine.append(Call(c, op, "PUT", f"/v1/vms/{vm}/disks/{disk}",
                                 {"transport": "tcp", "vm_uuid": vm_uuid(vm)}))
            elif op == "detach":
                mine.append(Call(c, op, "DELETE", f"/v1/vms/{vm}/disks/{disk}", None))
            elif op == "create":
                mine.append(Call(c, op, "POST", "/v1/disks", {"name": disk, "pool": "files", "size": "4M"}))
            elif op == "delete":
                mine.append(Call(c, op, "DELETE", f"/v1/disks/{disk}", None))
            elif op == "resize":
                mine.append(Call(c, op, "POST", f"/v1/disks/{disk}/resize",
                                 {"size": rng.choice(["8M", "12M", "16M"])}))
            else:
                mine.append(Call(c, op, "POST", f"/v1/disks/{disk}/snapshots", {"snapshot": f"s{c}x{i}"}))
        out.append(mine)
    return out


def drive(socket: Path, plans: list[list[Call]]) -> list[Call]:
    """Every client on its own connection and thread, all started together."""
    start = threading.Barrier(len(plans))
    failures: list[BaseException] = []

    def client(calls: list[Call]) -> None:
        try:
            with api_fuzz.uds_client(socket) as http:
                start.wait()
                for call in calls:
                    call.status = http.request(call.method, call.path, json=call.body, timeout=600).status_code
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return [c for p in plans for c in p]


def check_log(entries: list[dict[str, Any]], calls: list[Call], generation: int) -> list[str]:
    problems = []
    if len(entries) != len(calls):
        problems.append(f"{len(entries)} change-log entries for {len(calls)} calls")
    gens = [e["generation"] for e in entries]
    if gens != sorted(gens):
        problems.append("change-log generations go back: the log order is not the order of effects")
    if gens and gens[-1] != generation:
        problems.append(f"the last logged generation {gens[-1]} is not the store's {generation}")
    for op in METHODS:
        ok_calls = sum(1 for c in calls if c.op == op and c.status == 200)
        ok_logged = sum(1 for e in entries if e["op"] == op and "error" not in e)
        if ok_calls != ok_logged:
            problems.append(f"{op}: {ok_calls} answered 200, {ok_logged} logged as done")
    return problems


def replay_manager(base: Path) -> Manager:
    """A fresh Manager on a fake configfs tree and a fresh file pool: the serial reference."""
    from tests.unit.fakes import FakeFS, FakeKernel

    FakeKernel(base / "nvmet")
    pools.create_pool("file", "files", devices=[str(base / "files")], root=base / "pools")
    return Manager(StateStore(base / "state.json"), FakeFS(root=base / "nvmet"), pools_root=base / "pools",
                   keys_dir=base / "keys", host_connect=False)


def replay(entries: list[dict[str, Any]], manager: Manager) -> list[str]:
    """Each logged call again, one at a time, in log order: its outcome must be the logged one."""
    problems = []
    for i, e in enumerate(entries):
        try:
            getattr(manager, METHODS[e["op"]])(*e["args"], **e["kwargs"])
            got = None
        except Exception as exc:
            got = type(exc).__name__
        if got != e.get("error"):
            problems.append(f"call {i} ({e['op']} {e['args'][:2]}): serially {got or 'ok'}, concurrently "
                            f"{e.get('error') or 'ok'}")
    return problems


def end_state(store: StateStore, pools_root: Path) -> dict[str, Any]:
    """What the calls decide: disks, VMs and attachments (NSIDs too), volume sizes and snapshots; not the keys."""
    doc = store.load()
    pool = pools.open_pool("files", pools_root)
    vols = {}
    for name in sorted(pool.volumes()):
        info = pool.info(name)
        vols[name] = {"bytes": info.logical_bytes, "snapshots": sorted(info.snapshots)}
    vms = {name: {"uuid": v["uuid"], "attachments": v.get("attachments", {})}
           for name, v in sorted(doc.get("vms", {}).items())}
    return {"disks": doc.get("disks", {}), "vms": vms, "volumes": vols}


def kernel_vs_store(store: StateStore, cfs: ConfigFS, pools_root: Path) -> list[str]:
    """The nvmet tree read back, field by field, against what the store says the VMs have."""
    doc = store.load()
    live = read_state(cfs)
    pool = pools.open_pool("files", pools_root)
    problems = []
    want_subs = set()
    for name, raw in sorted(doc.get("vms", {}).items()):
        vm = Vm.model_validate(raw)
        if not vm.attachments:
            continue
        want_subs.add(vm.subnqn)
        sub = live.subsystem(vm.subnqn)
        if sub is None:
            problems.append(f"{name}: no subsystem {vm.subnqn}")
            continue
        if sub.allowed_hosts != [vm.hostnqn] or sub.allow_any_host:
            problems.append(f"{name}: allowed hosts {sub.allowed_hosts} any={sub.allow_any_host}")
        if live.host(vm.hostnqn) is None:
            problems.append(f"{name}: no host {vm.hostnqn}")
        want = {a.nsid: (pool.info(disk).device_path, True) for disk, a in vm.attachments.items()}
        got = {ns.nsid: (ns.device_path, ns.enable) for ns in sub.namespaces}
        if got != want:
            problems.append(f"{name}: namespaces {got} != {want}")
    have_subs = {s.nqn for s in live.subsystems if s.nqn.startswith(SUBSYSTEM_PREFIX)}
    if have_subs != want_subs:
        problems.append(f"VM subsystems in the kernel {sorted(have_subs)} != in the store {sorted(want_subs)}")
    tcp = [p for p in live.ports if p.trtype == "tcp"]
    linked = {s for p in tcp for s in p.subsystems}
    if (len(tcp) != (1 if want_subs else 0)) or linked != want_subs:
        problems.append(f"tcp ports {[(p.id, p.subsystems) for p in tcp]} != one port linking {sorted(want_subs)}")
    return problems


def run(socket: Path, store: StateStore, change_log: Path, cfs: ConfigFS, pools_root: Path, replay_base: Path,
        calls: int) -> dict[str, Any]:
    """The whole check; returns figures to print. Raises AssertionError with every problem found."""
    log_before = len(ChangeLog(change_log).read())
    done = drive(socket, plan(calls))
    entries = ChangeLog(change_log).read()[log_before:]
    problems = check_log(entries, done, store.load()["generation"])
    reference = replay_manager(replay_base)
    problems += replay(entries, reference)
    mine, theirs = end_state(store, pools_root), end_state(reference.store, replay_base / "pools")
    if mine != theirs:
        problems.append(f"end state differs from the serial replay:\n concurrent {mine}\n serial     {theirs}")
    problems += kernel_vs_store(store, cfs, pools_root)
    assert not problems, "\n".join(problems[:20])
    ok = sum(1 for c in done if c.status == 200)
    return {"calls": len(done), "ok": ok, "refused": len(done) - ok,
            "attached_at_end": sum(len(v["attachments"]) for v in mine["vms"].values()),
            "disks_at_end": len(mine["disks"])}
