"""Connect a host controller by writing options to /dev/nvme-fabrics, for what the libnvme bindings cannot ask.

libnvme's Python `connect` has no `tls` option (its config dict stops at digests), and bookworm's nvme-cli 2.3 has
no `--tls` either; the kernel's own interface does: `tls` (handshake through tlshd with the PSK the kernel looks
up by identity), `keyring=` (where to look) and `tls_key=` (a given key instead). This is exactly the string libnvme
itself writes. Every value is validated first: a comma or newline in one would add options of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from nvmetd.initiator import InitiatorError, host_id_for
from target import validate

FABRICS_DEV = "/dev/nvme-fabrics"
_ANSWER_RE = re.compile(r"instance=(\d+),cntlid=(\d+)")


@dataclass(frozen=True)
class Controller:
    name: str  # nvmeN
    cntlid: int


def _plain(value: str, what: str) -> str:
    if not value or any(c in value for c in ",\n\r\0="):
        raise InitiatorError(f"{what} must not be empty or hold ',', '=' or control characters")
    return value


def connect_tcp(subnqn: str, hostnqn: str, traddr: str, trsvcid: str, dhchap_key: str | None = None,
                tls: bool = False, keyring: int | None = None, tls_key: int | None = None) -> Controller:
    """One NVMe/TCP controller; with `tls` the kernel runs the TLS handshake (tlshd must be running)."""
    validate.nqn(subnqn)
    validate.nqn(hostnqn)
    validate.tcp_port(trsvcid)
    options = [f"nqn={subnqn}", "transport=tcp", f"traddr={_plain(traddr, 'traddr')}", f"trsvcid={trsvcid}",
               f"hostnqn={hostnqn}", f"hostid={host_id_for(hostnqn)}"]
    if dhchap_key:
        options.append(f"dhchap_secret={validate.dhchap_key(dhchap_key)}")
    if keyring is not None:
        options.append(f"keyring={int(keyring)}")
    if tls_key is not None:
        options.append(f"tls_key={int(tls_key)}")
    if tls:
        options.append("tls")
    for module in ("nvme-fabrics", "nvme-tcp"):
        subprocess.run(["modprobe", "-q", module], check=False, capture_output=True)
    try:
        fd = os.open(FABRICS_DEV, os.O_RDWR)
    except OSError as exc:
        raise InitiatorError(f"cannot open {FABRICS_DEV}: {exc.strerror}") from None
    try:
        os.write(fd, ",".join(options).encode())
        answer = os.read(fd, 256).decode(errors="replace")
    except OSError as exc:  # the kernel's reason: ECONNREFUSED, EKEYREJECTED, ...; the options hold a secret
        raise InitiatorError(f"connect to {subnqn} at {traddr}:{trsvcid}{' with TLS' if tls else ''} failed: "
                             f"{exc.strerror}") from None
    finally:
        os.close(fd)
    match = _ANSWER_RE.search(answer)
    if not match:
        raise InitiatorError(f"unexpected answer from {FABRICS_DEV}: {answer.strip()!r}")
    return Controller(f"nvme{match.group(1)}", int(match.group(2)))


def disconnect(controller: str) -> None:
    if not re.fullmatch(r"nvme\d+", controller):
        raise InitiatorError(f"{controller!r} is not a controller name")
    try:
        with open(f"/sys/class/nvme/{controller}/delete_controller", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass
