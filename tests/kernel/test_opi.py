"""The OPI storage API of a real nvmetd on the real kernel, driven by pydpu (a client we did not write).

One nvmetd plays both ends of a DPU's storage path: an OPI subsystem on a file disk exported over NVMe/TCP is the
storage target; an OPI remote controller + path connects to it through libnvme (a kernel nvme-tcp controller);
a second OPI subsystem re-exports that remote namespace on another TCP controller; a host connects there with
nvme-cli and writes, and the data is read back from the storage target's backing file. Then everything is
deleted through the API and the kernel is left as it was. The nvmetd is the session's (opi_world.py), shared
with test_opi_offload.py."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import grpc
import pytest
from pydpu import storage

from nvmetd.opi.stubs import backend_nvme_pb2 as bpb
from nvmetd.opi.stubs import backend_nvme_pb2_grpc as bgrpc
from nvmetd.opi.stubs import frontend_nvme_pb2 as fpb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as fgrpc
from nvmetd.opi.stubs import opicommon_pb2 as common
from target.configfs import ConfigFS
from tests.kernel import hostside
from tests.kernel.opi_world import OpiWorld
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

STORAGE_NQN = "nqn.2026-12.io.example:storage-target"
FRONT_NQN = "nqn.2026-12.io.example:dpu-front"
DPU_HOST = "nqn.2014-08.org.nvmexpress:uuid:0b5e7d3c-1111-4a2b-9c3d-5e6f7a8b9c0d"
GUEST_HOST = "nqn.2014-08.org.nvmexpress:uuid:0b5e7d3c-2222-4a2b-9c3d-5e6f7a8b9c0d"


def tcp_controller(parent: str, cid: str, port: str) -> fpb.CreateNvmeControllerRequest:
    return fpb.CreateNvmeControllerRequest(parent=parent, nvme_controller_id=cid, nvme_controller=fpb.NvmeController(
        spec=fpb.NvmeControllerSpec(trtype=common.NVME_TRANSPORT_TYPE_TCP, fabrics_id=common.FabricsEndpoint(
            traddr="127.0.0.1", trsvcid=port, adrfam=common.NVME_ADDRESS_FAMILY_IPV4))))


@pytest.fixture
def daemon(opi_world: OpiWorld, cfs: ConfigFS) -> Iterator[Daemon]:
    """The session's nvmetd (tests/kernel/opi_world.py); the nvme connections this test made go afterwards."""
    yield opi_world.host
    hostside.disconnect(FRONT_NQN)
    hostside.disconnect(STORAGE_NQN)


def test_opi_remote_path_reexported_end_to_end(daemon: Daemon, cfs: ConfigFS) -> None:
    assert daemon.request("POST", "/v1/disks", {"name": "store0", "pool": "files", "size": "16M"}).status_code == 200
    addr = f"unix:{daemon.socket.parent / 'opi.sock'}"
    front = fgrpc.FrontendNvmeServiceStub(grpc.insecure_channel(addr))
    back = bgrpc.NvmeRemoteControllerServiceStub(grpc.insecure_channel(addr))

    # the storage target: an OPI subsystem on disk store0, exported over TCP to the DPU's host NQN only
    target_sub = storage.NvmeSubsystem(nqn=STORAGE_NQN)
    target_sub.create(addr)
    front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name=target_sub.name))
    front.CreateNvmeSubsystem(fpb.CreateNvmeSubsystemRequest(
        nvme_subsystem_id="storage", nvme_subsystem=fpb.NvmeSubsystem(spec=fpb.NvmeSubsystemSpec(
            nqn=STORAGE_NQN, hostnqn=DPU_HOST))))
    front.CreateNvmeController(tcp_controller("nvmeSubsystems/storage", "tcp0", "4460"))
    front.CreateNvmeNamespace(fpb.CreateNvmeNamespaceRequest(
        parent="nvmeSubsystems/storage", nvme_namespace_id="store0",
        nvme_namespace=fpb.NvmeNamespace(spec=fpb.NvmeNamespaceSpec(volume_name_ref="store0", host_nsid=1))))
    assert cfs.read(f"subsystems/{STORAGE_NQN}/namespaces/1", "enable").strip() == "1"

    # the backend path, through libnvme; a path to where nothing listens is refused and changes nothing
    rc = storage.NvmeRemoteController(multipath=bpb.NVME_MULTIPATH_DISABLE, hdgst=False, ddgst=False)
    rc.create(addr)
    before = daemon.state.read_text()
    nowhere = storage.NvmeTcpPath(rc, ip="127.0.0.1", port=4469, subnqn=STORAGE_NQN, hostnqn=DPU_HOST)
    with pytest.raises(grpc.RpcError) as err:
        nowhere.create(addr)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert daemon.state.read_text() == before and not hostside.controllers(STORAGE_NQN)
    path = storage.NvmeTcpPath(rc, ip="127.0.0.1", port=4460, subnqn=STORAGE_NQN, hostnqn=DPU_HOST)
    assert path.create(addr).fabrics.subnqn == STORAGE_NQN
    assert len(hostside.controllers(STORAGE_NQN, "tcp")) == 1
    remote = back.ListNvmeRemoteNamespaces(bpb.ListNvmeRemoteNamespacesRequest(parent=rc.name))
    assert [n.name for n in remote.nvme_remote_namespaces] == [f"{rc.name}/nvmeRemoteNamespaces/1"]

    # the DPU's front end: the remote namespace re-exported to the guest's host NQN on another port
    front.CreateNvmeSubsystem(fpb.CreateNvmeSubsystemRequest(
        nvme_subsystem_id="front", nvme_subsystem=fpb.NvmeSubsystem(spec=fpb.NvmeSubsystemSpec(
            nqn=FRONT_NQN, hostnqn=GUEST_HOST))))
    front.CreateNvmeController(tcp_controller("nvmeSubsystems/front", "tcp0", "4461"))
    ns = front.CreateNvmeNamespace(fpb.CreateNvmeNamespaceRequest(
        parent="nvmeSubsystems/front", nvme_namespace_id="vol",
        nvme_namespace=fpb.NvmeNamespace(spec=fpb.NvmeNamespaceSpec(
            volume_name_ref=f"{rc.name}/nvmeRemoteNamespaces/1"))))
    assert ns.status.state == fpb.NvmeNamespaceStatus.STATE_ENABLED
    assert cfs.read(f"subsystems/{FRONT_NQN}/namespaces/1", "device_path").startswith("/dev/nvme")

    hostside.connect("tcp", FRONT_NQN, GUEST_HOST, "127.0.0.1", "4461")
    device = hostside.namespace_device(FRONT_NQN, 1, "tcp")
    size = 4 << 20
    hostside.write_read_verify(device, size=size, seed=13)
    backing = daemon.request("GET", "/v1/disks/store0").json()["device_path"]
    expected = hashlib.shake_256(b"nvmetd-13").digest(size)
    assert hostside.direct_read(backing, size) == expected  # the bytes landed on the storage target's volume

    stats = back.StatsNvmeRemoteController(bpb.StatsNvmeRemoteControllerRequest(name=rc.name)).stats
    assert stats.write_bytes_count >= size and stats.write_ops_count > 0
    assert front.StatsNvmeNamespace(fpb.StatsNvmeNamespaceRequest(name=ns.name)).stats.read_bytes_count >= size

    # the last path of a volume in use is refused; then everything goes, in reverse
    with pytest.raises(grpc.RpcError) as err:
        path.delete(addr)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    hostside.disconnect(FRONT_NQN)
    front.DeleteNvmeController(fpb.DeleteNvmeControllerRequest(name="nvmeSubsystems/front/nvmeControllers/tcp0"))
    front.DeleteNvmeNamespace(fpb.DeleteNvmeNamespaceRequest(name=ns.name))
    front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name="nvmeSubsystems/front"))
    path.delete(addr)
    assert not hostside.controllers(STORAGE_NQN)
    rc.delete(addr)
    front.DeleteNvmeController(fpb.DeleteNvmeControllerRequest(name="nvmeSubsystems/storage/nvmeControllers/tcp0"))
    front.DeleteNvmeNamespace(fpb.DeleteNvmeNamespaceRequest(name="nvmeSubsystems/storage/nvmeNamespaces/store0"))
    front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name="nvmeSubsystems/storage"))
    assert cfs.listdir("subsystems") == [] and cfs.listdir("ports") == []
    assert os.path.exists(backing)
    assert daemon.request("DELETE", "/v1/disks/store0").status_code == 200
