"""nvmetd: vhost_nvme - the shared-memory NVMe path.

A userspace NVMe controller engine that processes a guest's submission and completion queues in place,
in guest memory, with no network hop.  `controller` (registers, admin queue) and `server` (the socket
protocol of PROTOCOL.md) are Python control plane; `csrc/` is the C data plane built through cffi;
`guest` plays QEMU plus a guest NVMe driver for the tests and `bench`.
"""
