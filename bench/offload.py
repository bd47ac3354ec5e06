"""Benchmark (figures, not a test): host CPU per I/O for one guest job, three ways, measured in one run:

- local vhost: this host's vhost-nvme engine serves the VM's queues from the disk;
- offload: the software DPU (nvmetd/opi/softdpu.py: own netns, cgroup on CPU 1) serves them, reaching the disk
  over NVMe/TCP from this host's nvmet;
- NVMe/TCP from the host: the host's initiator connects to nvmet and the job runs as the VM's QEMU would.

host* = every CPU's busy time (/proc/stat) during the job minus the DPU cgroup's usage and this process (the
guest driver plays QEMU + guest); kernel threads are listed by name (nvmetd/opi/cpu_split.py). The DPU's kernel
work (nvme-tcp initiator kworkers, softirqs) is charged to no cgroup, so in this one-kernel simulation it lands on
the host's side: the offload figure is an upper bound for what a real DPU leaves on the host.
Run as root in the rig: `python -m rig -- .venv/bin/python -m bench.offload`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backends import pools
from nvmetd import initiator
from nvmetd.manager import Manager
from nvmetd.opi import cpu_split, softdpu
from nvmetd.vhost import VhostEngines
from target.configfs import ConfigFS
from target.store import StateStore

BLOCK = 4096


def measure(job, count: int) -> dict[str, float]:
    before, t0 = cpu_split.sample(softdpu.CGROUP), time.monotonic()
    job(count)
    wall = time.monotonic() - t0
    cost = cpu_split.split(before, cpu_split.sample(softdpu.CGROUP), 2 * count)
    return {"iops": cost.ios / wall, "total_cpu_us_per_io": cost.total, "guest_cpu_us_per_io": cost.guest,
            "dpu_cpu_us_per_io": cost.dpu, "host_cpu_outside_guest_and_dpu_us_per_io": cost.host,
            "kernel_threads_us_per_io": sum(cost.kthreads.values()),
            **{f"kthread {k} us_per_io": v for k, v in list(cost.kthreads.items())[:4]}}


def guest_job(sock: str):
    from vhost_nvme.guest import GuestDriver

    g = GuestDriver(sock, timeout=120)
    g.enable()
    g.create_io_queue(1, 64)
    data = os.urandom(BLOCK)
    lba = g.lba_size(1)  # a file exported by nvmet has 4 KiB LBAs, so the DPU's remote namespace does too

    def job(count: int) -> None:
        for i in range(count):
            slba = (i % 2048) * (BLOCK // lba)
            assert g.write(1, 1, slba, data, lba_size=lba).status == 0
            cqe, back = g.read(1, 1, slba, BLOCK // lba, lba_size=lba)
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
    parser = argparse.ArgumentParser(prog="python -m bench.offload", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="write+read pairs per run (4 KiB, QD1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not Path("/sys/kernel/config/nvmet").is_dir():
        subprocess.run(["modprobe", "-a", "nvmet", "nvmet-tcp", "nvme-tcp"], check=False, capture_output=True)
        if not Path("/sys/kernel/config/nvmet").is_dir():
            print("bench.offload: needs root and nvmet (run it in the rig: python -m rig -- ...)", file=sys.stderr)
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
                          keys_dir=base / "keys", host_connect=False, vhost=VhostEngines(run / "v"),
                          vhost_backend="engine")  # the userspace engine, as on the DPU (not nvmet-vhost)
        import tomllib

        manager.dpu = tomllib.loads(dpu.host_config())["dpu"]
        for disk in ("dl", "dd", "dt"):
            manager.create_disk(disk, "files", "64M")
        dpu.start()

        local = manager.attach("vm-local", "dl", "vhost")
        job, g = guest_job(str(local.vhost_socket))
        job(100)  # warm-up
        results["local vhost"] = measure(job, args.count)
        g.close()

        off = manager.attach("vm-dpu", "dd", "dpu")
        job, g = guest_job(str(off.vhost_socket))
        job(100)
        results["offload (software DPU)"] = measure(job, args.count)
        g.close()

        tcp = manager.attach("vm-tcp", "dt", "tcp")
        key = Path(tcp.dhchap_key_file).read_text()
        conn = initiator.connect(tcp.subsystem_nqn, tcp.host_nqn, "tcp", tcp.traddr, tcp.trsvcid, dhchap_key=key)
        job, fd = device_job(str(conn.device(1)))
        job(100)
        results["NVMe/TCP from the host"] = measure(job, args.count)
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
    key = "host_cpu_outside_guest_and_dpu_us_per_io"
    baseline = results["local vhost"][key]
    if args.json:
        print(json.dumps(results, indent=2))
    print(f"{'mode':24} {'IOPS':>7} {'total us/IO':>11} {'guest':>7} {'DPU':>7} {'host*':>7} {'kthreads':>8} "
          f"{'host* vs local':>14}")
    for mode, r in results.items():
        print(f"{mode:24} {r['iops']:7.0f} {r['total_cpu_us_per_io']:11.1f} {r['guest_cpu_us_per_io']:7.1f} "
              f"{r['dpu_cpu_us_per_io']:7.1f} {r[key]:7.1f} {r['kernel_threads_us_per_io']:8.1f} "
              f"{r[key] / baseline if baseline else float('nan'):13.2f}x")
        threads = [f"{k[8:-10]} {v:.1f}" for k, v in r.items() if k.startswith("kthread ")]
        print(f"{'':24}   kernel threads by name (us/IO): {', '.join(threads) or 'none'}")
    print("host* = every CPU's busy time minus the guest process (QEMU + guest driver) and the DPU's cgroup.")
    print("One kernel serves host, DPU and storage target here: the DPU's kernel work (nvme_tcp_wq: its")
    print("NVMe/TCP initiator; veth softirqs) and this host's nvmet (nvmet_tcp_wq) both land in host*")
    print("(nvmetd/opi/cpu_split.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
