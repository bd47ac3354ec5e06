"""Names typed into nvmetctl against a real nvmetd on the real kernel (tests/cli_names.py has the judgement): a
name is refused with one line and exit 2, or acts on exactly the object of that name; the state file, the nvmet
tree as the kernel reports it, the volumes and the key files are otherwise unchanged. The host run
(tests/unit/test_cli_names.py) covers many more examples; this one proves the same on real configfs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import pools
from target.configfs import ConfigFS
from tests import cli_names
from tests.conftest import wipe
from tests.kernel import hostside
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

EXAMPLES = int(os.environ.get("NVMETD_CLI_NAME_EXAMPLES", "36"))


@pytest.fixture(scope="module")
def daemon(nvmet_kernel: ConfigFS) -> Iterator[Daemon]:
    wipe()
    base_dir = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else Path("/tmp")
    base_dir.mkdir(parents=True, exist_ok=True)
    base = Path(subprocess.run(["mktemp", "-d", "-p", str(base_dir)], check=True, capture_output=True,
                               text=True).stdout.strip())
    d = Daemon(base)
    (base / "nvmetd.toml").write_text("")
    pools.create_pool("file", "files", devices=[str(base / "files")], root=d.pools_root)
    d.start()
    try:
        d.ctl("disk", "create", "keep", "--pool", "files", "--size", "4M")
        d.ctl("attach", "keeper", "keep", "--transport", "tcp")  # never named by any template
        cli_names.ensure(d.socket)
        yield d
    finally:
        d.stop()
        for sub in ConfigFS().listdir("subsystems"):
            hostside.disconnect(sub)
        wipe()
        shutil.rmtree(base, ignore_errors=True)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(cmd=st.sampled_from(cli_names.COMMANDS), name=cli_names.cli_names())
def test_a_name_is_refused_or_acts_on_exactly_its_object(daemon: Daemon, cmd: cli_names.Command, name: str) -> None:
    cli_names.ensure(daemon.socket)
    snap = lambda: cli_names.snapshot(daemon.state, ConfigFS(), daemon.pools_root, daemon.base / "keys")  # noqa: E731
    before = snap()
    argv = [name if a == cli_names.N else a for a in cmd.argv]
    outcome = cli_names.run_cli(daemon.socket, daemon.state, argv)
    problem = cli_names.judge(cmd, name, outcome, before, snap())
    assert problem is None, problem
    assert "Traceback" not in daemon.log_text()
