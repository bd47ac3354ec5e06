"""OpenAPI fuzzing (schemathesis) of a real nvmetd process on the real kernel, over its Unix socket: a bounded
run (few examples per operation: TCG is slow) with the host run's checks (tests/unit/test_api_fuzz.py): no 5xx,
responses as the schema says, no traceback in any response or in the daemon's log, and every invalid path
parameter name refused with a 4xx. Afterwards the kernel tree still matches the daemon's state."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import pools
from target.configfs import ConfigFS
from target.live import read_state
from tests import api_fuzz, cli_names
from tests.conftest import wipe
from tests.kernel import hostside
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

# A budget in seconds, not a count: each fuzzed operation gets an equal share of NVMETD_FUZZ_SECONDS and runs
# examples (up to NVMETD_FUZZ_EXAMPLES) until its share is spent, however slow the TCG guest is today.
EXAMPLES = int(os.environ.get("NVMETD_FUZZ_EXAMPLES", "50"))
SECONDS = float(os.environ.get("NVMETD_FUZZ_SECONDS", "360"))
schema = api_fuzz.load_schema(max_examples=EXAMPLES)
FUZZ_ITEMS = (len(api_fuzz.operations_with_names())
              + len(api_fuzz.PATH_OPERATIONS) + len(list(schema.get_all_operations())))
BUDGET = api_fuzz.Budget(SECONDS / max(FUZZ_ITEMS, 1))
# Health checks on, but for too_slow: it times data generation, and a loaded TCG guest is slow at everything.
CHECKED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def daemon(nvmet_kernel: ConfigFS) -> Iterator[Daemon]:
    """One daemon for the whole module (each start costs a FastAPI import under TCG), on a clean tree."""
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
        for disk in ("d0", "d1", "kd"):
            d.ctl("disk", "create", disk, "--pool", "files", "--size", "4M")
        d.ctl("attach", "vm0", "d0", "--transport", "tcp")
        d.ctl("attach", "keeper", "kd", "--transport", "tcp")  # not in KNOWN: nothing the fuzzer does may touch it
        yield d
    finally:
        d.stop()
        for sub in ConfigFS().listdir("subsystems"):
            hostside.disconnect(sub)
        wipe()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[httpx.Client]:
    with api_fuzz.uds_client(daemon.socket) as c:
        yield c


def test_served_schema_is_the_fuzzed_one(client: httpx.Client) -> None:
    assert client.get("/openapi.json").json() == api_fuzz.OPENAPI


@schema.parametrize()
@CHECKED
def test_openapi_fuzz(case, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    if BUDGET.spent(("any", case.operation.label)):
        return
    api_fuzz.check_case(client, case)


KNOWN = {"name": ["d0", "d1", "d2"], "disk": ["d0", "d1", "d2"], "vm": ["vm0", "vm1"], "snapshot": ["s1"],
         "body.pool": ["files"], "body.snapshot": ["s1"], "body.name": ["d2"], "body.size": ["4M", "8M"]}


@pytest.mark.parametrize(("method", "path"), api_fuzz.operations_with_names(), ids=lambda x: x)
@settings(CHECKED, max_examples=EXAMPLES)
@given(data=st.data())
def test_openapi_fuzz_on_known_objects(client: httpx.Client, method: str, path: str, data: st.DataObject) -> None:
    case = data.draw(api_fuzz.known_name_cases(schema, method, path, KNOWN))
    if BUDGET.spent(("known", method, path)):  # after the draw: every example must draw alike (hypothesis's data tree)
        return
    api_fuzz.check_case(client, case, api_fuzz.POSITIVE_CHECKS)


@pytest.mark.parametrize(("method", "template", "body"), api_fuzz.PATH_OPERATIONS,
                         ids=[f"{m} {p}" for m, p, _ in api_fuzz.PATH_OPERATIONS])
@settings(CHECKED, max_examples=EXAMPLES)
@given(bad=api_fuzz.invalid_names())
def test_invalid_path_names_get_4xx(client: httpx.Client, method: str, template: str, body: dict | None,
                                    bad: str) -> None:
    if BUDGET.spent(("invalid", method, template)):
        return
    problem = api_fuzz.refuses_invalid_name(client, method, template, body, bad,
                                            {"name": "d1", "vm": "vm0", "disk": "d1", "snapshot": "s1"})
    assert problem is None, problem


CLI_NAME_EXAMPLES = int(os.environ.get("NVMETD_CLI_NAME_EXAMPLES", "12"))


@settings(CHECKED, max_examples=CLI_NAME_EXAMPLES)
@given(cmd=st.sampled_from(cli_names.COMMANDS), name=cli_names.cli_names())
def test_cli_names_are_refused_or_act_on_exactly_their_object(daemon: Daemon, cmd: cli_names.Command,
                                                              name: str) -> None:
    """nvmetctl's own entry point with generated names (tests/cli_names.py): refused with one line and exit 2, or
    acting on exactly that object; the state file, the tree as the kernel reports it, the volumes and key files
    otherwise unchanged. The host run (tests/unit/test_cli_names.py) has many more examples."""
    cli_names.ensure(daemon.socket)
    snap = lambda: cli_names.snapshot(daemon.state, ConfigFS(), daemon.pools_root, daemon.base / "keys")  # noqa: E731
    before = snap()
    argv = [name if a == cli_names.N else a for a in cmd.argv]
    outcome = cli_names.run_cli(daemon.socket, daemon.state, argv)
    problem = cli_names.judge(cmd, name, outcome, before, snap())
    assert problem is None, problem


def test_after_the_fuzz_the_kernel_matches_and_the_log_is_clean(daemon: Daemon, client: httpx.Client) -> None:
    """Runs last (file order): whatever the fuzzer did, a reconcile converges, the keeper VM the fuzzer never
    named still has its disk, and nvmetd never logged a traceback (a refusal handled as a crash shows up there,
    not in the response)."""
    result = client.post("/v1/reconcile")
    assert result.status_code == 200 and result.json()["converged"], result.text
    keeper = client.get("/v1/vms/keeper").json()
    assert list(keeper["disks"]) == ["kd"]
    sub = read_state(ConfigFS()).subsystem(keeper["subsystem_nqn"])
    assert sub is not None and sub.allowed_hosts == [keeper["host_nqn"]] and not sub.allow_any_host
    assert [n.nsid for n in sub.namespaces] == [keeper["disks"]["kd"]["nsid"]]
    log = "".join(p.read_text() for p in daemon.log)
    assert "Traceback" not in log, log[-3000:]
    if BUDGET.ran:
        print(f"kernel fuzz: {sum(BUDGET.ran.values())} examples over {len(BUDGET.ran)} fuzzed operations "
              f"({min(BUDGET.ran.values())}..{max(BUDGET.ran.values())} each) in a {SECONDS:g} s budget")
