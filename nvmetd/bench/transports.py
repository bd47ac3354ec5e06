"""How the host reaches an exported disk: loop, tcp, rdma (soft-RoCE on a veth pair), later vhost-nvme.

A transport turns a disk into an `Attachment`: the device fio runs on, and the command prefix that runs fio
where that device is (empty on this host). The fabrics here all go the same way: an nvmet port through target/,
then libnvme connects this host and the namespace is found by NQN and NSID (never by /dev/nvmeXnY numbering).

EXTENSION POINT for vhost-nvme: subclass `Transport`, make `attach` start the guest and return an Attachment whose
`device` is the namespace as the guest sees it and whose `fio_prefix` runs a command inside that guest; register it
in TRANSPORTS. The runner, the reports and the tests take it from there.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nvmetd import initiator
from nvmetd.bench.disks import Disk
from nvmetd.bench.export import NQN_PREFIX, Export, ExportError
from target.configfs import ConfigFS

BENCH_PORT_BASE = 0xB00  # port ids the benchmark uses: ours to create and remove
# TEST-NET-1 (RFC 5737): never routed, so a veth pair with these addresses cannot collide with a real network
RDMA_TARGET_ADDR, RDMA_HOST_ADDR, RDMA_PREFIX = "192.0.2.1", "192.0.2.2", 24
VETH_TARGET, VETH_HOST, RXE_NAME = "nvmb-t", "nvmb-h", "nvmb_rxe"


class TransportError(Exception):
    """A transport cannot be set up or connected on this host; says what is missing."""


@dataclass
class Attachment:
    transport: str
    device: Path
    fio_prefix: list[str] = field(default_factory=list)
    detach: Callable[[], None] = lambda: None
    details: dict[str, str] = field(default_factory=dict)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise TransportError(f"{argv[0]} is not installed: run `make setup`") from None
    if check and proc.returncode != 0:
        raise TransportError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def modprobe(*modules: str) -> None:
    for module in modules:
        if _run("modprobe", module, check=False).returncode != 0:
            raise TransportError(f"cannot load kernel module {module}: this kernel lacks it")


class Transport:
    """Base: a transport is prepared once per run, attaches disks one at a time, is torn down at the end."""

    name = ""

    def prepare(self) -> None:
        """Load modules, create networks. Raise TransportError when this host cannot do it."""

    def attach(self, disk: Disk, cfs: ConfigFS, index: int) -> Attachment:
        raise NotImplementedError

    def teardown(self) -> None:
        """Undo prepare()."""


class FabricTransport(Transport):
    """An nvmet port plus a libnvme connection from this same host."""

    trtype = ""
    target_modules: tuple[str, ...] = ()
    host_modules: tuple[str, ...] = ()

    def __init__(self, trsvcid: int = 4460) -> None:
        self.trsvcid = trsvcid

    def prepare(self) -> None:
        modprobe("nvmet", *self.target_modules, "nvme-fabrics", *self.host_modules)

    def address(self) -> dict[str, str]:
        return {}

    def attach(self, disk: Disk, cfs: ConfigFS, index: int) -> Attachment:
        run_id = uuid.uuid4()
        hostnqn = f"nqn.2014-08.org.nvmexpress:uuid:{run_id}"
        subnqn = f"{NQN_PREFIX}{self.name}-{disk.backend}-{str(run_id)[:8]}"
        port = {"id": BENCH_PORT_BASE + index, "trtype": self.trtype, **self.address()}
        export = Export(cfs, subnqn, hostnqn, disk.device_path, port)
        export.up()
        addr = self.address()
        try:
            conn = initiator.connect(subnqn, hostnqn, self.trtype, addr.get("traddr"), addr.get("trsvcid"))
        except initiator.InitiatorError as exc:
            export.down(strict=False)
            raise TransportError(str(exc)) from None
        try:
            device = conn.device(1)
        except initiator.InitiatorError as exc:
            conn.disconnect()
            export.down(strict=False)
            raise TransportError(str(exc)) from None

        def detach() -> None:
            conn.disconnect()
            export.down()

        # evidence of the path actually taken, as the kernel reports it
        seen = (initiator.SYS_NVME / conn.controller / "transport").read_text().strip()
        return Attachment(self.name, device, detach=detach,
                          details={"subsystem": subnqn, "controller": conn.controller, "device": str(device),
                                   "kernel_transport": seen,
                                   **({"traddr": f"{addr['traddr']}:{addr['trsvcid']}"} if addr else {})})


class LoopTransport(FabricTransport):
    name = trtype = "loop"
    target_modules = ("nvme-loop",)


class TcpTransport(FabricTransport):
    name = trtype = "tcp"
    target_modules = ("nvmet-tcp",)
    host_modules = ("nvme-tcp",)

    def address(self) -> dict[str, str]:
        return {"adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(self.trsvcid)}


class RdmaTransport(FabricTransport):
    """NVMe/RDMA over soft-RoCE. Without a real RDMA NIC it makes one: rdma_rxe on one end of a veth pair.

    Over `lo` the host's connect fails (rdma_resolve_route times out, kernel-rig.md); over a veth end with an
    address it works. Pass `traddr` to use an address on an existing RDMA device instead.
    """

    name = trtype = "rdma"
    target_modules = ("nvmet-rdma",)
    host_modules = ("nvme-rdma",)

    def __init__(self, trsvcid: int = 4460, traddr: str | None = None) -> None:
        super().__init__(trsvcid)
        self.traddr = traddr or RDMA_TARGET_ADDR
        self.made_network = self.made_rxe = False

    def address(self) -> dict[str, str]:
        return {"adrfam": "ipv4", "traddr": self.traddr, "trsvcid": str(self.trsvcid)}

    def prepare(self) -> None:
        super().prepare()
        if self.traddr != RDMA_TARGET_ADDR:
            return
        modprobe("rdma_rxe")
        if _run("ip", "link", "show", VETH_TARGET, check=False).returncode != 0:
            _run("ip", "link", "add", VETH_TARGET, "type", "veth", "peer", "name", VETH_HOST)
            self.made_network = True
            for dev, addr in ((VETH_TARGET, RDMA_TARGET_ADDR), (VETH_HOST, RDMA_HOST_ADDR)):
                _run("ip", "addr", "add", f"{addr}/{RDMA_PREFIX}", "dev", dev)
                _run("ip", "link", "set", dev, "up")
        if RXE_NAME not in _run("rdma", "link", "show", check=False).stdout:
            _run("rdma", "link", "add", RXE_NAME, "type", "rxe", "netdev", VETH_TARGET)
            self.made_rxe = True

    def teardown(self) -> None:
        if self.made_rxe:
            _run("rdma", "link", "delete", RXE_NAME, check=False)
            self.made_rxe = False
        if self.made_network:
            _run("ip", "link", "delete", VETH_TARGET, check=False)
            self.made_network = False


TRANSPORTS: dict[str, Callable[..., Transport]] = {
    "loop": LoopTransport,
    "tcp": TcpTransport,
    "rdma": RdmaTransport,
    # "vhost-nvme": arrives with vhost_nvme (see the module docstring)
}


def make_transport(name: str, **options: object) -> Transport:
    factory = TRANSPORTS.get(name)
    if factory is None:
        raise TransportError(f"unknown transport {name!r} (known: {', '.join(TRANSPORTS)})")
    return factory(**{k: v for k, v in options.items() if v is not None and _accepts(factory, k)})


def _accepts(factory: Callable[..., Transport], option: str) -> bool:
    import inspect

    return option in inspect.signature(factory).parameters


__all__ = ["TRANSPORTS", "Attachment", "ExportError", "Transport", "TransportError", "make_transport"]
