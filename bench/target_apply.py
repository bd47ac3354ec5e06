"""Control-plane benchmark: apply 1,000 subsystems (one namespace each) into an empty tree, re-apply unchanged,
add one namespace next to them. Prints times and, with --nvmetcli-src, the same work through nvmetcli's own
library in the same VM as the baseline (ratios are the result; absolute TCG times are context).

Run inside the rig: `make bench-target` (or `python -m rig -- .venv/bin/python -m bench.target_apply`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Metric, Report, fmt_ratio
from target.apply import apply_state
from target.configfs import NVMET_ROOT, ConfigFS
from target.features import load_modules
from target.model import TargetState, parse_state
from target.nvmetcli import export_config


def build_state(count: int, files: Path, extra: bool = False) -> TargetState:
    subsystems = []
    for i in range(count + (1 if extra else 0)):
        image = files / f"ns{i}.img"
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(1 << 20)
        subsystems.append({"nqn": f"nqn.2026-11.io.nvmetd:bench-{i:05d}", "allow_any_host": True,
                           "namespaces": [{"nsid": 1, "device_path": str(image)}]})
    nqns = [s["nqn"] for s in subsystems]
    return parse_state({"subsystems": subsystems, "ports": [{"id": 1, "trtype": "loop", "subsystems": nqns}]})


def timed(label: str, fn, results: dict[str, float]) -> None:
    start = time.perf_counter()
    out = fn()
    results[label] = time.perf_counter() - start
    detail = f" ({out})" if out is not None else ""
    print(f"  {label:38} {results[label]:8.3f} s{detail}", flush=True)


def run_nvmetd(count: int, files: Path) -> dict[str, float]:
    cfs = ConfigFS()
    base, bigger = build_state(count, files), build_state(count, files, extra=True)
    results: dict[str, float] = {}
    print(f"nvmetd ({count} subsystems x 1 namespace, one loop port):")

    def apply(state: TargetState) -> str:
        r = apply_state(state, cfs)
        assert r.converged, r.to_dict()
        return f"{r.writes} configfs changes"

    timed("apply into empty tree", lambda: apply(base), results)
    timed("re-apply unchanged", lambda: apply(base), results)
    timed("add one namespace next to them", lambda: apply(bigger), results)
    timed("remove everything", lambda: apply(TargetState()), results)
    return results


def run_nvmetcli(count: int, files: Path, src: Path) -> dict[str, float]:
    """nvmetcli's documented library path: Root().restore(config) and its CLI's wipe-and-restore."""
    sys.path.insert(0, str(src))
    import nvmet.nvme as nvme  # type: ignore[import-not-found]

    base, bigger = (export_config(build_state(count, files, extra)) for extra in (False, True))
    results: dict[str, float] = {}
    print(f"nvmetcli library ({src}):")
    root = nvme.Root()

    def restore(cfg: dict) -> str:
        errors = root.restore(cfg, clear_existing=True)
        return f"{len(errors or [])} errors"

    timed("restore into empty tree", lambda: restore(base), results)
    timed("restore again (wipes, recreates)", lambda: restore(base), results)
    timed("restore with one namespace more", lambda: restore(bigger), results)
    timed("clear_existing", lambda: root.clear_existing(), results)
    return results


STEPS = [("apply", "apply into empty tree", "restore into empty tree"),
         ("reapply", "re-apply unchanged", "restore again (wipes, recreates)"),
         ("one_more", "add one namespace next to them", "restore with one namespace more")]


def as_report(runs: dict[str, dict[str, float]], count: int) -> Report:
    """The same three steps side by side; nvmetcli's library, when measured, is the baseline."""
    baseline = "nvmetcli" if "nvmetcli" in runs else "nvmetd"
    report = Report(f"control plane: {count} subsystems x 1 namespace", baseline,
                    [Metric(key, ours + " (s)", higher_is_better=False) for key, ours, _ in STEPS])
    report.add("nvmetd", **{key: runs["nvmetd"][ours] for key, ours, _ in STEPS})
    if "nvmetcli" in runs:
        report.add("nvmetcli", **{key: runs["nvmetcli"][theirs] for key, _, theirs in STEPS})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.target_apply", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="subsystems (default 1000)")
    parser.add_argument("--nvmetcli-src", type=Path, help="a checkout of nvmetcli to measure as the baseline")
    parser.add_argument("--out", type=Path, help="write report.json, report.md and ratios.png into this directory")
    parser.add_argument("--no-png", action="store_true", help="leave the plot out (matplotlib is slow under TCG)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root and a kernel with nvmet: run `make bench-target`")
    load_modules(parse_state({"ports": [{"id": 1, "trtype": "loop"}]}))
    if not NVMET_ROOT.is_dir():
        parser.error("no nvmet configfs tree")
    with tempfile.TemporaryDirectory(prefix="nvmetd-bench-", dir="/run") as tmp:
        files = Path(tmp)
        report: dict[str, dict[str, float]] = {"nvmetd": run_nvmetd(args.count, files)}
        if args.nvmetcli_src:
            report["nvmetcli"] = run_nvmetcli(args.count, files, args.nvmetcli_src)
    if args.nvmetcli_src or args.out:
        figures = as_report(report, args.count)
        if args.nvmetcli_src:
            print("ratios (nvmetd time / nvmetcli time; below 1 is faster):")
            for m in figures.metrics:
                value = fmt_ratio(figures.ratios()["nvmetd"][m.key])
                print(f"  {m.label:42} {value:>8}  ({figures.rows['nvmetd'][m.key]:.3f} s vs "
                      f"{figures.rows['nvmetcli'][m.key]:.3f} s)")
        if args.out:
            print("wrote " + ", ".join(str(p) for p in figures.write(args.out, png=not args.no_png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
