"""Offload mode's refusals on the host (fake configfs, a real OPI server as the DPU): what cannot be done is refused
with one clear error and leaves this host's state and tree as they were. The working path needs the kernel's
NVMe/TCP initiator and is tests/kernel/test_opi_offload.py."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from backends import pools
from nvmetd.errors import SystemProblem, Unsupported, UserError
from nvmetd.manager import Manager
from nvmetd.opi.server import build
from nvmetd.service import load_config
from nvmetd.vhost import VhostEngines
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel

DPU_HOST = "nqn.2014-08.org.nvmexpress:uuid:d9a0e1f2-3333-4b4c-8d8e-9f0a1b2c3d4e"


@pytest.fixture
def host(tmp_path: Path):
    FakeKernel(tmp_path / "nvmet")
    pools.create_pool("file", "files", devices=[str(tmp_path / "files")], root=tmp_path / "pools")
    run = Path(tempfile.mkdtemp(prefix="off-", dir="/tmp"))
    mgr = Manager(StateStore(tmp_path / "state.json"), FakeFS(root=tmp_path / "nvmet"), pools_root=tmp_path / "pools",
                  keys_dir=tmp_path / "keys", host_connect=False, vhost=VhostEngines(run / "v"))
    mgr.create_disk("d0", "files", "4M")
    yield mgr, tmp_path, run
    shutil.rmtree(run, ignore_errors=True)


def tree(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in (base / "nvmet").rglob("*"))


def test_dpu_needs_an_endpoint_and_the_storage_address(host) -> None:
    mgr, _base, _run = host
    with pytest.raises(UserError, match="--dpu ENDPOINT"):
        mgr.attach("vm1", "d0", "dpu")
    with pytest.raises(Unsupported, match="storage_address"):
        mgr.attach("vm1", "d0", "dpu", dpu="unix:/run/dpu/opi.sock")
    mgr.dpu = {"storage_address": "192.168.240.1", "hostnqn": DPU_HOST}
    with pytest.raises(UserError, match="mutual TLS"):
        mgr.attach("vm1", "d0", "dpu", dpu="10.0.0.2:50051")
    with pytest.raises(UserError, match="neither"):
        mgr.attach("vm1", "d0", "dpu", dpu="../x")
    assert "offload" not in mgr.store.load()


def test_a_dpu_that_cannot_connect_leaves_nothing_behind(host) -> None:
    """The DPU (a real OPI server on its own Manager) cannot make the NVMe/TCP path here (no initiator on this
    kernel): attach fails with the DPU's reason, and this host's storage export is taken back."""
    mgr, base, run = host
    FakeKernel(base / "dpu-nvmet")
    dpu_mgr = Manager(StateStore(base / "dpu-state.json"), FakeFS(root=base / "dpu-nvmet"),
                      pools_root=base / "dpu-pools", keys_dir=base / "dpu-keys", host_connect=False,
                      vhost=VhostEngines(run / "dv"))
    server = build(dpu_mgr, run / "opi.sock")
    server.start()
    try:
        mgr.dpu = {"storage_address": "127.0.0.1", "storage_port": "4470", "hostnqn": DPU_HOST,
                   "endpoint": f"unix:{run / 'opi.sock'}", "timeout": 20.0}
        before = tree(base)
        with pytest.raises(SystemProblem, match=r"the DPU at unix:.* refused: (UNAVAILABLE|FAILED_PRECONDITION)"):
            mgr.attach("vm1", "d0", "dpu")
        assert tree(base) == before
        doc = mgr.store.load()
        assert doc.get("opi", {}).get("subsystems", {}) == {} and "offload" not in doc
        dpu_opi = dpu_mgr.store.load().get("opi", {})
        assert dpu_opi.get("remote_controllers") == {} and dpu_opi.get("subsystems") == {}
    finally:
        server.stop(grace=0).wait()


@pytest.mark.parametrize(("text", "error"), [
    ('[dpu]\nstorage_address = "not-an-ip"\n', "dpu"),
    ('[dpu]\nhostnqn = "nqn.bad"\n', "dpu"),
    ('[dpu]\nendpoint = "10.0.0.2:50051"\n', "mutual TLS"),
    ("[dpu]\nbogus = 1\n", "dpu.bogus"),
])
def test_bad_dpu_table_is_refused(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "nvmetd.toml").write_text(text)
    with pytest.raises(ValueError, match=error):
        load_config(tmp_path / "nvmetd.toml")
