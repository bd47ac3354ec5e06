"""OpenAPI fuzzing (schemathesis) of the real app, served by uvicorn on a Unix socket as nvmetd serves it, with a
real state store, a real file pool in a temporary directory and a fake configfs tree: every operation, positive and
negative inputs. No 5xx, responses as the schema says, no traceback, every invalid path name refused with a 4xx.
The same run against a real nvmetd on the real kernel is tests/kernel/test_api_fuzz.py."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import pools
from nvmetd import throttle
from nvmetd.api import create_app
from nvmetd.errors import SystemProblem
from nvmetd.manager import Manager
from nvmetd.service import bind_socket
from nvmetd.vhost import VhostEngines
from target.store import StateStore
from tests import api_fuzz
from tests.unit.fakes import FakeFS, FakeKernel

schema = api_fuzz.load_schema(max_examples=25)


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "run" / "nvmetd.sock"
        self.files = base / "files"
        FakeKernel(base / "nvmet")
        pools.create_pool("file", "files", devices=[str(self.files)], root=base / "pools")
        # a fuzzed vhost attach starts a real engine: give them a run directory of their own (short: AF_UNIX)
        self.vhost_dir = Path(tempfile.mkdtemp(prefix="nvf-", dir="/tmp"))
        self.manager = Manager(StateStore(base / "state" / "state.json"), FakeFS(root=base / "nvmet"),
                               pools_root=base / "pools", keys_dir=base / "keys", host_connect=False,
                               vhost=VhostEngines(self.vhost_dir))
        # something for the fuzzer to find: two disks, one attached to a VM
        self.manager.create_disk("d0", "files", "4M")
        self.manager.create_disk("d1", "files", "4M")
        self.manager.attach("vm0", "d0", "tcp")
        self.server: uvicorn.Server | None = None

    def __enter__(self) -> World:
        sock = bind_socket(self.socket, None)
        config = uvicorn.Config(create_app(self.manager), log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.manager.vhost.reconcile([])  # stops every engine the fuzzer's vhost attaches started
        shutil.rmtree(self.vhost_dir, ignore_errors=True)

    def outside_files(self) -> list[str]:
        """Files that a name escaping its directory could have created: anything not where it belongs."""
        allowed = {"nvmet", "files", "pools", "state", "keys", "run"}
        return sorted(p.name for p in self.base.iterdir() if p.name not in allowed)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with World(tmp_path_factory.mktemp("api")) as w:
        yield w


@pytest.fixture(scope="module")
def client(world: World) -> Iterator[httpx.Client]:
    with api_fuzz.uds_client(world.socket) as c:
        yield c


def test_served_schema_is_the_fuzzed_one(client: httpx.Client) -> None:
    assert client.get("/openapi.json").json() == api_fuzz.OPENAPI


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    api_fuzz.check_case(client, case)


KNOWN = {"name": ["d0", "d1", "d2"], "disk": ["d0", "d1", "d2"], "vm": ["vm0", "vm1"], "snapshot": ["s1"],
         "body.pool": ["files"], "body.snapshot": ["s1", "s2"], "body.name": ["d2", "d3"],
         "body.size": ["4M", "8M", 16 << 20]}


@pytest.mark.parametrize(("method", "path"), api_fuzz.operations_with_names(), ids=lambda x: x)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_openapi_fuzz_on_known_objects(client: httpx.Client, method: str, path: str, data: st.DataObject) -> None:
    case = data.draw(api_fuzz.known_name_cases(schema, method, path, KNOWN))
    api_fuzz.check_case(client, case, api_fuzz.POSITIVE_CHECKS)


def test_targeted_pass_covers_every_templated_route() -> None:
    assert {(m, p) for m, p, _ in api_fuzz.PATH_OPERATIONS} == api_fuzz.templated_operations()


@pytest.mark.parametrize(("method", "template", "body"), api_fuzz.PATH_OPERATIONS,
                         ids=[f"{m} {p}" for m, p, _ in api_fuzz.PATH_OPERATIONS])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=api_fuzz.invalid_names())
def test_invalid_path_names_get_4xx(client: httpx.Client, world: World, method: str, template: str,
                                    body: dict | None, bad: str) -> None:
    problem = api_fuzz.refuses_invalid_name(client, method, template, body, bad,
                                            {"name": "d1", "vm": "vm0", "disk": "d1", "snapshot": "s1"})
    assert problem is None, problem
    assert world.outside_files() == []


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=api_fuzz.invalid_names(), field=st.sampled_from(["name", "pool", "tenant"]))
def test_invalid_body_names_get_422_and_touch_nothing(client: httpx.Client, world: World, bad: str,
                                                      field: str) -> None:
    before = sorted(p.name for p in world.files.iterdir())
    body = {"name": "fresh", "pool": "files", "size": "4M", field: bad}
    resp = client.post("/v1/disks", json=body)
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]
    assert message.startswith(f"body.{field}: ") and "\n" not in message
    assert sorted(p.name for p in world.files.iterdir()) == before
    assert world.outside_files() == []


def test_unexpected_errors_are_500_one_line_and_logged(world: World, client: httpx.Client,
                                                       caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The catch-all: a bug answers 500 with the exception's type only; the traceback goes to the log."""
    def broken() -> None:
        raise KeyError("secret-ish detail")

    monkeypatch.setattr(world.manager, "list_vms", broken)
    with caplog.at_level("ERROR"):
        resp = client.get("/v1/vms")
        assert resp.status_code == 500
        assert resp.json() == {"error": "internal error: KeyError (details in the nvmetd log)"}
        # the connection survives: the same client's next request works
        assert client.get("/v1/status").status_code == 200
    assert [r.name for r in caplog.records if r.exc_info] == ["nvmetd.api"]


def test_backend_refusals_are_not_logged_as_crashes(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    """Found with the fuzzer: 404/409 from the backends went through Starlette's server-error path, so uvicorn
    logged each as "Exception in ASGI application" with a traceback and dropped the keep-alive connection."""
    with caplog.at_level("ERROR"):
        for _ in range(3):
            resp = client.post("/v1/disks", json={"name": "zz", "pool": "files", "size": "4M", "compression": "lz4"})
            assert resp.status_code == 409 and "compression" in resp.json()["error"]
            resp = client.post("/v1/disks", json={"name": "zz", "pool": "nopool", "size": "4M"})
            assert resp.status_code == 404 and "nopool" in resp.json()["error"]
    assert [r.getMessage() for r in caplog.records] == []


def test_vhost_attach_of_a_missing_disk_is_a_plain_refusal(client: httpx.Client) -> None:
    """Found by the fuzzer, when vhost was not wired yet: it answered 503 even for a disk that does not exist."""
    resp = client.put("/v1/vms/vm-new/disks/nope", json={"transport": "vhost"})
    assert resp.status_code == 400 and resp.json()["error"].startswith("no disk named 'nope'")


@pytest.mark.parametrize("transport", ["rdma"])
def test_a_transport_the_host_lacks_is_refused_before_it_is_recorded(world: World, client: httpx.Client,
                                                                     transport: str) -> None:
    """Found by the fuzzer: an rdma attach without an rdma address was stored, and from then on every reconcile
    (every attach, for every VM) failed."""
    world.manager.create_disk("t-rdma", "files", "4M")  # its own disk: the fuzz tests may have deleted d0/d1
    generation = world.manager.store.load()["generation"]
    resp = client.put("/v1/vms/vm-new/disks/t-rdma", json={"transport": transport})
    assert resp.status_code == 409 and transport in resp.json()["error"].lower()
    assert world.manager.store.load()["generation"] == generation
    assert client.put("/v1/vms/vm-new/disks/nope", json={"transport": transport}).json()["error"].startswith(
        "no disk named 'nope'")
    assert client.put("/v1/vms/vm-other/disks/t-rdma", json={"transport": "tcp"}).status_code == 200
    assert client.delete("/v1/vms/vm-other/disks/t-rdma").status_code == 200


@pytest.mark.parametrize("raw", [b"\xff{", b'{"name": ', b"[]", b"null"])
def test_unparsable_or_wrong_bodies_get_one_line_errors(client: httpx.Client, raw: bytes) -> None:
    resp = client.post("/v1/disks", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in (400, 422)
    assert set(resp.json()) == {"error"} and "\n" not in resp.json()["error"]


@pytest.mark.parametrize("path", ["/v1/disks/t-slash/", "/v1/disks/t-slash%2F", "/v1/vms/vm-slash/disks/t-slash/",
                                  "/v1/vms/vm-slash%2F"])
def test_a_trailing_slash_is_not_redirected_to_another_name(world: World, client: httpx.Client, path: str) -> None:
    """Found by the fuzzer: `DELETE /v1/disks/d1%2F` got a 307 to `/v1/disks/d1`; a client that follows
    redirects would have deleted (or detached) a disk it never named."""
    world.manager.create_disk("t-slash", "files", "4M")
    world.manager.attach("vm-slash", "t-slash", "tcp")
    for method in ("GET", "DELETE"):
        resp = client.request(method, path, follow_redirects=False)
        # 404: no such route; 400: an encoded '/' is refused before routing
        assert resp.status_code == (400 if "%2F" in path else 404) and "location" not in resp.headers
    assert client.get("/v1/disks/t-slash").status_code == 200


def test_tls_and_limits_this_host_cannot_enforce_are_refused_before_they_are_recorded(
        world: World, client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS over a transport other than tcp is bad input; TLS without a .nvme keyring (this host has none) and
    limits without blk-throttle's cgroup v1 blkio hierarchy are refused before the state changes, as rdma is.
    Whether a host can mount that hierarchy depends on its cgroup v2 set-up (this machine's varies), so the mount
    is made to fail as it does where cgroup v2 uses the io controller; the rig proves the real mount."""
    def no_blkio(mount: Path = throttle.BLKIO_MOUNT) -> Path:
        raise SystemProblem("limits: cannot mount the cgroup v1 blkio hierarchy (is cgroup v2's io controller "
                            "in use? ...): mount: busy")

    monkeypatch.setattr(throttle, "mount_blkio", no_blkio)
    world.manager.create_disk("t-sec", "files", "4M")
    generation = world.manager.store.load()["generation"]
    resp = client.put("/v1/vms/vm-sec/disks/t-sec", json={"transport": "loop", "tls": True})
    assert resp.status_code == 400 and resp.json()["error"].startswith("tls:")
    resp = client.put("/v1/vms/vm-sec/disks/t-sec", json={"transport": "tcp", "tls": True})
    assert resp.status_code == 409 and resp.json()["error"].startswith("tls:")
    resp = client.put("/v1/disks/t-sec/limits", json={"riops": 100})
    assert resp.status_code == 409 and "blkio" in resp.json()["error"], resp.text
    assert client.put("/v1/disks/t-sec/limits", json={"riops": -1}).status_code == 422
    assert world.manager.store.load()["generation"] == generation
