"""nvmetd's own cost of one attach and one detach as the host grows, on the host (fake configfs tree, no kernel):
what the state store, the pool ledger and the scoped reconcile cost per change with 0, 1,000 or 2,500 VMs of
4 namespaces each. Prints figures and ratios; asserts nothing.

The baseline is another git ref (default `main`) measured in the same run: its tree is exported (git archive)
into a temporary directory and the same measuring script runs there, so both sides are the same calls on the
same machine at the same load. `make bench-attach` measures the whole attach-to-usable in the rig.

    .venv/bin/python -m bench.attach_host [--sizes 0,1000,2500] [--disks-per-vm 4] [--runs 15] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.report import Metric, Report, Sample

REPO = Path(__file__).resolve().parent.parent

# Run as a script inside the tree measured (this one or the baseline's export): only interfaces both have.
CHILD = r'''
import json, sys, tempfile, time
from pathlib import Path
from backends import pools
from nvmetd.manager import Manager
from nvmetd.vhost import VhostEngines
from nvmetd.vms import Attachment, new_vm
from target.apply import apply_state
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel

vms, per_vm, runs = (int(a) for a in sys.argv[1:4])
base = Path(tempfile.mkdtemp(prefix="bench-attach-host-", dir=sys.argv[4]))
t0 = time.perf_counter()
FakeKernel(base / "nvmet")
(base / "files").mkdir()
pool = pools.create_pool("file", "files", devices=[str(base / "files")], root=base / "pools")
m = Manager(StateStore(base / "state.json"), FakeFS(root=base / "nvmet"), pools_root=base / "pools",
            keys_dir=base / "keys", host_connect=False, vhost=VhostEngines(base / "vhost"))
pool.create_many([f"d{i:05d}-{j}" for i in range(vms) for j in range(per_vm)], "1M")
with m.store.transaction() as doc:
    for i in range(vms):
        vm = new_vm(f"vm{i:05d}")
        for j in range(per_vm):
            vm.attachments[f"d{i:05d}-{j}"] = Attachment(nsid=j + 1, transport="tcp")
            doc.setdefault("disks", {})[f"d{i:05d}-{j}"] = {"pool": "files", "state": "ready"}
        doc.setdefault("vms", {})[vm.name] = vm.model_dump()
for i in range(runs + 1):
    m.create_disk(f"new{i:03d}", "files", "1M")
apply_state(m.effective(m.store.load()), m.cfs)
m.reconcile()
setup = time.perf_counter() - t0
m.attach("warm", "new000", transport="tcp")  # imports and first-use caches out of the figures
attach, detach = [], []
for i in range(1, runs + 1):
    t = time.perf_counter()
    m.attach(f"probe{i}", f"new{i:03d}", transport="tcp")
    attach.append(time.perf_counter() - t)
    t = time.perf_counter()
    m.detach(f"probe{i}", f"new{i:03d}")
    detach.append(time.perf_counter() - t)
print(json.dumps({"attach": attach, "detach": detach, "setup": setup,
                  "state_bytes": sum(p.stat().st_size for p in base.glob("state.json*"))}))
'''


def export_ref(ref: str, into: Path) -> Path | None:
    proc = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True, check=False)
    if proc.returncode != 0:
        print(f"no baseline: git archive {ref} failed: {proc.stderr.decode().strip()}", file=sys.stderr)
        return None
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(tree: Path, vms: int, per_vm: int, runs: int, scratch: Path) -> dict:
    script = scratch / "child.py"  # outside the tree: nothing written there, and its folder shadows no module
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(vms), str(per_vm), str(runs), str(scratch)],
                          capture_output=True, text=True, cwd=tree, check=False,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if proc.returncode != 0:
        raise SystemExit(f"measuring {tree} at {vms} VMs failed: {proc.stderr.strip()[-600:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attach_host", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,2500", help="VMs already attached, comma-separated")
    parser.add_argument("--disks-per-vm", type=int, default=4)
    parser.add_argument("--runs", type=int, default=15, help="attaches (and detaches) per size and tree")
    parser.add_argument("--baseline-ref", default="main", help="git ref measured the same way as the baseline")
    parser.add_argument("--out", type=Path, help="write report.json, report.md and ratios.png into this directory")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ref = args.baseline_ref
    metrics = [Metric("attach_ms", "attach (ms)", higher_is_better=False),
               Metric("detach_ms", "detach (ms)", higher_is_better=False)]
    base_row = f"{ref}, {sizes[0]} VMs"
    report = Report(f"nvmetd attach/detach on a fake tree, {args.disks_per_vm} namespaces per VM", base_row,
                    metrics, params={"sizes": sizes, "disks_per_vm": args.disks_per_vm, "runs": args.runs})
    ms = lambda values: Sample.of(v * 1e3 for v in values)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-attach-host-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "ref").mkdir()
        (tmp / "scratch").mkdir()
        old = export_ref(ref, tmp / "ref")
        trees = [("this tree", REPO)] + ([(ref, old)] if old else [])
        for size in sizes:
            for label, tree in trees:
                print(f"{label}: {size} VMs x {args.disks_per_vm} ...", file=sys.stderr, flush=True)
                got = measure(tree, size, args.disks_per_vm, args.runs, tmp / "scratch")
                report.add(f"{label}, {size} VMs", attach_ms=ms(got["attach"]), detach_ms=ms(got["detach"]))
                report.notes.append(f"{label}, {size} VMs: setup {got['setup']:.1f} s, state files "
                                    f"{got['state_bytes'] / 1e6:.2f} MB")
    if old is None:
        report.baseline = f"this tree, {sizes[0]} VMs"
    for label, _ in trees:
        rows = [report.rows.get(f"{label}, {s} VMs", {}).get("attach_ms") for s in sizes]
        if rows[0]:
            report.notes.append(f"{label}: attach at {sizes[-1]} VMs is {rows[-1] / rows[0]:.2f}x its attach at "
                                f"{sizes[0]} VMs")
    print(report.markdown())
    if args.out:
        print("wrote " + ", ".join(str(p) for p in report.write(args.out, png=not args.no_png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
