"""The backend policy (names, quotas, fill threshold, crash journal) on the file backend, which needs no kernel
feature: real files in a temporary directory, the real ledger, the real recovery."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from backends import BackendError, PoolFullError, QuotaError, create_pool, destroy_pool, open_pool
from backends.file import FileBackend
from backends.keys import KeyStore

MIB = 1 << 20


class SimulatedCrash(BaseException):
    """Stands for the process dying between two steps: nothing after the raise runs, no cleanup handler fires."""


@pytest.fixture
def pool(tmp_path: Path) -> FileBackend:
    backend = create_pool("file", "p1", [str(tmp_path / "files")], root=tmp_path / "state")
    assert isinstance(backend, FileBackend)
    return backend


def pattern(size: int, seed: int) -> bytes:
    return hashlib.shake_256(f"pattern-{seed}".encode()).digest(size)


def write(path: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str, size: int, offset: int = 0) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "a\x00b", "x" * 65, "", ".hidden", "-opt", "a:b", "a b"])
def test_names_that_could_escape_are_refused(pool: FileBackend, tmp_path: Path, bad: str) -> None:
    with pytest.raises(BackendError) as exc:
        pool.create(bad, "4M")
    assert "name" in str(exc.value)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [".snapshots"]
    assert not (tmp_path / "escape.img").exists()


@pytest.mark.parametrize("bad", [0, -1, 1000, "12Q", "1.5G", True])
def test_sizes_must_be_whole_mebibytes(pool: FileBackend, bad: object) -> None:
    with pytest.raises(BackendError, match="size"):
        pool.create("v", bad)  # type: ignore[arg-type]


def test_thin_and_thick_allocation(pool: FileBackend) -> None:
    thin = pool.create("thin", "32M")
    thick = pool.create("thick", "32M", thin=False)
    assert thin.logical_bytes == thick.logical_bytes == 32 * MIB
    assert thin.allocated_bytes < MIB
    assert thick.allocated_bytes >= 32 * MIB
    path = pool.attach("thin")
    assert os.path.getsize(path) == 32 * MIB and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_snapshot_clone_grow_delete_zeros(pool: FileBackend) -> None:
    pool.create("vol", "16M")
    path = pool.attach("vol")
    data = pattern(4 * MIB, 1)
    write(path, data)
    pool.snapshot("vol", "s1")
    write(path, pattern(4 * MIB, 2))  # the origin moves on; the snapshot must not
    clone = pool.clone("vol", "s1", "vol-clone")
    assert clone.origin == "vol@s1"
    assert read(pool.attach("vol-clone"), 4 * MIB) == data
    assert read(path, 4 * MIB) == pattern(4 * MIB, 2)

    assert pool.grow("vol", "32M").logical_bytes == 32 * MIB
    assert os.path.getsize(path) == 32 * MIB
    with pytest.raises(BackendError, match=r"shrinking .* refused"):
        pool.grow("vol", "16M")
    assert pool.grow("vol", "24M", force=True).logical_bytes == 24 * MIB

    with pytest.raises(BackendError, match="has clones"):
        pool.delete_snapshot("vol", "s1")
    pool.detach("vol-clone")
    pool.delete("vol-clone")
    with pytest.raises(BackendError, match="attached"):
        pool.delete("vol")
    pool.detach("vol")
    with pytest.raises(BackendError, match="has snapshots"):
        pool.delete("vol")
    pool.delete_snapshot("vol", "s1")
    pool.delete("vol")
    assert pool.list() == []
    again = pool.create("vol", "24M")
    assert read(pool.attach(again.name), 4 * MIB) == bytes(4 * MIB)


def test_tenant_quota_bytes_and_disks_survive_reopen(pool: FileBackend, tmp_path: Path) -> None:
    pool.set_quota("acme", max_bytes="100M", max_disks=2)
    pool.create("a1", "64M", tenant="acme")
    with pytest.raises(QuotaError) as exc:
        pool.create("a2", "64M", tenant="acme")
    message = str(exc.value)
    assert "acme" in message and "100.0 MiB" in message and "set_quota" in message

    reopened = open_pool("p1", root=tmp_path / "state")  # a restart: accounting comes from the ledger
    reopened.create("a2", "16M", tenant="acme")
    with pytest.raises(QuotaError, match="2 disks"):
        reopened.create("a3", "1M", tenant="acme")
    with pytest.raises(QuotaError, match="quota"):
        reopened.grow("a2", "64M")
    reopened.create("other", "64M", tenant="someone-else")  # quotas are per tenant
    assert reopened.status().tenants["acme"] == {"logical_bytes": 80 * MIB, "disks": 2, "max_bytes": 100 * MIB,
                                                 "max_disks": 2}
    reopened.snapshot("a1", "s")
    with pytest.raises(QuotaError, match="quota"):
        reopened.clone("a1", "s", "a4")  # a clone is a new disk of the tenant


def test_fill_threshold_refuses_and_reports(tmp_path: Path) -> None:
    pool = create_pool("file", "small", [str(tmp_path / "f")], root=tmp_path / "s", fill_threshold=50,
                       capacity=100 * MIB)
    pool.create("big", "40M", thin=False)
    assert pool.status().accepting_allocations
    pool.create("more", "20M", thin=False)
    status = pool.status()
    assert not status.accepting_allocations and status.fill_percent >= 50 and "threshold" in status.reason
    with pytest.raises(PoolFullError) as exc:
        pool.create("refused", "1M")
    assert "50% " in str(exc.value) and "free space" in str(exc.value)
    with pytest.raises(PoolFullError):
        pool.snapshot("big", "s")
    with pytest.raises(PoolFullError):
        pool.grow("big", "41M")
    pool.delete("more")
    pool.create("fits-again", "1M")


def test_crash_during_create_is_rolled_back(pool: FileBackend, tmp_path: Path, monkeypatch) -> None:
    real_make = FileBackend._make

    def make_then_die(self, vol, backing):
        real_make(self, vol, backing)
        raise SimulatedCrash

    pool.set_quota("t", max_disks=1)
    monkeypatch.setattr(FileBackend, "_make", make_then_die)
    with pytest.raises(SimulatedCrash):
        pool.create("half", "8M", tenant="t")
    monkeypatch.undo()
    assert (tmp_path / "files" / "half.img").exists()  # the crash left a file the ledger does not list

    restarted = open_pool("p1", root=tmp_path / "state")
    with pytest.raises(BackendError, match="unfinished create"):
        restarted.create("half", "8M", tenant="t")
    assert restarted.recover() == ["rolled back unfinished create of half"]
    assert not (tmp_path / "files" / "half.img").exists()
    restarted.create("half", "8M", tenant="t")  # the quota reservation was released too


def test_crash_during_delete_is_finished(pool: FileBackend, tmp_path: Path, monkeypatch) -> None:
    pool.create("doomed", "8M")
    write(pool.attach("doomed"), pattern(MIB, 3))
    pool.detach("doomed")
    monkeypatch.setattr(FileBackend, "_destroy", lambda self, vol: (_ for _ in ()).throw(SimulatedCrash()))
    with pytest.raises(SimulatedCrash):
        pool.delete("doomed")
    monkeypatch.undo()
    restarted = open_pool("p1", root=tmp_path / "state")
    assert restarted.recover() == ["finished interrupted delete of doomed"]
    assert not (tmp_path / "files" / "doomed.img").exists()
    assert restarted.list() == []


def test_crash_during_snapshot_and_clone_roll_back(pool: FileBackend, tmp_path: Path, monkeypatch) -> None:
    pool.create("src", "8M")
    monkeypatch.setattr(FileBackend, "_snapshot",
                        lambda self, vol, snap: (self._snap_path(vol["name"], snap).write_bytes(b"x"),
                                                 (_ for _ in ()).throw(SimulatedCrash())))
    with pytest.raises(SimulatedCrash):
        pool.snapshot("src", "s")
    monkeypatch.undo()
    restarted = open_pool("p1", root=tmp_path / "state")
    restarted.recover()
    assert list((tmp_path / "files" / ".snapshots").iterdir()) == []
    assert restarted.info("src").snapshots == []
    restarted.snapshot("src", "s")
    assert restarted.info("src").snapshots == ["s"]


def test_destroy_pool_with_force_removes_dependents_first(pool: FileBackend, tmp_path: Path) -> None:
    pool.create("base", "4M")
    pool.snapshot("base", "s")
    pool.clone("base", "s", "child")
    with pytest.raises(BackendError, match="still has volumes"):
        destroy_pool("p1", root=tmp_path / "state")
    destroy_pool("p1", root=tmp_path / "state", force=True)
    assert list((tmp_path / "files").glob("*.img")) == []
    assert not (tmp_path / "state" / "p1").exists()


def test_ledger_and_keys_are_private(pool: FileBackend, tmp_path: Path) -> None:
    pool.create("v", "4M")
    ledger = tmp_path / "state" / "p1" / "ledger.json"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.parent.stat().st_mode) == 0o700
    keys = KeyStore(tmp_path / "keys")
    path = keys.create("v")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_bytes()) == 64
    assert keys.create("w", source="v").read_bytes() == path.read_bytes()
    keys.destroy("v")
    assert not path.exists()


def test_unknown_kind_and_duplicate_pool(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        create_pool("tape", "x", [], root=tmp_path)
    create_pool("file", "x", [str(tmp_path / "d")], root=tmp_path)
    with pytest.raises(BackendError, match="exists already"):
        create_pool("file", "x", [str(tmp_path / "d")], root=tmp_path)


def test_sizes_beyond_one_exbibyte_are_refused(pool: FileBackend) -> None:
    """Found by the API fuzzer: a resize to 2^62 bytes died in ftruncate with OverflowError (a 500)."""
    with pytest.raises(BackendError, match="1 EiB"):
        pool.create("huge", (1 << 60) + MIB)
    pool.create("v", "4M")
    with pytest.raises(BackendError, match="1 EiB"):
        pool.grow("v", 1 << 62)


def test_a_grow_the_filesystem_refuses_leaves_the_volume_usable(pool: FileBackend,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed grow (EFBIG: ext4 stops at 16 TiB) is a BackendError, and its intent does not stay behind to block
    the volume until a restart (and be retried, and fail, at every recovery)."""
    import errno

    pool.create("v", "4M")

    def efbig(fd: int, size: int) -> None:
        raise OSError(errno.EFBIG, "File too large")

    with monkeypatch.context() as m:
        m.setattr("backends.file.os.ftruncate", efbig)
        with pytest.raises(BackendError, match="File too large"):
            pool.grow("v", "8G")
    assert pool.info("v").logical_bytes == 4 * MIB
    assert pool.ledger.load()["intents"] == {}
    pool.grow("v", "8M")
    assert pool.info("v").logical_bytes == 8 * MIB
