"""Benchmark (figures, not a test): what the kernel-target limit mechanism costs a disk that has no limit.

nvmetd/throttle.py limits a block-device disk on its own device, so a disk without a limit is either one never
limited or one whose limits were removed (its rules deleted, the cgroup v1 blkio hierarchy still mounted). Paths,
each a namespace of one nvme-loop subsystem, fio 4k randread QD32 and 128k read alternating between them round by
round in a shuffled order; per job the medians, and per-round ratios to `direct`:

- `direct`: a null_blk device nvmet opens, never limited (the baseline), and `direct-2`, a second one never
  limited: the A/A control, what two identical paths differ by in this run (the noise floor);
- `removed`: a second null_blk device of the same shape that had limits, removed (what an unlimited disk pays:
  target <= 1.05x in CPU per I/O, >= 0.95x in IOPS);
- `unreached`: the same device with a limit in place far above its rate (blk-throttle's accounting; context);
- `file` and `file-removed` (context): a file on tmpfs that nvmet opens, and the same file's loop device (direct
  I/O) that a file disk keeps while attached after its limits are removed; the ratio is file-removed / file.

    python -m rig -- .venv/bin/python -m bench.limits_overhead [--runtime 6] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
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
NULL_KEYS = ("benchlim0", "benchlim1", "benchlim2")
FILE = Path("/run/nvmetd-bench-limits.img")
UNREACHED = throttle.Limits(riops=throttle.MAX_IOPS, rmbps=throttle.MAX_MBPS)
# path -> (namespace id, baseline it is compared with)
PATHS = {"direct": (1, "direct"), "direct-2": (5, "direct"), "removed": (2, "direct"), "unreached": (2, "direct"),
         "file": (3, "file"), "file-removed": (4, "file")}


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


def _file() -> str:
    """Written through, so every read is of data (a hole reads faster)."""
    subprocess.run(["dd", "if=/dev/urandom", f"of={FILE}", "bs=1M", "count=256", "status=none"], check=True)
    return str(FILE)


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


def _measure(hosts: dict[int, str], limited: str, rounds: int, runtime: int) -> dict[str, list[dict[str, dict]]]:
    """job -> one {path: fio figures} per round; the paths in a shuffled order each round (seeded), so a drift
    of the shared machine's load falls on every path alike."""
    order = random.Random(7)  # noqa: S311 - an order of runs, not a secret
    figures: dict[str, list[dict[str, dict]]] = {}
    for job, fio_args in JOBS.items():
        figures[job] = []
        for _ in range(rounds):
            paths = list(PATHS)
            order.shuffle(paths)
            one: dict[str, dict] = {}
            for path in paths:
                if path == "unreached":
                    throttle.apply(limited, UNREACHED)
                try:
                    one[path] = fio_read(hosts[PATHS[path][0]], fio_args, runtime)
                finally:
                    throttle.apply(limited, throttle.Limits())  # removed again: no rule for the device
            figures[job].append(one)
    return figures


def _summary(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per path: the median of each figure, and of each round's ratio to its baseline in that same round (paired:
    robust to a load that changes between rounds), with the range of those ratios."""
    out: dict[str, dict] = {}
    for path, (_, base) in PATHS.items():
        entry: dict = {k: statistics.median(r[path][k] for r in rounds) for k in ("iops", "mbps", "cpu_us_per_io")}
        if path != base:
            for k in ("iops", "cpu_us_per_io"):
                ratios = sorted(r[path][k] / r[base][k] for r in rounds if r[base][k])
                entry[f"{k}_ratio"] = statistics.median(ratios) if ratios else None
                entry[f"{k}_ratio_range"] = [ratios[0], ratios[-1]] if ratios else None
        out[path] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    subprocess.run(["modprobe", "-a", "nvmet", "nvme-loop"], check=True)
    direct, limited, direct_2 = (_null_device(key) for key in NULL_KEYS)
    file = _file()
    throttle.apply(limited, throttle.Limits(riops=1000, wmbps=10))  # limited once ...
    throttle.apply(limited, throttle.Limits())  # ... then removed
    loop = throttle.served_device(file, limited=True, loops={})
    cfs = ConfigFS()
    state = TargetState(
        subsystems=[Subsystem(nqn=SUB, allow_any_host=True, namespaces=[
            Namespace(nsid=1, device_path=direct), Namespace(nsid=2, device_path=limited),
            Namespace(nsid=3, device_path=file), Namespace(nsid=4, device_path=loop),
            Namespace(nsid=5, device_path=direct_2)])],
        ports=[Port(id=9, trtype="loop", subsystems=[SUB])])
    try:
        apply_state(state, cfs)
        subprocess.run(["nvme", "connect", "-t", "loop", "-n", SUB], check=True, capture_output=True)
        figures = _measure({nsid: _device(nsid) for nsid in (1, 2, 3, 4, 5)}, limited, args.rounds, args.runtime)
    finally:
        subprocess.run(["nvme", "disconnect", "-n", SUB], check=False, capture_output=True)
        apply_state(TargetState(), cfs)
        throttle.release(file)
        FILE.unlink(missing_ok=True)
        for key in NULL_KEYS:
            (nullblk.NULLB / key / "power").write_text("0")
            (nullblk.NULLB / key).rmdir()
    summary = {job: _summary(rounds) for job, rounds in figures.items()}
    if args.json:
        print(json.dumps({"rounds": figures, "summary": summary}, indent=2))
        return 0
    print(f"disks without a limit: after removal vs never limited, null_blk and a tmpfs file, nvme-loop, "
          f"{args.rounds} rounds of {args.runtime}s, shuffled (medians; ratios paired per round, to `direct`, "
          f"file-removed to `file`, [range])")
    print(f"{'job':18} {'path':13} {'IOPS':>9} {'MB/s':>8} {'CPU us/IO':>9}  {'IOPS x':>20}  {'CPU/IO x':>20}")
    for job, paths in summary.items():
        for path, v in paths.items():
            extra = "".join(f"  {v[k + '_ratio']:6.3f} [{v[k + '_ratio_range'][0]:.2f}-{v[k + '_ratio_range'][1]:.2f}]"
                            for k in ("iops", "cpu_us_per_io") if v.get(k + "_ratio"))
            print(f"{job:18} {path:13} {v['iops']:9.0f} {v['mbps']:8.1f} {v['cpu_us_per_io']:9.1f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
