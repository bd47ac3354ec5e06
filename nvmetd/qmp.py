"""Hot-plug a host-side namespace into a running QEMU (and out again) over QMP, with qemu.qmp.

Both directions are safe to repeat, like the attach and detach they follow: what is already there (or already
gone) is left alone. On a q35 machine the root complex (pcie.0) takes no hot-plugged devices, so the disk goes
into a free `pcie-root-port` (the way libvirt prepares q35 guests for hot-plug); on a pc machine it goes on the
hot-pluggable pci.0.

Unplugging is a request to the guest: QEMU removes the device when the guest lets go (DEVICE_DELETED). A slot
the guest never powered on (native PCIe hot-plug, e.g. a paused VM) is released at once; with ACPI hot-plug an
unplug waits for the guest's eject, so a stopped guest keeps the device and unplug reports that.

vhost gives one vhost-user-nvme controller per VM: it is plugged with the VM's first vhost disk and unplugged with
its last; the disks between are namespaces of it (the guest learns of them from the controller itself).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

# QEMU's rule for node names and device ids: a letter first, then letters, digits, '-', '_' and '.', < 32 chars
_QEMU_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")


class QmpError(Exception):
    pass


async def _session(socket_path: str, steps) -> Any:
    from qemu.qmp import QMPClient

    qmp = QMPClient("nvmetd")
    try:
        await qmp.connect(socket_path)
    except Exception as exc:
        raise QmpError(f"cannot connect to QMP socket {socket_path}: {exc}") from None
    try:
        return await steps(qmp)
    except QmpError:
        raise
    except Exception as exc:
        raise QmpError(f"QEMU refused: {exc}") from None
    finally:
        await qmp.disconnect()


def qemu_id(prefix: str, name: str) -> str:
    """A QEMU id for NAME: our names may hold ':' or be long, which QEMU ids may not."""
    qid = f"{prefix}{name}"
    if _QEMU_ID.match(qid):
        return qid
    return prefix + hashlib.sha256(name.encode()).hexdigest()[:16]


def node_name(disk: str) -> str:
    """The block node and device id for DISK."""
    return qemu_id("nvmetd-", disk)


async def _node_exists(qmp, node: str) -> bool:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return any(n.get("node-name") == node for n in nodes)


async def _device_exists(qmp, device_id: str) -> bool:
    peripherals = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return any(p["name"] == device_id for p in peripherals)


async def _children(qmp, path: str) -> list[tuple[str, str]]:
    """(QOM path, type) of the devices under a container such as /machine/peripheral."""
    try:
        entries = await qmp.execute("qom-list", {"path": path})
    except Exception:  # the container is made on first use; no anonymous devices means none at all
        return []
    return [(f"{path}/{e['name']}", e["type"][6:-1]) for e in entries if e["type"].startswith("child<")]


async def _free_bus(qmp) -> str | None:
    """An empty pcie-root-port to plug into, or None where the root bus itself takes hot-plug (pc machines).

    Occupancy comes from QOM (each device's parent_bus), not from query-pci: before the guest has numbered the
    bridges' buses, query-pci does not list what sits behind them."""
    devices = [*await _children(qmp, "/machine/peripheral"), *await _children(qmp, "/machine/peripheral-anon")]
    root_ports = [path for path, kind in devices if kind == "pcie-root-port" and "peripheral/" in path]
    used = set()
    for path, _ in devices:
        parent = await qmp.execute("qom-get", {"path": path, "property": "parent_bus"})
        used.add(parent.rsplit("/", 1)[0])  # /machine/peripheral/rp1/rp1 -> the port /machine/peripheral/rp1
    for port in root_ports:
        if port not in used:
            return port.rsplit("/", 1)[1]  # the port's id names its bus
    machine = await qmp.execute("qom-get", {"path": "/machine", "property": "type"})
    if "q35" in machine:
        raise QmpError("no free pcie-root-port to hot-plug into: start the VM with spare ones "
                       "(-device pcie-root-port,id=rpN,chassis=N)")
    return None


def hotplug(socket_path: str, disk: str, device: str) -> dict[str, str]:
    node = node_name(disk)

    async def steps(qmp) -> dict[str, str]:
        result = {"node": node, "device_id": node}
        if await _device_exists(qmp, node):  # a repeated attach: already plugged
            return result
        bus = await _free_bus(qmp)  # before anything is added, so a refusal leaves nothing behind
        added_node = False
        if not await _node_exists(qmp, node):
            await qmp.execute("blockdev-add", {"driver": "host_device", "filename": device, "node-name": node,
                                               "cache": {"direct": True}})
            added_node = True
        args = {"driver": "virtio-blk-pci", "drive": node, "id": node}
        if bus:
            args["bus"] = bus
            result["bus"] = bus
        try:
            await qmp.execute("device_add", args)
        except Exception:
            if added_node:  # leave nothing half-plugged behind
                await qmp.execute("blockdev-del", {"node-name": node})
            raise
        return result

    return asyncio.run(_session(socket_path, steps))


def unplug(socket_path: str, disk: str, timeout: float = 30.0) -> None:
    """Remove the device (waiting for QEMU's DEVICE_DELETED: a running guest must let go first), then the node."""
    node = node_name(disk)

    async def steps(qmp) -> None:
        await _device_del(qmp, node, timeout)
        if await _node_exists(qmp, node):
            await qmp.execute("blockdev-del", {"node-name": node})

    asyncio.run(_session(socket_path, steps))


async def _device_del(qmp, device_id: str, timeout: float) -> None:
    """Ask the guest to let go of the device and wait for QEMU's DEVICE_DELETED (sent once it is finalized)."""
    if not await _device_exists(qmp, device_id):
        return
    with qmp.listener("DEVICE_DELETED") as listener:
        await qmp.execute("device_del", {"id": device_id})
        try:
            async with asyncio.timeout(timeout):
                async for event in listener:
                    if event["event"] == "DEVICE_DELETED" and event.get("data", {}).get("device") == device_id:
                        break
        except TimeoutError:
            raise QmpError(f"the guest did not release device {device_id} within {timeout:g} s") from None


def hotplug_vhost(socket_path: str, dev_id: str, engine_socket: str, subnqn: str, bus: str | None = None,
                  reconnect_ms: int = 200) -> dict[str, object]:
    """Plug the VM's vhost-user-nvme controller unless it is there already (then the disk is a new namespace).

    The VM's RAM must be a shared memfd backend for the device to realize; QEMU says so if it is not."""
    chardev = f"{dev_id}-chr"

    async def steps(qmp) -> dict[str, object]:
        if await _device_exists(qmp, dev_id):
            return {"device_id": dev_id, "plugged": False,
                    "why": "the controller is there: the disk is a new namespace"}
        port = bus or await _free_bus(qmp)
        await qmp.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": engine_socket}}, "server": False,
            "reconnect-ms": reconnect_ms}}})
        args: dict[str, object] = {"driver": "vhost-user-nvme", "id": dev_id, "chardev": chardev, "subnqn": subnqn}
        if port:
            args["bus"] = port
        try:
            await qmp.execute("device_add", args)
        except Exception:
            await qmp.execute("chardev-remove", {"id": chardev})  # leave nothing half-plugged behind
            raise
        return {"device_id": dev_id, "plugged": True, **({"bus": port} if port else {})}

    return asyncio.run(_session(socket_path, steps))


def unplug_vhost(socket_path: str, dev_id: str, timeout: float = 30.0) -> None:
    """Remove the VM's vhost-user-nvme controller (when its last vhost disk goes), then its chardev."""

    async def steps(qmp) -> None:
        await _device_del(qmp, dev_id, timeout)
        chardev = f"{dev_id}-chr"
        if chardev in {c["label"] for c in await qmp.execute("query-chardev")}:
            await qmp.execute("chardev-remove", {"id": chardev})

    asyncio.run(_session(socket_path, steps))
