"""`python -m bench.vhost_guest`: 4 KiB random reads at QD1 inside a TCG guest, through vhost-user-nvme (the
vhost_nvme engine) and through QEMU's own emulated ``-device nvme``, on the same backing file; prints the
figures and the ratios.

Not a test: it measures and reports.  Both guests run the same kernel, initramfs and patched QEMU binary,
under TCG with one vCPU; the guest tool is ``randread`` (O_DIRECT pread, one I/O at a time, latency per I/O
from CLOCK_MONOTONIC).  The backing file is filled with data first, so both sides read the host's page cache.
Rounds alternate between the two devices, so a change in host load hits both.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.report import Metric, Report, Sample
from vhost_nvme.vm import VM, EngineProcess, qemu_binary

MiB = 1 << 20


@dataclass
class Run:
    iops: float
    p50_us: float
    p99_us: float
    ios: int


def parse(out: str) -> Run:
    m = re.search(r"RANDREAD ios=(\d+) seconds=[\d.]+ iops=([\d.]+) p50_us=(\d+) p99_us=(\d+)", out)
    if not m:
        raise RuntimeError(f"no randread result in guest output:\n{out}")
    return Run(float(m.group(2)), float(m.group(3)), float(m.group(4)), int(m.group(1)))


def fill(path: Path, size: int) -> None:
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)


def measure(vm: VM, seconds: float) -> Run:
    vm.check("randread /dev/nvme0n1 1 >/dev/null")  # warm-up: page cache, TLBs, the engine's poll loop
    return parse(vm.check(f"randread /dev/nvme0n1 {seconds}", timeout=seconds * 4 + 60))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vhost_guest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10, help="measurement per round and device (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per device (default 2)")
    ap.add_argument("--size-mib", type=int, default=256, help="backing file size (default 256)")
    ap.add_argument("--out", type=Path, help="write report.json, report.md and ratios.png into this directory")
    ap.add_argument("--dir", type=Path, default=None, help="where the backing file and logs go (default: a tmpdir)")
    args = ap.parse_args(argv)

    qemu = qemu_binary(build=True)
    with tempfile.TemporaryDirectory(prefix="vn-qemu-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "ns.img"
        fill(image, args.size_mib * MiB)
        sock = work / "engine.sock"
        engine = EngineProcess(sock, [image], name="bench")
        vhost: list[Run] = []
        emulated: list[Run] = []
        traps = cqes = 0
        try:
            with VM(work / "vhost", engine_sock=sock, qemu=qemu) as vm_v, \
                 VM(work / "emulated", emulated_image=image, qemu=qemu) as vm_e:
                for r in range(args.rounds):
                    before = engine.stats()
                    vhost.append(measure(vm_v, args.seconds))
                    after = engine.stats()
                    traps += after.kicks - before.kicks
                    cqes += after.cqes - before.cqes
                    emulated.append(measure(vm_e, args.seconds))
                    print(f"round {r + 1}: vhost-user-nvme {vhost[-1].iops:8.0f} IOPS p50 {vhost[-1].p50_us:5.0f} us"
                          f" | -device nvme {emulated[-1].iops:8.0f} IOPS p50 {emulated[-1].p50_us:5.0f} us",
                          flush=True)
        finally:
            engine.stop()

    def med(runs: list[Run], key: str) -> float:
        return Sample.of(getattr(x, key) for x in runs).median

    v_iops, e_iops = med(vhost, "iops"), med(emulated, "iops")
    v_p50, e_p50 = med(vhost, "p50_us"), med(emulated, "p50_us")
    v_p99, e_p99 = med(vhost, "p99_us"), med(emulated, "p99_us")
    print()
    print(f"4 KiB random read, QD1, O_DIRECT, inside a TCG guest (1 vCPU), {args.size_mib} MiB file, "
          f"{args.rounds} x {args.seconds:g} s per device (medians)")
    print(f"{'device':<34}{'IOPS':>10}{'p50 us':>10}{'p99 us':>10}")
    print(f"{'vhost-user-nvme (vhost_nvme engine)':<34}{v_iops:>10.0f}{v_p50:>10.0f}{v_p99:>10.0f}")
    print(f"{'-device nvme (QEMU emulated)':<34}{e_iops:>10.0f}{e_p50:>10.0f}{e_p99:>10.0f}")
    print(f"ratio vhost/emulated: IOPS {v_iops / e_iops:.2f}x, p50 latency {v_p50 / e_p50:.2f}x "
          f"(lower is better), p99 latency {v_p99 / e_p99:.2f}x")
    if args.out:
        report = Report("4 KiB random read, QD1, O_DIRECT, TCG guest", "-device nvme (QEMU emulated)",
                        [Metric("iops", "IOPS", True), Metric("p50_us", "p50 us", False),
                         Metric("p99_us", "p99 us", False)],
                        params={"seconds": args.seconds, "rounds": args.rounds, "size_mib": args.size_mib})
        for label, runs in (("-device nvme (QEMU emulated)", emulated), ("vhost-user-nvme", vhost)):
            report.add(label, **{k: Sample.of(getattr(r, k) for r in runs) for k in ("iops", "p50_us", "p99_us")})
        print("wrote " + ", ".join(str(p) for p in report.write(args.out)))
    if cqes:
        print(f"engine: {traps} I/O doorbell traps for {cqes} completions ({traps / cqes:.3f} per I/O, shadow "
              f"doorbells on)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
