"""The rig's emulated NVMe drives seen from the guest: found by serial, pulled and put back through QEMU's QMP.

rig/drives.py gives the VM the drives and relays QMP over the virtio-serial port `nvmetd.qmp`; this is the guest's
client of that port. Drives are found by serial (never by /dev/nvmeN number: nvme-loop and nvme-tcp tests make
more controllers, and a re-added drive comes back under a new number).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rig.drives import DRIVES_ENV, QMP_PORT, device_arguments, drive_id
from tests.conftest import IN_CI

SYS_NVME = Path("/sys/class/nvme")
BY_ID = Path("/dev/disk/by-id")


def require(count: int) -> list[str]:
    """The serials of the rig's drives; fewer than `count` skips on a developer machine and fails under CI."""
    serials = [s for s in os.environ.get(DRIVES_ENV, "").split(",") if s]
    if len(serials) < count:
        reason = f"this needs {count} emulated NVMe drives from the rig ({DRIVES_ENV}={','.join(serials)!r})"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return serials


def controller(serial: str) -> str | None:
    """The PCIe controller (nvmeN) whose serial is `serial`, if the guest has it now."""
    for ctrl in sorted(SYS_NVME.glob("nvme*")):
        try:
            if (ctrl / "transport").read_text().strip() == "pcie" and \
                    (ctrl / "serial").read_text().strip() == serial:
                return ctrl.name
        except OSError:
            continue
    return None


def stable_path(serial: str, timeout: float = 60.0) -> Path:
    """The drive's first namespace under /dev/disk/by-id: the same path after the drive is pulled and re-added."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ctrl = controller(serial)
        if ctrl and Path(f"/dev/{ctrl}n1").exists():
            for link in sorted(BY_ID.glob(f"nvme-*_{serial}")):
                if link.resolve() == Path(f"/dev/{ctrl}n1"):
                    return link
            subprocess.run(["udevadm", "settle", "--timeout", "5"], check=False, capture_output=True)
        time.sleep(0.2)
    raise AssertionError(f"drive {serial} has no /dev/disk/by-id link after {timeout:g} s")


def _port() -> Path:
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        if (entry / "name").read_text().strip() == QMP_PORT:
            return Path("/dev", entry.name)
    raise AssertionError(f"no virtio-serial port named {QMP_PORT}: the rig did not give this VM its QMP relay")


class Qmp:
    """One command at a time over the relay; replies are matched by id, so events and earlier leftovers in the
    port are skipped."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.fd = os.open(_port(), os.O_RDWR | os.O_NOCTTY)
        self.buffer = b""

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, name: str, timeout: float = 60.0, **arguments: Any) -> Any:
        ident = f"nvmetd-{os.getpid()}-{next(self._ids)}"
        os.write(self.fd, json.dumps({"execute": name, "arguments": arguments, "id": ident}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == ident:
                    if "error" in reply:
                        raise AssertionError(f"QMP {name}: {reply['error'].get('desc')}")
                    return reply.get("return")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"QMP {name}: no reply within {timeout:g} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                self.buffer += os.read(self.fd, 65536)


def pull(index: int, timeout: float = 120.0) -> None:
    """Hot-remove drive `index` (QMP device_del) and wait until the guest's kernel has let go of its controller."""
    serial = drive_id(index)
    with Qmp() as qmp:
        qmp.command("device_del", id=serial)
    _wait(lambda: controller(serial) is None, timeout, f"drive {serial} still present after device_del")


def put_back(index: int, timeout: float = 120.0) -> Path:
    """Re-add drive `index` (QMP device_add, same image and serial); its stable path once the guest sees it."""
    with Qmp() as qmp:
        qmp.command("device_add", **device_arguments(index))
    return stable_path(drive_id(index), timeout)


def _wait(done: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.2)
