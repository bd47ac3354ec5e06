"""nvmetd's vhost transport on this machine's own kernel: the Manager starts one real engine process per VM,
disks become namespaces of that VM's controller, and a guest (the Python/C guest driver playing QEMU + guest)
reads and writes them through shared memory. No nvmet is involved, so none is needed: the desired kernel tree is
empty and this host has no configfs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import create_pool
from nvmetd.errors import UserError
from nvmetd.manager import Manager
from nvmetd.vhost import VhostEngines
from target.configfs import ConfigFS
from target.store import StateStore
from vhost_nvme.client import EngineClient
from vhost_nvme.guest import GuestDriver
from vhost_nvme.guest.driver import sqe
from vhost_nvme.nvme_spec import AEN_NS_CHANGED, AdminOpc, Cns, Fid, Lid

MIB = 1 << 20


def make_manager(tmp: Path) -> Manager:
    """A fresh Manager on the same state, as after an nvmetd restart."""
    return Manager(StateStore(tmp / "state.json"), ConfigFS(tmp / "no-nvmet-here"), pools_root=tmp / "pools",
                   keys_dir=tmp / "keys", host_connect=False,
                   vhost=VhostEngines(Path((tmp / "run-dir").read_text()), poll_us=50))


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    run_dir = Path(tempfile.mkdtemp(prefix="nvv-", dir="/tmp"))  # pytest's paths are too long for AF_UNIX
    (tmp_path / "run-dir").write_text(str(run_dir))
    create_pool("file", "p", [str(tmp_path / "files")], root=tmp_path / "pools")
    mgr = make_manager(tmp_path)
    for name in ("d1", "d2", "d3"):
        mgr.create_disk(name, "p", 8 * MIB)
    yield mgr
    with mgr.store.transaction() as doc:  # stop every engine this test started
        doc["vms"] = {}
    mgr.reconcile()
    shutil.rmtree(run_dir, ignore_errors=True)


def engine_pid(mgr: Manager, vm: str) -> int:
    uuid = mgr.vm_info(vm)["uuid"]
    return int((mgr.vhost.run_dir / f"{uuid}.pid").read_text())


def active_nsids(g: GuestDriver) -> list[int]:
    cqe, page = g.identify(Cns.ACTIVE_NS_LIST)
    assert cqe.status == 0
    ids = struct.unpack_from("<32I", page)
    return [i for i in ids if i]


def test_vhost_attach_serves_disks_as_namespaces_of_one_controller(manager: Manager, tmp_path: Path) -> None:
    first = manager.attach("vm1", "d1", "vhost").to_dict()
    assert first["transport"] == "vhost" and first["nsid"] == 1
    sock = first["vhost_socket"]
    assert Path(sock).is_socket()
    args = first["qemu_args"]
    assert args[0] == "-chardev" and f"path={sock}" in args[1]
    assert args[2] == "-device" and args[3].startswith("vhost-user-nvme,") and f"subnqn={first['subsystem_nqn']}" \
        in args[3]
    assert any("memory-backend-memfd" in n for n in first["notes"])  # without --memory it says what QEMU needs
    with_mem = manager.attach("vm1", "d1", "vhost", memory="1G").to_dict()  # a retry: same disk, same NSID
    assert with_mem["nsid"] == 1 and with_mem["qemu_args"][:4] == [
        "-object", "memory-backend-memfd,id=vnmem,size=1G,share=on", "-machine", "memory-backend=vnmem"]

    g = GuestDriver(sock)
    try:
        g.enable()
        g.create_io_queue(1, 64)
        assert active_nsids(g) == [1]
        data = os.urandom(64 * 1024)
        assert g.write(1, 1, 2048, data).status == 0
        assert g.read(1, 1, 2048, len(data) // 512)[1] == data
        backing = Path(manager.disk_info("d1")["device_path"])
        with open(backing, "rb") as f:  # the guest's write is in the disk's file, where nvmetd put it
            f.seek(2048 * 512)
            assert hashlib.sha256(f.read(len(data))).digest() == hashlib.sha256(data).digest()

        # a second disk: a new namespace on the controller the guest already has, announced by an AEN
        assert g.admin(AdminOpc.SET_FEATURES, cdw10=Fid.ASYNC_EVENT_CFG, cdw11=1 << 8).status == 0
        aer = g.submit(0, sqe(AdminOpc.ASYNC_EVENT))
        second = manager.attach("vm1", "d2", "vhost").to_dict()
        assert second["nsid"] == 2 and second["vhost_socket"] == sock and second["qemu_args"] == first["qemu_args"]
        assert g.wait(0, aer).dw0 == AEN_NS_CHANGED
        assert struct.unpack_from("<3I", g.get_log(Lid.CHANGED_NS, 4096)[1]) == (2, 0, 0)
        assert active_nsids(g) == [1, 2]
        assert g.read(1, 2, 0, 8)[1] == bytes(4096)  # a new disk reads zeros

        # nvmetd restarts: the engine (and the guest's queues) live on, and the new nvmetd adopts it as it is
        pid = engine_pid(manager, "vm1")
        again = make_manager(tmp_path)
        result = again.reconcile()
        assert result.objects[f"vhost/{first['host_nqn'].rsplit(':', 1)[1]}"].status == "ok"
        assert engine_pid(again, "vm1") == pid
        assert g.read(1, 1, 2048, len(data) // 512)[1] == data

        # detach: the namespace goes away from the running controller
        assert again.detach("vm1", "d2")["detached"]
        assert active_nsids(g) == [1]
        assert EngineClient(sock).namespaces()[1].name == "d1"
    finally:
        g.close()


def test_engine_killed_is_restarted_with_its_namespaces(manager: Manager) -> None:
    manager.attach("vm1", "d1", "vhost")
    manager.attach("vm1", "d3", "vhost")
    manager.detach("vm1", "d1")  # leaves NSID 1 free: the restart must keep d3 at NSID 2, not renumber it
    pid = engine_pid(manager, "vm1")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        manager.vhost._reap()
        time.sleep(0.05)
    result = manager.reconcile()
    uuid = manager.vm_info("vm1")["uuid"]
    assert result.objects[f"vhost/{uuid}"].status == "changed"
    assert engine_pid(manager, "vm1") != pid
    listed = EngineClient(manager.vm_info("vm1")["vhost_socket"]).namespaces()
    assert {n: e.name for n, e in listed.items()} == {2: "d3"}


def test_vms_get_separate_engines_and_last_detach_stops_it(manager: Manager) -> None:
    a = manager.attach("vm-a", "d1", "vhost").to_dict()
    b = manager.attach("vm-b", "d2", "vhost").to_dict()
    assert a["vhost_socket"] != b["vhost_socket"]
    assert {e.name for e in EngineClient(a["vhost_socket"]).namespaces().values()} == {"d1"}
    assert {e.name for e in EngineClient(b["vhost_socket"]).namespaces().values()} == {"d2"}
    with pytest.raises(UserError, match="attached to VM 'vm-a'"):
        manager.attach("vm-b", "d1", "vhost")
    with pytest.raises(UserError, match="over vhost"):
        manager.attach("vm-a", "d1", "loop")
    with pytest.raises(ValueError, match="not a QEMU size"):
        manager.attach("vm-a", "d1", "vhost", memory="1G,share=off")
    pid = engine_pid(manager, "vm-a")
    manager.detach("vm-a", "d1")
    assert not Path(a["vhost_socket"]).exists()
    assert not Path(f"/proc/{pid}/cmdline").exists() or b"vhost_nvme" not in Path(
        f"/proc/{pid}/cmdline").read_bytes()
    assert EngineClient(b["vhost_socket"]).alive()


def test_auto_picks_vhost_only_when_enabled(manager: Manager) -> None:
    chosen, why = manager.choose_transport("auto")
    assert chosen == "loop" and "[vhost] auto = true" in why
    manager.vhost_auto = True
    chosen, why = manager.choose_transport("auto")
    assert chosen == "vhost" and "shared memory" in why
    assert manager.attach("vm1", "d1").to_dict()["transport"] == "vhost"


def test_engine_socket_is_shared_with_the_qemu_group_only(manager: Manager) -> None:
    import grp

    group = grp.getgrgid(os.getgid() if os.getgid() else 0).gr_name
    manager.vhost.socket_group = group
    sock = Path(manager.attach("vm1", "d1", "vhost").to_dict()["vhost_socket"])
    st = sock.stat()
    assert st.st_mode & 0o777 == 0o660 and grp.getgrgid(st.st_gid).gr_name == group


def test_another_state_never_stops_this_states_engines(manager: Manager, tmp_path: Path) -> None:
    """A second Manager on another state file but the same run directory (a benchmark, say) must leave the
    engines of VMs it does not know alone; the first Manager still stops its own orphans."""
    sock = Path(manager.attach("vm1", "d1", "vhost").to_dict()["vhost_socket"])
    stranger = Manager(StateStore(tmp_path / "other-state.json"), ConfigFS(tmp_path / "no-nvmet-here"),
                       pools_root=tmp_path / "pools", keys_dir=tmp_path / "keys", host_connect=False,
                       vhost=VhostEngines(manager.vhost.run_dir))
    assert not any(k.startswith("vhost/") for k in stranger.reconcile().objects)
    assert EngineClient(sock).alive()
    with manager.store.transaction() as doc:  # the VM vanished from this state behind the Manager's back
        doc["vms"] = {}
    assert manager.reconcile().objects[f"vhost/{sock.stem}"].status == "removed"
    assert not sock.exists()
