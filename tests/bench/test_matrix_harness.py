"""The harness's own plumbing on the host: disks through backends/ and the Manager, the guest fio command line,
the initramfs library list, `nvmetctl bench` and the exit codes it shares with `python -m bench.matrix`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.matrix import cli as bench_cli
from bench.matrix import fio, transports
from bench.matrix.disks import Site, provision, read_behind, write_behind
from bench.matrix.runner import Options, PerfOptions, _transports, run_perf
from bench.matrix.transports import Attachment, Transport, TransportError
from bench.matrix.vhost import guest_fio_command, split_guest_output
from nvmetd import cli as nvmetctl
from vhost_nvme.vm import shared_libraries

MIB = 1 << 20


def test_a_file_disk_is_a_manager_disk_in_a_backends_pool(tmp_path: Path) -> None:
    site = Site(None, tmp_path, daemon_socket=tmp_path / "no-daemon.sock")
    disk = provision(site, "file", "nvmb-file-0", 8 * MIB)
    [info] = site.manager.list_disks()
    assert (info["name"], info["pool"], info["logical_bytes"]) == ("nvmb-file-0", "bench-file", 8 * MIB)
    # the baseline is the volume's own file, as the pool hands it to a namespace
    assert disk.device_path == site.pool("bench-file").device_path("nvmb-file-0") == disk.backing_path
    assert os.stat(disk.device_path).st_size == 8 * MIB
    write_behind(disk, 4096, b"x" * 512)
    assert read_behind(disk, 4096, 512) == b"x" * 512
    disk.destroy()
    assert site.manager.list_disks() == []
    assert not Path(disk.device_path).exists()
    assert not list((tmp_path / "pools").glob("*/ledger.json"))  # the pool is destroyed too


def test_a_running_daemon_is_not_fought(tmp_path: Path) -> None:
    sock = tmp_path / "nvmetd.sock"
    sock.touch()
    with pytest.raises(bench_cli.SystemProblem, match="nvmetd is running"):
        Site(None, tmp_path, daemon_socket=sock)


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    site = Site(None, tmp_path, daemon_socket=tmp_path / "no-daemon.sock")
    with pytest.raises(bench_cli.SystemProblem, match="unknown backend 'loop'"):
        provision(site, "loop", "x", MIB)


def test_vhost_runs_alone() -> None:
    options = Options(backends=["file"], transports=["tcp", "vhost"], size=MIB)
    with pytest.raises(TransportError, match="runs alone"), _transports(options):
        pass


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_guest_fio_command_runs_a_job_and_reports_it(tmp_path: Path) -> None:
    """The exact line sent to a guest, run by sh on this host: the job arrives intact, the exit status is fio's,
    and both the JSON and a verify failure come back through the parser."""
    target = tmp_path / "disk.img"
    target.write_bytes(b"\0" * MIB)
    job = fio.job_file("integrity")
    env = {"DEV": str(target), "SIZE": str(MIB), "LOOPS": "1"}
    line = guest_fio_command(job.read_text(), "fill", env, str(tmp_path))
    proc = subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path, check=False)
    run = fio.parse_run(["fio"], proc.returncode, *split_guest_output(proc.stdout))
    assert run.ok and [j.job for j in run.jobs] == ["fill"] and run.jobs[0].io_bytes >= MIB

    with open(target, "r+b") as f:  # garbage in the middle of what fill wrote
        f.seek(MIB // 2)
        f.write(os.urandom(4096))
    line = guest_fio_command(job.read_text(), "readback", env, str(tmp_path))
    proc = subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path, check=False)
    run = fio.parse_run(["fio"], proc.returncode, *split_guest_output(proc.stdout))
    assert proc.returncode != 0 and not run.ok
    assert [f.offset for f in run.verify_failures] == [MIB // 2]


def test_guest_fio_command_refuses_its_own_delimiter() -> None:
    with pytest.raises(fio.FioError):
        guest_fio_command("[x]\nFIOJOB\n", "", {})


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_shared_libraries_cover_what_fio_loads() -> None:
    libs = shared_libraries(Path(shutil.which("fio") or "fio"))
    names = {p.name for p in libs}
    assert "libaio.so.1" in names and any(n.startswith("ld-linux") for n in names)
    assert all(p.is_absolute() and p.exists() for p in libs)


def test_nvmetctl_mounts_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert nvmetctl.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: nvmetctl bench" in out and "integrity" in out and "perf" in out
    assert nvmetctl.main(["bench", "perf", "--help"]) == 0
    assert "vhost" in capsys.readouterr().out


@pytest.mark.parametrize("main", [nvmetctl.main, lambda argv: bench_cli.main(argv[1:])], ids=["nvmetctl", "module"])
def test_both_entry_points_share_exit_codes(main, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "perf", "--backend", "loop"]) == 2  # bad input
    assert "loop not in file, nullblk, lvm, zfs" in capsys.readouterr().err
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema": "other"}))
    assert main(["bench", "report", str(bad)]) == 2
    unwritable = tmp_path / "ro"
    unwritable.mkdir()
    good = unwritable / "report.json"
    good.write_text(json.dumps({"schema": "bench.matrix/1", "kind": "integrity", "results": [], "params": {},
                                "passed": False}))
    assert main(["bench", "report", str(good), "--out", str(good / "sub")]) == 3  # an OSError: the system
    assert "error:" in capsys.readouterr().err


class _FakeGuest(Transport):
    """A transport with its own baseline whose "guests" are fio on this host, recording what ran where."""

    name = "fakeguest"
    needs_nvmet = False
    own_baseline = True
    baseline_label = "the fake baseline"

    def __init__(self, **_options: object) -> None:
        self.log: list[tuple[str, str]] = []

    def _att(self, label: str, disk) -> Attachment:
        def run(path: Path, section: str, env: dict[str, str], *, timeout: float | None = None) -> fio.FioRun:
            self.log.append((label, section))
            return fio.run_fio(path, section, env, timeout=timeout)

        self.log.append((label, "up"))
        return Attachment(label, Path(disk.device_path), run_fio=run,
                          detach=lambda: self.log.append((label, "down")), details={"where": label})

    def attach(self, disk, site, index: int) -> Attachment:
        return self._att(self.name, disk)

    def baseline(self, disk, site) -> Attachment:
        return self._att("baseline", disk)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_own_baseline_alternates_job_by_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeGuest()
    monkeypatch.setitem(transports.TRANSPORTS, "fakeguest", lambda **_: fake)
    options = PerfOptions(backends=["file"], transports=["fakeguest"], size=4 * MIB, workdir=tmp_path,
                          jobs=["randread-4k-qd1", "randwrite-4k-qd1"], runtime=1, ramp=0)
    data = run_perf(options, None)

    jobs = ["randread-4k-qd1", "randwrite-4k-qd1"]
    assert fake.log == [("baseline", "up"), ("fakeguest", "up"),
                        *[(side, job) for job in jobs for side in ("baseline", "fakeguest")],
                        ("fakeguest", "down"), ("baseline", "down")]
    assert [(r["transport"], r["job"]) for r in data["results"]] == \
        [(side, job) for job in jobs for side in ("baseline", "fakeguest")]
    assert all(r["ios"] > 0 for r in data["results"])
    assert data["params"]["baseline"] == "the fake baseline"
    assert [a["where"] for a in data["attachments"]] == ["baseline", "fakeguest"]
