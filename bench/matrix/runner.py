"""The benchmark loop: for each backend, make the disk, measure it raw (the baseline), then through each transport.

Order per backend: provision (a backends/ pool and a disk in it, through nvmetd's Manager) -> (perf only) fill the
disk once so reads hit real data -> baseline jobs on the volume's own device or file -> for each transport:
Manager.attach, connect, the same jobs, disconnect, Manager.detach -> delete the disk and the pool. The baseline
is measured in the same run, on the same disk, so a ratio compares like with like. A transport with its own
baseline (vhost: the same guest on QEMU's emulated NVMe) runs alone and measures that instead, job by job
alternating with the transport (both guests up at once).

Integrity runs go stage by stage (one fio process per job section): a person sees which stage is running, a
failure names its stage, and a test can act between stages (corrupt the backing store before the read-back).
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.matrix import disks, fio
from bench.matrix.cpu import CpuSampler
from bench.matrix.disks import Disk, Site
from bench.matrix.tables import BASELINE
from bench.matrix.transports import Attachment, Transport, TransportError, make_transport
from target.configfs import ConfigFS

SCHEMA = "bench.matrix/1"


class Progress(Protocol):
    def begin(self, total: int) -> None: ...
    def step(self, description: str, seconds: float | None = None) -> None: ...
    def done_step(self) -> None: ...
    def note(self, text: str) -> None: ...


class QuietProgress:
    def begin(self, total: int) -> None:
        pass

    def step(self, description: str, seconds: float | None = None) -> None:
        pass

    def done_step(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class Options:
    backends: list[str]
    transports: list[str]
    size: int
    workdir: Path | None = None  # tmpfs; default /run (the rig's tmpfs) or the system temp dir
    trsvcid: int = 4460
    rdma_traddr: str | None = None
    fio_timeout: float = 1800.0


@dataclass
class PerfOptions(Options):
    job_file: str = "perf-matrix"
    jobs: list[str] = field(default_factory=list)  # empty: every section of the job file
    runtime: int = 10
    ramp: int = 2


@dataclass
class IntegrityOptions(Options):
    job_files: list[str] = field(default_factory=lambda: ["integrity"])
    loops: int = 1


StageHook = Callable[[Disk, Attachment, str, str], None]  # (disk, attachment, job file stem, stage) before a stage


def host_info() -> dict[str, Any]:
    import os

    return {"kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "fio": fio.fio_version(), "in_rig": bool(os.environ.get("NVMETD_IN_RIG"))}


def default_workdir() -> Path:
    run = Path("/run")
    return run if run.is_dir() and _is_tmpfs(run) else Path(tempfile.gettempdir())


def _is_tmpfs(path: Path) -> bool:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == str(path) and line.split()[2] == "tmpfs" for line in mounts if len(line.split()) > 2)


@contextmanager
def _site(options: Options, cfs: ConfigFS | None) -> Iterator[Site]:
    """A work directory on tmpfs holding the run's private nvmetd (state, pools, keys) and its backing files."""
    path = Path(tempfile.mkdtemp(prefix="nvmetd-bench-", dir=options.workdir or default_workdir()))
    try:
        yield Site(cfs, path, trsvcid=options.trsvcid, rdma_traddr=options.rdma_traddr)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def needs_nvmet(transports: list[str]) -> bool:
    return any(make_transport(name).needs_nvmet for name in transports)


@contextmanager
def _transports(options: Options) -> Iterator[dict[str, Transport]]:
    chosen = {name: make_transport(name, trsvcid=options.trsvcid, traddr=options.rdma_traddr)
              for name in options.transports}
    for name, transport in chosen.items():
        if transport.own_baseline and len(chosen) > 1:
            raise TransportError(f"{name} brings its own baseline, so it runs alone (--transport {name})")
    made: dict[str, Transport] = {}
    try:
        for name, transport in chosen.items():
            transport.prepare()
            made[name] = transport
        yield made
    finally:
        for transport in made.values():
            transport.teardown()


def baseline_label(transports: dict[str, Transport]) -> str:
    own = [t for t in transports.values() if t.own_baseline]
    return own[0].baseline_label if own else Transport.baseline_label


@contextmanager
def _disk(site: Site, backend: str, size: int) -> Iterator[Disk]:
    disk = disks.provision(site, backend, f"nvmb-{backend}-0", size)
    try:
        yield disk
    finally:
        disk.destroy()


@contextmanager
def _attached(transport: Transport, disk: Disk, site: Site, index: int) -> Iterator[Attachment]:
    attachment = transport.attach(disk, site, index)
    try:
        yield attachment
    finally:
        attachment.detach()


@contextmanager
def _baseline(transports: dict[str, Transport], disk: Disk, site: Site) -> Iterator[Attachment]:
    """Where the baseline jobs run: the raw volume on this host, or the one transport's own baseline."""
    own = [t for t in transports.values() if t.own_baseline]
    if not own:
        yield Attachment(BASELINE, Path(disk.device_path), details={"device": disk.device_path})
        return
    attachment = own[0].baseline(disk, site)
    try:
        yield attachment
    finally:
        attachment.detach()


def _env(device: str | Path, size: int, **more: int) -> dict[str, str]:
    return {"DEV": str(device), "SIZE": str(size), **{k.upper(): str(v) for k, v in more.items()}}


def _prefill(device: str, size: int) -> None:
    """Write the whole disk once with random data: reads of never-written blocks would measure holes, not I/O."""
    import subprocess

    argv = [fio.fio_binary(), "--name=prefill", f"--filename={device}", "--rw=write", "--bs=1m", "--direct=1",
            "--ioengine=libaio", "--iodepth=8", f"--size={size}", "--refill_buffers", "--output-format=json"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise fio.FioError(f"prefilling {device} failed: {proc.stderr.strip()[-300:]}")


# ---------------------------------------------------------------- performance


def run_perf(options: PerfOptions, cfs: ConfigFS | None, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or QuietProgress()
    path = fio.job_file(options.job_file)
    all_jobs = fio.sections(path)
    jobs = options.jobs or all_jobs
    unknown = [j for j in jobs if j not in all_jobs]
    if unknown:
        raise fio.FioError(f"{path.name} has no job {', '.join(unknown)} (it has: {', '.join(all_jobs)})")
    report: dict[str, Any] = {
        "schema": SCHEMA, "kind": "perf", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host_info(),
        "params": {"job_file": path.name, "jobs": jobs, "size": options.size, "runtime_s": options.runtime,
                   "ramp_s": options.ramp, "backends": options.backends, "transports": options.transports},
        "results": [], "attachments": [],
    }
    per_job = options.runtime + options.ramp
    progress.begin(len(options.backends) * (1 + len(options.transports)) * len(jobs))
    with _site(options, cfs) as site, _transports(options) as transports:
        report["params"]["baseline"] = baseline_label(transports)
        for backend in options.backends:
            with _disk(site, backend, options.size) as disk:
                progress.note(f"{backend}: {disk.device_path}, {options.size >> 20} MiB; filling it once")
                _prefill(disk.device_path, options.size)
                own = [t for t in transports.values() if t.own_baseline]
                if own:
                    _perf_alternating(path, jobs, backend, own[0], disk, site, options, report, progress)
                    continue
                with _baseline(transports, disk, site) as base:
                    report["attachments"].append({"backend": backend, "transport": BASELINE, **base.details})
                    for job in jobs:
                        progress.step(f"{backend} · {BASELINE} · {job}", per_job)
                        report["results"].append(_perf_job(path, job, backend, BASELINE, base, options))
                        progress.done_step()
                for index, (tname, transport) in enumerate(transports.items()):
                    with _attached(transport, disk, site, index) as att:
                        report["attachments"].append({"backend": backend, "transport": tname, **att.details})
                        for job in jobs:
                            progress.step(f"{backend} · {tname} · {job}", per_job)
                            report["results"].append(_perf_job(path, job, backend, tname, att, options))
                            progress.done_step()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def _perf_alternating(path: Path, jobs: list[str], backend: str, transport: Transport, disk: Disk, site: Site,
                      options: PerfOptions, report: dict[str, Any], progress: Progress) -> None:
    """A transport with its own baseline (two guests on one host): both up at once, each job on the baseline then
    on the transport, so a change in the host's load (other VMs, other users) hits both sides of a ratio alike."""
    per_job = options.runtime + options.ramp
    with _baseline({transport.name: transport}, disk, site) as base, \
            _attached(transport, disk, site, 0) as att:
        report["attachments"] += [{"backend": backend, "transport": BASELINE, **base.details},
                                  {"backend": backend, "transport": transport.name, **att.details}]
        for job in jobs:
            for label, where in ((BASELINE, base), (transport.name, att)):
                progress.step(f"{backend} · {label} · {job}", per_job)
                report["results"].append(_perf_job(path, job, backend, label, where, options))
                progress.done_step()


def _perf_job(path: Path, job: str, backend: str, transport: str, att: Attachment,
              options: PerfOptions) -> dict[str, Any]:
    device = att.device
    env = _env(device, options.size, ramp=options.ramp, runtime=options.runtime)
    with CpuSampler() as sampler:
        run = att.run_fio(path, job, env, timeout=options.fio_timeout)
    if not run.jobs:
        raise fio.FioError(f"{backend}/{transport} {job}: fio failed (exit {run.returncode}): {run.output_tail}")
    figures = run.jobs[0]
    cpu = sampler.measured(figures.runtime_s or options.runtime)
    row: dict[str, Any] = {"backend": backend, "transport": transport, "device": str(device),
                           **figures.to_dict(), "fio_exit": run.returncode,
                           "cpu": {**cpu.to_dict(), "us_per_io": cpu.per_io_us(figures.ios)}}
    return row


# ---------------------------------------------------------------- integrity


def run_integrity(options: IntegrityOptions, cfs: ConfigFS | None, progress: Progress | None = None,
                  before_stage: StageHook | None = None) -> dict[str, Any]:
    progress = progress or QuietProgress()
    files = [fio.job_file(name) for name in options.job_files]
    report: dict[str, Any] = {
        "schema": SCHEMA, "kind": "integrity", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host_info(),
        "params": {"job_files": [f.name for f in files], "size": options.size, "loops": options.loops,
                   "backends": options.backends, "transports": options.transports},
        "results": [],
    }
    progress.begin(len(options.backends) * len(options.transports) * sum(len(fio.sections(f)) for f in files))
    with _site(options, cfs) as site, _transports(options) as transports:
        for backend in options.backends:
            with _disk(site, backend, options.size) as disk:
                for index, transport in enumerate(transports.values()):
                    with _attached(transport, disk, site, index) as att:
                        for path in files:
                            report["results"].append(
                                _integrity_file(path, disk, att, options, progress, before_stage))
    report["passed"] = all(r["passed"] for r in report["results"]) and bool(report["results"])
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def _integrity_file(path: Path, disk: Disk, att: Attachment, options: IntegrityOptions, progress: Progress,
                    before_stage: StageHook | None) -> dict[str, Any]:
    """One job file over one attachment. Without a hook, one fio process runs every stage (fio start-up is
    seconds under emulation); with a hook, one process per stage so the hook runs in between."""
    result: dict[str, Any] = {"backend": disk.backend, "transport": att.transport, "job_file": path.name,
                              "device": str(att.device), "attachment": att.details, "stages": [], "failures": [],
                              "passed": False}
    env = _env(att.device, options.size, loops=options.loops)
    stages = fio.sections(path)
    label = f"{disk.backend} · {att.transport} · {path.stem}"
    if before_stage is None:
        progress.step(f"{label} ({len(stages)} stages: {', '.join(stages)})")
        started = time.monotonic()
        run = att.run_fio(path, "", env, timeout=options.fio_timeout)
        per_stage = split_by_stage(run, stages)
        seconds = round(time.monotonic() - started, 2)
        for _ in stages:
            progress.done_step()
    else:
        per_stage = {}
        seconds = None
    for stage in stages:
        if before_stage is not None:
            progress.step(f"{label} · {stage}")
            before_stage(disk, att, path.stem, stage)
            started = time.monotonic()
            per_stage[stage] = att.run_fio(path, stage, env, timeout=options.fio_timeout)
            seconds = round(time.monotonic() - started, 2)
        run = per_stage[stage]
        checked = {**stage_result(stage, run), "seconds": seconds}
        result["stages"].append(checked)
        result["failures"] += [{"stage": stage, **vars(f)} for f in run.verify_failures]
        if before_stage is not None:
            progress.done_step()
        if not checked["ok"]:
            progress.note(f"FAILED {label} · {stage}: {checked['why']}")
            return result  # later stages would only repeat the news, or overwrite the evidence
    result["passed"] = True
    return result


def split_by_stage(run: fio.FioRun, stages: list[str]) -> dict[str, fio.FioRun]:
    """One fio run of a whole job file, seen as one run per stage. fio's verify lines name no job, so they
    belong to the first job that reported an error (with verify_fatal it is the one that stopped)."""
    by_name = {job.job: job for job in run.jobs}
    failing = next((j.job for j in run.jobs if j.error), None)
    if failing is None and (run.verify_failures or run.returncode):
        failing = next((s for s in stages if s not in by_name), stages[-1])
    out = {}
    for stage in stages:
        job = by_name.get(stage)
        mine = stage == failing
        out[stage] = fio.FioRun(run.argv, run.returncode if mine else 0, [job] if job else [],
                                run.verify_failures if mine else [], run.output_tail if mine else "")
    return out


def stage_result(stage: str, run: fio.FioRun) -> dict[str, Any]:
    """One stage's verdict. Passing needs more than a zero exit: the stage must have moved data, and whatever it
    wrote must have been read back and checked (fio's verify reads count as reads)."""
    moved = {d: 0 for d in ("read", "write", "trim")}
    for job in run.jobs:
        for direction, figures in job.by_direction.items():
            if direction in moved:
                moved[direction] += int(figures.get("io_bytes", 0))
    why = ""
    if run.verify_failures:
        first = run.verify_failures[0]
        why = f"{len(run.verify_failures)} block(s) failed verification, first at offset {first.offset}: " \
              f"{first.kind}: {first.why}"
    elif run.returncode != 0 or any(j.error for j in run.jobs):
        errors = ", ".join(str(j.error) for j in run.jobs if j.error)
        why = f"fio exit {run.returncode}" + (f", job error {errors}" if errors else "") + f": {run.output_tail}"
    elif not run.jobs:
        why = "fio ran no job"
    elif not any(moved.values()):
        why = "the stage moved no data"
    elif moved["write"] and moved["read"] < moved["write"]:
        why = f"wrote {moved['write']} bytes but read back only {moved['read']}: not everything was verified"
    return {"stage": stage, "ok": not why, "why": why, "fio_exit": run.returncode,
            "bytes": moved, "output_tail": run.output_tail if why else ""}
