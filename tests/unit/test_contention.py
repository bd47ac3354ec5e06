"""Contention on the host (fake configfs tree, real app on its Unix socket, real store and file pool): 500 calls
from 8 clients on the same 4 VMs, disks and port. tests/contention.py says how the outcome is judged; the kernel
run is tests/kernel/test_contention.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from backends import pools
from nvmetd.api import create_app
from nvmetd.changelog import ChangeLog
from nvmetd.manager import Manager
from nvmetd.service import bind_socket
from target.store import StateStore
from tests import contention
from tests.unit.fakes import FakeFS, FakeKernel


def test_500_contending_calls_equal_their_serial_replay(tmp_path: Path) -> None:
    FakeKernel(tmp_path / "nvmet")
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=tmp_path / "pools")
    manager = Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"),
                      pools_root=tmp_path / "pools", keys_dir=tmp_path / "keys", host_connect=False)
    manager.changes = ChangeLog(tmp_path / "changes.jsonl")
    socket = tmp_path / "nvmetd.sock"
    server = uvicorn.Server(uvicorn.Config(create_app(manager), log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [bind_socket(socket, None)]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # only stops a hung start
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        figures = contention.run(socket, manager.store, tmp_path / "changes.jsonl", manager.cfs, tmp_path / "pools",
                                 tmp_path / "replay", calls=500)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"contention (host): {figures}")
    assert figures["ok"] > 100 and figures["refused"] > 20  # a real mix: neither all refused nor all trivial
