"""The READY rule in isolation (the kernel run is tests/kernel/test_readiness.py): READY=1 once, only when the API
serves and the last restore/reconcile converged; until then STATUS= says why."""

from __future__ import annotations

from nvmetd.readiness import ServiceReadiness
from target.apply import ApplyResult, ObjectStatus


def _result(status: str) -> ApplyResult:
    r = ApplyResult()
    r.objects["ports/1/subsystems/x"] = ObjectStatus(status, "port 1 -> x", "address 192.0.2.1 is not up yet")
    return r


def test_ready_only_after_convergence_and_once() -> None:
    sent: list[str] = []
    r = ServiceReadiness(sent.append, "serving on /s")
    r.serving()
    assert sent == ["STATUS=NOT READY: restore has not finished"]
    r.converged(_result("pending"), "restore")
    assert sent[-1] == ("STATUS=NOT READY: restore did not converge: pending port 1 -> x: "
                        "address 192.0.2.1 is not up yet")
    assert not any("READY=1" in m for m in sent)
    r.converged(_result("ok"), "reconcile")
    assert sent[-1] == "READY=1\nSTATUS=serving on /s"
    r.failed("reconcile failed: boom")
    r.converged(_result("ok"), "reconcile")
    assert sum("READY=1" in m for m in sent) == 1 and sent[-2:] == [
        "STATUS=NOT READY: reconcile failed: boom", "STATUS=serving on /s"]


def test_converged_before_the_socket_serves_waits_for_it() -> None:
    sent: list[str] = []
    r = ServiceReadiness(sent.append, "serving on /s")
    r.converged(_result("ok"), "restore")
    assert sent == []
    r.serving()
    assert sent == ["READY=1\nSTATUS=serving on /s"]
