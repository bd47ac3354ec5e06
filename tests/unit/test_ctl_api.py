"""nvmetctl's target commands through nvmetd's API on the host: nvmetd's Manager on a fake configfs tree, served by
uvicorn on a Unix socket as nvmetd serves it; the CLI is given a state file path it must never create."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from nvmetd.api import create_app
from nvmetd.cli import main
from nvmetd.manager import Manager
from nvmetd.service import bind_socket
from nvmetd.vhost import VhostEngines
from target.apply import apply_state
from target.model import parse_state
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel

SUB = "nqn.2026-11.io.nvmetd:api-x"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Manager, list[str]]]:
    FakeKernel(tmp_path / "nvmet")
    manager = Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"),
                      pools_root=tmp_path / "pools", keys_dir=tmp_path / "keys", host_connect=False,
                      vhost=VhostEngines(tmp_path / "vhost"))
    sock = tmp_path / "nvmetd.sock"
    server = uvicorn.Server(uvicorn.Config(create_app(manager), log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [bind_socket(sock, None)]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield manager, ["--socket", str(sock), "--state", str(tmp_path / "cli-never-writes-this.json"),
                        "--configfs", str(tmp_path / "no-configfs-here")]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not (tmp_path / "cli-never-writes-this.json").exists()


def test_target_commands_go_through_the_api(served: tuple[Manager, list[str]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    manager, common = served
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"subsystems": [{"nqn": SUB, "allow_any_host": True}]}))
    apply_state(parse_state(json.loads(src.read_text())), manager.cfs)  # the fake tree's attribute files
    generation = manager.store.load()["generation"]
    assert main([*common, "apply", str(src)]) == 0
    assert manager.store.load()["generation"] == generation + 1
    assert main([*common, "diff", "--json"]) == 0
    capsys.readouterr()
    assert main([*common, "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["desired"]["subsystems"] == 1
    (manager.cfs.root / "subsystems" / SUB / "attr_allow_any_host").write_text("0\n")
    assert main([*common, "diff"]) == 1
    assert main([*common, "shell", "-c", "ls", "-c", "diff", "-c", "repair"]) == 0
    out = capsys.readouterr().out
    assert SUB in out and "converged=True" in out
    assert main([*common, "diff"]) == 0
    assert main([*common, "--offline", "status"]) == 3  # nvmetd serves: offline is refused
    assert "nvmetd is running" in capsys.readouterr().err


def test_snapshot_delete_through_the_api(served: tuple[Manager, list[str]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """A disk with a snapshot could not be deleted through nvmetctl: no command removed the snapshot. Refused
    while a clone depends on it (exit 2, one line), then deleted, then the disk itself."""
    from backends import pools

    manager, common = served
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=manager.pools_root)
    assert main([*common, "disk", "create", "d1", "--pool", "files", "--size", "4M"]) == 0
    assert main([*common, "disk", "snapshot", "d1", "s1"]) == 0
    assert main([*common, "disk", "clone", "d1", "s1", "c1"]) == 0
    capsys.readouterr()
    # refused, and the disk is still there (it used to be journalled "deleting" first: gone from every listing)
    assert main([*common, "disk", "delete", "d1"]) == 2
    assert "snapshot-delete" in capsys.readouterr().err
    assert {d["name"] for d in manager.list_disks()} == {"d1", "c1"}
    assert main([*common, "disk", "snapshot-delete", "d1", "s1"]) == 2  # a clone depends on it
    err = capsys.readouterr().err
    assert "clones" in err and err.count("\n") == 1
    assert main([*common, "disk", "delete", "c1"]) == 0
    capsys.readouterr()
    assert main([*common, "--json", "disk", "snapshot-delete", "d1", "s1"]) == 0
    assert json.loads(capsys.readouterr().out)["snapshots"] == []
    assert main([*common, "disk", "snapshot-delete", "d1", "s1"]) == 2  # gone
    assert "no snapshot" in capsys.readouterr().err
    assert main([*common, "disk", "delete", "d1"]) == 0
    assert manager.list_disks() == []
