"""`make demo`: nvmetd exports a file-backed disk, a host connects over NVMe/TCP and verifies I/O.

Runs as root on a kernel with nvmet (`make demo` boots the 6.12 rig VM when this host's kernel lacks it). Every
step goes through the same commands an operator would type, and is printed as it happens.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from nvmetd import initiator

DISK_SIZE = 256 << 20
IO_SIZE = 32 << 20


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def nvmetctl(state: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "nvmetd.cli", "--state", str(state), *args]
    print("$ nvmetctl " + " ".join(args), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    print((proc.stdout + proc.stderr).rstrip(), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: nvmetctl {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def direct_io(path: Path, data: bytes | None, size: int) -> bytes:
    buf = mmap.mmap(-1, size)
    fd = os.open(path, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf.write(data)
            if os.pwritev(fd, [buf], 0) != size:
                raise SystemExit("demo: short write")
            os.fsync(fd)
            buf.seek(0)
        if os.preadv(fd, [buf], 0) != size:
            raise SystemExit("demo: short read")
    finally:
        os.close(fd)
    return buf[:]


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root and a kernel with nvmet; run `make demo`, which boots the rig VM", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nvmetd-demo-", dir="/run"))
    state_file = work / "state.json"
    hostnqn = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
    subnqn = "nqn.2026-11.io.nvmetd:demo-disk0"
    try:
        step("create a 256 MiB sparse file as the disk")
        disk = work / "disk0.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        print(f"{disk}: {DISK_SIZE >> 20} MiB, {os.stat(disk).st_blocks * 512} bytes allocated")

        step("declare the export: one subsystem, only this host allowed, NVMe/TCP on 127.0.0.1:4420")
        desired = {
            "hosts": [{"nqn": hostnqn}],
            "subsystems": [{"nqn": subnqn, "allowed_hosts": [hostnqn], "model": "nvmetd demo",
                            "namespaces": [{"nsid": 1, "device_path": str(disk)}]}],
            "ports": [{"id": 1, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420",
                       "subsystems": [subnqn]}],
        }
        (work / "desired.json").write_text(json.dumps(desired, indent=2))
        print(json.dumps(desired, indent=2))
        nvmetctl(state_file, "apply", str(work / "desired.json"))
        nvmetctl(state_file, "apply", str(work / "desired.json"))  # idempotent: zero changes the second time
        nvmetctl(state_file, "status")

        step("connect as the host over NVMe/TCP (libnvme)")
        conn = initiator.connect(subnqn, hostnqn, "tcp", "127.0.0.1", "4420")
        device = conn.device(1)
        print(f"connected: controller {conn.controller}, namespace 1 is {device}")
        try:
            step(f"write {IO_SIZE >> 20} MiB of random data with O_DIRECT and read it back")
            data = os.urandom(IO_SIZE)
            start = time.monotonic()
            back = direct_io(device, data, IO_SIZE)
            elapsed = time.monotonic() - start
            want, got = hashlib.sha256(data).hexdigest(), hashlib.sha256(back).hexdigest()
            print(f"written sha256 {want}\nread    sha256 {got}\n{2 * IO_SIZE / elapsed / 1e6:.0f} MB/s "
                  "(under TCG emulation: context only)")
            if want != got:
                print("demo: FAILED: data read back differs", file=sys.stderr)
                return 1
        finally:
            conn.disconnect()
        on_file = hashlib.sha256(direct_io(disk, None, IO_SIZE)).hexdigest()
        print(f"backing file sha256 {on_file} ({'same' if on_file == want else 'DIFFERENT'})")
        if on_file != want:
            return 1

        step("a host that is not allowed is refused by the kernel")
        stranger = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
        try:
            initiator.connect(subnqn, stranger, "tcp", "127.0.0.1", "4420").disconnect()
            print("demo: FAILED: a stranger connected", file=sys.stderr)
            return 1
        except initiator.InitiatorError as exc:
            print(f"refused as expected: {exc}")

        step("remove the export: the tree is empty again")
        (work / "empty.json").write_text("{}")
        nvmetctl(state_file, "apply", str(work / "empty.json"))
        print("\ndemo: OK — exported a file-backed disk over NVMe/TCP, verified I/O end to end")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
