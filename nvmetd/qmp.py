"""Hot-plug a host-side namespace into a running QEMU (and out again) over QMP, with qemu.qmp."""

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
        with qmp.listen() as listener:
            await qmp.execute("device_del", {"id": node})
            async with asyncio.timeout(timeout):
                async for event in listener:
                    if event["event"] == "DEVICE_DELETED" and event.get("data", {}).get("device") == node:
                        break
        await qmp.execute("blockdev-del", {"node-name": node})

    asyncio.run(_session(socket_path, steps))
