"""Data integrity: random I/O against a model, zeroing commands, hot plug events, reset mid-I/O."""

from __future__ import annotations

import errno
import random
import struct
import subprocess
import sys

import pytest

from vhost_nvme import protocol as p
from vhost_nvme.guest import GuestDriver
from vhost_nvme.guest.driver import sqe
from vhost_nvme.namespace import null_namespace, open_namespace
from vhost_nvme.nvme_spec import AEN_NS_CHANGED, PAGE_SIZE, AdminOpc, Cns, Fid, IoOpc, Lid, Reg, Status

from .conftest import NS_BYTES, make_image

PATHS = {"psync": 0, "io_uring": 1}  # uring_min_batch: 0 = never, 1 = always


@pytest.mark.parametrize("path", sorted(PATHS))
def test_random_io_matches_model(engine, guest, path):
    engine.ctrl.set_uring_min_batch(1, PATHS[path])
    rng = random.Random(1234)
    span = 4096  # blocks exercised (2 MiB), so reads often hit earlier writes
    model = bytearray(span * 512)
    for _ in range(300):
        slba = rng.randrange(span - 64)
        nlb = rng.randint(1, 64)
        if rng.random() < 0.5:
            data = rng.randbytes(nlb * 512)
            assert guest.write(1, 1, slba, data).status == 0
            model[slba * 512:(slba + nlb) * 512] = data
        else:
            cqe, data = guest.read(1, 1, slba, nlb)
            assert cqe.status == 0
            assert data == model[slba * 512:(slba + nlb) * 512], f"mismatch at lba {slba}+{nlb}"
    st = engine.ctrl.ns_stats(1)
    assert (st["uring_ios"] > 0) == (path == "io_uring") and (st["psync_ios"] > 0) == (path == "psync")
    with open(engine.image, "rb") as f:  # and it really is in the backing file
        assert f.read(span * 512) == model


@pytest.mark.parametrize("path", sorted(PATHS))
def test_deep_queue_of_writes_then_reads(engine, guest, path):
    engine.ctrl.set_uring_min_batch(1, PATHS[path])
    g = guest
    bufs = [g.mem.alloc(PAGE_SIZE) for _ in range(48)]
    for i, b in enumerate(bufs):
        g.mem.write(b, bytes([i]) * PAGE_SIZE)
        g.submit(1, sqe(IoOpc.WRITE, nsid=1, prp1=b, cdw10=i * 8, cdw12=7), ring=False)
    g.ring(1)
    assert all(c.status == 0 for c in g.wait_all(1))
    for i in range(48):
        assert g.read(1, 1, i * 8, 8)[1] == bytes([i]) * PAGE_SIZE


def test_write_zeroes_and_deallocate_read_back_zeros(guest):
    g = guest
    g.write(1, 1, 0, b"\xff" * (64 * 512))
    assert g.run(1, sqe(IoOpc.WRITE_ZEROES, nsid=1, cdw10=8, cdw12=7)).status == 0
    ranges = g.mem.alloc(PAGE_SIZE)
    g.mem.write(ranges, struct.pack("<IIQIIQ", 0, 8, 24, 0, 16, 40))
    assert g.run(1, sqe(IoOpc.DSM, nsid=1, prp1=ranges, cdw10=1, cdw11=4)).status == 0
    _, data = g.read(1, 1, 0, 64)
    expect = bytearray(b"\xff" * (64 * 512))
    for s, n in ((8, 8), (24, 8), (40, 16)):
        expect[s * 512:(s + n) * 512] = bytes(n * 512)
    assert data == bytes(expect)
    # DSM without the deallocate attribute is a hint only: data stays
    g.write(1, 1, 100, b"\x11" * 512)
    g.mem.write(ranges, struct.pack("<IIQ", 0, 1, 100))
    assert g.run(1, sqe(IoOpc.DSM, nsid=1, prp1=ranges, cdw10=0, cdw11=0)).status == 0
    assert g.read(1, 1, 100, 1)[1] == b"\x11" * 512


def test_flush_fua_and_write_cache_feature(guest):
    g = guest
    assert g.run(1, sqe(IoOpc.FLUSH, nsid=1)).status == 0
    assert g.run(1, sqe(IoOpc.FLUSH, nsid=0xFFFFFFFF)).status == 0
    assert g.write(1, 1, 7, b"f" * 512, fua=True).status == 0
    assert g.admin(AdminOpc.SET_FEATURES, cdw10=Fid.VOLATILE_WC, cdw11=0).status == 0
    assert g.admin(AdminOpc.GET_FEATURES, cdw10=Fid.VOLATILE_WC).dw0 == 0
    assert g.write(1, 1, 8, b"g" * 512).status == 0
    assert g.read(1, 1, 7, 2)[1] == b"f" * 512 + b"g" * 512


def test_null_namespace_completes_without_data(engine, guest):
    engine.ctrl.attach_namespace(null_namespace(3, 1 << 30), probe=False)
    cqe, data = guest.read(1, 3, 12345, 8, lba_size=4096)
    assert cqe.status == 0 and data == b"\x5a" * 8 * 4096  # buffer untouched
    assert guest.run(1, sqe(IoOpc.READ, nsid=3, cdw10=(1 << 30) // 4096)).code == Status.LBA_RANGE


def test_namespace_hot_add_remove_raises_aen(engine, guest, tmp_path):
    g = guest
    assert g.admin(AdminOpc.SET_FEATURES, cdw10=Fid.ASYNC_EVENT_CFG, cdw11=1 << 8).status == 0
    aer = g.submit(0, sqe(AdminOpc.ASYNC_EVENT))
    engine.ctrl.attach_namespace(open_namespace(4, str(make_image(tmp_path / "hot.img", 1 << 20))),
                                 probe=False)
    cqe = g.wait(0, aer)
    assert cqe.status == 0 and cqe.dw0 == AEN_NS_CHANGED
    engine.ctrl.detach_namespace(1)  # masked until the log is read: no second AEN yet
    aer2 = g.submit(0, sqe(AdminOpc.ASYNC_EVENT))
    assert g.identify(Cns.CONTROLLER)[0].status == 0
    assert aer2 not in g.queues[0].completed
    cqe, page = g.get_log(Lid.CHANGED_NS, 4096)
    assert cqe.status == 0 and struct.unpack_from("<3I", page) == (1, 4, 0)
    assert g.get_log(Lid.CHANGED_NS, 4096)[1] == bytes(4096)  # read clears it
    engine.ctrl.attach_namespace(null_namespace(1, 1 << 20), probe=False)
    assert g.wait(0, aer2).dw0 == AEN_NS_CHANGED  # re-armed by the read
    assert struct.unpack_from("<3I", g.identify(Cns.ACTIVE_NS_LIST)[1]) == (1, 4, 0)
    assert g.write(1, 4, 0, b"h" * 512).status == 0
    engine.ctrl.detach_namespace(4)
    assert g.write(1, 4, 0, b"h" * 512).code == Status.INVALID_NS


@pytest.mark.parametrize("path", sorted(PATHS))
def test_reset_mid_io_loses_no_completed_write(engine, guest, path):
    engine.ctrl.set_uring_min_batch(1, PATHS[path])
    g = guest
    n = 60
    bufs = [g.mem.alloc(PAGE_SIZE) for _ in range(n)]
    cid_to_block = {}
    for i, b in enumerate(bufs):
        g.mem.write(b, (b"%04d" % i) * 1024)
        cmd = sqe(IoOpc.WRITE, nsid=1, prp1=b, cdw10=i * 8, cdw12=7)
        cid_to_block[g.submit(1, cmd, ring=(i % 4 == 3))] = i
    done = [c for c in g.reap(1) if c.status == 0]
    g.reg_write(Reg.CC, g.reg_read(Reg.CC) & ~1)  # reset while the rest is in flight
    assert g.reg_read(Reg.CSTS) & 1 == 0
    g.queues.clear()
    g.enable()
    g.create_io_queue(1, 64)
    for c in done:
        i = cid_to_block[c.cid]
        assert g.read(1, 1, i * 8, 8)[1] == (b"%04d" % i) * 1024
    # the engine serves normally after the reset
    assert g.write(1, 1, 1000, b"n" * 512).status == 0


def test_shutdown_sets_shst(guest):
    guest.reg_write(Reg.CC, guest.reg_read(Reg.CC) | (1 << 14))
    assert (guest.reg_read(Reg.CSTS) >> 2) & 3 == 2


def test_enable_with_admin_queue_outside_memory_is_fatal(engine):
    g = GuestDriver(engine.sock)
    g.reg_write(Reg.AQA, 7 | (7 << 16))
    g.reg_write(Reg.ASQ, 0x7000_0000_0000, 8)
    g.reg_write(Reg.ACQ, 0x7000_0000_1000, 8)
    g.reg_write(Reg.CC, 1 | (6 << 16) | (4 << 20))
    assert g.reg_read(Reg.CSTS) & 3 == 2  # CFS, not RDY
    g.reg_write(Reg.CC, 0)
    g.enable()  # recovers after a proper reset
    assert g.identify(Cns.CONTROLLER)[0].status == 0
    g.close()


def test_iops_limit_throttles_but_completes(engine, guest):
    engine.ctrl.set_limits(1, iops=200, bps=0)  # burst of 20 commands
    buf = guest.scratch()[0]
    for k in range(40):
        guest.submit(1, sqe(IoOpc.READ, nsid=1, prp1=buf, cdw10=k), ring=False)
    guest.ring(1)
    assert [c.status for c in guest.wait_all(1)] == [0] * 40
    assert engine.ctrl.ns_stats(1)["throttled"] > 0
    engine.ctrl.set_limits(1, iops=0, bps=0)


def test_smart_log_counts_io(guest):
    for i in range(5):
        guest.write(1, 1, i, b"s" * 512)
    cqe, page = guest.get_log(Lid.SMART, 512)
    assert cqe.status == 0
    assert struct.unpack_from("<H", page, 1)[0] > 273  # composite temperature in Kelvin
    assert struct.unpack_from("<Q", page, 80)[0] >= 5  # host write commands
    assert struct.unpack_from("<Q", page, 48)[0] >= 1  # data units written (rounded up)


def test_protocol_errors_are_errno_replies(engine, guest):
    with pytest.raises(OSError) as exc:
        guest.call_engine(0x7777)
    assert exc.value.errno == errno.ENOSYS
    with pytest.raises(OSError) as exc:
        guest.call_engine(p.Req.REG_READ, p.REG.pack(0x14, 3, 0))
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        guest.call_engine(p.Req.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(0, 4096, 0, 0))
    assert exc.value.errno == errno.EINVAL  # one region, no fd
    events = []
    while True:
        try:
            events.append(p.EVENT.unpack(guest.call_engine(p.Req.GET_EVENT))[0])
        except OSError as e:
            assert e.errno == errno.EAGAIN
            break
    assert p.Event.READY in events and p.Event.QUEUE_CREATED in events
    assert guest.write(1, 1, 0, b"p" * 512).status == 0


def test_owner_disconnect_resets_controller(engine, guest):
    guest.close()
    import time

    deadline = time.monotonic() + 5
    while engine.ctrl.csts & 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.ctrl.csts & 1 == 0
    g2 = GuestDriver(engine.sock)
    g2.enable()
    g2.create_io_queue(1, 16)
    assert g2.write(1, 1, 0, b"2" * 512).status == 0
    g2.close()


def test_engine_cli_reports_user_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhost_nvme.engine", "--socket", str(tmp_path / "s"),
                        "--ns", str(tmp_path / "missing.img")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cannot open" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "vhost_nvme.engine", "--socket", str(tmp_path / "s"),
                        "--ns", "null:1G,bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr


__all__ = ["NS_BYTES"]
