"""`python -m bench.rbd`: what exporting an RBD image through nvmet costs, and what a two-OSD outage costs,
inside the rig (`python -m rig -- .venv/bin/python -m bench.rbd`).

One test cluster (tests/kernel/ceph_cluster.py: 1 mon, 1 mgr, 3 BlueStore OSDs on loop devices), one rbd pool, one
image mapped with krbd. Baseline: fio on the mapped `/dev/rbdN` itself; then the same image as an nvmet namespace
through nvme-loop and nvme-tcp; a local zvol (ZFS pool on a loop device of the same tmpfs, measured first) for
contrast; then 4k random writes through nvme-tcp with two of the three OSDs stopped vs healthy.
Every figure is printed with its ratio to the baseline measured in the same run. Under TCG the absolute figures are
only context; the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from backends.pools import create_pool, destroy_pool
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import TargetState, parse_state

HOST = "nqn.2014-08.org.nvmexpress:uuid:0d3c2b1a-5e4f-4a6b-9c8d-7e6f5a4b3c2d"
SUB = "nqn.2026-11.io.nvmetd:bench-rbd"
T0 = time.monotonic()
JOBS = {"4k randwrite QD32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        "128k seq write QD8": ["--rw=write", "--bs=128k", "--iodepth=8"]}


STALL_S = 300  # no step takes this long under TCG (the longest, a fio job set, ~60 s)
_watchdog: threading.Timer | None = None


def step(what: str) -> None:
    """Progress on stderr: the whole run takes minutes under TCG, and a stall says where it is and what the
    machine looks like (memory, the tmpfs under every loop device, pools, the kernel log), once per step."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.cancel()
    print(f"[{time.monotonic() - T0:6.0f} s] {what}", file=sys.stderr, flush=True)
    _watchdog = threading.Timer(STALL_S, _stalled, args=(what,))
    _watchdog.daemon = True
    _watchdog.start()


def _stalled(what: str) -> None:
    print(f"bench.rbd: '{what}' has taken over {STALL_S} s; the machine now:", file=sys.stderr, flush=True)
    for argv in (["free", "-m"], ["df", "-m", "/run"], ["zpool", "status", "-x"], ["dmesg", "--level=err,warn"]):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        print("$ " + " ".join(argv) + "\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]),
              file=sys.stderr, flush=True)


def line(row: dict[str, Any]) -> str:
    return (f"{row['job']:20} {row['path']:28} {row['iops']:>9.1f} IOPS {row['MBps']:>8.2f} MB/s "
            f"max {row['max_lat_ms']:>8.1f} ms  x{row['ratio']}")


def fio(device: str, args: list[str], runtime: int) -> dict[str, float]:
    step(f"  fio {' '.join(args)} on {device}")
    out = subprocess.run(["fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio",
                          "--time_based", f"--runtime={runtime}", "--ramp_time=2", "--output-format=json", *args],
                         check=True, capture_output=True, text=True).stdout
    write = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return {"iops": round(write["iops"], 1), "MBps": round(write["bw_bytes"] / 1e6, 2),
            "max_lat_ms": round(write["clat_ns"]["max"] / 1e6, 1)}


def export(cfs: ConfigFS, device: str, transport: str) -> str:
    from tests.kernel import hostside

    port: dict[str, Any] = {"id": 1, "trtype": transport, "subsystems": [SUB]}
    if transport == "tcp":
        port.update(adrfam="ipv4", traddr="127.0.0.1", trsvcid="4420")
    state = parse_state({"hosts": [{"nqn": HOST}], "ports": [port],
                         "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                                         "namespaces": [{"nsid": 1, "device_path": device}]}]})
    assert apply_state(state, cfs).converged
    hostside.connect(transport, SUB, HOST, *(["127.0.0.1", "4420"] if transport == "tcp" else []))
    return str(hostside.namespace_device(SUB, 1, transport))


def unexport(cfs: ConfigFS) -> None:
    from tests.kernel import hostside

    hostside.disconnect(SUB)
    assert apply_state(TargetState(), cfs).converged


def zvol_rows(base: Path, loops: Any, runtime: int) -> list[dict[str, Any]]:
    """The local-disk contrast: the same jobs on a zvol of the same size (ZFS on a loop device, as bench.backend_io
    builds it), ratio to the raw RBD device's row of the same job."""
    subprocess.run(["modprobe", "zfs"], check=False, capture_output=True)
    # the ARC takes half the VM by default; its memory and the cluster's (tmpfs under the OSDs, three OSD daemons)
    # stalled the VM when the zvol ran after the cluster's rows
    Path("/sys/module/zfs/parameters/zfs_arc_max").write_text(str(256 << 20))
    pool = create_pool("zfs", "benchz", [loops.make("zfs", 1 << 30)], root=base / "zpools", fill_threshold=100)
    rows = []
    try:
        pool.create("z1", "128M")
        dev = pool.attach("z1")
        for job, job_args in JOBS.items():
            rows.append({"job": job, "path": "local zvol (raw)", **fio(dev, job_args, runtime), "ratio": None})
        pool.detach("z1")
        pool.delete("z1")
    finally:
        destroy_pool("benchz", root=base / "zpools", force=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from tests.kernel.backend_rig import Loops
    from tests.kernel.ceph_cluster import OSDS, Cluster

    parser = argparse.ArgumentParser(prog="python -m bench.rbd", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=15, help="seconds per fio job (default 15)")
    args = parser.parse_args(argv)
    subprocess.run(["modprobe", "-a", "loop", "rbd", "nvmet", "nvmet-tcp", "nvme-loop", "nvme-tcp"], check=False)
    base = Path(tempfile.mkdtemp(prefix="bench-rbd-", dir="/run" if os.path.isdir("/run") else None))
    loops = Loops(base)
    cfs = ConfigFS()
    step("local zvol, before the cluster takes the VM's memory")
    rows: list[dict[str, Any]] = zvol_rows(base, loops, args.runtime)
    cluster = Cluster(base, [loops.make(f"osd{i}", 1 << 30) for i in range(OSDS)])
    try:
        step("starting the cluster")
        cluster.start()
        step(f"cluster up in {cluster.started_in:.0f} s")
        pool = create_pool("rbd", "bench", root=base / "pools", conf=str(cluster.conf),
                           keyring=str(cluster.keyring), failure_domain="osd", pg_num=16)
        step("pool created; waiting for every PG active+clean")
        cluster.wait_clean()
        pool.create("b1", "128M")
        raw = pool.attach("b1")
        step(f"image mapped at {raw}; filling it")
        # allocate every object first: writes into a thin image's new objects cost more than rewrites
        subprocess.run(["fio", "--name=fill", f"--filename={raw}", "--direct=1", "--ioengine=libaio", "--rw=write",
                        "--bs=1M", "--iodepth=4", "--output-format=json"], check=True, capture_output=True)
        for job, job_args in JOBS.items():
            step(f"{job}: raw, loop, tcp")
            base_fig = fio(raw, job_args, args.runtime)
            rows.append({"job": job, "path": "raw /dev/rbd", **base_fig, "ratio": 1.0})
            for transport in ("loop", "tcp"):
                dev = export(cfs, raw, transport)
                fig = fio(dev, job_args, args.runtime)
                unexport(cfs)
                rows.append({"job": job, "path": f"nvmet {transport}", **fig,
                             "ratio": round(fig["iops"] / base_fig["iops"], 3) if base_fig["iops"] else None})
        step("healthy, then two of three OSDs stopped")
        dev = export(cfs, raw, "tcp")
        healthy = fio(dev, JOBS["4k randwrite QD32"], args.runtime)
        cluster.stop_osd(1)
        cluster.stop_osd(2)
        cluster.wait_osds_up(1, timeout=120)
        step("two OSDs down")
        outage = fio(dev, JOBS["4k randwrite QD32"], args.runtime)
        rows.append({"job": "4k randwrite QD32", "path": "nvmet tcp, healthy", **healthy, "ratio": 1.0})
        rows.append({"job": "4k randwrite QD32", "path": "nvmet tcp, 2 of 3 OSDs down", **outage,
                     "ratio": round(outage["iops"] / healthy["iops"], 3) if healthy["iops"] else None})
        unexport(cfs)
        step("OSDs back")
        cluster.start_osd(1)
        cluster.start_osd(2)
        cluster.wait_osds_up(OSDS)
        pool.detach("b1")
        pool.delete("b1")
        destroy_pool("bench", root=base / "pools", force=True)
    finally:
        cluster.stop()
        loops.close()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    raw_iops = {r["job"]: r["iops"] for r in rows if r["path"] == "raw /dev/rbd"}
    for row in rows:
        if row["ratio"] is None and raw_iops.get(row["job"]):
            row["ratio"] = round(row["iops"] / raw_iops[row["job"]], 3)
    print(json.dumps(rows, indent=1))
    for row in rows:
        print(line(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
