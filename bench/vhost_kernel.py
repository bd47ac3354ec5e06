"""`python -m bench.vhost_kernel`: the in-kernel vhost-nvme transport against the paths it replaces, in the rig.

One null_blk device under all four sides, measured in interleaved rounds of the same jobs:
- raw: fio (io_uring, O_DIRECT) on the device itself: the baseline;
- loop: nvmet exports it over nvme-loop and fio runs on the host block device (QEMU's block layer path);
- engine: the userspace vhost-nvme engine serves it, the tests' C guest loop drives the engine;
- kernel: `/dev/vhost-nvme` (kernel_patches/), nvmet serves it, the same C guest loop drives it.
The guest loop submits from C and reaps by polling its CQ (a Linux poll queue): it is the VM's vCPU. The engine's
data-plane thread and the kernel's vhost worker get CPU 0, the submitting side (guest loop or fio's job) CPU 1.
CPU per I/O is the whole system's busy time (/proc/stat, every kernel thread and softirq included) over the I/Os.
Then 1, 4 and 16 idle VMs bound per back-end: the memory and CPU each VM adds.

Not a test: it prints figures and ratios to the raw device (and kernel vs engine). Under TCG absolute numbers are
context only; the sides share the same emulated CPUs and device, so the ratios are what the run measures.
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

from bench.report import Metric, Report, Sample
from bench.vhost_engine import EngineProcess
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import TargetState, parse_state
from vhost_nvme.guest import GuestDriver
from vhost_nvme.kernel import KernelChannel

HOST = "nqn.2014-08.org.nvmexpress:uuid:6b0f9a3e-8c2d-4e1f-9a7b-5c3d2e1f0a9b"
SUB = "nqn.2026-12.io.nvmetd:bench-vhost-kernel"
WORKER_CPU, GUEST_CPU = 0, 1
JOBS = (("randread-4k-qd1", 4096, 1, False), ("randread-4k-qd32", 4096, 32, False),
        ("read-128k-qd32", 128 << 10, 32, True))
SIDES = ("raw", "loop", "engine", "kernel")
METRICS = [Metric("iops", "IOPS", True), Metric("p50_us", "p50 us", False), Metric("p99_us", "p99 us", False),
           Metric("cpu_us_per_io", "CPU us/IO", False)]


@dataclass
class Result:
    iops: float
    p50_us: float
    p99_us: float
    cpu_us_per_io: float


def busy_seconds() -> float:
    """The whole machine's non-idle CPU time (user, system, irq, softirq, steal), all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def fio(dev: str, bs: int, qd: int, seq: bool, seconds: float) -> Result:
    argv = ["fio", "--name=b", f"--filename={dev}", f"--rw={'read' if seq else 'randread'}", f"--bs={bs}",
            "--ioengine=io_uring", "--direct=1", f"--iodepth={qd}", f"--runtime={seconds}", "--time_based",
            "--output-format=json", "--randrepeat=0", "--norandommap", f"--cpus_allowed={GUEST_CPU}"]
    b0 = busy_seconds()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    busy = busy_seconds() - b0
    rd = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    pct = rd["clat_ns"]["percentile"]
    return Result(rd["iops"], pct["50.000000"] / 1e3, pct["99.000000"] / 1e3, busy / max(rd["total_ios"], 1) * 1e6)


class Guest:
    """One VM: the C guest loop on a back-end, with per-command buffers (and PRP lists for 128 KiB)."""

    def __init__(self, g: GuestDriver, nblocks: int) -> None:
        self.g = g
        self.nblocks = nblocks
        g.enable()
        g.set_num_queues(1)
        g.create_io_queue(1, 256, ien=False)
        if g.enable_dbbuf().status:
            raise RuntimeError("Doorbell Buffer Config failed")
        self.bufs: dict[int, tuple[object, object]] = {}

    def buffers(self, bs: int, qd: int) -> tuple[object, object]:
        if bs not in self.bufs:
            first, second = [], []
            for _ in range(qd):
                gpa = self.g.mem.alloc(bs)
                first.append(gpa)
                second.append(self.g.prps(gpa, bs)[1])
            self.bufs[bs] = (ffi.new("uint64_t[]", first), ffi.new("uint64_t[]", second))
        return self.bufs[bs]

    def run(self, bs: int, qd: int, seq: bool, seconds: float) -> Result:
        q = self.g.queues[1]
        prp1, prp2 = self.buffers(bs, 32)
        cap = 1_000_000
        lat = ffi.new("uint32_t[]", cap)
        b = ffi.new("struct vg_bench *")
        b.q, b.nsid, b.lba_shift, b.nblocks, b.qd, b.opc, b.bs = q.vq, 1, 9, self.nblocks, qd, 0x02, bs
        b.buf_gpa, b.seed, b.duration_s, b.lat_ns, b.lat_cap = prp1, 0x9E3779B9 + qd, seconds, lat, cap
        b.flags = 1 if seq else 0
        if bs > 4096:
            b.prp2_gpa = prp2
        b0 = busy_seconds()
        if lib.vg_bench_run(b) < 0:
            raise RuntimeError("benchmark loop refused its parameters")
        busy = busy_seconds() - b0
        if b.errors or b.bad_cqes:
            raise RuntimeError(f"{b.errors} errors and {b.bad_cqes} bad completions")
        samples = sorted(lat[0:b.lat_n])
        return Result(b.ios / b.elapsed_s, samples[len(samples) // 2] / 1e3, samples[len(samples) * 99 // 100] / 1e3,
                      busy / max(b.ios, 1) * 1e6)


def pin_threads(pid: int, comm: str, cpu: int) -> int:
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if not comm or Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == comm:
            os.sched_setaffinity(int(tid), {cpu})
            n += 1
    return n


def kernel_guest(nblocks: int, layout: list[tuple[int, int]]) -> Guest:
    g = GuestDriver(channel=KernelChannel(), bind=(SUB, HOST), layout=layout, timeout=60)
    return Guest(g, nblocks)


def export(cfs: ConfigFS, dev: str) -> None:
    state = parse_state({
        "hosts": [{"nqn": HOST}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST], "namespaces": [{"nsid": 1, "device_path": dev}]}],
        "ports": [{"id": 61, "trtype": "vhost", "subsystems": [SUB]},
                  {"id": 62, "trtype": "loop", "subsystems": [SUB]}],
    })
    result = apply_state(state, cfs)
    if not result.converged:
        raise RuntimeError(f"export failed: {result.to_dict()}")


def loop_device() -> str:
    subprocess.run(["nvme", "connect", "-t", "loop", "-n", SUB, "-q", HOST], check=True, capture_output=True)
    for _ in range(100):
        for ctrl in Path("/sys/class/nvme").iterdir():
            if (ctrl / "subsysnqn").read_text().strip() == SUB:
                for ns in ctrl.glob("nvme*n1"):
                    return f"/dev/{ns.name}"
        time.sleep(0.1)
    raise RuntimeError("nvme-loop namespace did not appear")


def kernel_memory_kib() -> int:
    """Memory the kernel itself holds: slab, vmalloc, stacks, page tables, per-CPU areas."""
    info = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text()
                                                 .splitlines())}
    return sum(info.get(k, 0) for k in ("Slab", "VmallocUsed", "KernelStack", "PageTables", "Percpu"))


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def per_vm_section(dev: str, nblocks: int, work: str, idle_s: float) -> list[str]:
    """1, 4, 16 idle VMs per back-end: what each adds in memory and in CPU while idle."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a test guest holds ~70 fds (64 kick eventfds)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lines = ["idle VMs bound (each with its I/O queue and shadow doorbells; guest RAM excluded): added per VM"]
    print(lines[0], flush=True)
    layout = [(0x1000_0000, 8 << 20)]
    for n in (1, 4, 16):
        for side in ("kernel", "engine"):
            subprocess.run(["sync"], check=True)
            mem0, cpu0 = kernel_memory_kib(), 0.0
            engines: list[EngineProcess] = []
            guests: list[Guest] = []
            try:
                for i in range(n):
                    if side == "kernel":
                        guests.append(kernel_guest(nblocks, layout))
                    else:
                        sock = os.path.join(work, f"idle{i}.sock")
                        engines.append(EngineProcess(sock, dev, null_namespace=False))
                        guests.append(Guest(GuestDriver(sock, layout=layout, timeout=60), nblocks))
                time.sleep(1.0)
                mem = kernel_memory_kib() - mem0 + sum(pss_kib(e.proc.pid) for e in engines)
                cpu0 = busy_seconds()
                time.sleep(idle_s)
                cpu = (busy_seconds() - cpu0) / idle_s
                threads = sum(len(os.listdir(f"/proc/{e.proc.pid}/task")) for e in engines) if engines else n
                lines.append(f"  {side:6s} {n:2d} VMs: {mem / n / 1024:7.2f} MiB/VM  {cpu / n * 100:6.2f}% of a CPU "
                             f"per VM idle  ({threads} threads: {threads / n:.0f}/VM)")
                print(lines[-1], flush=True)
            finally:
                for g in guests:
                    g.g.close()
                for e in engines:
                    e.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vhost_kernel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="idle window of the per-VM section")
    ap.add_argument("--out", type=Path, default=Path("bench-out/vhost-kernel"), help="report directory")
    ap.add_argument("--only-vms", action="store_true", help="only the idle-VMs section (memory and CPU per VM)")
    args = ap.parse_args(argv)
    loaded = subprocess.run(["modprobe", "-a", "null_blk", "nvmet", "nvme-loop", "nvmet-vhost"], check=False)
    if shutil.which("fio") is None or loaded.returncode or not Path("/dev/vhost-nvme").exists():
        print("error: needs fio, nvmet and nvmet-vhost (kernel_patches/build.sh); run it in the rig: "
              "make bench-vhost-kernel", file=sys.stderr)
        return 2
    dev = "/dev/nullb0"
    nblocks = int(Path("/sys/block/nullb0/size").read_text())
    cfs = ConfigFS()
    work = tempfile.mkdtemp(prefix="bench-vk-")
    engine = None
    guests: dict[str, Guest] = {}
    loop_dev = ""
    try:
        export(cfs, dev)
        if args.only_vms:
            per_vm_section(dev, nblocks, work, args.idle_seconds)
            return 0
        loop_dev = loop_device()
        layout = [(0x1000_0000, 64 << 20)]
        guests["kernel"] = kernel_guest(nblocks, layout)
        engine = EngineProcess(os.path.join(work, "engine.sock"), dev, null_namespace=False)
        guests["engine"] = Guest(GuestDriver(os.path.join(work, "engine.sock"), layout=layout, timeout=60), nblocks)
        pinned = pin_threads(os.getpid(), "vhost-nvme", WORKER_CPU) + pin_threads(engine.proc.pid, "", WORKER_CPU)
        os.sched_setaffinity(0, {GUEST_CPU})
        load = os.getloadavg()[0]
        print(f"null_blk {dev} ({nblocks * 512 >> 20} MiB), {args.reps} rounds x {args.seconds:g} s per point, "
              f"{os.cpu_count()} CPUs, load {load:.2f}; kernel worker + engine ({pinned} threads) on CPU "
              f"{WORKER_CPU}, guest loop / fio on CPU {GUEST_CPU}; nvme-loop device {loop_dev}")
        got: dict[tuple[str, str], list[Result]] = {}
        for rnd in range(args.reps):
            for job, bs, qd, seq in JOBS:
                line = f"  round {rnd + 1} {job:17s}"
                for side in SIDES:
                    if side == "raw":
                        r = fio(dev, bs, qd, seq, args.seconds)
                    elif side == "loop":
                        r = fio(loop_dev, bs, qd, seq, args.seconds)
                    else:
                        r = guests[side].run(bs, qd, seq, args.seconds)
                    got.setdefault((job, side), []).append(r)
                    line += f" {side} {r.iops / 1e3:7.1f}K"
                print(line, flush=True)
        reports = []
        for job, _bs, _qd, _seq in JOBS:
            rep = Report(f"{job}: vhost-nvme in the kernel vs engine vs nvme-loop vs raw null_blk", "raw", METRICS,
                         params={"seconds": args.seconds, "reps": args.reps, "load": load})
            for side in SIDES:
                rs = got[(job, side)]
                rep.add(side, **{m.key: Sample.of(getattr(r, m.key) for r in rs) for m in METRICS})
            reports.append(rep)
            print()
            print(rep.markdown())
            rep.write(args.out / job, png=False)
        print()
        print("targets:")
        q32 = {side: Sample.of(r.iops for r in got[("randread-4k-qd32", side)]).median for side in SIDES}
        cpu32 = {side: Sample.of(r.cpu_us_per_io for r in got[("randread-4k-qd32", side)]).median for side in SIDES}
        print(f"  kernel IOPS at QD32 vs raw: {q32['kernel'] / q32['raw']:.2f}x (target >= 0.90)")
        print(f"  kernel CPU/IO at QD32 vs raw: {cpu32['kernel'] / cpu32['raw']:.2f}x (target <= 1.30)")
        eff = {s: q32[s] / (q32[s] * cpu32[s] / 1e6) for s in ("kernel", "engine")}  # IOPS per busy CPU
        print(f"  kernel vs engine, IOPS per CPU at QD32: {eff['kernel'] / eff['engine']:.2f}x (target >= 1.50)")
        guests["kernel"].g.close()
        guests["engine"].g.close()
        guests.clear()
        engine.close()
        engine = None
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        print()
        per_vm_section(dev, nblocks, work, args.idle_seconds)
    finally:
        for g in guests.values():
            g.g.close()
        if engine:
            engine.close()
        if loop_dev:
            subprocess.run(["nvme", "disconnect", "-n", SUB], check=False, capture_output=True)
        apply_state(TargetState(), cfs)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
