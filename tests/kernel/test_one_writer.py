"""nvmetd is the one writer of configfs and of the store: `nvmetctl apply` while it runs goes through its API (the
CLI process opens neither), `--offline` is refused while it serves and works once it is stopped. Also the CLI
forms of #16 on the same daemon: `--json` after the subcommand, `nvmetctl pool ...`, and `export` without DH-CHAP
keys unless --with-secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backends import pools
from target.configfs import NVMET_ROOT, ConfigFS
from target.live import read_state
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
KEY = "DHHC-1:00:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYOtVl3:"
SUB = "nqn.2026-11.io.nvmetd:one-writer"


def _state(backing: list[Path]) -> dict:
    return {"hosts": [{"nqn": HOST, "dhchap_key": KEY}],
            "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                            "namespaces": [{"nsid": n, "device_path": str(path)}
                                           for n, path in enumerate(backing, start=1)]}],
            "ports": [{"id": 7, "trtype": "loop", "subsystems": [SUB]}]}


def _audited(daemon: Daemon, report: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """nvmetctl under an audit hook watching configfs and the directory of nvmetd's store."""
    proc = subprocess.run([sys.executable, "-m", "tests.audited_cli", str(report),
                           f"{NVMET_ROOT}:{daemon.state.parent}", "--",
                           "--socket", str(daemon.socket), "--state", str(daemon.state),
                           "--pools-root", str(daemon.pools_root), *args],
                          capture_output=True, text=True, check=False)
    return proc, json.loads(report.read_text()) if report.exists() else {}


def test_apply_goes_through_nvmetd_and_offline_waits_for_it_to_stop(cfs: ConfigFS, scratch: Path) -> None:
    daemon = Daemon(scratch / "d")
    daemon.base.mkdir()
    (daemon.base / "nvmetd.toml").write_text("")
    pools.create_pool("file", "files", devices=[str(scratch / "files")], root=daemon.pools_root)
    backing = [scratch / "ns1.img", scratch / "ns2.img"]
    for path in backing:
        with open(path, "wb") as f:
            f.truncate(16 << 20)
    one, two = scratch / "one.json", scratch / "two.json"
    one.write_text(json.dumps(_state(backing[:1])))
    two.write_text(json.dumps(_state(backing)))
    daemon.start()
    try:
        before = daemon.request("GET", "/v1/status").json()["generation"]
        proc, audit = _audited(daemon, scratch / "apply.json", "apply", str(one))
        assert proc.returncode == 0, proc.stderr
        assert "converged" in proc.stdout
        # the daemon recorded and applied it ...
        after = daemon.request("GET", "/v1/status").json()
        assert after["generation"] == before + 1
        assert after["reconcile"]["converged"] and after["reconcile"]["writes"] > 0
        assert [n.nsid for n in read_state(cfs).subsystem(SUB).namespaces] == [1]
        # ... and the CLI process opened neither configfs nor the store, nor imported the code that would
        assert audit["touched"] == [], audit["touched"]
        # target.status is the one exception: the statuses' StrEnum, which imports nothing (target/status.py)
        assert not [m for m in audit["modules"] if m.split(".")[0] in ("target", "backends", "pydantic")
                    and m not in ("target", "target.status")], audit["modules"]

        # --offline is refused while nvmetd serves: one line, exit 3, nothing changed
        generation = daemon.request("GET", "/v1/status").json()["generation"]
        proc, audit = _audited(daemon, scratch / "offline-refused.json", "--offline", "apply", str(two))
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.count("\n") == 1 and "nvmetd is running" in proc.stderr and "Traceback" not in proc.stderr
        assert daemon.request("GET", "/v1/status").json()["generation"] == generation
        assert [n.nsid for n in read_state(cfs).subsystem(SUB).namespaces] == [1]
        assert not [p for _, p in audit["touched"] if p.startswith(str(NVMET_ROOT))]

        # the README's forms: --json after the subcommand, through the daemon
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert status["desired"]["namespaces"] == 1 and status["drift"] == 0
        assert json.loads(daemon.ctl("diff", "--json").stdout) == {"drift": []}
        assert json.loads(daemon.ctl("disk", "list", "--json").stdout) == []

        # pools through the API: create, list, show; a pool holding a disk is not destroyed
        pool_dir = scratch / "pool2"
        pool_dir.mkdir()
        created = json.loads(daemon.ctl("pool", "create", "p2", "--kind", "file", str(pool_dir), "--json").stdout)
        assert created["name"] == "p2" and created["kind"] == "file"
        assert {p["name"] for p in json.loads(daemon.ctl("pool", "list", "--json").stdout)} == {"files", "p2"}
        daemon.ctl("disk", "create", "d-p2", "--pool", "p2", "--size", "4M")
        assert json.loads(daemon.ctl("pool", "show", "p2", "--json").stdout)["disks"] == ["d-p2"]
        refused = daemon.ctl("pool", "destroy", "p2", check=False)
        assert refused.returncode == 2 and "holds disks d-p2" in refused.stderr
        daemon.ctl("disk", "delete", "d-p2")
        daemon.ctl("pool", "destroy", "p2")
        assert "p2" not in {p["name"] for p in json.loads(daemon.ctl("pool", "list", "--json").stdout)}
        assert daemon.ctl("pool", "create", "p3", "--kind", "file", str(scratch), check=False).returncode == 2

        # export leaves the DH-CHAP key out and says so; --with-secrets -o writes it into a 0600 file
        plain = daemon.ctl("export", "--nvmetcli")
        assert KEY not in plain.stdout and "left out" in plain.stderr
        assert json.loads(plain.stdout)["hosts"][0]["dhchap"]["key"] == ""
        secret_file = scratch / "secrets.json"
        with_keys = daemon.ctl("export", "--with-secrets", "-o", str(secret_file))
        assert KEY not in with_keys.stdout and "0600" in with_keys.stderr
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert json.loads(secret_file.read_text())["hosts"][0]["dhchap_key"] == KEY
    finally:
        daemon.stop()

    # stopped: --offline works, under the same store (generation + 1) and on the same tree
    generation = json.loads(daemon.state.read_text())["generation"]
    proc, _ = _audited(daemon, scratch / "offline.json", "--offline", "apply", str(two))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(daemon.state.read_text())["generation"] == generation + 1
    assert [n.nsid for n in read_state(cfs).subsystem(SUB).namespaces] == [1, 2]
    # and without --offline, the CLI says the daemon is not there (exit 3, one line)
    proc = daemon.ctl("status", check=False)
    assert proc.returncode == 3 and "nvmetd is not running" in proc.stderr and proc.stderr.count("\n") == 1
