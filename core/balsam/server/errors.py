"""HTTP errors with a ``{"detail": ...}`` body (the shape Balsam 0.7 clients print)."""

from __future__ import annotations

import ast
import logging
import re
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import attrs
import sqlalchemy as sa

from balsam.serialization import PayloadError, partial_from_dict

logger = logging.getLogger(__name__)


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
    #: RFC 7235 3.1: a 401 names the scheme it wants (as Balsam 0.7's FastAPI server did).
    headers = {"WWW-Authenticate": "Bearer"}


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


#: A 422 lists at most this many problems, then one item counting the others. Listing them all,
#: a body with a mistake in each of its many entries (a site's ``queued_jobs`` of 40,000 empty
#: objects, 500 KB) got an answer of 31 MB, some 60 times its size: up to gigabytes, built in one
#: server process, for the 64 MiB a body may have.
MAX_REPORTED_ERRORS = 100


class ValidationFailed(APIError):
    """422 with FastAPI-style items: ``{"loc": [...], "msg": reason, "type": "value_error"}``."""

    status_code = 422

    def __init__(self, errors: Iterable[tuple[list[Any], str]], *, more: int = 0,
                 more_within: "list[Any] | None" = None) -> None:
        """``more``: problems beyond ``errors`` that the caller left out (counted, not listed), all
        under ``more_within`` where the caller knows (a bulk item's ``["body", 3]``). ``errors`` may
        be a :class:`CappedErrors` of a walk that stopped early: the problems it did not look for
        are then not counted, only said to exist (under its ``unchecked_within``)."""
        if more and more_within is None:
            more_within = []  # where they are is not known: they share nothing
        unchecked_within = getattr(errors, "unchecked_within", None)
        items: list[dict[str, Any]] = []
        shared: "list[Any] | None" = more_within if more else unchecked_within
        for loc, msg in errors:
            loc = list(loc)
            # (a slice compared in C first: a caller's full list may hold many thousands)
            if shared is None or loc[:len(shared)] != shared:
                shared = _common_prefix(shared, loc)
            if len(items) < MAX_REPORTED_ERRORS:
                items.append({"loc": loc, "msg": msg, "type": "value_error"})
            else:
                more += 1
        if more or unchecked_within is not None:
            # The counting item is where all the problems are, as far as known: a bulk call's client
            # refuses just the one item they are all of (``["body", 3]``) and sends the others again,
            # where a ``["body"]`` refuses the whole call (it was split in halves to find the item).
            loc = shared if shared else (items[0]["loc"][:1] if items else ["body"])
            if unchecked_within is not None:
                # The walk stopped at its first problem past those listed: counting the others would
                # cost a walk of the whole body (a 64 MiB body of them: seconds, in one process).
                msg = f"and more problems (the first {len(items)} are listed; the rest were not checked)"
            else:
                msg = f"and {more} more problems (the first {len(items)} are listed)"
            items.append({"loc": loc, "type": "value_error", "msg": msg})
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
    shown = exc.errors[:MAX_REPORTED_ERRORS]  # split_path only what is listed
    return ValidationFailed(((list(prefix) + split_path(path), msg) for path, msg in shown),
                            more=len(exc.errors) - len(shown), more_within=list(prefix))


def _common_prefix(a: "list[Any] | None", b: "list[Any] | None") -> "list[Any] | None":
    """The longest loc both start with (``[]`` where they share nothing); the other where one is
    None (not known yet)."""
    if a is None or b is None:
        return b if a is None else a
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n] and type(a[n]) is type(b[n]):
        n += 1
    return a[:n]


class WalkStopped(Exception):
    """A :class:`CappedErrors` holds all the problems an answer lists and one more: the walk that
    found them stops (raised from ``append``, caught by the walk's caller)."""


class CappedErrors(list):
    """Problems found by a walk of a body (a list of ``(loc, msg)``), which stops once it has found
    ``MAX_REPORTED_ERRORS + 1`` of them: a 64 MiB body with a problem in each of its values costs
    no more time or memory than its first ones. ``unchecked_within``: where it stopped early, the
    loc under which all the parts of the body it did not walk lie (:func:`unwalked_within`); None
    when the walk ended, the list then holding every problem. :class:`ValidationFailed` lists the
    first ones and says there are more."""

    unchecked_within: "list[Any] | None" = None

    def append(self, error: tuple[list[Any], str]) -> None:
        super().append(error)
        if len(self) > MAX_REPORTED_ERRORS:
            raise WalkStopped


def unwalked_within(value: Any, loc: list[Any], stopped_at: list[Any]) -> "list[Any] | None":
    """The loc under which lies every part of ``value`` (at ``loc``) that an in-order walk, stopped
    at the problem at ``stopped_at``, did not reach: the first container on the way down that has
    entries after the one the way goes through; None when there is none (the walk's list of
    problems is complete). A few steps (the depth of ``stopped_at``), where walking on to find the
    rest cost as much as the whole body. Sound, not always the narrowest: a step that may not be
    the key itself (a key shortened in its loc, ``"kkk..."``) counts as one with entries after it."""
    path = stopped_at[len(loc):]
    node = value
    for depth, step in enumerate(path):
        if type(node) is dict:
            last = next(reversed(node)) if node else None
        elif type(node) is list:
            last = len(node) - 1
        else:
            return list(loc) + path[:depth]
        if type(step) is not type(last) or step != last or (type(step) is str and step.endswith("...")):
            return list(loc) + path[:depth]
        node = node[step]
    # The problem's own value: what a walk finds in it after the problem (a NUL in a key, then the
    # key's value) was not looked at either.
    return list(stopped_at) if (type(node) is dict or type(node) is list) and node else None


def first_problems(problems: Iterable[tuple[list[Any], str]], value: Any, loc: list[Any]) -> CappedErrors:
    """The first ``MAX_REPORTED_ERRORS + 1`` of ``problems``, a lazy walk of ``value`` (at ``loc``)
    in order, as :class:`CappedErrors` (the walk stops there)."""
    errors = CappedErrors()
    try:
        for problem in problems:
            errors.append(problem)
    except WalkStopped:
        errors.unchecked_within = unwalked_within(value, loc, errors[-1][0])
    return errors


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


# ---------------------------------------------------------------------------------------------
# The database's refusals (IntegrityError) as answers a user can act on. A route checks what a
# request refers to before it writes, but on PostgreSQL a concurrent delete may commit between
# that check and the write (a Session create and its site's delete): the foreign key then refused
# the write, and the app's last-resort handler answered 409 with the DBAPI's text ("insert or
# update on table ... violates foreign key constraint ..."), which names no record the user knows.
# Routes wrap their write transactions in :func:`refusals_answered`, which answers as the check
# does when the record was already gone (404 naming it), or a unique key taken meanwhile as 409.
# ---------------------------------------------------------------------------------------------

#: What the rows of each table are called in answers.
ROW_NAMES = {"sites": "Site", "apps": "App", "batch_jobs": "BatchJob", "sessions": "Session", "jobs": "Job",
             "users": "User", "credentials": "Credential", "transfer_items": "TransferItem", "log_events": "EventLog"}
#: Foreign keys whose referenced row has a better name than its table's: a job's parents.
_FK_ROW_NAMES = {"fk_job_parents_parent_id_jobs": "Parent job"}
_PG_NOT_PRESENT = re.compile(r'Key \(([^)]*)\)=\(([^)]*)\) is not present in table "([^"]+)"')
_PG_REFERENCED = re.compile(r'Key \(([^)]*)\)=\(([^)]*)\) is still referenced from table "([^"]+)"')
#: The referenced (parent) table of a "still referenced" error: PostgreSQL's own sets the error's
#: table field to the *referencing* one (the 0007 triggers set it to the parent), the message names both.
_PG_REFERENCED_PARENT = re.compile(r'^update or delete on table "([^"]+)"')
_PG_EXISTS = re.compile(r'Key \(([^)]*)\)=\((.*)\) already exists')
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (.+)")
_SQLITE_NOT_NULL = re.compile(r"NOT NULL constraint failed: (\w+)\.(\w+)")


@attrs.frozen
class Refusal:
    """What the database refused, read from its IntegrityError. ``kind``: ``missing`` (a row the
    write refers to does not exist: ``table``, its API ``name`` and ``key``, the id, where the
    database says them: PostgreSQL does, SQLite names nothing), ``referenced`` (a row still
    referenced), ``duplicate`` (a unique key is taken: ``table``, ``columns``, ``key`` their
    values' text where known), ``not_null`` (``table``, ``columns``), ``other``."""

    kind: str
    table: Optional[str] = None
    name: Optional[str] = None
    columns: tuple = ()
    key: Optional[str] = None

    @property
    def id(self) -> Optional[int]:
        """The key as an id (None when the database did not say it, or it is not one)."""
        return int(self.key) if self.key is not None and self.key.isdecimal() else None


def database_refusal(exc: sa.exc.IntegrityError) -> Refusal:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "pgcode", None)
    if code is not None:  # PostgreSQL (psycopg2): the SQLSTATE and the error's fields
        diag = orig.diag
        detail, table, constraint = diag.message_detail or "", diag.table_name, diag.constraint_name
        if code == "23503":
            found = _PG_NOT_PRESENT.search(detail)
            if found:
                parent = found.group(3)
                name = _FK_ROW_NAMES.get(constraint or "") or ROW_NAMES.get(parent, parent)
                return Refusal("missing", parent, name, (found.group(1),), found.group(2))
            found = _PG_REFERENCED.search(detail)
            named = _PG_REFERENCED_PARENT.search(diag.message_primary or "")
            parent = named.group(1) if named else table
            return Refusal("referenced", parent, ROW_NAMES.get(parent or "", parent), (),
                           found.group(2) if found else None)
        if code == "23505":
            found = _PG_EXISTS.search(detail)
            columns = tuple(c.strip() for c in found.group(1).split(",")) if found else ()
            return Refusal("duplicate", table, ROW_NAMES.get(table or "", table), columns,
                           found.group(2) if found else None)
        if code == "23502":
            return Refusal("not_null", table, ROW_NAMES.get(table or "", table), (diag.column_name,))
        return Refusal("other", table, ROW_NAMES.get(table or "", table))
    text = str(orig if orig is not None else exc)
    if "FOREIGN KEY constraint failed" in text:  # SQLite names neither the table nor the key
        return Refusal("missing")
    found = _SQLITE_UNIQUE.search(text)
    if found:
        pairs = [c.strip().split(".", 1) for c in found.group(1).split(",")]
        table = pairs[0][0] if pairs and len(pairs[0]) == 2 else None
        return Refusal("duplicate", table, ROW_NAMES.get(table or "", table), tuple(p[-1] for p in pairs))
    found = _SQLITE_NOT_NULL.search(text)
    if found:
        return Refusal("not_null", found.group(1), ROW_NAMES.get(found.group(1), found.group(1)), (found.group(2),))
    return Refusal("other")


def refusal_answer(refusal: Refusal) -> APIError:
    """The answer to a refusal no route answers better: one line naming the record (and its id
    where the database said it), never the DBAPI's text."""
    if refusal.kind == "missing":
        if refusal.table == "users":
            # The request's own user was deleted (by an administrator, in the database) after its
            # credential was last checked (the revocation cache): what any request of it now gets.
            return Unauthorized("This token's user no longer exists")
        if refusal.id is not None:
            return not_found_ids(refusal.name or "Record", [refusal.id])
        return NotFound("A record this request refers to (its site, app, BatchJob or parent jobs) no longer exists")
    if refusal.kind == "duplicate":
        what = refusal.name or "record"
        columns = ", ".join(refusal.columns) or "key"
        value = f" ({refusal.key})" if refusal.key is not None else ""
        return Conflict(f"A {what} with this {columns}{value} already exists")
    if refusal.kind == "referenced":
        which = f"{refusal.name or 'record'} {refusal.key}" if refusal.key is not None else (refusal.name or "record")
        return Conflict(f"The {which} is still referred to by other records: it cannot change")
    if refusal.kind == "not_null":
        return APIError(f"{refusal.name or 'A record'} needs a value for {', '.join(map(str, refusal.columns))}", 422)
    return Conflict("The change conflicts with existing data (a concurrent request changed it first): retry")


#: A route's answer to a refusal: an APIError, or None to leave it to :func:`refusal_answer`.
RefusalAnswer = Callable[[Refusal], Optional[APIError]]


@contextmanager
def refusals_answered(answer: "RefusalAnswer | None" = None) -> Iterator[None]:
    """Answer the database's IntegrityError raised inside as ``answer`` says (else
    :func:`refusal_answer`). Wraps a write transaction from outside (``with
    refusals_answered(...), ctx.write() as conn:``), so that the transaction has rolled back,
    nothing of the request applied, when the answer is made. The DBAPI's text goes to the log."""
    try:
        yield
    except sa.exc.IntegrityError as exc:
        refusal = database_refusal(exc)
        text = str(getattr(exc, "orig", None) or exc).strip()
        logger.info("The database refused a write (%s): %s", refusal.kind,
                    text.splitlines()[0] if text else type(exc).__name__)
        raise (answer(refusal) if answer is not None else None) or refusal_answer(refusal) from exc


def missing_answers(messages: "dict[str, str]") -> RefusalAnswer:
    """An answer naming the missing record as the route's own check does: ``messages`` by the
    referenced table (``{"sites": "Site 3 not found"}``); where the database did not say which
    (SQLite), the message of the only table given."""
    def answer(refusal: Refusal) -> Optional[APIError]:
        if refusal.kind != "missing":
            return None
        if refusal.table in messages:
            return NotFound(messages[refusal.table])
        if refusal.table is None and len(messages) == 1:
            return NotFound(next(iter(messages.values())))
        return None
    return answer
