"""What one VM's attach or detach needs of the target tree, and nothing more.

Why: composing and planning the whole tree per change made an attach cost grow with the number of VMs on the
host. An attach or detach concerns that VM's host entry, its subsystem (namespaces, allowed host) and its links
on nvmetd's ports; the ports themselves must exist while any VM uses their transport. The full tree is still
composed and checked at start and on the drift timer (Manager.reconcile). Which ports other VMs use comes from
the store's summary of the VMs (nvmetd/vm_index.py), not from a walk over them.
"""

from __future__ import annotations

from nvmetd.vms import Ports, Vm, compose
from target.model import TargetState


def vm_state(vm: Vm, devices: dict[str, str], ports: Ports, in_use: set[str]) -> TargetState:
    """The VM's host and subsystem, and every port in use, linked to this VM's subsystem where it has disks.

    Planned against target.scope.ScopedLiveTree (this VM's objects, nvmetd's port ids), a port in use by other
    VMs only is kept (with this VM's link removed), and a port no VM uses any more is removed, as the full
    reconcile would do."""
    state = compose(TargetState(), {vm.name: vm}, devices, ports)
    linked = {p.id for p in state.ports}  # by id: the TLS and standby ports' trtype is tcp too
    others = [ports.port(t, []) for t in sorted(in_use) if ports.ids()[t] not in linked]
    return state.model_copy(update={"ports": [*state.ports, *others]})


def port_ids(ports: Ports) -> list[int]:
    return [ports.tcp_id, ports.loop_id, ports.rdma_id, ports.tls_id, ports.tcp_standby_id]


def uses_vhost(vm: Vm | None) -> bool:
    return vm is not None and any(a.transport == "vhost" for a in vm.attachments.values())


def uses_tls(vm: Vm | None) -> bool:
    return vm is not None and any(a.tls for a in vm.attachments.values())
