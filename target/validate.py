"""Validators for the values that reach configfs paths and the kernel.

Every name becomes a configfs directory name, so a value that could escape its directory (`/`, `..`, NUL) or that
the kernel would silently truncate is refused here, with the field named, before anything touches the tree.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import ipaddress
import logging
import re
import uuid
import zlib
from collections.abc import Iterator

NQN_MAX_BYTES = 223
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# fullmatch, never `$` (which also matches before a final newline); re.ASCII so `\d` is 0-9 only
_NQN_RE = re.compile(rf"nqn\.(\d{{4}})-(\d{{2}})\.({_LABEL}(?:\.{_LABEL})*)(:[^\s/]+)?", re.ASCII)
_UUID_NQN_PREFIX = "nqn.2014-08.org.nvmexpress:uuid:"
_FC_ADDR_RE = re.compile(r"nn-0x[0-9a-fA-F]{16}:pn-0x[0-9a-fA-F]{16}")
_DHCHAP_RE = re.compile(r"DHHC-1:(0[0-3]):([A-Za-z0-9+/=]+):")
_DHCHAP_LENGTHS = {0: (32, 48, 64), 1: (32,), 2: (48,), 3: (64,)}
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# what the kernel takes as a subsystem or host directory name that is not of the spec's form (nvmetcli's examples
# use `testnqn` and `hostnqn`): printable ASCII, no space, no '/', no '..', not starting with '.' or '-'
_KERNEL_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+=,-]*", re.ASCII)
_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("validate_warnings", default=None)
log = logging.getLogger("target.validate")


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """The warnings of the validation run inside (accepted values that a person should look at)."""
    found: list[str] = []
    token = _warnings.set(found)
    try:
        yield found
    finally:
        _warnings.reset(token)


def _warn(message: str) -> None:
    found = _warnings.get()
    if found is not None and message not in found:
        found.append(message)
    log.info("%s", message)


def nqn(value: str) -> str:
    """An NVMe Qualified Name per the NVMe base spec (section 4.7): `nqn.yyyy-mm.reverse-domain[:suffix]`."""
    _text(value, "an NQN")
    if len(value.encode()) > NQN_MAX_BYTES:
        raise ValueError(f"is {len(value.encode())} bytes long; an NQN has at most {NQN_MAX_BYTES}")
    if value == DISCOVERY_NQN:
        return value
    if value.startswith(_UUID_NQN_PREFIX):
        tail = value.removeprefix(_UUID_NQN_PREFIX)
        try:
            canonical = str(uuid.UUID(tail))
        except ValueError:
            canonical = None
        # uuid.UUID also takes {braces}, urn:uuid: and bare hex: the NVMe spec's form is 8-4-4-4-12 only
        if canonical != tail.lower():
            raise ValueError(f"{value!r} has the uuid form but no UUID (8-4-4-4-12 hex digits) after it")
        return value
    match = _NQN_RE.fullmatch(value)
    if match is None or "\x00" in value or not value.isprintable():
        raise ValueError(f"{value!r} is not an NQN (expected nqn.yyyy-mm.reverse.domain[:name])")
    month = int(match.group(2))
    if not 1 <= month <= 12:
        raise ValueError(f"{value!r} has month {month:02d}; it must be 01-12")
    return value


def _text(value: object, what: str) -> str:
    """Input arrives from JSON: refuse other types, and lone surrogates (valid JSON, not encodable) with a clear
    message instead of a TypeError or a codec error from deeper down."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{value!r} is not valid text for {what} (lone UTF-16 surrogate)") from None
    return value


def kernel_nqn(value: str) -> str:
    """A subsystem or host name in a declared tree: an NQN (see `nqn`), or a name the kernel takes that is not of
    the spec's form (nvmetcli's examples use `testnqn` and `hostnqn`, and files in the field follow them): accepted
    with a warning. A name that starts like an NQN must be one, and nvmetd's own VM NQNs are checked with `nqn`."""
    try:
        return nqn(value)
    except ValueError:
        if (value.startswith("nqn.") or not _KERNEL_NAME_RE.fullmatch(value) or ".." in value
                or len(value) > NQN_MAX_BYTES):
            raise
    _warn(f"{value!r} is not an NQN of the spec's form (nqn.yyyy-mm.reverse.domain[:name]); accepted, as the "
          "kernel accepts it, but hosts that check NQNs may refuse it")
    return value


def safe_name(value: str, what: str = "name", max_len: int = 64) -> str:
    """A name that will become one path component: letters, digits and `._:-`, not starting with a dot or dash.

    `..` is refused anywhere, not only as a whole component: a name is also joined into paths and argv by tools
    that are not ours, and one simple rule is easier to state and to check than "harmless here"."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > max_len:
        raise ValueError(f"{what} {value[:20]!r}... is {len(value)} characters; at most {max_len}")
    if not _SAFE_NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} {value!r} may only use letters, digits and . _ : - and must start with a "
                         "letter or digit (no '/', '..', spaces or NUL)")
    return value


def uuid_str(value: str) -> str:
    """A UUID in the kernel's readback form (lower-case, hyphenated), so comparisons with configfs are exact."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a UUID")
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"{value!r} is not a UUID") from None


def ip_for_family(traddr: str, adrfam: str) -> str:
    try:
        addr = ipaddress.ip_address(traddr)
    except ValueError:
        raise ValueError(f"{traddr!r} is not an IP address") from None
    if (adrfam == "ipv4") != (addr.version == 4):
        raise ValueError(f"{traddr!r} is an IPv{addr.version} address but adrfam is {adrfam}")
    return str(addr)


def fc_addr(traddr: str) -> str:
    if not _FC_ADDR_RE.fullmatch(traddr):
        raise ValueError(f"{traddr!r} is not an FC address (nn-0x<16 hex>:pn-0x<16 hex>)")
    return traddr


def tcp_port(trsvcid: str) -> str:
    # ASCII only: str.isdigit() is also true for Arabic-Indic and superscript digits
    if not isinstance(trsvcid, str) or not (trsvcid.isascii() and trsvcid.isdigit()) or not 1 <= int(trsvcid) <= 65535:
        raise ValueError(f"{trsvcid!r} is not a port number 1-65535")
    return str(int(trsvcid))


def dhchap_key(value: str) -> str:
    """A DH-HMAC-CHAP secret in the NVMe representation `DHHC-1:0x:<base64 key+crc32>:` with a valid CRC."""
    if not isinstance(value, str):
        raise ValueError("is not a DH-CHAP secret (not a string)")
    match = _DHCHAP_RE.fullmatch(value)
    if match is None:
        raise ValueError("is not a DH-CHAP secret (expected DHHC-1:0[0-3]:<base64>:)")
    hmac_id = int(match.group(1))
    try:
        raw = base64.b64decode(match.group(2), validate=True)
    except ValueError:
        raise ValueError("has invalid base64 in its key part") from None
    key, crc = raw[:-4], raw[-4:]
    if len(key) not in _DHCHAP_LENGTHS[hmac_id]:
        raise ValueError(f"has a {len(key)}-byte key; hash id {hmac_id:02d} needs {_DHCHAP_LENGTHS[hmac_id]} bytes")
    if zlib.crc32(key).to_bytes(4, "little") != crc:
        raise ValueError("has a CRC that does not match its key (corrupted or mistyped)")
    return value


def make_dhchap_key(secret: bytes, hmac_id: int = 1) -> str:
    """Encode a secret as the kernel and nvme-cli expect; used to mint per-VM keys."""
    if len(secret) not in _DHCHAP_LENGTHS[hmac_id]:
        raise ValueError(f"hash id {hmac_id:02d} needs a secret of {_DHCHAP_LENGTHS[hmac_id]} bytes")
    blob = secret + zlib.crc32(secret).to_bytes(4, "little")
    return f"DHHC-1:{hmac_id:02d}:{base64.b64encode(blob).decode()}:"


def device_path(value: str) -> str:
    """An absolute path with no `..` component: what a namespace or passthru opens in the kernel."""
    _text(value, "a device path")
    if not value.startswith("/") or "\x00" in value or any(p == ".." for p in value.split("/")):
        raise ValueError(f"{value!r} must be an absolute path without '..' components")
    if len(value) > 4095:
        raise ValueError("is longer than PATH_MAX")
    return value


_QEMU_SIZE_RE = re.compile(r"^[1-9][0-9]{0,15}[KMGT]?$")


def qemu_size(value: str, what: str = "size") -> str:
    """A size as QEMU's -m / memory-backend take it (512M, 4G): it ends up inside a QEMU argument."""
    if not isinstance(value, str) or not _QEMU_SIZE_RE.match(value):
        raise ValueError(f"{what} {str(value)[:20]!r} is not a QEMU size (examples: 512M, 4G)")
    return value
