"""Run fio on one job section and turn its JSON (and its complaints) into plain figures.

fio prints verify failures as text ("verify: bad magic header ... at file /dev/nvme1n1 offset 4096000, length
4096"), not in its JSON, so both are read: the JSON for figures and per-job error codes, the text for where data
went wrong. A run counts as failed when fio exits non-zero, a job reports an error, or any verify line appears.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nvmetd.errors import SystemProblem

JOBS_DIR = Path(__file__).resolve().parent.parent.parent / "fio_jobs"
PERCENTILES = {"p50": "50.000000", "p90": "90.000000", "p99": "99.000000", "p99.9": "99.900000",
               "p99.99": "99.990000"}
_SECTION_RE = re.compile(r"^\[([^\]]+)\]\s*$")
# "<what>: <why> at file <path> offset <n>, length <n>" — fio's shape for every kind of verify failure
_VERIFY_RE = re.compile(r"^(?P<kind>[\w .-]+?): (?P<why>.*?)\s*at file (?P<file>\S+) offset (?P<offset>\d+), "
                        r"length (?P<length>\d+)", re.MULTILINE)


class FioError(SystemProblem):
    """fio is missing, or produced nothing we can read: not a data problem, a harness or setup problem."""


@dataclass
class VerifyFailure:
    """One block fio found wrong: which file, where, and fio's own words for what was wrong."""

    file: str
    offset: int
    length: int
    kind: str
    why: str


@dataclass
class JobFigures:
    """One fio job's result. Directions (read/write/trim) are summed; latency is total (submit to complete)."""

    job: str
    error: int
    ios: int
    io_bytes: int
    runtime_s: float
    iops: float
    bw_bytes: float
    lat_us: dict[str, float] = field(default_factory=dict)  # mean + PERCENTILES keys
    by_direction: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FioRun:
    argv: list[str]
    returncode: int
    jobs: list[JobFigures]
    verify_failures: list[VerifyFailure]
    output_tail: str  # the last lines fio wrote, for a person to read when something failed

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.verify_failures and all(j.error == 0 for j in self.jobs)


def fio_binary() -> str:
    found = shutil.which("fio")
    if found is None:
        raise FioError("fio is not installed: run `make setup`")
    return found


def fio_version() -> str:
    return subprocess.run([fio_binary(), "--version"], capture_output=True, text=True, check=False).stdout.strip()


def job_file(name: str) -> Path:
    """A job file from fio_jobs/ by short name (`integrity`, `perf-matrix`), or any path."""
    path = Path(name)
    if path.suffix != ".fio":
        path = JOBS_DIR / f"{name}.fio"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in JOBS_DIR.glob("*.fio")))
        raise FioError(f"no job file {path} (known: {known})")
    return path


def sections(path: Path) -> list[str]:
    """The job sections of a job file, in order (global excluded)."""
    names = []
    for line in path.read_text().splitlines():
        match = _SECTION_RE.match(line.strip())
        if match and match.group(1) != "global":
            names.append(match.group(1))
    return names


def run_fio(path: Path, section: str, env: dict[str, str], prefix: list[str] | None = None,
            timeout: float | None = None) -> FioRun:
    """Run one section of a job file (all of them if `section` is empty) with the given ${VAR}s.

    `prefix` runs fio elsewhere (e.g. inside a guest)."""
    argv = [*(prefix or []), fio_binary(), "--output-format=json", *([f"--section={section}"] if section else []),
            str(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired as exc:
        raise FioError(f"fio {section} did not finish within {timeout:.0f} s") from exc
    return parse_run(argv, proc.returncode, proc.stdout, proc.stderr)


def parse_run(argv: list[str], returncode: int, stdout: str, stderr: str) -> FioRun:
    text = f"{stdout}\n{stderr}"
    failures = parse_verify_failures(text)
    report = _json_document(stdout)
    if report is None:
        if returncode == 0:
            raise FioError(f"fio printed no JSON report: {stderr.strip()[-500:]}")
        jobs: list[JobFigures] = []
    else:
        jobs = [job_figures(job) for job in report.get("jobs", [])]
    noise = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t", "{", "}", '"'))]
    return FioRun(argv, returncode, jobs, failures, "\n".join(noise[-15:]))


def _json_document(stdout: str) -> dict[str, Any] | None:
    """fio may print "fio: ..." lines before its JSON; the report is the first `{` that parses."""
    start = stdout.find("{")
    while start != -1:
        try:
            doc, _ = json.JSONDecoder().raw_decode(stdout, start)
            if isinstance(doc, dict) and "jobs" in doc:
                return doc
        except json.JSONDecodeError:
            pass
        start = stdout.find("{", start + 1)
    return None


def parse_verify_failures(text: str) -> list[VerifyFailure]:
    seen = set()
    found = []
    for m in _VERIFY_RE.finditer(text):
        key = (m["file"], int(m["offset"]))
        if key in seen:
            continue
        seen.add(key)
        found.append(VerifyFailure(m["file"], int(m["offset"]), int(m["length"]), m["kind"].strip(),
                                   m["why"].strip().rstrip(",")))
    return found


def job_figures(job: dict[str, Any]) -> JobFigures:
    """Sum the directions that did I/O; take latency from the unified ("mixed") section or the busiest one."""
    if "mixed" in job:
        directions = {"mixed": job["mixed"]}
    else:
        directions = {d: job[d] for d in ("read", "write", "trim") if d in job and job[d].get("io_bytes", 0) > 0}
    ios = sum(int(d.get("total_ios", 0)) for d in directions.values())
    busiest = max(directions.values(), key=lambda d: d.get("total_ios", 0), default={})
    return JobFigures(
        job=job.get("jobname", "?"),
        error=int(job.get("error", 0)),
        ios=ios,
        io_bytes=sum(int(d.get("io_bytes", 0)) for d in directions.values()),
        runtime_s=job.get("job_runtime", 0) / 1000,
        iops=sum(float(d.get("iops", 0)) for d in directions.values()),
        bw_bytes=sum(float(d.get("bw_bytes", 0)) for d in directions.values()),
        lat_us=_latency(busiest),
        by_direction={name: {"ios": d.get("total_ios", 0), "io_bytes": d.get("io_bytes", 0), "iops": d.get("iops", 0),
                             "bw_bytes": d.get("bw_bytes", 0),
                             **{f"lat_{k}_us": v for k, v in _latency(d).items()}}
                      for name, d in directions.items()},
    )


def _latency(direction: dict[str, Any]) -> dict[str, float]:
    """Total latency (lat_ns, needs lat_percentiles=1); completion latency (clat_ns) when that is all there is."""
    for key in ("lat_ns", "clat_ns"):
        lat = direction.get(key) or {}
        pct = lat.get("percentile")
        if pct:
            out = {"mean": float(lat.get("mean", 0)) / 1000}
            out.update({name: pct[k] / 1000 for name, k in PERCENTILES.items() if k in pct})
            return out
    lat = direction.get("lat_ns") or {}
    return {"mean": float(lat.get("mean", 0)) / 1000} if lat else {}
