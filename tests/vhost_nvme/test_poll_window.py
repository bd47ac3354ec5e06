"""The workers' busy-poll window: it grows when a sleep was cut short by the guest's next doorbell (each
such sleep cost a trap), shrinks when the guest stays away longer than the cap, and stays put when fixed.

Guest pacing uses time.sleep, which only ever makes gaps longer than asked; the assertions are chosen so
that longer gaps (a loaded machine) cannot turn them false: growth is checked against the shortest gap, the
shrink and fixed cases against gaps already beyond the window."""

from __future__ import annotations

import time

from vhost_nvme import protocol as p
from vhost_nvme.guest import GuestDriver

US = 1000  # ns


def _paced_traps(g: GuestDriver, n: int, gap_s: float) -> list[int]:
    """One write per gap; the doorbell traps each write cost (with shadow doorbells: 1 if the engine slept)."""
    out = []
    for i in range(n):
        time.sleep(gap_s)
        before = g.traps()
        assert g.write(1, 1, i, bytes([i & 0xFF]) * 512).status == 0
        out.append(g.traps() - before)
    return out


def _guest(eng) -> GuestDriver:
    g = GuestDriver(eng.sock, timeout=5)
    g.enable()
    g.create_io_queue(1, 64)
    assert g.enable_dbbuf().status == 0
    return g


def test_window_grows_to_cover_the_guests_gaps(engine_factory):
    eng = engine_factory(poll_us=50_000)  # cap 50 ms: room to grow
    g = _guest(eng)
    start = eng.ctrl.stats()["poll_window_ns"]
    assert start <= 50_000 * US
    traps = _paced_traps(g, 40, 0.002)
    window = eng.ctrl.stats()["poll_window_ns"]
    g.close()
    assert window >= 2000 * US > start  # now spans the 2 ms the guest leaves between commands
    early, late = sum(traps[:20]), sum(traps[20:])
    assert early >= 3  # the first commands found the engine asleep (window still short)
    assert late < early, traps


def test_window_shrinks_when_the_guest_stays_away_longer_than_the_cap(engine_factory):
    eng = engine_factory(poll_us=1000)  # cap 1 ms, the guest comes back every 5 ms
    g = _guest(eng)
    traps = _paced_traps(g, 15, 0.005)
    window = eng.ctrl.stats()["poll_window_ns"]
    assert window == 50 * US  # one long gap after another does not shrink it yet: it may be a pause
    traps += _paced_traps(g, 25, 0.005)
    window = eng.ctrl.stats()["poll_window_ns"]
    g.close()
    assert window == 10 * US  # the floor: spinning longer would not have saved a trap
    assert sum(traps) >= 36  # and the engine slept before (nearly) every command


def test_fixed_window_does_not_move_and_is_reported(engine_factory):
    eng = engine_factory(poll_us=1000, poll_adaptive=False)
    g = _guest(eng)
    traps = _paced_traps(g, 10, 0.003)
    stats = eng.ctrl.stats()
    wire = p.STATS.unpack(g.call_engine(p.Req.GET_STATS))
    g.close()
    assert stats["poll_window_ns"] == 1000 * US
    assert wire[6] == 1000 * US  # GET_STATS carries the window as its seventh u64
    assert sum(traps) >= 8  # 3 ms gaps always outlast the fixed 1 ms window
