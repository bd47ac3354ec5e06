"""The fio matrix's tables (ratios from bench/report.py): a run's JSON as ratios to the baseline, a Markdown
table, and a comparison of two runs.

Every figure stays in the JSON; the ratios are derived here (and added to the JSON as `vs_baseline`) because under
emulation or on a busy machine the absolute numbers mean little, while "tcp costs 2.1x the CPU per I/O of the
raw device on the same disk in the same run" holds up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.report import fmt_num as _num
from bench.report import fmt_ratio as _ratio
from bench.report import geomean, ratio

BASELINE = "baseline"  # the transport name of the raw-device rows
DEFAULT_BASELINE = "fio on the backend volume's own device or file, on the same host"

# name, how to read it from a result row, unit shown, whether higher is better
METRICS: list[tuple[str, str, bool]] = [
    ("iops", "IOPS", True),
    ("bw_MBps", "MB/s", True),
    ("lat_p50_us", "p50 µs", False),
    ("lat_p99_us", "p99 µs", False),
    ("lat_p99.9_us", "p99.9 µs", False),
    ("cpu_us_per_io", "CPU µs/IO", False),
]
TABLE_METRICS = [m[0] for m in METRICS]


def metric(row: dict[str, Any], name: str) -> float | None:
    """One figure of a result row, by flat name."""
    if name == "iops":
        return row.get("iops")
    if name == "bw_MBps":
        bw = row.get("bw_bytes")
        return bw / 1e6 if bw is not None else None
    if name.startswith("lat_") and name.endswith("_us"):
        return (row.get("lat_us") or {}).get(name[4:-3])
    if name == "cpu_us_per_io":
        return (row.get("cpu") or {}).get("us_per_io")
    raise KeyError(name)


def key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["backend"], row["transport"], row["job"]



def add_ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Set `vs_baseline` on every row: each metric divided by the same job on the same backend's raw device."""
    baselines = {(r["backend"], r["job"]): r for r in report["results"] if r["transport"] == BASELINE}
    for row in report["results"]:
        base = baselines.get((row["backend"], row["job"]))
        row["vs_baseline"] = {m: ratio(metric(row, m), metric(base, m)) if base else None for m in TABLE_METRICS}
    return report




def markdown(report: dict[str, Any]) -> str:
    """One table per backend: every job, baseline first, then each transport with its ratio to the baseline."""
    add_ratios(report)
    params = report.get("params", {})
    host = report.get("host", {})
    lines = [
        f"# nvmetd benchmark ({report.get('started', '?')})",
        "",
        f"Kernel {host.get('kernel', '?')}, {host.get('cpus', '?')} CPUs, {host.get('fio', 'fio')}"
        + (", inside the rig VM (qemu TCG: absolute figures are context only, the ratios are the result)"
           if host.get("in_rig") else "")
        + f". Disk {int(params.get('size', 0)) >> 20} MiB, ramp {params.get('ramp_s', '?')} s, "
        f"runtime {params.get('runtime_s', '?')} s per job. Each cell: value (ratio to the baseline). "
        "CPU µs/IO: busy time of all host CPUs per completed I/O. Lower is better for latency and CPU.",
        "",
        f"Baseline: {params.get('baseline') or DEFAULT_BASELINE}.",
    ]
    header = "| job | path | " + " | ".join(label for _, label, _ in METRICS) + " |"
    rule = "|---|---|" + "---:|" * len(METRICS)
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    for backend in backends:
        lines += ["", f"## backend: {backend}", "", header, rule]
        rows = [r for r in report["results"] if r["backend"] == backend]
        jobs = list(dict.fromkeys(r["job"] for r in rows))
        for job in jobs:
            for row in sorted((r for r in rows if r["job"] == job), key=lambda r: r["transport"] != BASELINE):
                cells = []
                for name in TABLE_METRICS:
                    value = _num(metric(row, name))
                    if row["transport"] != BASELINE:
                        value += f" ({_ratio(row['vs_baseline'][name])})"
                    cells.append(value)
                lines.append(f"| {job} | {row['transport']} | " + " | ".join(cells) + " |")
    lines += ["", summary(report)]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> str:
    """The headline: geometric-mean ratio per transport across jobs and backends."""
    add_ratios(report)
    lines = ["## Summary: geometric mean of the ratios to the baseline, all jobs and backends", "",
             "| path | " + " | ".join(label for _, label, _ in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    transports = list(dict.fromkeys(r["transport"] for r in report["results"] if r["transport"] != BASELINE))
    for transport in transports:
        cells = []
        for name in TABLE_METRICS:
            values = [r["vs_baseline"][name] for r in report["results"]
                      if r["transport"] == transport and r["vs_baseline"].get(name)]
            cells.append(_ratio(geomean(values)))
        lines.append(f"| {transport} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



# ---------------------------------------------------------------- compare


@dataclass
class Change:
    key: tuple[str, str, str]
    metric: str
    old: float | None
    new: float | None

    @property
    def change(self) -> float | None:
        """Relative change, new/old - 1."""
        r = ratio(self.new, self.old)
        return None if r is None else r - 1

    def verdict(self, threshold: float) -> str:
        change = self.change
        if change is None:
            return "n/a"
        if abs(change) < threshold:
            return "same"
        higher_better = next(h for m, _, h in METRICS if m == self.metric)
        return "better" if (change > 0) == higher_better else "worse"


def compare(new: dict[str, Any], old: dict[str, Any], threshold: float = 0.10) -> dict[str, Any]:
    """What changed between two perf runs, row by row; |change| below `threshold` counts as the same."""
    old_rows = {key(r): r for r in old.get("results", [])}
    new_rows = {key(r): r for r in new.get("results", [])}
    rows = []
    for k in [k for k in new_rows if k in old_rows]:
        for name in TABLE_METRICS:
            c = Change(k, name, metric(old_rows[k], name), metric(new_rows[k], name))
            rows.append({"backend": k[0], "transport": k[1], "job": k[2], "metric": name, "old": c.old,
                         "new": c.new, "change": c.change, "verdict": c.verdict(threshold)})
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("better", "worse", "same", "n/a")}
    return {"threshold": threshold, "old_started": old.get("started"), "new_started": new.get("started"),
            "rows": rows, "counts": counts,
            "only_in_new": [list(k) for k in new_rows if k not in old_rows],
            "only_in_old": [list(k) for k in old_rows if k not in new_rows]}


def compare_markdown(result: dict[str, Any]) -> str:
    label = {m: lbl for m, lbl, _ in METRICS}
    counts = result["counts"]
    lines = [f"# What changed: {result['old_started']} → {result['new_started']}", "",
             f"{counts['worse']} worse, {counts['better']} better, {counts['same']} within "
             f"±{result['threshold']:.0%} (noise), {counts['n/a']} not comparable."]
    moved = [r for r in result["rows"] if r["verdict"] in ("better", "worse")]
    if moved:
        lines += ["", "| backend | path | job | metric | old | new | change | |",
                  "|---|---|---|---|---:|---:|---:|---|"]
        for r in sorted(moved, key=lambda r: (r["verdict"] != "worse", -abs(r["change"]))):
            lines.append(f"| {r['backend']} | {r['transport']} | {r['job']} | {label[r['metric']]} | "
                         f"{_num(r['old'])} | {_num(r['new'])} | {r['change']:+.0%} | {r['verdict']} |")
    for side in ("only_in_new", "only_in_old"):
        if result[side]:
            lines += ["", f"{side.replace('_', ' ')}: " + ", ".join("/".join(k) for k in result[side])]
    return "\n".join(lines) + "\n"


def integrity_markdown(report: dict[str, Any]) -> str:
    lines = ["| backend | path | job file | result | stages | first failure |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        stages = " ".join(f"{s['stage']}{'✓' if s['ok'] else '✗'}" for s in r["stages"])
        failure = next((s["why"] for s in r["stages"] if not s["ok"]), "")
        lines.append(f"| {r['backend']} | {r['transport']} | {r['job_file']} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} | {stages} | {failure[:160]} |")
    return "\n".join(lines) + "\n"
