"""`nvmetctl attach --transport vhost` on the in-kernel back-end (nvmet-vhost), through a real nvmetd.

The VM is the tests' guest driver on /dev/vhost-nvme (`GuestDriver(channel=KernelChannel(), bind=...)`), bound
with what attach returned.  One daemon for the module; the tests run in file order and share VM "vk".
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest

from backends import pools
from target.configfs import ConfigFS
from tests.conftest import wipe
from tests.kernel.service_fixture import Daemon
from vhost_nvme.guest.driver import GuestDriver, sqe
from vhost_nvme.kernel import KernelChannel
from vhost_nvme.nvme_spec import AdminOpc, Cns, Fid, Lid

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_kernel_log")]

AEN_NS_CHANGED = 0x00040002  # notice, namespace attribute changed, log page 04h
DISK_BYTES = 32 << 20


def _api(d: Daemon, method: str, path: str, body: dict | None = None) -> dict:
    resp = d.request(method, path, body)
    assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text}"
    return resp.json()


@pytest.fixture(scope="module")
def daemon(vhost_module: None, nvmet_kernel: ConfigFS, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Daemon]:
    wipe()
    root = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else tmp_path_factory.mktemp("vk")
    root.mkdir(parents=True, exist_ok=True)
    base = Path(subprocess.run(["mktemp", "-d", "-p", str(root)], check=True, capture_output=True,
                               text=True).stdout.strip())
    (base / "nvmetd.toml").write_text('[vhost]\nbackend = "kernel"\n')
    d = Daemon(base, extra_args=["--vhost-dir", str(base / "vhost")])
    pools.create_pool("file", "files", devices=[str(base / "files")], root=d.pools_root)
    d.start(deadline=900)  # a FastAPI start-up under TCG on a loaded host took > 300 s
    for disk in ("k1", "k2", "b1"):
        _api(d, "POST", "/v1/disks", {"name": disk, "pool": "files", "size": "32M"})
    yield d
    try:
        if d.proc is not None and d.proc.poll() is None:
            for vm in d.request("GET", "/v1/vms").json():
                for disk in vm["disks"]:
                    d.request("DELETE", f"/v1/vms/{vm['name']}/disks/{disk}")
            for disk in d.request("GET", "/v1/disks").json():
                d.request("DELETE", f"/v1/disks/{disk['name']}")
    finally:
        d.stop()
        wipe()
        shutil.rmtree(base, ignore_errors=True)


def _backing(cfs: ConfigFS, subnqn: str, nsid: int) -> Path:
    """The file nvmet opened for the namespace: data is checked there, below the whole stack."""
    return Path((cfs.root / "subsystems" / subnqn / "namespaces" / str(nsid) / "device_path").read_text().strip())


def _guest(att: dict) -> GuestDriver:
    g = GuestDriver(channel=KernelChannel(), bind=(att["subsystem_nqn"], att["host_nqn"]), timeout=30)
    g.enable()
    assert g.set_num_queues(2).status == 0
    g.create_io_queue(1, size=64)
    return g


def _open_vhost_files() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the directory's own fd, gone by now
            count += os.readlink(fd) == "/dev/vhost-nvme"
    return count


def _checksummed(g: GuestDriver, nsid: int, rng: random.Random, blocks: int) -> dict[int, int]:
    """Random 4 KiB blocks, keyed by byte offset (a file namespace has 4 KiB LBAs, a block device 512 B)."""
    lba = g.lba_size(nsid)
    written: dict[int, int] = {}
    for _ in range(blocks):
        offset = rng.randrange(0, DISK_BYTES // 4096) * 4096
        data = rng.randbytes(4096)
        assert g.write(1, nsid, offset // lba, data, lba_size=lba).status == 0
        written[offset] = google_crc32c.value(data)
    for offset, crc in written.items():
        cqe, data = g.read(1, nsid, offset // lba, 4096 // lba, lba_size=lba)
        assert cqe.status == 0 and google_crc32c.value(data) == crc, f"nsid {nsid} offset {offset}"
    return written


def _on_file(path: Path, written: dict[int, int]) -> None:
    with open(path, "rb") as f:
        for offset, crc in written.items():
            f.seek(offset)
            assert google_crc32c.value(f.read(4096)) == crc, f"{path} offset {offset}"


@pytest.fixture(scope="module")
def vk(daemon: Daemon) -> Iterator[tuple[dict, GuestDriver]]:
    att = _api(daemon, "PUT", "/v1/vms/vk/disks/k1", {"transport": "vhost"})
    g = _guest(att)
    yield att, g
    g.close()


def test_attach_uses_the_kernel_back_end_and_io_lands_in_nvmet(daemon: Daemon, vk, nvmet_kernel: ConfigFS) -> None:
    att, g = vk
    assert (att["transport"], att["vhost_backend"], att["nsid"]) == ("vhost", "kernel", 1)
    assert "nvmet-vhost is loaded" in att["why"], att["why"]
    assert att["vhost_socket"] is None and att["dhchap_key_file"] == ""
    dev = att["qemu_args"][att["qemu_args"].index("-device") + 1]
    assert dev.startswith("vhost-user-nvme,") and "backend=kernel" in dev
    assert f"subnqn={att['subsystem_nqn']}" in dev and f"hostnqn={att['host_nqn']}" in dev
    # an nvmet namespace of the VM's own subsystem, on the vhost port, allowing only the key-less vhost host
    cfs = nvmet_kernel
    sub = cfs.root / "subsystems" / att["subsystem_nqn"]
    assert os.listdir(sub / "allowed_hosts") == [att["host_nqn"]]
    assert (sub / "attr_allow_any_host").read_text().strip() == "0"
    assert (cfs.root / "hosts" / att["host_nqn"] / "dhchap_key").read_text().strip() == ""
    vhost_ports = [p for p in (cfs.root / "ports").iterdir() if (p / "addr_trtype").read_text().strip() == "vhost"]
    assert [os.listdir(p / "subsystems") for p in vhost_ports] == [[att["subsystem_nqn"]]]
    assert not list((daemon.base / "vhost").glob("*.sock"))  # no engine: nothing of nvmetd in the I/O path
    _on_file(_backing(nvmet_kernel, att["subsystem_nqn"], 1), _checksummed(g, 1, random.Random(1), 64))
    # the API says the same of the VM
    info = _api(daemon, "GET", "/v1/vms/vk")
    assert info["vhost_backend"] == "kernel" and info["vhost_host_nqn"] == att["host_nqn"]


def test_a_second_disk_is_namespace_2_with_an_aen_and_detach_removes_it(daemon: Daemon, vk,
                                                                        nvmet_kernel: ConfigFS) -> None:
    _, g = vk
    assert g.admin(AdminOpc.SET_FEATURES, cdw10=Fid.ASYNC_EVENT_CFG, cdw11=1 << 8).status == 0
    aer = g.submit(0, sqe(AdminOpc.ASYNC_EVENT))
    att2 = _api(daemon, "PUT", "/v1/vms/vk/disks/k2", {"transport": "vhost"})
    assert (att2["nsid"], att2["vhost_backend"]) == (2, "kernel")
    assert "already" in att2["why"]  # the VM's controller stays where it is
    assert g.wait(0, aer).dw0 == AEN_NS_CHANGED  # nvmet raised it itself
    cqe, page = g.get_log(Lid.CHANGED_NS, 4096)
    assert cqe.status == 0 and 2 in struct.unpack_from("<4I", page)
    assert struct.unpack_from("<3I", g.identify(Cns.ACTIVE_NS_LIST)[1]) == (1, 2, 0)
    _on_file(_backing(nvmet_kernel, att2["subsystem_nqn"], 2), _checksummed(g, 2, random.Random(2), 32))
    aer = g.submit(0, sqe(AdminOpc.ASYNC_EVENT))
    out = _api(daemon, "DELETE", "/v1/vms/vk/disks/k2")
    assert out["detached"] and out["converged"]
    assert g.wait(0, aer).dw0 == AEN_NS_CHANGED
    assert g.get_log(Lid.CHANGED_NS, 4096)[0].status == 0
    assert struct.unpack_from("<2I", g.identify(Cns.ACTIVE_NS_LIST)[1]) == (1, 0)
    assert not (nvmet_kernel.root / "subsystems" / att2["subsystem_nqn"] / "namespaces" / "2").exists()


def test_a_vm_cannot_bind_another_vms_subsystem(daemon: Daemon, vk) -> None:
    att, _ = vk
    other = _api(daemon, "PUT", "/v1/vms/vb/disks/b1", {"transport": "vhost"})
    assert other["subsystem_nqn"] != att["subsystem_nqn"]
    vk_fabric_host = _api(daemon, "GET", "/v1/vms/vk")["host_nqn"]
    for host in (att["host_nqn"], vk_fabric_host):  # vk's vhost NQN, and its keyed fabrics NQN
        with pytest.raises(OSError) as exc:
            GuestDriver(channel=KernelChannel(), bind=(other["subsystem_nqn"], host))
        assert exc.value.errno == errno.EACCES
    # a refused bind closes its /dev/vhost-nvme (an open one pins nvmet-vhost: nothing could unload it later)
    assert _open_vhost_files() == 1, "a refused bind left /dev/vhost-nvme open"
    # and a fabrics disk cannot join a kernel-vhost VM (its host NQN has no key)
    resp = daemon.request("PUT", "/v1/vms/vb/disks/k2", {"transport": "tcp"})
    assert resp.status_code == 400 and "DH-CHAP" in resp.text, resp.text
    _api(daemon, "DELETE", "/v1/vms/vb/disks/b1")


def test_kill9_of_nvmetd_during_guest_io_and_restart_with_no_writes(daemon: Daemon, vk,
                                                                   nvmet_kernel: ConfigFS) -> None:
    att, g = vk
    stop = threading.Event()
    errors: list[BaseException] = []
    ios = [0]  # checksummed 4 KiB writes + reads completed
    last: dict[int, int] = {}

    lba = g.lba_size(1)

    def io() -> None:
        rng = random.Random(9)
        try:
            while not stop.is_set():
                offset = rng.randrange(0, DISK_BYTES // 4096) * 4096
                data = rng.randbytes(4096)
                assert g.write(1, 1, offset // lba, data, lba_size=lba).status == 0
                cqe, back = g.read(1, 1, offset // lba, 4096 // lba, lba_size=lba)
                assert cqe.status == 0 and back == data, f"offset {offset}"
                last[offset] = google_crc32c.value(data)
                ios[0] += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    def progress(past: int, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while ios[0] <= past and not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        return ios[0] - past

    worker = threading.Thread(target=io, daemon=True)
    worker.start()
    try:
        assert progress(0) > 0, errors
        daemon.kill9()
        killed_at = ios[0]
        during = progress(killed_at + 10)  # ten more round trips with no nvmetd process at all
        daemon.start(restore_timeout=10, deadline=900)
        down = ios[0] - killed_at
        boot = None
        deadline = time.monotonic() + 120
        while boot is None and time.monotonic() < deadline:
            boot = _api(daemon, "GET", "/v1/status")["reconcile"]
            time.sleep(0.2)
        assert boot is not None and boot["converged"] and boot["writes"] == 0, boot
        assert progress(ios[0]) > 0, errors
    finally:
        stop.set()
        worker.join(timeout=300)
    assert not errors, errors
    assert during > 0, "no guest I/O completed while no nvmetd existed"
    _on_file(_backing(nvmet_kernel, att["subsystem_nqn"], 1), last)
    print(f"\nguest I/O across kill -9 + restart of nvmetd: {ios[0]} checksummed 4 KiB write+read pairs, {down} of "
          "them while nvmetd was dead or starting; restarted nvmetd: 0 configfs writes; all verified on the file")
