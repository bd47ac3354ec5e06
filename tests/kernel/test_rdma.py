"""NVMe/RDMA through the soft-RoCE driver (rdma_rxe) on a veth pair inside the rig VM.

Over `lo` the host-side route resolution times out (kernel-rig.md); a veth pair with addresses works. The
addresses are TEST-NET-1 on links that exist only inside the VM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import parse_state
from tests.kernel import hostside

pytestmark = pytest.mark.kernel

HOST = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-1111-2222-3333-444444444444"
SUB = "nqn.2026-11.io.nvmetd:rdma"
TARGET_ADDR, HOST_ADDR = "192.0.2.10", "192.0.2.11"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def rxe_pair():
    sh("modprobe", "-a", "rdma_rxe", "nvmet-rdma", "nvme-rdma")
    sh("ip", "link", "add", "nvr0", "type", "veth", "peer", "name", "nvr1")
    try:
        sh("ip", "addr", "add", f"{TARGET_ADDR}/24", "dev", "nvr0")
        sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", "nvr1")
        sh("ip", "link", "set", "nvr0", "up")
        sh("ip", "link", "set", "nvr1", "up")
        sh("rdma", "link", "add", "rxe_nvr0", "type", "rxe", "netdev", "nvr0")
        sh("rdma", "link", "add", "rxe_nvr1", "type", "rxe", "netdev", "nvr1")
        yield
    finally:
        for link in ("rxe_nvr0", "rxe_nvr1"):
            subprocess.run(["rdma", "link", "delete", link], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", "nvr0"], check=False, capture_output=True)


def test_rdma_port_connects_and_moves_data(cfs: ConfigFS, scratch: Path, rxe_pair: None) -> None:
    image = scratch / "rdma.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    state = parse_state({
        "hosts": [{"nqn": HOST}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST], "namespaces": [{"nsid": 1, "device_path": str(image)}]}],
        "ports": [{"id": 5, "trtype": "rdma", "adrfam": "ipv4", "traddr": TARGET_ADDR, "trsvcid": "4420",
                   "subsystems": [SUB]}],
    })
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
    assert apply_state(state, cfs).writes == 0
    hostside.connect("rdma", SUB, HOST, TARGET_ADDR, "4420")
    try:
        device = hostside.namespace_device(SUB, 1, "rdma")
        digest = hostside.write_read_verify(device, size=2 << 20, seed=5)
        import hashlib

        assert hashlib.sha256(hostside.direct_read(image, 2 << 20)).hexdigest() == digest
    finally:
        hostside.disconnect(SUB)
