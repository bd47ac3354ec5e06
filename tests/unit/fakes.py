"""A fake nvmet configfs tree (plain directories and files) for pure-logic tests on the host."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from target.configfs import ConfigFS


class FakeKernel:
    """Creates the attribute files the kernel would create on mkdir, so the planner sees a realistic tree."""

    FILES: ClassVar[dict[str, dict[str, str]]] = {
        "hosts": {"dhchap_key": "", "dhchap_ctrl_key": "", "dhchap_hash": "hmac(sha256)", "dhchap_dhgroup": "null"},
        "subsystems": {"attr_allow_any_host": "0", "attr_serial": "abc", "attr_model": "Linux",
                       "attr_qid_max": "128"},
        "namespaces": {"device_path": "(null)", "enable": "0", "buffered_io": "0", "ana_grpid": "1",
                       "device_uuid": "00000000-0000-0000-0000-000000000001",
                       "device_nguid": "00000000-0000-0000-0000-000000000000"},
        "ports": {"addr_trtype": "", "addr_adrfam": "", "addr_traddr": "", "addr_trsvcid": "",
                  "addr_treq": "not specified"},
        "ana_groups": {"ana_state": "optimized"},
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
            (path / "ana_groups" / "1" / "ana_state").write_text("optimized\n")  # the default group

    def rmdir(self, rel: str) -> None:
        """configfs drops a directory's attribute files and default groups with it; what a user created inside
        (a namespace, a link) still makes the rmdir fail, as in the kernel."""
        path = Path(self.path(rel))
        kind = path.parent.name
        if path.is_dir():
            for name in FakeKernel.FILES.get(kind, {}):
                (path / name).unlink(missing_ok=True)
            (path / "ana_groups" / "1" / "ana_state").unlink(missing_ok=True)
            defaults = {"subsystems": ["namespaces", "allowed_hosts", "passthru"],
                        "ports": ["subsystems", "referrals", "ana_groups/1", "ana_groups"]}.get(kind, [])
            for sub in defaults:
                try:
                    (path / sub).rmdir()
                except OSError:
                    break
        super().rmdir(rel)
