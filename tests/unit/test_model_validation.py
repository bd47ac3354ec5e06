"""Validation: every bad value is refused with the field named, before anything touches configfs."""

from __future__ import annotations

import pytest

from target.model import StateError, parse_state
from target.validate import dhchap_key, make_dhchap_key, nqn, safe_name

SUB = "nqn.2026-11.io.nvmetd:disk"


@pytest.mark.parametrize("value", [
    "nqn.2026-11.io.nvmetd:a/b", "nqn.2026-13.io.nvmetd:x", "testnqn", "nqn.2026-11.-bad.x",
    "nqn.2026-11.io.nvmetd:" + "x" * 220, "nqn.2014-08.org.nvmexpress:uuid:not-a-uuid", "nqn.2026-11.io.x:a b",
])
def test_bad_nqns_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        nqn(value)


@pytest.mark.parametrize("value", [
    SUB, "nqn.2014-08.org.nvmexpress.discovery",
    "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555", "nqn.1992-08.com.netapp:sn.1",
])
def test_good_nqns_pass(value: str) -> None:
    assert nqn(value) == value


@pytest.mark.parametrize("value", ["../etc", "a/b", "", ".hidden", "x\x00y", "-rf", "a" * 65])
def test_safe_names_cannot_escape(value: str) -> None:
    with pytest.raises(ValueError):
        safe_name(value)


def test_dhchap_key_checks_crc_and_length() -> None:
    key = make_dhchap_key(b"k" * 32, 1)
    assert dhchap_key(key) == key
    tampered = key[:12] + ("A" if key[12] != "A" else "B") + key[13:]
    with pytest.raises(ValueError, match=r"CRC|base64"):
        dhchap_key(tampered)
    with pytest.raises(ValueError, match="needs"):
        make_dhchap_key(b"k" * 32, 2)


@pytest.mark.parametrize(("state", "field", "message"), [
    ({"subsystems": [{"nqn": SUB, "namespaces": [{"nsid": 1, "device_path": "rel/path"}]}]},
     "subsystems.0.namespaces.0.device_path", "absolute"),
    ({"subsystems": [{"nqn": SUB, "namespaces": [{"nsid": 0, "device_path": "/dev/x"}]}]},
     "subsystems.0.namespaces.0.nsid", "greater than or equal to 1"),
    ({"ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "::1", "trsvcid": "4420"}]},
     "ports.0", "IPv6 address but adrfam is ipv4"),
    ({"ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "99999"}]},
     "ports.0", "port number"),
    ({"subsystems": [{"nqn": SUB, "allowed_hosts": ["nqn.2026-11.io.nvmetd:h"]}]},
     "state", "not in hosts"),
    ({"subsystems": [{"nqn": SUB, "serial": "x" * 21}]}, "subsystems.0.serial", "at most 20"),
    ({"hosts": [{"nqn": "nqn.2026-11.io.nvmetd:h"}],
      "subsystems": [{"nqn": SUB, "allow_any_host": True, "allowed_hosts": ["nqn.2026-11.io.nvmetd:h"]}]},
     "subsystems.0", "exclude each other"),
    ({"subsystems": [{"nqn": SUB, "namespaces": [{"nsid": 1, "device_path": "/dev/x", "ana_grpid": 5}]}]},
     "state", "ANA group 5"),
    ({"ports": [{"id": 1, "trtype": "loop", "traddr": "127.0.0.1"}]}, "ports.0", "loop port takes no"),
    ({"subsystems": [{"nqn": SUB, "unknown": 1}]}, "subsystems.0.unknown", "Extra inputs"),
])
def test_errors_name_the_field(state: dict, field: str, message: str) -> None:
    with pytest.raises(StateError) as err:
        parse_state(state)
    text = str(err.value)
    assert text.startswith(field), text
    assert message in text, text


def test_allow_any_host_defaults_to_false() -> None:
    assert parse_state({"subsystems": [{"nqn": SUB}]}).subsystems[0].allow_any_host is False


def test_secrets_stay_out_of_reprs() -> None:
    key = make_dhchap_key(b"s" * 32, 1)
    state = parse_state({"hosts": [{"nqn": "nqn.2026-11.io.nvmetd:h", "dhchap_key": key}]})
    assert key not in repr(state.hosts[0])
