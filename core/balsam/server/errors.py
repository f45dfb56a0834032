"""HTTP errors with a ``{"detail": ...}`` body (the shape Balsam 0.7 clients print)."""

from __future__ import annotations

import ast
import re
import typing
from typing import Any, Iterable

import attrs

from balsam.serialization import PayloadError, partial_from_dict


class APIError(Exception):
    status_code = 400
    #: Extra response headers (e.g. ``Retry-After``).
    headers: "dict[str, str] | None" = None

    def __init__(self, detail: Any, status_code: "int | None" = None, *, refused_ids: "Iterable[int] | None" = None) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code
        #: Every record of a bulk request that made the server refuse it as a whole, sent beside
        #: ``detail`` (whose text shows only the first few): a client drops or retries exactly those
        #: instead of splitting the request until it finds them (one request per record at worst).
        self.refused_ids: "list[int] | None" = sorted(set(refused_ids)) if refused_ids is not None else None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"detail": self.detail}
        if self.refused_ids is not None:
            body["refused_ids"] = self.refused_ids
        return body


class BadRequest(APIError):
    status_code = 400


class Unauthorized(APIError):
    status_code = 401


class Forbidden(APIError):
    """The credential is valid but may not do this (e.g. a launcher's site-scoped credential)."""

    status_code = 403


class PayloadTooLarge(APIError):
    status_code = 413


class TooManyRequests(APIError):
    """429 with ``Retry-After`` (whole seconds)."""

    status_code = 429

    def __init__(self, detail: str, retry_after_sec: float) -> None:
        super().__init__(detail, 429)
        self.retry_after_sec = max(1, int(retry_after_sec + 0.999))
        self.headers = {"Retry-After": str(self.retry_after_sec)}


class NotFound(APIError):
    status_code = 404

    def __init__(self, what: str = "Not found", *, refused_ids: "Iterable[int] | None" = None) -> None:
        super().__init__(what, 404, refused_ids=refused_ids)


class Conflict(APIError):
    status_code = 409


class ValidationFailed(APIError):
    """422 with FastAPI-style items: ``{"loc": [...], "msg": reason, "type": "value_error"}``."""

    status_code = 422

    def __init__(self, errors: Iterable[tuple[list[Any], str]]) -> None:
        items = [{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in errors]
        super().__init__(items, 422)

    @classmethod
    def field(cls, loc: list[Any], msg: str) -> "ValidationFailed":
        return cls([(loc, msg)])

    @classmethod
    def from_payload(cls, exc: PayloadError, prefix: "list[Any] | None" = None) -> "ValidationFailed":
        return payload_errors(exc, list(prefix or ["body"]))


_PATH_PART = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


def split_path(path: str) -> list[Any]:
    """``"allowed_queues['q'].max_nodes"`` -> ``["allowed_queues", "q", "max_nodes"]``."""
    parts: list[Any] = []
    for bracket, name in _PATH_PART.findall(path or ""):
        if name:
            parts.append(name)
        else:
            try:
                parts.append(ast.literal_eval(bracket))
            except (ValueError, SyntaxError):
                parts.append(bracket)
    return parts


def payload_errors(exc: PayloadError, prefix: list[Any]) -> "ValidationFailed":
    return ValidationFailed((list(prefix) + split_path(path), msg) for path, msg in exc.errors)


def not_found_ids(kind: str, ids: Iterable[int], *, of_request: bool = False) -> NotFound:
    """404 naming the missing ids (the first 20 in ``detail``). ``of_request``: they are ids of the
    bulk request's own records (a PATCH's items), so all of them go in ``refused_ids`` too; ids a
    record merely refers to (its app, its parents) are not the records a client would drop."""
    ids = sorted(set(ids))
    shown = ", ".join(str(i) for i in ids[:20]) + (f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
    return NotFound(f"{kind} not found: {shown}", refused_ids=ids if of_request else None)


def null_field_errors(cls: type, values: dict[str, Any], loc: list[Any]) -> list[tuple[list[Any], str]]:
    """``null`` sent for a field whose type is not Optional."""
    fields = attrs.fields_dict(cls)
    errors = []
    for name, value in values.items():
        if value is None and name in fields:
            kind = fields[name].type
            if not (typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)):
                errors.append((loc + [name], "cannot be null"))
    return errors


def check_partial(cls: type, values: dict[str, Any], loc: list[Any]) -> dict[str, Any]:
    errors = null_field_errors(cls, values, loc)
    if errors:
        raise ValidationFailed(errors)
    return values


def parse_partial(cls: type, data: Any, allowed: "set[str]", loc: list[Any]) -> dict[str, Any]:
    """An update body -> its structured field values; 422 names every bad or null field under ``loc``."""
    try:
        values = partial_from_dict(cls, data, allowed=allowed)
    except PayloadError as exc:
        raise payload_errors(exc, loc) from None
    return check_partial(cls, values, loc)
