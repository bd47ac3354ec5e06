"""`make demo`: the nvmetd service gives a VM a disk over NVMe/TCP; the VM's identity connects and verifies I/O.

Runs as root on a kernel with nvmet (`make demo` boots the 6.12 rig VM when this host's kernel lacks it). Every
step is what an operator (or an orchestrator) would do: start nvmetd, create a pool and a disk, attach it to a VM
with nvmetctl, connect with the VM's host NQN and DH-CHAP key, detach, delete, stop. Each is printed as it happens.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from nvmetd import initiator
from target.configfs import NVMET_ROOT

DISK_SIZE = "256M"
IO_SIZE = 32 << 20
VM = "demo-vm"
DISK = "disk0"


class DemoFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(display: str, argv: list[str], env: dict[str, str] | None = None) -> str:
    print(f"$ {display}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        print(out, flush=True)
    if proc.returncode != 0:
        raise DemoFailed(f"`{display}` failed with exit code {proc.returncode}")
    return proc.stdout


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.state = work / "state" / "state.json"
        self.socket = work / "run" / "nvmetd.sock"
        self.pools = work / "pools"
        self.keys = work / "keys"
        self.files = work / "files"
        self.config = work / "nvmetd.toml"
        self.log = work / "nvmetd.log"
        self.daemon: subprocess.Popen[bytes] | None = None

    def nvmetctl(self, *args: str) -> str:
        argv = [sys.executable, "-m", "nvmetd.cli", "--state", str(self.state), "--socket", str(self.socket),
                "--pools-root", str(self.pools), *args]
        return run("nvmetctl " + " ".join(args), argv)

    def start_daemon(self) -> None:
        self.config.write_text("")  # defaults: VM subsystems exported over NVMe/TCP on 127.0.0.1:4420
        args = ["--state", str(self.state), "--socket", str(self.socket), "--pools-root", str(self.pools),
                "--keys-dir", str(self.keys), "--config", str(self.config), "--restore-timeout", "5"]
        print(f"$ nvmetd {' '.join(args)} &", flush=True)
        started = time.monotonic()
        with open(self.log, "wb") as out:
            self.daemon = subprocess.Popen([sys.executable, "-m", "nvmetd.service", *args], stdout=out,
                                           stderr=subprocess.STDOUT)
        import httpx

        deadline = started + 300  # a FastAPI import under TCG emulation takes a while
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise DemoFailed(f"nvmetd exited with code {self.daemon.returncode}:\n{self.log.read_text()}")
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=10) as client:
                    client.get("http://nvmetd/v1/status").raise_for_status()
                break
            except (httpx.HTTPError, OSError):
                time.sleep(0.25)
        else:
            raise DemoFailed(f"nvmetd did not answer within 300 s:\n{self.log.read_text()}")
        print(f"nvmetd (pid {self.daemon.pid}) answers on {self.socket} after {time.monotonic() - started:.1f} s",
              flush=True)

    def stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()


def direct_io(path: Path, data: bytes | None, size: int) -> bytes:
    """O_DIRECT write (if data) and read back through an aligned buffer: the bytes really went to the device."""
    buf = mmap.mmap(-1, size)
    fd = os.open(path, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf.write(data)
            if os.pwritev(fd, [buf], 0) != size:
                raise DemoFailed("short write")
            os.fsync(fd)
            buf.seek(0)
        if os.preadv(fd, [buf], 0) != size:
            raise DemoFailed("short read")
    finally:
        os.close(fd)
    return buf[:]


def tree_summary() -> str:
    counts = {d: len(list((NVMET_ROOT / d).iterdir())) if (NVMET_ROOT / d).is_dir() else 0
              for d in ("subsystems", "hosts", "ports")}
    return ", ".join(f"{n} {d}" for d, n in counts.items())


def demo(d: Demo) -> None:
    step("start nvmetd with its own state file, API socket, keys and pools (nothing under /var/lib or /run/nvmetd)")
    d.start_daemon()

    step("create a file pool (a directory on tmpfs) and a 256 MiB thin disk in it")
    run(f"mkdir {d.files}", ["mkdir", "-m", "0700", str(d.files)])
    d.nvmetctl("pool", "create", "files", "--kind", "file", str(d.files))
    d.nvmetctl("disk", "create", DISK, "--pool", "files", "--size", DISK_SIZE)

    step(f"attach {DISK} to VM {VM!r} over NVMe/TCP: nvmetd creates the VM's subsystem, host entry and key")
    attach = json.loads(d.nvmetctl("--json", "attach", VM, DISK, "--transport", "tcp"))
    key_file = Path(attach["dhchap_key_file"])
    print(f"connection parameters: trtype={attach['transport']} traddr={attach['traddr']} "
          f"trsvcid={attach['trsvcid']}\n  subnqn={attach['subsystem_nqn']}\n  hostnqn={attach['host_nqn']}\n"
          f"  nsid={attach['nsid']}, DH-CHAP key in {key_file} (mode {key_file.stat().st_mode & 0o777:o})")
    d.nvmetctl("status")

    step(f"connect as {VM} (its host NQN and DH-CHAP key) with libnvme")
    conn = initiator.connect(attach["subsystem_nqn"], attach["host_nqn"], "tcp", attach["traddr"],
                             attach["trsvcid"], dhchap_key=key_file.read_text().strip())
    try:
        device = conn.device(attach["nsid"])
        print(f"connected: controller {conn.controller}, namespace {attach['nsid']} is {device}")
        step(f"write {IO_SIZE >> 20} MiB of random data with O_DIRECT and read it back")
        data = os.urandom(IO_SIZE)
        start = time.monotonic()
        back = direct_io(device, data, IO_SIZE)
        elapsed = time.monotonic() - start
        want, got = hashlib.sha256(data).hexdigest(), hashlib.sha256(back).hexdigest()
        print(f"written sha256 {want}\nread    sha256 {got}\n{2 * IO_SIZE / elapsed / 1e6:.0f} MB/s "
              "(under TCG emulation: context only)")
        if want != got:
            raise DemoFailed("the data read back differs from what was written")
    finally:
        conn.disconnect()
    backing = json.loads(d.nvmetctl("--json", "disk", "show", DISK))["device_path"]
    on_volume = hashlib.sha256(direct_io(Path(backing), None, IO_SIZE)).hexdigest()
    print(f"backing volume {backing}: sha256 {on_volume} ({'same' if on_volume == want else 'DIFFERENT'})")
    if on_volume != want:
        raise DemoFailed("the backing volume does not hold what was written")

    step("another host NQN is refused by the kernel, even holding this VM's key")
    stranger = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
    try:
        initiator.connect(attach["subsystem_nqn"], stranger, "tcp", attach["traddr"], attach["trsvcid"],
                          dhchap_key=key_file.read_text().strip()).disconnect()
    except initiator.InitiatorError as exc:
        print(f"refused as expected: {exc}")
    else:
        raise DemoFailed(f"{stranger} connected to {VM}'s subsystem")

    step("detach, delete the disk: nvmetd removes the VM's subsystem, host and port from the kernel")
    d.nvmetctl("detach", VM, DISK)
    d.nvmetctl("disk", "delete", DISK)
    d.nvmetctl("status")
    d.nvmetctl("pool", "destroy", "files")

    step("stop nvmetd")
    d.stop_daemon()
    print(f"nvmetd exited with code {d.daemon.returncode if d.daemon else '?'}; nvmet tree: {tree_summary()}")


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root and a kernel with nvmet; run `make demo`, which boots the rig VM", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nvmetd-demo-", dir="/run"))  # tmpfs: see shared notes on overlay files
    d = Demo(work)
    try:
        demo(d)
    except (DemoFailed, initiator.InitiatorError) as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        if d.log.exists():
            print(f"--- nvmetd log ---\n{d.log.read_text()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        d.stop_daemon()
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo: OK — nvmetd gave a VM a disk over NVMe/TCP with its own host NQN and DH-CHAP key; "
          "the data verified on the device and in the backing volume; a stranger was refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
