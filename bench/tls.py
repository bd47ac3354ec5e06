"""Benchmark (figures, not a test): NVMe/TCP with TLS 1.3 vs plain NVMe/TCP to the same namespace, same run.

One subsystem on a null_blk device, exported on a plain port and on a TLS port (treq required, tsas tls1.3) by
target.apply; one host controller on each (the TLS one through tlshd with a PSK in `.nvme`). fio runs 4k randread
QD32 and 128k sequential read on each device, alternating plain/TLS round by round so host load hits both alike;
per job the median of the rounds. CPU per I/O is the whole machine's busy time over fio's run divided by its I/Os
(the target's and tlshd's work are in kernel threads, not in fio's own usr/sys).

    python -m rig -- .venv/bin/python -m bench.tls [--runtime 10] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.matrix.cpu import read_cpu_times
from nvmetd import fabrics, tls
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import Host, Namespace, Port, Subsystem, TargetState

HOST = "nqn.2014-08.org.nvmexpress:uuid:7e57b3c0-0000-4000-8000-000000000014"
SUB = "nqn.2026-11.io.nvmetd:bench-tls"
TLSHD = Path("/usr/local/lib/nvmetd/ktls-utils/usr/sbin/tlshd")
JOBS = {"4k-randread-qd32": ["--rw=randread", "--bs=4k", "--iodepth=32"],
        "128k-read-qd8": ["--rw=read", "--bs=128k", "--iodepth=8"]}


def _state(device: str, with_tls: bool) -> TargetState:
    ports = [Port(id=1, trtype="tcp", adrfam="ipv4", traddr="127.0.0.1", trsvcid="4420", subsystems=[SUB])]
    if with_tls:
        ports.append(Port(id=2, trtype="tcp", adrfam="ipv4", traddr="127.0.0.1", trsvcid="4430", treq="required",
                          tsas="tls1.3", subsystems=[SUB]))
    return TargetState(hosts=[Host(nqn=HOST)], ports=ports,
                       subsystems=[Subsystem(nqn=SUB, allowed_hosts=[HOST],
                                             namespaces=[Namespace(nsid=1, device_path=device)])])


def _device(ctrl: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ns in Path("/sys/class/nvme", ctrl).glob(f"{ctrl}n*"):
            if Path("/dev", ns.name).exists():
                return f"/dev/{ns.name}"
        time.sleep(0.2)
    raise SystemExit(f"bench_tls: no namespace appeared on {ctrl}")


def fio_read(device: str, args: list[str], runtime: int) -> dict[str, float]:
    before, start = read_cpu_times(), time.monotonic()
    proc = subprocess.run(["fio", "--name=j", f"--filename={device}", "--ioengine=libaio", "--direct=1",
                           "--time_based", f"--runtime={runtime}", "--numjobs=1", "--output-format=json", *args],
                          capture_output=True, text=True, check=True)
    after, wall = read_cpu_times(), time.monotonic() - start
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    ios = job["total_ios"]
    busy_s = (after.busy - before.busy) / os.sysconf("SC_CLK_TCK")
    return {"iops": job["iops"], "mbps": job["bw_bytes"] / 1e6, "cpu_us_per_io": busy_s * 1e6 / ios if ios else 0.0,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/TLS rounds per job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    subprocess.run(["modprobe", "-a", "nvmet", "nvmet-tcp", "nvme-tcp", "tls", "nvme-keyring"], check=True)
    subprocess.run(["modprobe", "null_blk", "nr_devices=1", "gb=4", "queue_mode=2"], check=False)
    if not TLSHD.exists():
        print(f"bench_tls: no tlshd at {TLSHD} (scripts/setup)", file=sys.stderr)
        return 3
    conf = Path("/run/nvmetd-bench-tlshd.conf")
    conf.write_text("[authenticate]\nkeyrings=.nvme\n")
    tlshd = subprocess.Popen([str(TLSHD), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfs = ConfigFS()
    controllers: list[str] = []
    try:
        tls.insert(tls.generate_psk(), HOST, SUB)
        result = apply_state(_state("/dev/nullb0", True), cfs)
        if not result.converged:
            print(f"bench_tls: target not converged: {result.to_dict()}", file=sys.stderr)
            return 1
        plain = fabrics.connect_tcp(SUB, HOST, "127.0.0.1", "4420")
        controllers.append(plain.name)
        secure = fabrics.connect_tcp(SUB, HOST, "127.0.0.1", "4430", tls=True)
        controllers.append(secure.name)
        devices = {"tcp": _device(plain.name), "tcp+tls": _device(secure.name)}
        figures: dict[str, dict[str, dict[str, float]]] = {}
        for job, fio_args in JOBS.items():
            runs: dict[str, list[dict[str, float]]] = {"tcp": [], "tcp+tls": []}
            for _ in range(args.rounds):
                for kind, device in devices.items():
                    runs[kind].append(fio_read(device, fio_args, args.runtime))
            figures[job] = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
        report = {"runtime_s": args.runtime, "rounds": args.rounds, "jobs": figures,
                  "ratios_tls_over_tcp": {job: {k: f["tcp+tls"][k] / f["tcp"][k] if f["tcp"][k] else None
                                                for k in ("iops", "mbps", "cpu_us_per_io")}
                                          for job, f in figures.items()}}
    finally:
        for ctrl in controllers:
            fabrics.disconnect(ctrl)
        apply_state(TargetState(), cfs)
        tls.revoke(HOST, SUB)
        tlshd.terminate()
        tlshd.wait(timeout=10)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"NVMe/TCP vs NVMe/TCP+TLS 1.3, null_blk, {args.rounds} alternating rounds of {args.runtime}s (medians)")
    print(f"{'job':18} {'transport':8} {'IOPS':>10} {'MB/s':>9} {'CPU us/IO':>10}")
    for job, f in figures.items():
        for kind, v in f.items():
            print(f"{job:18} {kind:8} {v['iops']:10.0f} {v['mbps']:9.1f} {v['cpu_us_per_io']:10.1f}")
        r = report["ratios_tls_over_tcp"][job]
        print(f"{job:18} {'TLS/TCP':8} {r['iops']:10.3f} {r['mbps']:9.3f} {r['cpu_us_per_io']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
