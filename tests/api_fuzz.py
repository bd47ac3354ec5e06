"""What the two OpenAPI fuzz runs share (host: tests/unit/test_api_fuzz.py on a fake configfs tree; rig:
tests/kernel/test_api_fuzz.py against a real nvmetd): the schema, the checks, the names that must be refused,
and a client for the Unix socket (schemathesis' own transport speaks TCP only)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from nvmetd.api import create_app

# the schema does not depend on the manager; the tests also check the served /openapi.json is the same one
OPENAPI: dict[str, Any] = create_app(None).openapi()  # type: ignore[arg-type]
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/', "\n  File ", "site-packages/")


def load_schema(max_examples: int) -> schemathesis.schemas.BaseSchema:
    schema = schemathesis.openapi.from_dict(OPENAPI)
    schema.config.generation.update(modes=["positive", "negative"], max_examples=max_examples, deterministic=True,
                                    allow_x00=True)
    return schema


@schemathesis.check
def no_traceback(ctx: Any, response: Any, case: Any) -> bool | None:
    """No response carries a Python traceback or source path, whatever the status."""
    text = response.text or ""
    leaked = [m for m in TRACEBACK_MARKERS if m in text]
    if leaked:
        raise AssertionError(f"response leaks a traceback ({leaked[0]!r}): {text[:300]}")
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, no_traceback]


def uds_client(socket: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://nvmetd", timeout=600)


def send(client: httpx.Client, case: Any) -> httpx.Response:
    """Send a schemathesis case over the socket, exactly as generated (bytes, headers, query)."""
    kwargs = case.as_transport_kwargs(base_url="http://nvmetd")
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        body["content"] = kwargs["data"]
    if kwargs.get("cookies"):
        body["headers"] = {**(kwargs.get("headers") or {}),
                           "cookie": "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())}
    return client.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"),
                          **{"headers": kwargs.get("headers"), **body})


def check_case(client: httpx.Client, case: Any, checks: list[Any] = CHECKS) -> httpx.Response:
    response = send(client, case)
    case.validate_response(response, checks=checks)
    return response


# ---------------------------------------------------------------- positive cases that reach the working paths
# Random names almost never hit an existing disk, VM or pool, so the plain fuzz mostly exercises refusals. This
# pass takes schemathesis' positive cases and puts known objects in some of the name fields (still valid input),
# so create, attach, detach, resize, snapshot, clone and delete run for real with otherwise generated bodies.
POSITIVE_CHECKS = [c for c in CHECKS if c is not negative_data_rejection]


def operations_with_names() -> list[tuple[str, str]]:
    named = ("{", "/v1/disks")
    return sorted((m.upper(), p) for p, ops in OPENAPI["paths"].items() if any(n in p for n in named)
                  for m in ops if m in ("put", "post", "delete", "get") and (m != "get" or "{" in p))


@st.composite
def known_name_cases(draw: st.DrawFn, schema: Any, method: str, path: str, known: dict[str, list[str]]) -> Any:
    case = draw(schema[path][method].as_strategy())
    for param in list(case.path_parameters or {}):
        if param in known and draw(st.booleans()):
            case.path_parameters[param] = draw(st.sampled_from(known[param]))
    if isinstance(case.body, dict):
        for field in ("pool", "snapshot", "name", "size"):
            key = f"body.{field}"
            if field in case.body and key in known and draw(st.integers(0, 3)):
                case.body[field] = draw(st.sampled_from(known[key]))
    return case


# ---------------------------------------------------------------- targeted pass over path parameters
EVIL_PIECES = ["..", "/", "\\", "\x00", "\n", "\r", "\t", " ", "\u202e", "\u200b", "\uff0f", "\u2215", "\u00a0",
               "%2f", "%00", "\ufeff", "\u00e9", "\U0001f4a9", "$(id)", "`id`", ";", "*", "?", "#", "'", '"', "<", ">"]
NAME_FIRST = string.ascii_letters + string.digits
NAME_REST = NAME_FIRST + "._-"


@st.composite
def invalid_names(draw: st.DrawFn) -> str:
    """Names no path parameter may take: `..`, `/`, NUL, control and unicode tricks, leading dot or dash, empty
    after trimming, overlong."""
    base = draw(st.builds(lambda a, b: a + b, st.sampled_from(NAME_FIRST),
                          st.text(NAME_REST, max_size=20).filter(lambda t: ".." not in t)))
    kind = draw(st.sampled_from(["inject", "lead", "long", "dots", "unicode"]))
    if kind == "inject":
        pos = draw(st.integers(0, len(base)))
        return base[:pos] + draw(st.sampled_from(EVIL_PIECES)) + base[pos:]
    if kind == "lead":
        return draw(st.sampled_from([".", "-", "_"])) + base
    if kind == "long":
        return base + "a" * (65 - len(base))
    if kind == "dots":
        return draw(st.sampled_from(["..", ".", "../" + base, base + "/..", "./" + base, "../../etc/passwd",
                                     "..%2f..%2fetc", "...."]))
    return base + draw(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)))


def encode_segment(name: str) -> str:
    """Percent-encode every byte that is not a letter or digit (dots too, so no client folds `..` away)."""
    return "".join(c if c.isascii() and c.isalnum() else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


PATH_OPERATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/disks/{name}", None),
    ("DELETE", "/v1/disks/{name}", None),
    ("POST", "/v1/disks/{name}/resize", {"size": "4M"}),
    ("POST", "/v1/disks/{name}/snapshots", {"snapshot": "s1"}),
    ("DELETE", "/v1/disks/{name}/snapshots/{snapshot}", None),
    ("POST", "/v1/disks/{name}/clones", {"snapshot": "s1", "name": "fresh"}),
    ("GET", "/v1/pools/{name}", None),
    ("POST", "/v1/pools/{name}/repair", None),
    ("DELETE", "/v1/pools/{name}", None),
    ("GET", "/v1/vms/{vm}", None),
    ("PUT", "/v1/vms/{vm}/disks/{disk}", {"transport": "tcp"}),
    ("DELETE", "/v1/vms/{vm}/disks/{disk}", None),
    ("POST", "/v1/vms/{vm}/tls-key", None),
    ("PUT", "/v1/disks/{name}/limits", {"riops": 100}),
]


def templated_operations() -> set[tuple[str, str]]:
    """Every operation of the schema with a path parameter, so a new route cannot escape the targeted pass."""
    return {(method.upper(), path) for path, ops in OPENAPI["paths"].items() if "{" in path
            for method in ops if method in ("get", "put", "post", "delete", "patch")}


def refuses_invalid_name(client: httpx.Client, method: str, template: str, body: dict[str, Any] | None,
                         bad: str, good: dict[str, str]) -> str | None:
    """Put `bad` in each path parameter in turn (the others valid); None if every answer is a clean 4xx."""
    params = [p for p in ("name", "vm", "disk", "snapshot") if "{" + p + "}" in template]
    for param in params:
        path = template
        for p in params:
            path = path.replace("{" + p + "}", encode_segment(bad) if p == param else good[p])
        resp = client.request(method, path, json=body)
        text = resp.text
        if not 400 <= resp.status_code < 500:
            return f"{method} {path} -> {resp.status_code}: {text[:200]}"
        if any(m in text for m in TRACEBACK_MARKERS):
            return f"{method} {path} leaks a traceback: {text[:200]}"
        if resp.headers.get("content-type", "").startswith("application/json"):
            data = resp.json()
            if not (isinstance(data, dict) and isinstance(data.get("error"), str)):
                return f"{method} {path} -> {resp.status_code} without a one-line error: {text[:200]}"
    return None


class Budget:
    """Seconds of fuzzing per key (one fuzzed operation), counted from its first example: later examples of a
    spent key return at once, so a slow machine runs fewer examples instead of a longer suite."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: dict[Any, float] = {}
        self.ran: dict[Any, int] = {}

    def spent(self, key: Any) -> bool:
        import time

        start = self.started.setdefault(key, time.monotonic())
        if time.monotonic() - start > self.seconds:
            return True
        self.ran[key] = self.ran.get(key, 0) + 1
        return False
