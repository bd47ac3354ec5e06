"""The disks the benchmark measures, made and exported the way users get theirs: backends/ pools and nvmetd's Manager.

A `Site` is one run's private nvmetd: a Manager with its own state file, pool registry and key directory in the
run's work directory. Its declared target tree is seeded with the live tree as found, so the Manager's reconcile
(which prunes whatever is not declared) keeps every export that was there before the run, and removes exactly what
the run added. Its ports are benchmark ports (ids from BENCH_PORT_BASE, the run's TCP/RDMA service port), so they
never collide with a host's real ports.

`provision(site, backend, name, size)` creates a pool of that kind (backends.pools.create_pool) and a disk in it
(Manager.create_disk); the raw baseline is the volume's own device or file (`pool.attach(name)`), the measured
path is what `Manager.attach` exports (see transports.py). Pool kinds and what they sit on:

- `file`:    a directory on tmpfs; nvmet serves the volume file as a *file* namespace (the kernel's vfs path).
- `nullblk`: memory-backed null_blk devices, a block device with almost no cost of its own, so what is left is
             the cost of the path. Memory-backed, so data survives and the integrity jobs can check it.
- `lvm`:     an LVM thin pool on a loop device over a sparse file on tmpfs (dm-thin, the bio path).
- `zfs`:     a zpool on a loop device over a sparse file on tmpfs (zvols).

Backing files belong on tmpfs: on the rig's overlay root a file namespace is broken (kernel-rig.md).
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.errors import BackendError
from nvmetd.errors import SystemProblem, UserError
from target.configfs import ConfigFS
from target.live import read_state
from target.model import StateError, parse_state
from target.store import StateStore, set_target

BACKENDS = ("file", "nullblk", "lvm", "zfs")
BENCH_PORT_BASE = 0xB00  # port ids the benchmark's Manager uses: ours to create and remove
# TEST-NET-1 (RFC 5737): never routed, so a veth pair with these addresses cannot collide with a real network
RDMA_TARGET_ADDR = "192.0.2.1"
DAEMON_SOCKET = Path("/run/nvmetd/nvmetd.sock")
MIB = 1 << 20
# LVM thin metadata, ZFS labels and reservations need room beside the volume itself
POOL_HEADROOM = 128 * MIB


class DiskError(SystemProblem):
    """A disk could not be made (missing module, no loop device, no memory): says what to do."""


@dataclass
class Disk:
    backend: str  # the pool kind
    name: str  # the disk's name in the Manager
    pool: str
    device_path: str  # the volume's own device or file: the raw baseline
    size: int
    backing_path: str  # the bytes behind device_path: where a corruption test writes garbage
    cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def destroy(self) -> None:
        """Undo creation in reverse order; every step runs even if one fails."""
        errors = []
        while self.cleanup:
            try:
                self.cleanup.pop()()
            except (OSError, subprocess.CalledProcessError, BackendError, UserError, SystemProblem,
                    DiskError) as exc:
                errors.append(str(exc))
        if errors:
            raise DiskError(f"cleaning up {self.name}: {'; '.join(errors)}")


def _run(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except FileNotFoundError:
        raise DiskError(f"{argv[0]} is not installed: run `make setup`") from None
    except subprocess.CalledProcessError as exc:
        raise DiskError(f"{' '.join(argv)} failed: {exc.stderr.strip()}") from None


class Site:
    """One run's private nvmetd control plane (see the module docstring)."""

    def __init__(self, cfs: ConfigFS | None, workdir: Path, trsvcid: int = 4460, rdma_traddr: str | None = None,
                 daemon_socket: Path = DAEMON_SOCKET) -> None:
        """`cfs` None: no nvmet on this host (the vhost transport); disks only, nothing exported through nvmet."""
        from nvmetd.manager import Manager

        if daemon_socket.exists():
            # its drift repair (every 30 s) would take the benchmark's exports away mid-run
            raise DiskError(f"nvmetd is running ({daemon_socket}): stop it for the benchmark "
                            "(`systemctl stop nvmetd`); its drift repair would remove the benchmark's exports")
        self.cfs = cfs
        self.workdir = workdir
        self.pools_root = workdir / "pools"
        store = StateStore(workdir / "state.json")
        try:
            live = parse_state(read_state(cfs).canonical().model_dump(mode="json")) if cfs is not None else None
        except StateError as exc:
            raise DiskError(f"the live nvmet tree does not validate, so the benchmark cannot keep it intact: {exc}") \
                from None
        with store.transaction() as doc:
            if live is not None:
                set_target(doc, live)
            doc["ports"] = {"tcp_id": BENCH_PORT_BASE, "tcp_address": "127.0.0.1", "tcp_port": str(trsvcid),
                            "loop_id": BENCH_PORT_BASE + 1, "rdma_id": BENCH_PORT_BASE + 2,
                            "rdma_address": rdma_traddr or RDMA_TARGET_ADDR, "rdma_port": str(trsvcid)}
        self.manager = Manager(store, cfs or ConfigFS(), pools_root=self.pools_root, keys_dir=workdir / "keys")

    def pool(self, name: str) -> Any:
        from backends import pools

        return pools.open_pool(name, self.pools_root)


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _loop_device(disk: Disk, path: Path) -> str:
    subprocess.run(["modprobe", "-q", "loop"], check=False, capture_output=True)
    dev = _run("losetup", "--find", "--show", str(path))
    disk.cleanup.append(lambda: path.unlink(missing_ok=True))
    disk.cleanup.append(lambda: _run("losetup", "--detach", dev) and None)
    return dev


def _pool_devices(backend: str, disk: Disk, size: int, workdir: Path) -> tuple[list[str], dict[str, Any]]:
    """What create_pool needs for `backend`: its devices and options, made on tmpfs."""
    if backend == "file":
        return [str(workdir / f"pool-{disk.pool}")], {}
    if backend == "nullblk":
        return [], {"capacity": size + POOL_HEADROOM}
    if backend in ("lvm", "zfs"):
        image = _sparse_file(workdir / f"pool-{disk.pool}.img", size + 2 * POOL_HEADROOM)
        return [_loop_device(disk, image)], {}
    raise DiskError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")


def provision(site: Site, backend: str, name: str, size: int) -> Disk:
    """Make a pool of kind `backend` and a disk of `size` bytes in it, through backends/ and the Manager."""
    from backends import pools

    if backend not in BACKENDS:
        raise DiskError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    pool_name = f"bench-{backend}"
    disk = Disk(backend, name, pool_name, "", size, "")
    try:
        devices, options = _pool_devices(backend, disk, size, site.workdir)
        pools.create_pool(backend, pool_name, devices, root=site.pools_root, **options)
        disk.cleanup.append(lambda: pools.destroy_pool(pool_name, site.pools_root, force=True))
        site.manager.create_disk(name, pool_name, size)
        disk.cleanup.append(lambda: site.manager.delete_disk(name))
        volume = site.pool(pool_name)
        disk.device_path = volume.attach(name)
        disk.backing_path = volume.device_path(name)
    except (BackendError, UserError, SystemProblem, DiskError) as exc:
        with contextlib.suppress(DiskError):
            disk.destroy()
        raise DiskError(f"{backend} disk {name}: {exc}") from None
    return disk


def write_behind(disk: Disk, offset: int, data: bytes) -> None:
    """Write straight into the backing store, past nvmet: what a corruption test (or a bad disk) does."""
    _behind(disk, offset, len(data), lambda buf: data)


def read_behind(disk: Disk, offset: int, length: int) -> bytes:
    got: list[bytes] = []
    _behind(disk, offset, length, lambda buf: got.append(bytes(buf)) or None)
    return got[0]


def _behind(disk: Disk, offset: int, length: int, change: Callable[[memoryview], bytes | None]) -> None:
    """Read [offset, offset+length) of the backing store, let `change` replace it, write it back if it did.

    Block devices go through O_DIRECT in whole 4 KiB blocks, so no page cache sits between this and nvmet's bios;
    a file on tmpfs has only its page cache, which nvmet's file namespace reads too.
    """
    import mmap

    path = disk.backing_path
    block = stat.S_ISBLK(os.stat(path).st_mode)
    start = offset - offset % 4096 if block else offset
    end = -(-(offset + length) // 4096) * 4096 if block else offset + length
    buf = mmap.mmap(-1, end - start)
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if block else 0))
    try:
        os.preadv(fd, [buf], start)
        view = memoryview(buf)[offset - start:offset - start + length]
        new = change(view)
        if new is not None:
            if len(new) != length:
                raise ValueError("a change must keep the length")
            view[:] = new
            os.pwritev(fd, [buf], start)
            os.fsync(fd)
        view.release()
    finally:
        os.close(fd)
