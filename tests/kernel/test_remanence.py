"""Remanence: a tenant never reads another's old blocks, and a deleted disk leaves nothing on the raw pool device.

For each backend (file, LVM thin, thick LVM, zvol) and each with encryption (LUKS2 on file and LVM, ZFS native on
zvols): a disk nearly as large as the pool allows is filled through nvmet (nvme-loop) with a recognisable pattern,
deleted, and the raw pool device (the loop device under the filesystem, the PV, the zpool vdev) is scanned for it;
then a new disk of the same size in the same pool, which must reuse those blocks, gets a small write into every
64 KiB (partial chunks and blocks, where an unzeroed thin chunk or zvol block would show old data) and is read whole
through nvmet.
Encrypted disks are checked by their ciphertext and LUKS keyslots: neither may survive on the raw device, and the key
file is gone. Each case first proves that its scan can see what it looks for (the control before the delete).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import Backend, BackendError, create_pool, destroy_pool, luks
from target.apply import apply_state
from target.configfs import ConfigFS
from target.model import parse_state
from tests.conftest import wipe
from tests.kernel import hostside
from tests.kernel.backend_rig import HOST, MIB, SUB, device_size, need, unexport

pytestmark = pytest.mark.kernel

TAG = b"NVMETD-REMANENCE-PATTERN:"
FRESH = b"NVMETD-FRESH-DISK-MARKER:"
IO = 4 * MIB  # per I/O: an 8 MiB read of a zvol namespace failed in nvmet-tcp (see test_backends)
POOL_DEVICE = 64 * MIB  # ZFS wants vdevs of 64 MiB at least
STRIDE = 64 * 1024  # the thin pool's chunk size; a write into every chunk of the new disk


@dataclass
class Pool:
    backend: Backend
    raw: str  # the device under everything: scanned for leftovers


@dataclass
class Pools:
    file: Pool
    lvm: Pool
    zfs: Pool


def _sh(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def pools(nvmet_kernel: ConfigFS) -> Iterator[Pools]:
    """One small pool of each kind, each on its own 64 MiB loop device on tmpfs, shared by every case."""
    need("mkfs.ext4", "lvcreate", "cryptsetup", "zpool", "zfs", "blkdiscard")
    base = Path("/run/nvmetd-test") if os.environ.get("NVMETD_IN_RIG") else Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(_sh("mktemp", "-d", "-p", str(base), "remanence.XXXX").strip())
    subprocess.run(["modprobe", "loop"], check=False, capture_output=True)
    loops: list[str] = []

    def loop(name: str) -> str:
        path = scratch / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(POOL_DEVICE)
        loops.append(_sh("losetup", "--find", "--show", str(path)).strip())
        return loops[-1]

    state = scratch / "state"
    made: list[Backend] = []
    mnt = scratch / "mnt"
    try:
        fs_dev = loop("file")
        # ext4 as mounted by default: no online discard, so freed blocks keep their data unless delete zeroes them
        subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=1,nodiscard", fs_dev], check=True)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "nodiscard", fs_dev, str(mnt)], check=True)
        made.append(create_pool("file", "rfile", [str(mnt / "pool")], root=state))
        lvm_dev = loop("lvm")
        # half the VG for the thin pool, the rest for thick LVs
        made.append(create_pool("lvm", "rlvm", [lvm_dev], root=state, thin_pool_percent=45))
        zfs_dev = loop("zfs")
        made.append(create_pool("zfs", "rzfs", [zfs_dev], root=state))
        yield Pools(file=Pool(made[0], fs_dev), lvm=Pool(made[1], lvm_dev), zfs=Pool(made[2], zfs_dev))
    finally:
        wipe()
        for backend in reversed(made):
            try:
                destroy_pool(backend.name, root=state, force=True)
            except BackendError as exc:
                print(f"teardown: {exc}")
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        for dev in loops:
            subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


def _largest(pool: Pool, thin: bool, encrypted: bool) -> int:
    """The largest disk the pool holds now (whole MiB), so that the next disk of that size reuses its blocks."""
    backend = pool.backend
    header = luks.HEADER_BYTES if encrypted and backend.kind != "zfs" else 0
    if backend.kind == "file":
        st = os.statvfs(backend.config["root"])
        free = st.f_bavail * st.f_frsize * 3 // 4
    elif backend.kind == "lvm" and thin:
        # below the fill threshold, so that the create after the delete is not refused
        free = backend.pool_usage()[0] * 4 // 5
    elif backend.kind == "lvm":
        doc = json.loads(_sh("vgs", "--devices", pool.raw, "--reportformat", "json", "--units", "b", "--nosuffix",
                             "-o", "vg_free", backend.config["vg"]))
        free = int(doc["report"][0]["vg"][0]["vg_free"])
    else:
        free = int(_sh("zfs", "get", "-Hp", "-o", "value", "available", backend.config["zpool"]).strip()) * 3 // 4
    return (free - header) // MIB * MIB


def export(cfs: ConfigFS, path: str) -> Path:
    """Serve `path` as namespace 1 over nvme-loop (the cheapest transport under TCG) and connect to it."""
    state = parse_state({"hosts": [{"nqn": HOST}],
                         "subsystems": [{"nqn": SUB, "allowed_hosts": [HOST],
                                         "namespaces": [{"nsid": 1, "device_path": path}]}],
                         "ports": [{"id": 1, "trtype": "loop", "subsystems": [SUB]}]})
    result = apply_state(state, cfs)
    assert result.converged, result.to_dict()
    hostside.connect("loop", SUB, HOST)
    return hostside.namespace_device(SUB, 1, "loop")


def _pattern(size: int, label: str) -> bytes:
    blocks = []
    for i in range(size // 4096):
        unit = TAG + f"{label}:{i:08d}:".encode()
        blocks.append((unit * (4096 // len(unit) + 1))[:4096])
    return b"".join(blocks)


def _write(dev: Path, data: bytes, stride: int | None = None) -> None:
    """All of `data` from offset 0, or (with `stride`) `data` at every multiple of `stride`: one open, one fsync."""
    import mmap

    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        if stride is None:
            chunks = [(off, data[off:off + IO]) for off in range(0, len(data), IO)]
        else:
            chunks = [(off, data) for off in range(0, device_size(dev), stride)]
        buf = mmap.mmap(-1, max(len(c) for _, c in chunks))
        for off, chunk in chunks:
            buf[:len(chunk)] = chunk
            assert os.pwritev(fd, [memoryview(buf)[:len(chunk)]], off) == len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def _found(raw: str, needles: list[bytes]) -> list[bytes]:
    """The needles present on the raw device: one pass over it, however many needles."""
    size, found = device_size(raw), set()
    for off in range(0, size, IO):
        data = hostside.direct_read(raw, min(IO + 4096, size - off), off)  # overlap: a needle across chunks
        found.update(n for n in needles if n in data)
    return [n for n in needles if n in found]


def _where(raw: str, needle: bytes) -> str:
    """Where the needle sits on the raw device, as merged 4 KiB-block ranges: what a failure needs to be read."""
    size, blocks = device_size(raw), []
    for off in range(0, size, IO):
        data = hostside.direct_read(raw, min(IO, size - off), off)
        blocks += [off + b for b in range(0, len(data), 4096) if needle in data[b:b + 4096]]
    ranges: list[list[int]] = []
    for b in blocks:
        if ranges and ranges[-1][1] == b:
            ranges[-1][1] = b + 4096
        else:
            ranges.append([b, b + 4096])
    shown = ", ".join(f"{a:#x}-{e:#x}" for a, e in ranges[:8])
    return f"{len(blocks)} blocks in {len(ranges)} ranges: {shown}{' ...' if len(ranges) > 8 else ''}"


def _read_all(dev: Path) -> bytes:
    size = device_size(dev)
    return b"".join(hostside.direct_read(dev, min(IO, size - off), off) for off in range(0, size, IO))


def _trim_skipped(pool: Pool) -> str:
    """ZFS's own count of free extents its TRIM passed over (too small, see zfs_trim_extent_bytes_min)."""
    if pool.backend.kind != "zfs":
        return ""
    stats = Path(f"/proc/spl/kstat/zfs/{pool.backend.config['zpool']}/iostats")
    rows = [line.split() for line in stats.read_text().splitlines()] if stats.exists() else []
    return "; " + " ".join(f"{r[0]}={r[2]}" for r in rows if len(r) == 3 and "skipped" in r[0])


def _sync(pool: Pool) -> None:
    if pool.backend.kind == "zfs":
        subprocess.run(["zpool", "sync", pool.backend.config["zpool"]], check=True)


CASES = [
    ("file", False, False), ("file", False, True),
    ("lvm", True, False), ("lvm", True, True), ("lvm", False, False), ("lvm", False, True),
    ("zfs", True, False), ("zfs", True, True),
]
# A plaintext zvol's raw scan needs the OpenZFS fix in kernel_patches/zfs/ (installed by scripts/setup): without
# it `zpool trim -w` ("100% trimmed") skips the first 4 MiB of every metaslab after the first, and on 2026-12-02
# 878 of 4352 pattern blocks (3.4 MiB, all at the start of metaslab 2) stayed on the vdev; this case fails then.
# The encrypted zvol's scan looks for plaintext, which its own blocks never hold (ZFS native encryption: the
# vdev holds ciphertext only), so it would pass whatever delete did: left out, as a scan that cannot fail.
RAW_SCAN_UNFALSIFIABLE = {("zfs", True, True)}


def _id(case: tuple[str, bool, bool]) -> str:
    kind, thin, encrypted = case
    return f"{kind}-{'thin' if thin else 'thick'}{'-encrypted' if encrypted else ''}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_deleted_disk_leaves_no_blocks_for_the_next_disk_or_on_the_raw_device(
        case: tuple[str, bool, bool], pools: Pools, nvmet_kernel: ConfigFS) -> None:
    remanence(case, pools, nvmet_kernel, raw_scan=case not in RAW_SCAN_UNFALSIFIABLE)


def remanence(case: tuple[str, bool, bool], pools: Pools, nvmet_kernel: ConfigFS, raw_scan: bool) -> None:
    kind, thin, encrypted = case
    pool: Pool = getattr(pools, kind)
    backend = pool.backend
    label = _id(case)
    name, fresh_name = f"old-{label}", f"new-{label}"
    wipe()
    size = _largest(pool, thin, encrypted)
    assert size >= 8 * MIB, f"pool {backend.name} has only {size} bytes free"
    backend.create(name, size, thin=thin, encrypted=encrypted)
    raw_volume = backend._raw_device(backend._get(backend.ledger.load(), name))
    dev = export(nvmet_kernel, backend.attach(name))
    _write(dev, _pattern(size, label))
    unexport(nvmet_kernel)
    backend.detach(name)
    _sync(pool)

    # the control: before the delete the scan sees what it looks for
    needles: list[bytes] = []
    if not encrypted:
        needles.append(TAG)
    elif kind != "zfs":
        header = hostside.direct_read(raw_volume, luks.HEADER_BYTES + 8192)
        keyslot = header[32768 + 4096:32768 + 4096 + 64]  # inside keyslot 0's area (after 2 x 16 KiB metadata)
        ciphertext = header[luks.HEADER_BYTES + 4096:luks.HEADER_BYTES + 4096 + 64]
        assert TAG not in header[luks.HEADER_BYTES:], "LUKS volume holds plaintext"
        needles += [keyslot, ciphertext]
    assert _found(pool.raw, needles) == needles, f"{label}: the scan does not see the data on {pool.raw}"

    key = backend.keys.path(name)
    assert key.exists() == encrypted
    backend.delete(name)
    assert not key.exists() and not (key.parent / f"{name}.zfskey").exists(), "delete left the key file"
    _sync(pool)
    if raw_scan:
        left = _found(pool.raw, list(dict.fromkeys([*needles, TAG])))
        assert not left, (f"{label}: the deleted disk's blocks are still on {pool.raw}: "
                          + "; ".join(_where(pool.raw, n) for n in left) + _trim_skipped(pool))

    assert _largest(pool, thin, encrypted) >= size, "the new disk cannot take the same space"
    backend.create(fresh_name, size, thin=thin, encrypted=encrypted)
    try:
        dev = export(nvmet_kernel, backend.attach(fresh_name))
        marker = (FRESH * (4096 // len(FRESH) + 1))[:4096]
        _write(dev, marker, stride=STRIDE)  # a partial write into every thin chunk / zvol block
        data = _read_all(dev)
        assert len(data) == size and data.count(marker) == size // STRIDE
        assert TAG not in data, f"{label}: the new disk reads the deleted disk's blocks"
        unexport(nvmet_kernel)
    finally:
        wipe()
        backend.detach(fresh_name)
        backend.delete(fresh_name)
