"""Keep the target side's `.nvme` keyring in step with the VMs that are exported over TLS.

Run at every reconcile, so keys come back after a reboot or an nvmetd restart (the keyring lives in the kernel,
the PSKs in the state file). A key is (re)inserted only when this process has not inserted that very PSK yet, and
a VM that no longer has a TLS disk loses its key, so a detached VM cannot reconnect over TLS.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from nvmetd import tls
from nvmetd.vms import Vm

log = logging.getLogger("nvmetd.tls")


def tls_vms(vms: dict[str, Vm]) -> list[Vm]:
    return [vm for vm in vms.values() if vm.tls_psk and any(a.tls for a in vm.attachments.values())]


def key_file(keys_dir: Path, vm: Vm) -> Path:
    return keys_dir / f"{vm.name}.psk"


class TlsKeys:
    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self.inserted: dict[tuple[str, str], str] = {}  # (hostnqn, subnqn) -> sha256 of the PSK (never the PSK)

    def sync(self, vms: dict[str, Vm]) -> None:
        """Every VM's key (the full reconcile): keys of VMs without TLS disks any more are revoked."""
        wanted = {(vm.hostnqn, vm.subnqn): vm for vm in tls_vms(vms)}
        for vm in sorted(wanted.values(), key=lambda v: v.name):
            self._insert(vm)
        for ident in sorted(set(self.inserted) - set(wanted)):
            self._revoke(ident)

    def sync_vm(self, vm: Vm) -> None:
        """One VM's key (its own attach or detach, a scoped reconcile): the other VMs' keys are not looked at."""
        if tls_vms({vm.name: vm}):
            self._insert(vm)
        elif (vm.hostnqn, vm.subnqn) in self.inserted:
            self._revoke((vm.hostnqn, vm.subnqn))

    def _insert(self, vm: Vm) -> None:
        assert vm.tls_psk is not None
        ident = (vm.hostnqn, vm.subnqn)
        digest = hashlib.sha256(vm.tls_psk.encode()).hexdigest()
        if self.inserted.get(ident) != digest:
            tls.insert(vm.tls_psk, *ident)
            tls.write_key_file(key_file(self.keys_dir, vm), vm.tls_psk)
            self.inserted[ident] = digest
            log.info("TLS key of VM %s in the .nvme keyring (identity %s)", vm.name, tls.identity(*ident))

    def _revoke(self, ident: tuple[str, str]) -> None:
        tls.revoke(*ident)
        del self.inserted[ident]
        log.info("TLS key for %s revoked", tls.identity(*ident))
