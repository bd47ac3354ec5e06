"""Names typed into nvmetctl, judged by what they did to a live nvmetd (shared by the host and the kernel test).

The bug class this guards against lived in the client: names went into URL paths unencoded, so `victim#x`,
`victim?force=1` or `nothere/../victim` reached the API as `victim` and deleted it. The API's own fuzzing cannot see
that. So these tests run nvmetctl's real entry point (`nvmetd.cli.main`, in-process for speed) with generated
names against a real nvmetd on its Unix socket, and compare the whole world (state file, kernel tree as read back,
volumes, key files) before and after: a name is refused (exit 2, one line) and nothing changed, or the command
succeeded on exactly the object of that name and nothing else changed.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import strategies as st

from backends import pools
from nvmetd.cli import main as nvmetctl
from target import validate
from target.configfs import ConfigFS
from target.live import read_state
from target.store import read_document
from tests import api_fuzz

N = "\0NAME\0"  # the placeholder a generated name replaces in a command template
# Objects every example starts with (World.ensure): the names the tricks below aim at.
DISKS = ("victim", "vd1", "free")
ATTACHED = {"vma": "victim", "vmb": "vd1"}  # names no other fuzzer uses
SNAPSHOT = "s0"  # of victim, for clone


@dataclass(frozen=True)
class Command:
    """A command template: `argv` with N where the name goes; `disks`/`vms` say which argument is a disk or a VM
    name (so which object a success may change); `check` proves a success acted on that object."""

    argv: tuple[str, ...]
    kind: str  # "disk": N names a disk; "vm": N names a VM; "snapshot": N names a snapshot of victim
    fixed_disks: tuple[str, ...] = ()  # other objects the command names literally (they may change too)
    fixed_vms: tuple[str, ...] = ()


COMMANDS = [
    Command(("disk", "delete", "--", N), "disk"),
    Command(("disk", "show", "--", N), "disk"),
    Command(("disk", "resize", "--size", "8M", "--", N), "disk"),
    Command(("disk", "snapshot", "--", N, "s1"), "disk"),
    Command(("disk", "snapshot", "--", "victim", N), "snapshot", fixed_disks=("victim",)),
    Command(("disk", "clone", "--", "victim", SNAPSHOT, N), "disk", fixed_disks=("victim",)),
    Command(("disk", "snapshot-delete", "--", N, "s1"), "disk"),
    Command(("disk", "snapshot-delete", "--", "victim", N), "snapshot", fixed_disks=("victim",)),
    Command(("disk", "create", "--pool", "files", "--size", "4M", "--", N), "disk"),
    Command(("attach", "--transport", "tcp", "--", "vmb", N), "disk", fixed_vms=("vmb",)),
    Command(("attach", "--transport", "tcp", "--", N, "free"), "vm", fixed_disks=("free",)),
    Command(("detach", "--", "vma", N), "disk", fixed_vms=("vma",)),
    Command(("detach", "--", N, "victim"), "vm", fixed_disks=("victim",)),
    Command(("vm", "show", "--", N), "vm"),
]

URL_SYNTAX = ["#", "?", "%", "/", ";", "&", "=", "+", "%2F", "%2f", "%2e%2e", "%00", "?force=1", "#x", "/..", "\\"]


@st.composite
def cli_names(draw: st.DrawFn) -> str:
    """Names aimed at the objects that exist: URL syntax after or around them, dot segments that resolve to them,
    NUL, control and unicode characters, 300 characters; plus free text and valid fresh names (which may act)."""
    target = draw(st.sampled_from([*DISKS, *ATTACHED, SNAPSHOT]))
    kind = draw(st.sampled_from(["url", "dots", "evil", "long", "text", "fresh", "exact"]))
    if kind == "url":
        piece = draw(st.sampled_from(URL_SYNTAX))
        tail = draw(st.text(string.ascii_letters + "=&#?/.", max_size=6))
        return draw(st.sampled_from([target + piece + tail, piece + target, target + piece]))
    if kind == "dots":
        return draw(st.sampled_from(["..", ".", f"nothere/../{target}", f"../../../disks/{target}", f"./{target}",
                                     f"{target}/.", f"vmb/disks/{target}#", f"%2e%2e/{target}", f"{target}/..",
                                     f"../{target}", "...", f"{target}/../{target}"]))
    if kind == "evil":
        return draw(api_fuzz.invalid_names())
    if kind == "long":
        return target + draw(st.sampled_from("a.-_%#")) * (300 - len(target))
    if kind == "text":
        return draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=300))
    if kind == "exact":
        return target  # the object itself: must act on exactly it
    return draw(st.from_regex(r"\Az[a-z0-9][a-z0-9._-]{0,20}\Z").filter(lambda t: ".." not in t))


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_cli(socket: Path, state: Path, argv: list[str]) -> Outcome:
    """nvmetctl's own entry point (argument parsing, error mapping, exit codes), in this process."""
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        code = nvmetctl(["--socket", str(socket), "--state", str(state), "--json", *argv])
    return Outcome(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"))


@dataclass
class Snapshot:
    store: dict[str, Any]
    tree: dict[str, Any]
    volumes: dict[str, Any]
    keys: list[str]


def snapshot(state: Path, cfs: ConfigFS, pools_root: Path, keys_dir: Path) -> Snapshot:
    doc = read_document(state) or {}
    doc.pop("generation", None)
    volumes: dict[str, Any] = {}
    for pool_name in pools.list_pools(pools_root):
        pool = pools.open_pool(pool_name, pools_root)
        for vol in pool.volumes():
            info = pool.info(vol).to_dict()
            for noisy in ("allocated_bytes", "compression_ratio"):
                info.pop(noisy, None)
            volumes[f"{pool_name}/{vol}"] = info
    keys = sorted(p.name for p in keys_dir.iterdir()) if keys_dir.is_dir() else []
    return Snapshot(doc, read_state(cfs).canonical().model_dump(mode="json"), volumes, keys)


def _vm_nqns(store: dict[str, Any], vms: set[str]) -> set[str]:
    out = set()
    for name in vms:
        vm = store.get("vms", {}).get(name)
        if vm:
            out |= {f"nqn.2026-11.io.nvmetd:vm:{vm['uuid']}", f"nqn.2014-08.org.nvmexpress:uuid:{vm['uuid']}"}
    return out


def without(snap: Snapshot, disks: set[str], vms: set[str], nqns: set[str]) -> dict[str, Any]:
    """The world minus the objects a command was allowed to change."""
    store = json.loads(json.dumps(snap.store))
    for d in disks:
        store.get("disks", {}).pop(d, None)
    for v in vms:
        store.get("vms", {}).pop(v, None)
    tree = json.loads(json.dumps(snap.tree))
    tree["hosts"] = [h for h in tree.get("hosts", []) if h["nqn"] not in nqns]
    tree["subsystems"] = [s for s in tree.get("subsystems", []) if s["nqn"] not in nqns]
    ports = []
    for port in tree.get("ports", []):
        port["subsystems"] = [s for s in port.get("subsystems", []) if s not in nqns]
        if port["subsystems"]:
            ports.append(port)
    tree["ports"] = ports
    volumes = {k: v for k, v in snap.volumes.items() if k.split("/", 1)[1] not in disks}
    keys = [k for k in snap.keys if k.removesuffix(".dhchap") not in vms]
    return {"store": store, "tree": tree, "volumes": volumes, "keys": keys}


def whole(snap: Snapshot) -> dict[str, Any]:
    return {"store": snap.store, "tree": snap.tree, "volumes": snap.volumes, "keys": snap.keys}


def _valid(name: str) -> bool:
    try:
        validate.safe_name(name, "name")
    except ValueError:
        return False
    return True


def acted_on(cmd: Command, name: str, before: Snapshot, after: Snapshot, data: Any) -> str | None:
    """For a command that succeeded: why it did not act on the object named `name` (None if it did)."""
    verb = " ".join(a for a in cmd.argv if not a.startswith("-") and a != N)
    disks_before, disks_after = before.store.get("disks", {}), after.store.get("disks", {})
    vms_after = after.store.get("vms", {})
    checks: dict[str, Callable[[], bool]] = {
        "disk delete": lambda: name in disks_before and name not in disks_after,
        "disk show": lambda: data.get("name") == name,
        "disk resize 8M": lambda: after.volumes[f"files/{name}"]["logical_bytes"] == 8 << 20,
        "disk snapshot s1": lambda: "s1" in after.volumes[f"files/{name}"]["snapshots"],
        "disk snapshot victim": lambda: name in after.volumes["files/victim"]["snapshots"],
        "disk snapshot-delete s1": lambda: "s1" in before.volumes[f"files/{name}"]["snapshots"]
        and "s1" not in after.volumes[f"files/{name}"]["snapshots"],
        "disk snapshot-delete victim": lambda: name in before.volumes["files/victim"]["snapshots"]
        and name not in after.volumes["files/victim"]["snapshots"],
        "disk clone victim s0": lambda: name in disks_after and f"files/{name}" in after.volumes,
        "disk create files 4M": lambda: disks_after.get(name, {}).get("state", "ready") == "ready",
        "attach tcp vmb": lambda: name in vms_after.get("vmb", {}).get("attachments", {}) and data["disk"] == name,
        "attach tcp free": lambda: "free" in vms_after.get(name, {}).get("attachments", {}) and data["vm"] == name,
        "detach vma": lambda: name not in vms_after.get("vma", {}).get("attachments", {}) and data["disk"] == name,
        "detach victim": lambda: data["vm"] == name and "victim" not in vms_after.get(name, {}).get("attachments", {}),
        "vm show": lambda: data.get("name") == name,
    }
    ok = checks[verb]()
    return None if ok else f"`{verb}` exited 0 for {name!r} but did not act on that object"


def judge(cmd: Command, name: str, outcome: Outcome, before: Snapshot, after: Snapshot) -> str | None:
    """None when the outcome is one of the two allowed ones; otherwise what went wrong."""
    argv = [name if a == N else a for a in cmd.argv]
    if outcome.code == 2:
        lines = outcome.stderr.strip("\n").split("\n")
        if len(lines) != 1 or not lines[0].startswith("nvmetctl: error: "):
            return f"{argv!r}: refusal is not one line: {outcome.stderr!r}"
        if whole(before) != whole(after):
            return f"{argv!r}: refused, yet the world changed"
        return None
    if outcome.code != 0:
        return f"{argv!r}: exit {outcome.code} (want 0 or 2): {outcome.stderr!r}"
    if not _valid(name):
        return f"{argv!r}: an invalid name was accepted: {outcome.stdout!r}"
    disks = set(cmd.fixed_disks) | ({name} if cmd.kind == "disk" else set())
    vms = set(cmd.fixed_vms) | ({name} if cmd.kind == "vm" else set())
    nqns = _vm_nqns(before.store, vms) | _vm_nqns(after.store, vms)
    if without(before, disks, vms, nqns) != without(after, disks, vms, nqns):
        return f"{argv!r}: exit 0, and an object it does not name changed"
    try:
        data = json.loads(outcome.stdout)
    except json.JSONDecodeError:
        return f"{argv!r}: --json output is not JSON: {outcome.stdout!r}"
    return acted_on(cmd, name, before, after, data)


def ensure(socket: Path) -> None:
    """Put back what an earlier example was allowed to change: the disks, victim's snapshot, the two
    attachments, and `free` unattached. Through the API, not the CLI under test; only what is missing (each
    attach is a reconcile, slow under TCG)."""
    with api_fuzz.uds_client(socket) as client:
        vms = {vm["name"]: vm["disks"] for vm in client.get("/v1/vms").json()}
        for vm, disks in vms.items():
            if "free" in disks:
                assert client.delete(f"/v1/vms/{vm}/disks/free").status_code == 200
        disks = {d["name"]: d for d in client.get("/v1/disks").json()}
        for disk in DISKS:
            if disk not in disks:
                resp = client.post("/v1/disks", json={"name": disk, "pool": "files", "size": "4M"})
                assert resp.status_code == 200, resp.text
        for vm, disk in ATTACHED.items():
            if disk not in vms.get(vm, {}):
                resp = client.put(f"/v1/vms/{vm}/disks/{disk}", json={"transport": "tcp"})
                assert resp.status_code == 200, resp.text
        if SNAPSHOT not in disks.get("victim", {}).get("snapshots", []):
            assert client.post("/v1/disks/victim/snapshots", json={"snapshot": SNAPSHOT}).status_code == 200
