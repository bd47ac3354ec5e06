"""What this kernel's nvmet offers, asked of the kernel itself.

A state that needs something the kernel lacks (DH-CHAP without CONFIG_NVME_TARGET_AUTH, an rdma port without
nvmet-rdma, namespace reservations before Linux 6.13) is refused up front with a sentence saying so, instead of
surfacing later as a bare OSError from a configfs write.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass, field
from functools import cached_property

from target.configfs import ConfigFS, ConfigfsError
from target.model import TargetState

TRANSPORT_MODULES = {"tcp": "nvmet-tcp", "rdma": "nvmet-rdma", "loop": "nvme-loop", "fc": "nvmet-fc",
                     "vhost": "nvmet-vhost"}
PROBE_NQN = "nqn.2014-08.io.nvmetd:feature-probe"


class FeatureError(Exception):
    """The state asks for something this kernel cannot do."""


def modprobe(module: str) -> str | None:
    """Load a module; None on success, else the reason."""
    proc = subprocess.run(["modprobe", "-q", module], capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"modprobe {module} failed")


def load_modules(state: TargetState) -> dict[str, str]:
    """Load nvmet and the transports the state uses; returns {module: reason} for those that failed."""
    failed = {}
    for module in ["nvmet", *sorted({TRANSPORT_MODULES[p.trtype] for p in state.ports})]:
        reason = modprobe(module)
        if reason:
            failed[module] = reason
    return failed


@dataclass
class Features:
    cfs: ConfigFS
    _attrs: dict[str, frozenset[str]] = field(default_factory=dict)

    @cached_property
    def transports(self) -> dict[str, bool]:
        """Transport -> loadable. Looks the modules up without loading them (`modprobe -n`)."""
        found = {}
        for trtype, module in TRANSPORT_MODULES.items():
            proc = subprocess.run(["modprobe", "-n", "-q", module], capture_output=True, check=False)
            found[trtype] = proc.returncode == 0
        return found

    def attrs(self, kind: str) -> frozenset[str]:
        """Attribute files of a host / subsystem / namespace directory, from a live one or a short-lived probe."""
        if kind not in self._attrs:
            self._attrs[kind] = self._probe(kind)
        return self._attrs[kind]

    def _probe(self, kind: str) -> frozenset[str]:
        parent = {"host": "hosts", "subsystem": "subsystems"}.get(kind)
        if kind == "namespace":
            for sub in self.cfs.listdir("subsystems"):
                nss = self.cfs.listdir(f"subsystems/{sub}/namespaces")
                if nss:
                    return frozenset(self.cfs.listdir(f"subsystems/{sub}/namespaces/{nss[0]}"))
            with self._probe_dir("subsystems") as sub:
                ns = f"{sub}/namespaces/1"
                self.cfs.mkdir(ns)
                try:
                    return frozenset(self.cfs.listdir(ns))
                finally:
                    self.cfs.rmdir(ns)
        assert parent is not None
        existing = self.cfs.listdir(parent)
        if existing:
            return frozenset(self.cfs.listdir(f"{parent}/{existing[0]}"))
        with self._probe_dir(parent) as path:
            return frozenset(self.cfs.listdir(path))

    @contextlib.contextmanager
    def _probe_dir(self, parent: str):
        path = f"{parent}/{PROBE_NQN}"
        self.cfs.mkdir(path)
        try:
            yield path
        finally:
            with contextlib.suppress(ConfigfsError):
                self.cfs.rmdir(path)


def check(state: TargetState, features: Features) -> list[str]:
    """Every way `state` exceeds what this kernel offers, one sentence each."""
    problems = []
    for port in state.ports:
        if not features.transports.get(port.trtype, False):
            problems.append(f"port {port.id} uses {port.trtype}, but module {TRANSPORT_MODULES[port.trtype]} "
                            "is not available for this kernel")
    if any(h.dhchap_key or h.dhchap_ctrl_key or h.dhchap_hash or h.dhchap_dhgroup for h in state.hosts) \
            and "dhchap_key" not in features.attrs("host"):
        problems.append("hosts use DH-CHAP, but this kernel's nvmet has no in-band authentication "
                        "(CONFIG_NVME_TARGET_AUTH is not set)")
    if any(ns.resv_enable is not None for s in state.subsystems for ns in s.namespaces) \
            and "resv_enable" not in features.attrs("namespace"):
        problems.append("namespaces set resv_enable, but this kernel's nvmet has no namespace reservations "
                        "(added in Linux 6.13)")
    if any(s.passthru for s in state.subsystems) and "passthru" not in features.attrs("subsystem"):
        problems.append("subsystems use passthru, but this kernel's nvmet has no passthru "
                        "(CONFIG_NVME_TARGET_PASSTHRU is not set)")
    for port in state.ports:
        if port.tsas and port.tsas != "none" and port.trtype == "tcp":
            problems.append(f"port {port.id} asks for TLS (tsas {port.tsas}); it needs tlshd (ktls-utils), "
                            "which this system does not provide")
    return problems


def require(state: TargetState, cfs: ConfigFS) -> None:
    problems = check(state, Features(cfs))
    if problems:
        raise FeatureError("; ".join(problems))
