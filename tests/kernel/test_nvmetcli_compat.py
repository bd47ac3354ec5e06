"""nvmetcli files as users have them: nvmetcli's own example configs, and what nvmetcli's library saves on 6.12
(`save-6.12-*.json`, made in the rig by tests/fixtures/nvmetcli/make_saves.py from nvmetcli 7a94d92: nvmetcli is
packaged nowhere CI can install it from, so its saves are committed fixtures). Each imports through nvmetctl,
applies to the real kernel and exports back equal."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from nvmetd.cli import main
from target.configfs import ConfigFS
from tests.fixtures.nvmetcli.make_saves import configs, make_backing

pytestmark = pytest.mark.kernel
FIXTURES = Path(__file__).parent.parent / "fixtures/nvmetcli"
EXAMPLES = sorted((FIXTURES / "examples").glob("*.json"))
SAVES = sorted(FIXTURES.glob("save-6.12-*.json"))


def contained(part: Any, whole: Any, where: str = "") -> list[str]:
    """Where `part` (a partial nvmetcli file) says something `whole` (the full form) does not; values compared as
    the kernel prints them (1 and "1" alike)."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return [p for k, v in part.items() for p in
                (contained(v, whole[k], f"{where}.{k}") if k in whole else [f"{where}.{k}: missing"])]
    if isinstance(part, list) and isinstance(whole, list) and len(part) == len(whole):
        return [p for i, (a, b) in enumerate(zip(part, whole, strict=True)) for p in contained(a, b, f"{where}[{i}]")]
    return [] if str(part) == str(whole) else [f"{where}: {part!r} != {whole!r}"]


def ctl(tmp: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--offline", "--state", str(tmp / "state.json"), "--socket", str(tmp / "no-daemon.sock"), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_nvmetcli_examples_import_and_export_back(example: Path, cfs: ConfigFS, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """As shipped (their /dev/nvme0n1 and addresses are not on this host): stored, exported back the same, and
    the names that are not NQNs of the spec's form (testnqn, hostnqn) accepted with a warning."""
    code, out, err = ctl(tmp_path, capsys, "import", "--nvmetcli", "--no-apply", str(example))
    assert code == 0, err
    config = json.loads(example.read_text())
    odd = {s["nqn"] for s in config["subsystems"]} | {h["nqn"] for h in config["hosts"]}
    assert all(f"{n!r} is not an NQN of the spec's form" in err for n in odd), err
    code, out, err = ctl(tmp_path, capsys, "export", "--nvmetcli")
    assert code == 0, err
    assert contained(config, json.loads(out)) == []


@pytest.mark.parametrize("name", ["loop", "tcp"])
def test_nvmetcli_examples_apply_to_the_kernel(name: str, cfs: ConfigFS, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """The loop and tcp examples, on a file and 127.0.0.1 instead: applied, the live tree exports back the same."""
    make_backing()
    src = tmp_path / f"{name}.json"
    config = configs()[name]
    src.write_text(json.dumps(config))
    code, out, err = ctl(tmp_path, capsys, "import", "--nvmetcli", str(src))
    assert code == 0, out + err
    code, out, err = ctl(tmp_path, capsys, "export", "--nvmetcli", "--live")
    assert code == 0, err
    assert contained(config, json.loads(out)) == []
    assert ctl(tmp_path, capsys, "diff")[0] == 0


@pytest.mark.parametrize("save", SAVES, ids=lambda p: p.name)
def test_nvmetcli_saves_round_trip_exactly(save: Path, cfs: ConfigFS, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """What nvmetcli's library saved on 6.12 (passthru "(null)" on every subsystem) imports, applies and exports
    from the live kernel as the very same document."""
    make_backing()
    code, out, err = ctl(tmp_path, capsys, "import", "--nvmetcli", str(save))
    assert code == 0, out + err
    code, out, err = ctl(tmp_path, capsys, "export", "--nvmetcli", "--live", "--with-secrets")
    assert code == 0, err
    assert json.loads(out) == json.loads(save.read_text())
    saved = copy.deepcopy(json.loads(save.read_text()))
    assert all(s["passthru"][0]["device"]["path"] == "(null)" for s in saved["subsystems"])
