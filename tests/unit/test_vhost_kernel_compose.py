"""How vhost disks on the kernel back-end become nvmet objects, and the rules that keep its key-less host NQN off
every fabric (pure logic; the kernel tests in tests/kernel/test_nvmetd_vhost_kernel.py run them for real)."""

from __future__ import annotations

import pytest

from nvmetd.errors import UserError
from nvmetd.manager import Manager
from nvmetd.vhost_kernel import choose_backend, vhost_hostnqn
from nvmetd.vms import Attachment, Ports, compose, new_vm
from target.model import TargetState

UUID = "0b8f7d52-2f6e-4a57-9a4c-1e5e1d0c7a11"


def test_kernel_vhost_disks_are_namespaces_on_a_vhost_port_with_a_keyless_host() -> None:
    vm = new_vm("vm1", UUID)
    vm.attachments = {"a": Attachment(nsid=1, transport="vhost", backend="kernel"),
                      "b": Attachment(nsid=2, transport="vhost", backend="kernel")}
    state = compose(TargetState(), {"vm1": vm}, {"a": "/dev/a", "b": "/dev/b"}, Ports())
    assert [(h.nqn, h.dhchap_key) for h in state.hosts] == [(vhost_hostnqn(UUID), None)]
    (sub,) = state.subsystems
    assert sub.nqn == vm.subnqn and sub.allowed_hosts == [vhost_hostnqn(UUID)] and not sub.allow_any_host
    assert [(n.nsid, n.device_path) for n in sub.namespaces] == [(1, "/dev/a"), (2, "/dev/b")]
    assert [(p.id, p.trtype, p.subsystems) for p in state.ports] == [(4423, "vhost", [vm.subnqn])]


def test_engine_vhost_disks_stay_out_of_the_kernel_and_fabric_hosts_keep_their_key() -> None:
    engine_vm, tcp_vm = new_vm("e", UUID), new_vm("t")
    engine_vm.attachments = {"a": Attachment(nsid=1, transport="vhost")}  # state files from before: the engine
    tcp_vm.attachments = {"b": Attachment(nsid=1, transport="tcp")}
    state = compose(TargetState(), {"e": engine_vm, "t": tcp_vm}, {"a": "/dev/a", "b": "/dev/b"}, Ports())
    assert [s.nqn for s in state.subsystems] == [tcp_vm.subnqn]
    assert [(h.nqn, h.dhchap_key) for h in state.hosts] == [(tcp_vm.hostnqn, tcp_vm.dhchap_key)]


def test_kernel_vhost_never_shares_a_vm_with_a_fabric() -> None:
    vm = new_vm("vm1", UUID)
    vm.attachments = {"a": Attachment(nsid=1, transport="vhost", backend="kernel")}
    with pytest.raises(UserError, match="DH-CHAP"):
        Manager._check_kernel_vhost_mix(vm, "b", "tcp", "engine")
    Manager._check_kernel_vhost_mix(vm, "b", "vhost", "kernel")
    vm.attachments = {"a": Attachment(nsid=1, transport="loop")}
    with pytest.raises(UserError, match="DH-CHAP"):
        Manager._check_kernel_vhost_mix(vm, "b", "vhost", "kernel")
    Manager._check_kernel_vhost_mix(vm, "b", "vhost", "engine")


def test_backend_choice_keeps_a_vms_controller_where_it_is() -> None:
    assert choose_backend("auto", "engine")[0] == "engine"
    assert choose_backend("engine", "kernel")[0] == "kernel"
    assert choose_backend("engine", None) == ("engine", "[vhost] backend = engine")
