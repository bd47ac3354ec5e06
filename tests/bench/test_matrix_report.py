"""The fio harness's host-side logic: parsing fio's output, stage verdicts, CPU windows, ratios, compare, plots, CLI.

fio outputs under tests/fixtures/fio/ are real: captured from fio 3.33 runs of fio_jobs/ on a loop device, one of
them after 4 KiB of garbage was written behind fio's back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench import report as bench_report
from bench.matrix import cli, cpu, fio, plots, tables
from bench.matrix.runner import split_by_stage, stage_result

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fio"


def fixture_run(name: str, returncode: int) -> fio.FioRun:
    return fio.parse_run(["fio"], returncode, (FIXTURES / f"{name}.stdout").read_text(),
                         (FIXTURES / f"{name}.stderr").read_text())


# ---------------------------------------------------------------- fio output


def test_job_figures_follow_fio_json() -> None:
    raw = json.loads((FIXTURES / "perf-two-jobs.json").read_text())
    run = fio.parse_run(["fio"], 0, json.dumps(raw), "")
    assert run.ok and [j.job for j in run.jobs] == ["randread-4k-qd1", "randrw70-4k-qd32"]

    qd1, mixed = run.jobs
    assert mixed.iops == raw["jobs"][1]["mixed"]["iops"]
    assert mixed.ios == raw["jobs"][1]["mixed"]["total_ios"]
    read = raw["jobs"][0]["read"]
    assert qd1.ios == read["total_ios"] and qd1.bw_bytes == read["bw_bytes"]
    assert qd1.lat_us["p50"] == read["lat_ns"]["percentile"]["50.000000"] / 1000
    assert qd1.lat_us["p99.99"] == read["lat_ns"]["percentile"]["99.990000"] / 1000
    assert qd1.runtime_s == raw["jobs"][0]["job_runtime"] / 1000
    assert list(qd1.by_direction) == ["read"]  # write/trim did nothing and are left out


def test_fio_noise_before_the_json_is_skipped() -> None:
    raw = (FIXTURES / "perf-two-jobs.json").read_text()
    run = fio.parse_run(["fio"], 0, "fio: some warning {not json}\n" + raw, "")
    assert len(run.jobs) == 2


def test_no_json_and_success_is_a_harness_error() -> None:
    with pytest.raises(fio.FioError):
        fio.parse_run(["fio"], 0, "", "fio: something odd")


def test_corrupted_block_is_reported_with_its_offset() -> None:
    run = fixture_run("readback-corrupt", 1)
    assert not run.ok
    assert run.jobs[0].error == 84  # EILSEQ: fio's verify error
    assert [(f.offset, f.length, f.kind) for f in run.verify_failures] == [(4096000, 4096, "verify")]
    assert "bad magic header" in run.verify_failures[0].why


def test_nonzero_where_zeroes_were_due_is_reported_per_block() -> None:
    run = fixture_run("zero-readback-fail", 1)
    offsets = [f.offset for f in run.verify_failures]
    assert offsets[:3] == [0, 131072, 262144] and len(offsets) == len(set(offsets))
    assert {f.kind for f in run.verify_failures} == {"pattern"}


def test_sections_of_the_real_job_files() -> None:
    assert fio.sections(fio.job_file("integrity")) == ["fill", "rand-qd1", "rand-qd16", "rand-qd128", "readback"]
    perf = fio.sections(fio.job_file("perf-matrix"))
    assert {"randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32", "read-128k-qd32",
            "write-128k-qd32", "randrw70-4k-qd32"} == set(perf)
    with pytest.raises(fio.FioError, match="known: "):
        fio.job_file("no-such-job")


# ---------------------------------------------------------------- stage verdicts


def _run_with(directions: dict[str, int], returncode: int = 0, error: int = 0) -> fio.FioRun:
    job = {"jobname": "s", "error": error, "job_runtime": 1000}
    for d in ("read", "write", "trim"):
        job[d] = {"io_bytes": directions.get(d, 0), "total_ios": directions.get(d, 0) // 4096, "iops": 1.0,
                  "bw_bytes": 1.0}
    return fio.parse_run(["fio"], returncode, json.dumps({"jobs": [job]}), "")


def test_stage_passes_only_when_everything_written_was_read_back() -> None:
    assert stage_result("s", _run_with({"write": 1 << 20, "read": 1 << 20}))["ok"]
    short = stage_result("s", _run_with({"write": 1 << 20, "read": 1 << 19}))
    assert not short["ok"] and "not everything was verified" in short["why"]


def test_stage_that_moved_nothing_fails() -> None:
    verdict = stage_result("s", _run_with({}))
    assert not verdict["ok"] and "moved no data" in verdict["why"]


def test_stage_with_fio_error_fails_even_without_verify_lines() -> None:
    verdict = stage_result("s", _run_with({"write": 4096, "read": 4096}, returncode=1, error=5))
    assert not verdict["ok"] and "job error 5" in verdict["why"]


def test_trim_only_stage_passes() -> None:
    assert stage_result("trim-all", _run_with({"trim": 1 << 20}))["ok"]


def test_stage_with_verify_failure_names_the_offset() -> None:
    verdict = stage_result("readback", fixture_run("readback-corrupt", 1))
    assert not verdict["ok"] and "offset 4096000" in verdict["why"]


def test_whole_file_run_blames_the_stage_that_stopped() -> None:
    jobs = []
    for name, error in (("fill", 0), ("readback", 84)):
        job = {"jobname": name, "error": error, "job_runtime": 1000}
        for d in ("read", "write", "trim"):
            job[d] = {"io_bytes": 4096 if d == "read" or name == "fill" else 0, "total_ios": 1, "iops": 1.0,
                      "bw_bytes": 1.0}
        jobs.append(job)
    stderr = (FIXTURES / "readback-corrupt.stderr").read_text()
    run = fio.parse_run(["fio"], 1, json.dumps({"jobs": jobs}), stderr)
    per_stage = split_by_stage(run, ["fill", "readback", "never-ran"])
    assert stage_result("fill", per_stage["fill"])["ok"]
    verdict = stage_result("readback", per_stage["readback"])
    assert not verdict["ok"] and "offset 4096000" in verdict["why"]
    assert stage_result("never-ran", per_stage["never-ran"])["why"] == "fio ran no job"


# ---------------------------------------------------------------- CPU


def test_proc_stat_busy_excludes_idle_and_iowait() -> None:
    times = cpu.parse_proc_stat("cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert times == cpu.CpuTimes(busy=100 + 5 + 50 + 3 + 2 + 1, total=1181)


def test_cpu_window_uses_the_tail_and_divides_by_ios() -> None:
    hz = cpu.os.sysconf("SC_CLK_TCK")
    samples = [(float(t), cpu.CpuTimes(busy=t * hz * (1 if t <= 2 else 2), total=t * 2 * hz)) for t in range(0, 11)]
    win = cpu.window(samples, start=5.0, end=10.0)
    assert win.wall_s == 5.0 and win.busy_s == 10.0 and win.util == 1.0
    assert win.per_io_us(1_000_000) == 10.0
    assert win.per_io_us(0) is None


# ---------------------------------------------------------------- ratios, tables, compare


def _row(transport: str, job: str, iops: float, p50: float, cpu_us: float, backend: str = "file") -> dict:
    return {"backend": backend, "transport": transport, "job": job, "iops": iops, "bw_bytes": iops * 4096,
            "lat_us": {"p50": p50, "p99": p50 * 3, "p99.9": p50 * 10}, "cpu": {"us_per_io": cpu_us}}


def _report(rows: list[dict], started: str = "t0") -> dict:
    return {"schema": "bench.matrix/1", "kind": "perf", "started": started, "host": {"kernel": "6.12"},
            "params": {"size": 1 << 28, "runtime_s": 10, "ramp_s": 2}, "results": rows}


def test_ratios_are_against_the_same_backend_and_job() -> None:
    data = tables.add_ratios(_report([
        _row("baseline", "r4k", 1000, 10, 5), _row("tcp", "r4k", 500, 25, 12),
        _row("baseline", "r4k", 2000, 4, 2, backend="nullblk"), _row("tcp", "r4k", 1000, 8, 6, backend="nullblk"),
    ]))
    tcp_file, tcp_null = data["results"][1]["vs_baseline"], data["results"][3]["vs_baseline"]
    assert tcp_file["iops"] == 0.5 and tcp_file["lat_p50_us"] == 2.5 and tcp_file["cpu_us_per_io"] == 12 / 5
    assert tcp_null["iops"] == 0.5 and tcp_null["lat_p50_us"] == 2.0 and tcp_null["cpu_us_per_io"] == 3.0
    assert data["results"][0]["vs_baseline"]["iops"] == 1.0


def test_row_without_baseline_has_no_ratio() -> None:
    data = tables.add_ratios(_report([_row("tcp", "r4k", 500, 25, 12)]))
    assert set(data["results"][0]["vs_baseline"].values()) == {None}


def test_markdown_table_shows_values_and_ratios() -> None:
    text = tables.markdown(_report([_row("baseline", "r4k", 1000, 10, 5), _row("tcp", "r4k", 500, 25, 12)]))
    tcp_line = next(line for line in text.splitlines() if line.startswith("| r4k | tcp |"))
    assert "500 (0.50x)" in tcp_line and "25.0 (2.50x)" in tcp_line and "12.0 (2.40x)" in tcp_line
    base_line = next(line for line in text.splitlines() if line.startswith("| r4k | baseline |"))
    assert "x)" not in base_line
    summary = text[text.index("## Summary"):]
    assert "| tcp | 0.50x |" in summary


def test_geomean() -> None:
    assert bench_report.geomean([0.5, 2.0]) == pytest.approx(1.0)
    assert bench_report.geomean([]) is None


def test_compare_knows_which_direction_is_better() -> None:
    old = _report([_row("tcp", "r4k", 1000, 10, 5), _row("tcp", "w4k", 1000, 10, 5)], "old")
    new = _report([_row("tcp", "r4k", 800, 8, 5.2), _row("loop", "w4k", 1000, 10, 5)], "new")
    result = tables.compare(new, old, threshold=0.10)
    verdicts = {(r["job"], r["metric"]): r["verdict"] for r in result["rows"]}
    assert verdicts[("r4k", "iops")] == "worse"  # 20% fewer IOPS
    assert verdicts[("r4k", "lat_p50_us")] == "better"  # 20% lower latency
    assert verdicts[("r4k", "cpu_us_per_io")] == "same"  # +4% is noise at 10%
    assert result["only_in_new"] == [["file", "loop", "w4k"]] and result["only_in_old"] == [["file", "tcp", "w4k"]]
    text = tables.compare_markdown(result)
    worse_line = next(line for line in text.splitlines() if "| IOPS |" in line)
    assert "-20%" in worse_line and worse_line.endswith("worse |")


def test_compare_same_run_moves_nothing() -> None:
    run = _report([_row("baseline", "r4k", 1000, 10, 5), _row("tcp", "r4k", 500, 25, 12)])
    result = tables.compare(copy.deepcopy(run), run)
    assert result["counts"]["better"] == result["counts"]["worse"] == 0
    assert plots.plot_compare(result, Path("/nonexistent")) is None


def test_integrity_markdown_names_the_failing_stage() -> None:
    data = {"results": [{"backend": "file", "transport": "tcp", "job_file": "integrity.fio", "passed": False,
                         "stages": [{"stage": "fill", "ok": True, "why": ""},
                                    {"stage": "readback", "ok": False, "why": "1 block(s) failed at offset 8192"}]}]}
    line = tables.integrity_markdown(data).splitlines()[-1]
    assert "FAIL" in line and "readback✗" in line and "offset 8192" in line


# ---------------------------------------------------------------- plots and CLI


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plots_are_written(tmp_path: Path) -> None:
    rows = []
    for job in ("randread-4k-qd1", "randread-4k-qd32"):
        rows += [_row("baseline", job, 1000, 10, 5), _row("loop", job, 900, 12, 6), _row("tcp", job, 500, 25, 12)]
    written = plots.plot_all(_report(rows), tmp_path)
    assert [p.name for p in written] == ["ratios.png", "latency.png"] and all(_png(p) for p in written)
    old = _report([dict(r, iops=r["iops"] * 2) for r in rows], "old")
    assert _png(plots.plot_compare(tables.compare(_report(rows), old), tmp_path))


def test_parse_size() -> None:
    assert cli.parse_size("64M") == 64 << 20 and cli.parse_size("1g") == 1 << 30 and cli.parse_size("4096") == 4096
    with pytest.raises(cli.click.BadParameter):
        cli.parse_size("lots")


def test_cli_compare_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_report([_row("tcp", "r4k", 1000, 10, 5)], "old")))
    new.write_text(json.dumps(_report([_row("tcp", "r4k", 500, 10, 5)], "new")))
    assert cli.main(["compare", str(new), str(old)]) == 0
    assert "| file | tcp | r4k | IOPS | 1000 | 500 | -50% | worse |" in capsys.readouterr().out
    assert json.loads((tmp_path / "compare.json").read_text())["counts"]["worse"] == 2  # IOPS and MB/s


def test_cli_rejects_a_file_that_is_not_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "x.json"
    other.write_text("{}")
    assert cli.main(["report", str(other)]) == 2
    assert "not an nvmetd bench report" in capsys.readouterr().err


def test_cli_report_renders_again(tmp_path: Path) -> None:
    run = tmp_path / "report.json"
    run.write_text(json.dumps(_report([_row("baseline", "r4k", 1000, 10, 5), _row("tcp", "r4k", 500, 25, 12)])))
    assert cli.main(["report", str(run)]) == 0
    assert "(0.50x)" in (tmp_path / "report.md").read_text() and _png(tmp_path / "ratios.png")
