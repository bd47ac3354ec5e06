"""Boot Debian's 6.12 kernel under TCG in the patched QEMU, with the guest's stock nvme driver on either the
vhost-user-nvme device (served by a vhost_nvme engine process) or QEMU's own emulated ``-device nvme``.

The guest runs a small initramfs (busybox-static, the nvme modules, a static randread tool).  Its /init
reads shell lines from the second serial port and writes their output back there (``VM.run``); the kernel
console goes to a log file on the first port.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..client import EngineClient, Stats
from ..qemu_args import qemu_args

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "qemu_patches" / "build.sh"
DEFAULT_BUILD_DIR = REPO / ".build" / "qemu"
HERE = Path(__file__).resolve().parent
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios")
NVME_MODULES = ("nvme-auth", "nvme-core", "nvme")  # modprobe --show-depends nvme, in load order


class VMError(Exception):
    """The guest, QEMU or the engine did not behave (message says which, with the console tail)."""


# ---- inputs: QEMU binary, kernel, initramfs ---------------------------------------------------------------
def qemu_binary(build: bool = True) -> Path:
    """The patched QEMU: $NVMETD_QEMU, else qemu_patches/build.sh's output (built or refreshed if ``build``)."""
    env = os.environ.get("NVMETD_QEMU")
    if env:
        return Path(env)
    if build:
        out = subprocess.run([str(BUILD_SCRIPT)], check=False, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            raise VMError(f"{BUILD_SCRIPT} failed (exit {out.returncode}); see its output above")
        return Path(out.stdout.strip().splitlines()[-1])
    return Path(os.environ.get("QEMU_BUILD_DIR", DEFAULT_BUILD_DIR)) / "qemu-system-x86_64"


def guest_kernel() -> tuple[Path, Path]:
    """(vmlinuz, /lib/modules/<release>) of the newest installed 6.12 kernel."""
    kernels = sorted(Path("/boot").glob("vmlinuz-6.12.*-amd64"))
    for vmlinuz in reversed(kernels):
        mods = Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-")
        if mods.is_dir():
            return vmlinuz, mods
    raise VMError("no /boot/vmlinuz-6.12.*-amd64 with modules (scripts/setup installs linux-image-6.12-amd64)")


def _module_file(mods: Path, name: str) -> Path:
    hits = [p for p in mods.rglob(f"{name}.ko*") if p.name in (f"{name}.ko", f"{name}.ko.xz", f"{name}.ko.zst")]
    if not hits:
        raise VMError(f"module {name} not found under {mods}")
    return hits[0]


def _decompress(path: Path) -> bytes:
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads (ldd), the dynamic loader included, as the paths the loader opens."""
    try:
        out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise VMError(f"ldd {binary} failed: {exc}") from None
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(Path(parts[parts.index("=>") + 1]))
        elif parts and parts[0].startswith("/"):  # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
            libs.append(Path(parts[0]))
        elif "not found" in line:
            raise VMError(f"{binary} needs a library this host lacks: {line.strip()}")
    return libs


def build_initramfs(dest_dir: Path, with_fio: bool = False) -> Path:
    """busybox-static + the nvme modules (decompressed) + /init + randread; cached by the inputs' hash.

    ``with_fio``: also /usr/bin/fio and every shared library it loads (at the paths the loader looks for them), so
    the same fio job files run in the guest as on the host.  That image is written uncompressed: the guest (TCG)
    would spend longer inflating ~80 MiB of libraries than copying them."""
    _, mods = guest_kernel()
    busybox = Path("/bin/busybox")
    if not busybox.exists() or b"/lib64/ld-linux" in busybox.read_bytes():
        raise VMError("/bin/busybox is missing or not static (install busybox-static)")
    modules = [_module_file(mods, m) for m in NVME_MODULES]
    extra: list[Path] = []
    if with_fio:
        fio = Path(shutil.which("fio") or "/usr/bin/fio")
        if not fio.is_file():
            raise VMError("fio is not installed on this host (apt install fio)")
        extra = [fio, *shared_libraries(fio)]
    inputs = [busybox, HERE / "init.sh", HERE / "randread.c", *modules, *extra]
    digest = hashlib.sha256()
    for f in inputs:
        digest.update(str(f).encode() + f.read_bytes())
    out = dest_dir / f"initramfs-{digest.hexdigest()[:16]}.cpio{'' if with_fio else '.gz'}"
    if out.exists():
        return out
    dest_dir.mkdir(parents=True, exist_ok=True)
    stage = dest_dir / f".stage-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
        (stage / d).mkdir(parents=True)
    shutil.copy2(busybox, stage / "bin" / "busybox")
    (stage / "bin" / "sh").symlink_to("busybox")
    shutil.copy2(HERE / "init.sh", stage / "init")
    (stage / "init").chmod(0o755)
    for name, path in zip(NVME_MODULES, modules, strict=True):
        (stage / "lib" / "modules" / f"{name}.ko").write_bytes(_decompress(path))
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(stage / "bin" / "randread"), str(HERE / "randread.c")],
                   check=True)
    for path in extra:  # fio and its libraries, where the dynamic loader expects them (symlinks resolved)
        dest = stage / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)
    files = subprocess.run(["find", "."], cwd=stage, check=True, capture_output=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=files, check=True,
                          capture_output=True).stdout
    tmp = out.with_suffix(f".{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(cpio if with_fio else
                subprocess.run(["gzip", "-1", "-n"], input=cpio, check=True, capture_output=True).stdout)
    tmp.rename(out)
    shutil.rmtree(stage, ignore_errors=True)
    return out


# ---- the engine as its own process ------------------------------------------------------------------------
class EngineProcess:
    """``python -m vhost_nvme.engine`` on a socket; restartable (same socket, same namespaces)."""

    def __init__(self, sock: Path, namespaces: list[Path], name: str = "vmtest", dbbuf: bool = True,
                 poll_us: int | None = None, log: Path | None = None, extra: list[str] | None = None) -> None:
        """poll_us=None: the engine's default (an adaptive poll window)."""
        self.sock = sock
        self.argv = [sys.executable, "-m", "vhost_nvme.engine", "--socket", str(sock), "--name", name,
                     "--policy", "psync", *(extra or [])]
        if poll_us is not None:
            self.argv += ["--poll-us", str(poll_us)]
        for ns in namespaces:
            self.argv += ["--ns", str(ns)]
        if not dbbuf:
            self.argv.append("--no-dbbuf")
        self.log = log or sock.with_suffix(".log")
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=logf, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise VMError(f"engine exited ({self.proc.wait()}) before it was ready; log {self.log}:\n"
                              + self.log.read_text()[-2000:])
            if line.startswith("ready "):
                return
        raise VMError("engine did not become ready in 60 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def stats(self) -> Stats:
        return EngineClient(self.sock).stats()

    def attach(self, nsid: int, path: Path, name: str = "") -> None:
        """NS_ATTACH through the protocol, as the management plane does (backing fd by SCM_RIGHTS)."""
        EngineClient(self.sock).attach(nsid, path, name)


# ---- the VM -----------------------------------------------------------------------------------------------
class VM:
    """One TCG guest; ``run()`` executes a shell line in it and returns (exit status, output)."""

    def __init__(self, workdir: Path, *, engine_sock: Path | None = None, emulated_image: Path | None = None,
                 device_args: list[str] | None = None, memory: str = "512M", append: str = "",
                 qemu: Path | None = None, boot_timeout: float = 120, with_fio: bool = False,
                 initramfs_dir: Path | None = None) -> None:
        """``device_args``: the storage arguments as given (e.g. by `nvmetctl attach --transport vhost
        --memory`), which must then include the VM's shared memory backend."""
        if sum(x is not None for x in (engine_sock, emulated_image, device_args)) != 1:
            raise ValueError("give exactly one of engine_sock (vhost-user-nvme), emulated_image (-device nvme) "
                             "or device_args")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.console = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        vmlinuz, _ = guest_kernel()
        initrd = build_initramfs(initramfs_dir or workdir.parent / "initramfs", with_fio)
        argv = [str(qemu or qemu_binary()), *[a for d in FIRMWARE_DIRS for a in ("-L", d)],
                "-machine", "q35", "-accel", "tcg", "-m", memory, "-smp", "1", "-nodefaults", "-display", "none",
                "-no-reboot", "-monitor", "none", "-kernel", str(vmlinuz), "-initrd", str(initrd),
                # no_timer_check: under TCG on a loaded host the IO-APIC timer check can fail and panic the boot
                "-append", f"console=ttyS0 panic=-1 loglevel=4 no_timer_check {append}".strip(),
                "-serial", f"file:{self.console}", "-serial", "stdio"]
        if engine_sock is not None:
            argv += qemu_args(str(engine_sock), memory=memory)
        elif device_args is not None:
            argv += device_args
        else:
            # the host page cache, as the engine (psync on the file) uses it
            argv += ["-drive", f"if=none,id=d0,file={emulated_image},format=raw,cache=writeback,aio=threads",
                     "-device", "nvme,serial=emulated0,drive=d0"]
        self.argv = argv
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seq = 0
        with open(self.qemu_log, "w") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.boot_line = self._expect("@@READY", boot_timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _tail(self) -> str:
        parts = []
        for f in (self.console, self.qemu_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {f.name} (tail) ---\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def _expect(self, prefix: str, timeout: float, collect: list[str] | None = None) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMError(f"no {prefix!r} from the guest within {timeout:.0f} s\n{self._tail()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise VMError(f"QEMU exited ({self.proc.wait()}) while waiting for {prefix!r}\n{self._tail()}")
            at = line.find(prefix)
            if at >= 0:  # output without a final newline shares the marker's line
                if at and collect is not None:
                    collect.append(line[:at])
                return line[at:]
            if collect is not None:
                collect.append(line)

    def start(self, command: str) -> int:
        """Send a shell line without waiting; ``wait(seq)`` collects it."""
        assert self.proc.stdin is not None
        self._seq += 1
        self.proc.stdin.write(f"{command}\necho \"@@END{self._seq} $?\"\n")
        self.proc.stdin.flush()
        return self._seq

    def expect(self, prefix: str, timeout: float = 120) -> str:
        """Wait for a line of a running command's output (lines before it are dropped from that output)."""
        return self._expect(prefix, timeout, [])

    def wait(self, seq: int, timeout: float = 120) -> tuple[int, str]:
        out: list[str] = []
        line = self._expect(f"@@END{seq} ", timeout, out)
        return int(line.split()[1]), "\n".join(out)

    def run(self, command: str, timeout: float = 120) -> tuple[int, str]:
        return self.wait(self.start(command), timeout)

    def check(self, command: str, timeout: float = 120) -> str:
        rc, out = self.run(command, timeout)
        if rc != 0:
            raise VMError(f"guest command failed ({rc}): {command}\n{out}\n{self._tail()}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("sync; poweroff -f\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
