"""Names typed into nvmetctl against a live nvmetd (real app on its Unix socket, real state store and file pool,
fake configfs tree) that holds other disks and VMs: each name is refused with one line and exit 2, or acts on
exactly the object of that name; nothing else changes (tests/cli_names.py says how that is judged)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests import cli_names
from tests.unit.fakes import FakeFS
from tests.unit.test_api_fuzz import World


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with World(tmp_path_factory.mktemp("cli")) as w:
        cli_names.ensure(w.socket)
        yield w


def _snap(world: World) -> cli_names.Snapshot:
    return cli_names.snapshot(world.manager.store.path, FakeFS(root=world.base / "nvmet"), world.base / "pools",
                              world.base / "keys")


@pytest.mark.parametrize("cmd", cli_names.COMMANDS,
                         ids=lambda c: " ".join(a for a in c.argv if a not in (cli_names.N, "--")))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=cli_names.cli_names())
def test_a_name_is_refused_or_acts_on_exactly_its_object(world: World, cmd: cli_names.Command, name: str) -> None:
    cli_names.ensure(world.socket)
    before = _snap(world)
    argv = [name if a == cli_names.N else a for a in cmd.argv]
    outcome = cli_names.run_cli(world.socket, world.manager.store.path, argv)
    problem = cli_names.judge(cmd, name, outcome, before, _snap(world))
    assert problem is None, problem
    assert world.outside_files() == []


@pytest.mark.parametrize(("argv", "survivor"), [
    (["disk", "delete", "free#x"], "free"), (["disk", "delete", "free?force=1"], "free"),
    (["disk", "delete", "nothere/../free"], "free"), (["detach", "vma", "../../../disks/free"], "free"),
])
def test_the_reported_bugs_are_refused(world: World, argv: list[str], survivor: str) -> None:
    """The issue's own reproducers, each on a disk nothing holds (so only the name protects it)."""
    cli_names.ensure(world.socket)
    outcome = cli_names.run_cli(world.socket, world.manager.store.path, argv)
    assert outcome.code == 2 and outcome.stderr.count("\n") == 1, outcome
    assert survivor in world.manager.store.load()["disks"]
