"""nvmetctl's forms (#16): --json before or after the subcommand, export without DH-CHAP keys unless asked, and a
start-up that imports nothing the command does not use. Offline, on a fake configfs tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvmetd.cli import main
from target.apply import apply_state
from target.model import parse_state
from tests.unit.test_plan_fake_tree import AllReady, FakeFS, FakeKernel

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
KEY = "DHHC-1:00:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYOtVl3:"


@pytest.fixture
def common(tmp_path: Path) -> list[str]:
    FakeKernel(tmp_path / "nvmet")
    fake = FakeFS(root=tmp_path / "nvmet")
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"hosts": [{"nqn": HOST, "dhchap_key": KEY}],
                               "subsystems": [{"nqn": "nqn.2026-11.io.nvmetd:x", "allowed_hosts": [HOST]}]}))
    apply_state(parse_state(json.loads(src.read_text())), fake, readiness=AllReady())
    args = ["--offline", "--state", str(tmp_path / "state.json"), "--configfs", str(fake.root),
            "--socket", str(tmp_path / "none.sock")]
    assert main([*args, "apply", str(src)]) == 0
    return args


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_subcommand(common: list[str], where: str, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    argv = [*common, "--json", "status"] if where == "before" else [*common, "status", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["desired"]["hosts"] == 1


def test_every_command_takes_json_after_it() -> None:
    from nvmetd.cli import cli

    def walk(group, path):
        for name, command in group.commands.items():
            if path == "nvmetctl" and name == "bench":
                continue  # the fio harness's own group (bench/matrix), mounted when used, with its own options
            yield f"{path} {name}", command
            if hasattr(command, "commands"):
                yield from walk(command, f"{path} {name}")

    missing = [p for p, c in walk(cli, "nvmetctl") if "--json" not in [o for p_ in c.params for o in p_.opts]]
    assert missing == []


def test_export_leaves_keys_out_unless_asked(common: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main([*common, "export"]) == 0
    out = capsys.readouterr()
    assert KEY not in out.out and "1 DH-CHAP key(s) left out" in out.err
    assert "dhchap_key" not in json.loads(out.out)["hosts"][0]
    target = tmp_path / "with-keys.json"
    target.write_text("")
    target.chmod(0o644)  # an existing, wider file is narrowed
    assert main([*common, "export", "--nvmetcli", "--with-secrets", "-o", str(target)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and KEY not in out.err and "0600" in out.err
    assert target.stat().st_mode & 0o777 == 0o600
    assert json.loads(target.read_text())["hosts"][0]["dhchap"]["key"] == KEY


@pytest.mark.parametrize("argv", [["--help"], ["--socket", "/nonexistent.sock", "disk", "list"]])
def test_help_and_api_commands_import_no_server_stack(argv: list[str]) -> None:
    code = ("import sys; from nvmetd.cli import main; main(sys.argv[1:]); "
            "print('MODULES:', *sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pydantic', 'fastapi', 'httpx', 'target', 'backends', 'uvicorn') or m.split('.')[0] == 'bench'), "
            "file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    modules = [line for line in proc.stderr.splitlines() if line.startswith("MODULES:")]
    assert modules == ["MODULES:"], proc.stderr


def test_bench_is_still_mounted() -> None:
    proc = subprocess.run([sys.executable, "-m", "nvmetd.cli", "bench", "--help"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and "Usage: nvmetctl bench" in proc.stdout, proc.stderr
