"""`make bench-attach`: how long a VM waits for its disk, and how that grows with the number of VMs on the host.

Attach-to-usable: from the API call (`PUT /v1/vms/{vm}/disks/{disk}`, what `nvmetctl attach` sends) to the first
4 KiB read with O_DIRECT from the namespace's block device on this host, over the loop transport (nvmetd connects
the host side itself and answers with the device). Measured with N VMs already attached (each with its own
subsystem, host entry, DH-CHAP key and namespace, exported over TCP), N = 0 (the baseline), then e.g. 10, 100, 500.
Also per attach: configfs changes and configfs reads (the daemon's own counters, from /v1/status: an attach reads
only that VM's objects, so this must not grow with N), and for contrast the configfs reads of one full check at
that size (a dry run in this process with the same state, what the daemon does at start and on its drift timer).

The background VMs are written into the state in one transaction and reconciled once (setup, timed, not part of
the figures): adding 500 VMs one API call at a time would itself be the O(N^2) this measures.

Runs as root on a kernel with nvmet (`make bench-attach` boots the 6.12 rig VM). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from backends import pools
from bench.report import Metric, Report, Sample
from nvmetd.manager import Manager
from nvmetd.vms import Attachment, Vm, new_vm
from target.apply import apply_state
from target.configfs import NVMET_ROOT, ConfigFS
from target.store import StateStore

POOL = "bench"
PROBE_VM = "probe-vm"
PROBE_DISK = "probe"


@dataclass
class Row:
    vms: int
    latencies: list[float] = field(default_factory=list)
    detach: list[float] = field(default_factory=list)
    changes: list[int] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)  # the daemon's configfs reads during the attach call
    reads_per_reconcile: int = 0
    namespaces: int = 0  # background namespaces on the host
    setup_seconds: float = 0.0
    after: bool = False  # the baseline measured again once the background is gone (--rebaseline)

    @property
    def label(self) -> str:
        return f"{self.vms} VMs" + (" (after)" if self.after else "")

    def median_ms(self, values: list[float]) -> float:
        return Sample.of(values).median * 1e3

    def p90_ms(self) -> float:
        return Sample.of(self.latencies).p90 * 1e3


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.state = work / "state" / "state.json"
        self.socket = work / "run" / "nvmetd.sock"
        self.pools_root = work / "pools"
        self.keys = work / "keys"
        self.log = work / "nvmetd.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None
        self.background = 0

    # ------------------------------------------------------------------ daemon
    def start(self) -> float:
        (self.work / "nvmetd.toml").write_text("")
        started = time.monotonic()
        with open(self.log, "wb") as out:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "nvmetd.service", "--state", str(self.state), "--socket", str(self.socket),
                 "--pools-root", str(self.pools_root), "--keys-dir", str(self.keys), "--config",
                 str(self.work / "nvmetd.toml"), "--drift-interval", "86400", "--restore-timeout", "5"],
                stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://nvmetd",
                                   timeout=3600)
        while time.monotonic() - started < 600:
            if self.daemon.poll() is not None:
                raise SystemExit(f"bench: nvmetd exited:\n{self.log.read_text()[-3000:]}")
            try:
                self.client.get("/v1/status").raise_for_status()
                return time.monotonic() - started
            except (httpx.HTTPError, OSError):
                time.sleep(0.25)
        raise SystemExit(f"bench: nvmetd did not answer within 600 s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self.client is not None
        resp = self.client.request(method, path, json=body)
        if resp.status_code != 200:
            raise SystemExit(f"bench: {method} {path} -> {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    # ------------------------------------------------------------------ one sample
    def sample(self, row: Row) -> None:
        reads_before = self.call("GET", "/v1/status")["configfs"]["reads"]
        start = time.perf_counter()
        result = self.call("PUT", f"/v1/vms/{PROBE_VM}/disks/{PROBE_DISK}", {"transport": "loop"})
        read_first_block(result["device"])
        row.latencies.append(time.perf_counter() - start)
        status = self.call("GET", "/v1/status")
        row.changes.append(int(status["reconcile"]["writes"]))
        row.reads.append(int(status["configfs"]["reads"]) - int(reads_before))
        start = time.perf_counter()
        self.call("DELETE", f"/v1/vms/{PROBE_VM}/disks/{PROBE_DISK}")
        row.detach.append(time.perf_counter() - start)

    # ------------------------------------------------------------------ background VMs
    def grow_to(self, count: int, disks_per_vm: int = 1) -> float:
        """Bring the background to `count` VMs with `disks_per_vm` disks each over TCP (VMs already there get the
        disks they lack): volumes in one pool transaction, then one state transaction, then one reconcile (as
        the daemon does at start). Setup, not part of the figures: the measured attaches are API calls."""
        start = time.perf_counter()
        pool = pools.open_pool(POOL, self.pools_root)
        store = StateStore(self.state)
        stored = store.load().get("vms", {})
        missing: dict[str, list[str]] = {}
        for i in range(count):
            name = f"bg{i:05d}"
            have = stored.get(f"vm-{name}", {}).get("attachments", {})
            lack = [f"{name}d{d}" for d in range(disks_per_vm) if f"{name}d{d}" not in have]
            if lack:
                missing[name] = lack
        pool.create_many([d for lack in missing.values() for d in lack], "1M")
        with store.transaction() as doc:
            vms = doc.setdefault("vms", {})
            for name, lack in missing.items():
                raw = vms.get(f"vm-{name}")
                vm = Vm.model_validate(raw) if raw is not None else new_vm(f"vm-{name}")
                for disk in lack:
                    vm.attachments[disk] = Attachment(nsid=vm.next_nsid(), transport="tcp")
                    doc.setdefault("disks", {})[disk] = {"pool": POOL, "state": "ready"}
                vms[vm.name] = vm.model_dump()
        result = self.manager().reconcile()
        if not result.converged:
            bad = [f"{s.label}: {s.reason}" for s in result.objects.values() if s.status not in ("ok", "changed")]
            raise SystemExit(f"bench: background VMs did not converge: {bad[:3]}")
        self.background = count
        return time.perf_counter() - start

    def manager(self) -> Manager:
        return Manager(StateStore(self.state), ConfigFS(), pools_root=self.pools_root, keys_dir=self.keys,
                       host_connect=False)

    def reads_per_reconcile(self) -> int:
        manager = self.manager()
        cfs = ConfigFS()
        apply_state(manager.effective(manager.store.load()), cfs, dry_run=True)
        return cfs.counters.reads

    def shrink_to_zero(self) -> float:
        """Every background VM gone (one state transaction, one reconcile), the pool's volumes kept."""
        start = time.perf_counter()
        with StateStore(self.state).transaction() as doc:
            doc["vms"] = {}
        self.manager().reconcile()
        self.background = 0
        return time.perf_counter() - start

    def teardown(self) -> None:
        """Remove every VM (the daemon's own reconcile takes the kernel objects down), then the pool."""
        store = StateStore(self.state)
        if self.state.exists():
            with store.transaction() as doc:
                doc["vms"] = {}
            self.manager().reconcile()
        try:
            pools.destroy_pool(POOL, self.pools_root, force=True)
        except Exception as exc:
            print(f"bench: pool cleanup: {exc}", file=sys.stderr)


def read_first_block(device: str) -> None:
    buf = mmap.mmap(-1, 4096)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        if os.preadv(fd, [buf], 0) != 4096:
            raise SystemExit(f"bench: short read from {device}")
    finally:
        os.close(fd)


METRICS = [Metric("attach_ms", "attach-to-usable ms", False), Metric("detach_ms", "detach ms", False),
           Metric("changes", "configfs changes/attach", False), Metric("reads", "configfs reads/attach", False),
           Metric("reads_per_reconcile", "configfs reads/reconcile", False)]


def as_report(rows: list[Row]) -> Report:
    report = Report("attach-to-usable over loop, by VMs already attached", "0 VMs", METRICS,
                    notes=["attach-to-usable: API PUT -> first 4 KiB O_DIRECT read of the new namespace on this host"])
    for row in rows:
        report.add(row.label, attach_ms=Sample.of(v * 1e3 for v in row.latencies),
                   detach_ms=Sample.of(v * 1e3 for v in row.detach), changes=Sample.of(row.changes),
                   reads=Sample.of(row.reads),
                   reads_per_reconcile=row.reads_per_reconcile)
    return report


def baseline_ms(rows: list[Row]) -> float:
    """The median of every attach measured with no other VM: before the background, and after it is gone when
    --rebaseline measured that too (a drift of the machine's load over the run then falls on both sides)."""
    return Sample.of([v for r in rows if r.vms == 0 for v in r.latencies]).median * 1e3


def print_table(rows: list[Row]) -> None:
    base = baseline_ms(rows)
    print("\nattach-to-usable over loop: API PUT -> first 4 KiB O_DIRECT read of the new namespace on this host")
    print("cfs reads/attach: the daemon's configfs reads during the attach call; cfs reads/full check: one full"
          " reconcile at that size (start, drift timer)")
    print(f"{'VMs attached':>16} {'namespaces':>10} {'n':>4} {'median ms':>10} {'p90 ms':>9} {'vs 0 VMs':>9} "
          f"{'cfs changes':>11} {'cfs reads/attach':>16} {'cfs reads/full check':>20} {'detach ms':>10} "
          f"{'setup s':>8}")
    for row in rows:
        ratio = row.median_ms(row.latencies) / base
        changes = Sample.of(row.changes).median
        reads = Sample.of(row.reads)
        print(f"{row.label:>16} {row.namespaces:>10} {len(row.latencies):>4} {row.median_ms(row.latencies):>10.1f} "
              f"{row.p90_ms():>9.1f} {ratio:>8.2f}x {changes:>11.0f} {reads.spread(digits=0):>16} "
              f"{row.reads_per_reconcile:>20} {row.median_ms(row.detach):>10.1f} {row.setup_seconds:>8.1f}",
              flush=True)


def parse_size(text: str, default_disks: int) -> tuple[int, int]:
    vms, _, disks = text.partition(":")
    return int(vms), int(disks) if disks else default_disks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attach", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50, help="attaches measured with no other VM")
    parser.add_argument("--sizes", default="10,100,500",
                        help="numbers of VMs already attached; N:D gives them D disks each at that size (e.g. "
                             "0,500,2500:4: a 10,000-namespace host last)")
    parser.add_argument("--samples-at-size", type=int, default=15, help="attaches measured at each size")
    parser.add_argument("--disks-per-vm", type=int, default=1,
                        help="disks (namespaces) of each background VM; 4 with --sizes 2500 is a 10,000-namespace host")
    parser.add_argument("--budget", type=float, default=1800.0,
                        help="seconds: no new size is started after this; what was measured is printed")
    parser.add_argument("--rebaseline", action="store_true",
                        help="after the last size, remove the background and measure 0 VMs again; ratios are then "
                             "to both baselines pooled")
    parser.add_argument("--out", type=Path, help="write report.json and report.md into this directory")
    args = parser.parse_args(argv)
    sizes = [parse_size(s, args.disks_per_vm) for s in args.sizes.split(",") if s and s.split(":")[0] != "0"]
    if os.geteuid() != 0:
        print("bench-attach: needs root and a kernel with nvmet; run `make bench-attach` (boots the rig VM)",
              file=sys.stderr)
        return 2
    subprocess.run(["modprobe", "-a", "nvmet", "nvme-loop", "nvmet-tcp"], check=False, capture_output=True)
    if any((NVMET_ROOT / d).is_dir() and any((NVMET_ROOT / d).iterdir()) for d in ("subsystems", "ports", "hosts")):
        print(f"bench-attach: {NVMET_ROOT} is not empty; run it on a host (or the rig) without other exports",
              file=sys.stderr)
        return 3
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="nvmetd-bench-attach-", dir="/run"))
    bench = Bench(work)
    rows: list[Row] = []
    try:
        pools.create_pool("file", POOL, devices=[str(work / "files")], root=bench.pools_root)
        pools.open_pool(POOL, bench.pools_root).create(PROBE_DISK, "16M")
        with StateStore(bench.state).transaction() as doc:
            doc.setdefault("disks", {})[PROBE_DISK] = {"pool": POOL, "state": "ready"}
        print(f"nvmetd answering after {bench.start():.1f} s", flush=True)
        for (size, per_vm), count in [((0, 0), args.samples), *((s, args.samples_at_size) for s in sizes)]:
            if time.monotonic() - t0 > args.budget:
                print(f"budget of {args.budget:.0f} s spent: sizes from {size} VMs on are not measured", flush=True)
                break
            row = Row(size)
            if size:
                row.setup_seconds = bench.grow_to(size, per_vm)
                row.namespaces = size * per_vm
                print(f"[{time.monotonic() - t0:7.1f} s] {size} VMs attached (setup {row.setup_seconds:.1f} s)",
                      flush=True)
            row.reads_per_reconcile = bench.reads_per_reconcile()
            for i in range(count):
                bench.sample(row)
                if i in (0, count - 1) or (i + 1) % 10 == 0:
                    print(f"[{time.monotonic() - t0:7.1f} s] {size} VMs: sample {i + 1}/{count}: "
                          f"{row.latencies[-1] * 1e3:.1f} ms", flush=True)
            rows.append(row)
        if args.rebaseline and len(rows) > 1:
            print_table(rows)  # first without it: removing a 10,000-namespace background takes long under TCG
            row = Row(0, after=True)
            print(f"[{time.monotonic() - t0:7.1f} s] background removed ({bench.shrink_to_zero():.1f} s)", flush=True)
            for _ in range(args.samples_at_size):
                bench.sample(row)
            rows.append(row)
        if rows:
            print_table(rows)  # before the teardown: the figures are out even if the rig's timeout strikes there
    finally:
        bench.stop()
        bench.teardown()
        shutil.rmtree(work, ignore_errors=True)
    if not rows:
        return 1
    print(f"\ntotal {time.monotonic() - t0:.0f} s; figures from a TCG guest are for ratios, not absolutes")
    if args.out:
        report = as_report(rows)
        report.params = {"setup_s": {f"{r.vms} VMs": r.setup_seconds for r in rows}}
        print("wrote " + ", ".join(str(p) for p in report.write(args.out, png=False)) +
              f" (plot it on the host: python -m bench.report {args.out}/report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
