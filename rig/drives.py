"""Emulated NVMe drives for the rig, and a way for the guest to hot-remove and re-add them.

Each drive is QEMU's own `-device nvme` (a real PCIe NVMe controller to the guest kernel, with its own serial) on a
small sparse raw file, behind a `pcie-root-port` of its own: q35's root bus cannot hot-unplug, a root port can.
The images are `-blockdev` nodes rather than `-drive`s, so `device_del` leaves the node in place and a later
`device_add` puts the same drive (same data) back.

The guest reaches QEMU's monitor through a virtio-serial port (`/dev/virtio-ports/nvmetd.qmp`). The host side
holds the real QMP session and relays it: it forwards QEMU's output (replies and events) as is, and passes on only
the guest's commands that act on the rig's own drives (device_del/device_add of an `nvmetd-drive*` id, and queries),
so a test can pull a drive but cannot stop or reconfigure the VM that runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DRIVES_ENV = "NVMETD_RIG_DRIVES"  # in the guest: the drives' serials, comma-separated
COUNT_ENV = "NVMETD_RIG_DRIVE_COUNT"  # on the host: how many drives to give the VM (0: none)
QMP_PORT = "nvmetd.qmp"  # the virtio-serial port's name in the guest
DEFAULT_COUNT = 3
DRIVE_BYTES = 128 << 20  # sparse: a drive costs what tests write to it
ID_PREFIX = "nvmetd-drive"
ALLOWED = {"device_del", "device_add", "query-pci", "query-block", "query-named-block-nodes", "qom-list"}
CHASSIS_BASE = 0x20  # pcie-root-port chassis numbers must be unique in the machine


def drive_id(index: int) -> str:
    """The QEMU device id and the NVMe serial of drive `index` (the guest finds a drive by this serial)."""
    return f"{ID_PREFIX}{index}"


def node_name(index: int) -> str:
    return f"nvmetd-node{index}"


def port_id(index: int) -> str:
    return f"nvmetd-rp{index}"


def device_arguments(index: int) -> dict[str, str]:
    """The `device_add` arguments that (re)create drive `index`: the same in the boot argv and in a re-add."""
    return {"driver": "nvme", "id": drive_id(index), "serial": drive_id(index), "drive": node_name(index),
            "bus": port_id(index)}


def _device_opt(args: dict[str, str]) -> str:
    return ",".join([args["driver"], *(f"{k}={v}" for k, v in args.items() if k != "driver")])


@dataclass
class Drives:
    """The drive images and QMP sockets of one rig run, all under `root` (created here, removed by `remove`)."""

    root: Path
    count: int = DEFAULT_COUNT
    size: int = DRIVE_BYTES
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def guest_socket(self) -> Path:
        return self.root / "guest.sock"

    def image(self, index: int) -> Path:
        return self.root / f"drive{index}.img"

    def serials(self) -> list[str]:
        return [drive_id(i) for i in range(self.count)]

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for i in range(self.count):
            with open(self.image(i), "wb") as img:
                img.truncate(self.size)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def qemu_opts(self) -> list[str]:
        """QEMU arguments: the drives behind their root ports, the host's QMP socket, the guest's serial port."""
        opts: list[str] = []
        for i in range(self.count):
            # key=value form, not JSON: virtme-ng re-splits its qemu options as a shell would, eating the quotes
            node = f"driver=raw,node-name={node_name(i)},file.driver=file,file.filename={_escape(self.image(i))}"
            opts += ["-blockdev", node,
                     "-device", f"pcie-root-port,id={port_id(i)},chassis={CHASSIS_BASE + i},bus=pcie.0",
                     "-device", _device_opt(device_arguments(i))]
        if self.count:
            opts += ["-qmp", f"unix:{_escape(self.qmp_socket)},server=on,wait=off",
                     "-chardev", f"socket,id=nvmetd-qmpg,path={_escape(self.guest_socket)},server=on,wait=off",
                     "-device", "virtio-serial-pci,id=nvmetd-ser",
                     "-device", f"virtserialport,bus=nvmetd-ser.0,chardev=nvmetd-qmpg,name={QMP_PORT}"]
        return opts

    def start_relay(self, timeout: float = 300.0) -> None:
        """Connect to QEMU's two sockets once it has made them and relay in a daemon thread (it ends with QEMU)."""
        if not self.count:
            return
        thread = threading.Thread(target=self._relay, args=(timeout,), name="rig-qmp-relay", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _relay(self, timeout: float) -> None:
        qmp = _connect(self.qmp_socket, timeout)
        guest = _connect(self.guest_socket, timeout)
        if qmp is None or guest is None:
            return
        with qmp, guest, contextlib.suppress(OSError):
            _negotiate(qmp)
            lock = threading.Lock()  # the two directions both write to the guest socket
            pump = threading.Thread(target=_forward, args=(qmp, guest, lock), daemon=True)
            pump.start()
            for line in guest.makefile("rb"):
                verdict = check_command(line)
                if verdict is None:
                    qmp.sendall(line.rstrip(b"\n") + b"\n")
                else:
                    with lock:
                        guest.sendall(verdict)


def _negotiate(qmp: socket.socket) -> None:
    """Leave QMP's capabilities mode: after the greeting, send qmp_capabilities and read up to its reply, byte by
    byte, so nothing that follows is consumed here instead of reaching the guest."""
    def line() -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            chunk = qmp.recv(1)
            if not chunk:
                raise OSError("QEMU closed its monitor")
            data += chunk
        return data

    line()  # the greeting
    qmp.sendall(b'{"execute":"qmp_capabilities"}\n')
    while True:
        reply = json.loads(line())
        if "return" in reply or "error" in reply:
            return


def check_command(line: bytes) -> bytes | None:
    """None when the guest's QMP line may go to QEMU, else the QMP error reply that the relay sends back instead."""
    try:
        cmd = json.loads(line)
        name = cmd["execute"]
        args = cmd.get("arguments") or {}
    except (ValueError, KeyError, TypeError):
        return _error(None, "not a QMP command")
    if not isinstance(cmd, dict) or not isinstance(args, dict) or name not in ALLOWED:
        return _error(cmd.get("id") if isinstance(cmd, dict) else None, f"the rig relays only {sorted(ALLOWED)}")
    if name in ("device_del", "device_add") and not str(args.get("id", "")).startswith(ID_PREFIX):
        return _error(cmd.get("id"), f"the rig only plugs its own drives ({ID_PREFIX}N)")
    if name == "device_add" and args.get("driver") != "nvme":
        return _error(cmd.get("id"), "the rig only adds nvme drives")
    return None


def _error(ident: object, desc: str) -> bytes:
    reply: dict[str, object] = {"error": {"class": "GenericError", "desc": desc}}
    if ident is not None:
        reply["id"] = ident
    return json.dumps(reply).encode() + b"\n"


def _forward(src: socket.socket, dst: socket.socket, lock: threading.Lock) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            with lock:
                dst.sendall(chunk)


def _connect(path: Path, timeout: float) -> socket.socket | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            time.sleep(0.2)
    return None


def _escape(path: Path) -> str:
    return str(path).replace(",", ",,")


def for_run(repo: Path) -> Drives | None:
    """This run's drives (None when NVMETD_RIG_DRIVE_COUNT=0). Images live under the repo's .rig/ (a real host
    filesystem, sparse); a unix socket path must stay short, so the directory name is short too."""
    count = int(os.environ.get(COUNT_ENV, DEFAULT_COUNT))
    if count <= 0:
        return None
    base = repo / ".rig"
    base.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="drives-", dir=base))
    if len(str(root / "guest.sock")) > 100:  # sun_path holds 108 bytes
        shutil.rmtree(root)
        root = Path(tempfile.mkdtemp(prefix="nvmetd-drives-"))
    return Drives(root, count)
