"""Boot the rig VM with virtme-ng and run one command in it.

One boot serves a whole test session: the caller passes the complete command (e.g. a pytest run), not one test.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from rig.drives import DRIVES_ENV, Drives, for_run

REPO = Path(__file__).resolve().parent.parent
GUEST_INIT = REPO / "rig" / "guest-init.sh"
LEASH = REPO / "rig" / "leash.py"
KERNEL_GLOB = "vmlinuz-6.12.*-amd64"
# Environment variables the guest command inherits; everything else stays on the host.
PASSED_ENV = ("CI", "NVMETD_", "PYTEST_ADDOPTS", "BENCH_")
# Where the guest's pytest names the test it is running (tests/conftest.py), so a timeout can say which one hung.
PROGRESS_ENV = "NVMETD_RIG_PROGRESS"
# On a shared development machine, at most this many rig VMs boot at once (unset: no limit; CI runs one).
SLOTS_ENV = "NVMETD_RIG_SLOTS"


class RigError(Exception):
    """The rig cannot boot: a missing kernel, qemu or virtme-ng. Says what to install."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def find_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest installed Debian 6.12 kernel image; its modules come from the shared host root."""
    found = sorted(boot.glob(KERNEL_GLOB), key=_version_key)
    if not found:
        raise RigError(f"no {boot}/{KERNEL_GLOB}: run `make setup` (installs linux-image-6.12-amd64)")
    kernel = found[-1]
    release = kernel.name.removeprefix("vmlinuz-")
    if not Path("/lib/modules", release, "modules.dep").exists():
        raise RigError(f"modules for {release} are missing under /lib/modules: run `make setup`")
    return kernel


def host_has_nvmet() -> bool:
    """True when this host's own kernel serves nvmet, so kernel tests can run here without a VM."""
    if Path("/sys/kernel/config/nvmet").is_dir():
        return True
    if os.geteuid() != 0 or not Path("/sys/kernel/config").is_dir() or shutil.which("modprobe") is None:
        return False
    subprocess.run(["modprobe", "-q", "nvmet"], check=False, capture_output=True)
    return Path("/sys/kernel/config/nvmet").is_dir()


def _vng() -> str:
    candidate = Path(sys.executable).parent / "vng"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("vng")
    if found is None:
        raise RigError("virtme-ng (vng) is not installed: run `make setup`")
    return found


def guest_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}


def build_argv(command: list[str], memory: str, cpus: int, workdir: Path, progress: Path | None = None,
               drives: Drives | None = None) -> list[str]:
    """The vng argv. The guest command goes through rig/guest-init.sh, which prepares configfs and udev.
    `progress` is a file in the shared repo where the guest's pytest writes the test it is running (conftest.py);
    `drives` are emulated NVMe drives the guest finds by serial (rig/drives.py)."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RigError("qemu-system-x86_64 is not installed: run `make setup`")
    mounts = ":".join(f"nvmetd_py{i}={p}" for i, p in enumerate(python_dirs()))
    env = [f"{k}={v}" for k, v in sorted(guest_env().items())] + [f"NVMETD_RIG_MOUNTS={mounts}"]
    if progress is not None:
        env.append(f"{PROGRESS_ENV}={progress}")
    if drives is not None:
        env.append(f"{DRIVES_ENV}={','.join(drives.serials())}")
    inner = ["env", *env, "bash", str(GUEST_INIT), str(workdir), *command]
    return [
        _vng(),
        "--run", str(find_kernel()),
        "--disable-kvm",
        "--memory", memory,
        "--cpus", str(cpus),
        "--rwdir", str(REPO),
        "--append", "nvme_core.multipath=N",  # one block device per controller
        "--exec", shlex.join(inner),
        *cached_python_mounts(),  # qemu options: must come last
        *(f"--qemu-opts={token}" for token in (drives.qemu_opts() if drives else [])),
    ]


def python_dirs() -> list[Path]:
    """The interpreter's installation and the virtualenv: what every test process imports from."""
    dirs = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    return sorted(d for d in dirs if d != Path("/"))


def cached_python_mounts() -> list[str]:
    """virtme-ng shares the host root over 9p without caching, so each Python import is a round of lookups over
    virtio: a FastAPI app took minutes to import under TCG. The Python trees are read-only for the guest, so they
    are exported again as their own 9p devices, which guest-init.sh mounts with cache=loose over the same paths."""
    opts: list[str] = []
    for i, path in enumerate(python_dirs()):
        opts += ["-fsdev", f"local,id=nvpy{i},path={path},security_model=none,readonly=on,multidevs=remap",
                 "-device", f"virtio-9p-pci,fsdev=nvpy{i},mount_tag=nvmetd_py{i}"]
    return [f"--qemu-opts={token}" for token in opts]  # `=`: the tokens start with a dash


def run(command: list[str], memory: str = "3G", cpus: int = 2, timeout: float = 3600,
        workdir: Path = REPO) -> int:
    """Run `command` in the rig VM (or directly, when this host has nvmet) and return its exit status."""
    if host_has_nvmet():
        return subprocess.run(command, cwd=workdir, check=False).returncode
    progress = REPO / ".rig" / f"progress-{os.getpid()}"
    progress.parent.mkdir(exist_ok=True)
    progress.unlink(missing_ok=True)
    drives = for_run(REPO)
    try:
        if drives is not None:
            drives.create()
        argv = build_argv(command, memory, cpus, workdir, progress, drives)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        with rig_slot(os.environ.get(SLOTS_ENV, "")):
            if drives is not None:
                drives.start_relay()
            return supervise(argv, {**os.environ, "PATH": path}, timeout, progress)
    finally:
        if drives is not None:
            drives.remove()  # the images are per boot


@contextlib.contextmanager
def rig_slot(slots: str, lock_dir: Path = Path("/tmp")):
    """Hold one of `slots` machine-wide VM slots while the rig runs.

    TCG VMs share the host's cores: two cores running eight VMs made one test take eight minutes, and the runs'
    timeouts fired on work that was only starved. An flock dies with its holder, so a killed run frees its slot."""
    if not slots:
        yield
        return
    count = max(1, int(slots))
    files = [open(lock_dir / f"nvmetd-rig-slot.{i}", "a") for i in range(count)]  # noqa: SIM115
    try:
        announced = False
        while True:
            for handle in files:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                yield
                return
            if not announced:
                print(f"rig: waiting for one of {count} VM slots ({SLOTS_ENV})", file=sys.stderr, flush=True)
                announced = True
            threading.Event().wait(2)
    finally:
        for handle in files:
            handle.close()


def supervise(argv: list[str], env: dict[str, str], timeout: float, progress: Path) -> int:
    """Run the VM's argv, relay its output, and on timeout kill its whole process group (exit 124), naming the test
    `progress` says was running.

    qemu's stdio chardev would truncate a redirected stdout (losing what the caller printed before), so the
    guest's output is relayed through a pipe instead. vng runs in a session of its own: on timeout the whole
    group goes (vng, QEMU and its helpers); killing vng alone once left QEMU running the VM to its end. The
    group's leader is rig/leash.py, which takes the group down when this process dies without running any code."""
    leashed = [sys.executable, str(LEASH), str(os.getpid()), "--", *argv]
    proc = subprocess.Popen(leashed, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fired = threading.Event()

    def kill_vm() -> None:
        fired.set()
        kill_group(proc.pid)

    timer = threading.Timer(timeout, kill_vm)
    timer.start()
    try:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        status = proc.wait()
    finally:
        timer.cancel()
        kill_group(proc.pid)  # whatever of the VM is left (after ^C in the caller, or a timeout): never leave one
    running = progress.read_text().strip() if progress.exists() else ""
    progress.unlink(missing_ok=True)
    if fired.is_set():
        where = f"; it was running {running}" if running else "; no test had started"
        print(f"rig: the VM did not finish within {timeout:.0f} s and was killed (QEMU included){where}",
              file=sys.stderr)
        return 124
    return status


def kill_group(pgid: int) -> None:
    """SIGKILL a process group; it may be gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
