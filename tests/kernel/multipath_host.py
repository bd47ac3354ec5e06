"""The host side of native NVMe multipath in the rig: nvme_core reloaded with multipath=Y (the rig boots with
multipath=N so other tests get one device per controller), the shared head device, each path's ANA state.

`multipath` is a read-only parameter of nvme_core, so it can change only by reloading the module, which needs every
NVMe host controller gone (the nvmet tree wiped: a loop port pins nvme-loop)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST_MODULES = ("nvme_loop", "nvme_tcp", "nvme_rdma", "nvme_fabrics", "nvme", "nvme_core")
SYS_SUBSYS = Path("/sys/class/nvme-subsystem")
SYS_NVME = Path("/sys/class/nvme")


def _multipath() -> str:
    return Path("/sys/module/nvme_core/parameters/multipath").read_text().strip()


def _reload(multipath: bool) -> None:
    loaded = [m for m in HOST_MODULES if Path("/sys/module", m).exists()]
    subprocess.run(["nvme", "disconnect-all"], capture_output=True, check=False)
    if loaded:
        subprocess.run(["modprobe", "-r", *loaded], check=True, capture_output=True, timeout=120)
    subprocess.run(["modprobe", "nvme_core", f"multipath={'Y' if multipath else 'N'}"], check=True, timeout=120)
    subprocess.run(["modprobe", "-a", "nvme_fabrics", "nvme_tcp", "nvme_loop"], check=True, timeout=120)


@contextmanager
def native_multipath() -> Iterator[None]:
    """nvme_core with multipath=Y for the block, then back as it was."""
    before = _multipath()
    _reload(True)
    try:
        assert _multipath() == "Y"
        yield
    finally:
        _reload(before == "Y")


def head_device(nqn: str, nsid: int, timeout: float = 30.0) -> Path:
    """The multipath head (/dev/nvmeXnY) of namespace `nsid`: one block device for all paths to the subsystem."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sub in SYS_SUBSYS.glob("nvme-subsys*"):
            if (sub / "subsysnqn").read_text().strip() != nqn:
                continue
            for head in sub.glob("nvme*n*"):
                if (head / "nsid").exists() and int((head / "nsid").read_text()) == nsid \
                        and Path("/dev", head.name).exists():
                    return Path("/dev", head.name)
        time.sleep(0.2)
    raise AssertionError(f"no multipath head for {nqn} nsid {nsid} after {timeout:.0f} s")


def paths(nqn: str) -> dict[str, dict[str, str]]:
    """Per controller of `nqn`, keyed by its trsvcid: controller state, and the ANA state and I/O count of its path
    to the namespace (`nvmeXcYnZ`), as the host reads them."""
    found = {}
    for ctrl in SYS_NVME.glob("nvme*"):
        try:
            if (ctrl / "subsysnqn").read_text().strip() != nqn:
                continue
            address = dict(kv.split("=", 1) for kv in (ctrl / "address").read_text().strip().split(",") if "=" in kv)
            entry = {"ctrl": ctrl.name, "state": (ctrl / "state").read_text().strip()}
            for path in ctrl.glob("nvme*c*n*"):
                entry["ana_state"] = (path / "ana_state").read_text().strip()
                entry["ios"] = str(sum(int(f) for f in (path / "stat").read_text().split()[0:5:4]))  # reads+writes
        except OSError:
            continue
        found[address.get("trsvcid", "?")] = entry
    return found
