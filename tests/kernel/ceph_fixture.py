"""The session's Ceph test cluster (tests/kernel/ceph_cluster.py) as a fixture every kernel test module may ask for:
started once, on first use, so a run that selects no Ceph test pays nothing for it (~2.5 min under TCG)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from target.configfs import ConfigFS
from tests.conftest import wipe
from tests.kernel.backend_rig import Loops, need
from tests.kernel.ceph_cluster import OSDS, Cluster

OSD_BYTES = 1 << 30


@pytest.fixture(scope="session")
def ceph(nvmet_kernel: ConfigFS) -> Iterator[Cluster]:
    """1 mon, 1 mgr, 3 BlueStore OSDs on loop devices; at teardown whatever a failed test left mapped is unmapped."""
    need("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "fio")
    subprocess.run(["modprobe", "-a", "loop", "rbd"], check=False, capture_output=True)
    base = Path("/run/nvmetd-test" if os.environ.get("NVMETD_IN_RIG") else "/tmp") / f"ceph-{os.getpid()}"
    base.mkdir(parents=True)
    loops = Loops(base)
    cluster = Cluster(base, [loops.make(f"osd{i}", OSD_BYTES) for i in range(OSDS)])
    try:
        cluster.start()
        steps = ", ".join(f"{step} {t:.0f} s" for step, t in cluster.phases.items())
        print(f"\nceph test cluster: 1 mon, 1 mgr, {OSDS} BlueStore OSDs up in {cluster.started_in:.1f} s ({steps})")
        yield cluster
    finally:
        wipe()
        rbd = ["rbd", "-c", str(cluster.conf), "device"]
        subprocess.run([*rbd, "list"], check=False)  # shows what a failed test left mapped
        for dev in sorted(Path("/dev").glob("rbd[0-9]*")):
            subprocess.run([*rbd, "unmap", "-o", "force", str(dev)], check=False, capture_output=True)
        cluster.stop()
        loops.close()
        subprocess.run(["rm", "-rf", str(base)], check=False)
