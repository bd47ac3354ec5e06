"""`python -m vhost_nvme.bench`: engine + guest driver vs fio on the same tmpfs file; prints ratios.

Not a test: it measures and reports.  The engine runs as its own process (one data-plane thread) and the
guest submits from C and reaps by polling its CQ (like a Linux poll queue), so neither Python nor the
guest loop is what gets measured.
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
from dataclasses import dataclass
from pathlib import Path

from ._guest_c import ffi, lib
from .guest import GuestDriver

FILE_BYTES = 256 << 20
NULL_BYTES = 1 << 30
BS = 4096


@dataclass
class Result:
    iops: float
    p50_us: float
    p99_us: float
    traps: int = 0
    ios: int = 0


def fio(path: str, engine: str, qd: int, seconds: float) -> Result:
    argv = ["fio", "--name=vn", f"--filename={path}", "--rw=randread", f"--bs={BS}", f"--ioengine={engine}",
            f"--iodepth={qd}", f"--runtime={seconds}", "--time_based", "--output-format=json",
            "--randrepeat=0", "--norandommap"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return Result(job["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000)


def fill(path: str) -> None:
    """Real pages, not holes, so both sides copy data out of the page cache."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(FILE_BYTES >> 20):
            f.write(chunk)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EngineProcess:
    def __init__(self, sock: str, image: str) -> None:
        argv = [sys.executable, "-m", "vhost_nvme.engine", "--socket", sock, "--ns", image,
                "--ns", f"null:{NULL_BYTES}", "--poll-us", "2000", "--policy", "auto"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.probe = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("probe"):
                self.probe += line.strip()
            if line.startswith("ready"):
                return
        raise RuntimeError("engine exited before it was ready")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_guest(g: GuestDriver, qid: int, nsid: int, nblocks: int, lba_shift: int, qd: int,
              seconds: float) -> Result:
    q = g.queues[qid]
    bufs = ffi.new("uint64_t[]", [g.mem.alloc(BS) for _ in range(qd)])
    cap = 400_000
    lat = ffi.new("uint32_t[]", cap)
    b = ffi.new("struct vg_bench *")
    b.q, b.nsid, b.lba_shift, b.nblocks, b.qd, b.opc, b.bs = q.vq, nsid, lba_shift, nblocks, qd, 0x02, BS
    b.buf_gpa, b.seed, b.duration_s, b.lat_ns, b.lat_cap = bufs, 0x12345678 + qd, seconds, lat, cap
    traps0 = q.vq.traps
    if lib.vg_bench_run(b) < 0:
        raise RuntimeError("benchmark loop refused its parameters")
    if b.errors or b.bad_cqes:
        raise RuntimeError(f"engine returned {b.errors} errors and {b.bad_cqes} bad completions")
    samples = sorted(lat[0:b.lat_n])
    p50, p99 = samples[len(samples) // 2], samples[len(samples) * 99 // 100]
    return Result(b.ios / b.elapsed_s, p50 / 1000, p99 / 1000, q.vq.traps - traps0, b.ios)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vhost_nvme.bench", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="tmpfs directory for the test file")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        print("error: fio is not installed", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="vn-bench-", dir=args.dir)
    image = os.path.join(work, "ns1.img")
    sock = os.path.join(work, "engine.sock")
    try:
        fill(image)
        load = os.getloadavg()[0]
        print(f"4k randread on {image} ({FILE_BYTES >> 20} MiB, tmpfs), {args.seconds:.0f} s per point, "
              f"{os.cpu_count()} CPUs, load average {load:.2f} at start")
        print("each engine point is paired with fio psync and io_uring runs taken right before it, so that")
        print("load from other processes on this machine hits both sides of a ratio alike")
        eng = EngineProcess(sock, image)
        print(f"  engine {eng.probe}")
        g = GuestDriver(sock, layout=[(0x1000_0000, 64 << 20)])
        res: dict[tuple[str, int, bool], Result] = {}
        ref: dict[tuple[int, bool], tuple[str, Result, Result]] = {}
        cpu: dict[bool, float] = {}
        try:
            g.enable()
            g.create_io_queue(1, 256, ien=False)
            for shadow in (False, True):
                if shadow:
                    cqe = g.enable_dbbuf()
                    if cqe.status:
                        raise RuntimeError(f"Doorbell Buffer Config failed: {cqe.status:#x}")
                for qd in (1, 32):
                    ps = fio(image, "psync", 1, args.seconds)  # a sync engine runs at depth 1 anyway
                    ur = fio(image, "io_uring", qd, args.seconds)
                    best = ("psync", ps) if ps.iops >= ur.iops else ("io_uring", ur)
                    ref[(qd, shadow)] = (best[0], best[1], ps)
                    res[("file", qd, shadow)] = run_guest(g, 1, 1, FILE_BYTES // 512, 9, qd, args.seconds)
                    print(f"  QD{qd:<3d} fio psync {ps.iops / 1e3:7.1f}K (p50 {ps.p50_us:.1f} us)  "
                          f"fio io_uring {ur.iops / 1e3:7.1f}K")
                c0, t0 = cpu_seconds(eng.proc.pid), time.monotonic()
                res[("null", 32, shadow)] = run_guest(g, 1, 2, NULL_BYTES // BS, 12, 32, args.seconds)
                cpu[shadow] = (cpu_seconds(eng.proc.pid) - c0) / (time.monotonic() - t0)
        finally:
            g.close()
            eng.close()
        print()
        print("engine + guest driver (guest polls its CQ; one engine data-plane thread):")
        for (kind, qd, shadow), r in sorted(res.items()):
            print(f"  {kind:4s} QD{qd:<3d} shadow-db={'on ' if shadow else 'off'} {r.iops / 1e3:8.1f}K IOPS  "
                  f"p50 {r.p50_us:6.1f} us  p99 {r.p99_us:6.1f} us  doorbell traps {r.traps} "
                  f"({r.traps / max(r.ios, 1):.3f}/IO)")
        print()
        print("ratios vs best fio engine at the same depth (target >= 0.80):")
        for qd in (1, 32):
            for shadow in (False, True):
                best_name, best, _ = ref[(qd, shadow)]
                r = res[("file", qd, shadow)]
                print(f"  QD{qd:<3d} shadow-db={'on ' if shadow else 'off'} {r.iops / best.iops:5.2f}  "
                      f"(best fio: {best_name} {best.iops / 1e3:.1f}K)")
        for shadow in (False, True):
            base = ref[(1, shadow)][2]
            r = res[("file", 1, shadow)]
            print(f"latency added at QD1 vs fio psync, shadow-db={'on ' if shadow else 'off'}: "
                  f"p50 {r.p50_us - base.p50_us:+.1f} us  p99 {r.p99_us - base.p99_us:+.1f} us")
        for shadow in (False, True):
            r = res[("null", 32, shadow)]
            cores = max(cpu[shadow], 1e-9)
            label = "on " if shadow else "off"
            print(f"null namespace QD32 shadow-db={label}: {r.iops / 1e3:.1f}K IOPS with "
                  f"engine using {cores:.2f} cores -> {r.iops / cores / 1e6:.2f}M IOPS per engine core "
                  f"(target >= 1.0M)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
