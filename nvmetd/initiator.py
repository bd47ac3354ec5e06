"""The host (initiator) side of a connection, through libnvme's Python bindings.

Used where nvmetd itself connects a namespace on this host (demo, benchmarks, host-side attach): it returns the
block device for a subsystem's namespace, found by NQN and NSID in sysfs, because /dev/nvmeXnY numbering is not
stable across runs.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SYS_NVME = Path("/sys/class/nvme")
HOST_MODULES = {"tcp": "nvme-tcp", "rdma": "nvme-rdma", "loop": "nvme-loop", "fc": "nvme-fc"}


class InitiatorError(Exception):
    pass


def host_id_for(hostnqn: str) -> str:
    """The kernel refuses two host NQNs with one host ID, so each NQN gets its own, derived stably."""
    tail = hostnqn.rsplit(":uuid:", 1)
    return tail[1] if len(tail) == 2 else str(uuid.uuid5(uuid.NAMESPACE_URL, hostnqn))


@dataclass
class Connection:
    subsysnqn: str
    controller: str  # e.g. nvme3
    _ctrl: object

    def device(self, nsid: int, timeout: float = 20.0) -> Path:
        return namespace_device(self.subsysnqn, nsid, self.controller, timeout)

    def disconnect(self) -> None:
        self._ctrl.disconnect()  # type: ignore[attr-defined]


def connect(subsysnqn: str, hostnqn: str, transport: str, traddr: str | None = None, trsvcid: str | None = None,
            dhchap_key: str | None = None) -> Connection:
    try:
        from libnvme import nvme
    except ImportError as exc:
        raise InitiatorError(f"libnvme's Python bindings are not installed ({exc}); run `make setup`") from None
    # the host side needs its own modules: nvme-fabrics and the transport's initiator (nvme-tcp, nvme-loop, ...)
    for module in ("nvme-fabrics", HOST_MODULES.get(transport, f"nvme-{transport}")):
        subprocess.run(["modprobe", "-q", module], check=False, capture_output=True)
    root = nvme.root()
    host = nvme.host(root, hostnqn=hostnqn, hostid=host_id_for(hostnqn), hostkey=dhchap_key)
    ctrl = nvme.ctrl(root, subsysnqn=subsysnqn, transport=transport, traddr=traddr, trsvcid=trsvcid)
    try:
        ctrl.connect(host)
    except Exception as exc:  # libnvme raises a bare Exception with the kernel's reason
        raise InitiatorError(f"connect to {subsysnqn} over {transport} failed: {exc}") from None
    return Connection(subsysnqn, ctrl.name, ctrl)


def namespace_device(subsysnqn: str, nsid: int, controller: str, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    ctrl_dir = SYS_NVME / controller
    while time.monotonic() < deadline:
        for ns in ctrl_dir.glob("nvme*n*"):
            nsid_file = ns / "nsid"
            if nsid_file.exists() and int(nsid_file.read_text()) == nsid and Path("/dev", ns.name).exists():
                return Path("/dev", ns.name)
        time.sleep(0.1)
    raise InitiatorError(f"namespace {nsid} of {subsysnqn} did not appear on {controller} within {timeout:.0f}s")
