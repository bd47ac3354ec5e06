"""The OPI storage API driven by a client we did not write (pydpu 0.2.1's storage classes, and its generated stubs
for what those classes do not send), against our gRPC server on a Unix socket, on a real Manager with a real
store, a real file pool and a fake configfs tree. PCIE controllers start real vhost-nvme engines.
Every bad request must get the status opi-api (AIP-193) defines and leave the store and the tree as they were.
The same against the real kernel (TCP ports, libnvme remote paths) is tests/kernel/test_opi.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydpu import storage  # the client under test is theirs

from backends import pools
from nvmetd.errors import UserError
from nvmetd.manager import Manager
from nvmetd.opi.server import build
from nvmetd.opi.stubs import backend_nvme_pb2 as bpb
from nvmetd.opi.stubs import backend_nvme_pb2_grpc as bgrpc
from nvmetd.opi.stubs import frontend_nvme_pb2 as fpb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as fgrpc
from nvmetd.opi.stubs import middleend_encryption_pb2 as epb
from nvmetd.opi.stubs import middleend_encryption_pb2_grpc as egrpc
from nvmetd.opi.stubs import middleend_qos_volume_pb2 as qpb
from nvmetd.opi.stubs import middleend_qos_volume_pb2_grpc as qgrpc
from nvmetd.opi.stubs import opicommon_pb2 as common
from nvmetd.vhost import VhostEngines
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel

NQN = "nqn.2026-12.io.example:opi-unit"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6a1c5d0e-8f0e-4c59-9d0a-2a4f7f3d1b11"


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        FakeKernel(base / "nvmet")
        pools.create_pool("file", "files", devices=[str(base / "files")], root=base / "pools")
        self.vhost_dir = Path(tempfile.mkdtemp(prefix="opi-", dir="/tmp"))
        self.manager = Manager(StateStore(base / "state" / "state.json"), FakeFS(root=base / "nvmet"),
                               pools_root=base / "pools", keys_dir=base / "keys", host_connect=False,
                               vhost=VhostEngines(self.vhost_dir))
        self.manager.create_disk("d0", "files", "4M")
        self.manager.create_disk("d1", "files", "4M")
        self.socket = self.vhost_dir / "opi.sock"
        self.address = f"unix:{self.socket}"
        self.server = build(self.manager, self.socket)
        self.server.start()
        self.channel = grpc.insecure_channel(self.address)
        self.front = fgrpc.FrontendNvmeServiceStub(self.channel)
        self.back = bgrpc.NvmeRemoteControllerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=1).wait()
        self.manager.vhost.reconcile([])  # stops engines the PCIE controllers started
        shutil.rmtree(self.vhost_dir, ignore_errors=True)

    def snapshot(self) -> tuple[Any, dict[str, str]]:
        """The OPI part of the store and every file and link in the fake nvmet tree."""
        tree = {}
        for p in sorted((self.base / "nvmet").rglob("*")):
            rel = str(p.relative_to(self.base / "nvmet"))
            tree[rel] = (f"-> {p.readlink()}" if p.is_symlink() else p.read_text() if p.is_file() else "/")
        return self.manager.store.load().get("opi"), tree


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("opi"))
    try:
        yield w
    finally:
        w.close()


def refused(call: Any, code: grpc.StatusCode, world: World) -> str:
    """The call fails with `code` and changes nothing; returns the message."""
    before = world.snapshot()
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert "Traceback" not in (err.value.details() or "")
    assert world.snapshot() == before
    return err.value.details() or ""


def test_pydpu_drives_subsystem_namespace_pcie_controller(world: World) -> None:
    sub = storage.NvmeSubsystem(nqn=NQN, model="nvmetd-opi", serial="OPI0001", ns=4)
    created = sub.create(world.address)
    assert created.name == sub.name and created.spec.nqn == NQN
    # no TCP/RDMA controller: nobody could reach it through nvmet, so the kernel target does not hold it
    assert not (world.base / "nvmet/subsystems" / NQN).exists()
    assert sub.get(world.address).spec.serial_number == "OPI0001"
    assert [s.name for s in sub.list(world.address).nvme_subsystems] == [sub.name]

    ns = storage.NvmeNamespace(sub, volume="d0")
    made = ns.create(world.address)
    assert made.spec.host_nsid == 1 and made.spec.volume_name_ref == "d0"
    assert ns.get(world.address).status.state == fpb.NvmeNamespaceStatus.STATE_DISABLED  # served by nobody yet
    assert [n.name for n in ns.list(world.address).nvme_namespaces] == [ns.name]
    # a file-backed volume has no kernel I/O counters: refused, not answered with zeros
    refused(lambda: ns.stats(world.address), grpc.StatusCode.FAILED_PRECONDITION, world)

    ctrl = storage.NvmeController(sub, queue=64, pf=0, vf=3, port=0)
    c = ctrl.create(world.address)
    assert c.spec.trtype == common.NVME_TRANSPORT_TYPE_PCIE and c.status.active
    from nvmetd.opi.state import pcie_uuid
    from vhost_nvme.client import EngineClient

    engine = EngineClient(world.vhost_dir / f"{pcie_uuid(0, 0, 3)}.sock")
    assert {n: e.name for n, e in engine.namespaces().items()} == {1: "d0"}
    assert ctrl.get(world.address).status.active
    assert ns.get(world.address).status.state == fpb.NvmeNamespaceStatus.STATE_ENABLED
    assert not (world.base / "nvmet/subsystems" / NQN).exists()  # the engine serves it, not nvmet
    assert [x.name for x in ctrl.list(world.address).nvme_controllers] == [ctrl.name]

    # one state, two APIs: the Manager (the HTTP API's) will not take the OPI namespace's disk away
    with pytest.raises(UserError, match="OPI"):
        world.manager.attach("vm-x", "d0", "tcp")
    with pytest.raises(UserError, match="nvmeNamespaces"):
        world.manager.delete_disk("d0")

    refused(lambda: sub.delete(world.address), grpc.StatusCode.FAILED_PRECONDITION, world)
    ctrl.delete(world.address)
    assert not engine.alive()
    ns.delete(world.address)
    sub.delete(world.address)
    assert not (world.base / "nvmet/subsystems" / NQN).exists()
    assert world.manager.store.load()["opi"]["subsystems"] == {}


def test_tcp_controller_is_an_nvmet_port(world: World) -> None:
    world.front.CreateNvmeSubsystem(fpb.CreateNvmeSubsystemRequest(
        nvme_subsystem_id="tcp-sub", nvme_subsystem=fpb.NvmeSubsystem(spec=fpb.NvmeSubsystemSpec(
            nqn=NQN + "-tcp", hostnqn=HOSTNQN))))
    fabrics = common.FabricsEndpoint(traddr="127.0.0.1", trsvcid="4431", adrfam=common.NVME_ADDRESS_FAMILY_IPV4)
    c = world.front.CreateNvmeController(fpb.CreateNvmeControllerRequest(
        parent="nvmeSubsystems/tcp-sub", nvme_controller_id="c1", nvme_controller=fpb.NvmeController(
            spec=fpb.NvmeControllerSpec(trtype=common.NVME_TRANSPORT_TYPE_TCP, fabrics_id=fabrics))))
    assert c.status.active and c.spec.fabrics_id.trsvcid == "4431"
    port = world.base / "nvmet/ports/1000"
    assert (port / "addr_trtype").read_text().strip() == "tcp"
    assert (port / "addr_trsvcid").read_text().strip() == "4431"
    assert (port / "subsystems" / (NQN + "-tcp")).is_symlink()
    assert (world.base / f"nvmet/subsystems/{NQN}-tcp/allowed_hosts/{HOSTNQN}").is_symlink()
    assert (world.base / f"nvmet/subsystems/{NQN}-tcp/attr_allow_any_host").read_text().strip() == "0"
    made = world.front.CreateNvmeNamespace(_ns("nvmeSubsystems/tcp-sub", "d0", "n0"))
    device = (world.base / f"nvmet/subsystems/{NQN}-tcp/namespaces/1/device_path").read_text().strip()
    assert device == world.manager.disk_info("d0")["device_path"]
    assert made.status.state == fpb.NvmeNamespaceStatus.STATE_ENABLED
    # the same address twice in one subsystem
    refused(lambda: world.front.CreateNvmeController(fpb.CreateNvmeControllerRequest(
        parent="nvmeSubsystems/tcp-sub", nvme_controller_id="c2", nvme_controller=fpb.NvmeController(
            spec=fpb.NvmeControllerSpec(trtype=common.NVME_TRANSPORT_TYPE_TCP, fabrics_id=fabrics)))),
        grpc.StatusCode.ALREADY_EXISTS, world)
    world.front.DeleteNvmeController(fpb.DeleteNvmeControllerRequest(name="nvmeSubsystems/tcp-sub/nvmeControllers/c1"))
    assert not port.exists() and not (world.base / f"nvmet/subsystems/{NQN}-tcp").exists()
    world.front.DeleteNvmeNamespace(fpb.DeleteNvmeNamespaceRequest(name="nvmeSubsystems/tcp-sub/nvmeNamespaces/n0"))
    world.front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name="nvmeSubsystems/tcp-sub"))


@pytest.fixture
def one_subsystem(world: World) -> Iterator[str]:
    world.front.CreateNvmeSubsystem(fpb.CreateNvmeSubsystemRequest(
        nvme_subsystem_id="bad-sub", nvme_subsystem=fpb.NvmeSubsystem(spec=fpb.NvmeSubsystemSpec(nqn=NQN + "-b"))))
    world.front.CreateNvmeNamespace(fpb.CreateNvmeNamespaceRequest(
        parent="nvmeSubsystems/bad-sub", nvme_namespace_id="n1",
        nvme_namespace=fpb.NvmeNamespace(spec=fpb.NvmeNamespaceSpec(volume_name_ref="d1", host_nsid=1))))
    yield "nvmeSubsystems/bad-sub"
    world.front.DeleteNvmeNamespace(fpb.DeleteNvmeNamespaceRequest(name="nvmeSubsystems/bad-sub/nvmeNamespaces/n1"))
    world.front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name="nvmeSubsystems/bad-sub"))


def _sub(nqn: str, sid: str = "") -> fpb.CreateNvmeSubsystemRequest:
    return fpb.CreateNvmeSubsystemRequest(nvme_subsystem_id=sid, nvme_subsystem=fpb.NvmeSubsystem(
        spec=fpb.NvmeSubsystemSpec(nqn=nqn)))


def _ns(parent: str, volume: str, nid: str = "", nsid: int = 0) -> fpb.CreateNvmeNamespaceRequest:
    return fpb.CreateNvmeNamespaceRequest(parent=parent, nvme_namespace_id=nid, nvme_namespace=fpb.NvmeNamespace(
        spec=fpb.NvmeNamespaceSpec(volume_name_ref=volume, host_nsid=nsid)))


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
IN_USE = grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(("what", "code"), [
    ("bad nqn", INVALID), ("reserved nqn", INVALID), ("traversal id", INVALID), ("upper-case id", INVALID),
    ("duplicate id", EXISTS), ("duplicate nqn", EXISTS), ("unknown get", NOT_FOUND), ("traversal get", INVALID),
    ("unknown delete", NOT_FOUND), ("unknown parent", NOT_FOUND), ("traversal parent", INVALID),
    ("traversal volume", INVALID), ("unknown volume", NOT_FOUND), ("volume in use", IN_USE),
    ("duplicate nsid", EXISTS), ("bad uuid", INVALID), ("unknown remote volume", NOT_FOUND),
    ("bad trtype", INVALID), ("bad traddr", INVALID), ("bad trsvcid", INVALID),
    ("qos limit", IN_USE), ("bad page token", INVALID),
    ("unknown namespace", NOT_FOUND), ("unknown controller", NOT_FOUND), ("children", IN_USE),
])
def test_frontend_bad_requests_change_nothing(world: World, one_subsystem: str, what: str,
                                              code: grpc.StatusCode) -> None:
    f = world.front
    parent = one_subsystem
    tcp = fpb.NvmeControllerSpec(trtype=common.NVME_TRANSPORT_TYPE_TCP, fabrics_id=common.FabricsEndpoint(
        traddr="127.0.0.1", trsvcid="4432", adrfam=common.NVME_ADDRESS_FAMILY_IPV4))
    bad_addr = fpb.NvmeControllerSpec()
    bad_addr.CopyFrom(tcp)
    bad_port = fpb.NvmeControllerSpec()
    bad_port.CopyFrom(tcp)
    qos = fpb.NvmeControllerSpec()
    qos.CopyFrom(tcp)
    if what == "bad traddr":
        bad_addr.fabrics_id.traddr = "127.0.0.1/../../x"
    bad_port.fabrics_id.trsvcid = "44a0"
    qos.max_limit.rw_iops_kiops = 10

    def ctrl(spec: fpb.NvmeControllerSpec) -> Any:
        return lambda: f.CreateNvmeController(fpb.CreateNvmeControllerRequest(
            parent=parent, nvme_controller=fpb.NvmeController(spec=spec)))

    calls = {
        "bad nqn": lambda: f.CreateNvmeSubsystem(_sub("nqn.2026-13.bad:x")),
        "reserved nqn": lambda: f.CreateNvmeSubsystem(_sub("nqn.2026-11.io.nvmetd:vm:1234")),
        "traversal id": lambda: f.CreateNvmeSubsystem(_sub(NQN + "-t", "../../etc")),
        "upper-case id": lambda: f.CreateNvmeSubsystem(_sub(NQN + "-t", "Sub1")),
        "duplicate id": lambda: f.CreateNvmeSubsystem(_sub(NQN + "-other", "bad-sub")),
        "duplicate nqn": lambda: f.CreateNvmeSubsystem(_sub(NQN + "-b", "another")),
        "unknown get": lambda: f.GetNvmeSubsystem(fpb.GetNvmeSubsystemRequest(name="nvmeSubsystems/nope")),
        "traversal get": lambda: f.GetNvmeSubsystem(fpb.GetNvmeSubsystemRequest(name="nvmeSubsystems/../x")),
        "unknown delete": lambda: f.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name="nvmeSubsystems/nope")),
        "unknown parent": lambda: f.CreateNvmeNamespace(_ns("nvmeSubsystems/nope", "d1")),
        "traversal parent": lambda: f.CreateNvmeNamespace(_ns("nvmeSubsystems/bad-sub/../x", "d1")),
        "traversal volume": lambda: f.CreateNvmeNamespace(_ns(parent, "../../etc/passwd")),
        "unknown volume": lambda: f.CreateNvmeNamespace(_ns(parent, "d9")),
        "volume in use": lambda: f.CreateNvmeNamespace(_ns(parent, "d1", nsid=2)),
        "duplicate nsid": lambda: f.CreateNvmeNamespace(_ns(parent, "d0", nsid=1)),
        "bad uuid": lambda: f.CreateNvmeNamespace(fpb.CreateNvmeNamespaceRequest(
            parent=parent, nvme_namespace=fpb.NvmeNamespace(spec=fpb.NvmeNamespaceSpec(
                volume_name_ref="d0", uuid="not-a-uuid")))),
        "unknown remote volume": lambda: f.CreateNvmeNamespace(
            _ns(parent, "nvmeRemoteControllers/nope/nvmeRemoteNamespaces/1")),
        "bad trtype": ctrl(fpb.NvmeControllerSpec(trtype=common.NVME_TRANSPORT_TYPE_FC)),
        "bad traddr": ctrl(bad_addr),
        "bad trsvcid": ctrl(bad_port),
        "qos limit": ctrl(qos),
        "bad page token": lambda: f.ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(page_token="zz")),
        "unknown namespace": lambda: f.GetNvmeNamespace(fpb.GetNvmeNamespaceRequest(
            name=f"{parent}/nvmeNamespaces/n9")),
        "unknown controller": lambda: f.StatsNvmeController(fpb.StatsNvmeControllerRequest(
            name=f"{parent}/nvmeControllers/c9")),
        "children": lambda: f.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name=parent)),
    }
    refused(calls[what], code, world)


def test_allow_missing_and_paging(world: World) -> None:
    world.front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name="nvmeSubsystems/nope", allow_missing=True))
    for i in range(3):
        world.front.CreateNvmeSubsystem(_sub(f"{NQN}-p{i}", f"p{i}"))
    first = world.front.ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(page_size=2))
    rest = world.front.ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(page_size=2,
                                                                        page_token=first.next_page_token))
    assert [s.name for s in first.nvme_subsystems] + [s.name for s in rest.nvme_subsystems] == [
        "nvmeSubsystems/p0", "nvmeSubsystems/p1", "nvmeSubsystems/p2"]
    assert rest.next_page_token == ""
    for i in range(3):
        world.front.DeleteNvmeSubsystem(fpb.DeleteNvmeSubsystemRequest(name=f"nvmeSubsystems/p{i}"))


def test_remote_controllers_and_bad_paths(world: World) -> None:
    rc = storage.NvmeRemoteController(multipath=bpb.NVME_MULTIPATH_DISABLE, hdgst=False, ddgst=False)
    made = rc.create(world.address)
    assert made.name == rc.name
    assert rc.get(world.address).multipath == bpb.NVME_MULTIPATH_DISABLE
    assert [r.name for r in rc.list(world.address).nvme_remote_controllers] == [rc.name]
    assert list(world.back.ListNvmeRemoteNamespaces(bpb.ListNvmeRemoteNamespacesRequest(parent=rc.name))
                .nvme_remote_namespaces) == []
    bad_nqn = storage.NvmeTcpPath(rc, ip="127.0.0.1", port=4420, subnqn="nqn.bad", hostnqn=HOSTNQN)
    refused(lambda: bad_nqn.create(world.address), INVALID, world)
    bad_port = storage.NvmeTcpPath(rc, ip="127.0.0.1", port=70000, subnqn=NQN, hostnqn=HOSTNQN)
    refused(lambda: bad_port.create(world.address), INVALID, world)
    ghost = storage.NvmeTcpPath(storage.NvmeRemoteController(0, False, False), ip="127.0.0.1", port=4420,
                                subnqn=NQN)
    refused(lambda: ghost.create(world.address), NOT_FOUND, world)
    refused(lambda: world.back.GetNvmePath(bpb.GetNvmePathRequest(name=f"{rc.name}/nvmePaths/../../x")),
            INVALID, world)
    refused(lambda: world.back.CreateNvmeRemoteController(bpb.CreateNvmeRemoteControllerRequest(
        nvme_remote_controller_id=rc.id)), EXISTS, world)
    rc.delete(world.address)
    refused(lambda: rc.get(world.address), NOT_FOUND, world)


def test_qos_and_encryption_are_refused_clearly(world: World) -> None:
    qos = qgrpc.MiddleendQosVolumeServiceStub(world.channel)
    msg = refused(lambda: qos.CreateQosVolume(qpb.CreateQosVolumeRequest(qos_volume=qpb.QosVolume(
        volume_name_ref="d0"))), grpc.StatusCode.FAILED_PRECONDITION, world)
    assert "nothing was created" in msg
    assert list(qos.ListQosVolumes(qpb.ListQosVolumesRequest()).qos_volumes) == []
    refused(lambda: qos.GetQosVolume(qpb.GetQosVolumeRequest(name="qosVolumes/q1")), NOT_FOUND, world)
    enc = egrpc.MiddleendEncryptionServiceStub(world.channel)
    msg = refused(lambda: enc.CreateEncryptedVolume(epb.CreateEncryptedVolumeRequest(
        encrypted_volume=epb.EncryptedVolume(volume_name_ref="d0", key=b"k" * 32))),
        grpc.StatusCode.UNIMPLEMENTED, world)
    assert "--encrypted" in msg


def test_socket_is_not_world_accessible(world: World) -> None:
    assert world.socket.stat().st_mode & 0o007 == 0
