"""`python -m bench.vhost_engine`: engine + guest driver vs fio on the same tmpfs file; prints ratios.

Not a test: it measures and reports.  The engine runs as its own process (one data-plane thread) and the
guest submits from C and reaps by polling its CQ (like a Linux poll queue), so neither Python nor the
guest loop is what gets measured.

On a small shared machine one sample of each side says little (fio psync alone swings by half between
runs), so every depth is measured in --reps rounds, and each round runs fio psync, fio io_uring and the
engine with and without shadow doorbells back to back: load from elsewhere hits all four alike.  The
report gives median and spread (min..max) per side and the ratio of the medians.
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

from vhost_nvme._guest_c import ffi, lib

from bench.report import Sample
from vhost_nvme import protocol as p
from vhost_nvme.guest import GuestDriver
from vhost_nvme.guest.driver import sqe

FILE_BYTES = 256 << 20
NULL_BYTES = 1 << 30
BS = 4096
ENGINE_CPU = 0  # the engine's data-plane thread: a core of its own, like a vhost worker
GUEST_CPU = 1  # the submitting side: the guest's vCPU, or fio's one job thread


@dataclass
class Result:
    iops: float
    p50_us: float
    p99_us: float
    cpu_us_per_io: float  # all CPU the side burnt (fio: its job; engine: engine process + guest loop) per I/O
    traps: int = 0
    ios: int = 0
    engine_cores: float = 0.0  # engine process CPU seconds per second of the run


def fio(path: str, engine: str, qd: int, seconds: float, cpu: int | None) -> Result:
    argv = ["fio", "--name=vn", f"--filename={path}", "--rw=randread", f"--bs={BS}", f"--ioengine={engine}",
            f"--iodepth={qd}", f"--runtime={seconds}", "--time_based", "--output-format=json",
            "--randrepeat=0", "--norandommap"]
    if cpu is not None:
        argv.append(f"--cpus_allowed={cpu}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    rd = job["read"]
    pct = rd["clat_ns"]["percentile"]
    cpu_frac = (job["usr_cpu"] + job["sys_cpu"]) / 100.0
    return Result(rd["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000,
                  cpu_frac / max(rd["iops"], 1e-9) * 1e6, ios=rd["total_ios"])


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
    def __init__(self, sock: str, image: str, extra: list[str] | tuple[str, ...] = (),
                 null_namespace: bool = True) -> None:
        null = ["--ns", f"null:{NULL_BYTES}"] if null_namespace else []
        argv = [sys.executable, "-m", "vhost_nvme.engine", "--socket", sock, "--ns", image, *null,
                "--policy", "auto", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.probe = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("probe"):
                self.probe += line.strip()
            if line.startswith("ready"):
                return
        raise RuntimeError("engine exited before it was ready")

    def pin(self, cpu: int) -> None:
        """Every thread of the engine (the data plane among them) onto one core."""
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def engine_stats(g: GuestDriver) -> dict[str, int]:
    data = g.call_engine(p.Req.GET_STATS)
    names = ("cqes", "signals", "kicks", "sleeps", "polls", "invalid_doorbells", "poll_window_ns")
    vals = p.STATS.unpack_from(data) if len(data) >= p.STATS.size else p.STATS_V1.unpack_from(data)
    return dict(zip(names, vals, strict=False))


def run_guest(g: GuestDriver, eng: EngineProcess, qid: int, nsid: int, nblocks: int, lba_shift: int, qd: int,
              seconds: float) -> Result:
    q = g.queues[qid]
    bufs = ffi.new("uint64_t[]", [g.mem.alloc(BS) for _ in range(qd)])
    cap = 2_000_000
    lat = ffi.new("uint32_t[]", cap)
    b = ffi.new("struct vg_bench *")
    b.q, b.nsid, b.lba_shift, b.nblocks, b.qd, b.opc, b.bs = q.vq, nsid, lba_shift, nblocks, qd, 0x02, BS
    b.buf_gpa, b.seed, b.duration_s, b.lat_ns, b.lat_cap = bufs, 0x12345678 + qd, seconds, lat, cap
    traps0 = q.vq.traps
    c0, g0, t0 = cpu_seconds(eng.proc.pid), time.thread_time(), time.monotonic()
    if lib.vg_bench_run(b) < 0:
        raise RuntimeError("benchmark loop refused its parameters")
    eng_cpu = cpu_seconds(eng.proc.pid) - c0
    cpu = eng_cpu + time.thread_time() - g0
    wall = time.monotonic() - t0
    if b.errors or b.bad_cqes:
        raise RuntimeError(f"engine returned {b.errors} errors and {b.bad_cqes} bad completions")
    samples = sorted(lat[0:b.lat_n])
    p50, p99 = samples[len(samples) // 2], samples[len(samples) * 99 // 100]
    return Result(b.ios / b.elapsed_s, p50 / 1000, p99 / 1000, cpu / max(b.ios, 1) * 1e6,
                  q.vq.traps - traps0, b.ios, eng_cpu / wall)


def paced_traps(g: GuestDriver, gap_s: float, n: int) -> float:
    """Doorbell traps per command for a guest that leaves gap_s between commands (shadow doorbells on)."""
    buf = g.mem.alloc(BS)
    before = g.traps()
    for i in range(n):
        time.sleep(gap_s)
        g.run(1, sqe(0x02, nsid=1, prp1=buf, cdw10=(i * 8) % (FILE_BYTES // 512), cdw12=7))
    return (g.traps() - before) / n


def window_section(work: str, image: str, reps: int) -> None:
    """A slow guest (a TCG one, or one on a loaded host) submits every few hundred us: with the old fixed
    200 us window the engine was asleep each time and EventIdx made every command trap."""
    configs = (("fixed 200 us (the old default)", ["--poll-fixed", "--poll-us", "200"]),
               ("adaptive (default, cap 1000 us)", []))
    gaps = (0.0003, 0.0006)
    got: dict[tuple[int, float], list[float]] = {}
    wins: dict[int, int] = {}
    procs = []
    try:
        guests = []
        for i, (_, extra) in enumerate(configs):
            sock = os.path.join(work, f"paced{i}.sock")
            procs.append(EngineProcess(sock, image, extra))
            g = GuestDriver(sock, layout=[(0x1000_0000, 16 << 20)])
            guests.append(g)
            g.enable()
            g.create_io_queue(1, 64, ien=False)
            if g.enable_dbbuf().status:
                raise RuntimeError("Doorbell Buffer Config failed")
        for _ in range(reps):
            for gap in gaps:
                for i, g in enumerate(guests):
                    got.setdefault((i, gap), []).append(paced_traps(g, gap, 200))
        for i, g in enumerate(guests):
            wins[i] = engine_stats(g).get("poll_window_ns", 0)
            g.close()
    finally:
        for e in procs:
            e.close()
    print("paced QD1 reads with shadow doorbells (a slow guest): doorbell traps per command, median of "
          f"{reps} rounds x 200 commands")
    for i, (label, _) in enumerate(configs):
        cells = "  ".join(f"gap {gap * 1e6:.0f} us: {Sample.of(got[(i, gap)]).median:.3f}" for gap in gaps)
        print(f"  {label:32s} {cells}  (window at the end {wins[i] / 1e3:.0f} us)")


def med(rs: list[Result], attr: str = "iops") -> float:
    return Sample.of(getattr(r, attr) for r in rs).median


def spread(rs: list[Result]) -> str:
    return Sample.of(r.iops for r in rs).spread(scale=1e-3) + "K"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vhost_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds per depth (default 5)")
    ap.add_argument("--dir", default="/dev/shm", help="tmpfs directory for the test file")
    ap.add_argument("--no-pin", action="store_true",
                    help="let the scheduler place fio, engine and guest (default: engine on CPU 0, "
                         "guest loop and fio on CPU 1)")
    ap.add_argument("--poll-us", type=int, default=None, help="passed to the engine (default: its own)")
    ap.add_argument("--only-window", action="store_true", help="run only the paced (slow guest) section")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        print("error: fio is not installed", file=sys.stderr)
        return 2
    if args.reps < 1 or args.seconds <= 0:
        print("error: --reps and --seconds must be positive", file=sys.stderr)
        return 2
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and {ENGINE_CPU, GUEST_CPU} <= os.sched_getaffinity(0)
    fio_cpu = GUEST_CPU if pin else None
    work = tempfile.mkdtemp(prefix="vn-bench-", dir=args.dir)
    image = os.path.join(work, "ns1.img")
    extra = [] if args.poll_us is None else ["--poll-us", str(args.poll_us)]
    engines: dict[bool, EngineProcess] = {}
    guests: dict[bool, GuestDriver] = {}
    try:
        fill(image)
        if args.only_window:
            window_section(work, image, args.reps)
            return 0
        load = os.getloadavg()[0]
        print(f"4k randread on {image} ({FILE_BYTES >> 20} MiB, tmpfs), {args.reps} rounds x {args.seconds:g} s "
              f"per point, {os.cpu_count()} CPUs, load average {load:.2f} at start")
        if load > 0.5 * (os.cpu_count() or 1):
            print(f"WARNING: load average {load:.2f} on {os.cpu_count()} CPUs: other processes compete for the cores. "
                  "The engine needs two threads running at once (its poller and the guest) where fio needs one, so "
                  "a busy machine hurts the engine side more and its ratios understate it.")
        if pin:
            print(f"pinned: engine process on CPU {ENGINE_CPU}; guest loop and fio's job on CPU {GUEST_CPU} (the "
                  "submitting side gets the same core on both sides of a ratio; engine and guest never share one)")
        else:
            print("not pinned: the scheduler places fio, engine and guest")
        # one engine per doorbell mode, so that every round can run both back to back
        for shadow in (False, True):
            eng = EngineProcess(os.path.join(work, f"engine{int(shadow)}.sock"), image, extra)
            engines[shadow] = eng
            g = GuestDriver(os.path.join(work, f"engine{int(shadow)}.sock"), layout=[(0x1000_0000, 64 << 20)])
            guests[shadow] = g
            g.enable()
            g.create_io_queue(1, 256, ien=False)
            if shadow:
                cqe = g.enable_dbbuf()
                if cqe.status:
                    raise RuntimeError(f"Doorbell Buffer Config failed: {cqe.status:#x}")
            if pin:
                eng.pin(ENGINE_CPU)
        print(f"  engine {engines[False].probe}")
        if pin:
            os.sched_setaffinity(0, {GUEST_CPU})
        fio_res: dict[tuple[str, int], list[Result]] = {}
        res: dict[tuple[str, int, bool], list[Result]] = {}
        for qd in (1, 32):
            for rnd in range(args.reps):
                ps = fio(image, "psync", 1, args.seconds, fio_cpu)  # a sync engine runs at depth 1 anyway
                ur = fio(image, "io_uring", qd, args.seconds, fio_cpu)
                fio_res.setdefault(("psync", qd), []).append(ps)
                fio_res.setdefault(("io_uring", qd), []).append(ur)
                line = f"  QD{qd:<3d} round {rnd + 1}: psync {ps.iops / 1e3:6.1f}K io_uring {ur.iops / 1e3:6.1f}K"
                for shadow in (False, True):
                    r = run_guest(guests[shadow], engines[shadow], 1, 1, FILE_BYTES // 512, 9, qd, args.seconds)
                    res.setdefault(("file", qd, shadow), []).append(r)
                    line += f" engine/{'on' if shadow else 'off'} {r.iops / 1e3:6.1f}K"
                print(line, flush=True)
        for _ in range(args.reps):
            for shadow in (False, True):
                r = run_guest(guests[shadow], engines[shadow], 1, 2, NULL_BYTES // BS, 12, 32, args.seconds)
                res.setdefault(("null", 32, shadow), []).append(r)
        stats = {shadow: engine_stats(guests[shadow]) for shadow in (False, True)}
        print()
        print("fio (median IOPS [min..max] over rounds; p50/p99 and CPU per I/O are medians):")
        for (name, qd), rs in sorted(fio_res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"  {name:8s} QD{qd:<3d} {spread(rs)}  p50 {med(rs, 'p50_us'):5.2f} us  "
                  f"p99 {med(rs, 'p99_us'):6.2f} us  CPU {med(rs, 'cpu_us_per_io'):5.2f} us/IO")
        print("engine + guest driver (guest polls its CQ; one engine data-plane thread; CPU = engine + guest):")
        for (kind, qd, shadow), rs in sorted(res.items()):
            print(f"  {kind:4s} QD{qd:<3d} shadow-db={'on ' if shadow else 'off'} {spread(rs)}  "
                  f"p50 {med(rs, 'p50_us'):5.2f} us  p99 {med(rs, 'p99_us'):6.2f} us  "
                  f"CPU {med(rs, 'cpu_us_per_io'):5.2f} us/IO  doorbell traps "
                  f"{sum(r.traps for r in rs) / max(sum(r.ios for r in rs), 1):.4f}/IO")
        for shadow in (False, True):
            s = stats[shadow]
            window = f"{s['poll_window_ns'] / 1e3:.0f} us" if "poll_window_ns" in s else "n/a"
            print(f"  engine shadow-db={'on ' if shadow else 'off'}: sleeps {s['sleeps']} kicks {s['kicks']} "
                  f"poll window now {window}")
        print()
        print("ratio of medians vs the best fio engine at the same depth (target >= 0.80); "
              "in brackets: min..max of the per-round paired ratios")
        for qd in (1, 32):
            ps, ur = fio_res[("psync", qd)], fio_res[("io_uring", qd)]
            best_name, best = max((("psync", ps), ("io_uring", ur)), key=lambda kv: med(kv[1]))
            for shadow in (False, True):
                rs = res[("file", qd, shadow)]
                paired = [r.iops / max(a.iops, b.iops) for r, a, b in zip(rs, ps, ur, strict=True)]
                print(f"  QD{qd:<3d} shadow-db={'on ' if shadow else 'off'} {med(rs) / med(best):5.2f}  "
                      f"[{min(paired):.2f}..{max(paired):.2f}]  (best fio: {best_name} {med(best) / 1e3:.1f}K)")
        base = fio_res[("psync", 1)]
        for shadow in (False, True):
            rs = res[("file", 1, shadow)]
            print(f"latency added at QD1 vs fio psync (medians), shadow-db={'on ' if shadow else 'off'}: "
                  f"p50 {med(rs, 'p50_us') - med(base, 'p50_us'):+.2f} us  "
                  f"p99 {med(rs, 'p99_us') - med(base, 'p99_us'):+.2f} us")
        for shadow in (False, True):
            rs = res[("null", 32, shadow)]
            cores = Sample.of(r.engine_cores for r in rs).median
            per_core = Sample.of(r.iops / max(r.engine_cores, 1e-9) for r in rs).median
            print(f"null namespace QD32 shadow-db={'on ' if shadow else 'off'}: {spread(rs)} IOPS, engine "
                  f"using {cores:.2f} cores -> {per_core / 1e6:.2f}M IOPS per engine core (target >= 1.0M)")
        for g in guests.values():
            g.close()
        for eng in engines.values():
            eng.close()
        guests.clear()
        engines.clear()
        print()
        window_section(work, image, args.reps)
    finally:
        for g in guests.values():
            g.close()
        for eng in engines.values():
            eng.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
