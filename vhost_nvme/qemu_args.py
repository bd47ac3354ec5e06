"""QEMU command-line fragments for the vhost-user-nvme device (qemu_patches/), for nvmetd and the tests.

The device needs three things on QEMU's command line:

* guest RAM the engine can map: a ``memory-backend-memfd`` with ``share=on`` used as the machine's memory;
* a socket chardev to the engine, with ``reconnect-ms`` so that an engine restart is survived;
* the ``vhost-user-nvme`` PCI device itself.

Values are escaped for QEMU's option syntax (a comma inside a value is written twice).
"""

from __future__ import annotations

DEFAULT_RECONNECT_MS = 200


def _q(value: str) -> str:
    """Escape a value for QEMU's key=value,key=value option syntax."""
    return value.replace(",", ",,")


def shared_memory_args(size: str, mem_id: str = "vnmem") -> list[str]:
    """Guest RAM as a shareable memfd (``size`` as QEMU takes it: ``512M``, ``4G``)."""
    return ["-object", f"memory-backend-memfd,id={_q(mem_id)},size={_q(size)},share=on",
            "-machine", f"memory-backend={_q(mem_id)}"]


def device_args(socket_path: str, dev_id: str = "vn0", reconnect_ms: int = DEFAULT_RECONNECT_MS,
                max_ioqpairs: int | None = None, subnqn: str | None = None, bus: str | None = None,
                addr: str | None = None) -> list[str]:
    """The chardev and the device for one engine socket (the engine serves one controller per socket)."""
    if reconnect_ms < 0:
        raise ValueError("reconnect_ms must be >= 0")
    chardev = f"{dev_id}-chr"
    chr_opts = f"socket,id={_q(chardev)},path={_q(socket_path)}"
    if reconnect_ms:
        chr_opts += f",reconnect-ms={reconnect_ms}"
    dev_opts = f"vhost-user-nvme,id={_q(dev_id)},chardev={_q(chardev)}"
    if max_ioqpairs is not None:
        if not 1 <= max_ioqpairs <= 63:
            raise ValueError("max_ioqpairs must be 1..63")
        dev_opts += f",max-ioqpairs={max_ioqpairs}"
    if subnqn:
        dev_opts += f",subnqn={_q(subnqn)}"
    if bus:
        dev_opts += f",bus={_q(bus)}"
    if addr:
        dev_opts += f",addr={_q(addr)}"
    return ["-chardev", chr_opts, "-device", dev_opts]


def qemu_args(socket_path: str, memory: str | None = "512M", dev_id: str = "vn0",
              reconnect_ms: int = DEFAULT_RECONNECT_MS, max_ioqpairs: int | None = None,
              subnqn: str | None = None) -> list[str]:
    """Everything QEMU needs for one vhost-user-nvme controller served on ``socket_path``.

    Pass ``memory=None`` when the VM's RAM is already a shared memfd backend (it must be, for every
    vhost-user device of that VM): the fragment then carries only the chardev and the device.
    """
    args = shared_memory_args(memory) if memory else []
    return args + device_args(socket_path, dev_id, reconnect_ms, max_ioqpairs, subnqn)


def kernel_device_args(subnqn: str, hostnqn: str, dev_id: str = "vn0", max_ioqpairs: int | None = None,
                       bus: str | None = None, addr: str | None = None) -> list[str]:
    """The device on the in-kernel back-end (``backend=kernel``): QEMU opens ``/dev/vhost-nvme`` itself and binds
    it to ``subnqn`` as ``hostnqn``.  No chardev and no shared memory backend: the kernel's worker runs in QEMU's
    own address space."""
    dev_opts = f"vhost-user-nvme,id={_q(dev_id)},backend=kernel,subnqn={_q(subnqn)},hostnqn={_q(hostnqn)}"
    if max_ioqpairs is not None:
        if not 1 <= max_ioqpairs <= 63:
            raise ValueError("max_ioqpairs must be 1..63")
        dev_opts += f",max-ioqpairs={max_ioqpairs}"
    if bus:
        dev_opts += f",bus={_q(bus)}"
    if addr:
        dev_opts += f",addr={_q(addr)}"
    return ["-device", dev_opts]
