"""Boot-aware restore: apply what is ready, wait for the rest, never wipe and never give up on everything.

At boot the state file is there before its block devices (LVM, ZFS, iSCSI come up later) and before its
addresses (DHCP, bonding). Restore loads the modules it needs, applies, and for each object still pending waits
for the event that could change that (a udev block device, a netlink address) with a bounded deadline, then
re-applies. Re-applying is cheap: objects that already hold cost reads, not writes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import time
from contextlib import ExitStack, suppress

from target.apply import ApplyResult, Readiness, apply_state
from target.configfs import ConfigFS
from target.features import load_modules, require
from target.model import TargetState
from target.status import Status

log = logging.getLogger("nvmetd.restore")


class SystemReadiness(Readiness):
    """Devices from the filesystem, addresses from the kernel's own address list (netlink, via pyroute2)."""

    def __init__(self) -> None:
        self._addresses: set[str] | None = None

    def refresh(self) -> None:
        self._addresses = None

    def device_missing(self, path: str) -> str | None:
        return None if os.path.exists(path) else f"device {path} is not present yet"

    def address_missing(self, adrfam: str, traddr: str) -> str | None:
        addr = ipaddress.ip_address(traddr)
        if addr.is_unspecified:
            return None
        if self._addresses is None:
            self._addresses = local_addresses()
        return None if str(addr) in self._addresses else f"address {traddr} is not on any interface yet"


def local_addresses() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))) for a in ipr.get_addr()}


class EventWaiter:
    """Wakes up on a new block device (udev) or a new address (netlink), or after the timeout."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._fds: list[object] = []
        with suppress(Exception):  # no udev socket (e.g. containers): fall back to the timer alone
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by("block")
            monitor.start()
            self._udev = monitor
            self._fds.append(monitor)
        with suppress(Exception):
            from pyroute2 import IPRoute
            from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

            ipr = IPRoute()
            ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            self._stack.callback(ipr.close)
            self._ipr = ipr
            self._fds.append(ipr)

    def wait(self, timeout: float) -> bool:
        """True if an event arrived before the timeout."""
        if not self._fds:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select(self._fds, [], [], timeout)
        for src in ready:
            with suppress(Exception):
                if src is getattr(self, "_udev", None):
                    while self._udev.poll(timeout=0) is not None:
                        pass
                else:
                    self._ipr.get()
        return bool(ready)

    def close(self) -> None:
        self._stack.close()


def restore(state: TargetState, cfs: ConfigFS, timeout: float = 120.0, max_interval: float = 5.0,
            on_progress=None) -> ApplyResult:
    """Apply `state`, then keep converging pending objects until done or `timeout` seconds have passed."""
    failed = load_modules(state)
    for module, reason in failed.items():
        log.warning("module %s: %s", module, reason)
    require(state, cfs)
    readiness = SystemReadiness()
    waiter = EventWaiter()
    deadline = time.monotonic() + timeout
    interval = 0.25
    try:
        result = apply_state(state, cfs, readiness=readiness)
        rounds = 1
        while not result.converged and time.monotonic() < deadline:
            if on_progress:
                on_progress(result)
            pending = result.by_status(Status.PENDING)
            log.info("restore round %d: %d objects pending, %d failed", rounds, len(pending),
                     len(result.by_status(Status.FAILED)))
            got_event = waiter.wait(min(interval, max(0.0, deadline - time.monotonic())))
            interval = 0.25 if got_event else min(interval * 2, max_interval)
            readiness.refresh()
            result = apply_state(state, cfs, readiness=readiness)
            rounds += 1
        return result
    finally:
        waiter.close()
