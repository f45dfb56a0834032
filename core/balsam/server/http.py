"""Request/response helpers shared by the routes: JSON I/O, query parameters, auth."""

from __future__ import annotations

import datetime as dt
import enum
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
from starlette.datastructures import QueryParams as StarletteQueryParams
from starlette.requests import Request
from starlette.responses import Response

from balsam.models import ID_AFTER, MAX_TAG_FILTERS  # noqa: F401 (shared limits; routes import them here)
from balsam.serialization import parse_datetime

from .errors import APIError, BadRequest, CappedErrors, ValidationFailed, WalkStopped, unwalked_within
from .limits import MAX_QUERY_VALUE_CHARS


#: Integer ids and counts are stored as 32-bit integers (but the ids of jobs, events, transfer items
#: and sessions: 64-bit, balsam.server.tables.BigId).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
#: Ids in a path are 64-bit integers (an id beyond the 32-bit columns simply does not exist: 404).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The query parameters whose value is free text (a name, a path, a substring). Given empty in a
#: listing, such a filter is no filter, as Balsam 0.7 read it (``if self.name:``; every text holds
#: the empty text) and as its clients and ours send a filter given ``""``. Every other parameter
#: (ids, integers, states, orderings, booleans, datetimes, ``KEY:VALUE``, ``limit``) given empty is
#: refused, as 0.7's FastAPI refused it (``''`` is not an integer or a state), and so is every empty
#: value of an update or delete by filter (QueryParams).
TEXT_FILTERS = frozenset({"name", "path", "site_path", "site_name", "queue", "workdir__contains"})


def _default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def wire_datetime(value: "dt.datetime | None") -> "dt.datetime | None":
    """A datetime as it goes out: naive UTC, as Balsam 0.7 sent them (its clients subtract them from
    a naive ``utcnow()``). Readers take a datetime without offset from this API as UTC (our client
    does, and keeps timezone-aware datetimes)."""
    if value is not None and value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def json_response(data: Any, status_code: int = 200, headers: "dict[str, str] | None" = None) -> Response:
    return JSONResponse(data, status_code=status_code, headers=headers)


#: The answer to ``Prefer: return=minimal`` (RFC 7240), telling the client it was honoured.
MINIMAL_APPLIED = ("Preference-Applied", "return=minimal")


def no_content() -> Response:
    # A 204 with no body and no content-length mismatch keeps the connection alive
    # (Balsam 0.7 sent "null" with its 204s, which broke keep-alive).
    return Response(status_code=204)


def error_response(exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


_NUL_MESSAGE = "NUL characters (\\u0000) are not allowed"


def _walk_nul(value: Any, loc: list[Any], errors: list[tuple[list[Any], str]]) -> None:
    """Where NUL characters hide in a JSON container (PostgreSQL text cannot store them): strings
    checked inline, a loc built only for a container or a problem (a body of millions of strings
    60 levels deep built a 60-item loc for each)."""
    if type(value) is dict:
        for key, item in value.items():
            if "\x00" in key:
                errors.append((loc + [key], _NUL_MESSAGE))
            if type(item) is str:
                if "\x00" in item:
                    errors.append((loc + [key], _NUL_MESSAGE))
            elif item and (type(item) is dict or type(item) is list):
                _walk_nul(item, loc + [key], errors)
    else:
        for index, item in enumerate(value):
            if type(item) is str:
                if "\x00" in item:
                    errors.append((loc + [index], _NUL_MESSAGE))
            elif item and (type(item) is dict or type(item) is list):
                _walk_nul(item, loc + [index], errors)


def reject_nul(value: Any, loc: list[Any]) -> None:
    """422 naming where NUL characters are in ``value`` (at ``loc``): the first ones, the walk
    stopping there (:class:`~balsam.server.errors.CappedErrors`)."""
    if type(value) is str:
        if "\x00" in value:
            raise ValidationFailed.field(loc, _NUL_MESSAGE)
        return
    if type(value) is not dict and type(value) is not list:
        return
    errors = CappedErrors()
    try:
        _walk_nul(value, loc, errors)
    except WalkStopped:
        errors.unchecked_within = unwalked_within(value, loc, errors[-1][0])
    if errors:
        raise ValidationFailed(errors)


def int_from_text(raw: str) -> int:
    """An integer written in a path or query string: ASCII decimal digits with an optional leading
    ``-`` (a negative id or bound matches nothing, a minimum refuses it). ValueError otherwise.
    ``int()`` alone also took ``1_000``, `` 5``, ``+5`` and any Unicode digits (``١٢``, ``１``),
    and the float fallback once here took ``1e3`` as 1000 and ``5.0`` as 5."""
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdecimal()):
        raise ValueError(f"not an integer: {raw!r}")
    return int(raw)


def is_json_int(value: Any) -> bool:
    """An integer of a JSON body: ``5`` or ``5.0`` (not ``true``)."""
    return type(value) is int or (type(value) is float and value.is_integer())


def path_int(request: Request, name: str) -> int:
    raw = request.path_params[name]
    if isinstance(raw, int):
        return raw
    try:
        value = int_from_text(raw)
    except ValueError:
        raise ValidationFailed.field(["path", name], f"expected an integer, got {raw!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValidationFailed.field(["path", name], f"integer out of the 64-bit range: {value}")
    return value


class QueryParams:
    """Typed access to query-string parameters; every problem raises 422 naming the parameter."""

    def __init__(self, request: "Request | StarletteQueryParams", allowed: "set[str] | None" = None) -> None:
        # A request's query string, or parameters built by the server itself (the dashboard's forms).
        self.params = request if isinstance(request, StarletteQueryParams) else request.query_params
        for key, value in self.params.multi_items():
            reject_nul(key, ["query"])
            reject_nul(value, ["query", key])
            if len(value) > MAX_QUERY_VALUE_CHARS:
                raise ValidationFailed.field(["query", key], f"longer than {MAX_QUERY_VALUE_CHARS} characters ({len(value)})")
        if allowed is not None:
            unknown = sorted(set(self.params.keys()) - allowed)
            if unknown:
                raise ValidationFailed(
                    (["query", k], f"unknown filter parameter (valid: {', '.join(sorted(allowed))})") for k in unknown
                )
        # The one rule for empty values (docs/rest-api.md, "Pagination and filters"), read here for
        # every parameter of every route, whether or not the route reads it: before, ``id=`` matched
        # nothing, ``app_id=`` and ``limit=`` were ignored and ``state=`` was a 422, and a query
        # delete with ``app_id=`` (an unset shell variable) deleted every job.
        writes = isinstance(request, Request) and request.method not in ("GET", "HEAD")
        for key, value in self.params.multi_items():
            if value.strip():
                continue
            if key not in TEXT_FILTERS:
                raise ValidationFailed.field(["query", key], "empty value: leave the parameter out for no filter")
            if writes:
                raise ValidationFailed.field(["query", key], "empty value: an update or delete by filter takes no "
                                             "empty filter (it would reach every job); leave the parameter out")

    def _convert(self, name: str, raw: str, conv: Callable[[str], Any], what: str) -> Any:
        try:
            return conv(raw)
        except (ValueError, TypeError):
            raise ValidationFailed.field(["query", name], f"expected {what}, got {raw!r}") from None

    def has(self, name: str) -> bool:
        return name in self.params

    def _one(self, name: str) -> Optional[str]:
        """The value of a parameter that takes one. Given twice (``app_id=1&app_id=2``), it is
        refused: taking the last one silently answered for part of what was asked."""
        raws = self.params.getlist(name)
        if len(raws) > 1:
            raise ValidationFailed.field(["query", name], f"takes one value, got {len(raws)}")
        return raws[0] if raws else None

    def str(self, name: str) -> Optional[str]:
        return self._one(name)

    def int(self, name: str, default: Optional[int] = None, *, minimum: Optional[int] = None,
            maximum: Optional[int] = None, bits: int = 32) -> Optional[int]:
        raw = self._one(name)
        if raw is None:  # (an empty value never comes here: see __init__)
            return default
        value = self._convert(name, raw, int_from_text, "an integer")
        if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise ValidationFailed.field(["query", name], f"integer out of range: {value}")
        if minimum is not None and value < minimum:
            raise ValidationFailed.field(["query", name], f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValidationFailed.field(["query", name], f"must be <= {maximum}, got {value}")
        return value

    def _items(self, name: str) -> Optional[list[str]]:
        """The items of a list parameter, given repeated and/or comma-separated (``id=1,2&id=3``),
        blanks around the commas dropped (``id=1, 2``, ``state=READY,``). A value with no item in it
        (``id=,``) is refused as an empty one is (QueryParams' rule for empty values)."""
        raws = self.params.getlist(name)
        if not raws:
            return None
        out: list[str] = []
        for raw in raws:
            parts = [part.strip() for part in raw.split(",")]
            items = [part for part in parts if part]
            if not items:
                raise ValidationFailed.field(["query", name], f"no value in {raw!r}: leave the parameter out for no filter")
            out.extend(items)
        return out

    def int_list(self, name: str, *, bits: int = 32) -> Optional[list[int]]:
        """Integers given as repeated and/or comma-separated values (:meth:`_items`); ``bits=64`` for
        the ids of 64-bit columns (jobs, events, transfer items, sessions)."""
        items = self._items(name)
        if items is None:
            return None
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        out: list[int] = []
        for item in items:
            value = self._convert(name, item, int_from_text, "an integer")
            if not low <= value <= high:
                raise ValidationFailed.field(["query", name], f"integer out of range: {value}")
            out.append(value)
        return out

    def str_list(self, name: str) -> Optional[list[str]]:
        raws = self.params.getlist(name)
        return list(raws) if raws else None

    def _enum_value(self, name: str, raw: str, cls: type[enum.Enum]) -> str:
        valid = {str(member.value) for member in cls}
        if raw not in valid:
            raise ValidationFailed.field(["query", name], f"expected one of {', '.join(sorted(valid))}; got {raw!r}")
        return raw

    def enum_list(self, name: str, cls: type[enum.Enum]) -> Optional[list[str]]:
        """A list of enum values (``state``), repeated and/or comma-separated as the id lists are
        (:meth:`_items`): ``state=READY,RUNNING`` was refused (422) where ``id=1,2`` was taken. No
        state's name holds a comma, so the split reads nothing else. 422 naming the first unknown
        value. (Text filters, ``tags=K:V`` among them, are never split: a value may hold a comma.)
        The one reader of the listings' state lists (jobs, their counts, the query update and
        delete, batch-jobs, transfers, the backlog, the dashboard's Jobs page)."""
        items = self._items(name)
        return None if items is None else [self._enum_value(name, item, cls) for item in items]

    def enum(self, name: str, cls: type[enum.Enum]) -> Optional[str]:
        """One enum value (``state__ne``, ``direction``): never split, so ``a,b`` is refused naming it."""
        raw = self._one(name)
        return None if raw is None else self._enum_value(name, raw, cls)

    def choice(self, name: str, choices: "list[str]", default: Optional[str] = None) -> Optional[str]:
        raw = self._one(name)
        if raw is None:  # (an empty value never comes here: see __init__)
            return default
        if raw not in choices:
            raise ValidationFailed.field(["query", name], f"expected one of {', '.join(choices)}; got {raw!r}")
        return raw

    def datetime(self, name: str) -> Optional[dt.datetime]:
        raw = self._one(name)
        if raw is None:  # (an empty value never comes here: see __init__)
            return None
        return self._convert(name, raw, parse_datetime, "an ISO-8601 datetime")

    def bool(self, name: str) -> Optional[bool]:
        raw = self._one(name)
        if raw is None:  # (an empty value never comes here: see __init__)
            return None
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValidationFailed.field(["query", name], f"expected true or false, got {raw!r}")

    def key_values(self, name: str) -> Optional[dict[str, str]]:
        """``tags=k:v`` (repeated) -> ``{"k": "v"}`` (Balsam 0.7 tag filter syntax).

        One key with two values (``tags=a:1&tags=a:2``) is refused: a tag has one value, and
        keeping the last one silently answered for ``a:2`` alone. The same pair twice is harmless
        (one filter, one clause). More than :data:`MAX_TAG_FILTERS` distinct pairs are refused."""
        raws = self.params.getlist(name)
        if not raws:
            return None
        out: dict[str, str] = {}
        for raw in raws:
            key, sep, value = raw.partition(":")
            if not sep or not key:
                raise ValidationFailed.field(["query", name], f"expected KEY:VALUE, got {raw!r}")
            if key in out and out[key] != value:
                raise ValidationFailed.field(["query", name], f"key {key!r} given twice with different values "
                                             f"({key}:{out[key]} and {raw}); give each key once")
            out[key] = value
        # Counted once built: the clauses are the distinct pairs (a pair sent 101 times is one).
        # The raw list is bounded by the request line's size, as every other parameter's.
        if len(out) > MAX_TAG_FILTERS:
            raise ValidationFailed.field(["query", name], f"at most {MAX_TAG_FILTERS} {name} filters, got {len(out)}")
        return out


PAGINATION = {"limit", "offset"}


def pagination(q: QueryParams) -> tuple[int, int]:
    from balsam.models import MAX_PAGE_SIZE

    limit = q.int("limit", MAX_PAGE_SIZE, minimum=0, maximum=MAX_PAGE_SIZE)
    offset = q.int("offset", 0, minimum=0)
    assert limit is not None and offset is not None
    return limit, offset


def require_list(payload: Any, what: str, max_items: int) -> list:
    if not isinstance(payload, list):
        raise ValidationFailed.field(["body"], f"expected a JSON list of {what}, got {type(payload).__name__}")
    if len(payload) > max_items:
        raise BadRequest(f"Cannot bulk-process more than {max_items} {what} in a single API call (got {len(payload)})")
    return payload


def parse_bulk_patches(payload: list, kind: str, parse: Callable[[dict[str, Any], list[Any]], dict[str, Any]], *,
                       fixed: "tuple[str, ...]" = (), wide_id: bool = False) -> dict[int, dict[str, Any]]:
    """A bulk PATCH body ``[{"id": N, field: value, ...}, ...]`` -> ``{N: parse(fields, loc)}``.

    Each item needs a unique integer ``id`` (64-bit with ``wide_id``); ``fixed`` fields may be sent
    only as null (and are dropped).
    """
    patches: dict[int, dict[str, Any]] = {}
    for index, item in enumerate(payload):
        loc = ["body", index]
        if not isinstance(item, dict) or not is_json_int(item.get("id")):
            raise ValidationFailed.field(loc + ["id"], "each item needs an integer id")
        item = {**item, "id": int(item["id"])}
        check_int_fields(item, [] if wide_id else ["id"], loc, wide=("id",) if wide_id else ())
        body = {k: v for k, v in item.items() if k != "id"}
        for name in fixed:
            if body.pop(name, None) is not None:
                raise ValidationFailed.field(loc + [name], "cannot be changed")
        if item["id"] in patches:
            raise ValidationFailed.field(loc + ["id"], f"duplicate {kind} id {item['id']} in one request")
        patches[item["id"]] = parse(body, loc)
    return patches


def int_range_errors(values: Any, loc: list[Any]) -> list[tuple[list[Any], str]]:
    """Integers anywhere in a parsed payload that do not fit the 32-bit columns."""
    errors: list[tuple[list[Any], str]] = []
    if isinstance(values, bool):
        return errors
    if isinstance(values, int):
        if not INT_MIN <= values <= INT_MAX:
            errors.append((loc, f"integer out of range: {values}"))
    elif isinstance(values, dict):
        for key, value in values.items():
            errors.extend(int_range_errors(value, loc + [key]))
    elif isinstance(values, (list, set, frozenset, tuple)):
        for index, value in enumerate(sorted(values) if isinstance(values, (set, frozenset)) else values):
            errors.extend(int_range_errors(value, loc + [index]))
    return errors


def preferences(prefer_header: str) -> dict[str, str]:
    """The preferences of a ``Prefer`` header (RFC 7240): lower-cased name -> value (unquoted; ""
    when it has none). A name given twice keeps its first value."""
    found: dict[str, str] = {}
    for part in prefer_header.replace(";", ",").split(","):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name:
            found.setdefault(name, value.strip().strip('"'))
    return found


def check_int_fields(values: Any, names: "tuple[str, ...] | list[str]", loc: list[Any], *,
                     wide: "tuple[str, ...]" = ()) -> None:
    """Raise 422 naming every listed field whose integer(s) do not fit the 32-bit columns (the
    ``wide`` ones: 64-bit columns)."""
    if not isinstance(values, dict):
        return
    errors = [err for name in names if name in values for err in int_range_errors(values[name], loc + [name])]
    for name in wide:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            errors.append((loc + [name], f"integer out of range: {value}"))
    if errors:
        raise ValidationFailed(errors)
