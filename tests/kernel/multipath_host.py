"""The host side of native NVMe multipath in the rig: nvme_core reloaded with multipath=Y (the rig boots with
multipath=N so other tests get one device per controller), the shared head device, each path's ANA state.

`multipath` is a read-only parameter of nvme_core, so it changes only by reloading the module, and every module
that holds it goes first: the host transports, the PCI driver of the rig's drives, and nvmet itself (its passthru
uses nvme_core) with its transports and nvmet-vhost. So the nvmet tree must be empty and its owner stopped
(`target_restarted_with` in test_rbd stops nvmetd, which restores its tree when started again)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYS_SUBSYS = Path("/sys/class/nvme-subsystem")
SYS_NVME = Path("/sys/class/nvme")
SYS_MODULE = Path("/sys/module")


def multipath() -> bool:
    return (SYS_MODULE / "nvme_core/parameters/multipath").read_text().strip() == "Y"


def holders_first(module: str) -> list[str]:
    """`module` and every module holding it, directly or not, each after all of its own holders: the order in
    which they can be unloaded one at a time."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for holder in sorted(p.name for p in (SYS_MODULE / name / "holders").glob("*")):
            visit(holder)
        order.append(name)

    visit(module)
    return order


def reload_nvme_core(native: bool) -> None:
    """nvme_core with multipath=Y (native) or N; what held it is loaded again after."""
    subprocess.run(["nvme", "disconnect-all"], capture_output=True, check=False)
    stack = holders_first("nvme_core") if (SYS_MODULE / "nvme_core").exists() else ["nvme_core"]
    proc = _modprobe("-r", *stack)
    assert proc.returncode == 0, f"cannot unload {stack}: {proc.stderr.strip()} ({_holders(stack)})"
    _modprobe("nvme_core", f"multipath={'Y' if native else 'N'}", check=True)
    again = [m for m in stack if m != "nvme_core"]
    _modprobe("-a", *again, "nvme_fabrics", "nvme_tcp", "nvme_loop", check=True)
    subprocess.run(["udevadm", "settle", "--timeout", "60"], check=False)
    assert multipath() == native


def _modprobe(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
    """modprobe, bounded even when it sleeps uninterruptibly in a module's exit (subprocess.run's timeout kills and
    then waits for it forever): on timeout the kernel's blocked tasks are dumped (sysrq w) into the assertion."""
    proc = subprocess.Popen(["modprobe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Path("/proc/sysrq-trigger").write_text("w")
        log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
        raise AssertionError(f"modprobe {' '.join(args)} still running after {timeout:g} s (pid {proc.pid}, "
                             f"{_state(proc.pid)}); blocked tasks:\n{log[-12000:]}") from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"modprobe {' '.join(args)}: exit {proc.returncode}: {err.strip()}")
    return result


def _state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "gone"
    return f"{next(line for line in status.splitlines() if line.startswith('State:'))}, wchan {wchan}"


def _holders(modules: list[str]) -> str:
    """What pins the stack: each module's use count, and the processes holding a device file open (an open
    /dev/vhost-nvme holds nvmet-vhost)."""
    counts = {m: (SYS_MODULE / m / "refcnt").read_text().strip() for m in modules
              if (SYS_MODULE / m / "refcnt").exists()}
    opened = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("/dev/vhost-nvme", "/dev/nvme")):
            opened.add(f"pid {fd.parts[2]}: {target}")
    return f"use counts {counts}; open: {sorted(opened) or 'none'}"


@contextmanager
def native_multipath() -> Iterator[None]:
    """nvme_core with multipath=Y for the block, then back as it was (nothing may hold nvmet meanwhile)."""
    before = multipath()
    reload_nvme_core(True)
    try:
        yield
    finally:
        reload_nvme_core(before)


def head_device(nqn: str, nsid: int, timeout: float = 30.0) -> Path:
    """The multipath head (/dev/nvmeXnY) of namespace `nsid`: one block device for all paths to the subsystem."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sub in SYS_SUBSYS.glob("nvme-subsys*"):
            if (sub / "subsysnqn").read_text().strip() != nqn:
                continue
            for head in sub.glob("nvme*n*"):
                if (head / "nsid").exists() and int((head / "nsid").read_text()) == nsid \
                        and Path("/dev", head.name).exists():
                    return Path("/dev", head.name)
        time.sleep(0.2)
    raise AssertionError(f"no multipath head for {nqn} nsid {nsid} after {timeout:.0f} s")


def paths(nqn: str) -> dict[str, dict[str, str]]:
    """Per controller of `nqn`, keyed by its trsvcid: controller state, and the ANA state and I/O count of its path
    to the namespace (`nvmeXcYnZ`), as the host reads them."""
    found = {}
    for ctrl in SYS_NVME.glob("nvme*"):
        try:
            if (ctrl / "subsysnqn").read_text().strip() != nqn:
                continue
            address = dict(kv.split("=", 1) for kv in (ctrl / "address").read_text().strip().split(",") if "=" in kv)
            entry = {"ctrl": ctrl.name, "state": (ctrl / "state").read_text().strip()}
            for path in ctrl.glob("nvme*c*n*"):
                entry["ana_state"] = (path / "ana_state").read_text().strip()
                entry["ios"] = str(sum(int(f) for f in (path / "stat").read_text().split()[0:5:4]))  # reads+writes
        except OSError:
            continue
        found[address.get("trsvcid", "?")] = entry
    return found
