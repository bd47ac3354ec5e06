"""nvmetctl's shell and its user-error handling, against a fake configfs tree (no kernel needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvmetd import shell
from nvmetd.cli import main
from target.apply import apply_state
from target.model import TargetState, parse_state
from tests.unit.test_plan_fake_tree import AllReady, FakeFS, FakeKernel, state


@pytest.fixture
def fake(tmp_path: Path) -> FakeFS:
    FakeKernel(tmp_path / "nvmet")
    return FakeFS(root=tmp_path / "nvmet")


def test_shell_lists_the_live_tree_and_diffs(fake: FakeFS, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    apply_state(state(), fake, readiness=AllReady())
    shell.run(shell.Local(fake, lambda: TargetState()),
              ["ls", "cd /subsystems/nqn.2026-11.io.nvmetd:disk/namespaces/1", "info", "cd /", "diff"],
              preferences_dir=str(tmp_path / "prefs"))
    out = capsys.readouterr().out
    assert "nqn.2026-11.io.nvmetd:disk" in out and "device_path: /dev/a" in out
    assert "rmdir subsystems/nqn.2026-11.io.nvmetd:disk" in out  # desired is empty: everything would go


def test_cli_bad_state_is_one_line_exit_2(fake: FakeFS, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"subsystems": [{"nqn": "nqn.2026-11.io.nvmetd:x", "namespaces": [
        {"nsid": 1, "device_path": "../../etc/shadow"}]}]}))
    code = main(["--offline", "--state", str(tmp_path / "s.json"), "--configfs", str(fake.root), "apply", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "subsystems.0.namespaces.0.device_path" in err


def test_cli_apply_then_diff_is_clean(fake: FakeFS, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"subsystems": [{"nqn": "nqn.2026-11.io.nvmetd:x", "allow_any_host": True}]}))
    common = ["--offline", "--state", str(tmp_path / "state.json"), "--configfs", str(fake.root)]
    # the fake tree cannot create attribute files on a plain mkdir, so the object is made the fake way first
    apply_state(parse_state(json.loads(src.read_text())), fake, readiness=AllReady())
    assert main([*common, "apply", str(src)]) == 0
    capsys.readouterr()
    assert main([*common, "--json", "diff"]) == 0
    assert json.loads(capsys.readouterr().out) == {"drift": []}
    (fake.root / "subsystems" / "nqn.2026-11.io.nvmetd:x" / "attr_allow_any_host").write_text("0\n")
    assert main([*common, "diff"]) == 1
    assert main([*common, "repair"]) == 0
    assert main([*common, "diff"]) == 0


def test_cli_refuses_reserved_vm_names(fake: FakeFS, tmp_path: Path) -> None:
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"subsystems": [{"nqn": "nqn.2026-11.io.nvmetd:vm:1234", "allow_any_host": True}]}))
    assert main(["--offline", "--state", str(tmp_path / "st.json"), "--configfs", str(fake.root), "apply",
                 str(src)]) == 2


def test_status_with_vms_on_an_unknown_pools_root_is_one_line(tmp_path, capsys) -> None:
    """A VM's disk lives in a pool nvmetctl cannot find (its --pools-root / NVMETD_BACKENDS_DIR not given): one
    line naming the pool and exit 2, not a NotFoundError traceback."""
    import json as _json

    from nvmetd.vms import Attachment, new_vm

    vm = new_vm("vm0")
    vm.attachments["d0"] = Attachment(nsid=1, transport="tcp")
    state = tmp_path / "state.json"
    state.write_text(_json.dumps({"format": 1, "generation": 1, "target": {}, "vms": {"vm0": vm.model_dump()},
                                  "disks": {"d0": {"pool": "files", "state": "ready"}}}))
    (tmp_path / "nvmet").mkdir()
    code = main(["--offline", "--state", str(state), "--configfs", str(tmp_path / "nvmet"), "--pools-root",
                 str(tmp_path / "pools"), "status"])
    err = capsys.readouterr().err
    assert code == 2 and "no pool named 'files'" in err and "Traceback" not in err and err.count("\n") == 1
