"""Every backend against the real 6.12 kernel and tools, pools on loop devices on tmpfs, volumes served by nvmet over
nvme-tcp through target/: lifecycle, delete-then-zeros, encryption at rest, compression, quotas, fill threshold and
crash recovery."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from backends import BackendError, PoolFullError, QuotaError, luks
from backends.base import Backend as BaseBackend
from target.configfs import ConfigFS
from tests.kernel import hostside
from tests.kernel.backend_rig import (
    MIB,
    PoolFactory,
    compressible,
    contains,
    device_size,
    export,
    need,
    unexport,
    write_direct,
)

pytestmark = pytest.mark.kernel



class SimulatedCrash(BaseException):
    """The process dies between two steps: no except-clause of the code under test sees it."""




def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


LIFECYCLE = {
    "file": {},
    "lvm": {},
    "zfs": {"compression": "lz4", "volblocksize": "16K"},
    "nullblk": {},
}


@pytest.mark.parametrize("kind", sorted(LIFECYCLE))
def test_lifecycle_export_snapshot_clone_grow_delete_zeros(kind: str, make_pool: PoolFactory, cfs: ConfigFS) -> None:
    pool, _ = make_pool(kind)
    pool.create("disk1", "64M", tenant="t1", **LIFECYCLE[kind])
    path = pool.attach("disk1")

    dev = export(cfs, {1: path})[1]
    assert device_size(dev) == 64 * MIB
    written = hostside.write_read_verify(dev, size=4 * MIB, seed=11)
    unexport(cfs)
    assert digest(hostside.direct_read(path, 4 * MIB)) == written  # it landed on the volume itself

    pool.snapshot("disk1", "snap1")
    later = hostside.write_read_verify(path, size=4 * MIB, seed=12)  # the origin moves on after the snapshot
    clone = pool.clone("disk1", "snap1", "disk1-clone")
    assert clone.origin == "disk1@snap1" and clone.tenant == "t1"
    devs = export(cfs, {1: path, 2: pool.attach("disk1-clone")})
    assert digest(hostside.direct_read(devs[2], 4 * MIB)) == written, "clone lacks the snapshot's data"
    assert digest(hostside.direct_read(devs[1], 4 * MIB)) == later
    unexport(cfs)

    pool.detach("disk1")
    grown = pool.grow("disk1", "128M")
    assert grown.logical_bytes == 128 * MIB
    with pytest.raises(BackendError, match="refused"):
        pool.grow("disk1", "64M")
    dev = export(cfs, {1: pool.attach("disk1")})[1]
    assert device_size(dev) == 128 * MIB
    assert digest(hostside.direct_read(dev, 4 * MIB)) == later
    unexport(cfs)

    listed = {v.name: v for v in pool.list()}
    assert set(listed) == {"disk1", "disk1-clone"}
    assert listed["disk1"].snapshots == ["snap1"] and listed["disk1"].allocated_bytes > 0

    for name in ("disk1", "disk1-clone"):
        pool.detach(name)
    pool.delete("disk1-clone")
    pool.delete_snapshot("disk1", "snap1")
    pool.delete("disk1")
    assert pool.list() == []

    pool.create("disk2", "128M", tenant="t2", **LIFECYCLE[kind])
    fresh = pool.attach("disk2")
    assert hostside.direct_read(fresh, 4 * MIB) == bytes(4 * MIB), "a new disk shows the deleted disk's data"
    dev = export(cfs, {1: fresh})[1]
    # 4 MiB per I/O: an 8 MiB read of a zvol namespace failed in nvmet-tcp ("failed to map data", sc 0xf)
    assert hostside.direct_read(dev, 4 * MIB) == bytes(4 * MIB)
    unexport(cfs)
    pool.detach("disk2")


@pytest.mark.parametrize("kind", ["file", "lvm", "zfs"])
def test_encrypted_disk_leaves_no_plaintext_on_the_raw_device(kind: str, make_pool: PoolFactory,
                                                                cfs: ConfigFS) -> None:
    pool, raw_devices = make_pool(kind)
    pool.create("plain", "16M")
    pool.create("secret", "16M", encrypted=True)
    plain_marker = b"NVMETD-PLAINTEXT-CONTROL-MARKER-" + kind.encode() + b"\n"
    secret_marker = b"NVMETD-SECRET-MARKER-MUST-NOT-LEAK-" + kind.encode() + b"\n"

    write_direct(pool.attach("plain"), (plain_marker * (MIB // len(plain_marker) + 1))[:MIB])
    secret_path = pool.attach("secret")
    dev = export(cfs, {1: secret_path})[1]  # the tenant's writes arrive over nvme-tcp
    write_direct(dev, (secret_marker * (MIB // len(secret_marker) + 1))[:MIB])
    assert secret_marker in hostside.direct_read(dev, 4096)
    unexport(cfs)
    if kind == "zfs":
        subprocess.run(["zpool", "sync", pool.config["zpool"]], check=True)

    key = Path(pool.keys.path("secret"))
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    # the scan can find plaintext (control), and finds none of the encrypted disk's
    assert any(contains(raw, plain_marker) for raw in raw_devices)
    assert not any(contains(raw, secret_marker) for raw in raw_devices)

    pool.detach("secret")
    if kind != "zfs":
        assert not luks.is_open(pool.mapname("secret")), "detach left the LUKS mapping open"
    again = pool.attach("secret")
    assert secret_marker in hostside.direct_read(again, 4096)
    for name in ("plain", "secret"):
        pool.detach(name)
        pool.delete(name)
    assert not key.exists()


@pytest.mark.parametrize("kind,compression", [("zfs", "lz4"), ("zfs", "zstd"), ("lvm", "vdo")])
def test_compression_ratio_above_one(kind: str, compression: str, make_pool: PoolFactory) -> None:
    if kind == "lvm":
        need("vdoformat")
        subprocess.run(["modprobe", "dm-vdo"], check=False, capture_output=True)
        pool, _ = make_pool("lvm", devices=1, device_size=8 << 30, thin_pool_percent=5)
    else:
        pool, _ = make_pool(kind)
    pool.create("squeeze", "256M", compression=compression)
    path = pool.attach("squeeze")
    write_direct(path, compressible(16 * MIB))
    if kind == "zfs":
        subprocess.run(["zpool", "sync", pool.config["zpool"]], check=True)
    info = pool.info("squeeze")
    assert info.compression == compression
    assert info.compression_ratio > 1.5, info
    assert info.allocated_bytes > 0
    pool.detach("squeeze")
    pool.delete("squeeze")


@pytest.mark.parametrize("kind", ["lvm", "zfs"])
def test_quota_and_fill_threshold_refuse_with_actionable_errors(kind: str, make_pool: PoolFactory) -> None:
    # a fresh small thin pool's metadata is already ~12% used (fill counts the fuller of data and metadata)
    pool, _ = make_pool(kind, fill_threshold=15)
    pool.set_quota("acme", max_bytes="96M", max_disks=3)
    pool.create("a1", "64M", tenant="acme")
    with pytest.raises(QuotaError) as exc:
        pool.create("a2", "64M", tenant="acme")
    assert "acme" in str(exc.value) and "96.0 MiB" in str(exc.value)
    if kind == "zfs":
        tenant_ds = f"{pool.config['zpool']}/nvmetd/acme"
        quota = subprocess.run(["zfs", "get", "-Hp", "-o", "value", "quota", tenant_ds], check=True,
                               capture_output=True, text=True).stdout.strip()
        assert quota == str(96 * MIB)
        # ZFS itself holds the line too: a thick zvol's reservation past the tenant's quota is refused
        bypass = subprocess.run(["zfs", "create", "-V", str(128 * MIB), f"{tenant_ds}/bypass"], capture_output=True,
                                text=True)
        assert bypass.returncode != 0 and "out of space" in bypass.stderr, bypass.stderr

    assert pool.status().accepting_allocations
    path = pool.attach("a1")
    write_direct(path, os.urandom(48 * MIB))  # incompressible: fills the pool for real
    if kind == "zfs":
        subprocess.run(["zpool", "sync", pool.config["zpool"]], check=True)
    status = pool.status()
    assert not status.accepting_allocations and status.fill_percent >= 15 and "threshold" in status.reason
    with pytest.raises(PoolFullError) as exc:
        pool.create("b1", "8M", tenant="other")
    assert "fill threshold of 15%" in str(exc.value) and "free space" in str(exc.value)
    with pytest.raises(PoolFullError):
        pool.snapshot("a1", "s")
    pool.detach("a1")
    pool.delete("a1")
    pool.create("b1", "8M", tenant="other")  # deleting freed the space


# LUKS is covered on files, native encryption on ZFS, plain volumes on LVM (each LVM+LUKS step costs seconds)
@pytest.mark.parametrize("kind,encrypted", [("lvm", False), ("zfs", True), ("file", True)])
def test_crash_between_steps_is_repaired_by_recover(kind: str, encrypted: bool, make_pool: PoolFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pool, _ = make_pool(kind)
    monkeypatch.setattr(BaseBackend, "_commit_create", lambda self, intent, vol: (_ for _ in ()).throw(
        SimulatedCrash()))
    with pytest.raises(SimulatedCrash):
        pool.create("half", "16M", encrypted=encrypted)
    monkeypatch.undo()
    raw = pool._raw_device({**pool.ledger.load()["intents"].popitem()[1]["record"]})
    assert Path(raw).exists() and pool.keys.exists("half") == encrypted  # the crash left storage (and a key)
    assert pool.recover() == ["rolled back unfinished create of half"]
    subprocess.run(["udevadm", "settle"], check=False)
    assert not Path(raw).exists() and not pool.keys.exists("half")

    pool.create("doomed", "16M", encrypted=encrypted)
    raw = pool._raw_device(pool.ledger.load()["volumes"]["doomed"])
    monkeypatch.setattr(type(pool), "_destroy", lambda self, vol: (_ for _ in ()).throw(SimulatedCrash()))
    with pytest.raises(SimulatedCrash):
        pool.delete("doomed")
    monkeypatch.undo()
    assert Path(raw).exists()
    assert pool.recover() == ["finished interrupted delete of doomed"]
    subprocess.run(["udevadm", "settle"], check=False)
    assert not Path(raw).exists() and pool.list() == []


def test_boot_recovery_closes_luks_mappings_of_detached_disks(make_pool: PoolFactory) -> None:
    pool, _ = make_pool("file")
    pool.create("kept", "16M", encrypted=True)
    pool.create("idle", "16M", encrypted=True)
    kept = pool.attach("kept")
    pool.attach("idle")
    with pool.ledger.change() as doc:  # the service died after detaching "idle" in its ledger only
        doc["volumes"]["idle"]["attached"] = False
    assert luks.is_open(pool.mapname("idle"))
    done = pool.recover()
    assert done == [f"closed stale mapping {pool.mapname('idle')}"]
    assert not luks.is_open(pool.mapname("idle")) and Path(kept).exists()
    pool.detach("kept")
    assert not luks.is_open(pool.mapname("kept"))
