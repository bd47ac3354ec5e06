"""The Ceph client's pure parts: redundancy words from PG states, key scrubbing, checks made before any command."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.ceph import Client, _scrub, redundancy
from backends.errors import BackendError, UnavailableError


@pytest.mark.parametrize(("states", "word"), [
    (["active+clean"] * 4, "clean"),
    (["active+clean", "active+undersized+degraded"], "degraded"),
    (["active+recovering+degraded", "active+clean"], "recovering"),
    (["active+undersized+degraded+remapped+backfilling", "active+clean"], "recovering"),
    (["peering", "active+clean"], "unavailable"),
    (["active+clean", "down"], "unavailable"),
    ([], "unknown"),
])
def test_redundancy(states: list[str], word: str) -> None:
    assert redundancy(states) == word


def test_scrub_hides_cephx_keys() -> None:
    key = "AQBJ2U1nAAAAABAAm3+oD3jUy2mlqW8d7bHkhw=="
    assert key not in _scrub(f"auth: bad key {key} for client.admin")


def _files(tmp_path: Path, conf: str = "[global]\nmon_host = 127.0.0.1\n", mode: int = 0o600) -> tuple[str, str]:
    (tmp_path / "ceph.conf").write_text(conf)
    keyring = tmp_path / "keyring"
    keyring.write_text("[client.admin]\n\tkey = AQBJ2U1nAAAAABAAm3+oD3jUy2mlqW8d7bHkhw==\n")
    keyring.chmod(mode)
    return str(tmp_path / "ceph.conf"), str(keyring)


def test_checks_name_the_cause_before_any_command(tmp_path: Path) -> None:
    conf, keyring = _files(tmp_path, mode=0o644)
    with pytest.raises(UnavailableError, match="mode 0644: it must be 0600"):
        Client(conf, keyring).check()
    with pytest.raises(UnavailableError, match="does not exist"):
        Client(str(tmp_path / "nope.conf"), keyring).check()
    conf, keyring = _files(tmp_path, conf="[global]\nfsid = x\n")
    with pytest.raises(UnavailableError, match="names no monitor"):
        Client(conf, keyring).check()
    with pytest.raises(BackendError, match="not a cephx user name"):
        Client(conf, keyring, user="../x").check()
