"""nvmetctl's own cost, on the host (no kernel): start-up (`nvmetctl --help`) and an `attach` round trip against
nvmetd serving a fake configfs tree that already holds many VMs. Prints figures and ratios; asserts nothing.

Baselines measured in the same run: the bare interpreter (`python -c pass`, the floor of any Python CLI), the
CLI of another git ref (default `main`: what the change replaces), and the same attach sent from inside this
process (what nvmetd itself takes, without a CLI process around it).

    .venv/bin/python -m nvmetd.bench_ctl [--runs 20] [--vms 1000] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str], runs: int, check: bool = True, argv_for: Callable[[int], list[str]] | None = None
          ) -> list[float]:
    times = []
    for i in range(runs):
        cmd = argv_for(i) if argv_for else argv
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        times.append(time.perf_counter() - t0)
        if check and proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:6])}...: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return times


def summary(name: str, times: list[float]) -> dict[str, float]:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    print(f"  {name:44} median {med * 1000:8.1f} ms   p25 {q[0] * 1000:8.1f}   p75 {q[2] * 1000:8.1f}"
          f"   (n={len(times)})")
    return {"median_s": med, "p25_s": q[0], "p75_s": q[2], "n": len(times)}


def old_cli(ref: str, tmp: Path) -> Path | None:
    """The CLI of `ref`, as a script run from the repo (its imports resolve to this tree's modules)."""
    proc = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:nvmetd/cli.py"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        print(f"  (no baseline: git show {ref}:nvmetd/cli.py failed: {proc.stderr.strip()})")
        return None
    path = tmp / f"cli_{ref.replace('/', '_')}.py"
    path.write_text(proc.stdout)
    return path


class FakeWorld:
    """nvmetd's API on a fake configfs tree with `vms` VMs attached over tcp (one file disk each)."""

    def __init__(self, base: Path, vms: int) -> None:
        import uvicorn

        from backends import pools
        from nvmetd.api import create_app
        from nvmetd.manager import Manager
        from nvmetd.service import bind_socket
        from nvmetd.vhost import VhostEngines
        from nvmetd.vms import Attachment, new_vm
        from target.apply import apply_state
        from target.store import StateStore
        from tests.unit.fakes import FakeFS, FakeKernel

        self.socket = base / "nvmetd.sock"
        FakeKernel(base / "nvmet")
        (base / "files").mkdir()
        pool = pools.create_pool("file", "files", devices=[str(base / "files")], root=base / "pools")
        self.manager = Manager(StateStore(base / "state.json"), FakeFS(root=base / "nvmet"), pools_root=base / "pools",
                               keys_dir=base / "keys", host_connect=False, vhost=VhostEngines(base / "vhost"))
        t0 = time.perf_counter()
        with self.manager.store.transaction() as doc:
            for i in range(vms):
                name = f"d{i:05d}"
                pool.create(name, "1M")
                vm = new_vm(f"vm{i:05d}")
                vm.attachments[name] = Attachment(nsid=1, transport="tcp")
                doc.setdefault("vms", {})[vm.name] = vm.model_dump()
                doc.setdefault("disks", {})[name] = {"pool": "files", "state": "ready"}
        for i in range(64):  # disks for the measured attaches
            self.manager.create_disk(f"new{i:03d}", "files", "1M")
        doc = self.manager.store.load()
        apply_state(self.manager.effective(doc), self.manager.cfs)
        print(f"  fake tree with {vms} VMs ready in {time.perf_counter() - t0:.1f} s")
        sock = bind_socket(self.socket, None)
        config = uvicorn.Config(create_app(self.manager), log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvmetd.bench_ctl", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--attach-runs", type=int, default=None,
                        help="attaches per variant (default --runs; at most 21: 64 disks are made for them)")
    parser.add_argument("--baseline-ref", default="main", help="git ref whose nvmetd/cli.py is the baseline")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    attach_runs = min(args.attach_runs or args.runs, 21)
    py = sys.executable
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ctl-") as tmpdir:
        tmp = Path(tmpdir)
        old = old_cli(args.baseline_ref, tmp)
        print(f"start-up, median of {args.runs}:")
        report["python -c pass"] = summary("python -c pass (interpreter floor)", timed([py, "-c", "pass"], args.runs))
        report["help"] = summary("nvmetctl --help (this tree)", timed([py, "-m", "nvmetd.cli", "--help"], args.runs))
        if old:
            report["help_baseline"] = summary(f"nvmetctl --help ({args.baseline_ref})",
                                              timed([py, str(old), "--help"], args.runs))

        print(f"attach round trip, {args.vms} VMs on a fake configfs tree, median of {attach_runs}:")
        world = FakeWorld(tmp / "w", args.vms)
        try:
            common = ["--socket", str(world.socket)]

            def attach(cli: list[str], prefix: str) -> Callable[[int], list[str]]:
                return lambda i: [*cli, *common, "--json", "attach", f"{prefix}{i:03d}", f"new{i + off[0]:03d}",
                                  "--transport", "tcp"]

            off = [0]
            report["attach"] = summary("nvmetctl attach (this tree)",
                                       timed([], attach_runs, argv_for=attach([py, "-m", "nvmetd.cli"], "vm-new")))
            from nvmetd import client

            direct = []
            off[0] = attach_runs
            for i in range(attach_runs):
                t0 = time.perf_counter()
                client.request(world.socket, "PUT", ("v1", "vms", f"vm-direct{i:03d}", "disks",
                                                     f"new{i + off[0]:03d}"), {"transport": "tcp"})
                direct.append(time.perf_counter() - t0)
            report["attach_in_process"] = summary("same attach, sent from this process (nvmetd only)", direct)
            if old:
                off[0] = 2 * attach_runs
                report["attach_baseline"] = summary(f"nvmetctl attach ({args.baseline_ref})",
                                                    timed([], attach_runs, argv_for=attach([py, str(old)], "vm-old")))
        finally:
            world.stop()
    print("ratios:")
    floor = report["python -c pass"]["median_s"]
    print(f"  --help / interpreter floor: {report['help']['median_s'] / floor:.2f}x")
    if "help_baseline" in report:
        ratio = report["help"]["median_s"] / report["help_baseline"]["median_s"]
        print(f"  --help this tree / {args.baseline_ref}: {ratio:.2f}x")
    cli_cost = report["attach"]["median_s"] - report["attach_in_process"]["median_s"]
    print(f"  attach: CLI process adds {cli_cost * 1000:.0f} ms to nvmetd's "
          f"{report['attach_in_process']['median_s'] * 1000:.0f} ms")
    if "attach_baseline" in report:
        print(f"  attach this tree / {args.baseline_ref}: "
              f"{report['attach']['median_s'] / report['attach_baseline']['median_s']:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
