"""Every malformed command or guest address gets the right NVMe status, and the engine keeps serving."""

from __future__ import annotations

import struct

import pytest

from vhost_nvme.guest import GuestDriver
from vhost_nvme.guest.driver import sqe
from vhost_nvme.namespace import open_namespace
from vhost_nvme.nvme_spec import PAGE_SIZE, AdminOpc, Fid, IoOpc, Lid, Status

from .conftest import NS_BYTES, make_image

NBLOCKS = NS_BYTES // 512
OUTSIDE = 0x7000_0000_0000  # no guest memory there
REGION0_END = 0x1000_0000 + (48 << 20)


def _page(g: GuestDriver) -> int:
    return g.mem.alloc(PAGE_SIZE)


IO_CASES = {
    "unknown opcode": (lambda g: sqe(0x7F, nsid=1), Status.INVALID_OPCODE),
    "nsid 0": (lambda g: sqe(IoOpc.READ, nsid=0, prp1=_page(g)), Status.INVALID_NS),
    "nsid not attached": (lambda g: sqe(IoOpc.READ, nsid=9, prp1=_page(g)), Status.INVALID_NS),
    "nsid beyond NN": (lambda g: sqe(IoOpc.READ, nsid=4000, prp1=_page(g)), Status.INVALID_NS),
    "slba past end": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), cdw10=NBLOCKS), Status.LBA_RANGE),
    "range crosses end": (lambda g: sqe(IoOpc.WRITE, nsid=1, prp1=_page(g), cdw10=NBLOCKS - 1, cdw12=1),
                          Status.LBA_RANGE),
    "slba wraps 64 bits": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), cdw10=0xFFFFFFFF,
                                         cdw11=0xFFFFFFFF, cdw12=3), Status.LBA_RANGE),
    "transfer above MDTS": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), cdw12=511),
                            Status.INVALID_FIELD),
    "PRP1 not dword aligned": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g) + 2),
                               Status.INVALID_PRP_OFFSET),
    "PRP1 outside memory": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=OUTSIDE), Status.DATA_XFER_ERROR),
    "PRP1 null": (lambda g: sqe(IoOpc.WRITE, nsid=1, prp1=0), Status.DATA_XFER_ERROR),
    "PRP2 data page with offset": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), prp2=_page(g) + 512,
                                                 cdw12=15), Status.INVALID_PRP_OFFSET),
    "PRP2 page outside memory": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), prp2=OUTSIDE, cdw12=15),
                                 Status.DATA_XFER_ERROR),
    "buffer runs off region end": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=REGION0_END - 512,
                                                 prp2=REGION0_END, cdw12=3), Status.DATA_XFER_ERROR),
    "PRP list pointer misaligned": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), prp2=_page(g) + 4,
                                                  cdw12=23), Status.INVALID_PRP_OFFSET),
    "PRP list outside memory": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), prp2=OUTSIDE, cdw12=23),
                                Status.DATA_XFER_ERROR),
    "PRP list entry with offset": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g),
                                                 prp2=_list(g, [_page(g), _page(g) + 8]), cdw12=23),
                                   Status.INVALID_PRP_OFFSET),
    "PRP list entry outside memory": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g),
                                                    prp2=_list(g, [_page(g), OUTSIDE]), cdw12=23),
                                      Status.DATA_XFER_ERROR),
    "SGL requested": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), flags=0x40), Status.INVALID_FIELD),
    "fused command": (lambda g: sqe(IoOpc.READ, nsid=1, prp1=_page(g), flags=0x01), Status.INVALID_FIELD),
    "DSM range past end": (lambda g: sqe(IoOpc.DSM, nsid=1, prp1=_dsm(g, NBLOCKS - 4, 8), cdw11=4),
                           Status.LBA_RANGE),
    "DSM ranges outside memory": (lambda g: sqe(IoOpc.DSM, nsid=1, prp1=OUTSIDE, cdw11=4),
                                  Status.DATA_XFER_ERROR),
    "write zeroes past end": (lambda g: sqe(IoOpc.WRITE_ZEROES, nsid=1, cdw10=NBLOCKS - 1, cdw12=7),
                              Status.LBA_RANGE),
}


def _list(g: GuestDriver, entries: list[int]) -> int:
    page = _page(g)
    g.mem.write(page, struct.pack(f"<{len(entries)}Q", *entries))
    return page


def _dsm(g: GuestDriver, slba: int, nlb: int) -> int:
    page = _page(g)
    g.mem.write(page, struct.pack("<IIQ", 0, nlb, slba))
    return page


@pytest.mark.parametrize("case", sorted(IO_CASES))
def test_malformed_io_command(guest, case):
    build, expected = IO_CASES[case]
    cqe = guest.run(1, build(guest))
    assert cqe.code == expected, f"{case}: got {cqe.status:#x}"
    assert cqe.dnr
    # still serving, on the same queue
    assert guest.write(1, 1, 3, b"k" * 512).status == 0
    assert guest.read(1, 1, 3, 1)[1] == b"k" * 512


def test_errors_land_in_the_error_log(guest):
    cid = guest.submit(1, sqe(IoOpc.READ, nsid=1, prp1=OUTSIDE))
    assert guest.wait(1, cid).code == Status.DATA_XFER_ERROR
    cqe, page = guest.get_log(Lid.ERROR, 64)
    assert cqe.status == 0
    count, sqid, ecid, status = struct.unpack_from("<QHHH", page, 0)
    assert count >= 1 and (sqid, ecid) == (1, cid) and (status >> 1) & 0x7FF == Status.DATA_XFER_ERROR


def test_write_to_read_only_namespace(engine, guest, tmp_path):
    image = make_image(tmp_path / "ro.img", 1 << 20)
    engine.ctrl.attach_namespace(open_namespace(2, str(image), readonly=True), probe=False)
    assert guest.write(1, 2, 0, b"x" * 512).code == Status.NS_WRITE_PROTECTED
    assert guest.run(1, sqe(IoOpc.WRITE_ZEROES, nsid=2)).code == Status.NS_WRITE_PROTECTED
    cqe, data = guest.read(1, 2, 0, 1)
    assert cqe.status == 0 and data == bytes(512)


ADMIN_CASES = {
    "unknown admin opcode": (lambda g: (0xC5, {}), Status.INVALID_OPCODE),
    "create CQ qid 0": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=0 | (7 << 16), cdw11=1)),
                        Status.INVALID_QID),
    "create CQ existing qid": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=1 | (7 << 16),
                                                                    cdw11=1)), Status.INVALID_QID),
    "create CQ qid above allocation": (
        lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=64 | (7 << 16), cdw11=1)),
        Status.INVALID_QID),
    "create CQ one entry": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=9, cdw11=1)),
                            Status.INVALID_QSIZE),
    "create CQ above MQES": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=9 | (1024 << 16),
                                                                  cdw11=1)), Status.INVALID_QSIZE),
    "create CQ bad vector": (
        lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=9 | (7 << 16), cdw11=1 | (64 << 16))),
        Status.INVALID_VECTOR),
    "create CQ not contiguous": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=_page(g), cdw10=9 | (7 << 16))),
                                 Status.INVALID_FIELD),
    "create CQ ring outside memory": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=OUTSIDE, cdw10=9 | (7 << 16),
                                                                           cdw11=1)), Status.DATA_XFER_ERROR),
    "create CQ ring off region end": (lambda g: (AdminOpc.CREATE_CQ, dict(prp1=REGION0_END - PAGE_SIZE,
                                                                           cdw10=9 | (511 << 16), cdw11=1)),
                                      Status.DATA_XFER_ERROR),
    "create SQ without CQ": (lambda g: (AdminOpc.CREATE_SQ, dict(prp1=_page(g), cdw10=9 | (7 << 16),
                                                                  cdw11=1 | (9 << 16))), Status.CQ_INVALID),
    "create SQ on admin CQ": (lambda g: (AdminOpc.CREATE_SQ, dict(prp1=_page(g), cdw10=9 | (7 << 16),
                                                                   cdw11=1)), Status.CQ_INVALID),
    "delete SQ that does not exist": (lambda g: (AdminOpc.DELETE_SQ, dict(cdw10=9)), Status.INVALID_QID),
    "delete admin SQ": (lambda g: (AdminOpc.DELETE_SQ, dict(cdw10=0)), Status.INVALID_QID),
    "delete CQ still in use": (lambda g: (AdminOpc.DELETE_CQ, dict(cdw10=1)), Status.INVALID_QUEUE_DELETION),
    "unknown log page": (lambda g: (AdminOpc.GET_LOG_PAGE, dict(prp1=_page(g), cdw10=0x7E | (127 << 16))),
                         Status.INVALID_LOG_PAGE),
    "log offset beyond page": (lambda g: (AdminOpc.GET_LOG_PAGE, dict(prp1=_page(g), cdw10=2 | (127 << 16),
                                                                       cdw12=4096)), Status.INVALID_FIELD),
    "unknown feature": (lambda g: (AdminOpc.SET_FEATURES, dict(cdw10=0x77)), Status.INVALID_FIELD),
    "save a feature": (lambda g: (AdminOpc.SET_FEATURES, dict(cdw10=Fid.VOLATILE_WC | (1 << 31), cdw11=1)),
                       Status.FEATURE_NOT_SAVEABLE),
    "number of queues after creating": (
        lambda g: (AdminOpc.SET_FEATURES, dict(cdw10=Fid.NUM_QUEUES, cdw11=0)),
                                        Status.CMD_SEQ_ERROR),
    "identify into nowhere": (lambda g: (AdminOpc.IDENTIFY, dict(prp1=OUTSIDE, cdw10=1)),
                              Status.DATA_XFER_ERROR),
    "SGL admin command": (lambda g: (AdminOpc.IDENTIFY, dict(prp1=_page(g), cdw10=1, flags=0x40)),
                          Status.INVALID_FIELD),
}


@pytest.mark.parametrize("case", sorted(ADMIN_CASES))
def test_malformed_admin_command(guest, case):
    build, expected = ADMIN_CASES[case]
    opc, fields = build(guest)
    cqe = guest.admin(opc, **fields)
    assert cqe.code == expected, f"{case}: got {cqe.status:#x}"
    assert guest.write(1, 1, 4, b"q" * 512).status == 0  # I/O unaffected
    assert guest.identify(1)[0].status == 0  # admin queue unaffected


def test_aer_limit(guest):
    cids = [guest.submit(0, sqe(AdminOpc.ASYNC_EVENT)) for _ in range(4)]
    assert guest.run(0, sqe(AdminOpc.ASYNC_EVENT)).code == Status.AER_LIMIT
    assert not any(c in guest.queues[0].completed for c in cids)  # the four are held


def test_invalid_doorbell_is_ignored(engine, guest):
    q = guest.queues[1]
    before = engine.ctrl.stats()["invalid_doorbells"]
    guest.mirror_ptr[2] = 4000  # SQ 1 tail far outside a 64-entry queue, as a trap would store it
    import os

    os.eventfd_write(guest.kick[1], 1)
    import time

    deadline = time.monotonic() + 5
    while engine.ctrl.stats()["invalid_doorbells"] == before and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.ctrl.stats()["invalid_doorbells"] > before
    guest.mirror_ptr[2] = q.vq.sq_tail  # the guest's next real doorbell repairs it
    assert guest.write(1, 1, 5, b"r" * 512).status == 0
