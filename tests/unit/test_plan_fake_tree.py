"""Planner logic on a fake configfs tree (plain directories and files). Pure ordering and idempotence checks;
the kernel's own behaviour is proven by tests/kernel."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from target.apply import apply_state, diff
from target.configfs import ConfigFS
from target.model import parse_state

SUB = "nqn.2026-11.io.nvmetd:disk"
HOST = "nqn.2026-11.io.nvmetd:host"


class FakeKernel:
    """Creates the attribute files the kernel would create on mkdir, so the planner sees a realistic tree."""

    FILES: ClassVar[dict[str, dict[str, str]]] = {
        "hosts": {"dhchap_key": "", "dhchap_ctrl_key": "", "dhchap_hash": "hmac(sha256)", "dhchap_dhgroup": "null"},
        "subsystems": {"attr_allow_any_host": "0", "attr_serial": "abc", "attr_model": "Linux",
                       "attr_qid_max": "128"},
        "namespaces": {"device_path": "(null)", "enable": "0", "buffered_io": "0", "ana_grpid": "1",
                       "device_uuid": "00000000-0000-0000-0000-000000000001"},
        "ports": {"addr_trtype": "", "addr_adrfam": "", "addr_traddr": "", "addr_trsvcid": "",
                  "addr_treq": "not specified"},
    }

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("hosts", "subsystems", "ports"):
            (root / d).mkdir(parents=True)
        (root / "discovery_nqn").write_text("nqn.2014-08.org.nvmexpress.discovery\n")


class FakeFS(ConfigFS):
    def mkdir(self, rel: str) -> None:
        super().mkdir(rel)
        kind = Path(rel).parent.name
        path = Path(self.path(rel))
        for name, value in FakeKernel.FILES.get(kind, {}).items():
            (path / name).write_text(value + "\n")
        if kind == "subsystems":
            for sub in ("namespaces", "allowed_hosts", "passthru"):
                (path / sub).mkdir()
        if kind == "ports":
            for sub in ("subsystems", "referrals", "ana_groups/1"):
                (path / sub).mkdir(parents=True)


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
