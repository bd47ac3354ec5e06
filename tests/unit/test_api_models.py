"""Property tests of every request model of the API (nvmetd/api.py): valid requests are accepted as sent, a bad
name anywhere is refused with a ValidationError that names the field, and nothing else ever escapes."""

from __future__ import annotations

import json
import re
import string
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from nvmetd import api
from tests.unit.test_validate_props import evil_names

VOLUME_FIRST = string.ascii_letters + string.digits
VOLUME_REST = VOLUME_FIRST + "._-"


def volume_names(max_len: int = 64) -> st.SearchStrategy[str]:
    return st.builds(lambda a, b: a + b, st.sampled_from(VOLUME_FIRST),
                     st.text(VOLUME_REST, max_size=max_len - 1).filter(lambda t: ".." not in t))


sizes = st.one_of(st.integers(1, 1 << 20).map(lambda m: m << 20),
                  st.builds(lambda n, u: f"{n}{u}", st.integers(1, 4096), st.sampled_from(["M", "G", "T", "MiB", "g"])))

VALID: dict[type[BaseModel], st.SearchStrategy[dict[str, Any]]] = {
    api.DiskCreate: st.fixed_dictionaries(
        {"name": volume_names(), "pool": volume_names(32), "size": sizes},
        optional={"tenant": volume_names(), "thin": st.booleans(), "encrypted": st.booleans(),
                  "compression": st.sampled_from(["off", "lz4", "zstd"])}),
    api.DiskResize: st.fixed_dictionaries({"size": sizes}, optional={"force": st.booleans()}),
    api.Snapshot: st.fixed_dictionaries({"snapshot": volume_names()}),
    api.Clone: st.fixed_dictionaries({"snapshot": volume_names(), "name": volume_names()}),
    api.AttachRequest: st.fixed_dictionaries({}, optional={
        "transport": st.sampled_from(["auto", "tcp", "loop", "rdma", "vhost"]),
        "vm_uuid": st.one_of(st.none(), st.uuids().map(str)), "tls": st.booleans()}),
    api.LimitsRequest: st.fixed_dictionaries({}, optional={
        "riops": st.integers(0, 10_000_000), "wiops": st.integers(0, 10_000_000),
        "rmbps": st.integers(0, 1_000_000), "wmbps": st.integers(0, 1_000_000),
        "rwiops": st.integers(0, 10_000_000), "rwmbps": st.integers(0, 1_000_000)}),
    api.PoolCreate: st.fixed_dictionaries(
        {"name": volume_names(32), "kind": st.sampled_from(["file", "lvm", "zfs", "nullblk"])},
        optional={"devices": st.lists(st.text(string.ascii_letters + "/._-", min_size=1, max_size=30).map(
                      lambda t: "/" + t), max_size=4),
                  "fill_threshold": st.floats(0.5, 100), "capacity": sizes,
                  "thin_pool_percent": st.integers(1, 95)}),
}
NAME_FIELDS = {api.DiskCreate: ["name", "pool", "tenant"], api.Snapshot: ["snapshot"], api.Clone: ["snapshot", "name"],
               api.PoolCreate: ["name"]}
ALL_MODELS = [api.DiskCreate, api.DiskResize, api.Snapshot, api.Clone, api.AttachRequest, api.PoolCreate,
              api.LimitsRequest]


def test_every_request_model_is_covered() -> None:
    """A request model added to the API without a strategy here fails this test instead of going untested."""
    models = {obj for obj in vars(api).values()
              if isinstance(obj, type) and issubclass(obj, api._Request) and obj is not api._Request}
    assert models == set(VALID) == set(ALL_MODELS)


def refused(model: type[BaseModel], data: object) -> ValidationError:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(data)
    return exc.value


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
@given(data=st.data())
def test_valid_requests_are_accepted_as_sent(model: type[BaseModel], data: st.DataObject) -> None:
    body = data.draw(VALID[model])
    parsed = model.model_validate(json.loads(json.dumps(body)))  # what arrives over HTTP is JSON
    for key, value in body.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize(("model", "field"), [(m, f) for m, fs in NAME_FIELDS.items() for f in fs],
                         ids=lambda x: x if isinstance(x, str) else x.__name__)
@given(data=st.data())
def test_bad_names_are_refused_naming_the_field(model: type[BaseModel], field: str, data: st.DataObject) -> None:
    body = data.draw(VALID[model])
    body[field] = data.draw(evil_names() | st.sampled_from(["a:b", "x" * 65]))
    errors = refused(model, body).errors()
    assert [e["loc"] for e in errors] == [(field,)]
    message = str(errors[0]["msg"])
    assert "name" in message and ("may" in message or "characters" in message or "non-empty" in message), message


@pytest.mark.parametrize("model", [api.DiskCreate, api.DiskResize], ids=lambda m: m.__name__)
@given(data=st.data(), size=st.one_of(
    st.integers(max_value=0), st.integers(1, (1 << 20) - 1), st.floats(allow_nan=True), st.booleans(),
    st.text(max_size=12).filter(lambda t: not re.fullmatch(r"\s*\d+\s*[KMGT]?(I?B)?\s*", t, re.I)),
    st.just("1.5G"), st.just("12Q"), st.just("-1M"), st.none()))
def test_bad_sizes_are_refused(model: type[BaseModel], data: st.DataObject, size: object) -> None:
    body = data.draw(VALID[model])
    body["size"] = size
    errors = refused(model, body).errors()
    assert {e["loc"][0] for e in errors} == {"size"}


@given(value=st.text(max_size=40).filter(lambda t: _not_uuid(t)) | st.integers() | st.just("../../etc"))
def test_attach_refuses_a_vm_uuid_that_is_not_one(value: object) -> None:
    errors = refused(api.AttachRequest, {"vm_uuid": value}).errors()
    assert {e["loc"][0] for e in errors} == {"vm_uuid"}


def _not_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
@given(data=st.data(), junk=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8))
def test_any_json_is_accepted_or_refused_cleanly(model: type[BaseModel], data: st.DataObject, junk: object) -> None:
    """Arbitrary JSON, whole or in one field: a model or a ValidationError, never another exception."""
    body = data.draw(VALID[model])
    for candidate in (junk, {**body, data.draw(st.sampled_from([*body, "extra"])) if body else "extra": junk}):
        try:
            model.model_validate(candidate)
        except ValidationError as exc:
            assert exc.errors()


def test_a_misspelt_field_is_an_error() -> None:
    errors = refused(api.DiskCreate, {"name": "d", "pool": "p", "size": "1M", "thinn": False}).errors()
    assert errors[0]["loc"] == ("thinn",)


@pytest.mark.parametrize("field", ["riops", "wiops", "rmbps", "wmbps"])
@given(value=st.integers(max_value=-1) | st.integers(min_value=10_000_001) | st.floats() | st.booleans()
       | st.text(max_size=8) | st.lists(st.integers(), max_size=2))
def test_bad_limits_are_refused_naming_the_field(field: str, value: object) -> None:
    """Negative, non-integer (a numeric string or a bool included) and absurdly large limits."""
    errors = refused(api.LimitsRequest, {field: value}).errors()
    assert {e["loc"][0] for e in errors} == {field}
