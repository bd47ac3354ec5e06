"""Hot-plug a disk into a running QEMU (and out again) over QMP, with qemu.qmp.

loop/tcp/rdma give a host block device: it becomes a blockdev + virtio-blk device of its own. vhost gives one
vhost-user-nvme controller per VM: it is plugged with the VM's first vhost disk; later disks are namespaces of it
(the guest learns of them from the controller), so there is nothing to plug for them.
"""

from __future__ import annotations

import asyncio
from typing import Any


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
    except Exception as exc:
        raise QmpError(f"QEMU refused: {exc}") from None
    finally:
        await qmp.disconnect()


def node_name(disk: str) -> str:
    return f"nvmetd-{disk}"


def hotplug(socket_path: str, disk: str, device: str) -> dict[str, str]:
    node = node_name(disk)

    async def steps(qmp) -> dict[str, str]:
        await qmp.execute("blockdev-add", {"driver": "host_device", "filename": device, "node-name": node,
                                           "cache": {"direct": True}})
        await qmp.execute("device_add", {"driver": "virtio-blk-pci", "drive": node, "id": node})
        return {"node": node, "device_id": node}

    return asyncio.run(_session(socket_path, steps))


def unplug(socket_path: str, disk: str, timeout: float = 30.0) -> None:
    node = node_name(disk)

    async def steps(qmp) -> None:
        if node in await _peripherals(qmp):
            await qmp.execute("device_del", {"id": node})
            await _wait_gone(qmp, node, timeout)
        if node in {n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})}:
            await qmp.execute("blockdev-del", {"node-name": node})

    asyncio.run(_session(socket_path, steps))


async def _peripherals(qmp) -> set[str]:
    return {p["name"] for p in await qmp.execute("qom-list", {"path": "/machine/peripheral"})}


async def _wait_gone(qmp, dev_id: str, timeout: float) -> None:
    """device_del only asks the guest to let go. Wait until QEMU no longer has the device, by looking at it
    rather than for DEVICE_DELETED: that event comes only when the device is finalized, which a leaked reference
    delays forever (the vhost-user-nvme device leaked one until its exit deleted its BAR subregion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while dev_id in await _peripherals(qmp):
        if asyncio.get_running_loop().time() > deadline:
            raise QmpError(f"the guest did not release device {dev_id} within {timeout:.0f} s "
                           "(it must acknowledge the unplug)")
        await asyncio.sleep(0.2)


def hotplug_vhost(socket_path: str, dev_id: str, engine_socket: str, subnqn: str, bus: str | None = None,
                  reconnect_ms: int = 200) -> dict[str, object]:
    """Plug the VM's vhost-user-nvme controller unless it is there already (then the disk is a new namespace).

    The VM's RAM must be a shared memfd backend for the device to realize; QEMU says so if it is not."""
    chardev = f"{dev_id}-chr"

    async def steps(qmp) -> dict[str, object]:
        if dev_id in await _peripherals(qmp):
            return {"device_id": dev_id, "plugged": False,
                    "why": "the controller is there: the disk is a new namespace"}
        await qmp.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": engine_socket}}, "server": False,
            "reconnect-ms": reconnect_ms}}})
        args: dict[str, object] = {"driver": "vhost-user-nvme", "id": dev_id, "chardev": chardev, "subnqn": subnqn}
        if bus:
            args["bus"] = bus
        try:
            await qmp.execute("device_add", args)
        except Exception:
            await qmp.execute("chardev-remove", {"id": chardev})
            raise
        return {"device_id": dev_id, "plugged": True}

    return asyncio.run(_session(socket_path, steps))


def unplug_vhost(socket_path: str, dev_id: str, timeout: float = 30.0) -> None:
    """Remove the VM's vhost-user-nvme controller (when its last vhost disk goes) and its chardev."""

    async def steps(qmp) -> None:
        if dev_id in await _peripherals(qmp):
            await qmp.execute("device_del", {"id": dev_id})
            await _wait_gone(qmp, dev_id, timeout)
        chardev = f"{dev_id}-chr"
        deadline = asyncio.get_running_loop().time() + timeout
        while chardev in {c["label"] for c in await qmp.execute("query-chardev")}:
            try:
                await qmp.execute("chardev-remove", {"id": chardev})
            except Exception as exc:  # "busy" until QEMU has finalized the unplugged device
                if "busy" not in str(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    asyncio.run(_session(socket_path, steps))
