"""The one place where disks, VMs and the target tree change together.

Every change is: record the intent in the durable store (one atomic, locked transaction), then reconcile the
kernel and the volumes to the stored state. Reconcile is idempotent, so a crash (kill -9) anywhere is repaired by
the next reconcile at start: nothing is half-applied for long, and a retried request returns the same answer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvmetd import initiator, state_doc, throttle, vm_index, vm_scope
from nvmetd import tls as tls_psk
from nvmetd.changelog import ChangeLog, recorded
from nvmetd.crashpoints import crash_point
from nvmetd.errors import SystemProblem, Unsupported, UserError
from nvmetd.opi import state as opi_state
from nvmetd.qmp import node_name as qmp_node_name
from nvmetd.state_doc import DiskState
from nvmetd.tls_keys import TlsKeys
from nvmetd.tls_keys import key_file as tls_key_file
from nvmetd.vhost import MAX_VHOST_NSID, EngineSpec, VhostEngines
from nvmetd.vhost_kernel import Choice, KernelBackendMissing, choose_backend
from nvmetd.vms import Attachment, Ports, Vm, compose, new_vm, vhost_device_id
from target import validate
from target.apply import ApplyResult, apply_state
from target.configfs import ConfigFS
from target.features import load_modules
from target.model import TargetState, parse_state
from target.restore import SystemReadiness, restore
from target.scope import ScopedLiveTree
from target.status import NOT_THERE
from target.store import StateStore, set_target
from target.tracked import peek

log = logging.getLogger("nvmetd.manager")

DEFAULT_KEYS_DIR = Path("/var/lib/nvmetd/keys")


def _pools():
    from backends import pools

    return pools


@dataclass
class AttachResult:
    vm: str
    disk: str
    transport: str
    why: str
    subsystem_nqn: str
    host_nqn: str
    nsid: int
    traddr: str
    trsvcid: str
    dhchap_key_file: str
    device: str | None
    qemu_args: list[str]
    vhost_socket: str | None = None
    notes: list[str] | None = None
    vhost_backend: str | None = None  # vhost: "kernel" (nvmet-vhost) or "engine" (nvmetd's userspace engine)
    paths: list[dict[str, str]] | None = None  # multipath: every port to connect to, with its ANA state
    tls: bool = False
    tls_key_file: str | None = None  # the PSK (interchange format) for the host side; the answer never holds it
    tls_identity: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Manager:
    def __init__(self, store: StateStore, cfs: ConfigFS, pools_root: Path | None = None,
                 keys_dir: Path = DEFAULT_KEYS_DIR, host_connect: bool = True,
                 vhost: VhostEngines | None = None, vhost_auto: bool = False,
                 vhost_backend: Choice = "auto") -> None:
        self.store = store
        self.cfs = cfs
        self.pools_root = pools_root
        self.keys_dir = keys_dir
        self.host_connect = host_connect
        self.vhost = vhost or VhostEngines()
        self.vhost.owner = str(store.path.resolve())
        self.vhost_auto = vhost_auto  # the hypervisor's QEMU has the vhost-user-nvme device (qemu_patches/)
        self.vhost_backend = vhost_backend  # [vhost] backend: who serves a VM's first vhost disk
        self.dpu: dict[str, Any] = {}  # [dpu] of nvmetd.toml: offload mode (nvmetd/opi/offload.py)
        self.lock = threading.RLock()  # one change at a time in this process; the store lock covers others
        # the last full check, the objects of every scoped change since (updated in place under self.lock; a
        # dict update is atomic for readers) and the last scoped result: see last_result
        self._results: tuple[ApplyResult | None, dict[str, Any], ApplyResult | None] = (None, {}, None)
        self.tls_keys = TlsKeys(keys_dir)
        self.changes = ChangeLog()  # the order changes took effect in (nvmetd --change-log)
        # What this process knows, so that one VM's attach or detach costs the same with 5 VMs or 5,000: the
        # device path of every disk it activated, the port attributes it read (target/scope.py) and the
        # transport modules it loaded. A full reconcile (start, drift timer, API) re-reads and refreshes all.
        self._device_paths: dict[str, str] = {}
        self._port_attrs: dict[tuple[str, str], str | None] = {}
        self._modules_loaded: set[str] = set()

    # ------------------------------------------------------------------ state document
    @staticmethod
    def _vms(doc: dict[str, Any]) -> dict[str, Vm]:
        return {name: Vm.model_validate(v) for name, v in doc.get("vms", {}).items()}

    def _index(self, doc: dict[str, Any], base: vm_index.VmIndex | None = None) -> vm_index.VmIndex:
        """Which VM has which disk and which ports are in use, in `doc`, without walking every VM: `base` is the
        store's summary of the document `doc` was loaded from (taken inside the transaction that changed `doc`;
        default: the store's current one)."""
        return vm_index.for_doc(self.store.derived(vm_index.SPEC) if base is None else base, doc)

    def _disk_vms(self, doc: dict[str, Any], disk: str) -> list[Vm]:
        """The VMs of `doc` that have `disk` attached, validated: only they, not every VM of the host."""
        return [Vm.model_validate(peek(doc, "vms", name)) for name in self._index(doc).disk_users(disk)]

    @staticmethod
    def _ports(doc: dict[str, Any]) -> Ports:
        return Ports.model_validate(doc.get("ports", {}))

    def _pool(self, name: str):
        return _pools().open_pool(name, self.pools_root)

    def _disk_pool(self, doc: dict[str, Any], disk: str) -> str:
        entry = state_doc.disk(doc, disk)
        if entry is None or not entry.ready:
            raise UserError(f"no disk named {disk!r} (see `nvmetctl disk list`)")
        return entry.pool

    # ------------------------------------------------------------------ reconcile
    def _devices(self, doc: dict[str, Any]) -> dict[str, str]:
        """Disk -> file or block device of every attached disk, activating volumes on the way (idempotent)."""
        by_pool: dict[str, list[str]] = {}  # one ledger transaction per pool, not one per disk
        wanted = [d for vm in self._vms(doc).values() for d in vm.attachments] + list(opi_state.disks(doc))
        for disk in dict.fromkeys(wanted):
            by_pool.setdefault(self._disk_pool(doc, disk), []).append(disk)
        devices: dict[str, str] = {}
        for pool, disks in by_pool.items():
            devices.update(self._pool(pool).attach_many(disks))
        loops = throttle.loop_devices()  # once per full reconcile, not once per file disk
        for vm in self._vms(doc).values():
            for disk, att in vm.attachments.items():
                devices[disk] = self._throttled(doc, disk, att, devices[disk], loops)
        self._device_paths = dict(devices)
        return devices

    def _activate(self, doc: dict[str, Any], disk: str, att: Attachment) -> str:
        """The volume, activated (and throttled where it has limits)."""
        return self._throttled(doc, disk, att, self._pool(self._disk_pool(doc, disk)).attach(disk))

    @staticmethod
    def _throttled(doc: dict[str, Any], disk: str, att: Attachment, device: str,
                   loops: dict[str, str] | None = None) -> str:
        """What the namespace opens (nvmetd/throttle.py): a disk the kernel target serves (loop, tcp, rdma,
        kernel vhost) is limited on its own block device, so only a file disk with limits changes its path (to
        its loop device, kept while attached). The engine limits in its own token bucket instead (engine_specs)."""
        if not att.in_kernel or not throttle.is_file(device):
            return device
        limited = bool(throttle.Limits.model_validate(_disk_row(doc, disk).get("limits", {})).per_direction())
        return throttle.served_device(device, limited, throttle.loop_devices() if loops is None else loops)

    def _apply_limits(self, doc: dict[str, Any], devices: dict[str, str], vms: list[Vm]) -> None:
        """The rules of every disk of `vms` that the kernel target serves and that has (or had) limits: a limit
        removed is written as 0, which deletes its rule."""
        for vm in vms:
            for disk, att in vm.attachments.items():
                if att.in_kernel and "limits" in _disk_row(doc, disk) and not throttle.is_file(devices[disk]):
                    throttle.apply(devices[disk], throttle.Limits.model_validate(_disk_row(doc, disk)["limits"]))

    def _device(self, doc: dict[str, Any], disk: str, att: Attachment) -> str:
        """One disk's device: activated once, then known (a pool's ledger is not re-read per change)."""
        if disk not in self._device_paths:
            self._device_paths[disk] = self._activate(doc, disk, att)
        return self._device_paths[disk]

    @staticmethod
    def _check_limits_path(disk: str, limits: throttle.Limits, att: Attachment) -> None:
        """Each path enforces one kind of limit exactly: refuse the other kind rather than ignore it."""
        if att.in_kernel and limits.combined():
            raise Unsupported(f"{limits.combined()[0]}: disk {disk!r} is served by the kernel target, whose "
                              "blk-throttle limits reads and writes separately: use riops/wiops/rmbps/wmbps")
        if not att.in_kernel and limits.per_direction():
            raise Unsupported(f"{limits.per_direction()[0]}: disk {disk!r} is served by the vhost engine, whose "
                              "token bucket counts reads and writes together: use rwiops/rwmbps")

    def _load_modules(self, state: TargetState) -> None:
        wanted = {p.trtype for p in state.ports} | {"nvmet"}
        if not wanted <= self._modules_loaded:
            load_modules(state)
            self._modules_loaded |= wanted

    def devices(self, doc: dict[str, Any]) -> dict[str, str]:
        return self._devices(doc)

    def effective(self, doc: dict[str, Any], devices: dict[str, str] | None = None) -> TargetState:
        """The tree the kernel should hold."""
        devices = self._devices(doc) if devices is None else devices
        return opi_state.merge(compose(parse_state(doc.get("target", {})), self._vms(doc), devices,
                                       self._ports(doc)), doc, devices)

    def engine_specs(self, doc: dict[str, Any], devices: dict[str, str]) -> list[EngineSpec]:
        specs = []
        for vm in sorted(self._vms(doc).values(), key=lambda v: v.name):
            served = {disk: a for disk, a in vm.attachments.items()
                      if a.transport == "vhost" and a.backend == "engine"}
            namespaces = {a.nsid: (disk, devices[disk]) for disk, a in served.items()}
            limits = {a.nsid: throttle.Limits.model_validate(_disk_row(doc, disk)["limits"]).engine()
                      for disk, a in served.items() if _disk_row(doc, disk).get("limits")}
            if namespaces:
                specs.append(EngineSpec(vm, namespaces, limits))
        return specs + opi_state.engine_specs(doc, devices)

    def reconcile(self, wait: float = 0.0) -> ApplyResult:
        """The whole tree: every volume activated, every object read and compared (start, drift timer, API)."""
        with self.lock:
            doc = self.store.load()
            self._port_attrs.clear()
            if doc.get("opi", {}).get("remote_controllers"):
                from nvmetd.opi.remote import reconnect_all

                reconnect_all(doc)  # the OPI backend paths whose namespaces back OPI namespaces
            devices = self._devices(doc)
            # limits before the tree: a namespace never serves a moment unthrottled, and a restore that waits
            # (or fails) on a port does not leave the disks' limits unapplied
            self._apply_limits(doc, devices, list(self._vms(doc).values()))
            state = self.effective(doc, devices)
            if not self.cfs.exists() and state == TargetState():
                result = ApplyResult()  # nothing for the kernel to hold, and no kernel target here: vhost only
            else:
                load_modules(state)
                self._modules_loaded = {p.trtype for p in state.ports} | {"nvmet"}
                self.tls_keys.sync(self._vms(doc))  # keys before the TLS port admits anyone
                # outside boot too, a port whose address is not up (yet) is pending, not failed: the drift timer
                # retries it
                result = (restore(state, self.cfs, timeout=wait) if wait
                          else apply_state(state, self.cfs, readiness=SystemReadiness()))
            result.objects.update(self.vhost.reconcile(self.engine_specs(doc, devices)))
            crash_point("reconcile.after_kernel")
            self._release_detached(doc)
            self.last_result = result
            return result

    def _reconcile_vm(self, vm_name: str, before: Vm | None, doc: dict[str, Any] | None = None,
                      index: vm_index.VmIndex | None = None) -> ApplyResult:
        """After one VM's attach or detach: plan, read and activate only what that VM has (nvmetd/vm_scope.py).

        Anything short of convergence falls back to the full reconcile, so a failure is reported (and repaired)
        exactly as before. `doc`: the document the caller's transaction just saved (not parsed again); `index`:
        the store's summary of the document that transaction was based on (Manager._index)."""
        doc = self.store.load() if doc is None else doc
        vms = self._index(doc, index)
        raw = doc.get("vms", {}).get(vm_name)
        vm = Vm.model_validate(raw) if raw is not None else before
        if vm is None or "kernel" in (vm.vhost_backend(), before.vhost_backend() if before else None):
            return self.reconcile()  # the scope (vm_scope, target/scope.py) knows nvmetd's fabric ports only
        ports = self._ports(doc)
        devices = {disk: self._device(doc, disk, a) for disk, a in vm.attachments.items()}
        self._apply_limits(doc, devices, [vm])  # before the namespaces go live (see reconcile)
        state = vm_scope.vm_state(vm, devices, ports, vms.transports_in_use())
        if not self.cfs.exists() and state == TargetState():
            result = ApplyResult()
        else:
            self._load_modules(state)
            if vm_scope.uses_tls(vm) or vm_scope.uses_tls(before):
                self.tls_keys.sync_vm(vm)  # this VM's key before its TLS link admits it, or revoked after
            live = ScopedLiveTree(self.cfs, [vm.hostnqn], [vm.subnqn], vm_scope.port_ids(ports), self._port_attrs)
            result = apply_state(state, self.cfs, live=live)
        if vm_scope.uses_vhost(before) or vm_scope.uses_vhost(vm):
            vhost_devices = {disk: self._device(doc, disk, a) for other in self._vms(doc).values()
                             for disk, a in other.attachments.items() if a.transport == "vhost"}
            result.objects.update(self.vhost.reconcile(self.engine_specs(doc, vhost_devices)))
        crash_point("reconcile.after_kernel")
        gone = set(before.attachments) - set(vm.attachments) if before is not None else set()
        self._release(doc, gone, vms)
        if not result.converged:
            return self.reconcile()
        full, since, _ = self._results
        since.update(result.objects)
        self._results = (full, since, result)
        return result

    @property
    def last_result(self) -> ApplyResult | None:
        """What status and metrics report: every object of the last full check, with the objects of each VM
        changed since brought up to date, and the last change's writes and plan. Merged here, when read, not per
        attach: the merge copies every object of the host (20,000 on a 2,500-VM host)."""
        full, since, last = self._results
        if last is None:
            return full
        objects = {**full.objects, **since} if full is not None else dict(since)
        return ApplyResult(objects=objects, writes=last.writes, planned=last.planned)

    @last_result.setter
    def last_result(self, result: ApplyResult | None) -> None:
        """A full check: what it found replaces everything before."""
        self._results = (result, {}, None)

    def _release(self, doc: dict[str, Any], disks: set[str], vms: vm_index.VmIndex) -> None:
        """Close the volumes of these disks if no VM of `doc` (summarised by `vms`) uses them any more (the end of
        a detach)."""
        for disk in sorted(d for d in disks if not vms.attached(d)):
            self._device_paths.pop(disk, None)
            entry = state_doc.disk(doc, disk)
            if entry is not None and entry.ready:
                pool = self._pool(entry.pool)
                path = pool.opened(disk)
                if path:
                    if "limits" in _disk_row(doc, disk):
                        throttle.release(path)  # its loop device or rules: before closing it
                    pool.detach(disk)

    def _release_detached(self, doc: dict[str, Any]) -> None:
        """Close volumes no VM uses any more (LUKS mappings, LV activation): the end of a detach, even after a crash."""
        attached = {d for vm in self._vms(doc).values() for d in vm.attachments} | set(opi_state.disks(doc))
        by_pool: dict[str, list[str]] = {}  # each pool's ledger read and written once, not once per disk
        for disk, entry in state_doc.disks(doc).items():
            if disk not in attached and entry.ready:
                by_pool.setdefault(entry.pool, []).append(disk)
        for name, disks in by_pool.items():
            pool = self._pool(name)
            ledger = pool.ledger.load()
            missing = [d for d in disks if peek(ledger, "volumes", d) is None]
            if missing:
                log.warning("pool %s has no volume for the detached disk(s) %s (removed outside nvmetd?): "
                            "`nvmetctl disk delete` them", name, ", ".join(missing))
            still_open = {d: path for d in disks if (path := pool.opened(d, ledger))}
            for disk, path in still_open.items():
                if "limits" in _disk_row(doc, disk):
                    throttle.release(path)  # its loop device or rules: before closing it
            pool.detach_many(list(still_open))

    # ------------------------------------------------------------------ target
    def apply_base(self, state: TargetState) -> ApplyResult:
        nqns = {s.nqn for s in state.subsystems}
        if any(n.startswith("nqn.2026-11.io.nvmetd:vm:") for n in nqns):
            raise UserError("subsystem names starting with nqn.2026-11.io.nvmetd:vm: are reserved for VMs")
        with self.lock:
            with self.store.transaction() as doc:
                set_target(doc, state)
            return self.reconcile()

    # ------------------------------------------------------------------ disks
    @recorded("create")
    def create_disk(self, name: str, pool: str, size: int | str, tenant: str = "default", thin: bool = True,
                    encrypted: bool = False, compression: str = "off") -> dict[str, Any]:
        """Journal first ("creating"), then make the volume, then mark it ready: a crash in between is rolled
        back at the next start, so no volume exists that the state does not know about."""
        validate.safe_name(name, "disk name")
        with self.lock:
            with self.store.transaction() as doc:
                existing = state_doc.disk(doc, name)
                if existing is not None and existing.ready:
                    if existing.pool != pool:
                        raise UserError(f"disk {name!r} exists already, on pool {existing.pool!r}")
                    return self.disk_info(name)  # a retried create returns the same disk
                self._pool(pool)  # the pool must exist before anything is journalled
                doc.setdefault("disks", {})[name] = _disk_entry(pool, DiskState.CREATING)
            crash_point("create.after_journal")
            backend = self._pool(pool)
            try:
                if name not in set(backend.volumes()):
                    backend.create(name, size, tenant=tenant, thin=thin, encrypted=encrypted,
                                   compression=compression)
            except BaseException:
                with self.store.transaction() as doc:
                    doc.get("disks", {}).pop(name, None)
                raise
            crash_point("create.after_volume")
            with self.store.transaction() as doc:
                doc["disks"][name] = _disk_entry(pool, DiskState.READY)
            return self.disk_info(name)

    def set_limits(self, name: str, changes: dict[str, int | None]) -> dict[str, Any]:
        """Merge `changes` into the disk's limits (0 removes one); enforced at once, on the running disk."""
        with self.lock:
            with self.store.transaction() as doc:
                self._disk_pool(doc, name)
                merged = {**doc["disks"][name].get("limits", {}),
                          **{k: v for k, v in changes.items() if v is not None}}
                limits = throttle.Limits.model_validate({k: v for k, v in merged.items() if v})
                for vm in self._disk_vms(doc, name):
                    self._check_limits_path(name, limits, vm.attachments[name])
                if limits.per_direction():
                    try:
                        throttle.check_available()
                    except SystemProblem as exc:
                        raise Unsupported(str(exc)) from None
                doc["disks"][name]["limits"] = limits.model_dump(exclude_none=True)
            self.reconcile()
            return self.disk_info(name)

    def disk_info(self, name: str) -> dict[str, Any]:
        doc = self.store.load()
        pool = self._disk_pool(doc, name)
        return self._disk_answer(doc, self._index(doc), pool, self._pool(pool).info(name))

    @staticmethod
    def _disk_answer(doc: dict[str, Any], index: vm_index.VmIndex, pool: str, info: Any) -> dict[str, Any]:
        data = info.to_dict() if hasattr(info, "to_dict") else dict(info.__dict__)
        data["pool"] = pool
        data["limits"] = doc["disks"][info.name].get("limits", {})
        data["attached_to"] = index.disk_users(info.name)
        return data

    def list_disks(self) -> list[dict[str, Any]]:
        """One store read and one listing per pool (a pool's listing asks its pool-wide facts once: for rbd a df
        and a placement-group listing), not one of each per disk."""
        doc = self.store.load()
        disks = state_doc.disks(doc)
        by_pool: dict[str, list[str]] = {}
        for name in sorted(disks):
            if disks[name].ready:
                by_pool.setdefault(disks[name].pool, []).append(name)
        index, answers = self._index(doc), []
        for pool, names in by_pool.items():
            backend = self._pool(pool)
            listed = {info.name: info for info in backend.list(names)}
            for n in names:
                if n in listed:
                    answers.append(self._disk_answer(doc, index, pool, listed[n]))
                else:  # listed, not hidden, and not the end of the listing: the other disks are fine
                    answers.append({"name": n, "pool": pool, "missing": "the pool has no volume for this disk "
                                    "(removed outside nvmetd?)", "limits": doc["disks"][n].get("limits", {}),
                                    "attached_to": index.disk_users(n)})
        return sorted(answers, key=lambda d: d["name"])

    @recorded("delete")
    def delete_disk(self, name: str) -> None:
        """Journal "deleting" first, so a crash mid-way finishes the delete at the next start."""
        with self.lock:
            with self.store.transaction() as doc:
                pool = self._disk_pool(doc, name)
                users = self._index(doc).disk_users(name)
                users += opi_state.disks(doc).get(name, [])
                if users:
                    raise UserError(f"disk {name!r} is attached to {', '.join(users)}: detach it first")
                self._pool(pool).check_delete(name)  # refused before "deleting" is journalled, not after
                doc["disks"][name]["state"] = DiskState.DELETING.value
            crash_point("delete.after_journal")
            self._finish_delete(name, pool)

    def _finish_delete(self, name: str, pool: str) -> None:
        self._device_paths.pop(name, None)
        backend = self._pool(pool)
        if name in set(backend.volumes()):
            if backend.opened(name):
                backend.detach(name)
            backend.delete(name)
        crash_point("delete.after_volume")
        with self.store.transaction() as doc:
            doc.get("disks", {}).pop(name, None)

    def _finish_journal(self) -> list[str]:
        """Roll back creates and finish deletes that a crash interrupted."""
        done = []
        for name, entry in state_doc.disks(self.store.load()).items():
            if not entry.ready:
                self._finish_delete(name, entry.pool)
                done.append(f"disk {name}: "
                            f"{'rolled back create' if entry.state is DiskState.CREATING else 'finished delete'}")
        return done

    @recorded("resize")
    def resize_disk(self, name: str, size: int | str, force: bool = False) -> dict[str, Any]:
        with self.lock:
            doc = self.store.load()
            self._pool(self._disk_pool(doc, name)).grow(name, size, force=force)
            crash_point("resize.after_grow")
            self._revalidate(name)
            return self.disk_info(name)

    def _revalidate(self, disk: str) -> None:
        """Tell nvmet the namespace grew, so connected hosts see the new size."""
        doc = self.store.load()
        for vm in self._disk_vms(doc, disk):
            ns = f"subsystems/{vm.subnqn}/namespaces/{vm.attachments[disk].nsid}"
            if self.cfs.has_attr(ns, "revalidate_size"):
                self.cfs.write(ns, "revalidate_size", "1")

    @recorded("snapshot")
    def snapshot_disk(self, name: str, snap: str) -> dict[str, Any]:
        with self.lock:
            self._pool(self._disk_pool(self.store.load(), name)).snapshot(name, snap)
            return self.disk_info(name)

    @recorded("delete-snapshot")
    def delete_snapshot(self, name: str, snap: str) -> dict[str, Any]:
        """Its data is gone with it; refused while a clone still depends on it (the backend says which)."""
        with self.lock:
            self._pool(self._disk_pool(self.store.load(), name)).delete_snapshot(name, snap)
            return self.disk_info(name)

    @recorded("clone")
    def clone_disk(self, name: str, snap: str, new_name: str) -> dict[str, Any]:
        validate.safe_name(new_name, "disk name")
        with self.lock:
            doc = self.store.load()
            pool = self._disk_pool(doc, name)
            if new_name in doc.get("disks", {}):
                raise UserError(f"disk {new_name!r} exists already")
            backend = self._pool(pool)
            if new_name not in set(backend.volumes()):
                backend.clone(name, snap, new_name)
            with self.store.transaction() as doc:
                doc.setdefault("disks", {})[new_name] = _disk_entry(pool, DiskState.READY)
            return self.disk_info(new_name)

    # ------------------------------------------------------------------ VMs
    def choose_transport(self, requested: str) -> tuple[str, str]:
        if requested != "auto":
            return requested, f"{requested} was requested"
        if self.vhost_auto:
            return "vhost", ("vhost: the VM's NVMe queues are served in place from its shared memory by nvmetd's "
                             "vhost-nvme engine, with no network hop and no block layer in QEMU")
        return "loop", ("loop: host-local NVMe over the kernel's loop transport, no network hop "
                        "(vhost-nvme is off: set `[vhost] auto = true` in nvmetd.toml when the hypervisor's "
                        "QEMU has the vhost-user-nvme device from qemu_patches/)")

    @recorded("attach")
    def attach(self, vm_name: str, disk: str, transport: str = "auto", vm_uuid: str | None = None,
               memory: str | None = None, dpu: str | None = None, tls: bool = False,
               multipath: bool = False) -> AttachResult:
        validate.safe_name(vm_name, "VM name")
        if tls and transport != "tcp":
            raise UserError("tls: TLS is for --transport tcp")
        if transport == "dpu" or vm_name in self.store.load().get("offload", {}):
            from nvmetd.opi.offload import Offload

            if memory is not None:
                validate.qemu_size(memory, "memory")
            if transport not in ("dpu", "auto"):
                raise UserError(f"VM {vm_name!r} is offloaded to a DPU: its disks use --transport dpu")
            return Offload(self).attach(vm_name, disk, dpu, vm_uuid, memory)
        if memory is not None:
            validate.qemu_size(memory, "memory")
        chosen, why = self.choose_transport(transport)
        if multipath and chosen != "tcp":
            raise UserError(f"--multipath needs --transport tcp (two tcp ports with ANA groups), not {chosen}")
        with self.lock:
            with self.store.transaction() as doc:
                self._disk_pool(doc, disk)
                self._check_transport(chosen, doc)
                if tls:
                    self._check_tls()
                vms = doc.setdefault("vms", {})
                before = Vm.model_validate(vms[vm_name]) if vm_name in vms else None
                vm = before.model_copy(deep=True) if before is not None else new_vm(vm_name, vm_uuid)
                if vm_uuid and vm.uuid != validate.uuid_str(vm_uuid):
                    raise UserError(f"VM {vm_name!r} exists with UUID {vm.uuid}, not {vm_uuid}")
                base = self.store.derived(vm_index.SPEC)  # the summary of the document this view is of
                for other in self._index(doc, base).disk_users(disk):  # no walk over every VM of the host
                    if other != vm_name:
                        raise UserError(f"disk {disk!r} is attached to VM {other!r}; a disk serves one VM")
                if disk in opi_state.disks(doc):
                    raise UserError(f"disk {disk!r} is the volume of {opi_state.disks(doc)[disk][0]} (OPI API)")
                current = vm.attachments.get(disk)
                if current is not None and current.transport != chosen:
                    raise UserError(f"disk {disk!r} is attached to {vm_name!r} over {current.transport}; "
                                    "detach it first to change the transport")
                if current is not None and current.multipath != multipath:
                    raise UserError(f"disk {disk!r} is attached to {vm_name!r} "
                                    f"{'with' if current.multipath else 'without'} multipath; detach it first")
                if current is not None and current.tls != tls:
                    how = "with" if current.tls else "without"
                    raise UserError(f"tls: disk {disk!r} is attached to {vm_name!r} {how} TLS; "
                                    "detach it first to change that")
                if tls and vm.tls_psk is None:
                    vm.tls_psk = tls_psk.generate_psk()
                backend = "engine"
                if chosen == "vhost":
                    if current is not None:
                        backend, bwhy = current.backend, f"the disk is on the {current.backend} back-end already"
                    else:
                        try:
                            backend, bwhy = choose_backend(self.vhost_backend, vm.vhost_backend())
                        except KernelBackendMissing as exc:
                            raise Unsupported(str(exc)) from None
                    why = f"{why}; {backend} back-end: {bwhy}"
                self._check_kernel_vhost_mix(vm, disk, chosen, backend)
                if _disk_row(doc, disk).get("limits"):
                    self._check_limits_path(disk, throttle.Limits.model_validate(_disk_row(doc, disk)["limits"]),
                                            Attachment(nsid=1, transport=chosen, backend=backend))
                if current is None:
                    nsid = vm.next_nsid()
                    if chosen == "vhost" and backend == "engine" and nsid > MAX_VHOST_NSID:
                        raise UserError(f"VM {vm_name!r} has no free namespace ID for a vhost disk "
                                        f"(the engine serves NSIDs 1..{MAX_VHOST_NSID})")
                    vm.attachments[disk] = Attachment(nsid=nsid, transport=chosen, backend=backend, tls=tls,
                                                      multipath=multipath)
                vms[vm_name] = vm.model_dump()
            crash_point("attach.after_store")
            result = self._reconcile_vm(vm_name, before, doc, base)
            crash_point("attach.after_reconcile")
            key = f"namespace {vm.subnqn}/{vm.attachments[disk].nsid}"
            bad = [s for s in result.objects.values() if s.status in NOT_THERE]
            if bad:
                where = "the vhost engine" if chosen == "vhost" and backend == "engine" else "the kernel"
                raise SystemProblem(f"attached in the desired state, but {where} is not there yet: "
                                    + "; ".join(f"{s.label}: {s.reason}" for s in bad[:3]) + f" ({key})")
            return self._attach_result(vm_name, disk, why, memory, doc)

    @staticmethod
    def _check_kernel_vhost_mix(vm: Vm, disk: str, transport: str, backend: str) -> None:
        """A VM on the kernel vhost back-end binds with a key-less host NQN, so its subsystem must not be on a
        fabric port too (nvmetd.vhost_kernel): refuse the mix either way."""
        others = {a.transport if a.transport != "vhost" else f"vhost ({a.backend})"
                  for d, a in vm.attachments.items() if d != disk}
        kernel_vhost = transport == "vhost" and backend == "kernel"
        if kernel_vhost and any(not o.startswith("vhost") for o in others):
            raise UserError(f"VM {vm.name!r} has disks over {', '.join(sorted(others))}: the kernel vhost back-end "
                            "binds without DH-CHAP, so its subsystem cannot also be on a fabric port; detach them "
                            "or set [vhost] backend = engine")
        if transport != "vhost" and vm.vhost_backend() == "kernel":
            raise UserError(f"VM {vm.name!r} is on the kernel vhost back-end (no DH-CHAP): its subsystem cannot also "
                            f"be exported over {transport}; use --transport vhost")

    def _check_transport(self, transport: str, doc: dict[str, Any]) -> None:
        """Refuse a transport this host cannot export before the attachment is recorded: once stored, an
        unexportable attachment would make every later reconcile fail, for every VM."""
        if transport == "rdma" and not self._ports(doc).rdma_address:
            raise Unsupported("no RDMA address is configured: set ports.rdma_address in nvmetd.toml (an address "
                              "on an RDMA-capable interface, e.g. rdma_rxe), then reload nvmetd")

    @staticmethod
    def _check_tls() -> None:
        """Refused before it is stored, as for rdma: a stored TLS attachment on a kernel without the .nvme
        keyring would fail every later reconcile."""
        try:
            tls_psk.keyring_serial()
        except SystemProblem as exc:
            raise Unsupported(f"tls: {exc}") from None

    def _key_file(self, vm: Vm) -> Path:
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.keys_dir / f"{vm.name}.dhchap"
        if not path.exists() or path.read_text() != vm.dhchap_key:
            import os

            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(vm.dhchap_key)
        return path

    def _attach_result(self, vm_name: str, disk: str, why: str, memory: str | None = None,
                       doc: dict[str, Any] | None = None) -> AttachResult:
        doc = self.store.load() if doc is None else doc
        vm = Vm.model_validate(doc["vms"][vm_name])
        att = vm.attachments[disk]
        if att.transport == "vhost":
            return self._vhost_result(vm, disk, att, why, memory)
        ports = self._ports(doc)
        traddr = {"tcp": ports.tcp_address, "rdma": ports.rdma_address or ""}.get(att.transport, "")
        trsvcid = {"tcp": ports.tcp_port, "rdma": ports.rdma_port}.get(att.transport, "")
        if att.tls:
            traddr, trsvcid = ports.tls_address or ports.tcp_address, ports.tls_port
        key_file = self._key_file(vm)
        device = None
        qemu: list[str] = []
        if att.transport == "loop" and self.host_connect:
            conn = self._host_connection(vm)
            device = str(initiator.namespace_device(vm.subnqn, att.nsid, conn))
            node = qmp_node_name(disk)
            qemu = ["-blockdev", f"driver=host_device,filename={device},node-name={node},cache.direct=on,aio=native",
                    "-device", f"virtio-blk-pci,drive={node},id={node}"]
        paths = None
        if att.multipath:  # nvmet reports each port's ANA state; the host's native multipath picks the optimized
            paths = [{"traddr": traddr, "trsvcid": trsvcid, "ana_state": "optimized"},
                     {"traddr": traddr, "trsvcid": ports.tcp_standby_port, "ana_state": "non-optimized"}]
        result = AttachResult(vm_name, disk, att.transport, why, vm.subnqn, vm.hostnqn, att.nsid, traddr, trsvcid,
                              str(key_file), device, qemu, paths=paths)
        if att.tls:
            result.tls, result.tls_identity = True, tls_psk.identity(vm.hostnqn, vm.subnqn)
            result.tls_key_file = str(tls_key_file(self.keys_dir, vm))
            result.notes = ["the port requires TLS 1.3 with this PSK and DH-CHAP with dhchap_key_file: put the PSK "
                            "into the host's .nvme keyring (nvme tls-key --import, or nvme connect --tls "
                            "--tls-key) and run tlshd there"]
        return result

    def rotate_tls_key(self, vm_name: str) -> dict[str, Any]:
        """A new PSK for the VM: the keyring and key file get it at once; sessions already up keep running
        (TLS has negotiated its keys), the next connection needs the new PSK."""
        with self.lock:
            with self.store.transaction() as doc:
                vms = doc.get("vms", {})
                vm = _stored_vm(vms, vm_name)
                if not any(a.tls for a in vm.attachments.values()):
                    raise UserError(f"vm: VM {vm_name!r} has no disk attached with TLS")
                vm.tls_psk = tls_psk.generate_psk()
                vms[vm_name] = vm.model_dump()
            result = self.reconcile()
            return {"vm": vm_name, "tls_key_file": str(tls_key_file(self.keys_dir, vm)),
                    "tls_identity": tls_psk.identity(vm.hostnqn, vm.subnqn), "converged": result.converged}

    def _vhost_result(self, vm: Vm, disk: str, att: Attachment, why: str, memory: str | None) -> AttachResult:
        """All vhost disks of a VM are namespaces of one controller: the QEMU arguments are the same for each,
        and a QEMU that already has the device sees the new disk as a new namespace, without a new device."""
        from vhost_nvme.qemu_args import device_args, kernel_device_args, shared_memory_args

        if att.backend == "kernel":
            qemu = kernel_device_args(vm.subnqn, vm.vhost_hostnqn, dev_id=vhost_device_id(vm.name))
            notes = [f"disk {disk} is namespace {att.nsid} of the VM's subsystem in nvmet, on the vhost port; QEMU "
                     "opens /dev/vhost-nvme itself (as root) and binds with the VM's vhost host NQN (no DH-CHAP: "
                     "the kernel transport has none; that NQN is allowed on this subsystem only, on no fabric)",
                     "add the device once per VM (a running guest sees further disks as new namespaces); guest RAM "
                     "needs no shared memory backend"]
            return AttachResult(vm.name, disk, "vhost", why, vm.subnqn, vm.vhost_hostnqn, att.nsid, "", "", "", None,
                                qemu, notes=notes, vhost_backend="kernel")
        sock = self.vhost.socket_path(vm)
        qemu = (shared_memory_args(memory) if memory else []) + device_args(
            str(sock), dev_id=vhost_device_id(vm.name), subnqn=vm.subnqn)
        notes = [f"disk {disk} is namespace {att.nsid} of the VM's vhost-user-nvme controller; add the device "
                 "once per VM (a running guest sees further disks as new namespaces)"]
        if not memory:
            notes.append("vhost-user needs the VM's RAM to be a shared memfd: add -object memory-backend-memfd,"
                         "id=mem,size=<RAM>,share=on -machine memory-backend=mem (or pass memory to attach)")
        return AttachResult(vm.name, disk, "vhost", why, vm.subnqn, vm.hostnqn, att.nsid, "", "", "", None, qemu,
                            vhost_socket=str(sock), notes=notes, vhost_backend="engine")

    def _host_connection(self, vm: Vm) -> str:
        """The host-side loop controller for this VM (one per VM; new disks appear on it as namespaces)."""
        for ctrl in sorted(initiator.SYS_NVME.glob("nvme*")):
            try:
                if ((ctrl / "subsysnqn").read_text().strip() == vm.subnqn
                        and (ctrl / "transport").read_text().strip() == "loop"):
                    return ctrl.name
            except OSError:
                continue
        conn = initiator.connect(vm.subnqn, vm.hostnqn, "loop", dhchap_key=vm.dhchap_key)
        return conn.controller

    @recorded("detach")
    def detach(self, vm_name: str, disk: str) -> dict[str, Any]:
        if vm_name in self.store.load().get("offload", {}):
            from nvmetd.opi.offload import Offload

            return Offload(self).detach(vm_name, disk)
        with self.lock:
            with self.store.transaction() as doc:
                base = self.store.derived(vm_index.SPEC)
                vms = doc.get("vms", {})
                before = _stored_vm(vms, vm_name)
                vm = before.model_copy(deep=True)
                removed = vm.attachments.pop(disk, None)
                vms[vm_name] = vm.model_dump()
            crash_point("detach.after_store")
            if removed is not None and removed.transport == "loop" and not any(
                    a.transport == "loop" for a in vm.attachments.values()):
                _disconnect_host(vm)
            result = self._reconcile_vm(vm_name, before, doc, base)
            return {"vm": vm_name, "disk": disk, "detached": removed is not None, "converged": result.converged}

    def list_vms(self) -> list[dict[str, Any]]:
        return [self.vm_info(name) for name in sorted(self.store.load().get("vms", {}))]

    def vm_info(self, name: str) -> dict[str, Any]:
        vms = self._vms(self.store.load())
        if name not in vms:
            raise UserError(f"no VM named {name!r}")
        vm = vms[name]
        info = {"name": vm.name, "uuid": vm.uuid, "host_nqn": vm.hostnqn, "subsystem_nqn": vm.subnqn,
                "disks": {d: a.model_dump() for d, a in sorted(vm.attachments.items())}}
        if any(a.tls for a in vm.attachments.values()):
            info["tls_key_file"] = str(tls_key_file(self.keys_dir, vm))
        backend = vm.vhost_backend()
        if backend is not None:
            info["vhost_backend"] = backend
        if backend == "engine":
            info["vhost_socket"] = str(self.vhost.socket_path(vm))
        elif backend == "kernel":
            info["vhost_host_nqn"] = vm.vhost_hostnqn
        return info

    def status(self) -> dict[str, Any]:
        doc = self.store.load()
        result = self.last_result
        pools = {}
        for name in _pools().list_pools(self.pools_root):
            try:
                st = self._pool(name).status()
                pools[name] = st.to_dict() if hasattr(st, "to_dict") else dict(st.__dict__)
            except Exception as exc:  # a broken pool must not hide the others
                pools[name] = {"error": str(exc)}
        counters = self.cfs.counters
        return {"generation": doc.get("generation", 0), "vms": len(doc.get("vms", {})),
                "disks": len(doc.get("disks", {})), "pools": pools,
                "reconcile": None if result is None else result.to_dict(),
                "configfs": {"reads": counters.reads, "changes": counters.changes}}

    def boot(self, wait: float = 120.0) -> ApplyResult:
        """Start-up: finish or roll back interrupted volume operations, then restore the kernel tree."""
        for name in _pools().list_pools(self.pools_root):
            try:
                for line in self._pool(name).recover():
                    log.info("pool %s: %s", name, line)
            except Exception as exc:
                log.error("pool %s: recovery failed: %s", name, exc)
        crash_point("boot.after_recover")
        with self.lock:
            for line in self._finish_journal():
                log.info("%s", line)
        crash_point("boot.after_journal")
        return self.reconcile(wait=wait)


def _disk_entry(pool: str, state: DiskState) -> dict[str, Any]:
    """A disk as stored (nvmetd.state_doc.Disk): every writer records its state."""
    return state_doc.Disk(pool=pool, state=state).model_dump(mode="json")


def _disk_row(doc: dict[str, Any], disk: str) -> dict[str, Any]:
    """A disk's stored row, to read (not to change): reaching it through the view would copy every disk's row.
    Callers validate or test what they read."""
    row = peek(doc, "disks", disk)
    if row is None:
        raise KeyError(disk)
    return row


def _disconnect_host(vm: Vm) -> None:
    import subprocess

    subprocess.run(["nvme", "disconnect", "-n", vm.subnqn], capture_output=True, check=False)


def _stored_vm(vms: dict[str, Any], name: str) -> Vm:
    """The VM of that name in the stored document, validated; a user error if there is none."""
    if name not in vms:
        raise UserError(f"no VM named {name!r}")
    return Vm.model_validate(vms[name])
