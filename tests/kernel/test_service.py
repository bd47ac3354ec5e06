"""nvmetd + nvmetctl on the real kernel: two VMs kept apart, parallel attach/detach, kill -9 at random points."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from backends import pools
from nvmetd.vms import SUBSYSTEM_PREFIX
from target.configfs import ConfigFS
from target.live import read_state
from tests.kernel import hostside
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel


@pytest.fixture
def daemon(cfs: ConfigFS, scratch: Path):
    d = Daemon(scratch)
    (scratch / "nvmetd.toml").write_text("")
    pools.create_pool("file", "files", devices=[str(scratch / "files")], root=d.pools_root)
    d.start()
    yield d
    d.stop()
    for vm in (cfs.listdir("subsystems")):
        hostside.disconnect(vm)


def test_two_vms_see_only_their_own_disks(daemon: Daemon, cfs: ConfigFS) -> None:
    pools.create_pool("nullblk", "ram", root=daemon.pools_root, capacity=1 << 30)
    daemon.ctl("disk", "create", "a-root", "--pool", "files", "--size", "64M")
    daemon.ctl("disk", "create", "b-root", "--pool", "ram", "--size", "64M")
    daemon.ctl("disk", "create", "a-data", "--pool", "files", "--size", "32M")
    a = daemon.ctl_json("attach", "vm-a", "a-root", "--transport", "tcp")
    b = daemon.ctl_json("attach", "vm-b", "b-root", "--transport", "loop")
    assert a["transport"] == "tcp" and a["traddr"] == "127.0.0.1" and a["host_nqn"] != b["host_nqn"]
    assert b["device"] and b["device"].startswith("/dev/nvme") and "-blockdev" in b["qemu_args"]
    key_a = Path(a["dhchap_key_file"])
    assert key_a.stat().st_mode & 0o777 == 0o600
    # repeating an attach is safe and answers the same
    assert daemon.ctl_json("attach", "vm-a", "a-root", "--transport", "tcp")["nsid"] == a["nsid"]

    # vm-b's host side got its loop namespace; data goes through
    hostside.write_read_verify(Path(b["device"]), size=1 << 20, seed=11)

    # vm-b's identity cannot reach vm-a's subsystem, even with its own valid key
    key_b = Path(b["dhchap_key_file"]).read_text()
    refused = hostside.connect("tcp", a["subsystem_nqn"], b["host_nqn"], "127.0.0.1", "4420",
                               dhchap_secret=key_b, check=False)
    assert refused.returncode != 0
    # vm-a connects with its key and sees exactly its one namespace; a second disk appears on the same controller
    hostside.connect("tcp", a["subsystem_nqn"], a["host_nqn"], "127.0.0.1", "4420", dhchap_secret=key_a.read_text())
    try:
        ctrls = hostside.controllers(a["subsystem_nqn"], "tcp")
        assert len(ctrls) == 1
        hostside.namespace_device(a["subsystem_nqn"], a["nsid"], "tcp")
        data = daemon.ctl_json("attach", "vm-a", "a-data", "--transport", "tcp")
        hostside.namespace_device(a["subsystem_nqn"], data["nsid"], "tcp", timeout=30)
        assert hostside.controllers(a["subsystem_nqn"], "tcp") == ctrls
    finally:
        hostside.disconnect(a["subsystem_nqn"])

    live = read_state(cfs)
    sub_a = live.subsystem(a["subsystem_nqn"])
    assert sub_a.allow_any_host is False and sub_a.allowed_hosts == [a["host_nqn"]]
    assert sorted(n.nsid for n in sub_a.namespaces) == [1, 2]

    # detach is safe to repeat; a disk in use cannot be deleted
    assert daemon.ctl("disk", "delete", "b-root", check=False).returncode == 2
    daemon.ctl("detach", "vm-b", "b-root")
    daemon.ctl("detach", "vm-b", "b-root")
    daemon.ctl("disk", "delete", "b-root")
    assert read_state(cfs).subsystem(b["subsystem_nqn"]) is None


def test_user_errors_are_one_line_with_exit_codes(daemon: Daemon) -> None:
    bad = daemon.ctl("disk", "create", "../etc", "--pool", "files", "--size", "1M", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "disk name" in bad.stderr
    missing = daemon.ctl("attach", "vm-a", "nope", check=False)
    assert missing.returncode == 2 and "no disk named 'nope'" in missing.stderr
    nopool = daemon.ctl("disk", "create", "x", "--pool", "nopool", "--size", "1M", check=False)
    assert nopool.returncode == 2 and "nopool" in nopool.stderr


def _expected_after(ops: list[tuple[str, str, str]]) -> dict[str, set[str]]:
    final: dict[str, set[str]] = {}
    for op, vm, disk in ops:
        (final.setdefault(vm, set()).add if op == "attach" else final.setdefault(vm, set()).discard)(disk)
    return final


def test_parallel_attach_detach_matches_serial(daemon: Daemon, cfs: ConfigFS) -> None:
    disks = [f"d{i}" for i in range(10)]
    for disk in disks:
        daemon.ctl("disk", "create", disk, "--pool", "files", "--size", "4M")
    rng = random.Random(20261122)
    # each disk belongs to one VM; each client works on its own disks, in its own order
    owner = {disk: f"vm{i % 4}" for i, disk in enumerate(disks)}
    clients = [[(rng.choice(["attach", "detach"]), owner[d], d) for d in rng.choices(disks[c::4], k=50)]
               for c in range(4)]
    errors: list[str] = []

    def run(ops: list[tuple[str, str, str]]) -> None:
        for op, vm, disk in ops:
            resp = (daemon.request("PUT", f"/v1/vms/{vm}/disks/{disk}", {"transport": "tcp"}) if op == "attach"
                    else daemon.request("DELETE", f"/v1/vms/{vm}/disks/{disk}"))
            if resp.status_code != 200 and not (op == "detach" and resp.status_code == 400):
                errors.append(f"{op} {vm} {disk}: {resp.status_code} {resp.text}")

    threads = [threading.Thread(target=run, args=(ops,)) for ops in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert sum(len(c) for c in clients) == 200
    expected = {vm: disks for vm, disks in _expected_after([op for c in clients for op in c]).items() if disks}
    vms = {v["name"]: set(v["disks"]) for v in daemon.request("GET", "/v1/vms").json() if v["disks"]}
    assert vms == expected
    live = read_state(cfs)
    nsids = {s.nqn: len(s.namespaces) for s in live.subsystems if s.nqn.startswith(SUBSYSTEM_PREFIX)}
    assert sorted(nsids.values()) == sorted(len(d) for d in expected.values())


def test_kill9_at_random_points_converges(daemon: Daemon, cfs: ConfigFS) -> None:
    rng = random.Random(4242)
    disks = [f"k{i}" for i in range(12)]
    kills, points = 0, []
    while kills < 50:
        # a burst of changes in the background: creates, attaches, detaches, deletes
        def burst(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(6):
                disk, vm = r.choice(disks), f"vm{r.randrange(3)}"
                op = r.choice(["create", "attach", "attach", "detach", "delete"])
                try:
                    if op == "create":
                        daemon.request("POST", "/v1/disks", {"name": disk, "pool": "files", "size": "2M"}, timeout=30)
                    elif op == "attach":
                        daemon.request("PUT", f"/v1/vms/{vm}/disks/{disk}", {"transport": "tcp"}, timeout=30)
                    elif op == "detach":
                        daemon.request("DELETE", f"/v1/vms/{vm}/disks/{disk}", timeout=30)
                    else:
                        daemon.request("DELETE", f"/v1/disks/{disk}", timeout=30)
                except Exception:
                    return  # the daemon died under us: that is the point
        worker = threading.Thread(target=burst, args=(rng.randrange(1 << 30),))
        worker.start()
        delay = rng.uniform(0.0, 1.5)
        points.append(round(delay, 3))
        time.sleep(delay)
        daemon.kill9()
        kills += 1
        worker.join()
        daemon.start()
    # after the last restart the service has finished/rolled back its journal and reconciled
    time.sleep(1)
    assert daemon.request("POST", "/v1/reconcile").json()["converged"]
    state = daemon.request("GET", "/v1/status").json()
    doc = __import__("json").loads(daemon.state.read_text())
    stored_disks = set(doc.get("disks", {}))
    assert all(e.get("state", "ready") == "ready" for e in doc["disks"].values())
    volumes = set(pools.open_pool("files", daemon.pools_root).volumes())
    assert volumes == stored_disks, f"orphan volumes {volumes - stored_disks}, lost {stored_disks - volumes}"
    expected_subs = {f"{SUBSYSTEM_PREFIX}{v['uuid']}" for v in doc.get("vms", {}).values() if v["attachments"]}
    live = {s.nqn for s in read_state(cfs).subsystems}
    assert live == expected_subs, f"orphans {live - expected_subs}, missing {expected_subs - live}"
    files = {p.name for p in (daemon.base / "files").iterdir() if p.is_file()}
    print(f"kill -9 points (s after a burst started): {points}; final disks {len(stored_disks)}, "
          f"subsystems {len(live)}, pool files {len(files)}, generation {state['generation']}")
    subprocess.run(["true"], check=True)
