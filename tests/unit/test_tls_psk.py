"""TLS PSK handling without a kernel: format, derivation shape, where a TLS VM is exported, refusals."""

from __future__ import annotations

import base64

import pytest

from nvmetd import tls
from nvmetd.vms import Attachment, Ports, compose, new_vm
from target.model import TargetState

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
SUB = "nqn.2026-11.io.nvmetd:vm:11111111-2222-3333-4444-555555555555"


def test_generated_psks_are_valid_distinct_and_checked() -> None:
    a, b = tls.generate_psk(), tls.generate_psk()
    assert a != b and len(tls.check_psk(a)) == 32
    blob = bytearray(base64.b64decode(a.split(":")[2]))
    blob[0] ^= 1  # one flipped bit: the CRC no longer matches
    with pytest.raises(ValueError, match="CRC") as err:
        tls.check_psk(f"NVMeTLSkey-1:01:{base64.b64encode(bytes(blob)).decode()}:")
    assert a.split(":")[2] not in str(err.value)
    for bad in ("", "NVMeTLSkey-1:02:abc:", "DHHC-1:01:" + a.split(":")[2] + ":", a[:-1]):
        with pytest.raises(ValueError):
            tls.check_psk(bad)


def test_derived_key_depends_on_host_subsystem_and_psk() -> None:
    psk = tls.generate_psk()
    key = tls.tls_psk(psk, HOST, SUB)
    assert len(key) == 32 and key == tls.tls_psk(psk, HOST, SUB)
    assert key != tls.check_psk(psk)  # never the configured key itself
    assert key != tls.tls_psk(psk, HOST.replace("1111", "9999"), SUB)
    assert key != tls.tls_psk(psk, HOST, SUB + "x")
    assert key != tls.tls_psk(tls.generate_psk(), HOST, SUB)
    assert tls.identity(HOST, SUB) == f"NVMe0R01 {HOST} {SUB}"


def test_a_tls_vm_is_exported_on_the_tls_port_only() -> None:
    sec, plain = new_vm("sec"), new_vm("plain")
    sec.tls_psk = tls.generate_psk()
    sec.attachments["d1"] = Attachment(nsid=1, transport="tcp", tls=True)
    plain.attachments["d2"] = Attachment(nsid=1, transport="tcp")
    state = compose(TargetState(), {"sec": sec, "plain": plain}, {"d1": "/dev/a", "d2": "/dev/b"}, Ports())
    tls_port, tcp_port = state.port(4425), state.port(4420)
    assert tls_port.treq == "required" and tls_port.tsas == "tls1.3" and tls_port.trsvcid == "4430"
    assert tls_port.subsystems == [sec.subnqn] and tcp_port.subsystems == [plain.subnqn]
    assert tcp_port.treq is None and tcp_port.tsas is None
    assert state.host(sec.hostnqn).dhchap_key == sec.dhchap_key  # DH-CHAP stays on with TLS
    assert sec.tls_psk not in repr(sec) and sec.dhchap_key not in repr(sec)
