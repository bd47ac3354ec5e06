"""Prometheus metrics: per-namespace I/O from the block layer, per-pool usage, per-object reconcile status.

The I/O figures are the kernel's own cumulative counters (/sys/class/block/<dev>/stat of the device a namespace
opens), so they are exported as counters: a scraper computes rates from them, and a reset (the device was
recreated) shows up as a counter reset rather than a negative rate. A namespace backed by a regular file has no
block device of its own and gets no I/O series.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from target.status import CONVERGED

# /sys/block/<dev>/stat fields (Documentation/block/stat.rst); sectors are always 512 bytes there
_STAT_FIELDS = {"read_ios": 0, "read_sectors": 2, "read_ticks_ms": 3, "write_ios": 4, "write_sectors": 6,
                "write_ticks_ms": 7}


def block_stats(device: str) -> dict[str, int] | None:
    dev = Path(device).resolve()
    stat = Path("/sys/class/block", dev.name, "stat")
    try:
        fields = [int(x) for x in stat.read_text().split()]
    except (OSError, ValueError):
        return None
    if len(fields) <= max(_STAT_FIELDS.values()):
        return None
    return {k: fields[i] for k, i in _STAT_FIELDS.items()}


class _Collector:
    """Reads everything at scrape time: the registry holds no state between scrapes."""

    def __init__(self, manager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        labels = ["subsystem", "nsid", "device", "direction"]
        ios = CounterMetricFamily("nvmetd_namespace_ios", "I/Os completed by the namespace's backing block device",
                                  labels=labels)
        nbytes = CounterMetricFamily("nvmetd_namespace_bytes", "bytes moved by the namespace's backing block device",
                                     labels=labels)
        seconds = CounterMetricFamily("nvmetd_namespace_io_seconds",
                                      "time spent on I/O by the backing block device (sum of request latencies)",
                                      labels=labels)
        cfs = self.manager.cfs
        for sub in cfs.listdir("subsystems"):
            for nsid in cfs.listdir(f"subsystems/{sub}/namespaces"):
                path = cfs.read(f"subsystems/{sub}/namespaces/{nsid}", "device_path")
                stats = block_stats(path) if path and path.startswith("/dev/") else None
                if stats is None:
                    continue
                for d in ("read", "write"):
                    values = [sub, nsid, path, d]
                    ios.add_metric(values, stats[f"{d}_ios"])
                    nbytes.add_metric(values, stats[f"{d}_sectors"] * 512)
                    seconds.add_metric(values, stats[f"{d}_ticks_ms"] / 1000)
        yield from (ios, nbytes, seconds)
        yield _health_metric(cfs)

        status = self.manager.status()
        size = GaugeMetricFamily("nvmetd_pool_size_bytes", "pool capacity", labels=["pool", "kind"])
        used = GaugeMetricFamily("nvmetd_pool_used_bytes", "pool space in use", labels=["pool", "kind"])
        fill = GaugeMetricFamily("nvmetd_pool_fill_ratio", "pool fill (0-1)", labels=["pool", "kind"])
        up = GaugeMetricFamily("nvmetd_pool_up", "1 if the pool's status could be read", labels=["pool"])
        for name, st in sorted(status["pools"].items()):
            up.add_metric([name], 0 if "error" in st else 1)
            if "error" in st:
                continue
            size.add_metric([name, st["kind"]], st["size_bytes"])
            used.add_metric([name, st["kind"]], st["used_bytes"])
            fill.add_metric([name, st["kind"]], st["fill_percent"] / 100)
        yield from (size, used, fill, up)

        converged = GaugeMetricFamily("nvmetd_object_converged", "1 if the object matches the desired state",
                                      labels=["object", "status"])
        reconcile = status["reconcile"]
        if reconcile:
            for key, st in sorted(reconcile["objects"].items()):
                converged.add_metric([key, st["status"]], 1 if st["status"] in CONVERGED else 0)
        yield converged
        last = GaugeMetricFamily("nvmetd_reconcile_converged", "1 if the last reconcile converged (absent before "
                                 "the first one)")
        if reconcile:
            last.add_metric([], 1 if reconcile["converged"] else 0)
        yield last
        generation = GaugeMetricFamily("nvmetd_state_generation", "generation of the durable state")
        generation.add_metric([], status["generation"])
        yield generation


def _health_metric(cfs) -> Metric:
    from nvmetd import ns_health
    from target.live import read_state

    healthy = GaugeMetricFamily("nvmetd_namespace_healthy", "1 if a read of the enabled namespace's backing device "
                                "returned (state: ok, missing, io-error, stalled)",
                                labels=["subsystem", "nsid", "device", "state"])
    for row in ns_health.namespaces(read_state(cfs)):
        healthy.add_metric([row["subsystem"], str(row["nsid"]), row["device_path"], row["state"]],
                           1 if row["state"] == "ok" else 0)
    return healthy


def render_metrics(manager) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    registry.register(_Collector(manager))
    return generate_latest(registry), CONTENT_TYPE_LATEST
