"""Per-disk I/O limits on the kernel target (nvme-loop), through nvmetd: measured with fio on the real 6.12 kernel.

Limits are chosen well below the disk's solo rate measured in the same run (TCG is slow and the host is shared),
so the throttle, not the machine, sets the pace and the +-15% bound means something.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from backends import pools
from nvmetd import throttle
from target.configfs import ConfigFS
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel


@pytest.fixture
def daemon(cfs: ConfigFS, scratch: Path):
    d = Daemon(scratch)
    (scratch / "nvmetd.toml").write_text("")
    pools.create_pool("file", "files", devices=[str(scratch / "files")], root=d.pools_root)
    d.start(deadline=900)  # a FastAPI start-up under TCG on a loaded 2-core host
    yield d
    d.stop()
    subprocess.run(["nvme", "disconnect-all"], check=False, capture_output=True)


def fio(device: str, rw: str, bs: str, runtime: int = 5) -> float:
    """IOPS (4k jobs) or MB/s (others) of one direct-I/O job after a 2 s ramp."""
    proc = subprocess.run(["fio", "--name=j", f"--filename={device}", f"--rw={rw}", f"--bs={bs}", "--iodepth=8",
                           "--ioengine=libaio", "--direct=1", "--time_based", "--ramp_time=2",
                           f"--runtime={runtime}", "--size=48M", "--output-format=json"],
                          capture_output=True, text=True, check=True)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / 1e6


def within(measured: float, limit: float, tolerance: float) -> bool:
    return abs(measured - limit) <= tolerance * limit


def test_limits_on_a_running_disk(daemon: Daemon, cfs: ConfigFS) -> None:
    for disk in ("lim", "free"):
        daemon.ctl("disk", "create", disk, "--pool", "files", "--size", "64M")
    lim = daemon.ctl_json("attach", "vm-q", "lim", "--transport", "loop")["device"]
    free = daemon.ctl_json("attach", "vm-q", "free", "--transport", "loop")["device"]
    solo = fio(lim, "randread", "4k")

    # a first limit: the namespace moves onto the disk's throttled device; the host keeps its controller
    riops = max(40, int(solo * 0.25))
    info = daemon.ctl_json("disk", "limits", "lim", "--riops", str(riops))
    assert info["limits"] == {"riops": riops}
    mapper = f"/dev/mapper/{throttle.dm_name('lim')}"
    assert cfs.read(f"subsystems/{daemon.ctl_json('vm', 'show', 'vm-q')['subsystem_nqn']}/namespaces/1",
                    "device_path") == mapper
    got = fio(lim, "randread", "4k")
    assert within(got, riops, 0.15), (got, riops, solo)

    # the unlimited neighbour on the same backing filesystem keeps its solo rate while the limited one is hammered
    free_solo = fio(free, "randread", "4k")
    hammer = subprocess.Popen(["fio", "--name=h", f"--filename={lim}", "--rw=randread", "--bs=4k", "--iodepth=32",
                               "--ioengine=libaio", "--direct=1", "--time_based", "--runtime=12", "--size=48M"],
                              stdout=subprocess.DEVNULL)
    try:
        beside = fio(free, "randread", "4k")
    finally:
        hammer.wait()
    assert within(beside, free_solo, 0.20), (beside, free_solo)

    # raised on the running disk, no reconnect (same device node)
    daemon.ctl("disk", "limits", "lim", "--riops", str(riops * 2))
    got = fio(lim, "randread", "4k")
    assert within(got, riops * 2, 0.15), (got, riops * 2)

    # each kind of limit: write IOPS, read and write MB/s
    wiops = max(40, riops)
    daemon.ctl("disk", "limits", "lim", "--riops", "0", "--wiops", str(wiops), "--rmbps", "4", "--wmbps", "3")
    got = fio(lim, "randwrite", "4k")
    assert within(got, wiops, 0.15), (got, wiops)
    got = fio(lim, "read", "128k")
    assert within(got, 4, 0.15), got
    got = fio(lim, "write", "128k")
    assert within(got, 3, 0.15), got

    # limits survive an nvmetd restart: in the state, and re-applied to the kernel from it
    daemon.stop()
    (throttle.BLKIO_MOUNT / "blkio.throttle.write_iops_device").write_text(f"{throttle.majmin(mapper)} 0\n")
    daemon.start(deadline=900)
    assert daemon.ctl_json("disk", "show", "lim")["limits"] == {"wiops": wiops, "rmbps": 4, "wmbps": 3}
    assert throttle.current(mapper)["blkio.throttle.write_iops_device"] == wiops

    # removed: back to the unthrottled rate
    daemon.ctl("disk", "limits", "lim", "--wiops", "0", "--rmbps", "0", "--wmbps", "0")
    assert daemon.ctl_json("disk", "show", "lim")["limits"] == {}
    got = fio(lim, "randread", "4k")
    assert got > riops * 2.5, (got, riops)

    # bad input: 4xx naming the field, exit 2
    for body, field in (({"riops": -1}, "riops"), ({"wmbps": "lots"}, "wmbps"), ({"rmbps": 10**12}, "rmbps"),
                        ({"iops": 5}, "iops")):
        resp = daemon.request("PUT", "/v1/disks/lim/limits", body)
        assert resp.status_code == 422 and field in resp.json()["error"], (body, resp.text)
    resp = daemon.request("PUT", "/v1/disks/nope/limits", {"riops": 5})
    assert resp.status_code == 400 and "nope" in resp.json()["error"]
    for args in (["--riops", "-5"], ["--wiops", "ten"]):
        proc = daemon.ctl("disk", "limits", "lim", *args, check=False)
        assert proc.returncode == 2 and args[0] in proc.stderr, proc.stderr
    assert daemon.ctl("disk", "limits", "nope", "--riops", "5", check=False).returncode == 2

    # detach releases the throttled device
    daemon.ctl("detach", "vm-q", "lim")
    assert not Path(mapper).exists()
