"""Which back-end serves `attach --transport vhost`: the in-kernel transport (kernel_patches/, nvmet-vhost) or
nvmetd's userspace engine.

On the kernel back-end the VM's disks are ordinary nvmet namespaces of the VM's own subsystem, exported on a port
of type `vhost`; QEMU (qemu_patches/ 0003, `backend=kernel`) opens /dev/vhost-nvme and binds it to that subsystem
with a host NQN, and nvmet checks the subsystem's allowed hosts as for any fabrics host.  So backends, restore at
boot, drift repair and metrics apply unchanged, and no nvmetd process is in the I/O path.

The host NQN of that bind is not the VM's usual one.  The VM's fabrics host NQN carries its DH-CHAP key, and the
kernel transport does no authentication: nvmet would demand it and refuse the bind.  So each VM has a second host
NQN dedicated to the vhost path (`vhost_hostnqn`), declared without a key and allowed only on its subsystem.  A
key-less host must never be reachable over a fabric, so a VM on the kernel back-end has no tcp/rdma/loop disks
(attach refuses the mix): its subsystem is exported on the vhost port only, where the only way in is a process
that can open /dev/vhost-nvme (root, i.e. the hypervisor's QEMU as the management plane starts it).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Literal

DEVICE = Path("/dev/vhost-nvme")
MODULE = "nvmet-vhost"
VHOST_HOST_PREFIX = "nqn.2026-11.io.nvmetd:vhost-host:"
Backend = Literal["engine", "kernel"]
Choice = Literal["auto", "kernel", "engine"]


def vhost_hostnqn(vm_uuid: str) -> str:
    """The key-less host NQN a VM's QEMU binds /dev/vhost-nvme with (see the module docstring for why)."""
    return f"{VHOST_HOST_PREFIX}{vm_uuid}"


def kernel_available(device: Path = DEVICE, wait: float = 2.0) -> tuple[bool, str]:
    """Load nvmet-vhost if needed and wait for its device node; (available, why)."""
    if not device.exists():
        try:
            proc = subprocess.run(["modprobe", MODULE], capture_output=True, text=True, check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"modprobe {MODULE} could not run ({exc})"
        if proc.returncode:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            return False, f"{MODULE} does not load ({why}; kernel_patches/build.sh builds it)"
        deadline = time.monotonic() + wait
        while not device.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not device.exists():
            return False, f"{MODULE} is loaded but {device} did not appear"
    return True, f"{MODULE} is loaded and {device} is there"


def choose_backend(configured: Choice, current: Backend | None) -> tuple[Backend, str]:
    """The back-end of a VM's next vhost disk.  All vhost disks of a VM are namespaces of one controller, so a VM
    that has one keeps its back-end; otherwise `[vhost] backend` decides (auto: the kernel when it is there)."""
    if current is not None:
        return current, f"the VM's vhost controller is on the {current} back-end already"
    if configured == "engine":
        return "engine", "[vhost] backend = engine"
    ok, why = kernel_available()
    if ok:
        return "kernel", why
    if configured == "kernel":
        raise KernelBackendMissing(f"[vhost] backend = kernel, but {why}")
    return "engine", f"the userspace engine, because {why}"


class KernelBackendMissing(Exception):
    """`[vhost] backend = kernel` on a host without the module; the manager turns it into Unsupported."""
