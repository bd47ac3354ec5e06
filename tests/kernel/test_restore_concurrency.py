"""Boot-aware restore (late device, late address) and concurrent writers of the durable state."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from target.apply import apply_state
from target.configfs import ConfigFS
from target.live import read_state
from target.model import parse_state
from target.nvmetcli import export_config, import_config
from target.restore import SystemReadiness, restore
from target.store import StateStore

pytestmark = pytest.mark.kernel

SUB_READY = "nqn.2026-11.io.nvmetd:ready"
SUB_LATE = "nqn.2026-11.io.nvmetd:late-device"
SUB_NET = "nqn.2026-11.io.nvmetd:late-address"
LATE_ADDR = "192.0.2.77"  # TEST-NET-1 on a dummy interface inside the rig VM: never leaves it


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def dummy_link():
    run("ip", "link", "add", "nvmetd-late", "type", "dummy")
    run("ip", "link", "set", "nvmetd-late", "up")
    yield "nvmetd-late"
    subprocess.run(["ip", "link", "del", "nvmetd-late"], check=False)


def test_restore_waits_for_device_and_address(cfs: ConfigFS, scratch: Path, dummy_link: str) -> None:
    ready_img = scratch / "ready.img"
    ready_img.write_bytes(b"\0" * (8 << 20))
    late_img = scratch / "late.img"
    late_img.write_bytes(b"\0" * (8 << 20))
    state = parse_state({
        "subsystems": [
            {"nqn": SUB_READY, "allow_any_host": True, "namespaces": [{"nsid": 1, "device_path": str(ready_img)}]},
            {"nqn": SUB_LATE, "allow_any_host": True,
             "namespaces": [{"nsid": 1, "device_path": "/dev/mapper/nvmetd-late"}]},
            {"nqn": SUB_NET, "allow_any_host": True, "namespaces": [{"nsid": 1, "device_path": str(ready_img)}]},
        ],
        "ports": [
            {"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
             "subsystems": [SUB_READY, SUB_LATE]},
            {"id": 2, "trtype": "tcp", "adrfam": "ipv4", "traddr": LATE_ADDR, "trsvcid": "4420",
             "subsystems": [SUB_NET]},
        ],
    })
    loopdev = subprocess.run(["losetup", "-f", "--show", str(late_img)], check=True, capture_output=True,
                             text=True).stdout.strip()
    run("modprobe", "dm-mod")
    rounds: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def bring_up_later() -> None:
        try:
            time.sleep(2.0)
            sectors = (8 << 20) // 512
            run("dmsetup", "create", "nvmetd-late", "--table", f"0 {sectors} linear {loopdev} 0")
            time.sleep(1.0)
            run("ip", "addr", "add", f"{LATE_ADDR}/32", "dev", dummy_link)
        except BaseException as exc:  # surfaced by the main thread below
            errors.append(exc)

    first = apply_state(state, cfs, readiness=SystemReadiness())
    pending = first.by_status("pending")
    assert set(pending) == {f"subsystems/{SUB_LATE}/namespaces/1", f"ports/2/subsystems/{SUB_NET}"}
    assert "not present" in pending[f"subsystems/{SUB_LATE}/namespaces/1"].reason
    assert LATE_ADDR in pending[f"ports/2/subsystems/{SUB_NET}"].reason
    # what was ready is live already
    assert (Path(cfs.root) / f"ports/1/subsystems/{SUB_READY}").is_symlink()

    worker = threading.Thread(target=bring_up_later)
    worker.start()
    try:
        # generous: the bound only stops a hung restore; convergence below is what the late objects' arrival caused
        result = restore(state, cfs, timeout=600,
                         on_progress=lambda r: rounds.append({k: v.status for k, v in r.objects.items()}))
    finally:
        worker.join()
    assert not errors, errors
    try:
        assert result.converged, result.to_dict()
        # it waited: rounds ran while the late objects were pending, and it returned once both had appeared
        assert rounds and rounds[0][f"subsystems/{SUB_LATE}/namespaces/1"] == "pending", rounds[:1]
        assert Path("/dev/mapper/nvmetd-late").exists()
        # the converged objects were never rewritten while waiting: each round only touched what was pending
        for statuses in rounds:
            assert statuses[f"subsystems/{SUB_READY}/namespaces/1"] == "ok"
        enable = Path(cfs.root) / f"subsystems/{SUB_LATE}/namespaces/1/enable"
        assert enable.read_text().strip() == "1"
    finally:
        from tests.conftest import wipe

        wipe()
        subprocess.run(["dmsetup", "remove", "nvmetd-late"], check=False)
        subprocess.run(["losetup", "-d", loopdev], check=False)


WRITER = r"""
import sys
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import Subsystem, parse_state
from target.store import StateStore, set_target
store, name, rounds = StateStore(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfs = ConfigFS()
for i in range(rounds):
    with store.transaction() as doc:
        state = parse_state(doc["target"])
        state.subsystems.append(Subsystem(nqn=f"nqn.2026-11.io.nvmetd:{name}-{i}", allow_any_host=True))
        state = parse_state(state.model_dump())
        set_target(doc, state)
        result = apply_state(state, cfs)
        assert result.converged, result.to_dict()
"""


def test_two_writers_lose_nothing(cfs: ConfigFS, scratch: Path) -> None:
    path = scratch / "state.json"
    rounds = 100
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(rounds)])
             for name in ("alpha", "beta")]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    stored = StateStore(path).target()
    expected = {f"nqn.2026-11.io.nvmetd:{n}-{i}" for n in ("alpha", "beta") for i in range(rounds)}
    assert {s.nqn for s in stored.subsystems} == expected
    assert {s.nqn for s in read_state(cfs).subsystems} == expected
    assert StateStore(path).load()["generation"] == 2 * rounds
    assert path.stat().st_mode & 0o777 == 0o600


def test_nvmetcli_import_apply_export_round_trip(cfs: ConfigFS) -> None:
    fixture = Path(__file__).parent.parent / "fixtures/nvmetcli/full-6.12.json"
    import json

    config = json.loads(fixture.read_text())
    Path("/run/nvmetd-test").mkdir(exist_ok=True)
    Path("/run/nvmetd-test/disk-a-1.img").write_bytes(b"\0" * (4 << 20))
    state = import_config(config)
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
    # read back from the kernel, the export is the same document (firmware/serial included)
    exported = export_config(read_state(cfs))
    assert exported == config
