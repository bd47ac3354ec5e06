"""`python -m bench.matrix`: the command line of the fio harness; `nvmetctl bench` mounts the same group.

Writes everything into one directory per run (default bench-out/<kind>-<time>/): report.json (every figure),
report.md (the table), PNG plots. Progress goes to stderr, so `--json` output on stdout stays clean.
Exit codes (nvmetd.errors, shared with nvmetctl): 0 done (integrity: all passed), 1 integrity failure, 2 bad
input, 3 this host cannot run it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from bench.matrix import plots, tables
from bench.matrix.disks import BACKENDS
from bench.matrix.runner import IntegrityOptions, PerfOptions, needs_nvmet, run_integrity, run_perf
from bench.matrix.transports import TRANSPORTS
from bench.report import RichProgress
from nvmetd.errors import EXIT_NOT_CONVERGED, SystemProblem, run_cli
from target.configfs import NVMET_ROOT, ConfigFS

_SIZE_RE = re.compile(r"^(\d+)([kmgt]?)(i?b)?$", re.IGNORECASE)


class HostError(SystemProblem):
    """This host cannot run the benchmark (not root, no nvmet): exit 3."""


def parse_size(text: str) -> int:
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 256M or 1G")
    return int(match[1]) << (10 * " kmgt".index(match[2].lower() or " "))


def _csv(choices: list[str]):
    def convert(_ctx: Any, param: click.Parameter, value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{', '.join(bad) or 'nothing'} not in {', '.join(choices)}", param=param)
        return list(dict.fromkeys(items))
    return convert


def _size(_ctx: Any, _param: click.Parameter, value: str) -> int:
    return parse_size(value)


def _out_dir(out: Path | None, kind: str) -> Path:
    path = out or Path("bench-out") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise click.UsageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("bench.matrix/"):
        raise click.UsageError(f"{path} is not an nvmetd bench report")
    return data


def _target(transports: list[str]) -> ConfigFS | None:
    """The nvmet tree, or None when every chosen transport runs without one (vhost runs on this host)."""
    if not needs_nvmet(transports):
        return None
    if os.geteuid() != 0:
        raise HostError("needs root (it creates disks, nvmet exports and connections); in the project, "
                        "`make bench` runs it inside the rig VM")
    import subprocess

    subprocess.run(["modprobe", "-q", "nvmet"], check=False, capture_output=True)
    if not NVMET_ROOT.is_dir():
        raise HostError(f"{NVMET_ROOT} does not exist: this kernel has no nvmet (run it in the rig: "
                        "`.venv/bin/python -m rig -- .venv/bin/python -m bench.matrix ...`)")
    return ConfigFS()


def _write(out: Path, name: str, text: str) -> Path:
    path = out / name
    path.write_text(text)
    return path


def _compare_into(new: dict[str, Any], old: dict[str, Any], out: Path, threshold: float,
                  draw: bool = True) -> dict[str, Any]:
    result = tables.compare(new, old, threshold)
    out.mkdir(parents=True, exist_ok=True)
    _write(out, "compare.json", json.dumps(result, indent=2))
    _write(out, "compare.md", tables.compare_markdown(result))
    if draw:
        plots.plot_compare(result, out)
    return result


common_options = [
    click.option("--backend", "backends", default="file", show_default=True, callback=_csv(list(BACKENDS)),
                 help=f"comma-separated backends/ pool kinds: {', '.join(BACKENDS)}"),
    click.option("--transport", "transports", default="loop,tcp", show_default=True,
                 callback=_csv(list(TRANSPORTS)),
                 help=f"comma-separated: {', '.join(TRANSPORTS)} (vhost runs alone, on the host, against a guest "
                      "on QEMU's emulated NVMe)"),
    click.option("--out", type=click.Path(path_type=Path), help="output directory [bench-out/<kind>-<time>]"),
    click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
                 help="where backing files go; must be tmpfs or a real filesystem [/run]"),
    click.option("--port", "trsvcid", type=int, default=4460, show_default=True,
                 help="first TCP/RDMA service port (one per transport)"),
    click.option("--rdma-traddr", help="address on an existing RDMA device (default: make soft-RoCE on a veth pair)"),
    click.option("--json", "as_json", is_flag=True, help="print the JSON report on stdout"),
]


def with_common(func):
    for option in reversed(common_options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """fio benchmarks and integrity checks of nvmet paths (backend x transport) against the raw device."""


@bench.command()
@with_common
@click.option("--size", default="256M", show_default=True, callback=_size, help="disk size")
@click.option("--runtime", type=click.IntRange(1), default=10, show_default=True, help="measured seconds per job")
@click.option("--ramp", type=click.IntRange(0), default=2, show_default=True, help="unmeasured warm-up seconds per job")
@click.option("--job", "jobs", multiple=True, help="only this job of the job file (repeatable)")
@click.option("--job-file", default="perf-matrix", show_default=True, help="name in fio_jobs/ or a path")
@click.option("--compare", "compare_with", type=click.Path(path_type=Path, dir_okay=False),
              help="an earlier report.json: also write what changed")
@click.option("--threshold", type=float, default=0.10, show_default=True, help="relative change counted as noise")
@click.option("--plots/--no-plots", "plots_now", default=None,
              help="draw the PNGs now [default: yes, except inside the rig VM, where matplotlib takes minutes "
                   "under emulation: render them on the host with `report`]")
def perf(backends: list[str], transports: list[str], out: Path | None, workdir: Path | None, trsvcid: int,
         rdma_traddr: str | None, as_json: bool, size: int, runtime: int, ramp: int, jobs: tuple[str, ...],
         job_file: str, compare_with: Path | None, threshold: float, plots_now: bool | None) -> None:
    """The performance matrix: every job on the raw device, then through each transport; ratios, table, plots."""
    old = _load(compare_with) if compare_with else None
    cfs = _target(transports)
    options = PerfOptions(backends=backends, transports=transports, size=size, workdir=workdir, trsvcid=trsvcid,
                          rdma_traddr=rdma_traddr, job_file=job_file, jobs=list(jobs), runtime=runtime, ramp=ramp)
    with RichProgress() as progress:
        data = tables.add_ratios(run_perf(options, cfs, progress))
    out = _out_dir(out, "perf")
    _write(out, "report.json", json.dumps(data, indent=2))
    table = _write(out, "report.md", tables.markdown(data))
    if plots_now is None:
        plots_now = not os.environ.get("NVMETD_IN_RIG")
    pngs = plots.plot_all(data, out) if plots_now else []
    if old is not None:
        _compare_into(data, old, out, threshold, plots_now)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(table.read_text())
        if old is not None:
            click.echo((out / "compare.md").read_text())
    click.echo(f"wrote {out}/report.json, {table}" + "".join(f", {p}" for p in pngs), err=True)
    if not plots_now:
        click.echo(f"plots: run `.venv/bin/python -m bench.matrix report {out}/report.json` on the host", err=True)


@bench.command()
@with_common
@click.option("--size", default="64M", show_default=True, callback=_size, help="area checked")
@click.option("--loops", type=click.IntRange(1), default=1, show_default=True, help="passes of each random stage")
@click.option("--trim/--no-trim", default=True, show_default=True, help="also run the variant with trim mixed in")
def integrity(backends: list[str], transports: list[str], out: Path | None, workdir: Path | None, trsvcid: int,
              rdma_traddr: str | None, as_json: bool, size: int, loops: int, trim: bool) -> None:
    """Checksummed writes and full read-back through each transport; exit 1 if any block came back wrong."""
    cfs = _target(transports)
    options = IntegrityOptions(backends=backends, transports=transports, size=size, workdir=workdir,
                               trsvcid=trsvcid, rdma_traddr=rdma_traddr, loops=loops,
                               job_files=["integrity", "integrity-trim"] if trim else ["integrity"])
    with RichProgress() as progress:
        data = run_integrity(options, cfs, progress)
    out = _out_dir(out, "integrity")
    _write(out, "report.json", json.dumps(data, indent=2))
    table = _write(out, "report.md", tables.integrity_markdown(data))
    click.echo(json.dumps(data, indent=2) if as_json else table.read_text())
    click.echo(f"integrity: {'PASSED' if data['passed'] else 'FAILED'}; wrote {out}/report.json", err=True)
    if not data["passed"]:
        raise SystemExit(EXIT_NOT_CONVERGED)


@bench.command("report")
@click.argument("run", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), help="where to write [the report's directory]")
def render(run: Path, out: Path | None) -> None:
    """Render report.md and the plots again from a report.json."""
    data = _load(run)
    out = out or run.parent
    out.mkdir(parents=True, exist_ok=True)
    if data.get("kind") == "integrity":
        click.echo(_write(out, "report.md", tables.integrity_markdown(data)).read_text())
        return
    click.echo(_write(out, "report.md", tables.markdown(tables.add_ratios(data))).read_text())
    plots.plot_all(data, out)


@bench.command("compare")
@click.argument("new", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("old", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), help="where to write compare.* [NEW's directory]")
@click.option("--threshold", type=float, default=0.10, show_default=True, help="relative change counted as noise")
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON")
def compare_cmd(new: Path, old: Path, out: Path | None, threshold: float, as_json: bool) -> None:
    """What changed between two perf runs (NEW against OLD)."""
    result = _compare_into(_load(new), _load(old), out or new.parent, threshold)
    click.echo(json.dumps(result, indent=2) if as_json else tables.compare_markdown(result))


def main(argv: list[str] | None = None) -> int:
    return run_cli(bench, argv, "python -m bench.matrix", "bench")


if __name__ == "__main__":
    sys.exit(main())
