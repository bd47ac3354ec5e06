"""DH-CHAP through the kernel, feature detection, and a libnvme-bindings connect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from target.apply import apply_state
from target.configfs import ConfigFS
from target.features import FeatureError, Features, check, require
from target.model import parse_state
from target.validate import make_dhchap_key
from tests.kernel import hostside

pytestmark = pytest.mark.kernel

HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-1111-2222-3333-444444444444"
SUB = "nqn.2026-11.io.nvmetd:auth"


def auth_state(image: Path, key: str, ctrl_key: str | None = None) -> dict:
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    return {
        "hosts": [{"nqn": HOST, "dhchap_key": key, "dhchap_ctrl_key": ctrl_key, "dhchap_hash": "hmac(sha256)"}],
        "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                        "namespaces": [{"nsid": 1, "device_path": str(image)}]}],
        "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
                   "subsystems": [SUB]}],
    }


def test_dhchap_wrong_key_refused_right_key_connects(cfs: ConfigFS, scratch: Path) -> None:
    key = make_dhchap_key(os.urandom(32), 1)
    ctrl_key = make_dhchap_key(os.urandom(32), 1)
    state = parse_state(auth_state(scratch / "auth.img", key, ctrl_key))
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
    assert apply_state(state, cfs).writes == 0  # keys read back as written: no rewrite on re-apply

    wrong = make_dhchap_key(os.urandom(32), 1)
    refused = hostside.connect("tcp", SUB, HOST, "127.0.0.1", "4420", dhchap_secret=wrong, check=False)
    assert refused.returncode != 0
    assert hostside.controllers(SUB) == []
    no_key = hostside.connect("tcp", SUB, HOST, "127.0.0.1", "4420", check=False)
    assert no_key.returncode != 0

    hostside.connect("tcp", SUB, HOST, "127.0.0.1", "4420", dhchap_secret=key, dhchap_ctrl_secret=ctrl_key)
    try:
        hostside.write_read_verify(hostside.namespace_device(SUB, 1, "tcp"), size=1 << 20)
    finally:
        hostside.disconnect(SUB)


def test_key_rotation_is_one_write(cfs: ConfigFS, scratch: Path) -> None:
    old, new = make_dhchap_key(os.urandom(32), 1), make_dhchap_key(os.urandom(32), 1)
    assert apply_state(parse_state(auth_state(scratch / "r.img", old)), cfs).converged
    rotated = apply_state(parse_state(auth_state(scratch / "r.img", new)), cfs)
    assert rotated.converged and rotated.writes == 1
    assert rotated.planned == [f"set hosts/{HOST}/dhchap_key = <secret>"]
    refused = hostside.connect("tcp", SUB, HOST, "127.0.0.1", "4420", dhchap_secret=old, check=False)
    assert refused.returncode != 0
    hostside.connect("tcp", SUB, HOST, "127.0.0.1", "4420", dhchap_secret=new)
    hostside.disconnect(SUB)


def test_features_of_the_6_12_kernel(cfs: ConfigFS) -> None:
    features = Features(cfs)
    assert features.transports["tcp"] and features.transports["loop"] and features.transports["rdma"]
    assert "dhchap_key" in features.attrs("host")
    assert "resv_enable" not in features.attrs("namespace")  # reservations arrived in 6.13
    assert list(Path(cfs.root, "subsystems").iterdir()) == []  # probes leave nothing behind

    wants_resv = parse_state({"subsystems": [{"nqn": SUB, "allow_any_host": True, "namespaces": [
        {"nsid": 1, "device_path": "/dev/null", "resv_enable": True}]}]})
    problems = check(wants_resv, features)
    assert len(problems) == 1 and "reservations" in problems[0] and "6.13" in problems[0]
    with pytest.raises(FeatureError, match="reservations"):
        require(wants_resv, cfs)


def test_connect_with_libnvme_bindings(cfs: ConfigFS, scratch: Path) -> None:
    from libnvme import nvme

    image = scratch / "lib.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    state = parse_state({"hosts": [{"nqn": HOST}], "subsystems": [
        {"nqn": SUB, "allowed_hosts": [HOST], "namespaces": [{"nsid": 1, "device_path": str(image)}]}],
        "ports": [{"id": 3, "trtype": "loop", "subsystems": [SUB]}]})
    assert apply_state(state, cfs).converged
    root = nvme.root()
    host = nvme.host(root, hostnqn=HOST, hostid=hostside.host_id(HOST))
    ctrl = nvme.ctrl(root, subsysnqn=SUB, transport="loop")
    ctrl.connect(host)
    try:
        assert ctrl.connected() and ctrl.subsysnqn == SUB
        device = hostside.namespace_device(SUB, 1, "loop")
        hostside.write_read_verify(device, size=1 << 20, seed=7)
        assert hostside.direct_read(image, 1 << 20) == hostside.direct_read(device, 1 << 20)
    finally:
        ctrl.disconnect()
