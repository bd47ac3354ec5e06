"""The API's target-tree routes: what `nvmetctl apply/diff/repair/restore/status/import/export` ask nvmetd for.

nvmetd is the one writer of configfs and of the store: the CLI sends the document, nvmetd validates, records and
applies it under its own lock, so a change from the CLI and the daemon's own reconcile never interleave.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from nvmetd.target_ops import TargetOps


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    timeout: float = Field(120.0, ge=0, le=3600, description="seconds to wait for late devices and addresses")


def target_router(ops: TargetOps, responses: dict[int | str, dict[str, Any]]) -> APIRouter:
    router = APIRouter(responses=responses)

    @router.put("/v1/target")
    async def put_target(state: dict[str, Any]) -> dict[str, Any]:
        """Make `state` (nvmetd target JSON) the declared tree and apply it."""
        return await run_in_threadpool(ops.apply, state)

    @router.post("/v1/target/plan")
    async def plan_target(state: dict[str, Any]) -> dict[str, Any]:
        """What applying `state` would change (nothing is written)."""
        return await run_in_threadpool(ops.plan, state)

    @router.get("/v1/target/drift")
    async def drift() -> dict[str, Any]:
        return await run_in_threadpool(ops.drift)

    @router.post("/v1/target/repair")
    async def repair() -> dict[str, Any]:
        return await run_in_threadpool(ops.repair)

    @router.post("/v1/target/restore")
    async def restore(req: RestoreRequest) -> dict[str, Any]:
        return await run_in_threadpool(ops.restore, req.timeout)

    @router.get("/v1/target/status")
    async def target_status() -> dict[str, Any]:
        return await run_in_threadpool(ops.status)

    @router.get("/v1/target/export")
    async def export(live: bool = False, nvmetcli: bool = False, with_secrets: bool = False) -> dict[str, Any]:
        """The declared (or live) tree; DH-CHAP keys are left out unless with_secrets."""
        return await run_in_threadpool(ops.export, live, nvmetcli, with_secrets)

    @router.post("/v1/target/import")
    async def import_nvmetcli(config: Annotated[dict[str, Any], Body()], apply: bool = True) -> dict[str, Any]:
        """Take nvmetcli's config.json as the declared tree (and apply it)."""
        return await run_in_threadpool(ops.import_nvmetcli, config, apply)

    return router
