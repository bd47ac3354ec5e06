"""Ceph's bindings load from the system by path (setup installs them: no skip), alone, and a cluster that cannot be
reached is one line naming the monitor, through real librados (its own connect timeout, no cluster needed)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from backends import ceph_session
from backends.ceph import Client
from backends.errors import UnavailableError
from backends.rbd import FEATURES, _features


def test_bindings_load_by_path_without_the_system_path() -> None:
    rbd = ceph_session.binding("rbd")
    assert sys.modules["rados"] is ceph_session.binding("rados")  # rbd's import of rados found the same module
    assert str(ceph_session.DIST_PACKAGES) not in sys.path
    assert _features(rbd) == sum(getattr(rbd, f"RBD_FEATURE_{name}") for name in FEATURES)
    with pytest.raises(ValueError):
        ceph_session.binding("os")


def test_unreachable_monitor_is_one_line_within_the_timeout(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon_host = v1:127.0.0.1:1\nauth_client_required = cephx\n")
    keyring = tmp_path / "keyring"
    keyring.write_text("[client.admin]\n\tkey = AQBJ2U1nAAAAABAAm3+oD3jUy2mlqW8d7bHkhw==\n")
    keyring.chmod(0o600)
    t0 = time.monotonic()
    with pytest.raises(UnavailableError) as err:
        Client(str(conf), str(keyring), connect_timeout=2).check()
    assert time.monotonic() - t0 < 60  # bounded by connect_timeout, not librados' default 300 s
    text = str(err.value)
    assert "ceph monitor unreachable (v1:127.0.0.1:1)" in text and "\n" not in text
    assert "AQBJ2U1n" not in text
    assert not any(key[0] == str(conf) for key in ceph_session._sessions)  # a failed connect is not cached
