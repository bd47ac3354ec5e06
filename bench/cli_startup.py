"""nvmetctl's own cost, on the host (no kernel): start-up (`nvmetctl --help`) and an `attach` round trip against
nvmetd serving a fake configfs tree that already holds many VMs. Prints figures and ratios; asserts nothing.

Baselines measured in the same run: the CLI of another git ref (default `main`, what a change replaces) is the
report's baseline; the bare interpreter (`python -c pass`, the floor of any Python CLI) and the same attach sent
from inside this process (what nvmetd itself takes, without a CLI process around it) are rows beside it.

    .venv/bin/python -m bench.cli_startup [--runs 20] [--vms 1000] [--attach-runs 20] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Metric, Report, Sample

REPO = Path(__file__).resolve().parent.parent
DISKS = 64  # made up front for the measured attaches (each attach takes a disk of its own)


def timed(argv_for: Callable[[int], list[str]], runs: int) -> Sample:
    times = []
    for i in range(runs):
        cmd = argv_for(i)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO)})  # a ref's CLI runs as a script
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:6])}...: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return Sample.of(times)


def ref_cli(ref: str, tmp: Path) -> Path | None:
    """The CLI of `ref`, as a script run from the repo (its imports resolve to this tree's modules)."""
    proc = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:nvmetd/cli.py"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        print(f"no baseline: git show {ref}:nvmetd/cli.py failed: {proc.stderr.strip()}", file=sys.stderr)
        return None
    path = tmp / f"cli_{ref.replace('/', '_')}.py"
    path.write_text(proc.stdout)
    return path


class FakeWorld:
    """nvmetd's API (uvicorn on a Unix socket, as nvmetd serves it) on a fake configfs tree with `vms` VMs
    attached over tcp, one file disk each."""

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
        pool.create_many([f"d{i:05d}" for i in range(vms)], "1M")  # one ledger transaction, not 3 per volume
        with self.manager.store.transaction() as doc:
            for i in range(vms):
                name = f"d{i:05d}"
                vm = new_vm(f"vm{i:05d}")
                vm.attachments[name] = Attachment(nsid=1, transport="tcp")
                doc.setdefault("vms", {})[vm.name] = vm.model_dump()
                doc.setdefault("disks", {})[name] = {"pool": "files", "state": "ready"}
        for i in range(DISKS):
            self.manager.create_disk(f"new{i:03d}", "files", "1M")
        apply_state(self.manager.effective(self.manager.store.load()), self.manager.cfs)
        print(f"fake tree with {vms} VMs ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
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
    parser = argparse.ArgumentParser(prog="python -m bench.cli_startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="`--help` runs per variant")
    parser.add_argument("--vms", type=int, default=1000, help="VMs attached before the measured attaches")
    parser.add_argument("--attach-runs", type=int, default=20,
                        help=f"attaches per variant (at most {DISKS // 3}: one disk each)")
    parser.add_argument("--baseline-ref", default="main", help="git ref whose nvmetd/cli.py is the baseline")
    parser.add_argument("--out", type=Path, help="write report.json, report.md and ratios.png into this directory")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)
    attach_runs = min(args.attach_runs, DISKS // 3)
    py = sys.executable
    ref = args.baseline_ref
    report = Report(f"nvmetctl start-up and attach round trip ({args.vms} VMs, fake configfs tree)", ref,
                    [Metric("help_ms", "nvmetctl --help (ms)", higher_is_better=False),
                     Metric("attach_ms", f"attach with {args.vms} VMs (ms)", higher_is_better=False)],
                    params={"runs": args.runs, "attach_runs": attach_runs, "vms": args.vms})
    ms = 1e3
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmpdir:
        tmp = Path(tmpdir)
        old = ref_cli(ref, tmp)
        floor = timed(lambda _: [py, "-c", "pass"], args.runs)
        ours = timed(lambda _: [py, "-m", "nvmetd.cli", "--help"], args.runs)
        theirs = timed(lambda _: [py, str(old), "--help"], args.runs) if old else None
        world = FakeWorld(tmp / "w", args.vms)
        try:
            common = ["--socket", str(world.socket), "--json", "attach"]

            def attach(cli: list[str], prefix: str, first: int) -> Callable[[int], list[str]]:
                return lambda i: [*cli, *common, f"{prefix}{i:03d}", f"new{first + i:03d}", "--transport", "tcp"]

            ours_attach = timed(attach([py, "-m", "nvmetd.cli"], "vm-new", 0), attach_runs)
            from nvmetd import client

            direct = []
            for i in range(attach_runs):
                t0 = time.perf_counter()
                client.request(world.socket, "PUT", ("v1", "vms", f"vm-direct{i:03d}", "disks",
                                                     f"new{attach_runs + i:03d}"), {"transport": "tcp"})
                direct.append(time.perf_counter() - t0)
            theirs_attach = timed(attach([py, str(old)], "vm-old", 2 * attach_runs), attach_runs) if old else None
        finally:
            world.stop()
    scale = lambda s: None if s is None else Sample.of(v * ms for v in s.values)  # noqa: E731
    report.add("this tree", help_ms=scale(ours), attach_ms=scale(ours_attach))
    if theirs is not None:
        report.add(ref, help_ms=scale(theirs), attach_ms=scale(theirs_attach))
    report.add("python -c pass (floor)", help_ms=scale(floor), attach_ms=None)
    report.add("attach sent in-process (nvmetd only)", help_ms=None, attach_ms=scale(Sample.of(direct)))
    report.notes.append(f"the CLI process adds {(ours_attach.median - Sample.of(direct).median) * ms:.0f} ms to "
                        f"nvmetd's {Sample.of(direct).median * ms:.0f} ms per attach")
    print(report.markdown())
    if args.out:
        print("wrote " + ", ".join(str(p) for p in report.write(args.out, png=not args.no_png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
