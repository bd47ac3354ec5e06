"""NVMe/TCP with TLS 1.3 (PSK) through nvmetd, on the real 6.12 kernel with tlshd (ktls-utils) doing handshakes.

In the rig host and target share one kernel. The target side's keys are what nvmetd puts into `.nvme`; the host
side gets a keyring of its own per case (passed with `keyring=`/`tls_key=` as a separate machine would hold it),
so a wrong or stale host key is really the host's, not masked by the target's copy under the same identity.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backends import pools
from nvmetd import fabrics, tls
from nvmetd.initiator import InitiatorError
from target.configfs import ConfigFS
from tests.conftest import _unavailable
from tests.kernel import hostside
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

TLSHD = Path("/usr/local/lib/nvmetd/ktls-utils/usr/sbin/tlshd")  # where tls/fetch-tlshd.sh puts it


@pytest.fixture(scope="session")
def tlshd(nvmet_kernel: ConfigFS, tmp_path_factory: pytest.TempPathFactory):
    """One tlshd for the session (both sides' handshakes), configured to use the .nvme keyring."""
    binary = TLSHD if TLSHD.exists() else Path(shutil.which("tlshd") or TLSHD)
    if not binary.exists():
        _unavailable(f"no tlshd at {TLSHD} (scripts/setup runs tls/fetch-tlshd.sh)")
    subprocess.run(["modprobe", "-a", "tls", "nvme-keyring"], check=False, capture_output=True)
    base = tmp_path_factory.mktemp("tlshd")
    conf = base / "tlshd.conf"
    conf.write_text("[debug]\nloglevel=2\ntls=0\nnl=0\n\n[authenticate]\nkeyrings=.nvme\n")
    log = base / "tlshd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(binary), "-c", str(conf), "-s"], stdout=out, stderr=subprocess.STDOUT)
    yield log
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def daemon(cfs: ConfigFS, scratch: Path, tlshd: Path):
    d = Daemon(scratch)
    (scratch / "nvmetd.toml").write_text("")
    pools.create_pool("file", "files", devices=[str(scratch / "files")], root=d.pools_root)
    d.start(deadline=900)  # a FastAPI start-up under TCG on a loaded 2-core host
    yield d
    d.stop()
    subprocess.run(["nvme", "disconnect-all"], check=False, capture_output=True)


def _host_key(psk: str, hostnqn: str, subnqn: str, ring: str) -> tuple[int, int]:
    """A keyring standing for the host machine, holding its copy of the PSK: (keyring, key) serials."""
    keyring = tls.new_keyring(ring)
    return keyring, tls.insert(psk, hostnqn, subnqn, keyring=ring)


def _connect(att: dict, dhchap: str, **kw: object) -> fabrics.Controller:
    return fabrics.connect_tcp(att["subsystem_nqn"], att["host_nqn"], att["traddr"], att["trsvcid"],
                               dhchap_key=dhchap, **kw)  # type: ignore[arg-type]


def _refused(att: dict, dhchap: str, **kw: object) -> str:
    with pytest.raises(InitiatorError) as err:
        ctrl = _connect(att, dhchap, **kw)
        fabrics.disconnect(ctrl.name)
    return str(err.value)


def _tls_sessions() -> int:
    stats = dict(line.split() for line in Path("/proc/net/tls_stat").read_text().splitlines() if line.strip())
    return int(stats["TlsCurrTxSw"]) + int(stats.get("TlsCurrTxDevice", 0))


def test_tls_port_psk_dhchap_rotation_restart(daemon: Daemon, cfs: ConfigFS, tlshd: Path) -> None:
    daemon.ctl("disk", "create", "t-root", "--pool", "files", "--size", "32M")
    plain = daemon.ctl_json("attach", "vm-plain", "t-root", "--transport", "tcp")
    daemon.ctl("disk", "create", "s-root", "--pool", "files", "--size", "32M")
    att = daemon.ctl_json("attach", "vm-sec", "s-root", "--transport", "tcp", "--tls")
    assert att["tls"] is True and att["trsvcid"] == "4430" and plain["trsvcid"] == "4420"
    key_file = Path(att["tls_key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    psk = key_file.read_text()
    tls.check_psk(psk)
    dhchap = Path(att["dhchap_key_file"]).read_text()
    assert tls.identity(att["host_nqn"], att["subsystem_nqn"]) == att["tls_identity"]

    # the port: TLS required, TLS 1.3; the plain port is untouched
    port = cfs.root / "ports" / "4423"
    assert (port / "addr_treq").read_text().strip() == "required"
    assert (port / "addr_tsas").read_text().strip() == "tls1.3"
    assert (cfs.root / "ports" / "4420" / "addr_treq").read_text().strip() == "not specified"

    # no TLS, or TLS with a wrong PSK: refused, even with the right DH-CHAP key
    _refused(att, dhchap, tls=False)
    wrong_ring, wrong_key = _host_key(tls.generate_psk(), att["host_nqn"], att["subsystem_nqn"], "host-wrong")
    _refused(att, dhchap, tls=True, keyring=wrong_ring, tls_key=wrong_key)
    assert "TLS handshake" in subprocess.run(["dmesg"], capture_output=True, text=True).stdout

    # the right PSK on the host side + DH-CHAP: connected over kTLS, data verifies end to end
    ring, key = _host_key(psk, att["host_nqn"], att["subsystem_nqn"], "host-right")
    sessions = _tls_sessions()
    ctrl = _connect(att, dhchap, tls=True, keyring=ring, tls_key=key)
    try:
        assert int((Path("/sys/class/nvme") / ctrl.name / "tls_key").read_text().strip(), 16) == key
        assert _tls_sessions() > sessions  # kernel TLS sockets (one per queue) are up
        device = hostside.namespace_device(att["subsystem_nqn"], att["nsid"], "tcp")
        digest = hostside.write_read_verify(device, size=2 << 20, seed=14)
        backing = daemon.ctl_json("disk", "show", "s-root")["device_path"]
        assert hashlib.sha256(hostside.direct_read(backing, 2 << 20)).hexdigest() == digest
        assert "Session description: (TLS1.3)" in tlshd.read_text()

        # rotation: a new PSK; the connected host keeps working, the old PSK no longer connects
        rotated = daemon.ctl_json("vm", "rotate-psk", "vm-sec")
        new_psk = Path(rotated["tls_key_file"]).read_text()
        assert new_psk != psk and "NVMeTLSkey" not in json.dumps(rotated)
        hostside.write_read_verify(device, size=1 << 20, seed=15)
    finally:
        fabrics.disconnect(ctrl.name)
    _refused(att, dhchap, tls=True, keyring=ring, tls_key=key)
    ring2, key2 = _host_key(new_psk, att["host_nqn"], att["subsystem_nqn"], "host-rotated")

    # restart: the keyring is the kernel's; nvmetd puts the key back from its state
    daemon.stop()
    assert tls.revoke(att["host_nqn"], att["subsystem_nqn"])
    daemon.start(deadline=900)
    ctrl = _connect(att, dhchap, tls=True, keyring=ring2, tls_key=key2)
    fabrics.disconnect(ctrl.name)

    # no key material anywhere it could leak: API answers, nvmetd's and tlshd's logs, the kernel log
    secrets = [k.split(":")[2] for k in (psk, new_psk, dhchap)]  # the base64 of each key, whatever frames it
    secrets += [base64.b64decode(p.split(":")[2])[:32].hex() for p in (psk, new_psk)]
    secrets += [tls.tls_psk(p, att["host_nqn"], att["subsystem_nqn"]).hex() for p in (psk, new_psk)]
    shown = [json.dumps(att), json.dumps(daemon.ctl_json("vm", "show", "vm-sec")), tlshd.read_text(),
             subprocess.run(["dmesg"], capture_output=True, text=True).stdout]
    shown += [p.read_text() for p in daemon.log]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert os.stat(daemon.state).st_mode & 0o077 == 0
