"""The fio harness's vhost transport: the real integrity job files inside a TCG guest whose /dev/nvme0n1 is the
vhost-user-nvme device served by a vhost_nvme engine on a backends/ file-pool disk, run through the same code as
`python -m bench.matrix integrity --transport vhost`.

Small (8 MiB) because the guest is TCG. The second test proves the checksums also catch corruption on this path:
garbage written into the backing file behind the engine, before the read-back, must come back as a verify failure
at that offset.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.matrix.disks import Disk, write_behind
from bench.matrix.runner import IntegrityOptions, run_integrity
from bench.matrix.transports import Attachment

from .conftest import unavailable

pytestmark = pytest.mark.qemu

SIZE = 8 << 20


@pytest.fixture(autouse=True)
def _fio(qemu: Path) -> None:
    if shutil.which("fio") is None:
        unavailable("fio is not installed (make setup)")


def _options(tmp_path: Path) -> IntegrityOptions:
    return IntegrityOptions(backends=["file"], transports=["vhost"], size=SIZE, workdir=tmp_path,
                            job_files=["integrity"], fio_timeout=900)


def _stages(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["stage"]: s for s in result["stages"]}


def test_integrity_passes_over_vhost(tmp_path: Path) -> None:
    report = run_integrity(_options(tmp_path), None)

    assert report["passed"] is True, report["results"]
    [result] = report["results"]
    assert result["transport"] == "vhost" and result["device"] == "/dev/nvme0n1"
    assert result["attachment"]["guest_model"] == "nvmetd vhost-nvme"  # the engine's controller, not QEMU's
    stages = _stages(result)
    assert list(stages) == ["fill", "rand-qd1", "rand-qd16", "rand-qd128", "readback"]
    assert stages["fill"]["bytes"]["write"] == SIZE and stages["readback"]["bytes"]["read"] == SIZE


def test_corruption_behind_the_engine_is_reported(tmp_path: Path) -> None:
    corrupted: dict[str, int] = {}

    def hook(disk: Disk, _att: Attachment, _job: str, stage: str) -> None:
        if stage == "readback":
            corrupted["offset"] = SIZE // 2 + 3 * 4096
            write_behind(disk, corrupted["offset"], os.urandom(4096))

    report = run_integrity(_options(tmp_path), None, before_stage=hook)

    assert corrupted, "the corruption hook never ran"
    assert report["passed"] is False
    [result] = report["results"]
    stages = _stages(result)
    assert all(stages[s]["ok"] for s in ("fill", "rand-qd1", "rand-qd16", "rand-qd128"))
    assert stages["readback"]["ok"] is False
    assert [f["offset"] for f in result["failures"]] == [corrupted["offset"]]
