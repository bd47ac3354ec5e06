"""bench/report.py: the statistics and report every benchmark shares (medians, spread, ratios, JSON/Markdown/PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import report
from bench.report import Metric, Report, Sample


def test_sample_median_spread_p90() -> None:
    s = Sample.of([5, 1, 3, 2, 4])
    assert (s.n, s.median, s.low, s.high) == (5, 3, 1, 5)
    assert 4 < s.p90 <= 5
    assert s.spread(scale=10, digits=0) == "30 [10..50]"
    assert math.isnan(Sample.of([]).median)
    assert Sample.of([7]).p90 == 7


def test_ratio_never_invents_a_figure() -> None:
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(None, 1.0) is None
    assert report.ratio(math.nan, 1.0) is None


def _report() -> Report:
    r = Report("attach", "0 VMs", [Metric("ms", "attach ms", False), Metric("reads", "reads", False)])
    r.add("0 VMs", ms=Sample.of([10, 12, 11]), reads=40)
    r.add("500 VMs", ms=Sample.of([22, 20, 24]), reads=40)
    return r


def test_ratios_are_against_the_baseline_row() -> None:
    ratios = _report().ratios()
    assert ratios["0 VMs"] == {"ms": 1.0, "reads": 1.0}
    assert ratios["500 VMs"] == {"ms": 2.0, "reads": 1.0}


def test_markdown_shows_median_spread_and_ratio() -> None:
    text = _report().markdown()
    assert "Baseline (measured in the same run): 0 VMs." in text
    assert "| 500 VMs | 22.0 [20.0..24.0] (2.00x) | 40.0 (1.00x) |" in text
    assert "| 0 VMs | 11.0 [10.0..12.0] | 40.0 |" in text


def test_write_and_read_back(tmp_path: Path) -> None:
    written = _report().write(tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md", "ratios.png"]
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["vs_baseline"]["500 VMs"]["ms"] == 2.0
    assert data["spread"]["500 VMs"]["ms"]["values"] == [22, 20, 24]
    again = Report.from_dict(data)
    assert again.markdown() == _report().markdown()


def test_main_redraws_from_json_and_refuses_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _report().write(tmp_path, png=False)
    assert report.main([str(tmp_path / "report.json")]) == 0
    assert (tmp_path / "ratios.png").exists()
    assert "| 500 VMs |" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "nvmetd.bench/1"}))
    assert report.main([str(other)]) == 2
    assert "not a report.json" in capsys.readouterr().err
