"""TLS pre-shared keys for NVMe/TCP: generated per VM, kept 0600, inserted into the kernel's `.nvme` keyring.

A PSK is handled in the NVMe PSK interchange format (`NVMeTLSkey-1:01:<base64 key+crc32>:`, TCP transport spec
3.6.1.5), the form nvme-cli imports. What goes into the keyring is the TLS PSK derived from it exactly as libnvme
derives it (HKDF-Extract/Expand-Label, SHA-256: configured -> retained PSK with the host NQN, retained -> TLS PSK
with the identity `NVMe0R01 <hostnqn> <subsysnqn>`), so a host that runs `nvme tls-key --import` or
`nvme connect --tls-key` on the same interchange key ends up with the same key under the same identity. This is
done here and not through libnvme because the venv's libnvme is built without keyutils ("key operations not
supported"), and bookworm's own libnvme 1.3 is older than the derivation libnvme settled on.

The keyring is reached through keyutils (libkeyutils.so.1, the `keyutils` package). The key only ever lives in the
key file, the state file (0600) and the keyring: never in a log, an error message or an API answer. The handshake
itself is tlshd's (ktls-utils), on both sides, which finds the key in `.nvme` by its identity.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import os
import re
import subprocess
import zlib
from pathlib import Path

from nvmetd.errors import SystemProblem

DEFAULT_KEYRING = ".nvme"
KEY_TYPE = b"psk"
KEY_LEN = 32  # hash id 01: SHA-256
KEY_SPEC_SESSION_KEYRING = -3
_PSK_RE = re.compile(r"^NVMeTLSkey-1:01:([A-Za-z0-9+/]{48}):$")


def check_psk(value: str) -> bytes:
    """The configured PSK inside an interchange string; the message never repeats the value."""
    match = _PSK_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("not a SHA-256 PSK in NVMe interchange format (NVMeTLSkey-1:01:<base64>:)")
    blob = base64.b64decode(match.group(1))
    key, crc = blob[:KEY_LEN], blob[KEY_LEN:]
    if zlib.crc32(key).to_bytes(4, "little") != crc:
        raise ValueError("PSK has a CRC that does not match its key (corrupted or mistyped)")
    return key


def generate_psk() -> str:
    key = os.urandom(KEY_LEN)
    return f"NVMeTLSkey-1:01:{base64.b64encode(key + zlib.crc32(key).to_bytes(4, 'little')).decode()}:"


def identity(hostnqn: str, subnqn: str) -> str:
    """The TLS PSK identity both sides look the key up by (not secret); version 0 is what 6.12 looks up."""
    return f"NVMe0R01 {hostnqn} {subnqn}"


def _hkdf_expand_label(secret: bytes, label: str, context: str) -> bytes:
    """HKDF-Extract(0, secret), then Expand with the TLS 1.3 HkdfLabel (length, label, context), SHA-256."""
    prk = hmac.new(b"\0" * KEY_LEN, secret, hashlib.sha256).digest()
    lab, ctx = f"tls13 {label}".encode(), context.encode()
    info = KEY_LEN.to_bytes(2, "big") + bytes([len(lab)]) + lab + bytes([len(ctx)]) + ctx
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # one block: KEY_LEN == SHA-256 length


def tls_psk(psk: str, hostnqn: str, subnqn: str) -> bytes:
    """The key the kernel uses: configured -> retained (HostNQN) -> TLS PSK (identity), as libnvme does."""
    retained = _hkdf_expand_label(check_psk(psk), "HostNQN", hostnqn)
    return _hkdf_expand_label(retained, "nvme-tls-psk", identity(hostnqn, subnqn))


def _keyutils() -> ctypes.CDLL:
    name = ctypes.util.find_library("keyutils") or "libkeyutils.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise SystemProblem("libkeyutils is not installed (apt-get install keyutils)") from None
    lib.add_key.restype = ctypes.c_int32
    lib.add_key.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32]
    lib.keyctl_search.restype = ctypes.c_long
    lib.keyctl_search.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]
    lib.keyctl_revoke.restype = ctypes.c_long
    lib.keyctl_revoke.argtypes = [ctypes.c_int32]
    lib.keyctl_setperm.restype = ctypes.c_long
    lib.keyctl_setperm.argtypes = [ctypes.c_int32, ctypes.c_uint32]
    lib.keyctl_link.restype = ctypes.c_long
    lib.keyctl_link.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.find_key_by_type_and_desc.restype = ctypes.c_int32
    lib.find_key_by_type_and_desc.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]
    return lib


def _errno() -> str:
    return os.strerror(ctypes.get_errno() or 126)


def keyring_serial(keyring: str = DEFAULT_KEYRING) -> int:
    """The keyring's serial, linked into this process's session keyring (as libnvme does).

    `.nvme` comes with the nvme-keyring module (nvmet-tcp and nvme-tcp load it). The link makes this process a
    possessor of the keys in it: their possessor permissions are what allow replacing or revoking a key another
    process (an earlier nvmetd) inserted; other users see no more than the key's description.
    """
    if keyring == DEFAULT_KEYRING:
        subprocess.run(["modprobe", "-q", "nvme-keyring"], check=False, capture_output=True)
    lib = _keyutils()
    serial = lib.find_key_by_type_and_desc(b"keyring", keyring.encode(), 0)
    if serial <= 0:
        raise SystemProblem(f"no {keyring} keyring (CONFIG_NVME_KEYRING, modprobe nvme-keyring)")
    if lib.keyctl_link(serial, KEY_SPEC_SESSION_KEYRING) < 0:
        raise SystemProblem(f"cannot link the {keyring} keyring into the session keyring: {_errno()}")
    return int(serial)


def new_keyring(name: str) -> int:
    """A keyring of our own in the session keyring (a host-side keyring, e.g. for a second identity)."""
    lib = _keyutils()
    serial = lib.add_key(b"keyring", name.encode(), None, 0, KEY_SPEC_SESSION_KEYRING)
    if serial <= 0:
        raise SystemProblem(f"could not create keyring {name}: {_errno()}")
    lib.keyctl_setperm(serial, 0x3F3F0000)  # tlshd (root, not its possessor) must be able to link and search it
    return int(serial)


def insert(psk: str, hostnqn: str, subnqn: str, keyring: str = DEFAULT_KEYRING) -> int:
    """Put the TLS PSK of (host, subsystem) into `keyring`, replacing an older one (rotation); the key's serial.

    TLS sessions already up keep their negotiated keys; new connections need the new PSK.
    """
    lib = _keyutils()
    ring = keyring_serial(keyring)
    key = ctypes.create_string_buffer(tls_psk(psk, hostnqn, subnqn), KEY_LEN)
    try:
        serial = lib.add_key(KEY_TYPE, identity(hostnqn, subnqn).encode(), key, KEY_LEN, ring)
    finally:
        ctypes.memset(key, 0, KEY_LEN)
    if serial <= 0:
        raise SystemProblem(f"could not insert the TLS key of {hostnqn} into {keyring}: {_errno()}")
    return int(serial)


def revoke(hostnqn: str, subnqn: str, keyring: str = DEFAULT_KEYRING) -> bool:
    """Revoke the key of (host, subsystem); False if there was none."""
    lib = _keyutils()
    serial = lib.keyctl_search(keyring_serial(keyring), KEY_TYPE, identity(hostnqn, subnqn).encode(), 0)
    return serial > 0 and lib.keyctl_revoke(serial) == 0


def write_key_file(path: Path, psk: str) -> Path:
    """0600 from the first byte (O_CREAT with the mode, then fchmod in case the file existed)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(psk)
    return path
