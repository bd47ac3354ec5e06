"""Prometheus metrics: per-namespace I/O from the block layer, per-pool usage, per-object reconcile status."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

# /sys/block/<dev>/stat fields (Documentation/block/stat.rst)
_STAT_FIELDS = {"read_ios": 0, "read_sectors": 2, "read_ticks_ms": 3, "write_ios": 4, "write_sectors": 6,
                "write_ticks_ms": 7}


def block_stats(device: str) -> dict[str, int] | None:
    dev = Path(device).resolve()
    stat = Path("/sys/class/block", dev.name, "stat")
    try:
        fields = [int(x) for x in stat.read_text().split()]
    except (OSError, ValueError):
        return None
    return {k: fields[i] for k, i in _STAT_FIELDS.items()}


def render_metrics(manager) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    ios = Gauge("nvmetd_namespace_ios_total", "I/Os completed by the namespace's backing block device",
                ["subsystem", "nsid", "direction"], registry=registry)
    nbytes = Gauge("nvmetd_namespace_bytes_total", "bytes moved by the namespace's backing block device",
                   ["subsystem", "nsid", "direction"], registry=registry)
    ticks = Gauge("nvmetd_namespace_io_seconds_total", "time spent on I/O (sum of per-request latencies)",
                  ["subsystem", "nsid", "direction"], registry=registry)
    cfs = manager.cfs
    for sub in cfs.listdir("subsystems"):
        for nsid in cfs.listdir(f"subsystems/{sub}/namespaces"):
            path = cfs.read(f"subsystems/{sub}/namespaces/{nsid}", "device_path")
            stats = block_stats(path) if path and path.startswith("/dev/") else None
            if stats is None:
                continue
            for d in ("read", "write"):
                ios.labels(sub, nsid, d).set(stats[f"{d}_ios"])
                nbytes.labels(sub, nsid, d).set(stats[f"{d}_sectors"] * 512)
                ticks.labels(sub, nsid, d).set(stats[f"{d}_ticks_ms"] / 1000)
    pool_size = Gauge("nvmetd_pool_size_bytes", "pool size", ["pool"], registry=registry)
    pool_fill = Gauge("nvmetd_pool_fill_ratio", "pool fill (0-1)", ["pool"], registry=registry)
    status = manager.status()
    for name, st in status["pools"].items():
        if "error" in st:
            continue
        pool_size.labels(name).set(st.get("size_bytes", 0))
        pool_fill.labels(name).set(st.get("fill_percent", 0) / 100)
    objects = Gauge("nvmetd_object_converged", "1 if the object matches the desired state",
                    ["object", "status"], registry=registry)
    if status["reconcile"]:
        for key, st in status["reconcile"]["objects"].items():
            objects.labels(key, st["status"]).set(1 if st["status"] in ("ok", "changed", "removed") else 0)
    generation = Gauge("nvmetd_state_generation", "generation of the durable state", registry=registry)
    generation.set(status["generation"])
    return generate_latest(registry), CONTENT_TYPE_LATEST
