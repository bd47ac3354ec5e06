"""The HTTP/JSON API (FastAPI: the OpenAPI schema is published at /openapi.json), served on a Unix socket.

Requests that change state run one at a time (the Manager's lock) in a worker thread, so slow storage work never
blocks reads or /metrics. Each change is idempotent: retrying a create or an attach returns the same answer.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from backends.errors import BackendError, NotFoundError, UnavailableError
from nvmetd import pool_ops
from nvmetd.api_target import target_router
from nvmetd.errors import SystemProblem, Unsupported, UserError
from nvmetd.manager import Manager
from nvmetd.metrics import render_metrics
from nvmetd.target_ops import TargetOps
from target import validate
from target.configfs import ConfigfsError
from target.features import FeatureError
from target.model import StateError

log = logging.getLogger("nvmetd.api")

# The rules below are published in the OpenAPI schema (pattern, length) and enforced by the validators, whose
# messages name the field; names are refused here, before any of them reaches a pool, a path or configfs.
VOLUME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]*$"  # backends.names: no ':' (LVM), no '..' anywhere
VM_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._:-]*$"  # target.validate.safe_name


def _backend_rule(what: str, max_len: int = 64):
    def check(value: str) -> str:
        from backends import names
        from backends.errors import BackendError

        try:
            names.name(value, what)
        except BackendError as exc:
            raise ValueError(str(exc)) from None
        if len(value) > max_len:
            raise ValueError(f"{what} {value[:20]!r}... is {len(value)} characters; at most {max_len}")
        return value

    return check


def _size(value: str | int) -> str | int:
    from backends import names
    from backends.errors import BackendError

    try:
        names.size(value)
    except BackendError as exc:
        raise ValueError(str(exc)) from None
    return value


def _vm_name(value: str) -> str:
    return validate.safe_name(value, "VM name")


def _uuid(value: str | None) -> str | None:
    return None if value is None else validate.uuid_str(value)


def _name_schema(pattern: str, max_len: int) -> dict[str, Any]:
    return {"pattern": pattern, "minLength": 1, "maxLength": max_len}


DiskName = Annotated[str, AfterValidator(_backend_rule("disk name")),
                     Field(json_schema_extra=_name_schema(VOLUME_PATTERN, 64))]
PoolName = Annotated[str, AfterValidator(_backend_rule("pool name", 32)),
                     Field(json_schema_extra=_name_schema(VOLUME_PATTERN, 32))]
TenantName = Annotated[str, AfterValidator(_backend_rule("tenant name")),
                       Field(json_schema_extra=_name_schema(VOLUME_PATTERN, 64))]
SnapshotName = Annotated[str, AfterValidator(_backend_rule("snapshot name")),
                         Field(json_schema_extra=_name_schema(VOLUME_PATTERN, 64))]
Size = Annotated[str | StrictInt, AfterValidator(_size),
                 Field(description="bytes (a multiple of 1 MiB), or with a unit: 10G, 512M")]
VmUuid = Annotated[str | None, AfterValidator(_uuid)]

DiskPath = Annotated[str, PathParam(json_schema_extra=_name_schema(VOLUME_PATTERN, 64)),
                     AfterValidator(_backend_rule("disk name"))]
PoolPath = Annotated[str, PathParam(json_schema_extra=_name_schema(VOLUME_PATTERN, 32)),
                     AfterValidator(_backend_rule("pool name", 32))]
VmPath = Annotated[str, PathParam(json_schema_extra=_name_schema(VM_PATTERN, 64)), AfterValidator(_vm_name)]
SnapshotPath = Annotated[str, PathParam(json_schema_extra=_name_schema(VOLUME_PATTERN, 64)),
                         AfterValidator(_backend_rule("snapshot name"))]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class DiskCreate(_Request):
    name: DiskName
    pool: PoolName
    size: Size
    tenant: TenantName = "default"
    thin: bool = True
    encrypted: bool = False
    compression: str = Field("off", max_length=32, description="per backend: off, or e.g. lz4 / zstd on ZFS")


class DiskResize(_Request):
    size: Size
    force: bool = False


class Snapshot(_Request):
    snapshot: SnapshotName


class Clone(_Request):
    snapshot: SnapshotName
    name: DiskName


class AttachRequest(_Request):
    transport: Literal["auto", "tcp", "loop", "rdma", "vhost", "dpu"] = "auto"
    dpu: str | None = Field(default=None, max_length=512)  # the DPU's OPI endpoint (offload mode)
    multipath: bool = Field(default=False, description="tcp: also export on the standby port (ANA non-optimized), "
                            "a second path for the host's native NVMe multipath")
    vm_uuid: VmUuid = None
    memory: str | None = Field(default=None, pattern=r"^[1-9][0-9]{0,15}[KMGT]?$",
                               description="vhost: the VM's RAM size (512M, 4G); the QEMU arguments then "
                               "include the shared memory backend vhost-user needs")
    tls: bool = Field(default=False, description="tcp: export on the TLS port (TLS 1.3 PSK required); the answer "
                      "names the PSK file, never the key")


class LimitsRequest(_Request):
    """Changes to a disk's I/O limits: a field left out keeps its value, 0 removes that limit."""

    riops: int | None = Field(default=None, ge=0, le=10_000_000, strict=True, description="read IOPS")
    wiops: int | None = Field(default=None, ge=0, le=10_000_000, strict=True, description="write IOPS")
    rmbps: int | None = Field(default=None, ge=0, le=1_000_000, strict=True, description="read MB/s (10^6 bytes)")
    wmbps: int | None = Field(default=None, ge=0, le=1_000_000, strict=True, description="write MB/s (10^6 bytes)")
    rwiops: int | None = Field(default=None, ge=0, le=10_000_000, strict=True,
                               description="reads + writes IOPS (disks the vhost engine serves)")
    rwmbps: int | None = Field(default=None, ge=0, le=1_000_000, strict=True,
                               description="reads + writes MB/s (disks the vhost engine serves)")


class PoolCreate(_Request):
    name: PoolName
    kind: Literal["file", "lvm", "zfs", "nullblk"]
    devices: list[Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")]] = Field(
        default_factory=list, max_length=16, description="file: one existing, empty directory; lvm, zfs: block "
        "devices; nullblk: none")
    fill_threshold: float = Field(90.0, gt=0, le=100, description="percent full at which new allocations stop")
    capacity: Size | None = Field(None, description="file, nullblk: a budget (10G)")
    thin_pool_percent: StrictInt | None = Field(None, ge=1, le=95, description="lvm: the VG's share for thin LVs")
    layout: Literal["stripe", "mirror"] | None = Field(None, description="zfs, lvm: stripe (default) or mirror "
                                                       "(zfs: one N-way mirror; lvm: raid1 LVs over the devices)")


class ErrorBody(BaseModel):
    """Every refused request answers with one line naming what was wrong (never a traceback)."""

    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input, or not possible in the current state"},
    404: {"model": ErrorBody, "description": "no such object"},
    409: {"model": ErrorBody, "description": "refused: in use, quota, pool full, or a transport this host does "
                                             "not offer"},
    422: {"model": ErrorBody, "description": "the request does not match its schema"},
    503: {"model": ErrorBody, "description": "the host cannot do it now (kernel feature, device, permission)"},
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _validation_message(exc: RequestValidationError) -> str:
    """One line per problem, field first ("body.name: disk name '../x' may only use ..."), without the input
    echoed back in full or pydantic's URLs."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{loc}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(parts).replace("\n", " ") or "invalid request"


def create_app(manager: Manager) -> FastAPI:
    # no slash redirects: `DELETE /v1/disks/d1%2F` must be refused, not redirected to `DELETE /v1/disks/d1`
    app = FastAPI(title="nvmetd", version="1", description="nvmetd: NVMe-oF target control for VM hosts",
                  redirect_slashes=False)
    router = APIRouter(responses=ERRORS)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own refusals (unparsable body, no such route, wrong method) in the same shape as ours."""
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    # A kernel feature this host lacks (FeatureError) is a 409 like Unsupported: asking again will not help.
    # Refusals by kind: Starlette picks the handler of the most specific class (MRO), so Unsupported (a
    # SystemProblem) gets 409 and NotFoundError (a BackendError) 404, whatever the order here.
    refusals: dict[type[Exception], int] = {UserError: 400, StateError: 400, ValueError: 400, Unsupported: 409,
                                            SystemProblem: 503, NotFoundError: 404, BackendError: 409,
                                            FeatureError: 409, ConfigfsError: 503, UnavailableError: 503}
    for kind, status in refusals.items():
        async def _refuse(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            return _error(status, str(exc))

        app.add_exception_handler(kind, _refuse)

    @app.middleware("http")
    async def _internal(request: Request, call_next: Any) -> Any:
        """A bug answers 500 with the exception's type only; the traceback goes to the log. Not an
        exception_handler(Exception): Starlette re-raises after those, so uvicorn logged every refusal as a crash
        and closed the connection, and a client reusing it got a reset on its next request."""
        try:
            return await call_next(request)
        except Exception as exc:
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
            return _error(500, f"internal error: {type(exc).__name__} (details in the nvmetd log)")

    @app.middleware("http")
    async def _whole_segments(request: Request, call_next: Any) -> Any:
        """Routing matches the decoded path, where an encoded `/` (or `\\`) inside a name would split it into
        segments of another route (`victim%2Fresize`). No name may hold either, so such a request is refused
        before routing, whichever client sent it."""
        raw = request.scope.get("raw_path") or b""
        if b"%2f" in raw.lower() or b"%5c" in raw.lower():
            return _error(400, "a name in the request path contains '/' or '\\'")
        return await call_next(request)

    @router.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await run_in_threadpool(manager.status)

    @router.get("/v1/disks")
    async def list_disks() -> list[dict[str, Any]]:
        return await run_in_threadpool(manager.list_disks)

    @router.post("/v1/disks")
    async def create_disk(req: DiskCreate) -> dict[str, Any]:
        return await run_in_threadpool(manager.create_disk, req.name, req.pool, req.size, req.tenant, req.thin,
                                       req.encrypted, req.compression)

    @router.get("/v1/disks/{name}")
    async def show_disk(name: DiskPath) -> dict[str, Any]:
        return await run_in_threadpool(manager.disk_info, name)

    @router.delete("/v1/disks/{name}")
    async def delete_disk(name: DiskPath) -> dict[str, Any]:
        await run_in_threadpool(manager.delete_disk, name)
        return {"deleted": name}

    @router.post("/v1/disks/{name}/resize")
    async def resize_disk(name: DiskPath, req: DiskResize) -> dict[str, Any]:
        return await run_in_threadpool(manager.resize_disk, name, req.size, req.force)

    @router.post("/v1/disks/{name}/snapshots")
    async def snapshot_disk(name: DiskPath, req: Snapshot) -> dict[str, Any]:
        return await run_in_threadpool(manager.snapshot_disk, name, req.snapshot)

    @router.delete("/v1/disks/{name}/snapshots/{snapshot}")
    async def delete_snapshot(name: DiskPath, snapshot: SnapshotPath) -> dict[str, Any]:
        return await run_in_threadpool(manager.delete_snapshot, name, snapshot)

    @router.post("/v1/disks/{name}/clones")
    async def clone_disk(name: DiskPath, req: Clone) -> dict[str, Any]:
        return await run_in_threadpool(manager.clone_disk, name, req.snapshot, req.name)

    @router.put("/v1/disks/{name}/limits")
    async def disk_limits(name: DiskPath, req: LimitsRequest) -> dict[str, Any]:
        return await run_in_threadpool(manager.set_limits, name, req.model_dump())

    @router.get("/v1/vms")
    async def list_vms() -> list[dict[str, Any]]:
        return await run_in_threadpool(manager.list_vms)

    @router.get("/v1/vms/{vm}")
    async def show_vm(vm: VmPath) -> dict[str, Any]:
        return await run_in_threadpool(manager.vm_info, vm)

    @router.put("/v1/vms/{vm}/disks/{disk}")
    async def attach(vm: VmPath, disk: DiskPath, req: AttachRequest) -> dict[str, Any]:
        result = await run_in_threadpool(manager.attach, vm, disk, req.transport, req.vm_uuid, req.memory,
                                          req.dpu, req.tls, req.multipath)
        return result.to_dict()

    @router.delete("/v1/vms/{vm}/disks/{disk}")
    async def detach(vm: VmPath, disk: DiskPath) -> dict[str, Any]:
        return await run_in_threadpool(manager.detach, vm, disk)

    @router.post("/v1/vms/{vm}/tls-key")
    async def rotate_tls_key(vm: VmPath) -> dict[str, Any]:
        """A new TLS PSK for the VM (rotation): sessions up keep running, new connections need the new key."""
        return await run_in_threadpool(manager.rotate_tls_key, vm)

    @router.get("/v1/pools")
    async def list_pools() -> list[dict[str, Any]]:
        return await run_in_threadpool(pool_ops.list_pools, manager)

    @router.post("/v1/pools")
    async def create_pool(req: PoolCreate) -> dict[str, Any]:
        from backends import names

        options = {k: v for k in ("capacity", "thin_pool_percent", "layout") if (v := getattr(req, k)) is not None}
        if "capacity" in options:
            options["capacity"] = names.size(options["capacity"], "capacity")
        return await run_in_threadpool(pool_ops.create_pool, manager, req.kind, req.name, req.devices,
                                       req.fill_threshold, options)

    @router.get("/v1/pools/{name}")
    async def show_pool(name: PoolPath) -> dict[str, Any]:
        return await run_in_threadpool(pool_ops.pool_info, manager, name)

    @router.post("/v1/pools/{name}/repair")
    async def repair_pool(name: PoolPath) -> dict[str, Any]:
        """Put members of a redundant pool that are present again back online (they resilver)."""
        return await run_in_threadpool(pool_ops.repair_pool, manager, name)

    @router.delete("/v1/pools/{name}")
    async def destroy_pool(name: PoolPath) -> dict[str, Any]:
        """Only a pool without disks (delete them first); its volumes' data is never destroyed here."""
        return await run_in_threadpool(pool_ops.destroy_pool, manager, name)

    @router.post("/v1/reconcile")
    async def reconcile() -> dict[str, Any]:
        result = await run_in_threadpool(manager.reconcile)
        return result.to_dict()

    app.include_router(router)
    app.include_router(target_router(TargetOps(manager), ERRORS))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        body, content_type = await run_in_threadpool(render_metrics, manager)
        return PlainTextResponse(body, media_type=content_type)

    return app
