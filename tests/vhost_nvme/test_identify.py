"""Identify data and registers are what the NVMe 1.4 spec says, and reflect the backing topology."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from vhost_nvme.namespace import null_namespace, open_namespace
from vhost_nvme.nvme_spec import Cns, Reg, Status
from vhost_nvme.topology import block_device_topology

from .conftest import NS_BYTES, make_image


def test_registers_after_enable(guest):
    cap = guest.reg_read(Reg.CAP, 8)
    assert cap & 0xFFFF == 1023  # MQES, 0-based
    assert (cap >> 16) & 1 == 1  # CQR: contiguous queues required
    assert (cap >> 32) & 0xF == 0  # DSTRD 0
    assert (cap >> 37) & 1 == 1  # NVM command set
    assert (cap >> 48) & 0xF == 0 and (cap >> 52) & 0xF == 0  # MPSMIN = MPSMAX = 4 KiB
    assert guest.reg_read(Reg.VS) == 0x00010400
    assert guest.reg_read(Reg.CSTS) & 1 == 1
    assert guest.reg_read(Reg.CAP + 4) == cap >> 32  # 4-byte access to the high half


def test_identify_controller(guest, engine):
    cqe, d = guest.identify(Cns.CONTROLLER)
    assert cqe.status == 0
    sn, mn, fr = d[4:24], d[24:64], d[64:72]
    for field in (sn, mn, fr):
        assert all(0x20 <= b < 0x7F for b in field), field  # printable ASCII, space padded, no NULs
    assert mn.rstrip() == b"nvmetd vhost-nvme"
    assert d[77] == 5  # MDTS
    assert struct.unpack_from("<I", d, 80)[0] == 0x00010400
    assert struct.unpack_from("<I", d, 92)[0] & (1 << 8)  # OAES: namespace attribute notices
    assert d[111] == 1  # I/O controller
    assert struct.unpack_from("<H", d, 256)[0] & (1 << 8)  # OACS: Doorbell Buffer Config
    assert d[512] == 0x66 and d[513] == 0x44
    assert struct.unpack_from("<I", d, 516)[0] == 32  # NN
    oncs = struct.unpack_from("<H", d, 520)[0]
    assert oncs & (1 << 2) and oncs & (1 << 3)  # DSM, Write Zeroes
    assert d[525] & 1  # volatile write cache present
    assert struct.unpack_from("<I", d, 536)[0] == 0  # no SGL support advertised
    subnqn = d[768:1024].split(b"\0")[0]
    assert subnqn.startswith(b"nqn.") and subnqn.endswith(b"vhost:t")


def test_identify_namespace_reports_file_topology(guest, engine):
    cqe, d = guest.identify(Cns.NAMESPACE, nsid=1)
    assert cqe.status == 0
    nsze, ncap, nuse = struct.unpack_from("<QQQ", d, 0)
    assert nsze == ncap == NS_BYTES // 512
    assert nuse <= nsze
    lbads = (struct.unpack_from("<I", d, 128)[0] >> 16) & 0xFF
    assert lbads == 9
    assert d[24] & (1 << 4)  # OPTPERF: the NPWG.. fields are valid
    blk = os.stat(engine.image).st_blksize
    npwg, _npwa, npdg, _npda, nows = struct.unpack_from("<HHHHH", d, 64)
    assert npwg + 1 == blk // 512  # physical = filesystem block
    assert npdg + 1 == blk // 512  # deallocate granularity = hole-punch unit
    assert nows + 1 == blk // 512
    assert struct.unpack_from("<H", d, 36)[0] == npwg  # NAWUPF so Linux does not clamp it away
    assert d[33] == 0x09  # deallocated blocks read zeros; Write Zeroes may deallocate
    assert d[104:120] != bytes(16)  # NGUID


def test_identify_namespace_4k_lba(engine, tmp_path: Path):
    image = make_image(tmp_path / "ns2.img", 4 << 20)
    engine.ctrl.attach_namespace(open_namespace(2, str(image), lba_size=4096), probe=False)
    from vhost_nvme.guest import GuestDriver

    g = GuestDriver(engine.sock)
    g.enable()
    cqe, d = g.identify(Cns.NAMESPACE, nsid=2)
    assert cqe.status == 0
    assert struct.unpack_from("<Q", d, 0)[0] == (4 << 20) // 4096
    assert (struct.unpack_from("<I", d, 128)[0] >> 16) & 0xFF == 12
    g.close()


def test_inactive_and_invalid_nsids(guest):
    cqe, d = guest.identify(Cns.NAMESPACE, nsid=7)  # valid range, not attached
    assert cqe.status == 0 and d == bytes(4096)
    for bad in (0, 33, 0xFFFFFFFF):
        cqe, d = guest.identify(Cns.NAMESPACE, nsid=bad)
        assert cqe.code == Status.INVALID_NS and cqe.dnr
        assert d == b"\xa5" * 4096  # nothing transferred on error


def test_active_ns_list_and_descriptors(guest, engine):
    engine.ctrl.attach_namespace(null_namespace(5, 1 << 20), probe=False)
    cqe, d = guest.identify(Cns.ACTIVE_NS_LIST, nsid=0)
    assert cqe.status == 0
    assert struct.unpack_from("<3I", d, 0) == (1, 5, 0)
    cqe, d = guest.identify(Cns.ACTIVE_NS_LIST, nsid=1)
    assert struct.unpack_from("<2I", d, 0) == (5, 0)
    cqe, d = guest.identify(Cns.NS_DESC_LIST, nsid=1)
    assert cqe.status == 0
    assert d[0:4] == bytes([2, 16, 0, 0])  # NGUID descriptor
    _, ns = guest.identify(Cns.NAMESPACE, nsid=1)
    assert d[4:20] == ns[104:120]
    assert d[20:24] == bytes([3, 16, 0, 0])
    uuid.UUID(bytes=d[24:40])
    assert d[40:45] == bytes([4, 1, 0, 0, 0])  # CSI = NVM
    cqe, _ = guest.identify(Cns.NS_DESC_LIST, nsid=9)
    assert cqe.code == Status.INVALID_NS
    cqe, _ = guest.identify(0x1F)
    assert cqe.code == Status.INVALID_FIELD


def test_block_device_topology_from_sysfs(tmp_path: Path):
    disk = tmp_path / "devices" / "virtual" / "block" / "vnx"
    queue = disk / "queue"
    queue.mkdir(parents=True)
    for name, val in {"logical_block_size": 512, "physical_block_size": 4096, "optimal_io_size": 65536,
                      "discard_granularity": 1048576, "discard_max_bytes": 1 << 30}.items():
        (queue / name).write_text(f"{val}\n")
    part = disk / "vnx1"
    part.mkdir()
    (tmp_path / "dev" / "block").mkdir(parents=True)
    (tmp_path / "dev" / "block" / "250:0").symlink_to(disk)
    (tmp_path / "dev" / "block" / "250:1").symlink_to(part)
    for minor in (0, 1):  # a partition resolves to its disk's queue
        t = block_device_topology(250, minor, sysfs=tmp_path)
        assert (t.logical_block, t.physical_block, t.optimal_io, t.discard_granularity) == (
            512, 4096, 65536, 1048576)
    (queue / "discard_max_bytes").write_text("0\n")
    assert block_device_topology(250, 0, sysfs=tmp_path).discard_granularity == 0


def test_without_dbbuf_nothing_advertises_shadow_doorbells(engine_factory):
    """The engine's --no-dbbuf baseline: OACS bit 8 clear, opcode 0x7C refused, no DBBUF protocol feature."""
    from vhost_nvme import protocol as p
    from vhost_nvme.guest import GuestDriver
    from vhost_nvme.nvme_spec import PAGE_SIZE, AdminOpc

    eng = engine_factory(name="nodb", dbbuf=False)
    g = GuestDriver(eng.sock)
    try:
        assert not g.features & p.Feature.DBBUF
        assert g.features & p.Feature.DB_MIRROR
        g.enable()
        cqe, d = g.identify(Cns.CONTROLLER)
        assert cqe.status == 0
        assert not struct.unpack_from("<H", d, 256)[0] & (1 << 8)
        cqe = g.admin(AdminOpc.DBBUF_CONFIG, prp1=g.mem.alloc(PAGE_SIZE), prp2=g.mem.alloc(PAGE_SIZE))
        assert cqe.code == Status.INVALID_OPCODE
        assert not eng.ctrl.dbbuf_on
    finally:
        g.close()


def test_serial_is_stable_across_engine_processes(tmp_path):
    """The serial derives from the controller name only, so a restarted engine presents the same controller."""
    import subprocess
    import sys

    code = "from vhost_nvme.controller import Controller; c = Controller('same'); print(c.identity.serial); c.close()"
    serials = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(serials) == 1 and serials.pop().startswith("VN")
