"""The fio harness against the real 6.12 nvmet: the checksums catch corruption, and every transport keeps data intact.

Sizes are small (8 MiB) so the whole module stays within a couple of minutes under TCG; the job files are the
real ones from fio_jobs/, run through the same code as `python -m bench.matrix integrity`. The disks are made and
exported the way users' are: a backends/ pool, Manager.create_disk, Manager.attach (a VM subsystem with its own
host NQN and DH-CHAP key).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.matrix.disks import Disk, read_behind, write_behind
from bench.matrix.runner import IntegrityOptions, run_integrity
from bench.matrix.transports import Attachment
from nvmetd.vms import SUBSYSTEM_PREFIX
from target.apply import apply_state, diff
from target.configfs import ConfigFS
from target.model import parse_state

pytestmark = pytest.mark.kernel

SIZE = 8 << 20
FIO_HDR_MAGIC = 0xACCA  # fio's verify_header.magic, first 2 bytes of every verify_interval block
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _tools() -> None:
    if shutil.which("fio") is None:
        _unavailable("fio is not installed (make setup)")
    try:
        from libnvme import nvme  # noqa: F401
    except ImportError:
        _unavailable("libnvme's Python bindings are not installed (make setup)")


def _options(scratch: Path, backend: str, transport: str, *job_files: str) -> IntegrityOptions:
    return IntegrityOptions(backends=[backend], transports=[transport], size=SIZE, workdir=scratch,
                            job_files=list(job_files) or ["integrity"])


def _stages(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["stage"]: s for s in result["stages"]}


def _fio_header(block: bytes) -> tuple[int, int]:
    """(magic, offset) of a fio verify header: u16 magic, u16 type, u32 len, u64 rand_seed, u64 offset."""
    magic = struct.unpack_from("<H", block, 0)[0]
    offset = struct.unpack_from("<Q", block, 16)[0]
    return magic, offset


def _corrupt_before_readback(change: str) -> tuple[dict[str, int], Any]:
    """A stage hook that, once every writing stage has passed, damages one 4 KiB block behind the target."""
    done: dict[str, int] = {}

    def hook(disk: Disk, _att: Attachment, _job: str, stage: str) -> None:
        if stage != "readback":
            return
        offset = SIZE // 2 + 7 * 4096
        block = read_behind(disk, offset, 4096)
        # the block holds what fio wrote *through the target* for this very offset: the path maps 1:1
        assert _fio_header(block) == (FIO_HDR_MAGIC, offset)
        if change == "garbage":
            write_behind(disk, offset, os.urandom(4096))
        else:  # one bit in the data, past the header: only the checksum can notice
            flipped = bytearray(block)
            flipped[1000] ^= 0x10
            write_behind(disk, offset, bytes(flipped))
        assert read_behind(disk, offset, 4096) != block
        done["offset"] = offset

    return done, hook


@pytest.mark.parametrize(("backend", "change", "kind"), [("file", "garbage", "verify"),
                                                         ("nullblk", "bitflip", "crc32c")])
def test_corruption_behind_the_target_is_reported(cfs: ConfigFS, scratch: Path, backend: str, change: str,
                                                  kind: str) -> None:
    corrupted, hook = _corrupt_before_readback(change)
    report = run_integrity(_options(scratch, backend, "loop"), cfs, before_stage=hook)

    assert corrupted, "the corruption hook never ran"
    assert report["passed"] is False
    [result] = report["results"]
    stages = _stages(result)
    assert [s for s in ("fill", "rand-qd1", "rand-qd16", "rand-qd128") if stages[s]["ok"]] == \
        ["fill", "rand-qd1", "rand-qd16", "rand-qd128"], "the job passed before the corruption"
    assert stages["readback"]["ok"] is False
    assert [(f["offset"], f["kind"]) for f in result["failures"]] == [(corrupted["offset"], kind)]
    assert f"offset {corrupted['offset']}" in stages["readback"]["why"]
    assert result["attachment"]["subsystem"].startswith(SUBSYSTEM_PREFIX)  # exported by the Manager


def _require_rdma() -> None:
    if subprocess.run(["modprobe", "rdma_rxe"], capture_output=True, check=False).returncode != 0:
        _unavailable("no rdma_rxe module in this kernel")
    if shutil.which("rdma") is None:
        _unavailable("the rdma tool (iproute2) is missing")


@pytest.mark.parametrize("transport", ["loop", "tcp", "rdma"])
def test_integrity_passes_over_each_transport(cfs: ConfigFS, scratch: Path, transport: str) -> None:
    if transport == "rdma":
        _require_rdma()
    report = run_integrity(_options(scratch, "file", transport, "integrity", "integrity-trim"), cfs)

    assert report["passed"] is True, report["results"]
    assert [r["job_file"] for r in report["results"]] == ["integrity.fio", "integrity-trim.fio"]
    for result in report["results"]:
        assert result["attachment"]["kernel_transport"] == transport
        assert result["device"].startswith("/dev/nvme")
        # the path users get: a VM subsystem from Manager.attach, this host connected with the VM's host NQN
        assert result["attachment"]["subsystem"].startswith(SUBSYSTEM_PREFIX)
        assert result["attachment"]["host"].startswith("nqn.2014-08.org.nvmexpress:uuid:")
        stages = _stages(result)
        assert stages["fill"]["bytes"]["write"] == SIZE and stages["readback"]["bytes"]["read"] == SIZE
    trim_stages = _stages(report["results"][1])
    assert trim_stages["trim-all"]["bytes"]["trim"] == SIZE
    assert trim_stages["zero-readback"]["bytes"]["read"] == SIZE


def test_block_backend_and_foreign_exports_survive(cfs: ConfigFS, scratch: Path) -> None:
    """null_blk behind a block namespace keeps data (trim included), and an export that was there before the run
    is exactly as it was afterwards: the harness's Manager removes what it added and nothing else."""
    foreign_file = scratch / "foreign.img"
    foreign_file.write_bytes(b"\0" * (1 << 20))
    foreign = parse_state({
        "hosts": [{"nqn": "nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-1111-2222-3333-444444444444"}],
        "subsystems": [{"nqn": "nqn.2026-11.io.nvmetd:someone-else", "allowed_hosts":
                        ["nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-1111-2222-3333-444444444444"],
                        "namespaces": [{"nsid": 1, "device_path": str(foreign_file)}]}],
        "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
                   "subsystems": ["nqn.2026-11.io.nvmetd:someone-else"]}],
    })
    assert apply_state(foreign, cfs).converged
    nullb = Path("/sys/kernel/config/nullb")
    before = set(nullb.glob("*")) if nullb.is_dir() else set()

    report = run_integrity(_options(scratch, "nullblk", "tcp", "integrity-trim"), cfs)
    assert report["passed"] is True, report["results"]
    assert report["results"][0]["backend"] == "nullblk"
    assert diff(foreign, cfs) == []  # prune=True: not one object more or less than the foreign export
    assert set(nullb.glob("*")) == before  # the pool's null_blk devices are gone with it
