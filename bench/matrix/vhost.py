"""The vhost transport of the harness: fio inside a TCG guest whose /dev/nvme0n1 is the vhost-user-nvme device
(qemu_patches/) served by a vhost_nvme engine process on the disk's backing file; the guest runs its stock driver.

It runs on the host, not in the rig VM: the guest is itself a TCG VM, and one inside the rig's TCG VM would be too
slow to measure anything. It needs no nvmet, only backends/ (a file pool) and the patched QEMU.

The fair baseline for a guest-side path is not fio on the host's file: it is the same job in the same kind of guest
(same kernel, initramfs, QEMU binary, memory, one vCPU) on QEMU's own emulated `-device nvme` over the same backing
file. `baseline()` gives that, and the report says so. Both guests get fio and its libraries in their initramfs
(vhost_nvme.vm.build_initramfs(with_fio=True)); job files travel to the guest over its command port, so any job
file that runs on the host runs there unchanged.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bench.matrix import fio
from bench.matrix.disks import Disk, Site
from bench.matrix.transports import Attachment, Transport, TransportError

if TYPE_CHECKING:
    from vhost_nvme.vm import VM

GUEST_DEVICE = Path("/dev/nvme0n1")
FIO_ERR_MARK = "@@FIOERR"
# a lost command (killed engine) should not stall a benchmark for Linux's default 30 s
GUEST_APPEND = "nvme_core.io_timeout=10 nvme_core.admin_timeout=10"


def initramfs_cache() -> Path:
    """Per-user cache of the fio initramfs (~85 MiB, rebuilt only when fio, its libraries or the kernel change)."""
    return Path(tempfile.gettempdir()) / f"nvmetd-initramfs-{os.getuid()}"


def guest_fio_command(job_text: str, section: str, env: dict[str, str], tmp: str = "/tmp") -> str:
    """One shell line for the guest: write the job file, run fio, print its JSON, a marker, then its stderr.

    The exit status of the line is fio's. Values are quoted; the job file is sent as a quoted here-document.
    `tmp` is a directory of the guest (the tests run the same line on the host)."""
    if "\nFIOJOB\n" in f"\n{job_text}\n":
        raise fio.FioError("a job file may not contain a line 'FIOJOB'")
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.isidentifier())
    section_arg = f" --section={shlex.quote(section)}" if section else ""
    t = shlex.quote(tmp.rstrip("/") or "/")
    return (f"cat > {t}/job.fio <<'FIOJOB'\n{job_text.rstrip()}\nFIOJOB\n"
            # the guest's PATH is /bin (busybox); fio sits where the host keeps it
            f"cd {t} && env PATH=\"$PATH:/usr/bin:/usr/local/bin\" {assigns} fio --output-format=json "
            f"--output={t}/fio.json{section_arg} {t}/job.fio "
            f">{t}/fio.err 2>&1; rc=$?; cat {t}/fio.json; echo; echo {FIO_ERR_MARK}; cat {t}/fio.err; "
            f"rm -f {t}/fio.json {t}/fio.err; (exit $rc)")


def split_guest_output(out: str) -> tuple[str, str]:
    """(fio's JSON output, fio's stderr) from what guest_fio_command printed."""
    stdout, _, stderr = out.partition(FIO_ERR_MARK)
    return stdout, stderr


class GuestFio:
    """Runs fio job sections inside one guest: the `run_fio` of an Attachment."""

    def __init__(self, vm: VM, label: str) -> None:
        self.vm = vm
        self.label = label

    def __call__(self, path: Path, section: str, env: dict[str, str], *,
                 timeout: float | None = None) -> fio.FioRun:
        from vhost_nvme.vm import VMError

        command = guest_fio_command(path.read_text(), section, env)
        argv = [f"guest:{self.label}", "fio", "--output-format=json", *([f"--section={section}"] if section else []),
                str(path)]
        try:
            rc, out = self.vm.run(command, timeout=timeout or 1800)
        except VMError as exc:
            raise fio.FioError(f"fio in the {self.label} guest: {exc}") from None
        stdout, stderr = split_guest_output(out)
        return fio.parse_run(argv, rc, stdout, stderr)


class VhostTransport(Transport):
    """vhost-user-nvme in a TCG guest on this host; baseline: QEMU's emulated NVMe in the same kind of guest."""

    name = "vhost"
    needs_nvmet = False
    own_baseline = True
    baseline_label = ("QEMU's emulated -device nvme in the same kind of TCG guest (same kernel, initramfs, QEMU, "
                      "1 vCPU), on the same backing file")

    def __init__(self, memory: str = "1G", boot_timeout: float = 600, poll_us: int = 200) -> None:
        self.memory = memory
        self.boot_timeout = boot_timeout
        self.poll_us = poll_us
        self.qemu: Path | None = None

    def prepare(self) -> None:
        from vhost_nvme.vm import VMError, build_initramfs, guest_kernel, qemu_binary

        try:
            guest_kernel()
            self.qemu = qemu_binary(build=True)
            build_initramfs(initramfs_cache(), with_fio=True)
        except (VMError, OSError) as exc:
            raise TransportError(f"the vhost transport cannot run here: {exc}") from None
        if not (self.qemu.is_file() and os.access(self.qemu, os.X_OK)):
            raise TransportError(f"the patched QEMU {self.qemu} is missing (qemu_patches/build.sh)")

    @staticmethod
    def _backing_file(disk: Disk) -> Path:
        path = Path(disk.device_path)
        if not stat.S_ISREG(path.stat().st_mode):
            raise TransportError(f"the vhost transport serves files: use --backend file ({disk.backend} gives "
                                 f"{path})")
        return path

    def _vm(self, workdir: Path, **device: Path) -> VM:
        from vhost_nvme.vm import VM, VMError

        try:
            return VM(workdir, memory=self.memory, append=GUEST_APPEND, qemu=self.qemu,
                      boot_timeout=self.boot_timeout, with_fio=True, initramfs_dir=initramfs_cache(), **device)
        except VMError as exc:
            raise TransportError(f"the guest did not boot: {exc}") from None

    def attach(self, disk: Disk, site: Site, index: int) -> Attachment:
        from vhost_nvme.vm import EngineProcess, VMError

        image = self._backing_file(disk)
        workdir = site.workdir / f"vhost-{index}"
        workdir.mkdir(parents=True, exist_ok=True)
        sockdir = Path(tempfile.mkdtemp(prefix="vnb-"))  # a unix socket path has at most 107 bytes
        sock = sockdir / "engine.sock"
        try:
            engine = EngineProcess(sock, [image], name="bench", poll_us=self.poll_us, log=workdir / "engine.log")
        except VMError as exc:
            shutil.rmtree(sockdir, ignore_errors=True)
            raise TransportError(f"the vhost_nvme engine did not start: {exc}") from None
        try:
            vm = self._vm(workdir / "guest", engine_sock=sock)
        except BaseException:
            engine.stop()
            shutil.rmtree(sockdir, ignore_errors=True)
            raise

        def detach() -> None:
            try:
                vm.close()
            finally:
                engine.stop()
                shutil.rmtree(sockdir, ignore_errors=True)

        try:
            model = vm.check("cat /sys/class/nvme/nvme0/model")
        except VMError as exc:
            detach()
            raise TransportError(f"the guest has no NVMe controller on the engine: {exc}") from None
        return Attachment(self.name, GUEST_DEVICE, run_fio=GuestFio(vm, "vhost-user-nvme"), detach=detach,
                          details={"device": str(GUEST_DEVICE), "guest_model": model.strip(),
                                   "engine_socket": str(sock), "backing_file": str(image),
                                   "kernel_transport": "pcie", "where": "TCG guest on this host"})

    def baseline(self, disk: Disk, site: Site) -> Attachment:
        from vhost_nvme.vm import VMError

        image = self._backing_file(disk)
        vm = self._vm(site.workdir / "baseline-guest", emulated_image=image)
        try:
            model = vm.check("cat /sys/class/nvme/nvme0/model")
        except VMError as exc:
            vm.close()
            raise TransportError(f"the baseline guest has no NVMe controller: {exc}") from None
        return Attachment("baseline", GUEST_DEVICE, run_fio=GuestFio(vm, "emulated-nvme"),
                          detach=vm.close,
                          details={"device": str(GUEST_DEVICE), "guest_model": model.strip(),
                                   "backing_file": str(image), "kernel_transport": "pcie",
                                   "baseline": self.baseline_label})
