"""Per-volume encryption keys: random bytes in 0600 files under a 0700 directory, never printed or put on argv.

A key is random (not a passphrase), so cryptsetup's slow PBKDF would add seconds per open and no strength:
see `luks.FORMAT_ARGS`. Deleting a key is half of a crypto-erase; the other half wipes the LUKS keyslots.
"""

from __future__ import annotations

import os
from pathlib import Path

from backends.errors import BackendError

KEY_BYTES = 64  # LUKS2 aes-xts-plain64 with a 512-bit key; ZFS raw keys use the first 32


class KeyStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, volume: str) -> Path:
        return self.root / f"{volume}.key"

    def create(self, volume: str, source: str | None = None) -> Path:
        """A fresh key, or a copy of `source`'s for a clone (its data was encrypted with that key)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        data = self.path(source).read_bytes() if source else os.urandom(KEY_BYTES)
        path = self.path(volume)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise BackendError(f"a key for {volume!r} already exists at {path}; run recovery first") from None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def zfs_key(self, volume: str) -> Path:
        """ZFS `keyformat=raw` wants exactly 32 bytes: a sibling file holding the first 32 of the volume key."""
        path = self.root / f"{volume}.zfskey"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, self.path(volume).read_bytes()[:32])
                os.fsync(fd)
            finally:
                os.close(fd)
        return path

    def exists(self, volume: str) -> bool:
        return self.path(volume).exists()

    def destroy(self, volume: str) -> None:
        for path in (self.path(volume), self.root / f"{volume}.zfskey"):
            try:
                size = path.stat().st_size
                with open(path, "r+b") as f:  # overwrite before unlinking: best effort against undelete
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
                path.unlink()
            except FileNotFoundError:
                pass
