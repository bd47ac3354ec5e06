"""The nvmet side of the kernel vhost-nvme tests: one subsystem with one namespace on a vhost port, over a loop
device whose backing file the tests read below the whole stack (shared by test_vhost_kernel and its QEMU test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import parse_state
from tests.kernel.backend_rig import Loops

HOST = "nqn.2014-08.org.nvmexpress:uuid:0e8d3c55-7a4f-4b7e-9d2c-6b1a5f0c9e11"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:5d9e0a11-2b3c-4d4e-8f5a-6b7c8d9e0f12"
SUB = "nqn.2026-12.io.nvmetd:vhost-kernel"
NS_BYTES = 64 << 20


@pytest.fixture
def backing(loops: Loops) -> tuple[Path, str]:
    """A block device (512-byte LBAs, nvmet's bio path, as for LVM and zvols) over a sparse file on tmpfs; the
    tests check data in the file, below the whole stack."""
    dev = loops.make("vhost-ns1", NS_BYTES)
    return loops.scratch / "vhost-ns1.img", dev


def export(cfs: ConfigFS, device: str, hosts: list[str] | None = None) -> None:
    hosts = [HOST] if hosts is None else hosts
    state = parse_state({
        "hosts": [{"nqn": h} for h in hosts],
        "subsystems": [{"nqn": SUB, "allowed_hosts": hosts,
                        "namespaces": [{"nsid": 1, "device_path": device}]}],
        "ports": [{"id": 7, "trtype": "vhost", "subsystems": [SUB]}],
    })
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
