"""The HTTP/JSON API (FastAPI: the OpenAPI schema is published at /openapi.json), served on a Unix socket.

Requests that change state run one at a time (the Manager's lock) in a worker thread, so slow storage work never
blocks reads or /metrics. Each change is idempotent: retrying a create or an attach returns the same answer.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from nvmetd.errors import SystemProblem, UserError
from nvmetd.manager import Manager
from nvmetd.metrics import render_metrics
from target.model import StateError, parse_state


class DiskCreate(BaseModel):
    name: str
    pool: str
    size: str | int = Field(description="bytes, or with a unit: 10G, 512M")
    tenant: str = "default"
    thin: bool = True
    encrypted: bool = False
    compression: str = "off"


class DiskResize(BaseModel):
    size: str | int
    force: bool = False


class Snapshot(BaseModel):
    snapshot: str


class Clone(BaseModel):
    snapshot: str
    name: str


class AttachRequest(BaseModel):
    transport: Literal["auto", "tcp", "loop", "rdma", "vhost"] = "auto"
    vm_uuid: str | None = None
    memory: str | None = Field(default=None, description="vhost: the VM's RAM size (512M, 4G); the QEMU "
                               "arguments then include the shared memory backend vhost-user needs")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def create_app(manager: Manager) -> FastAPI:
    app = FastAPI(title="nvmetd", version="1", description="nvmetd: NVMe-oF target control for VM hosts")

    @app.exception_handler(UserError)
    async def _user(_: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StateError)
    async def _state(_: Request, exc: StateError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(SystemProblem)
    async def _system(_: Request, exc: SystemProblem) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        from backends.errors import BackendError, NotFoundError

        if isinstance(exc, NotFoundError):
            return _error(404, str(exc))
        if isinstance(exc, BackendError):
            return _error(409, str(exc))
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await run_in_threadpool(manager.status)

    @app.get("/v1/disks")
    async def list_disks() -> list[dict[str, Any]]:
        return await run_in_threadpool(manager.list_disks)

    @app.post("/v1/disks")
    async def create_disk(req: DiskCreate) -> dict[str, Any]:
        return await run_in_threadpool(manager.create_disk, req.name, req.pool, req.size, req.tenant, req.thin,
                                       req.encrypted, req.compression)

    @app.get("/v1/disks/{name}")
    async def show_disk(name: str) -> dict[str, Any]:
        return await run_in_threadpool(manager.disk_info, name)

    @app.delete("/v1/disks/{name}")
    async def delete_disk(name: str) -> dict[str, Any]:
        await run_in_threadpool(manager.delete_disk, name)
        return {"deleted": name}

    @app.post("/v1/disks/{name}/resize")
    async def resize_disk(name: str, req: DiskResize) -> dict[str, Any]:
        return await run_in_threadpool(manager.resize_disk, name, req.size, req.force)

    @app.post("/v1/disks/{name}/snapshots")
    async def snapshot_disk(name: str, req: Snapshot) -> dict[str, Any]:
        return await run_in_threadpool(manager.snapshot_disk, name, req.snapshot)

    @app.post("/v1/disks/{name}/clones")
    async def clone_disk(name: str, req: Clone) -> dict[str, Any]:
        return await run_in_threadpool(manager.clone_disk, name, req.snapshot, req.name)

    @app.get("/v1/vms")
    async def list_vms() -> list[dict[str, Any]]:
        return await run_in_threadpool(manager.list_vms)

    @app.get("/v1/vms/{vm}")
    async def show_vm(vm: str) -> dict[str, Any]:
        return await run_in_threadpool(manager.vm_info, vm)

    @app.put("/v1/vms/{vm}/disks/{disk}")
    async def attach(vm: str, disk: str, req: AttachRequest) -> dict[str, Any]:
        result = await run_in_threadpool(manager.attach, vm, disk, req.transport, req.vm_uuid, req.memory)
        return result.to_dict()

    @app.delete("/v1/vms/{vm}/disks/{disk}")
    async def detach(vm: str, disk: str) -> dict[str, Any]:
        return await run_in_threadpool(manager.detach, vm, disk)

    @app.post("/v1/reconcile")
    async def reconcile() -> dict[str, Any]:
        result = await run_in_threadpool(manager.reconcile)
        return result.to_dict()

    @app.put("/v1/target")
    async def put_target(state: dict[str, Any]) -> dict[str, Any]:
        result = await run_in_threadpool(manager.apply_base, parse_state(state))
        return result.to_dict()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        body, content_type = await run_in_threadpool(render_metrics, manager)
        return PlainTextResponse(body, media_type=content_type)

    return app
