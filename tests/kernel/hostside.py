"""The initiator side of kernel tests: connect with nvme-cli, find the block device by NQN, move data."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from pathlib import Path

SYS_NVME = Path("/sys/class/nvme")


def connect(transport: str, nqn: str, hostnqn: str, traddr: str = "", trsvcid: str = "",
            dhchap_secret: str | None = None, dhchap_ctrl_secret: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    # the kernel refuses a second host NQN with the same host ID, so each NQN gets its own
    argv = ["nvme", "connect", "-t", transport, "-n", nqn, "--hostnqn", hostnqn, "--hostid", host_id(hostnqn)]
    if traddr:
        argv += ["-a", traddr]
    if trsvcid:
        argv += ["-s", trsvcid]
    if dhchap_secret:
        argv += ["--dhchap-secret", dhchap_secret]
    if dhchap_ctrl_secret:
        argv += ["--dhchap-ctrl-secret", dhchap_ctrl_secret]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def host_id(hostnqn: str) -> str:
    tail = hostnqn.rsplit(":uuid:", 1)
    return tail[1] if len(tail) == 2 else str(uuid.uuid5(uuid.NAMESPACE_URL, hostnqn))


def controllers(nqn: str, transport: str | None = None) -> list[str]:
    found = []
    for ctrl in sorted(SYS_NVME.glob("nvme*")):
        try:
            if (ctrl / "subsysnqn").read_text().strip() != nqn:
                continue
            if transport and (ctrl / "transport").read_text().strip() != transport:
                continue
        except OSError:
            continue
        found.append(ctrl.name)
    return found


def namespace_device(nqn: str, nsid: int, transport: str, timeout: float = 20.0) -> Path:
    """The /dev node of namespace `nsid` reached through a controller of `transport` for `nqn`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ctrl in controllers(nqn, transport):
            for ns in (SYS_NVME / ctrl).glob(f"{ctrl[:4]}*n*"):
                nsid_file = ns / "nsid"
                if nsid_file.exists() and int(nsid_file.read_text()) == nsid and Path("/dev", ns.name).exists():
                    return Path("/dev", ns.name)
        time.sleep(0.2)
    raise AssertionError(f"no block device for {nqn} nsid {nsid} over {transport} after {timeout}s")


def disconnect(nqn: str) -> None:
    subprocess.run(["nvme", "disconnect", "-n", nqn], capture_output=True, check=False)


def write_read_verify(device: Path, size: int = 4 << 20, seed: int = 1) -> str:
    """Write a pattern with O_DIRECT, read it back the same way, return its sha256 (raises on mismatch)."""
    data = hashlib.shake_256(f"nvmetd-{seed}".encode()).digest(size)
    import mmap

    buf = mmap.mmap(-1, size)
    buf.write(data)
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 0) == size
        os.fsync(fd)
        back = mmap.mmap(-1, size)
        assert os.preadv(fd, [back], 0) == size
    finally:
        os.close(fd)
    assert back[:] == data, f"data read back from {device} differs from what was written"
    return hashlib.sha256(data).hexdigest()


def direct_read(path: str | Path, size: int, offset: int = 0) -> bytes:
    """Read bypassing the page cache: nvmet writes bios under any cached copy of the backing device."""
    import mmap

    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return buf[:got]
