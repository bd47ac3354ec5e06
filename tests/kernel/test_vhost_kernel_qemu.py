"""A stock Linux guest on the kernel back-end: the patched QEMU (qemu_patches/, ``backend=kernel``) inside the rig
opens /dev/vhost-nvme itself and a small TCG guest's own nvme driver writes and reads back through nvmet.

TCG inside TCG is slow, so this is one test: the nested guest boots in ~4 min on a quiet 2-core machine (measured
255 s boot + 17 s of I/O and checks with one other rig VM running).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest

from tests.kernel.test_vhost_kernel import (  # noqa: F401 (fixtures)
    HOST,
    SUB,
    backing,
    clean_kernel_log,
    export,
    vhost_module,
)
from vhost_nvme.qemu_args import kernel_device_args
from vhost_nvme.vm import VM, VMError, guest_kernel, qemu_binary

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def _sha(out: str) -> str:
    m = re.search(r"^([0-9a-f]{64})\s", out, re.M)
    assert m, out
    return m.group(1)


def test_stock_guest_driver_on_the_kernel_back_end(cfs, backing, tmp_path: Path) -> None:  # noqa: F811
    path, dev = backing
    export(cfs, dev)
    try:
        guest_kernel()
        qemu = qemu_binary(build=True)
    except VMError as exc:
        pytest.fail(f"the nested QEMU test cannot run: {exc}")
    started = time.monotonic()
    vm = VM(tmp_path / "vm", device_args=kernel_device_args(SUB, HOST, max_ioqpairs=1), memory="256M",
            qemu=qemu, boot_timeout=900, append="nvme_core.io_timeout=120 nvme_core.admin_timeout=120")
    booted = time.monotonic()
    try:
        out = vm.check("cat /sys/class/nvme/nvme0/subsysnqn /sys/class/nvme/nvme0/transport "
                       "/sys/block/nvme0n1/size", timeout=300)
        lines = [ln.strip() for ln in out.splitlines()]
        assert lines[-3:] == [SUB, "pcie", str(path.stat().st_size // 512)]
        want = _sha(vm.check("dd if=/dev/urandom of=/tmp/w bs=1M count=4 2>/dev/null && sha256sum /tmp/w",
                             timeout=300))
        vm.check("dd if=/tmp/w of=/dev/nvme0n1 bs=64k seek=32 oflag=direct conv=fsync 2>/dev/null", timeout=600)
        back = _sha(vm.check("dd if=/dev/nvme0n1 bs=64k skip=32 count=64 iflag=direct 2>/dev/null | sha256sum",
                             timeout=600))
        assert back == want
        with open(path, "rb") as f:  # below the whole stack: the loop device's backing file
            f.seek(2 * MiB)
            assert hashlib.sha256(f.read(4 * MiB)).hexdigest() == want
    finally:
        vm.close()
    print(f"\nnested guest: boot {booted - started:.0f} s, I/O and checks {time.monotonic() - booted:.0f} s")
