"""Queue mechanics: wraparound, phase flips, several queues and vectors, full queues, PRP lists."""

from __future__ import annotations

import os
import random
import select
import time

import pytest

from vhost_nvme.guest import GuestDriver, GuestDriverError
from vhost_nvme.guest.driver import sqe
from vhost_nvme.nvme_spec import PAGE_SIZE, AdminOpc, IoOpc

from .conftest import raw_cq_valid_entries


def test_wraparound_flips_phase(guest):
    guest.create_io_queue(2, 4)
    phases = []
    for i in range(23):  # > 5 laps of a 4-entry queue
        data = bytes([i]) * 512
        cqe = guest.write(2, 1, i, data)
        assert cqe.status == 0
        phases.append(cqe.phase)
        cqe, back = guest.read(2, 1, i, 1)
        assert cqe.status == 0 and back == data
        phases.append(cqe.phase)
    # phase starts at 1 and flips every 4 entries
    assert phases == [1 - (n // 4) % 2 for n in range(46)]


def test_many_queues_each_with_its_own_vector(engine_factory):
    eng = engine_factory(workers=2)
    g = GuestDriver(eng.sock)
    g.enable()
    assert g.set_num_queues(4).status == 0
    for qid in (1, 2, 3, 4):
        g.create_io_queue(qid, 16, vector=qid)
    for qid in (1, 2, 3, 4):
        for k in range(3):
            g.submit(qid, sqe(IoOpc.WRITE, nsid=1, prp1=g.scratch()[0], cdw10=qid * 16 + k), ring=False)
        g.ring(qid)
    for qid in (1, 2, 3, 4):
        # the interrupt for this queue's vector arrives (and no completion shows up elsewhere: _check)
        assert select.select([g.call[qid]], [], [], 5)[0], f"no interrupt on vector {qid}"
        cqes = g.wait_all(qid)
        assert len(cqes) == 3 and all(c.status == 0 and c.sqid == qid for c in cqes)
    g.close()


def test_vector_shared_by_queues_and_polled_queue(guest):
    guest.create_io_queue(2, 16, vector=0)  # shares the admin vector, as Linux does with one vector
    guest.create_io_queue(3, 16, ien=False)  # poll queue: no interrupts
    if select.select([guest.call[0]], [], [], 0)[0]:
        os.eventfd_read(guest.call[0])
    cid = guest.submit(2, sqe(IoOpc.READ, nsid=1, prp1=guest.scratch()[0]))
    assert select.select([guest.call[0]], [], [], 5)[0]  # I/O completion interrupts on vector 0
    assert guest.wait(2, cid).status == 0
    cid = guest.submit(3, sqe(IoOpc.READ, nsid=1, prp1=guest.scratch()[0]))
    assert guest.wait(3, cid).status == 0  # reaped by polling
    assert not select.select([guest.call[3]], [], [], 0.05)[0]


def test_full_submission_queue(guest):
    guest.create_io_queue(2, 8)
    buf = guest.scratch()[0]
    for k in range(7):
        guest.submit(2, sqe(IoOpc.READ, nsid=1, prp1=buf, cdw10=k), ring=False)
    with pytest.raises(GuestDriverError, match="full"):
        guest.submit(2, sqe(IoOpc.READ, nsid=1, prp1=buf), ring=False)
    guest.ring(2)
    assert [c.status for c in guest.wait_all(2)] == [0] * 7


def test_full_completion_queue_holds_back(guest):
    """CQ of 4 entries under an SQ of 16: the engine may post 3, then must wait for the head doorbell."""
    g = guest
    cq_gpa, sq_gpa = g.mem.alloc(4 * 16), g.mem.alloc(16 * 64)
    assert g.admin(AdminOpc.CREATE_CQ, prp1=cq_gpa, cdw10=5 | (3 << 16), cdw11=1 | 2 | (5 << 16)).status == 0
    assert g.admin(AdminOpc.CREATE_SQ, prp1=sq_gpa, cdw10=5 | (15 << 16), cdw11=1 | (5 << 16)).status == 0
    from vhost_nvme.guest.driver import IoQueue

    g._ensure_vector(5)
    # reap through a 4-entry view of the queue pair; submit through a 16-entry one
    q = IoQueue(5, 16, 5, True, sq_gpa, cq_gpa, g._new_vq(5, 4, sq_gpa, cq_gpa))
    g.queues[5] = q
    vq_sq = g._new_vq(5, 16, sq_gpa, cq_gpa)
    buf = g.scratch()[0]
    from vhost_nvme._guest_c import lib

    for k in range(10):
        raw = bytearray(sqe(IoOpc.READ, nsid=1, prp1=buf, cdw10=k))
        raw[2:4] = k.to_bytes(2, "little")
        assert lib.vg_submit(vq_sq, bytes(raw), 0) == 0
        q.outstanding.add(k)
    lib.vg_ring_sq(vq_sq)
    deadline = time.monotonic() + 5
    while raw_cq_valid_entries(g, 5) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    q.size = 4
    assert raw_cq_valid_entries(g, 5) == 3  # never overwrites an unconsumed entry
    q.size = 16  # SQ head values range over the 16-entry SQ
    got = g.wait_all(5)
    assert sorted(c.cid for c in got) == list(range(10))
    assert all(c.status == 0 for c in got)


def test_prp_list_across_pages_and_regions(guest):
    g = guest
    rng = random.Random(7)
    data = rng.randbytes(16 * PAGE_SIZE)
    # 16 scattered pages from both guest memory regions, PRP1 at a page offset into the first one
    pages = [g.mem.alloc(PAGE_SIZE, region=i % 2) for i in range(17)]
    rng.shuffle(pages)
    off = 512
    layout = [pages[0] + off, *pages[1:17]]
    chunks = [data[: PAGE_SIZE - off]] + [
        data[PAGE_SIZE - off + i * PAGE_SIZE: PAGE_SIZE - off + (i + 1) * PAGE_SIZE] for i in range(16)]
    for addr, chunk in zip(layout, chunks, strict=True):
        g.mem.write(addr, chunk)
    prp1, prp2 = g.prps(0, 0, pages=layout)
    cqe = g.run(1, sqe(IoOpc.WRITE, nsid=1, prp1=prp1, prp2=prp2, cdw10=100, cdw12=16 * 8 - 1))
    assert cqe.status == 0
    cqe, back = g.read(1, 1, 100, 16 * 8)
    assert cqe.status == 0 and back == data


def test_chained_prp_lists(guest):
    """PRP2 points 3 entries before a page end: two data entries, then the pointer to the next list."""
    g = guest
    data = random.Random(3).randbytes(8 * PAGE_SIZE)
    pages = [g.mem.alloc(PAGE_SIZE) for _ in range(8)]
    for i, pg in enumerate(pages):
        g.mem.write(pg, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    prp2 = g.build_prp_list(pages[1:], first_page_entries=3)
    cqe = g.run(1, sqe(IoOpc.WRITE, nsid=1, prp1=pages[0], prp2=prp2, cdw10=200, cdw12=63))
    assert cqe.status == 0
    out = [g.mem.alloc(PAGE_SIZE) for _ in range(8)]
    prp2 = g.build_prp_list(out[1:], first_page_entries=2)
    assert g.run(1, sqe(IoOpc.READ, nsid=1, prp1=out[0], prp2=prp2, cdw10=200, cdw12=63)).status == 0
    assert b"".join(g.mem.read(pg, PAGE_SIZE) for pg in out) == data


def _count_traps(g: GuestDriver, n: int) -> int:
    before = g.traps()
    for i in range(n):
        assert g.write(1, 1, i, bytes([i & 0xFF]) * 512).status == 0
    return g.traps() - before


def test_shadow_doorbells_cut_traps(guest):
    n = 100
    without = _count_traps(guest, n)
    assert without == 2 * n  # every SQ tail and CQ head write traps
    assert guest.enable_dbbuf().status == 0
    with_db = _count_traps(guest, n)
    assert with_db <= n + 4  # at most the SQ rings that find the engine asleep, plus CQ EventIdx laps
    for i in range(n):
        _, back = guest.read(1, 1, i, 1)
        assert back == bytes([i & 0xFF]) * 512


def test_shadow_doorbells_never_lose_a_wakeup(engine_factory):
    """With no busy polling the engine sleeps after every command; EventIdx must still wake it."""
    eng = engine_factory(poll_us=0)
    g = GuestDriver(eng.sock, timeout=5)
    g.enable()
    g.create_io_queue(1, 8)
    assert g.enable_dbbuf().status == 0
    g.create_io_queue(2, 8)  # created after DBBUF: shadowed from the start
    for i in range(150):
        qid = 1 + i % 2
        assert g.write(qid, 1, i, bytes([i]) * 512).status == 0
    assert eng.ctrl.stats()["sleeps"] > 50
    g.close()


def test_dbbuf_rejects_bad_buffers(guest):
    assert guest.admin(AdminOpc.DBBUF_CONFIG, prp1=guest.mem.alloc(PAGE_SIZE) + 8,
                       prp2=guest.mem.alloc(PAGE_SIZE)).code == 0x002
    cqe = guest.admin(AdminOpc.DBBUF_CONFIG, prp1=0x7000_0000_0000, prp2=guest.mem.alloc(PAGE_SIZE))
    assert cqe.code == 0x002
    assert guest.write(1, 1, 0, b"z" * 512).status == 0
