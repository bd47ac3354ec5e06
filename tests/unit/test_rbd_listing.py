"""`disk list` on an rbd pool asks the cluster its pool-wide facts (df, the placement groups) once per listing:
each disk's info needs them, and one `pg ls-by-pool` per disk per listing does not scale past tens of disks. The
cluster is a stand-in counting commands (the kernel suite's test_rbd runs the same listing on a real cluster)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from backends.rbd import RbdBackend


class CountingClient:
    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()

    def command(self, prefix: str, **_: Any) -> Any:
        self.asked[prefix] += 1
        if prefix == "df":
            return {"pools": [{"name": "nvmetd-ceph", "stats": {"stored": 1 << 20, "max_avail": 1 << 30,
                                                                "percent_used": 0.001}}]}
        return {"pg_stats": [{"state": "active+clean", "acting": [0, 1, 2]} for _ in range(8)]}


class Pool(RbdBackend):
    stand_in = CountingClient()

    @property
    def client(self) -> Any:  # type: ignore[override]
        return self.stand_in

    def _on_image(self, vol: Any, what: str, call: Any, read_only: bool = False) -> Any:
        return 4 << 20  # bytes the image has written


def test_listing_asks_pool_facts_once(tmp_path: Path) -> None:
    pool = Pool("ceph", tmp_path, {"ceph_pool": "nvmetd-ceph", "size": 3, "compression": "off"}, 90.0)
    with pool.ledger.change() as doc:
        for n in range(5):
            doc["volumes"][f"d{n}"] = pool._new_record(f"d{n}", 64 << 20, "default", True, False, "off", {})
    disks = pool.list()
    assert [d.name for d in disks] == [f"d{n}" for n in range(5)]
    assert all(d.copies == 3 and d.copies_wanted == 3 and d.allocated_bytes == 4 << 20 for d in disks)
    assert pool.stand_in.asked == {"df": 1, "pg ls-by-pool": 1}
    assert [d.name for d in pool.list(["d3", "nothere", "d1"])] == ["d1", "d3"]  # what the manager's listing asks
    # outside a listing each info asks afresh: a copy count is a fact of now
    pool.info("d0")
    pool.info("d1")
    assert pool.stand_in.asked == {"df": 4, "pg ls-by-pool": 4}
