"""Host CPU cost from /proc/stat, sampled in the background while fio runs.

fio's own usr/sys figures miss most of the cost of a fabric: the target's work runs in kernel threads and softirqs
(nvmet-wq, nvmet_tcp io_work, rxe tasklets, loop workers). The whole machine's busy time is what a user pays, so
that is what is measured: every CPU's non-idle jiffies, divided by the I/Os fio completed in the same window.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
IDLE_FIELDS = (3, 4)  # idle, iowait: waiting on the device is not work done by a CPU


@dataclass(frozen=True)
class CpuTimes:
    busy: int  # jiffies
    total: int


@dataclass
class CpuWindow:
    """Busy CPU seconds (all CPUs together) over a window, and the share of all CPU time that was."""

    busy_s: float
    wall_s: float
    util: float  # 0..1 of all CPUs

    def per_io_us(self, ios: int) -> float | None:
        return self.busy_s * 1e6 / ios if ios > 0 else None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate `cpu` line: user nice system idle iowait irq softirq steal (guest time is inside user)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:9]]
            idle = sum(values[i] for i in IDLE_FIELDS)
            total = sum(values)
            return CpuTimes(total - idle, total)
    raise ValueError("no aggregate cpu line in /proc/stat")


def read_cpu_times() -> CpuTimes:
    return parse_proc_stat(PROC_STAT.read_text())


def window(samples: list[tuple[float, CpuTimes]], start: float, end: float) -> CpuWindow:
    """The CPU time between the samples nearest `start` and `end` (monotonic seconds)."""
    if len(samples) < 2:
        raise ValueError("need at least two CPU samples")
    first = min(samples, key=lambda s: abs(s[0] - start))
    last = min(samples, key=lambda s: abs(s[0] - end))
    if last[0] <= first[0]:
        first, last = samples[0], samples[-1]
    hz = os.sysconf("SC_CLK_TCK")
    busy = last[1].busy - first[1].busy
    total = last[1].total - first[1].total
    return CpuWindow(busy_s=busy / hz, wall_s=last[0] - first[0], util=busy / total if total else 0.0)


class CpuSampler:
    """Samples /proc/stat every `interval` seconds until stopped; `measured(runtime)` gives the tail window.

    fio counts I/Os only after ramp-up, over its runtime, and exits right after: so the window that matches fio's
    I/O count is the last `runtime` seconds before it exited, not its whole life (start-up and ramp excluded).
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, CpuTimes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        self.samples.append((time.monotonic(), read_cpu_times()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def measured(self, runtime_s: float) -> CpuWindow:
        end = self.samples[-1][0]
        return window(self.samples, end - runtime_s, end)
