"""PNG plots of a run: what each path costs relative to the baseline (the raw device; for vhost the guest on
QEMU's emulated NVMe), and how its latency tail grows.

- ratios.png:  per backend, for every job, one bar per transport: IOPS and CPU per I/O as a multiple of the raw
               device (the dashed line at 1.0 is "as good as raw"). The picture answers "what does a path cost".
- latency.png: per backend, latency at p50..p99.99 for the queue-depth-1 jobs, raw device and every transport on a
               log scale: where the tail of each path starts to lift away from the device's.
- compare.png: (with --compare) per row and metric that moved beyond the noise threshold, the change in percent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.matrix.fio import PERCENTILES
from bench.matrix.tables import BASELINE, METRICS, add_ratios, metric
from bench.report import pyplot

COLORS = {"baseline": "#555555", "loop": "#1f77b4", "tcp": "#ff7f0e", "rdma": "#2ca02c", "vhost": "#d62728"}



def _color(transport: str, index: int) -> str:
    return COLORS.get(transport, f"C{index + 4}")


def plot_ratios(report: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    add_ratios(report)
    rows = report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    transports = list(dict.fromkeys(r["transport"] for r in rows if r["transport"] != BASELINE))
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    shown = [("iops", "IOPS vs baseline (higher is better)"),
             ("cpu_us_per_io", "CPU per I/O vs baseline (lower is better)")]
    fig, axes = plt.subplots(len(shown), len(backends), figsize=(max(6.0, 5.5 * len(backends)), 7.5),
                             squeeze=False, sharey="row")
    width = 0.8 / max(1, len(transports))
    for col, backend in enumerate(backends):
        for row_i, (name, title) in enumerate(shown):
            ax = axes[row_i][col]
            for t_i, transport in enumerate(transports):
                values = []
                for job in jobs:
                    row = next((r for r in rows if (r["backend"], r["transport"], r["job"]) ==
                                (backend, transport, job)), None)
                    values.append((row or {}).get("vs_baseline", {}).get(name) or float("nan"))
                xs = [j + (t_i - (len(transports) - 1) / 2) * width for j in range(len(jobs))]
                bars = ax.bar(xs, values, width, label=transport, color=_color(transport, t_i))
                ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=6,
                             rotation=90, padding=2)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")  # ratios are multiplicative: 0.5x and 2x sit equally far from 1x
            ax.set_xticks(range(len(jobs)))
            ax.set_xticklabels(jobs, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{backend}: {title}", fontsize=9)
            ax.margins(y=0.25)
            ax.grid(True, axis="y", which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("x baseline (log)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_subtitle(report), fontsize=9)
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(report: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    rows = report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    jobs = [j for j in dict.fromkeys(r["job"] for r in rows) if j.endswith("qd1")] or \
        list(dict.fromkeys(r["job"] for r in rows))[:2]
    fig, axes = plt.subplots(len(jobs), len(backends), figsize=(max(6.0, 5 * len(backends)), 3.6 * len(jobs)),
                             squeeze=False)
    pcts = list(PERCENTILES)
    for col, backend in enumerate(backends):
        for row_i, job in enumerate(jobs):
            ax = axes[row_i][col]
            paths = [r for r in rows if r["backend"] == backend and r["job"] == job]
            for i, r in enumerate(sorted(paths, key=lambda r: r["transport"] != BASELINE)):
                lat = r.get("lat_us") or {}
                ax.plot(pcts, [lat.get(p) for p in pcts], marker="o", label=r["transport"],
                        color=_color(r["transport"], i), linewidth=2.5 if r["transport"] == BASELINE else 1.5)
            ax.set_yscale("log")
            ax.set_title(f"{backend}: {job} latency", fontsize=9)
            ax.set_ylabel("µs (log)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(_subtitle(report), fontsize=9)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_compare(result: dict[str, Any], out: Path) -> Path | None:
    moved = [r for r in result["rows"] if r["verdict"] in ("better", "worse")]
    if not moved:
        return None
    plt = pyplot()
    label = {m: lbl for m, lbl, _ in METRICS}
    moved.sort(key=lambda r: r["change"])
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.28 * len(moved) + 1)))
    names = [f"{r['backend']}/{r['transport']}/{r['job']} {label[r['metric']]}" for r in moved]
    colors = ["#2ca02c" if r["verdict"] == "better" else "#d62728" for r in moved]
    ax.barh(names, [r["change"] * 100 for r in moved], color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("change, % (green better, red worse)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"{result['old_started']} → {result['new_started']}", fontsize=9)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _subtitle(report: dict[str, Any]) -> str:
    host = report.get("host", {})
    where = "\nrig VM under qemu TCG: the ratios matter, absolute figures do not" if host.get("in_rig") else ""
    return f"nvmetd bench {report.get('started', '')}, kernel {host.get('kernel', '?')}{where}"


def plot_all(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if not report.get("results"):
        return []
    return [plot_ratios(report, out), plot_latency(report, out)]


__all__ = ["metric", "plot_all", "plot_compare"]
