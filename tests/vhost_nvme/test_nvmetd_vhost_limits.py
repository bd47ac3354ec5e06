"""nvmetd's disk limits on the vhost engine path: `disk limits --rwiops/--rwmbps` become the engine's token bucket
(NS_SET_LIMITS) on the running namespace, measured from a guest (the Python/C guest driver) on this machine's own
kernel, as the other engine tests are: no nvmet is involved.

Rates are measured at queue depth 1 from Python, so the limits are set to a fraction of the solo rate measured in
the same test: the bucket, not the machine, sets the pace, and +-15% means something on a loaded host.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nvmetd.errors import Unsupported
from nvmetd.manager import Manager
from tests.vhost_nvme.test_nvmetd_vhost import make_manager, manager  # noqa: F401 (the fixture)
from vhost_nvme.client import EngineClient
from vhost_nvme.guest import GuestDriver

SPAN = 8 << 20  # the disks' size (test_nvmetd_vhost's fixture)


def rate(g: GuestDriver, nsid: int, write: bool, seconds: float, nlb: int) -> tuple[float, float]:
    """(IOPS, bytes/s) of synchronous commands after a short warm-up that drains the bucket's burst."""
    data, blocks = bytes(nlb * 512), SPAN // 512
    n, lba = 0, 0
    for phase, length in (("warm", 0.3), ("measure", seconds)):
        n, start = 0, time.monotonic()
        while time.monotonic() - start < length:
            lba = (lba + nlb) % (blocks - nlb)
            cqe = g.write(1, nsid, lba, data) if write else g.read(1, nsid, lba, nlb)[0]
            assert cqe.status == 0, (phase, cqe)
            n += 1
    elapsed = time.monotonic() - start
    return n / elapsed, n * nlb * 512 / elapsed


def within(measured: float, limit: float, tolerance: float = 0.15) -> bool:
    return abs(measured - limit) <= tolerance * limit


def test_engine_limits_on_a_running_namespace(manager: Manager, tmp_path: Path) -> None:  # noqa: F811
    sock = manager.attach("vm1", "d1", "vhost").to_dict()["vhost_socket"]
    manager.attach("vm1", "d2", "vhost")
    g = GuestDriver(sock)
    try:
        g.enable()
        g.create_io_queue(1, 64)
        solo_iops = rate(g, 1, False, 1.0, 8)[0]
        solo_bps = rate(g, 1, False, 1.0, 128)[1]

        # reads and writes together, set on the running namespace (same queues, no reconnect)
        iops = max(20, min(int(solo_iops * 0.05), 400))  # far below what a loaded host still does
        assert manager.set_limits("d1", {"rwiops": iops})["limits"] == {"rwiops": iops}
        got = rate(g, 1, False, 2.0, 8)[0]
        assert within(got, iops), (got, iops, solo_iops)
        got = rate(g, 1, True, 2.0, 8)[0]
        assert within(got, iops), (got, iops, solo_iops)
        other = rate(g, 2, False, 1.0, 8)[0]  # the other namespace of the same controller is not limited
        assert other > iops * 3, (other, iops)

        # raised
        manager.set_limits("d1", {"rwiops": iops * 2})
        got = rate(g, 1, False, 2.0, 8)[0]
        assert within(got, iops * 2), (got, iops * 2)

        # MB/s (10^6 bytes), 64 KiB commands
        mbps = max(1, min(int(solo_bps * 0.05 / 1e6), 16))
        manager.set_limits("d1", {"rwiops": 0, "rwmbps": mbps})
        got = rate(g, 1, False, 2.0, 128)[1]
        assert within(got, mbps * 1e6), (got, mbps, solo_bps)

        # limits survive an nvmetd restart: the new nvmetd sets them again from the state (here the engine lost
        # them by hand while nvmetd was down)
        EngineClient(sock).set_limits(1, 0, 0)
        again = make_manager(tmp_path)
        again.reconcile()
        got = rate(g, 1, False, 2.0, 128)[1]
        assert within(got, mbps * 1e6), (got, mbps)

        # removed: back to the solo rate's neighbourhood
        assert again.set_limits("d1", {"rwmbps": 0})["limits"] == {}
        got = rate(g, 1, False, 1.0, 8)[0]
        assert got > iops * 3, (got, iops)

        # a kind of limit this path cannot enforce exactly is refused, naming the field, and nothing is stored
        with pytest.raises(Unsupported, match="riops"):
            again.set_limits("d1", {"riops": 100})
        assert again.disk_info("d1")["limits"] == {}
    finally:
        g.close()

