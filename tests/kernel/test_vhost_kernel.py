"""The in-kernel vhost-nvme transport (kernel_patches/): the tests' guest driver on /dev/vhost-nvme, nvmet behind it.

Every test reads the kernel log afterwards and fails on an oops, BUG, WARNING or a lockdep/KASAN report: a guest
must never be able to hurt the host, whatever it puts in its queues.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest

from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import TargetState, parse_state
from tests.conftest import IN_CI
from tests.kernel import hostside
from tests.kernel.backend_rig import Loops, PoolFactory
from vhost_nvme import protocol as p
from vhost_nvme.guest.driver import GuestDriver, sqe
from vhost_nvme.kernel import DEVICE, KernelChannel
from vhost_nvme.nvme_spec import PAGE_SIZE, AdminOpc, Cns, IoOpc

pytestmark = pytest.mark.kernel

HOST = "nqn.2014-08.org.nvmexpress:uuid:0e8d3c55-7a4f-4b7e-9d2c-6b1a5f0c9e11"
STRANGER = "nqn.2014-08.org.nvmexpress:uuid:5d9e0a11-2b3c-4d4e-8f5a-6b7c8d9e0f12"
SUB = "nqn.2026-12.io.nvmetd:vhost-kernel"
NS_BYTES = 64 << 20
KERNEL_TROUBLE = re.compile(r"Oops|BUG:|WARNING:|general protection|Call Trace|KASAN|UBSAN|lockdep|"
                            r"refcount_t|list_(add|del) corruption|soft lockup|hung_task", re.IGNORECASE)

# NVMe status codes (SCT << 8 | SC) a controller must answer with
SC_INVALID_OPCODE, SC_INVALID_FIELD, SC_DATA_XFER, SC_INVALID_NS, SC_PRP_OFFSET = 0x1, 0x2, 0x4, 0xB, 0x13
SC_LBA_RANGE, SC_CQ_INVALID, SC_QID_INVALID, SC_QUEUE_SIZE, SC_INVALID_VECTOR = 0x80, 0x100, 0x101, 0x102, 0x108
SC_INVALID_QUEUE_DELETION = 0x10C


def _dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.fixture(scope="module")
def vhost_module(nvmet_kernel: ConfigFS) -> None:
    proc = subprocess.run(["modprobe", "nvmet-vhost"], capture_output=True, text=True, check=False)
    if proc.returncode or not DEVICE.exists():
        why = proc.stderr.strip() or f"no {DEVICE}"
        message = f"nvmet-vhost does not load ({why}): run kernel_patches/build.sh"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# taint flags a kernel sets for good: they survive a kernel log that TCG's "hpet: Lost RTC interrupts" floods
TAINT_DIE, TAINT_WARN, TAINT_SOFTLOCKUP = 1 << 7, 1 << 9, 1 << 14


def _taint() -> int:
    return int(Path("/proc/sys/kernel/tainted").read_text())


@pytest.fixture(autouse=True)
def clean_kernel_log(vhost_module: None) -> Iterator[None]:
    before, taint = len(_dmesg()), _taint()
    yield
    trouble = [line for line in _dmesg()[before:] if KERNEL_TROUBLE.search(line)]
    assert not trouble, "kernel log:\n" + "\n".join(trouble)
    new = _taint() & ~taint & (TAINT_DIE | TAINT_WARN | TAINT_SOFTLOCKUP)
    assert not new, f"the kernel tainted itself during the test (flags {new:#x}: oops/WARN/soft lockup)"


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


@pytest.fixture
def target(cfs: ConfigFS, backing: tuple[Path, str]) -> Path:
    path, dev = backing
    export(cfs, dev)
    assert (cfs.root / "ports" / "7" / "addr_trtype").read_text().strip() == "vhost"
    return path


@pytest.fixture
def guest(target: Path) -> Iterator[GuestDriver]:
    g = GuestDriver(channel=KernelChannel(), bind=(SUB, HOST), timeout=30)
    g.enable()
    yield g
    g.close()


def io_queue(g: GuestDriver, qid: int = 1, size: int = 64) -> None:
    assert g.set_num_queues(4).status == 0
    g.create_io_queue(qid, size=size)


def test_identify_is_a_pcie_controller_of_the_subsystem(guest: GuestDriver) -> None:
    cqe, data = guest.identify(Cns.CONTROLLER)
    assert cqe.status == 0
    mdts, oacs, sgls = data[77], struct.unpack_from("<H", data, 256)[0], struct.unpack_from("<I", data, 536)[0]
    subnqn = data[768:1024].rstrip(b"\0").decode()
    assert (mdts, sgls, subnqn) == (5, 0, SUB)  # PRPs only: a PCIe guest must not be offered SGLs
    assert oacs & (1 << 8)  # Doorbell Buffer Config
    cqe, ns = guest.identify(Cns.NAMESPACE, nsid=1)
    assert cqe.status == 0 and struct.unpack_from("<Q", ns, 0)[0] * 512 == NS_BYTES


def test_reads_and_writes_land_in_the_namespace(guest: GuestDriver, target: Path) -> None:
    io_queue(guest)
    for slba, size in [(0, 4096), (8, 512), (64, 128 << 10), (2048, 12288)]:
        data = os.urandom(size)
        assert guest.write(1, 1, slba, data).status == 0
        cqe, back = guest.read(1, 1, slba, size // 512)
        assert cqe.status == 0 and back == data
        with open(target, "rb") as f:
            f.seek(slba * 512)
            assert f.read(size) == data  # zero copy into the file's pages, and nothing else touched
    assert guest.run(1, sqe(IoOpc.FLUSH, nsid=1)).status == 0
    assert guest.run(1, sqe(IoOpc.WRITE_ZEROES, nsid=1, cdw10=64, cdw12=255)).status == 0
    assert guest.read(1, 1, 64, 256)[1] == bytes(128 << 10)
    # DSM deallocate of the first 8 blocks: a file namespace punches a hole
    ranges = guest.mem.alloc(PAGE_SIZE)
    guest.mem.write(ranges, struct.pack("<IIQ", 0, 8, 0))
    assert guest.run(1, sqe(IoOpc.DSM, nsid=1, prp1=ranges, cdw10=0, cdw11=1 << 2)).status == 0
    assert guest.read(1, 1, 0, 8)[1] == bytes(4096)


def test_prp_lists_that_chain_and_scatter(guest: GuestDriver, target: Path) -> None:
    io_queue(guest)
    pages = [guest.mem.alloc(PAGE_SIZE) for _ in range(40)][::-1][:32]  # 32 scattered, descending pages
    data = os.urandom(32 * PAGE_SIZE - 512)
    first = pages[0] + 512  # PRP1 with an offset: 33 pages' worth of entries would be needed without it
    guest.mem.write(first, data[:PAGE_SIZE - 512])
    for i, page in enumerate(pages[1:]):
        guest.mem.write(page, data[PAGE_SIZE - 512 + i * PAGE_SIZE:][:PAGE_SIZE])
    lst = guest.build_prp_list(pages[1:], first_page_entries=5)  # forces two chain pointers
    nlb = len(data) // 512
    assert guest.run(1, sqe(IoOpc.WRITE, nsid=1, prp1=first, prp2=lst, cdw10=100, cdw12=nlb - 1)).status == 0
    with open(target, "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(data)) == data
    # read back through a two-page transfer (PRP2 is a page, no list)
    cqe, back = guest.read(1, 1, 100, 16)
    assert cqe.status == 0 and back == data[:8192]


def _status(g: GuestDriver, cmd: bytes) -> int:
    cqe = g.run(1, cmd)
    assert cqe.dnr, f"status {cqe.code:#x} without DNR"
    return cqe.code


def test_invalid_commands_get_the_specs_status_and_touch_nothing(guest: GuestDriver, target: Path) -> None:
    io_queue(guest)
    buf = guest.mem.alloc(2 * PAGE_SIZE)
    guest.mem.write(buf, b"\xee" * 2 * PAGE_SIZE)
    outside = 0x7_0000_0000  # no region there
    read = IoOpc.READ
    cases = {
        "bad opcode": (sqe(0x7E, nsid=1, prp1=buf), SC_INVALID_OPCODE),
        "fabrics opcode": (sqe(0x7F, nsid=1, prp1=buf), SC_INVALID_OPCODE),
        "PRP outside memory": (sqe(read, nsid=1, prp1=outside, cdw12=7), SC_DATA_XFER),
        "PRP2 outside memory": (sqe(read, nsid=1, prp1=buf, prp2=outside, cdw12=15), SC_DATA_XFER),
        "PRP1 not dword aligned": (sqe(read, nsid=1, prp1=buf + 2, cdw12=0), SC_PRP_OFFSET),
        "PRP2 with an offset": (sqe(read, nsid=1, prp1=buf, prp2=buf + PAGE_SIZE + 8, cdw12=15), SC_PRP_OFFSET),
        "LBA out of range": (sqe(read, nsid=1, prp1=buf, cdw10=NS_BYTES // 512 - 4, cdw12=7), SC_LBA_RANGE),
        "LBA wraps": (sqe(read, nsid=1, prp1=buf, cdw10=0xFFFFFFFF, cdw11=0xFFFFFFFF, cdw12=7), SC_LBA_RANGE),
        "above MDTS": (sqe(read, nsid=1, prp1=buf, prp2=buf + PAGE_SIZE, cdw12=(256 << 1) - 1), SC_INVALID_FIELD),
        "SGL requested": (sqe(read, nsid=1, prp1=buf, cdw12=0, flags=0x40), SC_INVALID_FIELD),
        "no such namespace": (sqe(read, nsid=9, prp1=buf, cdw12=0), SC_INVALID_NS),
    }
    before = target.read_bytes()
    for name, (cmd, want) in cases.items():
        assert _status(guest, cmd) == want, name
    assert guest.mem.read(buf, 2 * PAGE_SIZE) == b"\xee" * 2 * PAGE_SIZE  # no data moved
    write = sqe(IoOpc.WRITE, nsid=1, prp1=buf, prp2=outside, cdw12=15)
    assert _status(guest, write) == SC_DATA_XFER
    assert target.read_bytes() == before
    # queue management errors
    admin = guest.admin
    assert admin(AdminOpc.CREATE_CQ, prp1=buf, cdw10=1 | (15 << 16), cdw11=1).code == SC_QID_INVALID  # exists
    assert admin(AdminOpc.CREATE_CQ, prp1=buf, cdw10=2 | (4095 << 16), cdw11=1).code == SC_QUEUE_SIZE
    assert admin(AdminOpc.CREATE_CQ, prp1=buf, cdw10=2 | (15 << 16), cdw11=1 | (99 << 16)).code == SC_INVALID_VECTOR
    assert admin(AdminOpc.CREATE_CQ, prp1=buf, cdw10=64 | (15 << 16), cdw11=1).code == SC_QID_INVALID
    assert admin(AdminOpc.CREATE_CQ, prp1=outside, cdw10=2 | (15 << 16), cdw11=1).code == SC_INVALID_FIELD
    assert admin(AdminOpc.CREATE_SQ, prp1=buf, cdw10=2 | (15 << 16), cdw11=1 | (5 << 16)).code == SC_CQ_INVALID
    assert admin(AdminOpc.DELETE_CQ, cdw10=1).code == SC_INVALID_QUEUE_DELETION  # SQ 1 still uses it
    assert admin(AdminOpc.DELETE_SQ, cdw10=9).code == SC_QID_INVALID
    # and the controller still works
    data = os.urandom(4096)
    assert guest.write(1, 1, 0, data).status == 0 and guest.read(1, 1, 0, 8)[1] == data


def test_queues_delete_recreate_and_controller_reset(guest: GuestDriver) -> None:
    io_queue(guest)
    data = os.urandom(8192)
    assert guest.write(1, 1, 10, data).status == 0
    guest.delete_io_queue(1)
    guest.create_io_queue(2, size=32, vector=1)
    assert guest.read(2, 1, 10, 16)[1] == data
    guest.disable()  # CC.EN 1 -> 0: nvmet's controller goes, queues go
    guest.enable()
    assert guest.set_num_queues(2).status == 0
    guest.create_io_queue(1, size=16)
    assert guest.read(1, 1, 10, 16)[1] == data


def test_shadow_doorbells_remove_the_traps(guest: GuestDriver) -> None:
    """A synchronous guest traps twice per command without shadow doorbells (SQ tail, CQ head). With them the CQ
    head never traps, and the SQ tail only when the worker went to sleep (EventIdx says so): at most once."""
    io_queue(guest, size=256)
    n = 100

    def traps_for(first: int) -> int:
        before = guest.traps()
        for i in range(n):
            assert guest.write(1, 1, (first + i) * 8, os.urandom(4096)).status == 0
        return guest.traps() - before

    without = traps_for(0)
    assert guest.enable_dbbuf().status == 0
    with_dbbuf = traps_for(n)
    assert without >= 2 * n - 2, f"{without} traps without shadow doorbells for {n} commands"
    assert with_dbbuf <= n + 2, f"{with_dbbuf} traps with shadow doorbells for {n} commands"
    assert guest.read(1, 1, 0, 8)[0].status == 0


def test_a_host_not_allowed_cannot_bind(target: Path) -> None:
    for host, subsystem, code in [(STRANGER, SUB, errno.EACCES), (HOST, "nqn.2026-12.io.nvmetd:nothere", errno.ENOENT)]:
        chan = KernelChannel()
        try:
            chan.call(p.Req.SET_OWNER)
            with pytest.raises(OSError) as exc:
                chan.call(p.Req.BIND, p.BIND.pack(subsystem.encode(), host.encode()))
            assert exc.value.errno == code
        finally:
            chan.close()
    # an unbound controller never becomes ready
    g = GuestDriver(channel=KernelChannel(), timeout=5)
    try:
        with pytest.raises(Exception, match="fatal"):
            g.enable()
    finally:
        g.close()


def test_a_guest_that_stops_reaping_hangs_nothing(guest: GuestDriver, target: Path) -> None:
    io_queue(guest, size=8)
    buf = guest.mem.alloc(PAGE_SIZE)
    q = guest.queues[1]
    # never reap: fill the SQ again and again as a broken guest would, past the CQ's room
    for _ in range(3):
        for _ in range(7):
            guest.submit(1, sqe(IoOpc.READ, nsid=1, prp1=buf, cdw12=7), ring=False)
        guest.ring(1)
        q.outstanding.clear()
        q.vq.sq_head = q.vq.sq_tail  # it "knows" they were fetched (true) without ever reading a CQE
    # another VM on the same subsystem is served meanwhile
    other = GuestDriver(channel=KernelChannel(), bind=(SUB, HOST), timeout=30)
    try:
        other.enable()
        io_queue(other)
        assert other.read(1, 1, 0, 8)[0].status == 0
    finally:
        other.close()
    guest.close()  # release waits for what is in flight, drops what has no room, returns


def test_module_unload_is_refused_while_a_guest_is_bound(guest: GuestDriver) -> None:
    proc = subprocess.run(["rmmod", "nvmet_vhost"], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "in use" in proc.stderr
    io_queue(guest)
    assert guest.read(1, 1, 0, 8)[0].status == 0


def _crc_blocks(data: bytes, bs: int = 4096) -> list[int]:
    return [google_crc32c.value(data[i:i + bs]) for i in range(0, len(data), bs)]


def test_subsystem_deleted_under_a_bound_guest_fails_it_cleanly(cfs: ConfigFS, guest: GuestDriver) -> None:
    io_queue(guest)
    for link in (cfs.root / "ports" / "7" / "subsystems").iterdir():
        link.unlink()
    deadline = 200
    while not guest.reg_read(0x1C) & 2 and deadline:  # CSTS.CFS once nvmet deleted the controller
        deadline -= 1
        subprocess.run(["sleep", "0.05"], check=True)
    assert guest.reg_read(0x1C) & 2


def checksummed_io(g: GuestDriver, blocks: int = 256, bs: int = 4096, seed: int = 7) -> dict[int, int]:
    """Write random 4 KiB blocks at scattered LBAs, remember their crc32c, read all back and check them."""
    import random

    rng = random.Random(seed)
    written: dict[int, int] = {}
    for _ in range(blocks):
        slba = rng.randrange(0, NS_BYTES // 512 - 8) & ~7
        data = rng.randbytes(bs)
        assert g.write(1, 1, slba, data).status == 0
        written[slba] = google_crc32c.value(data)
    for slba, crc in written.items():
        cqe, data = g.read(1, 1, slba, bs // 512)
        assert cqe.status == 0 and google_crc32c.value(data) == crc, f"LBA {slba}"
    return written


def test_checksummed_io_verifies_on_the_backing_volume(guest: GuestDriver, target: Path) -> None:
    io_queue(guest)
    written = checksummed_io(guest)
    with open(target, "rb") as f:
        for slba, crc in written.items():
            f.seek(slba * 512)
            assert google_crc32c.value(f.read(4096)) == crc


@pytest.mark.parametrize("kind", ["lvm", "zfs"])
def test_checksummed_io_on_lvm_thin_and_zvol(kind: str, make_pool: PoolFactory, cfs: ConfigFS) -> None:
    """The backends VMs really use: a thin LV and a zvol, verified below nvmet on the volume itself."""
    pool, _ = make_pool(kind)
    pool.create("vdisk", "64M")
    volume = pool.attach("vdisk")
    export(cfs, volume)
    g = GuestDriver(channel=KernelChannel(), bind=(SUB, HOST), timeout=30)
    try:
        g.enable()
        io_queue(g)
        written = checksummed_io(g, blocks=128)
    finally:
        g.close()
    assert apply_state(TargetState(), cfs).converged
    for slba, crc in written.items():
        assert google_crc32c.value(hostside.direct_read(volume, 4096, slba * 512)) == crc, f"LBA {slba} on {kind}"
    pool.detach("vdisk")


def test_random_commands_from_a_hostile_guest_never_hurt_the_host(target: Path) -> None:
    """Hundreds of random admin and I/O commands (random opcodes, fields, PRPs inside, outside and across guest
    memory): every one completes with some status, the kernel log stays clean, and after a reset the controller
    serves verified I/O again. Data PRPs point into a region of their own, so the guest's own rings survive."""
    import random

    rng = random.Random(1234)
    layout = [(0x1000_0000, 16 << 20), (0x4000_0000, 8 << 20)]
    g = GuestDriver(channel=KernelChannel(), bind=(SUB, HOST), layout=layout, timeout=30)
    data_lo, data_hi = 0x4000_0000, 0x4000_0000 + (8 << 20)

    def prp() -> int:
        return rng.choice([
            data_lo + rng.randrange(0, 8 << 20, 4096),  # a page of the data region
            data_lo + rng.randrange(0, 8 << 20, 4),  # with an offset
            data_hi - 4096 + rng.randrange(0, 4096),  # at the region's end: crosses out of guest memory
            rng.getrandbits(64), 0, rng.randrange(0, 1 << 40) | 1,  # anywhere, null, misaligned
        ])

    def command(opcodes: list[int]) -> bytes:
        dw = [rng.getrandbits(32) if rng.random() < 0.5 else rng.randrange(0, 64) for _ in range(6)]
        return sqe(rng.choice(opcodes), nsid=rng.choice([1, 1, 1, 0, 2, 0xFFFFFFFF, rng.getrandbits(32)]),
                   prp1=prp(), prp2=prp(), cdw10=dw[0], cdw11=dw[1], cdw12=dw[2], cdw13=dw[3], cdw14=dw[4],
                   cdw15=dw[5], flags=rng.choice([0, 0, 0, 0x40, 0x80, 1, 2]))

    try:
        g.enable()
        io_queue(g, size=64)
        io_ops = [0x00, 0x01, 0x02, 0x04, 0x05, 0x08, 0x09, 0x0C, 0x0D, 0x11, 0x15, 0x19, 0x7F, 0x80, 0x81, 0xFF]
        for _ in range(300):
            cqe = g.run(1, command(io_ops))
            assert cqe.sqid == 1
        admin_ops = [0x02, 0x04, 0x05, 0x06, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x10, 0x11, 0x18, 0x7C, 0x7F, 0x80,
                     0x81, 0xC0, 0x01, 0x00]
        for _ in range(200):
            cmd = bytearray(command(admin_ops))
            if cmd[0] in (0x00, 0x04) and struct.unpack_from("<H", cmd, 40)[0] == 1:
                struct.pack_into("<H", cmd, 40, 2)  # keep I/O queue 1: it is how the test talks to the controller
            if cmd[0] == 0x0C:
                continue  # an AER stays outstanding by design: the driver would wait for it
            g.run(0, bytes(cmd))
        g.disable()
        g.enable()
        io_queue(g)
        data = os.urandom(8192)
        assert g.write(1, 1, 32, data).status == 0 and g.read(1, 1, 32, 16)[1] == data
    finally:
        g.close()


def test_a_namespace_added_in_nvmet_reaches_the_bound_guest(cfs: ConfigFS, guest: GuestDriver, loops: Loops,
                                                            target: Path) -> None:
    """nvmetd adds a VM's next disk as a namespace of its subsystem: nvmet tells the guest (AEN + changed list)."""
    from vhost_nvme.nvme_spec import AEN_NS_CHANGED, Fid, Lid

    assert guest.admin(AdminOpc.SET_FEATURES, cdw10=Fid.ASYNC_EVENT_CFG, cdw11=1 << 8).status == 0
    aer = guest.submit(0, sqe(AdminOpc.ASYNC_EVENT))
    second = loops.make("vhost-ns2", 16 << 20)
    state = parse_state({
        "hosts": [{"nqn": HOST}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                        "namespaces": [{"nsid": 1, "device_path": str(_device_of(cfs))},
                                       {"nsid": 2, "device_path": second}]}],
        "ports": [{"id": 7, "trtype": "vhost", "subsystems": [SUB]}],
    })
    assert apply_state(state, cfs).converged
    cqe = guest.wait(0, aer)
    assert cqe.status == 0 and cqe.dw0 == AEN_NS_CHANGED  # notice: namespace attribute changed, log 0x04
    cqe, page = guest.get_log(Lid.CHANGED_NS, 4096)
    assert cqe.status == 0 and struct.unpack_from("<2I", page) == (2, 0)
    io_queue(guest)
    data = os.urandom(4096)
    assert guest.write(1, 2, 0, data).status == 0 and guest.read(1, 2, 0, 8)[1] == data
    assert hostside.direct_read(second, 4096) == data


def _device_of(cfs: ConfigFS) -> str:
    return (cfs.root / "subsystems" / SUB / "namespaces" / "1" / "device_path").read_text().strip()
