"""What every OPI service shares: turning nvmetd's errors into the gRPC status codes opi-api (AIP) defines, and
one change = validate, record in the store, reconcile, and undo the record if the kernel refused it.

Status codes (google.aip.dev/193): a malformed name or field is INVALID_ARGUMENT, an unknown name NOT_FOUND, a
create with an id or NQN that exists ALREADY_EXISTS, a delete of something still in use FAILED_PRECONDITION, a
host that cannot do it (no kernel support, connect refused) UNAVAILABLE or FAILED_PRECONDITION. A refused request
leaves the state and the kernel as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import grpc

from nvmetd.errors import SystemProblem, UserError
from nvmetd.manager import Manager
from nvmetd.opi import state as opi_state
from target.status import NOT_THERE

log = logging.getLogger("nvmetd.opi")

T = TypeVar("T")


class Refused(Exception):
    """A request refused with this gRPC status; raised anywhere below a handler."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(what: str, name: str) -> Refused:
    return Refused(grpc.StatusCode.NOT_FOUND, f"unable to find key {name} ({what})")


def exists(message: str) -> Refused:
    return Refused(grpc.StatusCode.ALREADY_EXISTS, message)


def in_use(message: str) -> Refused:
    return Refused(grpc.StatusCode.FAILED_PRECONDITION, message)


def parse(name: str, *collections: str) -> list[str]:
    try:
        return opi_state.parse_name(name, *collections)
    except ValueError as exc:
        raise invalid(str(exc)) from None


def checked(fn: Callable[[], T], field: str) -> T:
    """Run a validator; its ValueError becomes INVALID_ARGUMENT naming the field."""
    try:
        return fn()
    except ValueError as exc:
        raise invalid(f"{field}: {exc}") from None


def new_id(requested: str, taken: Iterable[str], what: str) -> str:
    """The client's id (AIP-133), or a fresh one when it gave none."""
    if requested:
        checked(lambda: opi_state.check_id(requested, what), what)
        if requested in set(taken):
            raise exists(f"{what} {requested} exists already")
        return requested
    import uuid

    return f"opi-{uuid.uuid4()}"


class Service:
    """Base of the servicers: the Manager is the one writer of the store, for this API and the HTTP API alike."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def handle(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Refused as exc:
            context.abort(exc.code, str(exc))
        except UserError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SystemProblem as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # a backend or kernel failure: reported as one line, logged with its traceback
            log.exception("OPI request failed")
            abort_unavailable(context, exc)
        raise AssertionError("unreachable")  # context.abort raises

    def state(self) -> opi_state.OpiState:
        return opi_state.load(self.manager.store.load())

    def change(self, mutate: Callable[[dict[str, Any], opi_state.OpiState], T], needles: Callable[[T], list[str]],
               ) -> T:
        """mutate(doc, opi) validates and changes `opi` (raising Refused changes nothing); it is stored in one
        transaction and the kernel reconciled. If the objects the change made fail in the kernel, the stored
        state is put back as it was and reconciled again, and the request is refused with the kernel's reason."""
        with self.manager.lock:
            with self.manager.store.transaction() as doc:
                before = doc.get("opi")
                opi = opi_state.load(doc)
                result = mutate(doc, opi)
                opi_state.store(doc, opi)
            try:
                applied = self.manager.reconcile()
            except BaseException:
                self._put_back(before)
                raise
            keys = needles(result)
            bad = [s for k, s in applied.objects.items()
                   if s.status in NOT_THERE and any(n in k for n in keys)]
            if bad:
                self._put_back(before)
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the kernel refused it: " + "; ".join(
                    f"{s.label}: {s.reason or s.status}" for s in bad[:3]))
            return result

    def _put_back(self, before: Any) -> None:
        with self.manager.store.transaction() as doc:
            if before is None:
                doc.pop("opi", None)
            else:
                doc["opi"] = before
        self.manager.reconcile()


def abort_unavailable(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    raise AssertionError("unreachable")


def page(items: list[T], size: int, token: str) -> tuple[list[T], str]:
    """AIP-158 pagination: the token is the offset of the next page (opaque to clients)."""
    if size < 0:
        raise invalid(f"page_size {size} is negative")
    try:
        start = int(token) if token else 0
    except ValueError:
        raise invalid(f"page_token {token[:40]!r} is not one this server gave") from None
    if start < 0 or start > len(items):
        raise invalid(f"page_token {token[:40]!r} is not one this server gave")
    end = len(items) if size == 0 else min(len(items), start + size)
    return items[start:end], (str(end) if end < len(items) else "")
