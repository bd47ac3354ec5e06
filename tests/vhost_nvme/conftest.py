"""Fixtures: an in-process engine (controller + socket server) and a guest driver connected to it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost_nvme.controller import Controller
from vhost_nvme.guest import GuestDriver
from vhost_nvme.namespace import open_namespace
from vhost_nvme.server import EngineServer

NS_BYTES = 8 << 20


@dataclass
class Engine:
    ctrl: Controller
    server: EngineServer
    sock: str
    image: Path
    tmp: Path


def make_image(path: Path, size: int = NS_BYTES) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator:
    made: list[Engine] = []

    def make(poll_us: int = 50, workers: int = 1, policy: str = "psync", name: str = "t",
             dbbuf: bool = True, poll_adaptive: bool = True) -> Engine:
        image = make_image(tmp_path / f"{name}-ns1.img")
        ctrl = Controller(name, workers=workers, poll_us=poll_us, policy=policy, dbbuf=dbbuf,
                          poll_adaptive=poll_adaptive)
        ctrl.attach_namespace(open_namespace(1, str(image)), probe=False)
        sock = str(tmp_path / f"{name}.sock")
        server = EngineServer(sock, ctrl).serve_in_thread()
        eng = Engine(ctrl, server, sock, image, tmp_path)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.server.close()
        eng.ctrl.close()


@pytest.fixture
def engine(engine_factory) -> Engine:
    return engine_factory()


@pytest.fixture
def guest(engine: Engine) -> Iterator[GuestDriver]:
    g = GuestDriver(engine.sock)
    g.enable()
    g.create_io_queue(1, 64)
    yield g
    g.close()


def raw_cq_valid_entries(g: GuestDriver, qid: int) -> int:
    """Count CQ slots whose phase bit says 'new' without consuming them (CQ is still in its first lap)."""
    q = g.queues[qid]
    data = g.mem.read(q.cq_gpa, q.size * 16)
    return sum((int.from_bytes(data[i * 16 + 12:i * 16 + 16], "little") >> 16) & 1 for i in range(q.size))


__all__ = ["NS_BYTES", "Engine", "make_image", "os", "raw_cq_valid_entries"]
