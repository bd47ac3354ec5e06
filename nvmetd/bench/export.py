"""Export one disk through the project's control plane (target/), and take exactly that export away again.

The benchmark may run on a host that already serves real exports, so it adds its own subsystem, host and port
with `prune=False` and, when done, applies the live tree minus those three objects. Before that removal it checks
the plan: if anything other than the benchmark's own objects would change, it stops and says so instead (that
would mean the live tree does not round-trip through target/, a bug to report, not to paper over).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from target.apply import ApplyResult, apply_state, diff
from target.configfs import ConfigFS
from target.live import read_state
from target.model import TargetState, parse_state

NQN_PREFIX = "nqn.2026-11.io.nvmetd:bench-"


class ExportError(Exception):
    """The control plane did not converge on the export (or its removal); carries the per-object reasons."""


def _reasons(result: ApplyResult) -> str:
    bad = [f"{st.label}: {st.status} {st.reason}".strip() for st in result.objects.values()
           if st.status not in ("ok", "changed", "removed")]
    return "; ".join(bad) or "not converged"


@dataclass
class Export:
    cfs: ConfigFS
    subnqn: str
    hostnqn: str
    device_path: str
    port: dict[str, Any]  # Port fields: id, trtype, adrfam, traddr, trsvcid

    def desired(self) -> TargetState:
        return parse_state({
            "hosts": [{"nqn": self.hostnqn}],
            "subsystems": [{"nqn": self.subnqn, "allowed_hosts": [self.hostnqn], "model": "nvmetd bench",
                            "namespaces": [{"nsid": 1, "device_path": self.device_path}]}],
            "ports": [{**self.port, "subsystems": [self.subnqn]}],
        })

    def up(self) -> ApplyResult:
        result = apply_state(self.desired(), self.cfs, prune=False)
        if not result.converged:
            # leave nothing half-made behind
            self.down(strict=False)
            raise ExportError(f"exporting {self.device_path} as {self.subnqn}: {_reasons(result)}")
        return result

    def _mine(self, op: str) -> bool:
        ours = (f"subsystems/{self.subnqn}", f"ports/{self.port['id']}", f"hosts/{self.hostnqn}")
        path = op.split(" ", 1)[1] if " " in op else op
        return any(path == o or path.startswith(o + "/") for o in ours)

    def down(self, strict: bool = True) -> None:
        live = read_state(self.cfs)
        remaining = TargetState.model_construct(
            discovery_nqn=live.discovery_nqn,
            hosts=[h for h in live.hosts if h.nqn != self.hostnqn],
            subsystems=[s for s in live.subsystems if s.nqn != self.subnqn],
            ports=[p for p in live.ports if p.id != self.port["id"]],
        )
        foreign = [op for op in diff(remaining, self.cfs) if not self._mine(op)]
        if foreign:
            if strict:
                raise ExportError("removing the benchmark export would also change: " + "; ".join(foreign[:5]))
            return
        result = apply_state(remaining, self.cfs)
        if strict and not result.converged:
            raise ExportError(f"removing {self.subnqn}: {_reasons(result)}")
