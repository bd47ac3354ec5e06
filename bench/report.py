"""The one statistics and report module every benchmark in bench/ uses.

Why one: on a 2-core shared machine, or under TCG, absolute figures mean little; what holds up is a ratio to a
baseline measured in the same run, with the median and the spread of repeated samples next to it. Each benchmark
used to compute its own medians and print its own tables; here that is done once, the same way for all:

- `Sample`: median, min..max and p90 of repeated measurements.
- `ratio`, `geomean`: figures relative to the baseline.
- `Report`: named rows of named figures, one row the baseline; writes report.json (every figure and every ratio),
  report.md (a table with the ratios) and ratios.png (one bar chart per figure, the dashed line is the baseline).
- `RichProgress`: progress on stderr, so JSON on stdout stays clean; plain lines when stderr is not a terminal.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass(frozen=True)
class Sample:
    """Repeated measurements of one figure: the median is the figure, min..max and p90 say how far to trust it."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Sample:
        return cls(tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan

    @property
    def p90(self) -> float:
        if len(self.values) < 2:
            return self.median
        return statistics.quantiles(self.values, n=10, method="inclusive")[-1]  # never beyond the max

    def spread(self, scale: float = 1.0, digits: int = 1) -> str:
        """`median [min..max]`, scaled (e.g. 1e3 for ms from seconds)."""
        return (f"{self.median * scale:.{digits}f} [{self.low * scale:.{digits}f}.."
                f"{self.high * scale:.{digits}f}]")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "median": self.median, "min": self.low, "max": self.high, "p90": self.p90,
                "values": list(self.values)}


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or the base is zero (never a made-up 0 or inf)."""
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive ratios: the right average for "x times the baseline"."""
    positive = [v for v in values if v and v > 0]
    if not positive:
        return None
    return math.exp(sum(math.log(v) for v in positive) / len(positive))


def fmt_num(value: float | None) -> str:
    """A figure short enough for a table cell, with the digits that matter."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100_000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 10_000:
        return f"{value / 1000:.1f}k"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@dataclass(frozen=True)
class Metric:
    """A column of a report: its key, how people read it, and which way is better."""

    key: str
    label: str
    higher_is_better: bool


@dataclass
class Report:
    """One benchmark run: rows (what was measured) x metrics, one row the baseline measured in the same run."""

    title: str
    baseline: str
    metrics: list[Metric]
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)
    spreads: dict[str, dict[str, Sample]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, row: str, **figures: float | Sample | None) -> None:
        """Record a row; a `Sample` is stored as its median, with its spread kept for the JSON and the table."""
        values = self.rows.setdefault(row, {})
        for key, figure in figures.items():
            if isinstance(figure, Sample):
                self.spreads.setdefault(row, {})[key] = figure
                values[key] = figure.median
            else:
                values[key] = figure

    def ratios(self) -> dict[str, dict[str, float | None]]:
        base = self.rows.get(self.baseline, {})
        return {row: {m.key: ratio(figures.get(m.key), base.get(m.key)) for m in self.metrics}
                for row, figures in self.rows.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "nvmetd.bench.report/1", "title": self.title, "baseline": self.baseline,
                "params": self.params, "notes": self.notes,
                "metrics": [{"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better}
                            for m in self.metrics],
                "rows": self.rows, "vs_baseline": self.ratios(),
                "spread": {row: {k: s.to_dict() for k, s in by.items()} for row, by in self.spreads.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report.json read back (to draw its plot on the host, where matplotlib is fast)."""
        if data.get("schema") != "nvmetd.bench.report/1":
            raise ValueError("not a report.json written by bench/report.py")
        report = cls(data["title"], data["baseline"],
                     [Metric(m["key"], m["label"], m["higher_is_better"]) for m in data["metrics"]],
                     notes=list(data.get("notes", [])), params=dict(data.get("params", {})))
        for row, figures in data["rows"].items():
            report.add(row, **figures)
        for row, by in data.get("spread", {}).items():
            for key, sample in by.items():
                report.spreads.setdefault(row, {})[key] = Sample.of(sample["values"])
        return report

    def markdown(self) -> str:
        """A table: each cell the figure (median [min..max] when sampled) and its ratio to the baseline."""
        ratios = self.ratios()
        lines = [f"# {self.title}", "", f"Baseline (measured in the same run): {self.baseline}.", "",
                 "| | " + " | ".join(m.label for m in self.metrics) + " |",
                 "|---|" + "---:|" * len(self.metrics)]
        for row, figures in self.rows.items():
            cells = []
            for m in self.metrics:
                sample = self.spreads.get(row, {}).get(m.key)
                cell = fmt_num(figures.get(m.key))
                if sample is not None and sample.n > 1:
                    cell += f" [{fmt_num(sample.low)}..{fmt_num(sample.high)}]"
                if row != self.baseline:
                    cell += f" ({fmt_ratio(ratios[row][m.key])})"
                cells.append(cell)
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, out: Path, png: bool = True) -> list[Path]:
        """report.json, report.md and (unless png=False: matplotlib is slow to import under TCG) ratios.png."""
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.json", out / "report.md"]
        written[0].write_text(json.dumps(self.to_dict(), indent=1))
        written[1].write_text(self.markdown())
        if png:
            written.append(self.plot(out / "ratios.png"))
        return written

    def plot(self, path: Path) -> Path:
        """One panel per metric: every row's ratio to the baseline; the dashed line at 1.0 is the baseline."""
        plt = pyplot()
        ratios = self.ratios()
        rows = [r for r in self.rows if r != self.baseline]
        fig, axes = plt.subplots(1, len(self.metrics), figsize=(max(5.0, 3.2 * len(self.metrics)), 4.0),
                                 squeeze=False)
        for ax, m in zip(axes[0], self.metrics, strict=True):
            values = [ratios[r][m.key] or math.nan for r in rows]
            bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
            ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=7)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{m.label} ({'higher' if m.higher_is_better else 'lower'} is better)", fontsize=8)
        fig.suptitle(f"{self.title}: ratio to {self.baseline}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported only when a plot is drawn (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class RichProgress:
    """An overall bar over a benchmark's steps and the one running now, on stderr.

    Under TCG a run takes many minutes; whoever watches should see what runs and how far along it is. Without a
    terminal rich prints plain lines instead of redrawing.
    """

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=False)
        self._task = self._progress.add_task("bench", total=None)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def begin(self, total: int) -> None:
        self._progress.update(self._task, total=total, completed=0)

    def step(self, description: str, seconds: float | None = None) -> None:
        hint = f" (~{seconds:.0f} s)" if seconds else ""
        self._progress.update(self._task, description=f"{description}{hint}")
        if not self.console.is_terminal:
            self.console.print(f"bench: {description}{hint}", highlight=False)

    def done_step(self) -> None:
        self._progress.advance(self._task)

    def note(self, text: str) -> None:
        self.console.print(f"bench: {text}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report DIR/report.json`: write report.md and ratios.png next to it again."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("report", type=Path, help="a report.json written by a benchmark's --out")
    args = parser.parse_args(argv)
    try:
        report = Report.from_dict(json.loads(args.report.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.report: {args.report}: {exc}", file=sys.stderr)
        return 2
    print(report.markdown(), end="")
    print("wrote " + ", ".join(str(p) for p in report.write(args.report.parent)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
