"""`python -m bench.backend_io`: what each backend costs on the path a guest sees, run inside the rig
(`python -m rig --memory 4G -- .venv/bin/python -m bench.backend_io`).

All pools are made in turn on the same loop device (a sparse file on tmpfs), and the raw loop device itself, served as a
namespace the same way, is the baseline: each figure is a ratio against it, so the transport and the emulated CPU
cancel out and what is left is the backend's own cost. fio runs through nvme-tcp on 127.0.0.1 (O_DIRECT, libaio):
4k random writes at QD32 and 128k sequential writes at QD8. Management latency is timed for create, snapshot and clone.
Under TCG the absolute numbers are only context; the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import BackendError, create_pool, destroy_pool
from backends.base import Backend
from bench.report import Metric, Report, Sample
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import TargetState, parse_state

HOST = "nqn.2014-08.org.nvmexpress:uuid:7b0e6a52-1c1d-4c55-9a0f-5d1c2b3a4e5f"
SUB = "nqn.2026-11.io.nvmetd:bench"
MIB = 1 << 20


@dataclass
class Row:
    name: str
    iops_4k: float = 0.0
    seq_128k: float = 0.0  # bytes/s
    latency_ms: dict[str, Sample] = field(default_factory=dict)
    note: str = ""


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


def serve(cfs: ConfigFS, device: str) -> str:
    state = parse_state({"hosts": [{"nqn": HOST}],
                         "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                                         "namespaces": [{"nsid": 1, "device_path": device}]}],
                         "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                                    "trsvcid": "4420", "subsystems": [SUB]}]})
    result = apply_state(state, cfs)
    if not result.converged:
        raise SystemExit(f"bench: cannot serve {device}: {result.to_dict()}")
    sh("nvme", "connect", "-t", "tcp", "-n", SUB, "-a", "127.0.0.1", "-s", "4420", "--hostnqn", HOST,
       "--hostid", HOST.rsplit(":", 1)[1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for ctrl in Path("/sys/class/nvme").glob("nvme*"):
            if (ctrl / "subsysnqn").read_text().strip() == SUB:
                for ns in ctrl.glob(f"{ctrl.name}*n1"):  # nvme_core.multipath=N: nvmeXnY per controller
                    if Path("/dev", ns.name).exists():
                        return f"/dev/{ns.name}"
        time.sleep(0.2)
    raise SystemExit("bench: the namespace did not appear after nvme connect")


def unserve(cfs: ConfigFS) -> None:
    subprocess.run(["nvme", "disconnect", "-n", SUB], check=False, capture_output=True)
    apply_state(TargetState(), cfs)


def fio(device: str, rw: str, bs: str, iodepth: int, runtime: int, size: int) -> dict[str, Any]:
    out = sh("fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio", f"--rw={rw}",
             f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", "--time_based", f"--runtime={runtime}",
             "--ramp_time=1", "--randrepeat=0", "--refill_buffers", "--output-format=json")
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]


def measure(cfs: ConfigFS, row: Row, device: str, runtime: int, size: int) -> None:
    dev = serve(cfs, device)
    try:
        row.iops_4k = fio(dev, "randwrite", "4k", 32, runtime, size)["iops"]
        row.seq_128k = fio(dev, "write", "128k", 8, runtime, size)["bw_bytes"]
    finally:
        unserve(cfs)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def management_latency(pool: Backend, row: Row, rounds: int, **opts: Any) -> None:
    creates, snaps, clones = [], [], []
    for i in range(rounds):
        creates.append(timed(lambda i=i: pool.create(f"lat{i}", "64M", **opts)))
        snaps.append(timed(lambda i=i: pool.snapshot(f"lat{i}", "s")))
        clones.append(timed(lambda i=i: pool.clone(f"lat{i}", "s", f"lat{i}c")))
    row.latency_ms = {"create": Sample.of(creates), "snapshot": Sample.of(snaps), "clone": Sample.of(clones)}
    for i in range(rounds):
        pool.delete(f"lat{i}c")
        pool.delete_snapshot(f"lat{i}", "s")
        pool.delete(f"lat{i}")


def run_backend(cfs: ConfigFS, row: Row, kind: str, loop: str, work: Path, args: argparse.Namespace,
                **opts: Any) -> None:
    devices: list[str] = [] if kind == "nullblk" else [loop]
    mnt = work / "mnt"
    if kind == "file":
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard", loop)
        mnt.mkdir(exist_ok=True)
        sh("mount", loop, str(mnt))
        devices = [str(mnt / "pool")]
    root = work / "state"
    pool_opts = {"capacity": 2 * args.size + 256 * MIB} if kind == "nullblk" else {}
    pool = create_pool(kind, f"b{kind}", devices, root=root, fill_threshold=100, **pool_opts)
    try:
        pool.create("vol", args.size, **opts)
        measure(cfs, row, pool.attach("vol"), args.runtime, args.size)
        pool.detach("vol")
        pool.delete("vol")
        if kind != "nullblk" or args.size <= 256 * MIB:
            management_latency(pool, row, args.rounds, **opts)
    finally:
        unserve(cfs)
        destroy_pool(pool.name, root=root, force=True)
        if kind == "file":
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["wipefs", "-a", "-q", loop], check=False, capture_output=True)


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("file (thin)", "file", {}),
    ("file + LUKS2", "file", {"encrypted": True}),
    ("lvm thin", "lvm", {}),
    ("lvm thin + LUKS2", "lvm", {"encrypted": True}),
    ("zfs zvol", "zfs", {}),
    ("zfs zvol lz4 + aes-256-gcm", "zfs", {"compression": "lz4", "encrypted": True}),
    ("null_blk (RAM, not on the loop)", "nullblk", {}),
]


METRICS = [Metric("iops_4k", "4k randwrite IOPS", True), Metric("seq_128k_MiBps", "128k seq write MiB/s", True),
           Metric("create_ms", "create ms", False), Metric("snapshot_ms", "snapshot ms", False),
           Metric("clone_ms", "clone ms", False)]


def as_report(rows: list[Row], raw: Row, args: argparse.Namespace) -> Report:
    report = Report("backends through nvme-tcp", raw.name, METRICS,
                    params={"runtime_s": args.runtime, "size": args.size, "rounds": args.rounds})
    for row in [raw, *rows]:
        report.add(row.name, iops_4k=row.iops_4k or None, seq_128k_MiBps=(row.seq_128k / MIB) or None,
                   **{f"{k}_ms": v for k, v in row.latency_ms.items()})
        if row.note:
            report.notes.append(f"{row.name}: {row.note}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backend_io", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run (after 1 s ramp)")
    parser.add_argument("--size", type=int, default=256 * MIB, help="volume size in bytes")
    parser.add_argument("--rounds", type=int, default=3, help="create/snapshot/clone repetitions (median)")
    parser.add_argument("--only", default="", help="comma-separated case-name substrings to run")
    parser.add_argument("--out", type=Path, help="write report.json, report.md and ratios.png into this directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run it as root inside the rig: python -m rig -- .venv/bin/python -m bench.backend_io",
              file=sys.stderr)
        return 2
    subprocess.run(["modprobe", "-a", "nvmet", "nvmet-tcp", "nvme-tcp", "loop", "dm-thin-pool", "dm-crypt"],
                   check=False, capture_output=True)
    cfs = ConfigFS()
    base = Path("/run") if os.environ.get("NVMETD_IN_RIG") else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="nvmetd-bench-", dir=base))
    backing = work / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(args.size * 3)
    loop = sh("losetup", "--find", "--show", str(backing)).strip()
    rows: list[Row] = []
    try:
        raw = Row("raw loop device (baseline)")
        measure(cfs, raw, loop, args.runtime, args.size)
        print(f"baseline done: {raw.iops_4k:.0f} IOPS, {raw.seq_128k / MIB:.1f} MiB/s", flush=True)
        for label, kind, opts in CASES:
            if args.only and not any(s in label for s in args.only.split(",")):
                continue
            row = Row(label)
            try:
                run_backend(cfs, row, kind, loop, work, args, **opts)
            except (BackendError, subprocess.CalledProcessError) as exc:
                row.note = f"FAILED: {exc}"
            rows.append(row)
            print(f"{label} done", flush=True)
    finally:
        unserve(cfs)
        subprocess.run(["losetup", "--detach", loop], check=False)
        shutil.rmtree(work, ignore_errors=True)
    report = as_report(rows, raw, args)
    print(report.markdown())
    if args.out:
        print("wrote " + ", ".join(str(p) for p in report.write(args.out, png=False)) +
              f" (plot it on the host: python -m bench.report {args.out}/report.json)")
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
