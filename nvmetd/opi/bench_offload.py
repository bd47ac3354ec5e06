"""Benchmark (figures, not a test): host CPU per I/O for one guest job, three ways, measured in one run:

- local vhost: this host's vhost-nvme engine serves the VM's queues from the disk;
- offload: the software DPU (nvmetd/opi/softdpu.py: own netns, cgroup on CPU 1) serves them, reaching the disk
  over NVMe/TCP from this host's nvmet;
- NVMe/TCP from the host: the host's initiator connects to nvmet and the job runs as the VM's QEMU would.

Host CPU = all CPU time the kernel accounts (/proc/stat: user, nice, system, irq, softirq) during the job minus
the DPU cgroup's usage; "outside the guest" also subtracts this process (the guest driver plays QEMU + guest).
The DPU's kernel work (nvme-tcp initiator kworkers, softirqs) is charged to no cgroup, so in this one-kernel
simulation it lands on the host's side: the offload figure is an upper bound for what a real DPU leaves on the
host. Run as root in the rig: `python -m rig -- .venv/bin/python -m nvmetd.opi.bench_offload`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backends import pools
from nvmetd import initiator
from nvmetd.manager import Manager
from nvmetd.opi import softdpu
from nvmetd.vhost import VhostEngines
from target.configfs import ConfigFS
from target.store import StateStore

BLOCK = 4096


def host_cpu_usec() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) * 1_000_000 // os.sysconf("SC_CLK_TCK")


def self_cpu_usec() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int((r.ru_utime + r.ru_stime) * 1_000_000)


def measure(job, count: int, dpu: bool) -> dict[str, float]:
    t0, h0, s0 = time.monotonic(), host_cpu_usec(), self_cpu_usec()
    d0 = softdpu.cgroup_usage_usec() if dpu else 0
    job(count)
    wall = time.monotonic() - t0
    host = host_cpu_usec() - h0 - ((softdpu.cgroup_usage_usec() - d0) if dpu else 0)
    guest = self_cpu_usec() - s0
    ios = 2 * count
    return {"iops": ios / wall, "host_cpu_us_per_io": host / ios,
            "host_cpu_outside_guest_us_per_io": max(host - guest, 0) / ios,
            "dpu_cpu_us_per_io": ((softdpu.cgroup_usage_usec() - d0) / ios) if dpu else 0.0}


def guest_job(sock: str):
    from vhost_nvme.guest import GuestDriver

    g = GuestDriver(sock, timeout=120)
    g.enable()
    g.create_io_queue(1, 64)
    data = os.urandom(BLOCK)

    def job(count: int) -> None:
        for i in range(count):
            slba = (i % 2048) * (BLOCK // 512)
            assert g.write(1, 1, slba, data).status == 0
            cqe, back = g.read(1, 1, slba, BLOCK // 512)
            assert cqe.status == 0 and back == data

    return job, g


def device_job(dev: str):
    buf, back = mmap.mmap(-1, BLOCK), mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)

    def job(count: int) -> None:
        for i in range(count):
            off = (i % 2048) * BLOCK
            assert os.pwritev(fd, [buf], off) == BLOCK
            assert os.preadv(fd, [back], off) == BLOCK and back[:] == buf[:]

    return job, fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvmetd.opi.bench_offload", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="write+read pairs per run (4 KiB, QD1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not Path("/sys/kernel/config/nvmet").is_dir():
        subprocess.run(["modprobe", "-a", "nvmet", "nvmet-tcp", "nvme-tcp"], check=False, capture_output=True)
        if not Path("/sys/kernel/config/nvmet").is_dir():
            print("bench_offload: needs root and nvmet (run it in the rig: python -m rig -- ...)", file=sys.stderr)
            return 3
    base = Path(tempfile.mkdtemp(prefix="bo-", dir="/run" if Path("/run").is_dir() else None))
    run = Path(tempfile.mkdtemp(prefix="bo-", dir="/tmp"))
    softdpu.make_network()
    softdpu.make_cgroup()
    dpu = softdpu.SoftDpu(base / "dpu")
    results: dict[str, dict[str, float]] = {}
    manager = None
    try:
        pools.create_pool("file", "files", devices=[str(base / "files")], root=base / "pools")
        manager = Manager(StateStore(base / "state.json"), ConfigFS(), pools_root=base / "pools",
                          keys_dir=base / "keys", host_connect=False, vhost=VhostEngines(run / "v"))
        import tomllib

        manager.dpu = tomllib.loads(dpu.host_config())["dpu"]
        for disk in ("dl", "dd", "dt"):
            manager.create_disk(disk, "files", "64M")
        dpu.start()

        local = manager.attach("vm-local", "dl", "vhost")
        job, g = guest_job(str(local.vhost_socket))
        job(100)  # warm-up
        results["local vhost"] = measure(job, args.count, dpu=True)
        g.close()

        off = manager.attach("vm-dpu", "dd", "dpu")
        job, g = guest_job(str(off.vhost_socket))
        job(100)
        results["offload (software DPU)"] = measure(job, args.count, dpu=True)
        g.close()

        tcp = manager.attach("vm-tcp", "dt", "tcp")
        key = Path(tcp.dhchap_key_file).read_text()
        conn = initiator.connect(tcp.subsystem_nqn, tcp.host_nqn, "tcp", tcp.traddr, tcp.trsvcid, dhchap_key=key)
        job, fd = device_job(str(conn.device(1)))
        job(100)
        results["NVMe/TCP from the host"] = measure(job, args.count, dpu=True)
        os.close(fd)
        conn.disconnect()
    finally:
        if manager is not None:
            for vm, disk in (("vm-dpu", "dd"), ("vm-local", "dl"), ("vm-tcp", "dt")):
                try:
                    manager.detach(vm, disk)
                except Exception as exc:
                    print(f"cleanup: detach {vm}: {exc}", file=sys.stderr)
        dpu.kill9()
        softdpu.remove_cgroup()
        softdpu.remove_network()
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    baseline = results["local vhost"]["host_cpu_us_per_io"]
    if args.json:
        print(json.dumps(results, indent=2))
    print(f"{'mode':26} {'IOPS':>8} {'host CPU us/IO':>15} {'outside guest':>14} {'DPU us/IO':>10} {'vs local':>9}")
    for mode, r in results.items():
        print(f"{mode:26} {r['iops']:8.0f} {r['host_cpu_us_per_io']:15.1f} "
              f"{r['host_cpu_outside_guest_us_per_io']:14.1f} {r['dpu_cpu_us_per_io']:10.1f} "
              f"{r['host_cpu_us_per_io'] / baseline:8.2f}x")
    print("one kernel serves host and DPU here: the DPU's kernel threads are counted on the host side")
    return 0


if __name__ == "__main__":
    sys.exit(main())
