"""How the host reaches an exported disk: loop, tcp, rdma (soft-RoCE on a veth pair), vhost (a TCG guest).

A transport turns a disk into an `Attachment`: the device fio runs on, and how to run fio where that device is
(on this host unless `run_fio` says otherwise). The fabrics all go the way users' VMs go: `Manager.attach` adds
the disk as a namespace of a VM's subsystem (its own host NQN and DH-CHAP key) on the transport's port, then for
loop the Manager connects this host itself and for tcp/rdma this host connects with libnvme as the VM's host
would; the namespace is found by NQN and NSID (never by /dev/nvmeXnY numbering).

A transport may bring its own baseline (`baseline`), when the raw device on this host is not the fair comparison:
vhost's is the same guest on QEMU's emulated NVMe device (bench/matrix/vhost.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.matrix import fio
from bench.matrix.disks import RDMA_TARGET_ADDR, Disk, Site
from bench.matrix.tables import DEFAULT_BASELINE
from nvmetd import initiator
from nvmetd.errors import SystemProblem, UserError

RDMA_HOST_ADDR, RDMA_PREFIX = "192.0.2.2", 24
VETH_TARGET, VETH_HOST, RXE_NAME = "nvmb-t", "nvmb-h", "nvmb_rxe"
BENCH_VM = "nvmetd-bench"

class FioRunner(Protocol):
    """Runs one section of a job file (all if empty) with the given ${VAR}s, wherever the device is."""

    def __call__(self, path: Path, section: str, env: dict[str, str], *,
                 timeout: float | None = None) -> fio.FioRun: ...


class TransportError(SystemProblem):
    """A transport cannot be set up or connected on this host; says what is missing."""


@dataclass
class Attachment:
    transport: str
    device: Path
    run_fio: FioRunner = fio.run_fio
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
    needs_nvmet = True  # False: runs on a host without the in-kernel target (vhost)
    own_baseline = False  # True: baseline() gives the fair baseline, and the transport runs alone
    baseline_label = DEFAULT_BASELINE

    def prepare(self) -> None:
        """Load modules, create networks. Raise TransportError when this host cannot do it."""

    def attach(self, disk: Disk, site: Site, index: int) -> Attachment:
        raise NotImplementedError

    def baseline(self, disk: Disk, site: Site) -> Attachment:
        """The transport's own baseline (own_baseline), when fio on the raw device here is not the fair one."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Undo prepare()."""


def _controller(subnqn: str, trtype: str) -> str:
    for ctrl in sorted(initiator.SYS_NVME.glob("nvme*")):
        try:
            if ((ctrl / "subsysnqn").read_text().strip() == subnqn
                    and (ctrl / "transport").read_text().strip() == trtype):
                return ctrl.name
        except OSError:
            continue
    raise TransportError(f"no {trtype} controller of {subnqn} on this host")


def _authenticated(controller: str) -> str:
    """Whether the kernel holds a DH-CHAP secret for this connection's host side (the value is never recorded)."""
    try:
        configured = (initiator.SYS_NVME / controller / "dhchap_secret").read_text().strip()
    except OSError:
        return "unknown"
    return "no" if configured in ("", "none") else "yes"


class FabricTransport(Transport):
    """A namespace of the bench VM's subsystem, attached by the Manager, connected from this same host."""

    trtype = ""
    target_modules: tuple[str, ...] = ()
    host_modules: tuple[str, ...] = ()

    def __init__(self, trsvcid: int = 4460) -> None:
        self.trsvcid = trsvcid

    def prepare(self) -> None:
        modprobe("nvmet", *self.target_modules, "nvme-fabrics", *self.host_modules)

    def attach(self, disk: Disk, site: Site, index: int) -> Attachment:
        manager = site.manager
        try:
            res = manager.attach(BENCH_VM, disk.name, transport=self.trtype)
        except (UserError, SystemProblem) as exc:
            raise TransportError(f"nvmetd could not attach {disk.name} over {self.trtype}: {exc}") from None
        conn = None
        try:
            if res.device:  # loop: the Manager connected this host, as it does for a local VM
                device = Path(res.device)
            else:
                key = Path(res.dhchap_key_file).read_text().strip()
                conn = initiator.connect(res.subsystem_nqn, res.host_nqn, self.trtype, res.traddr, res.trsvcid,
                                         dhchap_key=key)
                device = conn.device(res.nsid)
            controller = _controller(res.subsystem_nqn, self.trtype)
        except (initiator.InitiatorError, TransportError) as exc:
            if conn is not None:
                conn.disconnect()
            manager.detach(BENCH_VM, disk.name)
            raise TransportError(str(exc)) from None

        def detach() -> None:
            if conn is not None:
                conn.disconnect()
            manager.detach(BENCH_VM, disk.name)  # for loop it disconnects this host too

        # evidence of the path actually taken, as the kernel reports it
        seen = (initiator.SYS_NVME / controller / "transport").read_text().strip()
        return Attachment(self.name, device, detach=detach,
                          details={"subsystem": res.subsystem_nqn, "host": res.host_nqn, "nsid": str(res.nsid),
                                   "controller": controller, "device": str(device), "kernel_transport": seen,
                                   "dhchap": _authenticated(controller), "why": res.why,
                                   **({"traddr": f"{res.traddr}:{res.trsvcid}"} if res.traddr else {})})


class LoopTransport(FabricTransport):
    name = trtype = "loop"
    target_modules = ("nvme-loop",)


class TcpTransport(FabricTransport):
    name = trtype = "tcp"
    target_modules = ("nvmet-tcp",)
    host_modules = ("nvme-tcp",)


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


# vhost.py builds on the classes above (its import of this module finds them defined)
from bench.matrix.vhost import VhostTransport  # noqa: E402

TRANSPORTS: dict[str, Callable[..., Transport]] = {
    "loop": LoopTransport,
    "tcp": TcpTransport,
    "rdma": RdmaTransport,
    "vhost": VhostTransport,
}


def make_transport(name: str, **options: object) -> Transport:
    factory = TRANSPORTS.get(name)
    if factory is None:
        raise TransportError(f"unknown transport {name!r} (known: {', '.join(TRANSPORTS)})")
    return factory(**{k: v for k, v in options.items() if v is not None and _accepts(factory, k)})


def _accepts(factory: Callable[..., Transport], option: str) -> bool:
    import inspect

    return option in inspect.signature(factory).parameters


__all__ = ["TRANSPORTS", "Attachment", "Transport", "TransportError", "make_transport"]
