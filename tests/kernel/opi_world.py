"""One nvmetd and one software DPU for the OPI kernel tests (test_opi.py, test_opi_offload.py), made once a session.

Starting nvmetd costs the most under emulation (a Python service start-up under TCG takes one to several minutes
on a loaded machine), so the two test modules share this host daemon (file pool `files`, LVM thin pool `thin`,
`[dpu]` pointing at the software DPU) and the DPU (its own netns, its cgroup on CPU 1), both started at once.
Each test leaves the daemon's OPI objects and VMs as it found them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import pools
from nvmetd.opi import softdpu
from nvmetd.opi.softdpu import SoftDpu
from target.configfs import ConfigFS
from tests.conftest import wipe
from tests.kernel.backend_rig import Loops, need
from tests.kernel.service_fixture import Daemon

MIB = 1 << 20
START_TIMEOUT = 900.0  # generous: only a hung start-up fails


@dataclass
class OpiWorld:
    host: Daemon  # this host's nvmetd: the OPI server of test_opi.py, the storage target and control plane
    dpu: SoftDpu

    def logs(self) -> str:
        return f"--- host nvmetd\n{self.host.log_text()[-3000:]}\n--- DPU nvmetd\n{self.dpu.log_tail(3000)}"


@pytest.fixture(scope="session")
def opi_world(nvmet_kernel: ConfigFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpiWorld]:
    need("lvcreate", "ip")
    wipe()
    root = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else tmp_path_factory.mktemp("opi")
    root.mkdir(parents=True, exist_ok=True)
    base = Path(subprocess.run(["mktemp", "-d", "-p", str(root)], check=True, capture_output=True,
                               text=True).stdout.strip())
    softdpu.make_network()
    softdpu.make_cgroup()
    dpu = SoftDpu(base / "dpu")
    host = Daemon(base / "host", extra_args=["--vhost-dir", str(base / "host-vhost")])
    host.base.mkdir()
    (host.base / "nvmetd.toml").write_text(dpu.host_config())
    loops = Loops(base)
    subprocess.run(["modprobe", "loop"], check=False, capture_output=True)
    try:
        pools.create_pool("file", "files", devices=[str(base / "files")], root=host.pools_root)
        pools.create_pool("lvm", "thin", [loops.make("pv", 512 * MIB)], root=host.pools_root)
        dpu.spawn()
        failed: list[BaseException] = []

        def start_host() -> None:
            try:
                host.start(deadline=START_TIMEOUT)
            except BaseException as exc:  # reported by the main thread
                failed.append(exc)

        starter = threading.Thread(target=start_host)
        starter.start()  # both Python start-ups at once: the DPU's on CPU 1, the host's wherever it runs
        dpu.wait_ready(START_TIMEOUT)
        starter.join()
        if failed:
            raise failed[0]
        yield OpiWorld(host, dpu)
    finally:
        host.stop()
        dpu.kill9()
        softdpu.remove_cgroup()  # the DPU's engines: only processes the software DPU started
        subprocess.run(["nvme", "disconnect-all"], capture_output=True, check=False)
        softdpu.remove_network()
        wipe()
        for pool in ("thin", "files"):
            try:
                pools.destroy_pool(pool, root=host.pools_root, force=True)
            except Exception as exc:  # a pool never made: nothing to destroy
                print(f"opi_world teardown: pool {pool}: {exc}")
        loops.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(dpu.vhost_dir, ignore_errors=True)
