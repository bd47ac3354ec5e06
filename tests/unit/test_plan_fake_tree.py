"""Planner logic on a fake configfs tree (plain directories and files). Pure ordering and idempotence checks;
the kernel's own behaviour is proven by tests/kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from target.apply import apply_state, diff
from target.model import parse_state
from tests.unit.fakes import FakeFS, FakeKernel

SUB = "nqn.2026-11.io.nvmetd:disk"
HOST = "nqn.2026-11.io.nvmetd:host"


@pytest.fixture
def fake(tmp_path: Path) -> FakeFS:
    FakeKernel(tmp_path / "nvmet")
    return FakeFS(root=tmp_path / "nvmet")


def state(device: str = "/dev/a", port: str = "4420") -> object:
    return parse_state({
        "hosts": [{"nqn": HOST}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST], "namespaces": [{"nsid": 1, "device_path": device}]}],
        "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": port,
                   "subsystems": [SUB]}],
    })


class AllReady:
    def device_missing(self, path: str) -> None:
        return None

    def address_missing(self, adrfam: str, traddr: str) -> None:
        return None


def test_creation_order_is_hosts_ports_subsystems_namespaces_links(fake: FakeFS) -> None:
    planned = diff(state(), fake)
    index = {line: i for i, line in enumerate(planned)}
    assert index[f"mkdir hosts/{HOST}"] < index[f"link subsystems/{SUB}/allowed_hosts/{HOST} -> hosts/{HOST}"]
    assert index[f"mkdir subsystems/{SUB}"] < index[f"mkdir subsystems/{SUB}/namespaces/1"]
    assert index[f"set subsystems/{SUB}/namespaces/1/device_path = '/dev/a'"] < \
        index[f"set subsystems/{SUB}/namespaces/1/enable = '1'"]
    assert planned[-1] == f"link ports/1/subsystems/{SUB} -> subsystems/{SUB}"


def test_second_apply_plans_nothing_and_writes_nothing(fake: FakeFS) -> None:
    first = apply_state(state(), fake, readiness=AllReady())
    assert first.converged and first.writes > 0
    again = apply_state(state(), fake, readiness=AllReady())
    assert again.planned == [] and again.writes == 0


def test_removal_runs_in_reverse_dependency_order(fake: FakeFS) -> None:
    apply_state(state(), fake, readiness=AllReady())
    planned = diff(parse_state({}), fake)
    assert planned == [
        f"unlink ports/1/subsystems/{SUB}",
        f"rmdir subsystems/{SUB}/namespaces/1",
        f"unlink subsystems/{SUB}/allowed_hosts/{HOST}",
        f"rmdir subsystems/{SUB}",
        "rmdir ports/1",
        f"rmdir hosts/{HOST}",
    ]


def test_missing_device_is_pending_and_blocks_nothing_else(fake: FakeFS) -> None:
    result = apply_state(state(device="/nonexistent/dev"), fake)
    ns = result.objects[f"subsystems/{SUB}/namespaces/1"]
    assert ns.status == "pending" and "/nonexistent/dev" in ns.reason
    assert result.objects[f"ports/1/subsystems/{SUB}"].status == "changed"
