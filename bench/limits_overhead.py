"""Benchmark (figures, not a test): what the kernel-target limit mechanism costs a disk that has no limit.

Two null_blk devices of the same shape, one namespace each on one nvme-loop subsystem: `direct` opens its device
as nvmetd does for a disk without limits; `throttled-path` opens it through the per-disk dm-linear device that
nvmetd/throttle.py gives a disk with limits, with the cgroup v1 blkio hierarchy mounted and a limit of 0 (none)
written for it, i.e. the mechanism in place but not limiting. fio 4k randread QD32 and 128k read alternate between
the two round by round; per job the median, and the ratio throttled-path / direct (target: <= 1.05x in CPU per
I/O and >= 0.95x in IOPS).

    python -m rig -- .venv/bin/python -m bench.limits_overhead [--runtime 10] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from backends import nullblk
from bench.tls import JOBS, fio_read
from nvmetd import throttle
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import Namespace, Port, Subsystem, TargetState

SUB = "nqn.2026-11.io.nvmetd:bench-limits"
NULL_KEYS = ("benchlim0", "benchlim1")


def _null_device(key: str) -> str:
    """A null_blk device of our own through its configfs (whatever another benchmark loaded the module with)."""
    nullblk.load_module()
    item = nullblk.NULLB / key
    item.mkdir()
    (item / "size").write_text("4096")  # MiB
    (item / "queue_mode").write_text("2")
    (item / "power").write_text("1")
    subprocess.run(["udevadm", "settle", "--timeout", "10"], check=False)
    named = Path("/dev", key)
    return str(named) if named.exists() else f"/dev/nullb{(item / 'index').read_text().strip()}"


def _device(nsid: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ctrl in Path("/sys/class/nvme").glob("nvme*"):
            if (ctrl / "subsysnqn").read_text().strip() != SUB:
                continue
            for ns in ctrl.glob(f"{ctrl.name}n*"):
                if int((ns / "nsid").read_text()) == nsid and Path("/dev", ns.name).exists():
                    return f"/dev/{ns.name}"
        time.sleep(0.2)
    raise SystemExit(f"bench.limits_overhead: namespace {nsid} did not appear")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    subprocess.run(["modprobe", "-a", "nvmet", "nvme-loop", "dm-mod"], check=True)
    direct, behind = (_null_device(key) for key in NULL_KEYS)
    mapper = throttle.device_for("bench-unlimited", behind)
    throttle.apply(mapper, throttle.Limits())  # mechanism in place, no limit
    cfs = ConfigFS()
    state = TargetState(
        subsystems=[Subsystem(nqn=SUB, allow_any_host=True, namespaces=[
            Namespace(nsid=1, device_path=direct), Namespace(nsid=2, device_path=mapper)])],
        ports=[Port(id=9, trtype="loop", subsystems=[SUB])])
    try:
        apply_state(state, cfs)
        subprocess.run(["nvme", "connect", "-t", "loop", "-n", SUB], check=True, capture_output=True)
        devices = {"direct": _device(1), "throttled-path": _device(2)}
        figures = {}
        for job, fio_args in JOBS.items():
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in devices}
            for _ in range(args.rounds):
                for kind, device in devices.items():
                    runs[kind].append(fio_read(device, fio_args, args.runtime))
            figures[job] = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
    finally:
        subprocess.run(["nvme", "disconnect", "-n", SUB], check=False, capture_output=True)
        apply_state(TargetState(), cfs)
        throttle.release("bench-unlimited")
        for key in NULL_KEYS:
            (nullblk.NULLB / key / "power").write_text("0")
            (nullblk.NULLB / key).rmdir()
    ratios = {job: {k: f["throttled-path"][k] / f["direct"][k] if f["direct"][k] else None
                    for k in ("iops", "mbps", "cpu_us_per_io")} for job, f in figures.items()}
    if args.json:
        print(json.dumps({"jobs": figures, "ratios_throttled_over_direct": ratios}, indent=2))
        return 0
    print(f"unlimited disk: dm-linear + blk-throttle in place vs direct, null_blk, nvme-loop, {args.rounds} rounds "
          f"of {args.runtime}s (medians)")
    print(f"{'job':18} {'path':15} {'IOPS':>10} {'MB/s':>9} {'CPU us/IO':>10}")
    for job, f in figures.items():
        for kind, v in f.items():
            print(f"{job:18} {kind:15} {v['iops']:10.0f} {v['mbps']:9.1f} {v['cpu_us_per_io']:10.1f}")
        r = ratios[job]
        print(f"{job:18} {'ratio':15} {r['iops']:10.3f} {r['mbps']:9.3f} {r['cpu_us_per_io']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
