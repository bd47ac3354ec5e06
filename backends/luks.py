"""LUKS2 for file and LVM volumes: format at create, open at attach, close at detach and at boot recovery.

The header is kept small and at a fixed 2 MiB offset so the opened device is exactly the size the user asked for (the
backing volume is made 2 MiB larger). Discards pass through so thin pools can reclaim space; that reveals which blocks
are unused, never their contents.
"""

from __future__ import annotations

from pathlib import Path

from backends.run import run

HEADER_BYTES = 2 << 20
MAPPER = Path("/dev/mapper")
FORMAT_ARGS = [
    "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512",
    # the key is 64 random bytes, not a passphrase: a slow KDF would only cost seconds per open
    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
    "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", "--offset", str(HEADER_BYTES // 512),
]


def format_device(device: str, keyfile: Path) -> None:
    run(["cryptsetup", "luksFormat", "--batch-mode", *FORMAT_ARGS, "--key-file", str(keyfile), device])


def is_open(mapname: str) -> bool:
    return run(["cryptsetup", "status", mapname], check=False).returncode == 0


def open_device(device: str, keyfile: Path, mapname: str) -> str:
    if not is_open(mapname):
        run(["cryptsetup", "open", "--type", "luks2", "--allow-discards", "--key-file", str(keyfile), device,
             mapname])
    return str(MAPPER / mapname)


def close(mapname: str) -> None:
    if is_open(mapname):
        run(["cryptsetup", "close", mapname])


def resize(mapname: str, keyfile: Path) -> None:
    if is_open(mapname):
        run(["cryptsetup", "resize", "--key-file", str(keyfile), mapname])


def erase(device: str) -> None:
    """Wipe every keyslot: without them the ciphertext left on the device can never be decrypted."""
    run(["cryptsetup", "erase", "--batch-mode", device], check=False)


def open_mappings(prefix: str) -> list[str]:
    return sorted(p.name for p in MAPPER.glob(f"{prefix}*")) if MAPPER.is_dir() else []
