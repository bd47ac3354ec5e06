"""nvmetd is READY only when the kernel matches its state: after a restore that did not converge (a port address
that is not up) it serves the API but stays NOT READY, STATUS= naming what it waits for, until the drift timer's
reconcile converges; and outside boot a missing address is `pending` (waiting), not `failed`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from backends import pools
from target.configfs import ConfigFS
from tests.kernel import hostside
from tests.kernel.notify_socket import Notifications
from tests.kernel.service_fixture import Daemon

pytestmark = pytest.mark.kernel

LATE_ADDR = "192.0.2.88"  # TEST-NET-1 on a dummy interface inside the rig VM
LINK = "nvmetd-rdy"


def _wait(what: str, check, timeout: float = 300.0):  # the bound only stops a hung test
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_not_ready_until_the_address_appears(cfs: ConfigFS, scratch: Path) -> None:
    subprocess.run(["ip", "link", "add", LINK, "type", "dummy"], check=True, capture_output=True)
    subprocess.run(["ip", "link", "set", LINK, "up"], check=True, capture_output=True)
    (scratch / "nvmetd.toml").write_text(f'[ports]\ntcp_address = "{LATE_ADDR}"\ntcp_port = "4440"\n')
    d = Daemon(scratch, extra_args=["--drift-interval", "2"])
    pools.create_pool("file", "files", devices=[str(scratch / "files")], root=d.pools_root)
    notify = Notifications(scratch / "notify.sock")
    try:
        d.start()
        assert d.request("POST", "/v1/disks", {"name": "r0", "pool": "files", "size": "4M"}).status_code == 200
        resp = d.request("PUT", "/v1/vms/vm-r/disks/r0", {"transport": "tcp"})
        assert resp.status_code >= 500 and "not there yet" in resp.json()["error"], resp.text
        objects = d.request("GET", "/v1/status").json()["reconcile"]["objects"]
        port_links = {p: o for p, o in objects.items() if p.startswith("ports/") and "/subsystems/" in p}
        assert port_links and all(o["status"] == "pending" and LATE_ADDR in o["reason"]
                                  for o in port_links.values()), port_links
        nqn = d.request("GET", "/v1/vms/vm-r").json()["subsystem_nqn"]
        d.stop()

        notify.start()
        d.env = {"NOTIFY_SOCKET": str(notify.path)}
        d.start(restore_timeout=2)
        pid = d.proc.pid
        # the first STATUS may be "restore has not finished" (the API can serve before the restore gives up)
        status = _wait("STATUS=NOT READY naming the address",
                       lambda: [m for _, m in notify.from_pid(pid) if "NOT READY" in m and LATE_ADDR in m])
        assert "restore did not converge" in status[0] or "reconcile did not converge" in status[0], status
        assert not [m for _, m in notify.from_pid(pid) if "READY=1" in m.splitlines()]
        link = Path(cfs.root) / "ports"
        assert not list(link.glob(f"*/subsystems/{nqn}"))

        subprocess.run(["ip", "addr", "add", f"{LATE_ADDR}/32", "dev", LINK], check=True, capture_output=True)
        ready = _wait("READY=1", lambda: [m for _, m in notify.from_pid(pid) if "READY=1" in m.splitlines()])
        assert f"STATUS=serving on {d.socket}" in ready[0]
        assert list(link.glob(f"*/subsystems/{nqn}")), "READY before the port served the VM's subsystem"
        # and after READY the reconcile keeps it converged: no later NOT READY
        ready_at = next(t for t, m in notify.from_pid(pid) if "READY=1" in m.splitlines())
        assert d.request("POST", "/v1/reconcile").json()["converged"]
        assert not [m for _, m in notify.from_pid(pid, ready_at) if "NOT READY" in m]
        assert d.request("DELETE", "/v1/vms/vm-r/disks/r0").status_code == 200
    finally:
        d.stop()
        if hasattr(notify, "thread"):  # started
            notify.close()
        for sub in cfs.listdir("subsystems"):
            hostside.disconnect(sub)
        subprocess.run(["ip", "link", "del", LINK], check=False, capture_output=True)
