"""How VMs and their attachments become the kernel's tree: pure logic, no kernel needed."""

from __future__ import annotations

from nvmetd.vms import Attachment, Ports, compose, new_vm
from target.model import TargetState


def test_vhost_disks_never_reach_the_kernel_target() -> None:
    mixed = new_vm("mixed")
    mixed.attachments = {"a": Attachment(nsid=1, transport="loop"), "b": Attachment(nsid=2, transport="vhost")}
    only_vhost = new_vm("vh")
    only_vhost.attachments = {"c": Attachment(nsid=1, transport="vhost")}
    devices = {"a": "/dev/a", "b": "/dev/b", "c": "/dev/c"}
    state = compose(TargetState(), {"mixed": mixed, "vh": only_vhost}, devices, Ports())

    assert [s.nqn for s in state.subsystems] == [mixed.subnqn]  # no subsystem for a vhost-only VM
    (sub,) = state.subsystems
    assert [(n.nsid, n.device_path) for n in sub.namespaces] == [(1, "/dev/a")]
    assert sub.allowed_hosts == [mixed.hostnqn] and not sub.allow_any_host
    assert [h.nqn for h in state.hosts] == [mixed.hostnqn]
    assert [(p.trtype, p.subsystems) for p in state.ports] == [("loop", [mixed.subnqn])]


def test_each_vm_only_reaches_its_own_subsystem() -> None:
    vms = {}
    for name, transport in (("one", "tcp"), ("two", "tcp")):
        vm = new_vm(name)
        vm.attachments = {f"{name}-disk": Attachment(nsid=1, transport=transport)}
        vms[name] = vm
    state = compose(TargetState(), vms, {"one-disk": "/dev/x", "two-disk": "/dev/y"}, Ports())
    by_nqn = {s.nqn: s for s in state.subsystems}
    for vm in vms.values():
        assert by_nqn[vm.subnqn].allowed_hosts == [vm.hostnqn]
        assert [n.device_path for n in by_nqn[vm.subnqn].namespaces] == [f"/dev/{'x' if vm.name == 'one' else 'y'}"]
    (port,) = state.ports
    assert sorted(port.subsystems) == sorted(vm.subnqn for vm in vms.values())
