"""A test/benchmark guest: plays QEMU (memory, doorbell traps, interrupts) and a guest NVMe driver."""

from .driver import Cqe, GuestDriver, GuestDriverError, IoQueue
from .memory import GuestMemory

__all__ = ["Cqe", "GuestDriver", "GuestDriverError", "GuestMemory", "IoQueue"]
