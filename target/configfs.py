"""The only code that touches /sys/kernel/config/nvmet.

configfs has no maintained Python library, so this is ours: plain os calls (one open/read/close per attribute,
no buffering surprises), every write counted so "re-applying an unchanged state makes zero writes" is measurable,
and kernel errors turned into ConfigfsError naming the path and the errno.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

NVMET_ROOT = Path("/sys/kernel/config/nvmet")


class ConfigfsError(OSError):
    """A configfs operation the kernel refused; `op` and `path` say which."""

    def __init__(self, op: str, path: str, err: OSError) -> None:
        super().__init__(err.errno, err.strerror)
        self.op = op
        self.path = path

    def __str__(self) -> str:
        return f"{self.op} {self.path}: {self.strerror or errno.errorcode.get(self.errno or 0, '?')}"


@dataclass
class Counters:
    reads: int = 0
    writes: int = 0
    mkdirs: int = 0
    rmdirs: int = 0
    links: int = 0
    unlinks: int = 0

    @property
    def changes(self) -> int:
        return self.writes + self.mkdirs + self.rmdirs + self.links + self.unlinks


@dataclass
class ConfigFS:
    """Access to one nvmet configfs tree; `root` may point at a fake tree for pure-logic unit tests."""

    root: Path = NVMET_ROOT
    counters: Counters = field(default_factory=Counters)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except FileNotFoundError:
            return []

    def isdir(self, rel: str) -> bool:
        return os.path.isdir(self.path(rel))

    def has_attr(self, rel: str, attr: str) -> bool:
        return os.path.isfile(os.path.join(self.path(rel), attr))

    def read(self, rel: str, attr: str) -> str | None:
        """The attribute's value as the kernel prints it (trailing newline stripped); None if it does not exist."""
        full = os.path.join(self.path(rel), attr)
        self.counters.reads += 1
        try:
            fd = os.open(full, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigfsError("read", full, exc) from None
        try:
            data = os.read(fd, 8192)
        except OSError as exc:
            raise ConfigfsError("read", full, exc) from None
        finally:
            os.close(fd)
        return data.decode(errors="replace").rstrip("\n")

    def write(self, rel: str, attr: str, value: str) -> None:
        full = os.path.join(self.path(rel), attr)
        self.counters.writes += 1
        try:
            fd = os.open(full, os.O_WRONLY)
        except OSError as exc:
            raise ConfigfsError("write", full, exc) from None
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise ConfigfsError("write", full, exc) from None
        finally:
            os.close(fd)

    def mkdir(self, rel: str) -> None:
        self.counters.mkdirs += 1
        try:
            os.mkdir(self.path(rel))
        except OSError as exc:
            raise ConfigfsError("mkdir", self.path(rel), exc) from None

    def rmdir(self, rel: str) -> None:
        self.counters.rmdirs += 1
        try:
            os.rmdir(self.path(rel))
        except OSError as exc:
            raise ConfigfsError("rmdir", self.path(rel), exc) from None

    def symlink(self, target_rel: str, link_rel: str) -> None:
        self.counters.links += 1
        try:
            os.symlink(self.path(target_rel), self.path(link_rel))
        except OSError as exc:
            raise ConfigfsError("link", self.path(link_rel), exc) from None

    def unlink(self, link_rel: str) -> None:
        self.counters.unlinks += 1
        try:
            os.unlink(self.path(link_rel))
        except OSError as exc:
            raise ConfigfsError("unlink", self.path(link_rel), exc) from None
