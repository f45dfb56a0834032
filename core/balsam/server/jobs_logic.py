"""Jobs: filters, bulk create, bulk update and the server side of the state machine.

Every function takes an open connection inside a transaction and works set-based: one query
per step for a whole batch of jobs, never one query per job.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from array import array
from bisect import bisect_left
from collections import defaultdict
from itertools import repeat
from operator import itemgetter
from typing import Any, Callable, Iterable, Sequence

import attrs
import orjson
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams
from sqlalchemy.dialects import postgresql

from balsam.models import Job, workdir_problem
from balsam.serialization import parse_datetime
from balsam.transfer import TransferError, TransferLocation
from balsam.util import paused_gc
from balsam.states import (
    RUNNABLE_STATES, USER_FORCEABLE_TARGETS, InvalidTransition, JobState, TransferDirection, TransferItemState,
    validate_transition,
)

from .auth import SITE_SCOPE
from .db import bulk_insert, id_in, ids_in_param, ids_param, raw_cursor, update_rows_by_id, where_eq, where_gt, where_in
from .errors import null_field_errors, payload_errors, split_path, Conflict, ValidationFailed, not_found_ids
from .idempotency import require_all_replayed
from .job_counts import count_matching, counts_by_state, jobs_with_each_tag
from .http import (ID_AFTER, INT64_MAX, INT64_MIN, INT_MAX, INT_MIN, QueryParams, dumps, int_range_errors,
                   is_json_int, wire_datetime)
from .limits import (FIELD_CHARS, MAX_KEY_CHARS, MAX_PATH_CHARS, MAX_TAG_VALUE_CHARS, MAX_TEXT_CHARS,
                     json_value_within_limits, list_item_size_errors, list_size_errors_of_unchecked)
from .pg_copy import NULL, allocate_ids, column_fields, copy_body, copy_rows, field_writer, text_field
from .tables import CLEANUP_PREDICATES, apps, batch_jobs, job_parents, jobs, log_events, sites, transfer_items

S = JobState
#: Columns of a job as the API returns it (Balsam 0.7 JobOut).
JOB_OUT_FIELDS = [
    "id", "workdir", "app_id", "tags", "serialized_parameters", "data", "return_code", "num_nodes",
    "ranks_per_node", "threads_per_rank", "threads_per_core", "launch_params", "gpus_per_rank",
    "node_packing_count", "wall_time_min", "parent_ids", "batch_job_id", "state", "pending_file_cleanup",
    "serialized_return_value", "serialized_exception", "last_update",
]
#: JSON columns are read as text and embedded verbatim in the response (orjson.Fragment):
#: listing then never decodes and re-encodes them, which dominates the cost of large pages.
JSON_OUT_FIELDS = frozenset({"tags", "data", "launch_params", "parent_ids"})
JOB_OUT_COLUMNS = [
    sa.cast(jobs.c[name], sa.Text).label(name) if name in JSON_OUT_FIELDS else jobs.c[name] for name in JOB_OUT_FIELDS
]
_JSON_POSITIONS = [i for i, name in enumerate(JOB_OUT_FIELDS) if name in JSON_OUT_FIELDS]
_LAST_UPDATE = JOB_OUT_FIELDS.index("last_update")
#: Fields a client may set when creating a job (state and ids are decided by the server).
CREATE_FIELDS = [
    "workdir", "app_id", "tags", "serialized_parameters", "data", "return_code", "num_nodes", "ranks_per_node",
    "threads_per_rank", "threads_per_core", "launch_params", "gpus_per_rank", "node_packing_count",
    "wall_time_min", "batch_job_id", "pending_file_cleanup", "serialized_return_value", "serialized_exception",
]
UPDATE_FIELDS = {
    "workdir", "tags", "serialized_parameters", "data", "return_code", "num_nodes", "ranks_per_node",
    "threads_per_rank", "threads_per_core", "launch_params", "gpus_per_rank", "node_packing_count",
    "wall_time_min", "batch_job_id", "state", "state_timestamp", "state_data", "pending_file_cleanup",
    "serialized_return_value", "serialized_exception",
}
JOB_ORDERINGS = ["last_update", "-last_update", "id", "-id", "state", "-state", "workdir", "-workdir"]
JOB_FILTERS = {
    "id", "parent_id", "app_id", "site_id", "batch_job_id", "last_update_before", "last_update_after",
    "workdir__contains", "state__ne", "state", "tags", "pending_file_cleanup", "ordering", ID_AFTER,
}
#: ``PUT /jobs/`` by filter only (not a Balsam 0.7 filter): ``leased=false`` matches the jobs no
#: session holds (``session_id`` null), ``true`` those one holds. The site agent's hook worker sends
#: ``false`` with a hook's changes made after its own save (hooks_runner._saved_by_hook): a job a
#: launcher acquired and has not reported RUNNING yet is still in the state the hook saved, and the
#: update, without a session, ended that launcher's lease. Not on the listing routes: their counts
#: and fast paths (count_jobs_by_state, keyset pages) know the filters above only.
LEASED_FILTER = "leased"
UPDATE_FILTERS = JOB_FILTERS | {LEASED_FILTER}
SESSION_EXPIRED_MSG = "Session expired: job was stuck in RUNNING state"
#: The same release when the Session's BatchJob ended (the scheduler says its allocation is over)
#: or when the Session was deleted: its launcher is gone, nothing expired.
BATCH_JOB_ENDED_MSG = "Its BatchJob ended while the job was RUNNING (the launcher is gone): run again"
SESSION_DELETED_MSG = "Its launcher's Session was deleted while the job was RUNNING: run again"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def site_owned_by(user_id: int) -> sa.ColumnElement[bool]:
    """The ``sites`` rows a request of this user may touch: their own sites, and with a
    site-scoped (launcher) credential only that one site (``SITE_SCOPE``, set per request)."""
    clause = sites.c.owner_id == user_id
    scope = SITE_SCOPE.get()
    return clause if scope is None else sa.and_(clause, sites.c.id == scope)


def owned_site_ids(user_id: int) -> sa.Select:
    return sa.select(sites.c.id).where(site_owned_by(user_id))


# Statements of the per-request path are built once and executed with parameters. Building one
# (and SQLAlchemy's walk of it for its cache key) cost two to three times its execution: 130-200
# against 40-75 us here, several per request. A site scope (SITE_SCOPE) is a second variant.

def owned_sites_clause(scoped: bool) -> sa.ColumnElement[bool]:
    """``site_owned_by`` with parameters ``b_owner`` (and ``b_scope``): see :func:`owner_params`."""
    clause = sites.c.owner_id == sa.bindparam("b_owner")
    return sa.and_(clause, sites.c.id == sa.bindparam("b_scope")) if scoped else clause


def owner_params(user_id: int) -> tuple[bool, dict[str, int]]:
    """(whether the request is site-scoped, the parameters of :func:`owned_sites_clause`)."""
    scope = SITE_SCOPE.get()
    if scope is None:
        return False, {"b_owner": user_id}
    return True, {"b_owner": user_id, "b_scope": scope}


def _current_states_stmt(dialect: str, scoped: bool) -> sa.Select:
    stmt = sa.select(jobs.c.id, jobs.c.state, jobs.c.session_id).where(
        ids_in_param(jobs.c.id, dialect), jobs.c.site_id.in_(sa.select(sites.c.id).where(owned_sites_clause(scoped)))
    )
    if dialect == "postgresql":
        # Lock the rows (in id order: no deadlock between concurrent bulk updates) so that each
        # transition is validated against the state it really changes.
        stmt = stmt.order_by(jobs.c.id).with_for_update(of=jobs)
    return stmt


#: A job leased in these states may be running in its launcher (leased ahead and started, its
#: RUNNING not reported yet): a user's re-run or failure of it that ends the lease marks the job
#: (update_jobs). Not a move to RUN_DONE, RUN_ERROR or RUN_TIMEOUT: sent without a session, that is
#: also a Balsam 0.7 launcher's report of its own run's end, whose re-run must not wait.
_LAUNCHER_HELD_STATES = RUNNABLE_STATES | {S.running}

_CURRENT_STATES = {(d, scoped): _current_states_stmt(d, scoped) for d in ("postgresql", "sqlite") for scoped in (False, True)}


def _scalar_candidates(value: str, loose: bool) -> list[Any]:
    """``"1"`` matches the string "1" and, with ``loose``, also the JSON number 1 (or true/false/null)."""
    candidates: list[Any] = [value]
    if loose:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = value
        if not isinstance(parsed, (str, list, dict)):
            candidates.append(parsed)
    return candidates


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.:@+/ -]+$")


def json_contains(col: sa.ColumnElement, wanted: dict[str, str], dialect: str, *, loose: bool = False,
                  indexable: bool = True) -> sa.ColumnElement[bool]:
    """``col @> wanted`` for a flat dict of strings (JSONB containment on PostgreSQL, which the
    GIN index serves). ``loose`` also matches numbers and booleans written as text (event data).

    ``indexable=False``: on PostgreSQL the same test as the function behind the operator,
    ``jsonb_contains(col, wanted)``, which no index serves (the counterpart of SQLite's ``+column``):
    for a query that reads a few rows from another index (an acquire's partial index, the backlog's
    active states), where the planner would otherwise AND it with the GIN index's bitmap of every
    job carrying the tag, finished ones included (10^6 jobs: an acquire 0.2 -> 17-38 ms)."""
    if not wanted:
        return sa.true()
    clauses = []
    for key, value in wanted.items():
        candidates = _scalar_candidates(str(value), loose)
        if dialect == "postgresql":
            jsonb = sa.type_coerce(col, postgresql.JSONB)
            if indexable:
                clauses.append(sa.or_(*[jsonb.contains({key: c}) for c in candidates]))
            else:
                clauses.append(sa.or_(*[sa.func.jsonb_contains(jsonb, sa.bindparam(None, {key: c}, type_=postgresql.JSONB))
                                        for c in candidates]))
        elif not _PLAIN_KEY.match(key):
            # SQLite's JSON paths cannot quote every key (a '"', a backslash, non-ASCII): look such
            # keys up among the entries instead (slower, so plain keys keep the path).
            entries = sa.func.json_each(col).table_valued("key", "value", "type")
            match = sa.select(sa.literal(1)).select_from(entries).where(
                entries.c.key == key, _sqlite_value_match(entries.c.value, entries.c.type, candidates))
            clauses.append(match.exists())
        else:
            path = '$."' + key + '"'
            clauses.append(_sqlite_value_match(sa.func.json_extract(col, path), sa.func.json_type(col, path),
                                               candidates))
    return sa.and_(*clauses)


def _sqlite_value_match(extracted: sa.ColumnElement, kind: sa.ColumnElement, candidates: list[Any]) -> sa.ColumnElement[bool]:
    """The JSON value (``extracted``, of SQLite JSON ``kind``) equals one of the candidates."""
    options = []
    for c in candidates:
        if c is None:
            options.append(kind == "null")
        elif isinstance(c, bool):
            options.append(kind == ("true" if c else "false"))
        elif isinstance(c, str):  # the value first: most rows fail there, with one JSON parse
            options.append(sa.and_(extracted == c, kind == "text"))
        else:
            options.append(sa.and_(extracted == c, kind.in_(("integer", "real"))))
    return sa.or_(*options)


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def contains_text(column: Any, text: str, dialect: str) -> sa.ColumnElement[bool]:
    """``column`` holds ``text``, literally and case-sensitively (``workdir__contains``, the sites'
    ``path``, the apps' ``site_path``), as PostgreSQL's LIKE and Balsam 0.7 matched. SQLite's LIKE
    folds ASCII case: ``workdir__contains=Run`` matched ``run/1`` there (and a query delete with it
    deleted those jobs), so SQLite tests ``instr``, which compares the text as it is."""
    if dialect == "sqlite":
        return sa.func.instr(column, text) > 0
    return column.like(f"%{like_escape(text)}%", escape="\\")


def job_dicts(rows: Iterable[sa.Row]) -> list[dict[str, Any]]:
    """Rows selected with JOB_OUT_COLUMNS -> response dicts (JSON columns as orjson fragments)."""
    keys, positions, fragment = JOB_OUT_FIELDS, _JSON_POSITIONS, orjson.Fragment
    out = []
    for row in rows:
        values = list(row)
        for i in positions:
            values[i] = fragment(values[i])
        values[_LAST_UPDATE] = wire_datetime(values[_LAST_UPDATE])
        out.append(dict(zip(keys, values)))
    return out


def plain_job_dicts(rows: Iterable[sa.Row]) -> list[dict[str, Any]]:
    """Rows selected with JOB_OUT_COLUMNS -> dicts with the JSON columns decoded (for templates)."""
    out = []
    for row in rows:
        values = list(row)
        for i in _JSON_POSITIONS:
            values[i] = orjson.loads(values[i]) if values[i] is not None else None
        out.append(dict(zip(JOB_OUT_FIELDS, values)))
    return out


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------

def apply_job_filters(stmt: sa.Select, q: QueryParams, dialect: str, *, by_time: bool = False) -> sa.Select:
    """``stmt`` limited to the jobs the query's filters match. ``by_time``: the site and app tests as
    ``column + 0``, which no index serves, so that SQLite reads the jobs of the ``last_update``
    range from ``ix_jobs_last_update_id`` (see :func:`_few_in_time_range`)."""
    stmt = where_in(stmt, jobs.c.id, q.int_list("id", bits=64))
    stmt = where_gt(stmt, jobs.c.id, q.int(ID_AFTER, bits=64))
    parent_ids = q.int_list("parent_id", bits=64)
    if parent_ids is not None:
        stmt = stmt.where(
            jobs.c.id.in_(sa.select(job_parents.c.child_id).where(job_parents.c.parent_id.in_(parent_ids)))
        )
    stmt = where_eq(stmt, jobs.c.app_id + 0 if by_time else jobs.c.app_id, q.int("app_id"))
    stmt = where_in(stmt, jobs.c.site_id + 0 if by_time else jobs.c.site_id, q.int_list("site_id"))
    stmt = where_eq(stmt, jobs.c.batch_job_id, q.int("batch_job_id"))
    for condition in _time_range(q):
        stmt = stmt.where(condition)
    contains = q.str("workdir__contains")
    if contains:
        stmt = stmt.where(contains_text(jobs.c.workdir, contains, dialect))
    state_ne = q.enum("state__ne", JobState)
    if state_ne is not None:
        stmt = stmt.where(jobs.c.state != state_ne)
    states, pending_cleanup = q.enum_list("state", JobState), q.bool("pending_file_cleanup")
    if states == [JobState.finished.value] and pending_cleanup is True:
        # The file cleaner's listing: the jobs of its partial index (migration 0015), with the
        # index's predicate word for word (SQLite uses a partial index only then; see tables.py).
        stmt = stmt.where(sa.text(CLEANUP_PREDICATES[dialect]))
        states = pending_cleanup = None
    stmt = where_in(stmt, jobs.c.state, states)
    tags = q.key_values("tags")
    if tags:
        stmt = stmt.where(json_contains(jobs.c.tags, tags, dialect))
    stmt = where_eq(stmt, jobs.c.pending_file_cleanup, pending_cleanup)
    return stmt


def check_job_filters(q: QueryParams, dialect: str) -> None:
    """Read every filter of a query update or delete, and its ordering, before anything is done: a
    bad value is its one-line 422 then. The ordering, which neither reads, was never checked there
    (``DELETE /jobs/?ordering=nope`` deleted every job), and a bad filter of a delete was refused
    only after its Idempotency-Key was claimed and expired sessions swept."""
    apply_job_filters(sa.select(jobs.c.id), q, dialect)
    job_ordering(q)
    q.bool(LEASED_FILTER)


def _time_range(q: QueryParams) -> list[sa.ColumnElement[bool]]:
    """The query's conditions on ``last_update`` (``last_update_before``, ``last_update_after``)."""
    conditions = []
    before = q.datetime("last_update_before")
    if before is not None:
        conditions.append(jobs.c.last_update <= before)
    after = q.datetime("last_update_after")
    if after is not None:
        conditions.append(jobs.c.last_update >= after)
    return conditions


def job_ordering(q: QueryParams, cols: Any = jobs.c) -> list[sa.ColumnElement]:
    """The ORDER BY of a listing, on ``cols`` (the jobs table's columns, or a subquery's)."""
    ordering = q.choice("ordering", JOB_ORDERINGS)
    if not ordering:
        return [cols.id]
    col = cols[ordering.lstrip("-")]
    first = col.desc() if ordering.startswith("-") else col.asc()
    return [first, cols.id.desc() if ordering.startswith("-") else cols.id]


def list_jobs(conn: sa.Connection, user_id: int, q: QueryParams, limit: int, offset: int) -> tuple[int, list]:
    count, page = _job_page(conn, user_id, q, limit, offset, JOB_OUT_COLUMNS)
    return count, [] if page is None else job_dicts(conn.execute(page))


def list_jobs_json(conn: sa.Connection, user_id: int, q: QueryParams, limit: int, offset: int) -> tuple[int, str]:
    """``list_jobs`` with the page as the JSON text of its list of objects. PostgreSQL writes it
    whole (``json_agg`` of the page's rows, in C: one value fetched instead of a row per job, no
    dict per job in Python); SQLite pages are built from the rows (``_sqlite_object_page``)."""
    if conn.dialect.name != "postgresql":
        return _sqlite_object_page(conn, user_id, q, limit, offset)
    return _pg_object_page(conn, user_id, q, limit, offset)


@functools.cache
def _sqlite_page_columns() -> list[Any]:
    """JOB_OUT_COLUMNS with ``last_update`` as the text SQLite writes from its stored value
    (``_json_datetime``): what ``wire_datetime`` and orjson make of the same value, character for
    character (SQLAlchemy stores ``YYYY-MM-DD HH:MM:SS.ffffff``, six digits)."""
    return [_json_datetime("sqlite", jobs.c.last_update).label("last_update") if name == "last_update" else col
            for name, col in zip(JOB_OUT_FIELDS, JOB_OUT_COLUMNS)]


def _sqlite_object_page(conn: sa.Connection, user_id: int, q: QueryParams, limit: int, offset: int) -> tuple[int, str]:
    """``list_jobs``'s page as JSON text on SQLite, the same bytes (tests/server/test_rawhttp_*):
    ``last_update`` comes as text (``_sqlite_page_columns``), not as a datetime made aware of UTC,
    converted and made naive again for each job, and the rows are fetched at once rather than with
    one driver call each (together: 34-36 -> 25-26 ms of server CPU for a 5,000-job page)."""
    count, page = _job_page(conn, user_id, q, limit, offset, _sqlite_page_columns())
    if page is None:
        return count, "[]"
    keys, positions, fragment = JOB_OUT_FIELDS, _JSON_POSITIONS, orjson.Fragment
    out = []
    for row in conn.execute(page).fetchall():
        values = list(row)
        for i in positions:
            values[i] = fragment(values[i])
        out.append(dict(zip(keys, values)))
    return count, dumps(out).decode()


#: A page of jobs as columns (``Accept`` of our client): ``{"count": N, "fields": JOB_OUT_FIELDS,
#: "columns": ["[the page's values of a field, in the page's order]", ...]}``: a column per field,
#: each the JSON text of its list of values, in a string. The database writes each column with one
#: aggregate (it looks up how to write a type once per column, not once per value as a row's
#: ``json_build_array`` does: a 10,000-job page in about two thirds of the time); no field name is
#: repeated per job. In strings, so that a client parses a column only when a field of it is
#: first read: listing 10,000 jobs then makes none of their 220,000 values (8-9 MB of objects,
#: whose fresh memory costs page faults, 10-40 ms on this VM).
COLUMNS_MEDIA_TYPE = "application/vnd.balsam.columns+json"


def _json_datetime(dialect: str, col: Any) -> Any:
    """A datetime column as the text the database puts into JSON, exactly as every other answer
    writes it (orjson, naive UTC: ``YYYY-MM-DDTHH:MM:SS.ffffff``, no fraction when it is zero).
    PostgreSQL's own JSON form of a timestamp drops the fraction's trailing zeros, and SQLite's
    stored text always has six digits: a client comparing the texts of one instant (a listing's
    ``last_update`` against a create's answer) would see two."""
    if dialect == "postgresql":
        utc = sa.func.timezone("UTC", col)
        return sa.case((sa.func.date_trunc("second", utc) == utc, sa.func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS')),
                       else_=sa.func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS.US'))
    text = sa.cast(col, sa.Text)  # stored as SQLAlchemy writes it: 'YYYY-MM-DD HH:MM:SS.ffffff'
    return sa.case((sa.func.substr(text, 20) == ".000000", sa.func.replace(sa.func.substr(text, 1, 19), " ", "T")),
                   else_=sa.func.replace(text, " ", "T"))


def _json_values(dialect: str, cols: Any = jobs.c) -> list[Any]:
    """JOB_OUT_FIELDS as the database writes them into JSON: datetimes as naive UTC ISO text (as
    ``wire_datetime``), the JSON columns embedded (not quoted), booleans as JSON booleans."""
    values: list[Any] = []
    for name in JOB_OUT_FIELDS:
        col = cols[name]
        if name == "last_update":
            values.append(_json_datetime(dialect, col))
        elif dialect == "postgresql":
            values.append(col)
        elif name in JSON_OUT_FIELDS:
            values.append(sa.func.json(col))  # stored as JSON text: embedded, not quoted
        elif name == "pending_file_cleanup":
            values.append(sa.case((col, sa.func.json("true")), else_=sa.func.json("false")))
        else:
            values.append(col)
    return values


def list_job_columns(conn: sa.Connection, user_id: int, q: QueryParams, limit: int,
                     offset: int) -> tuple[int, list[str]]:
    """``list_jobs`` as the JSON text of each of its columns (see ``COLUMNS_MEDIA_TYPE``).

    The page is a subquery in the listing's order and each column aggregates it. Aggregating in
    the subquery's order is what both databases do, but neither promises it (an ``ORDER BY`` in
    each aggregate would: 22 sorts of the page on PostgreSQL 15). Every column is aggregated from
    the same sequence of rows, so one column that comes out in the listing's order shows that all
    do: the ids when the listing is ordered by id (the default), else the rows' positions in the
    listing (``row_number()`` over the same order, a column more). Out of order, the page is built
    from ``list_jobs`` instead.
    """
    dialect = conn.dialect.name
    by_id = (q.choice("ordering", JOB_ORDERINGS) or "id") in ("id", "-id")
    selected = [jobs.c[name] for name in JOB_OUT_FIELDS]
    if not by_id:
        selected.append(sa.func.row_number().over(order_by=job_ordering(q)).label("position"))
    count, page = _job_page(conn, user_id, q, limit, offset, selected)
    if page is None:
        return count, ["[]"] * len(JOB_OUT_FIELDS)
    rows = page.subquery("page")
    aggregate = sa.func.json_agg if dialect == "postgresql" else sa.func.json_group_array
    values = _json_values(dialect, rows.c) + ([] if by_id else [rows.c.position])
    # As text: psycopg2 would parse json.
    texts = list(conn.execute(sa.select(*[sa.cast(aggregate(value), sa.Text) for value in values])).one())
    if by_id:
        in_order = _ids_in_order(texts[0], descending=q.str("ordering") == "-id")
    else:
        in_order = _positions_in_order(texts.pop(), offset)
    if not in_order:
        count, results = list_jobs(conn, user_id, q, limit, offset)
        return count, [dumps([job[name] for job in results]).decode() for name in JOB_OUT_FIELDS]
    return count, texts


def _ids_in_order(text: str, *, descending: bool) -> bool:
    """The JSON list of a page's ids is strictly increasing (decreasing)."""
    ids = orjson.loads(text)
    if descending:
        ids.reverse()
    return all(a < b for a, b in zip(ids, ids[1:]))


def _positions_in_order(text: str, offset: int) -> bool:
    """The JSON list of a page's positions in its listing is offset + 1, offset + 2, ..."""
    positions = orjson.loads(text)
    return positions == list(range(offset + 1, offset + 1 + len(positions)))


def _pg_object_page(conn: sa.Connection, user_id: int, q: QueryParams, limit: int, offset: int) -> tuple[int, str]:
    """A page as one JSON array of objects written by PostgreSQL: ``json_agg`` of the page's rows
    in the page's order (a row becomes the object of JOB_OUT_FIELDS, written compactly, datetimes
    as naive UTC). The page is a subquery: its LIMIT and the index it reads stay as they are.
    (A ``row_to_json`` per row, joined here, takes less database time but more of the server's.)"""
    columns = [_json_datetime("postgresql", jobs.c.last_update).label(name) if name == "last_update" else jobs.c[name]
               for name in JOB_OUT_FIELDS]
    count, page = _job_page(conn, user_id, q, limit, offset, columns)
    if page is None:
        return count, "[]"
    rows = page.subquery("page")
    agg = sa.func.json_agg(postgresql.aggregate_order_by(rows.table_valued(), *job_ordering(q, rows.c)))
    text = conn.execute(sa.select(sa.cast(agg, sa.Text))).scalar_one()  # text: psycopg2 would parse json
    return count, text or "[]"


def _job_page(conn: sa.Connection, user_id: int, q: QueryParams, limit: int, offset: int,
              columns: list[Any]) -> tuple[int, "sa.Select | None"]:
    """The number of matching jobs, and the statement selecting ``columns`` of one page (None if empty)."""
    dialect = conn.dialect.name
    # Read first, so that a bad ordering is refused even when nothing matches (the page, which
    # alone uses it, is then not built: ``ordering=nope`` answered 200 to a user with no jobs).
    order = job_ordering(q)
    # SQLite, which has no statistics unless someone runs ANALYZE (the server never does), takes an
    # equality on site_id for ~10 rows and a range on last_update for a quarter of the table: it
    # reads the site's every job through (site_id, id) or (site_id, state, id), whatever the range.
    # When the range holds few jobs (_few_in_time_range), the site (and app) tests are written so
    # that no index serves them and ix_jobs_last_update_id is read, with or without statistics.
    by_time = dialect == "sqlite" and _few_in_time_range(conn, user_id, q)
    count = counted_from_counters(conn, user_id, q)
    if count is None:
        site = jobs.c.site_id + 0 if by_time else jobs.c.site_id
        base = sa.select(jobs.c.id).where(site.in_(owned_site_ids(user_id)))
        base = apply_job_filters(base, q, dialect, by_time=by_time)
        count = conn.execute(sa.select(sa.func.count()).select_from(base.subquery())).scalar_one()
    if limit == 0 or offset >= count:
        # Nothing to read: a client paging until a short page asks for the one past the end (the
        # count is exact, from the counters or the scan above).
        return count, None
    # The owner's site ids as values, not a subquery: PostgreSQL then walks (site_id, state, id) in
    # id order for a page instead of joining sites and sorting every match (10^6 jobs: 2 vs 130 ms).
    site_ids = list(conn.execute(owned_site_ids(user_id)).scalars())
    ordering = q.choice("ordering", JOB_ORDERINGS)
    if dialect == "sqlite" and not by_time and ordering in ("last_update", "-last_update"):
        by_time = _walk_in_time_order(conn, count, limit, offset)
    if by_time and ordering in (None, "id", "-id"):
        # The range's few jobs sorted (an expression is no index's order: else SQLite may walk the
        # whole table in id order, the rowid, for the page).
        order = [(jobs.c.id + 0).desc() if ordering == "-id" else jobs.c.id + 0]
    site = jobs.c.site_id + 0 if by_time else jobs.c.site_id
    stmt = sa.select(*columns).where(site.in_(site_ids))
    return count, apply_job_filters(stmt, q, dialect, by_time=by_time).order_by(*order).limit(limit).offset(offset)


#: A ``last_update`` range (``last_update_after``/``_before``) holding at most this many jobs of
#: all users, or half the jobs the other plans read if more (the user's sites', or their jobs in the
#: listing's states or app), is read through ``ix_jobs_last_update_id`` on SQLite
#: (``_job_page``): its count and page then read the range's rows, fewer than the site's jobs that
#: the other plans read for the count (and for a page when the matches are the newest jobs).
FEW_CHANGED = 10_000


def _few_in_time_range(conn: sa.Connection, user_id: int, q: QueryParams) -> bool:
    """Whether the query has a ``last_update`` range holding at most ``max(FEW_CHANGED, half the
    jobs the other plans read)`` jobs of all users, and no ``id``/``parent_id`` filter (those rows
    are looked up by key whatever the range). Told by the counters (the user's jobs) and by counting
    entries of ``ix_jobs_last_update_id`` alone, no row read, up to that bound: what SQLite's
    planner would need statistics for, exact and bounded. Within the bound the range's rows are
    fewer than those the site's indexes give; past it, the plans are those of before migration 0025
    plus the probe, which then counted ``bound + 1`` entries: for a user of 10^6 jobs ~26 ms, 10-20 %
    of such a listing (a poll of the newest 600,000 jobs 205 -> 231 ms, a range of all 10^6 149 ->
    177 ms; docs/performance.md). Unlike :func:`count_jobs_by_state`, whose cost depends on the user's own jobs only, the
    probe counts every user's jobs in the range: its cost is bounded by the user's own jobs (the
    bound comes from their counters), but where it stops, and so which plan is read and how long the
    listing takes, depends on how many jobs other users changed in that range too (not the answer)."""

    conditions = _time_range(q)
    if not conditions or q.params.get("id") or q.params.get("parent_id"):
        return False
    # The jobs the other plans read: the sites' (their states', their app's) through their indexes.
    app_id = q.int("app_id")
    walked = count_matching(conn, owned_site_ids(user_id), site_ids=q.int_list("site_id"),
                            app_ids=None if app_id is None else [app_id], states=q.enum_list("state", JobState))
    bound = max(FEW_CHANGED, walked // 2)
    probe = sa.select(jobs.c.id).where(*conditions).limit(bound + 1).subquery()
    return conn.execute(sa.select(sa.func.count()).select_from(probe)).scalar_one() <= bound


def _walk_in_time_order(conn: sa.Connection, count: int, limit: int, offset: int) -> bool:
    """Whether a page in ``last_update`` order is read walking ``ix_jobs_last_update_id`` from an
    end (SQLite), against ``count`` rows read through the site's index and sorted: only when the
    walk's worst case reads no more. The walk stops at the page's last match, but it reads every
    row that does not match before it: when the matches are the oldest jobs (an idle site, an old
    app or state, another user's newer jobs), all ``jobs - count`` others, then ``offset + limit``.
    So it is taken when ``jobs - count + offset + limit <= count``: the listing holds most of the
    table (one user's unfiltered listing: 10^6 jobs, 700 -> 2 ms), and then the rows it reads are
    bounded by the user's own jobs. (Weighed by the matches' average spread instead, ``(offset +
    limit) x jobs / count``, a skewed listing read every newer job: 30 -> 200-230 ms at 10^6 jobs.)
    The jobs are counted from the ids' span (a lookup at each end of the primary key; deleted jobs
    only make the walk look dearer)."""
    # Two subqueries: SQLite reads a lone min() or max() at the key's end, both together by a scan.
    first, last = conn.execute(sa.select(sa.select(sa.func.min(jobs.c.id)).scalar_subquery(),
                                         sa.select(sa.func.max(jobs.c.id)).scalar_subquery())).one()
    if first is None:
        return False
    return (last - first + 1) - count + offset + limit <= count


#: Filters the trigger-kept counters can answer (balsam.server.job_counts); others need a scan.
COUNTER_FILTERS = frozenset({"site_id", "app_id"})
#: Query parameters a listing's count can take from the counters (with at most one tag).
LISTING_COUNTER_PARAMS = frozenset({"site_id", "app_id", "state", "tags", "limit", "offset", "ordering"})


def counted_from_counters(conn: sa.Connection, user_id: int, q: QueryParams) -> "int | None":
    """The number of jobs a listing matches, from the counters (migrations 0003 and 0005) when its
    filters are only sites, app, states and at most one tag; None when a scan is needed. At 10^6
    jobs this is what keeps ``Job.objects.filter(state=...).count()`` and a tag's page flat."""
    if not set(q.params.keys()) <= LISTING_COUNTER_PARAMS:
        return None

    tags = q.key_values("tags") or {}
    if len(tags) > 1:
        return None
    app_id = q.int("app_id")
    return count_matching(conn, owned_site_ids(user_id), site_ids=q.int_list("site_id"), app_ids=None if app_id is None else [app_id],
                          states=q.enum_list("state", JobState), tag=next(iter(tags.items()), None))
#: Counting with other filters looks at the user's newest jobs only, this many (None: all of them).
COUNT_SCAN_WINDOW = 10_000
#: PostgreSQL: a filter with a tag that at most ``window // RARE_TAG_SHARE`` jobs carry (in every
#: site: the tag index returns them all) is counted over every job, through the tag index: fewer rows
#: than the window (each read from anywhere in the table, where the window's are read in a row).
RARE_TAG_SHARE = 10
#: PostgreSQL: such a filter (a tag rare among the user's jobs, common among other users') is
#: counted exactly over the user's own jobs, read through ``(site_id, id)``, only while they are at
#: most this many windows; else over the window, as other filters. The bound on the rows read.
EXACT_COUNT_WINDOWS = 10


def count_jobs_by_state(conn: sa.Connection, user_id: int, q: QueryParams, *,
                        window: "int | None" = COUNT_SCAN_WINDOW) -> tuple[dict[str, int], bool]:
    """``({state: count}, exact)`` of the user's jobs matching the query's filters (but its state).

    With no filter, only site/app filters, or those and one tag, the counters answer exactly (a few
    rows at any number of jobs; one tag: the per-tag counters of migration 0005). Other filters
    (two or more tags, workdir...) need a scan of the jobs: it covers the user's newest
    ``window`` jobs (``exact`` is False when older ones exist), or all of them with ``window=None``.

    On PostgreSQL the window is read in the order of the index ``(site_id, id)`` whatever the
    planner's statistics say (see :func:`_in_index_order`): never every job of the site, so never
    slower than counting all of them. A filter with a tag rare among the user's jobs (see
    :data:`RARE_TAG_SHARE`; the per-tag counters of their sites tell) is counted over all of them
    instead, exactly, when they are at most :data:`EXACT_COUNT_WINDOWS` windows' worth (the
    counters tell too); a tag none of them carries is no match, exactly, without a scan. Both the
    answer and its cost depend on the user's own jobs only (at most that many rows read): every
    user's tag counters only pick the tag index when few jobs of any user carry the tag."""

    names = set(q.params.keys()) - {"state", "ordering"}
    tags = q.key_values("tags") if "tags" in names else None
    # Site/app filters and at most one tag: the counters (migrations 0003 and 0005) answer exactly.
    if names - {"tags"} <= COUNTER_FILTERS and (tags is None or len(tags) == 1):
        app_id = q.int("app_id")
        return counts_by_state(conn, user_id, site_ids=q.int_list("site_id"),
                               app_ids=None if app_id is None else [app_id],
                               tag=next(iter(tags.items())) if tags else None), True
    others = QueryParams(_without(q.params, "state"))
    condition = apply_job_filters(sa.select(jobs.c.id), others, conn.dialect.name).whereclause
    by_tag = through_tag_index = False
    if window is not None and tags and conn.dialect.name == "postgresql":
        # Counted exactly or over the window: decided on the user's own jobs only (the counters of
        # their sites). Decided on every user's, the answer (exact, or the newest window's) told a
        # user whether more than window // RARE_TAG_SHARE jobs of *other* users carry a tag.
        rare = window // RARE_TAG_SHARE
        owned = owned_site_ids(user_id)
        site_ids = q.int_list("site_id")
        fewest = min(count_matching(conn, owned, site_ids=site_ids, tag=tag) for tag in tags.items())
        if fewest == 0:
            return {}, True  # a tag none of the user's jobs carries: nothing matches
        by_tag = fewest <= rare and count_matching(conn, owned, site_ids=site_ids) <= EXACT_COUNT_WINDOWS * window
        if by_tag:
            # Every user's counters only choose how to read: the tag index when few jobs of anyone
            # carry the tag (it returns them all, whoever owns them), else the user's own jobs
            # through (site_id, id) (_in_index_order), at most EXACT_COUNT_WINDOWS windows: never
            # every job of the table (a parallel sequential scan of other users' 10^6 jobs carrying
            # the tag: 725 ms where the window took 24).
            carrying = jobs_with_each_tag(conn, tags)
            through_tag_index = min(carrying.get(tag, 0) for tag in tags.items()) <= rare
    if window is None or by_tag:
        # Through the tag index: the site test as `site_id + 0`, which no index serves, so that the
        # planner reads the tag index (the few jobs carrying the rare tag), not every job of the site
        # when its statistics say the site has few (a table filled since its last ANALYZE).
        site = jobs.c.site_id + 0 if through_tag_index else jobs.c.site_id
        scan = sa.select(jobs.c.state).where(site.in_(owned_site_ids(user_id)))
        if condition is not None:
            scan = scan.where(condition)
        sub = scan.subquery()
        stmt = sa.select(sub.c.state, sa.func.count()).group_by(sub.c.state)
        rows = _in_index_order(conn, stmt) if by_tag and not through_tag_index else conn.execute(stmt).all()
        return {state: n for state, n in rows}, True
    # The newest `window` jobs first (a LIMIT the filters cannot be pushed under: the planner cannot
    # choose to read every tagged job instead), then which of them match.
    matches = sa.case((condition, 1), else_=0) if condition is not None else sa.literal(1)
    newest = _newest_per_site(conn, _site_ids(conn, user_id, q.int_list("site_id")),
                              [jobs.c.id, jobs.c.state, matches.label("m")], QueryParams(StarletteQueryParams([])),
                              window).subquery()
    stmt = sa.select(newest.c.state, sa.func.sum(newest.c.m), sa.func.count()).group_by(newest.c.state)
    rows = _in_index_order(conn, stmt) if conn.dialect.name == "postgresql" else conn.execute(stmt).all()
    counts = {state: int(n) for state, n, _seen in rows if n}
    return counts, sum(seen for _state, _n, seen in rows) < window


#: The planner's settings for :func:`_in_index_order` (``set_config(..., true)``: this transaction only).
_INDEX_ORDER_OFF = ("enable_bitmapscan", "enable_seqscan", "jit")


def _in_index_order(conn: sa.Connection, stmt: sa.Select) -> list[sa.Row]:
    """The rows of ``stmt`` (the window of :func:`count_jobs_by_state`: each site's newest jobs,
    ``ORDER BY site_id DESC, id DESC LIMIT window``) with the planner left no plan but the index.

    Its other plan reads every job of the site (a bitmap or sequential scan), tests the filters on
    each and sorts them all for the newest ``window``: the planner takes it whenever its statistics
    say the site has fewer jobs than the window (a table filled since its last ANALYZE, which
    autovacuum may never run: at 10^5 jobs, 80 ms instead of 7 ms, slower than counting every match
    through the tag index). The index ``(site_id, id)`` serves the query in every case, so it is
    chosen with bitmap and sequential scans switched off (a cost, not a ban: not a plan that could
    fail), and JIT compilation too (a switched-off node that is still used, say in a filter's
    subquery, adds 10^10 to the plan's cost estimate, past JIT's threshold: 128 ms of compiling
    were seen for this 7 ms statement with sorting switched off), for this statement only: the
    previous values are put back after it (an error rolls the transaction back, and them with it).
    A setting the server lacks (``jit`` before PostgreSQL 11) is left alone: ``current_setting``
    raised "unrecognized configuration parameter" there, failing every windowed count."""
    names = ", ".join(f"current_setting('{name}', true)" for name in _INDEX_ORDER_OFF)
    found = conn.exec_driver_sql(f"SELECT {names}").one()
    previous = [(name, value) for name, value in zip(_INDEX_ORDER_OFF, found) if value is not None]
    if not previous:
        return conn.execute(stmt).all()
    offs = ", ".join(f"set_config('{name}', 'off', true)" for name, _value in previous)
    conn.exec_driver_sql(f"SELECT {offs}")
    rows = conn.execute(stmt).all()
    restore = ", ".join(f"set_config('{name}', %s, true)" for name, _value in previous)
    conn.exec_driver_sql(f"SELECT {restore}", tuple(value for _name, value in previous))
    return rows


def _without(params: Any, name: str) -> Any:
    return StarletteQueryParams([(k, v) for k, v in params.multi_items() if k != name])


def keyset_page_jobs(conn: sa.Connection, user_id: int, q: QueryParams, limit: int, *,
                     before_id: "int | None" = None, after_id: "int | None" = None) -> tuple[list[dict[str, Any]], bool]:
    """One page of matching jobs, newest first, after a cursor instead of an offset: ``before_id``
    gives the next older page, ``after_id`` the next newer one. Returns the jobs and whether more
    lie beyond. The cost depends on the page size and the number of sites, not on how many jobs the
    user (or anyone else) has, nor on how deep the page is (see :func:`_newest_per_site`)."""
    site_ids = _site_ids(conn, user_id, q.int_list("site_id"))
    if not site_ids:
        return [], False
    stmt = _newest_per_site(conn, site_ids, JOB_OUT_COLUMNS, QueryParams(_without(q.params, "site_id")), limit + 1,
                            before_id=before_id, after_id=after_id)
    found = plain_job_dicts(conn.execute(stmt))
    more = len(found) > limit
    found = found[:limit]
    if after_id is not None:
        found.reverse()
    return found, more


def _site_ids(conn: sa.Connection, user_id: int, wanted: "list[int] | None") -> list[int]:
    owned = sa.select(sites.c.id).where(sites.c.owner_id == user_id)
    if wanted is not None:
        owned = owned.where(sites.c.id.in_(wanted))
    return list(conn.execute(owned.order_by(sites.c.id)).scalars())


def _newest_per_site(conn: sa.Connection, site_ids: list[int], columns: list[Any], q: QueryParams, limit: int, *,
                     before_id: "int | None" = None, after_id: "int | None" = None) -> sa.Select:
    """The ``limit`` newest jobs (oldest first after ``after_id``) of these sites matching the
    filters: each site read through the index ``(site_id, id)`` for at most ``limit`` rows, merged.

    PostgreSQL gets ``site_id BETWEEN s AND s`` ordered by (site_id, id): with ``site_id = s`` it
    drops the constant from the ordering and walks the primary key backwards filtering on site_id,
    assuming the site's jobs are spread evenly over the ids (a site whose jobs are all old then
    costs a scan of every newer job: seconds at 10^6); as a range, only the index gives the order.
    SQLite walks the index with ``site_id = s`` (with a range it could not bound the scan by the
    cursor). A site list (``IN``) would make either sort every matching job."""
    newest_first = after_id is None
    parts = []
    for site_id in site_ids or [-1]:
        this_site = jobs.c.site_id.between(site_id, site_id) if conn.dialect.name == "postgresql" else jobs.c.site_id == site_id
        part = apply_job_filters(sa.select(*columns).where(this_site), q, conn.dialect.name)
        if after_id is not None:
            part = part.where(jobs.c.id > after_id)
        elif before_id is not None:
            part = part.where(jobs.c.id < before_id)
        order = [jobs.c.site_id.desc(), jobs.c.id.desc()] if newest_first else [jobs.c.site_id.asc(), jobs.c.id.asc()]
        parts.append(part.order_by(*order).limit(limit).subquery())
    merged = parts[0] if len(parts) == 1 else sa.union_all(*[sa.select(p) for p in parts]).subquery()
    return sa.select(merged).order_by(merged.c.id.desc() if newest_first else merged.c.id.asc()).limit(limit)


def matching_job_ids(conn: sa.Connection, user_id: int, q: QueryParams, among: "list[int] | None" = None) -> list[int]:
    """The user's jobs the filters of an update by filter match (:data:`UPDATE_FILTERS`), in id
    order; ``among``: of these ids only (the re-check under the row locks, :func:`update_jobs`)."""
    dialect = conn.dialect.name
    stmt = sa.select(jobs.c.id).where(jobs.c.site_id.in_(owned_site_ids(user_id)))
    stmt = apply_job_filters(stmt, q, dialect).order_by(jobs.c.id)
    leased = q.bool(LEASED_FILTER)
    if leased is not None:
        stmt = stmt.where(jobs.c.session_id.is_not(None) if leased else jobs.c.session_id.is_(None))
    if among is not None:
        stmt = stmt.where(id_in(jobs.c.id, among, dialect))
    return list(conn.execute(stmt).scalars())


def fetch_created(conn: sa.Connection, ids: list[int], *, minimal: bool) -> list[dict[str, Any]]:
    """The jobs an earlier create made, in the order it answered them (a replayed answer must
    line up with the request's items: 409 when any was deleted since); ``minimal``: ``{id, state,
    last_update}`` each."""
    if not ids:
        return []
    if minimal:
        rows = conn.execute(sa.select(jobs.c.id, jobs.c.state, jobs.c.last_update).where(jobs.c.id.in_(ids)))
        found = {row.id: {"id": row.id, "state": row.state, "last_update": wire_datetime(row.last_update)} for row in rows}
    else:
        found = {job["id"]: job for job in fetch_jobs(conn, ids)}
    require_all_replayed(ids, found, "job")
    return [found[job_id] for job_id in ids]


def fetch_jobs(conn: sa.Connection, ids: list[int]) -> list[dict[str, Any]]:
    if not ids:
        return []
    rows = conn.execute(sa.select(*JOB_OUT_COLUMNS).where(jobs.c.id.in_(ids)).order_by(jobs.c.id))
    return job_dicts(rows)


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------

class EventBuffer:
    """Collects LogEvent rows of one request and writes them in a single INSERT."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, job_id: int, from_state: str, to_state: str, timestamp: dt.datetime, data: "dict | None") -> None:
        self.rows.append(
            {"job_id": job_id, "timestamp": timestamp, "from_state": from_state, "to_state": to_state, "data": data or {}}
        )

    def add_moves(self, job_id: int, moves: "list[tuple[str, str, dt.datetime, dict | None]]") -> None:
        """The events of one job's state changes ``(from, to, timestamp, data)``, in order (a bulk
        update's: one call per job rather than per event)."""
        append = self.rows.append
        for from_state, to_state, timestamp, data in moves:
            append({"job_id": job_id, "timestamp": timestamp, "from_state": from_state, "to_state": to_state,
                    "data": data or {}})

    def flush(self, conn: sa.Connection) -> None:
        if self.rows:
            bulk_insert(conn, log_events, self.rows)
            self.rows = []


# ---------------------------------------------------------------------------------------------
# Create
# ---------------------------------------------------------------------------------------------

def _normalize_transfers(item: Any) -> Any:
    """Accept the 0.7 string shortcut ``{"slot": "alias:/abs/path"}`` for job transfers."""
    if isinstance(item, dict):
        transfers = item.get("transfers")
        if isinstance(transfers, dict) and any(isinstance(v, str) for v in transfers.values()):
            fixed = {}
            for slot, value in transfers.items():
                if isinstance(value, str) and ":" in value:
                    alias, _, path = value.partition(":")
                    fixed[slot] = {"location_alias": alias, "path": path}
                else:
                    fixed[slot] = value
            item = {**item, "transfers": fixed}
    return item


def _is_normal_path(text: Any) -> bool:
    """True if ``str(Path(text)) == text`` (so skipping the Path round trip changes nothing)."""
    return (type(text) is str and text not in ("", ".") and not text.endswith(("/", "/.")) and "//" not in text
            and not text.startswith("./") and "/./" not in text)


# Accepted create payloads are checked field by field here without building Job records: a
# request of 5,000 jobs spends its time in the database, not in validation. Anything unusual
# (a missing or mistyped field, a value out of range, transfers, a too long string) takes the
# general path, cattrs' from_dict, which also writes the detailed errors.
_INT32_MAX = 2**31 - 1
(_K_WORKDIR, _K_APP, _K_TEXT, _K_STR_MAP, _K_POSITIVE, _K_NONNEGATIVE, _K_OPTIONAL_INT, _K_DATA, _K_BOOL, _K_GPUS,
 _K_PARENTS, _K_IGNORED) = range(12)
_FAST_KINDS = {
    "workdir": _K_WORKDIR, "app_id": _K_APP, "tags": _K_STR_MAP, "serialized_parameters": _K_TEXT,
    "data": _K_DATA, "return_code": _K_OPTIONAL_INT, "num_nodes": _K_POSITIVE, "ranks_per_node": _K_POSITIVE,
    "threads_per_rank": _K_POSITIVE, "threads_per_core": _K_POSITIVE, "launch_params": _K_STR_MAP,
    "gpus_per_rank": _K_GPUS, "node_packing_count": _K_POSITIVE, "wall_time_min": _K_NONNEGATIVE,
    "parent_ids": _K_PARENTS, "batch_job_id": _K_OPTIONAL_INT, "pending_file_cleanup": _K_BOOL,
    "serialized_return_value": _K_TEXT, "serialized_exception": _K_TEXT,
    # Server-side fields a client may echo back empty (Balsam 0.7's JobCreate sent some as null),
    # and transfers, which only the general path handles (accepted here when empty).
    "id": _K_IGNORED, "state": _K_IGNORED, "last_update": _K_IGNORED, "state_timestamp": _K_IGNORED,
    "state_data": _K_IGNORED, "transfers": _K_IGNORED,
}
_TEXT_LIMITS = {name: FIELD_CHARS.get(name, MAX_TEXT_CHARS) for name in _FAST_KINDS}
#: What a created job holds where the payload leaves a field out (the Job model's defaults).
CREATE_DEFAULTS: dict[str, Any] = {
    f.name: (f.default.factory() if isinstance(f.default, attrs.Factory) else f.default)  # type: ignore[union-attr]
    for f in attrs.fields(Job) if f.name in CREATE_FIELDS or f.name == "parent_ids"
}
CREATE_DEFAULTS["parent_ids"] = []


def _str_map_ok(value: dict, tag_map: bool) -> bool:
    # launch_params' keys are the user's own: no field limit by key name (balsam.server.limits).
    limit = MAX_TAG_VALUE_CHARS if tag_map else MAX_TEXT_CHARS
    for key, item in value.items():
        if type(item) is not str or len(key) > MAX_KEY_CHARS or len(item) > limit:
            return False
    return True


def _fast_spec(item: Any) -> "dict[str, Any] | None":
    """The item itself (or a canonical copy) when it is a well-formed create payload whose values
    are already what gets stored; None sends it down the general path."""
    if type(item) is not dict or "workdir" not in item or "app_id" not in item:
        return None
    kinds = _FAST_KINDS
    fixes: "dict[str, Any] | None" = None
    for key, value in item.items():
        kind = kinds.get(key)
        if kind is None:
            return None
        if kind == _K_WORKDIR:
            # Exactly str(Path(value)) (no Path round trip needed) and inside data/.
            if (not _is_normal_path(value) or len(value) > MAX_PATH_CHARS or value.startswith("/")
                    or not value.strip() or ".." in value.split("/")):
                return None
        elif kind == _K_APP:
            if type(value) is not int or not -_INT32_MAX - 1 <= value <= _INT32_MAX:
                return None
        elif kind == _K_TEXT:
            if type(value) is not str or len(value) > _TEXT_LIMITS[key]:
                return None
        elif kind == _K_STR_MAP:
            if type(value) is not dict or (value and not _str_map_ok(value, key == "tags")):
                return None
        elif kind == _K_POSITIVE:
            if type(value) is not int or not 1 <= value <= _INT32_MAX:
                return None
        elif kind == _K_NONNEGATIVE:
            if type(value) is not int or not 0 <= value <= _INT32_MAX:
                return None
        elif kind == _K_OPTIONAL_INT:
            if value is not None and (type(value) is not int or not -_INT32_MAX - 1 <= value <= _INT32_MAX):
                return None
        elif kind == _K_DATA:
            if type(value) is not dict or (value and not json_value_within_limits(value)):
                return None
        elif kind == _K_BOOL:
            if type(value) is not bool:
                return None
        elif kind == _K_GPUS:
            if type(value) is int and 0 <= value <= _INT32_MAX:
                fixes = fixes or {}
                fixes[key] = float(value)
            elif type(value) is not float or not value >= 0:
                return None
        elif kind == _K_PARENTS:
            if type(value) is not list or not all(type(p) is int and INT64_MIN <= p <= INT64_MAX for p in value):
                return None
            if any(a >= b for a, b in zip(value, value[1:])):
                fixes = fixes or {}
                fixes[key] = sorted(set(value))
        elif value:  # _K_IGNORED: only empty values are accepted (and dropped)
            return None
    return item if fixes is None else {**item, **fixes}


def _types(values: list[Any]) -> set[type]:
    return set(map(type, values))


def _ints_within(values: list[Any], low: int, high: int) -> bool:
    return not values or (_types(values) == {int} and low <= min(values) and max(values) <= high)


def _workdirs_ok(values: list[Any]) -> bool:
    """Every value passes the workdir check of ``_fast_spec``. The column is joined with NUL, which
    none of the patterns looked for contains, so a pattern found in the joined text lies within
    one value or touches its start or end (a value holding a NUL can only make it look worse)."""
    if _types(values) != {str} or "" in values or "." in values:
        return False
    joined = "\x00".join(values)
    if ("//" in joined or "/./" in joined or ".." in joined or joined.startswith(("/", "./"))
            or joined.endswith(("/", "/.")) or "\x00/" in joined or "\x00./" in joined or "/\x00" in joined
            or "/.\x00" in joined):
        return False
    return max(map(len, values)) <= MAX_PATH_CHARS and not any(map(str.isspace, values))


def _str_maps_ok(values: list[Any], tag_map: bool) -> bool:
    if _types(values) != {dict}:
        return False
    filled = [value for value in values if value]
    if not filled:
        return True
    keys = [key for value in filled for key in value]
    items = [item for value in filled for item in value.values()]
    limit = MAX_TAG_VALUE_CHARS if tag_map else MAX_TEXT_CHARS
    return (_types(items) == {str} and max(map(len, keys)) <= MAX_KEY_CHARS and max(map(len, items)) <= limit)


def _column_ok(key: str, kind: int, values: list[Any]) -> bool:
    """Every value of this field passes ``_fast_spec`` as it is (no fix: a fix, like every doubt,
    leaves the items to ``_fast_spec``)."""
    if kind == _K_WORKDIR:
        return _workdirs_ok(values)
    if kind == _K_APP or kind == _K_OPTIONAL_INT:
        present = values if kind == _K_APP else [value for value in values if value is not None]
        return _ints_within(present, -_INT32_MAX - 1, _INT32_MAX)
    if kind == _K_TEXT:
        return _types(values) == {str} and max(map(len, values)) <= _TEXT_LIMITS[key]
    if kind == _K_STR_MAP:
        return _str_maps_ok(values, key == "tags")
    if kind == _K_POSITIVE:
        return _ints_within(values, 1, _INT32_MAX)
    if kind == _K_NONNEGATIVE:
        return _ints_within(values, 0, _INT32_MAX)
    if kind == _K_DATA:
        return _types(values) == {dict} and all(json_value_within_limits(value) for value in values if value)
    if kind == _K_BOOL:
        return _types(values) == {bool}
    if kind == _K_GPUS:
        return _types(values) == {float} and all(value >= 0 for value in values)
    if kind == _K_PARENTS:
        if _types(values) != {list}:
            return False
        filled = [value for value in values if value]
        return all(_ints_within(value, INT64_MIN, INT64_MAX) and all(a < b for a, b in zip(value, value[1:]))
                   for value in filled)
    return not any(values)  # _K_IGNORED


def _fast_columns(payload: list[Any]) -> "list[dict[str, Any]] | None":
    """The specs of a payload whose items all pass ``_fast_spec`` unchanged, checked one field at a
    time over all the items (loops in C: a few passes per field, instead of the per-value Python
    of ``_fast_spec``, the largest cost of parsing a 5,000-job create); None when any item might
    not: ``_fast_spec`` then judges item by item. The specs are the items themselves."""
    if not payload or _types(payload) != {dict}:
        return None
    fields = set().union(*payload)
    if not fields <= _FAST_KINDS.keys():
        return None
    for key in fields:
        try:
            values = list(map(itemgetter(key), payload))
        except KeyError:  # not in every item
            if key in ("workdir", "app_id"):
                return None
            values = [item[key] for item in payload if key in item]
        if not _column_ok(key, _FAST_KINDS[key], values):
            return None
    if "workdir" not in fields or "app_id" not in fields:
        return None
    return list(payload)


def _spec_of_job(job: Job) -> dict[str, Any]:
    """A Job structured by the general path, in the form of a fast-path spec."""
    spec = {name: getattr(job, name) for name in CREATE_FIELDS}
    spec["workdir"] = str(job.workdir)
    spec["parent_ids"] = sorted(job.parent_ids)
    spec["transfers"] = {slot: (item.location_alias, str(item.path)) for slot, item in job.transfers.items()}
    return spec


def parse_job_creates(payload: list[Any]) -> list[dict[str, Any]]:
    """Validate a bulk-create body; returns one spec per job: a dict of the create fields given
    (``CREATE_DEFAULTS`` for the others), ``parent_ids`` sorted, ``transfers`` as
    ``{slot: (location_alias, path)}``. Raises 422 naming every problem (size limits first, as
    for every other body: see balsam.server.limits)."""
    from balsam.serialization import PayloadError, from_dict

    fast = _fast_columns(payload)
    if fast is not None:
        return fast
    specs: list[Any] = [_fast_spec(item) for item in payload]
    slow = [index for index, spec in enumerate(specs) if spec is None]
    if not slow:
        return specs
    size_errors = list_item_size_errors(payload, slow)
    if size_errors:
        raise ValidationFailed(size_errors)
    errors: list[tuple[list[Any], str]] = []
    for index in slow:
        item = payload[index]
        try:
            job = from_dict(Job, _normalize_transfers(item))
        except PayloadError as exc:
            errors.extend((["body", index, *split_path(path)], msg) for path, msg in exc.errors)
            continue
        for name in ("num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core", "node_packing_count"):
            if getattr(job, name) < 1:
                errors.append((["body", index, name], f"must be >= 1, got {getattr(job, name)}"))
        problem = workdir_problem(item.get("workdir") if isinstance(item, dict) else job.workdir)
        if problem is not None:
            errors.append((["body", index, "workdir"], problem))
        if job.wall_time_min < 0:
            errors.append((["body", index, "wall_time_min"], "must be >= 0"))
        if job.gpus_per_rank < 0:
            errors.append((["body", index, "gpus_per_rank"], "must be >= 0"))
        for name in ("app_id", "batch_job_id", "return_code", "num_nodes", "ranks_per_node",
                     "threads_per_rank", "threads_per_core", "node_packing_count", "wall_time_min"):
            errors.extend(int_range_errors(getattr(job, name), ["body", index, name]))
        # Positions of the request's own list (job.parent_ids is a set); where the body held
        # something else (a tuple, say), the bad value is named without a position.
        raw_parents = item.get("parent_ids") if isinstance(item, dict) else None
        if type(raw_parents) is list:
            errors.extend((["body", index, "parent_ids", position], f"integer out of range: {parent}")
                          for position, parent in enumerate(raw_parents)
                          if type(parent) is int and not INT64_MIN <= parent <= INT64_MAX)
        else:
            errors.extend((["body", index, "parent_ids"], f"integer out of range: {parent}")
                          for parent in sorted(job.parent_ids) if not INT64_MIN <= parent <= INT64_MAX)
        for slot, item_t in job.transfers.items():
            if not item_t.path.is_absolute():
                errors.append((["body", index, "transfers", slot, "path"], f"remote path must be absolute, got {str(item_t.path)!r}"))
        specs[index] = _spec_of_job(job)
    if errors:
        raise ValidationFailed(errors)
    return specs


#: Keys of a spec that are not columns of the job as the API returns it.
_NOT_OUT = ("transfers", "state_timestamp", "state_data")
_OUT_DEFAULTS = {name: CREATE_DEFAULTS.get(name) for name in JOB_OUT_FIELDS}


#: How many bulk-create chunks a client should have in flight at once (``POST /jobs/reservations``
#: says so). On PostgreSQL two chunks are stored side by side by two backends while the client and
#: the server's event loop work beside them: a 10,000-job ``bulk_create`` took 12-15 % less time
#: (299 -> 262 and 332 -> 281 ms, medians of 20 alternated rounds, 2 CPUs, 2 December 2026); three
#: gave nothing more (20,000 jobs: 536 against 552 ms, noise). SQLite stores one transaction at a
#: time, so a second chunk in flight would only wait.
CREATE_PARALLEL = {"postgresql": 2, "sqlite": 1}


def reserve_job_ids(conn: sa.Connection, sizes: list[int]) -> list[list[int]]:
    """Ids for the chunks of one bulk create, allocated now in one statement: increasing, each
    chunk's after the one before it (PostgreSQL; see ``idempotency.reserve_job_keys``)."""
    with raw_cursor(conn) as cur:
        ids = allocate_ids(cur, "jobs", sum(sizes))
    blocks, start = [], 0
    for size in sizes:
        blocks.append(ids[start : start + size])
        start += size
    return blocks


def bulk_create_jobs(conn: sa.Connection, user_id: int, specs: list[dict[str, Any]], *,
                     minimal: bool = False, ids: "list[int] | None" = None) -> list[dict[str, Any]]:
    """Store the jobs of ``parse_job_creates``; returns them as the API shows them, or with
    ``minimal`` only ``{id, state, last_update}`` each (the client has the rest). ``ids``: the ids
    reserved for them (``reserve_job_ids``; PostgreSQL), one per spec, else new ones."""
    if not specs:
        return []
    if ids is not None and (len(ids) != len(specs) or conn.dialect.name != "postgresql"):
        raise ValueError(f"{len(ids)} reserved ids for {len(specs)} jobs on {conn.dialect.name}")
    now = utcnow()
    first_index: dict[str, int] = {}
    for index, spec in enumerate(specs):
        earlier = first_index.setdefault(spec["workdir"], index)
        if earlier != index:
            raise Conflict(f"workdir {spec['workdir']!r} appears twice in this request (items {earlier} and {index})")

    app_ids = {spec["app_id"] for spec in specs}
    app_rows = conn.execute(
        sa.select(apps.c.id, apps.c.site_id, apps.c.transfers, sites.c.transfer_locations)
        .join(sites, sites.c.id == apps.c.site_id)
        .where(apps.c.id.in_(app_ids), site_owned_by(user_id))
    ).all()
    app_info = {row.id: row for row in app_rows}
    missing = app_ids - app_info.keys()
    if missing:
        raise not_found_ids("App", missing)

    parent_ids: set[int] = set()
    for spec in specs:
        if spec.get("parent_ids"):
            parent_ids.update(spec["parent_ids"])
    parent_states: dict[int, str] = {}
    if parent_ids:
        # The ids as one parameter (id_in): one bound parameter per parent (``in_``) failed on
        # SQLite past its limit (32,766 by default: "too many SQL variables", a 503 retried for
        # ever) and cost PostgreSQL ~3 s of compiling and planning per 30,000 parents.
        stmt = sa.select(jobs.c.id, jobs.c.state).where(
            id_in(jobs.c.id, sorted(parent_ids), conn.dialect.name), jobs.c.site_id.in_(owned_site_ids(user_id))
        )
        if conn.dialect.name == "postgresql":
            # A parent finishing meanwhile (its update locks it FOR UPDATE, then releases the
            # children it finds linked) must not slip between this read and the insert of the
            # links: read without a lock, it committed JOB_FINISHED before our link existed and
            # the child, created AWAITING_PARENTS from the stale state, waited forever. FOR SHARE
            # makes the finish wait for this transaction (it then sees the link and releases the
            # child), or this read wait for the finish (and then read JOB_FINISHED). In id order,
            # as every job lock is taken, so two such transactions cannot deadlock. (SQLite
            # serializes writers: no finish can run between the read and the insert.)
            stmt = stmt.order_by(jobs.c.id).with_for_update(read=True, of=jobs)
        parent_states = dict(conn.execute(stmt).all())
        missing = parent_ids - parent_states.keys()
        if missing:
            raise not_found_ids("Parent job", missing)

    batch_ids = {spec["batch_job_id"] for spec in specs if spec.get("batch_job_id") is not None}
    if batch_ids:
        _check_batch_jobs(conn, user_id, batch_ids)

    # The state of each job: STAGED_IN for all of them unless parents or transfers say otherwise.
    states: "list[str] | None" = None
    transfer_specs: "list[list[dict[str, Any]]] | None" = None
    if parent_ids or any(row.transfers for row in app_rows) or any(spec.get("transfers") for spec in specs):
        states, transfer_specs = _states_and_transfers(specs, app_info, parent_states)
    site_of_app = {app_id: row.site_id for app_id, row in app_info.items()}

    if conn.dialect.name == "postgresql":
        new_ids = _insert_jobs_pg(conn, specs, site_of_app, states, now, ids)
    else:
        new_ids = _insert_jobs_sqlite(conn, specs, site_of_app, states, now)

    if parent_ids:
        links = [{"child_id": job_id, "parent_id": parent}
                 for job_id, spec in zip(new_ids, specs) for parent in spec.get("parent_ids") or ()]
        bulk_insert(conn, job_parents, links)
    if transfer_specs is not None:
        items_rows = [dict(item, job_id=job_id) for job_id, items in zip(new_ids, transfer_specs) for item in items]
        bulk_insert(conn, transfer_items, items_rows)

    # Pure Python, a dict per job: the collector paused (as while the body was parsed: routes/jobs.py);
    # not across the statements above, which may wait for locks (the parents', the app's).
    with paused_gc():
        return _created_answer(new_ids, specs, states, now, minimal)


def _created_answer(new_ids: list[int], specs: list[dict[str, Any]], states: "list[str] | None", now: dt.datetime,
                    minimal: bool) -> list[dict[str, Any]]:
    """The created jobs as the create answers them (``minimal``: id, state, last_update)."""
    wire_now = wire_datetime(now)
    staged = S.staged_in.value
    if minimal:
        if states is None:
            return [{"id": job_id, "state": staged, "last_update": wire_now} for job_id in new_ids]
        return [{"id": job_id, "state": state, "last_update": wire_now} for job_id, state in zip(new_ids, states)]
    out = []
    base = _OUT_DEFAULTS
    for index, (job_id, spec) in enumerate(zip(new_ids, specs)):
        job = base.copy()
        job.update(spec)
        for name in _NOT_OUT:
            if name in job:
                del job[name]
        job["id"] = job_id
        job["state"] = staged if states is None else states[index]
        job["last_update"] = wire_now
        out.append(job)
    return out


def _same_destination_errors(index: int, slot_names: list[str],
                             items: list[dict[str, Any]]) -> list[tuple[list[Any], str]]:
    """A job's transfer slots that write one destination (a stage-in's path in the workdir, ``.``
    naming the remote file's; a stage-out's path on its location): one copy would overwrite the
    other, which one is left depending on the order they land, and the agent could not tell their
    failures apart. Two directories (``recursive``) may merge into one: allowed."""
    errors: list[tuple[list[Any], str]] = []
    seen: dict[tuple[str, str, str], tuple[str, bool]] = {}
    for slot_name, item in zip(slot_names, items):
        stage_in = item["direction"] == TransferDirection.stage_in.value
        path = str(item["local_path"] if stage_in else item["remote_path"])
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if stage_in and not parts and not item["recursive"]:
            parts = [part for part in str(item["remote_path"]).split("/") if part not in ("", ".")][-1:]
        key = (item["direction"], "" if stage_in else item["location_alias"], "/".join(parts))
        where = "the workdir" if stage_in else f"location {item['location_alias']!r}"
        if key in seen and not (item["recursive"] and seen[key][1]):
            errors.append((["body", index, "transfers", slot_name],
                           f"writes {'/'.join(parts) or '.'} in {where}, as slot {seen[key][0]!r} does: one would "
                           "overwrite the other (give each slot its own destination)"))
            continue
        seen.setdefault(key, (slot_name, bool(item["recursive"])))
    return errors


def _outside_location(alias: str, url: Any, path: str,
                      parsed: "dict[tuple[str, str], TransferLocation | None]") -> str:
    """Why a job's remote ``path`` leads outside its location's directory prefix ('' when it does
    not): the agent's own rule and words (:meth:`TransferLocation.remote_path`, on the path as
    stored), refused at creation rather than failing the item, and so the job, at its first cycle.
    (The agent keeps its check: a site's settings may give a location a prefix after its jobs were
    created.) Only a path with ``..`` is read; ``parsed`` holds the request's locations, each
    parsed once. A URL its agent refuses (a settings error the agent reports) is not judged here."""
    if ".." not in path or not isinstance(url, str):
        return ""
    key = (alias, url)
    if key not in parsed:
        try:
            parsed[key] = TransferLocation.parse(alias, url)
        except TransferError:
            parsed[key] = None
    location = parsed[key]
    if location is None:
        return ""
    try:
        location.remote_path(path)
    except TransferError as exc:
        return str(exc)
    return ""


def _states_and_transfers(specs: list[dict[str, Any]], app_info: dict[int, Any],
                          parent_states: dict[int, str]) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Each job's first state and its transfer items (checked against its app's slots)."""
    errors: list[tuple[list[Any], str]] = []
    states: list[str] = []
    transfer_specs: list[list[dict[str, Any]]] = []
    parsed_locations: dict[tuple[str, str], TransferLocation | None] = {}
    for index, spec in enumerate(specs):
        app = app_info[spec["app_id"]]
        slots = app.transfers or {}
        locations = app.transfer_locations or {}
        given = spec.get("transfers") or {}
        items: list[dict[str, Any]] = []
        item_slots: list[str] = []
        for slot_name, slot in slots.items():
            if slot.get("required") and slot_name not in given:
                errors.append((["body", index, "transfers", slot_name], "required transfer slot is missing"))
        for slot_name, (alias, path) in given.items():
            slot = slots.get(slot_name)
            if slot is None:
                valid = ", ".join(sorted(slots)) or "none"
                errors.append((["body", index, "transfers", slot_name], f"app {spec['app_id']} has no such transfer slot (valid: {valid})"))
                continue
            if alias not in locations:
                valid = ", ".join(sorted(locations)) or "none"
                errors.append((["body", index, "transfers", slot_name, "location_alias"],
                               f"unknown location alias {alias!r} on the site (valid: {valid})"))
                continue
            outside = _outside_location(alias, locations[alias], path, parsed_locations)
            if outside:
                errors.append((["body", index, "transfers", slot_name], outside))
                continue
            items.append({
                "direction": slot["direction"],
                "local_path": slot["local_path"],
                "remote_path": path,
                "location_alias": alias,
                "recursive": bool(slot.get("recursive", False)),
                "state": TransferItemState.awaiting_job.value,
                "task_id": "",
                "transfer_info": {},
            })
            item_slots.append(slot_name)
        errors.extend(_same_destination_errors(index, item_slots, items))
        if any(parent_states[p] != S.finished.value for p in spec.get("parent_ids") or ()):
            # Its stage-in waits too (awaiting_job), started when the job leaves AWAITING_PARENTS
            # (_start_stage_ins): the inputs of a DAG's child are often its parents' stage-out, and
            # a stage-in started at once copied the stale file there, or failed on a missing one.
            state = S.awaiting_parents
        elif any(it["direction"] == TransferDirection.stage_in.value for it in items):
            state = S.ready
            for item in items:
                if item["direction"] == TransferDirection.stage_in.value:
                    item["state"] = TransferItemState.pending.value
        else:
            state = S.staged_in
        states.append(state.value)
        transfer_specs.append(items)
    if errors:
        raise ValidationFailed(errors)
    return states, transfer_specs


def _sqlite_default_sql(name: str) -> "str | None":
    """SQLite SQL for the value of a create field the payload leaves out (None: NULL, no default).
    (PostgreSQL's columns carry these defaults themselves: migration 0009.)"""
    default = CREATE_DEFAULTS[name]
    if default is None:
        return None
    if isinstance(jobs.c[name].type, sa.JSON):
        return "'" + orjson.dumps(default).decode().replace("'", "''") + "'"
    if isinstance(default, bool):
        return str(int(default))
    if isinstance(default, str):
        return "'" + default.replace("'", "''") + "'"
    return repr(default)


#: The create fields a job row is written with besides its id, site, app, workdir, state and time.
_COPY_FIELDS = [name for name in [*CREATE_FIELDS, "parent_ids"] if name not in ("workdir", "app_id")]
#: (field, its COPY writer, the COPY text of its default: what a field given as null stores).
_COPY_WRITERS = [(name, field_writer(jobs.c[name].type),
                  NULL if CREATE_DEFAULTS[name] is None else field_writer(jobs.c[name].type)(CREATE_DEFAULTS[name]))
                 for name in _COPY_FIELDS]
#: The created event's data is its column's default, {} (migration 0009).
_EVENT_COLUMNS = ["job_id", "timestamp", "from_state", "to_state"]
#: Turned on (transaction-local) around the COPY of the created events only: their jobs are the
#: rows the COPY before it wrote, so the trigger that checks events' jobs exist skips that
#: statement (migration 0011; it was ~7 ms of every 5,000-job chunk).
EVENTS_OF_NEW_JOBS_SETTING = "balsam.events_of_new_jobs"
_SET_EVENTS_OF_NEW_JOBS = f"SELECT set_config('{EVENTS_OF_NEW_JOBS_SETTING}', %s, true)"


def _insert_jobs_pg(conn: sa.Connection, specs: list[dict[str, Any]], site_of_app: dict[int, int],
                    states: "list[str] | None", now: dt.datetime, ids: "list[int] | None" = None) -> list[int]:
    """The jobs and their created events by COPY (see balsam.server.pg_copy), with ids allocated
    first in the order of ``specs`` (or the reserved ``ids``). A field no spec gives is left out:
    its column's default is the model's (migration 0009); the others are written column by column.
    Returns the ids in the order of ``specs``."""
    given: set[str] = set().union(*specs)
    app_ids = [spec["app_id"] for spec in specs]
    site_texts = {app_id: str(site_id) for app_id, site_id in site_of_app.items()}
    now_text = now.isoformat()
    state_texts = repeat(S.staged_in.value) if states is None else states
    columns = ["id", "site_id", "app_id", "workdir", "state", "last_update"]
    fields: list[Any] = [
        None,  # the ids, once allocated
        repeat(site_texts[app_ids[0]]) if len(site_texts) == 1 else [site_texts[app_id] for app_id in app_ids],
        list(map(str, app_ids)),
        [text_field(spec["workdir"]) for spec in specs],
        state_texts,
        repeat(now_text),
    ]
    for name, write, default in _COPY_WRITERS:
        if name in given:
            columns.append(name)
            fields.append(column_fields([spec.get(name) for spec in specs], write, default))
    with raw_cursor(conn) as cur:
        if ids is None:
            ids = allocate_ids(cur, "jobs", len(specs))
        fields[0] = id_texts = list(map(str, ids))
        copy_rows(conn, cur, "jobs", columns, copy_body(fields))
        cur.execute(_SET_EVENTS_OF_NEW_JOBS, ("on",))
        copy_rows(conn, cur, "log_events", _EVENT_COLUMNS,
                  copy_body([id_texts, repeat(now_text), repeat(S.created.value), state_texts]))
        cur.execute(_SET_EVENTS_OF_NEW_JOBS, ("off",))
    return ids


#: The fields a SQLite job row is written with besides its site, app, workdir, state and time.
_SQLITE_FIELDS = [name for name in [*CREATE_FIELDS, "parent_ids"] if name not in ("workdir", "app_id")]


@functools.lru_cache(maxsize=64)
def _sqlite_insert_sql(given: frozenset) -> str:
    """The INSERT of jobs from the JSON array ``:rows`` whose objects hold at most the keys
    ``given``: only those are read from each object (``json_extract`` parses the object again for
    every one, ~19 per job when every field was read: twice the time of a 5,000-job insert); the
    fields no object has are their defaults, written as constants."""

    def field(name: str) -> str:
        # json_extract gives JSON text for objects and arrays (as stored), the value for scalars.
        default = _sqlite_default_sql(name)
        if name not in given:
            return "NULL" if default is None else default
        extract = f"json_extract(value, '$.{name}')"
        return extract if default is None else f"coalesce({extract}, {default})"

    site = "coalesce(json_extract(value, '$._site_id'), :site_id)" if "_site_id" in given else ":site_id"
    state = "coalesce(json_extract(value, '$._state'), :state)" if "_state" in given else ":state"
    columns = ", ".join(["site_id", "app_id", "workdir", "state", "last_update", *_SQLITE_FIELDS])
    values = ", ".join([site, "json_extract(value, '$.app_id')", "json_extract(value, '$.workdir')", state, ":now",
                        *[field(name) for name in _SQLITE_FIELDS]])
    return f"INSERT INTO jobs ({columns}) SELECT {values} FROM json_each(:rows) ORDER BY key RETURNING workdir, id"


#: The keys of a row object ``_sqlite_insert_sql`` may read (the others, like ``transfers``, are not columns).
_SQLITE_READ_KEYS = frozenset([*_SQLITE_FIELDS, "_site_id", "_state"])
#: The created events, in the order of the ids (``ORDER BY key``: event ids grow as the job ids
#: do, as when they were inserted one row at a time). ``:now`` is adapted by sqlite3 as before.
_SQLITE_INSERT_EVENTS = ("INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
                         "SELECT value, :now, :from, :state, '{}' FROM json_each(:events) ORDER BY key")
_SQLITE_INSERT_EVENTS_STATES = ("INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
                                "SELECT json_extract(value, '$[0]'), :now, :from, json_extract(value, '$[1]'), '{}' "
                                "FROM json_each(:events) ORDER BY key")


def _insert_jobs_sqlite(conn: sa.Connection, specs: list[dict[str, Any]], site_of_app: dict[int, int],
                        states: "list[str] | None", now: dt.datetime) -> list[int]:
    """SQLite: the jobs from one JSON document (expanded by SQLite's JSON functions, in C), then
    their created events; no per-value work in Python or SQLAlchemy."""
    one_site = len(set(site_of_app.values())) == 1
    rows: list[dict[str, Any]] = specs
    if not one_site or states is not None:
        rows = [dict(spec, _site_id=None if one_site else site_of_app[spec["app_id"]],
                     _state=None if states is None else states[index]) for index, spec in enumerate(specs)]
    stored_now = jobs.c.last_update.type.bind_processor(conn.dialect)(now)  # as SQLAlchemy stores datetimes
    params = {"rows": orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS).decode(),
              "site_id": next(iter(site_of_app.values())), "state": S.staged_in.value, "now": stored_now}
    with raw_cursor(conn) as cur:
        insert = _sqlite_insert_sql(_SQLITE_READ_KEYS.intersection(set().union(*rows)))
        id_of = dict(cur.execute(insert, params).fetchall())
        new_ids = [id_of[spec["workdir"]] for spec in specs]
        # One statement over a JSON array, not executemany: stepping 5,000 bound statements (and
        # sqlite3 adapting the datetime of each) cost ~20 ms of a 5,000-job create, this ~5.
        events = orjson.dumps(new_ids if states is None else list(zip(new_ids, states))).decode()
        cur.execute(_SQLITE_INSERT_EVENTS if states is None else _SQLITE_INSERT_EVENTS_STATES,
                    {"events": events, "now": stored_now, "from": S.created.value, "state": S.staged_in.value})
    return new_ids


def _check_batch_jobs(conn: sa.Connection, user_id: int, batch_ids: set[int]) -> None:
    found = set(
        conn.execute(
            sa.select(batch_jobs.c.id).where(batch_jobs.c.id.in_(batch_ids), batch_jobs.c.site_id.in_(owned_site_ids(user_id)))
        ).scalars()
    )
    if batch_ids - found:
        raise not_found_ids("BatchJob", batch_ids - found)


# ---------------------------------------------------------------------------------------------
# Update
# ---------------------------------------------------------------------------------------------

_STATE_BY_VALUE = {state.value: state for state in JobState}
_RESTART_READY_VALUE = S.restart_ready.value


def _fast_state_patch(data: Any) -> "dict[str, Any] | None":
    """The patch of an update shaped as launchers and the processing module send them (``id``,
    ``state``, ``state_timestamp``, ``state_data``, ``return_code``, all well-formed), checked here as
    the general path checks them; None when the general path must judge it (any other field or
    value, and every error). The general path's per-field converter lookups were the largest
    per-job cost of a bulk state update."""
    if type(data) is not dict or type(data.get("id")) is not int:
        return None
    patch: dict[str, Any] = {}
    for key, value in data.items():
        if key == "id":
            if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
                return None
        elif key == "return_code":
            if type(value) is not int or not INT_MIN <= value <= INT_MAX:
                return None
            patch[key] = value
        elif key == "state":
            state = _STATE_BY_VALUE.get(value) if type(value) is str else None
            if state is None:
                return None
            patch[key] = state
        elif key == "state_timestamp":
            # Its length too (parse_datetime strips blanks): over the limit, the size check names it.
            if type(value) is not str or len(value) > MAX_TEXT_CHARS:
                return None
            try:
                patch[key] = parse_datetime(value)
            except (ValueError, TypeError):
                return None
        elif key == "state_data":
            if type(value) is not dict:
                return None
            patch[key] = dict(value)
        elif key == "session_id":
            if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
                return None
            patch[key] = value
        else:
            return None
    patch["id"] = data["id"]
    return patch


#: The key of an update sent under a session's lease (a launcher's, the processing module's): see
#: :func:`update_jobs`. Not a job field: it is checked, never stored.
SESSION_KEY = "session_id"
_NO_SESSION = object()


def parse_job_patches(payload: list[Any]) -> "tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]]]":
    """A bulk update's body (a list, its length checked) -> ``({job_id: [patch, ...]}, patches in
    order)``: several updates of one job are applied in the order they come (a short task's RUNNING
    and RUN_DONE in one call: one row write, an event each).

    The size limits first, as ``Ctx.json`` checks them (the same 422, before any other error of the
    items): an item of the launchers' shape (:func:`_fast_state_patch`) has its fields checked as it
    is parsed, and only its ``state_data`` (free-form JSON) is walked for them; any other item whole."""
    fast = [_fast_state_patch(item) for item in payload]
    unchecked = [None if patch is None else ({"state_data": item["state_data"]} if "state_data" in item else {})
                 for item, patch in zip(payload, fast)]
    size_errors = list_size_errors_of_unchecked(payload, unchecked)
    if size_errors:
        raise ValidationFailed(size_errors)
    patches: dict[int, list[dict[str, Any]]] = {}
    items: list[dict[str, Any]] = []
    for index, (item, patch) in enumerate(zip(payload, fast)):
        if patch is None:
            patch = parse_job_patch(item, ["body", index], allow_id=True)
        patches.setdefault(patch.pop("id"), []).append(patch)
        items.append(patch)
    return patches, items


def parse_job_patch(data: Any, loc: list[Any], *, allow_id: bool) -> dict[str, Any]:
    from balsam.serialization import PayloadError, partial_from_dict

    if allow_id:
        fast = _fast_state_patch(data)
        if fast is not None:
            return fast
    if not isinstance(data, dict):
        raise ValidationFailed.field(loc, f"expected a JSON object, got {type(data).__name__}")
    body = dict(data)
    if allow_id:
        if "id" not in body:
            raise ValidationFailed.field(loc + ["id"], "field required")
        job_id = body.pop("id")
        if not is_json_int(job_id):
            raise ValidationFailed.field(loc + ["id"], f"expected an integer, got {job_id!r}")
        job_id = int(job_id)
    session_id = body.pop(SESSION_KEY, None) if SESSION_KEY in body else _NO_SESSION
    if session_id is not _NO_SESSION:
        if not is_json_int(session_id):
            raise ValidationFailed.field(loc + [SESSION_KEY], f"expected an integer (the session the update is sent "
                                                              f"under), got {session_id!r}")
        session_id = int(session_id)
    try:
        patch = partial_from_dict(Job, body, allowed=UPDATE_FIELDS)
    except PayloadError as exc:
        raise payload_errors(exc, loc) from None
    for name in ("num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core", "node_packing_count"):
        if name in patch and patch[name] < 1:
            raise ValidationFailed.field(loc + [name], f"must be >= 1, got {patch[name]}")
    if "workdir" in patch:
        problem = workdir_problem(body.get("workdir"))
        if problem is not None:
            raise ValidationFailed.field(loc + ["workdir"], problem)
    range_errors = [err for name in ("batch_job_id", "return_code", "num_nodes", "ranks_per_node", "threads_per_rank",
                                     "threads_per_core", "node_packing_count", "wall_time_min")
                    if name in patch for err in int_range_errors(patch[name], loc + [name])]
    # Job and session ids are 64-bit.
    if allow_id and not INT64_MIN <= job_id <= INT64_MAX:
        range_errors.append((loc + ["id"], f"integer out of range: {job_id}"))
    if session_id is not _NO_SESSION and not INT64_MIN <= session_id <= INT64_MAX:
        range_errors.append((loc + [SESSION_KEY], f"integer out of range: {session_id}"))
    if range_errors:
        raise ValidationFailed(range_errors)
    null_errors = null_field_errors(Job, {k: v for k, v in patch.items() if k != "state_timestamp"}, loc)
    if "state" in patch and patch["state"] is None:
        null_errors.append((loc + ["state"], "cannot be null"))
    if null_errors:
        raise ValidationFailed(null_errors)
    if allow_id:
        patch["id"] = job_id
    if session_id is not _NO_SESSION:
        patch[SESSION_KEY] = session_id
    return patch


def _stored_value(name: str, value: Any) -> Any:
    if name == "workdir":
        return str(value)
    if name == "state":
        return value.value
    return value


def update_jobs(conn: sa.Connection, user_id: int, patches: "dict[int, dict[str, Any] | list[dict[str, Any]]]", *,
                still_matching: "Callable[[list[int]], Iterable[int]] | None" = None) -> int:
    """Apply ``{job_id: fields}``; all-or-nothing. Returns the number of jobs updated.

    A job's value may be a list of patches, applied in order (successive updates of one job in one
    bulk call: a launcher's RUNNING and RUN_DONE of a short task). Each state change is validated
    from the state the one before it left and gets its own event, with its own timestamp; the row
    is written once, with the last state and the other fields merged (a later patch wins).

    Leases: a patch with ``session_id`` S (:data:`SESSION_KEY`) was sent under session S's lease (a
    launcher, the processing module). It applies only while the job is held by S (``jobs.session_id``
    read under the row lock above, so no other update can change the holder in between), and its
    state change is checked strictly (``forced=False``); else the whole request is refused (409)
    with the job in ``refused_ids``. It never sets the holder. A patch without it (a user, a Balsam
    0.7 client) may force a re-run or a failure, and its state change of a leased job ends the
    lease (holder cleared; RUNNING excepted, a 0.7 launcher's report), so the holder's later
    updates are refused instead of undoing the user's move; a job the holder may be running (leased
    RUNNING, PREPROCESSED or RESTART_READY) that the user re-queues or fails keeps the holder's id
    (``released_from_session_id``), and no acquire leases it until that session's run of it is
    over (sessions_logic, "Re-queued while running"). A job left in any state but RUNNING is
    held by no session after the request, as before (the holder's own RUN_DONE or PREPROCESSED: it
    is done with the job); the holder's later patches of the same request still apply.

    ``still_matching``: an update by filter's re-check (PostgreSQL), given the ids locked here (the
    jobs that still exist), returns those its filters still match; the others are left out (see
    below), and the count is of the jobs updated."""
    if not patches:
        return 0
    now = utcnow()
    steps: dict[int, list[dict[str, Any]]] = {
        job_id: (patch if isinstance(patch, list) else [patch]) for job_id, patch in patches.items()
    }
    ids = list(steps)
    dialect = conn.dialect.name
    scoped, params = owner_params(user_id)
    if dialect == "postgresql":
        # Before the request's own rows: the unfinished parents of its re-runs (see _lock_rerun_parents).
        parent_states, current = _lock_request_rows(conn, steps, scoped, params)
    else:
        parent_states = {}
        current = {row.id: row for row in conn.execute(_CURRENT_STATES[("sqlite", scoped)],
                                                       {"b_ids": ids_param(ids, dialect), **params})}
    if still_matching is not None:
        # An update by filter (routes/jobs.query_update) read its ids before these locks: a RUNNING
        # or an acquire that committed in between left jobs that no longer match, and forcing the
        # update on them overrode a launcher's run. The filters are checked again here, by one plain
        # SELECT after the locks: it takes no lock (the lock order stays the one above: parents of
        # re-runs, then the jobs in id order), and under READ COMMITTED its snapshot is taken after
        # every transaction that held these rows committed, while no other can change them until
        # this one ends. Jobs gone or no longer matching are left out (their locks kept to the end).
        kept = set(still_matching(sorted(current)))
        steps = {job_id: job_steps for job_id, job_steps in steps.items() if job_id in kept}
        ids = list(steps)
        if not steps:
            return 0
    missing = set(ids) - current.keys()
    if missing:
        raise not_found_ids("Job", missing, of_request=True)
    batch_ids = {p["batch_job_id"] for job_steps in steps.values() for p in job_steps if p.get("batch_job_id") is not None}
    if batch_ids:
        _check_batch_jobs(conn, user_id, batch_ids)

    # Validate every transition before writing anything; each job's steps from the state the
    # previous step left. The rows are locked (PostgreSQL) or the write lock held (SQLite) since
    # they were read: the lease checked here is the one the update changes.
    # The rows are locked (or the write lock held) from here: this check is CPU only, its moves
    # thousands of tuples, with the collector paused (see the loop that builds the values below).
    with paused_gc():
        invalid: list[str] = []
        invalid_ids: list[int] = []
        targets: dict[int, JobState] = {}
        moves: dict[int, list[tuple[str, str, Any, Any]]] = {}  # job id -> [(from, to, timestamp, data)]
        lease_ended: set[int] = set()
        run_released: set[int] = set()  # of those, jobs the holder may be running (a launcher's lease)
        left_finished: set[int] = set()  # jobs moved out of JOB_FINISHED (re-runs of finished jobs)
        for job_id, job_steps in steps.items():
            row = current[job_id]
            state = _STATE_BY_VALUE.get(row.state) or JobState(row.state)
            holder = row.session_id
            for patch in job_steps:
                sender = patch.get(SESSION_KEY)
                if sender is not None and sender != holder:
                    invalid.append(f"job {job_id} is no longer held by session {sender} (now: "
                                   f"{'no session' if holder is None else f'session {holder}'})")
                    invalid_ids.append(job_id)
                    break
                if "state" not in patch:
                    continue
                try:
                    # Sent under the job's lease: the holder's own moves, checked strictly. Without a
                    # session: a user (or a Balsam 0.7 client), who may force a re-run or a failure.
                    new = validate_transition(state, patch["state"], forced=sender is None)
                except InvalidTransition as exc:
                    invalid.append(f"job {job_id}: {exc}")
                    invalid_ids.append(job_id)
                    break
                if new != state:
                    # ``_value_``: the state's text, as ``.value`` gives it (a property in Python code,
                    # several times the cost of the attribute on a path that runs per job).
                    moves.setdefault(job_id, []).append(
                        (state._value_, new._value_, patch.get("state_timestamp") or now, patch.get("state_data")))
                    if state is S.finished:
                        left_finished.add(job_id)
                    before, state = state, new
                    if sender is None and new != S.running and holder is not None:
                        # A user moved a leased job: the lease ends here, so the holder's later
                        # updates (in this request or after it) are refused. (RUNNING without a
                        # session is a Balsam 0.7 launcher's report: its lease stays.)
                        holder = None
                        lease_ended.add(job_id)
                        if before in _LAUNCHER_HELD_STATES and new in USER_FORCEABLE_TARGETS:
                            run_released.add(job_id)
            if job_id in moves:
                targets[job_id] = state
        if invalid:
            shown = "; ".join(invalid[:10]) + (f"; (+{len(invalid) - 10} more)" if len(invalid) > 10 else "")
            raise Conflict(f"Invalid state change, nothing was updated: {shown}", refused_ids=invalid_ids)

    events = EventBuffer()
    final_state: dict[int, JobState] = dict(targets)
    extra_events: list[tuple[int, JobState, JobState, dict]] = []
    # A re-run (RESTART_READY) of a job that was not waiting for its parents waits for them again
    # when one of them has not finished (see _rewait_for_parents); one re-run straight out of
    # AWAITING_PARENTS is the user's documented way past the wait, and goes on.
    rerun = [jid for jid, st in final_state.items()
             if st == S.restart_ready and current[jid].state != S.awaiting_parents.value]
    # The parents among the jobs of this request that it moves out of JOB_FINISHED (a parent re-run
    # with its child): stored finished, they hold the child back all the same.
    unfinishing = [jid for jid in final_state if current[jid].state == S.finished.value] if rerun else []
    _resolve_automatic_moves(conn, final_state, extra_events, rerun=rerun, unfinishing=unfinishing,
                             parent_states=parent_states)

    # Build the stored values per job, then group identical ones into a single UPDATE.
    # Pure Python, thousands of dicts (values, event rows): the collector paused as while the body
    # was parsed (the routes). Only here and in the check above: the statements around them may
    # wait for locks, and the collector is paused for every thread of the server.
    with paused_gc():
        groups: dict[bytes, tuple[dict[str, Any], list[int]]] = {}
        for job_id, job_steps in steps.items():
            values = {name: _stored_value(name, v) for patch in job_steps for name, v in patch.items()
                      if name not in ("state", "state_timestamp", "state_data", SESSION_KEY)}
            if values.get("pending_file_cleanup") is False and final_state.get(job_id, JobState(current[job_id].state)) != S.finished:
                # "Cleaned" is said of a finished job's files: the file_cleaner lists JOB_FINISHED jobs,
                # deletes their files, then clears the flag. A job re-run in between (RESTART_READY, and
                # the flag set again by that move) would lose its flag here and its new files would never
                # be cleaned. The state is the one read under the row lock above (or left by this
                # request), so the check cannot race with the re-run: ignored for a job not finished.
                del values["pending_file_cleanup"]
            final = final_state.get(job_id)
            if final is not None:
                values["state"] = final._value_
                if final != S.running or job_id in lease_ended:
                    values["session_id"] = None
                events.add_moves(job_id, moves[job_id])
                if "pending_file_cleanup" not in values and job_id in left_finished:
                    # A re-run of a finished job (the file_cleaner cleared the flag): its new files
                    # are cleaned again when it finishes, as a new job's are (created with True).
                    values["pending_file_cleanup"] = True
            # Keys not sorted: two jobs whose data differ only in key order get their own order (json
            # column, migration 0021), not the first one's. The key without last_update (the same for all).
            key = orjson.dumps(values, option=orjson.OPT_NON_STR_KEYS)
            values["last_update"] = now
            groups.setdefault(key, (values, []))[1].append(job_id)
        for job_id, from_state, to_state, data in extra_events:
            events.add(job_id, from_state.value, to_state.value, now, data)
    if run_released:
        # The session whose lease the user ended may still run the job: acquires skip it until that
        # session no longer does (sessions_logic, "Re-queued while running"). One
        # statement, before the updates below clear the holder; the rows are locked (or the write
        # lock held) since they were read.
        conn.execute(sa.update(jobs).where(id_in(jobs.c.id, sorted(run_released), dialect))
                     .values(released_from_session_id=jobs.c.session_id, released_tick_seen=False))
    _execute_grouped_updates(conn, groups)
    events.flush(conn)

    finished = [jid for jid, st in final_state.items() if st == S.finished]
    if finished:
        release_children(conn, finished, now)
    return len(steps)


def _resolve_automatic_moves(
    conn: sa.Connection, final_state: dict[int, JobState], extra_events: list[tuple[int, JobState, JobState, dict]],
    *, rerun: "list[int] | None" = None, unfinishing: "list[int] | None" = None,
    parent_states: "dict[int, str] | None" = None,
) -> None:
    """Server moves that follow a state change: READY with no pending stage-in -> STAGED_IN,
    POSTPROCESSED with no outstanding stage-out -> JOB_FINISHED (else its stage-outs start),
    RESTART_READY with a stage-in not done (a re-run of a job its stage-in failed) -> READY, its
    failed items pending again: a launcher would run it without its inputs. ``rerun``: jobs among
    the RESTART_READY ones that go back to AWAITING_PARENTS when a parent has not finished
    (:func:`_rewait_for_parents`, with ``unfinishing`` and ``parent_states``; their stage-in is held again,
    :func:`_hold_stage_ins`). Every job left READY has its held stage-in started
    (:func:`_start_stage_ins`)."""
    restart = [jid for jid, st in final_state.items() if st == S.restart_ready]
    if restart:
        waits = _rewait_for_parents(conn, rerun, final_state, unfinishing or [], parent_states or {}) if rerun else {}
        if waits:
            _hold_stage_ins(conn, list(waits))
        restaged = _restage_inputs(conn, [jid for jid in restart if jid not in waits])
        for jid, unfinished in waits.items():
            final_state[jid] = S.awaiting_parents
            shown = ", ".join(f"{pid} ({state})" for pid, state in unfinished[:10])
            more = f" (+{len(unfinished) - 10} more)" if len(unfinished) > 10 else ""
            extra_events.append((jid, S.restart_ready, S.awaiting_parents,
                                 {"message": f"Waiting for its parents again before the re-run: {shown}{more}"}))
        for jid in restaged:
            if jid not in waits:
                final_state[jid] = S.ready
                extra_events.append((jid, S.restart_ready, S.ready,
                                     {"message": "Stage-in not complete: staging in again before the re-run"}))
    ready = [jid for jid, st in final_state.items() if st == S.ready]
    if ready:
        # Every way into READY starts the job's held stage-in: a user's move out of
        # AWAITING_PARENTS, a re-run (RESTART_READY) straight out of it or of a FAILED job that had
        # never left it. A READY job with an ``awaiting_job`` stage-in would wait for ever.
        pending_in = _start_stage_ins(conn, ready)
        for jid in ready:
            if jid not in pending_in:
                final_state[jid] = S.staged_in
                extra_events.append((jid, S.ready, S.staged_in, {"message": "Skipped stage in"}))
    post = [jid for jid, st in final_state.items() if st == S.postprocessed]
    if post:
        outstanding = _start_stage_outs(conn, post)
        for jid in post:
            if jid not in outstanding:
                final_state[jid] = S.finished
                extra_events.append((jid, S.postprocessed, S.finished, {"message": "Skipped stage out"}))


#: What a failed try leaves in an item's ``transfer_info`` (the transfers module's ``_fail``): a
#: re-run's stage-out starts over without it.
_TRY_INFO_KEYS = ("attempts", "error", "retry_after", "reason", "dest")
#: What a task in flight leaves in its items' ``transfer_info`` (its clock, its progress): an item held
#: again mid-task (:func:`_hold_stage_ins`) drops them with its task id.
_TASK_INFO_KEYS = ("submitted", "queued", "started", "task")


def _start_stage_outs(conn: sa.Connection, job_ids: list[int]) -> set[int]:
    """The jobs among ``job_ids`` (just POSTPROCESSED) with stage-out items, whose items now start:
    ``awaiting_job`` ones become ``pending``, and so do ``error`` and ``done`` ones, which an
    earlier run of the job left (a job is POSTPROCESSED again only when it was re-run): their files
    are this run's to copy, with fresh tries. ``active``/``inactive`` ones (a transfer still in
    flight from an earlier run) and ``pending`` ones are left as they are."""
    dialect = conn.dialect.name
    stmt = _STAGE_OUT_ITEMS["postgresql" if dialect == "postgresql" else "sqlite"]
    rows = conn.execute(stmt, {"b_ids": ids_param(job_ids, dialect)}).all()
    if not rows:
        return set()
    waiting = [r.id for r in rows if r.state == TransferItemState.awaiting_job.value]
    if waiting:
        # One parameter for the ids (id_in): a 5,000-job PATCH of an app with 7 stage-out slots
        # binds 35,000, past SQLite's default 32,766 ("too many SQL variables", every retry alike).
        conn.execute(sa.update(transfer_items).where(id_in(transfer_items.c.id, waiting, dialect))
                     .values(state=TransferItemState.pending.value))
    again = {
        r.id: {"state": TransferItemState.pending.value, "task_id": "",
               "transfer_info": _fresh_transfer_info(r.transfer_info)}
        for r in rows if r.state in (TransferItemState.error.value, TransferItemState.done.value)
    }
    if again:
        update_rows_by_id(conn, transfer_items, again)
    return {r.job_id for r in rows}


def _restage_inputs(conn: sa.Connection, job_ids: list[int]) -> set[int]:
    """The jobs among ``job_ids`` (just RESTART_READY) with a stage-in item not done. Their items in
    ``error`` become ``pending`` with fresh tries; ``pending``/``active`` ones are left to finish;
    ``awaiting_job`` ones (a job re-run straight out of AWAITING_PARENTS, or failed there) start
    with the job's move to READY (:func:`_start_stage_ins`)."""
    dialect = conn.dialect.name
    stmt = _STAGE_IN_UNFINISHED["postgresql" if dialect == "postgresql" else "sqlite"]
    rows = conn.execute(stmt, {"b_ids": ids_param(job_ids, dialect)}).all()
    again = {
        r.id: {"state": TransferItemState.pending.value, "task_id": "",
               "transfer_info": _fresh_transfer_info(r.transfer_info)}
        for r in rows if r.state == TransferItemState.error.value
    }
    if again:
        update_rows_by_id(conn, transfer_items, again)
    return {r.job_id for r in rows}


def _start_stage_ins(conn: sa.Connection, job_ids: list[int]) -> set[int]:
    """Start the held stage-in of ``job_ids`` (jobs leaving AWAITING_PARENTS for READY, or moved to
    READY otherwise): their ``awaiting_job`` stage-in items become ``pending``, which the site
    agent's transfers module reads. Returns the jobs among them with a stage-in item not done (the
    others have nothing to stage in: STAGED_IN). Every move into READY goes through here (the
    release by the parents, :func:`_release_checked`, and :func:`_resolve_automatic_moves`), so
    no exit from the wait leaves a job READY with its inputs held. Two statements for any number
    of jobs; the jobs are locked by the caller (PostgreSQL) or the write lock is held (SQLite)."""
    dialect = conn.dialect.name
    conn.execute(
        sa.update(transfer_items).where(
            id_in(transfer_items.c.job_id, job_ids, dialect),
            transfer_items.c.direction == TransferDirection.stage_in.value,
            transfer_items.c.state == TransferItemState.awaiting_job.value,
        ).values(state=TransferItemState.pending.value)
    )
    return _with_unfinished_transfers(conn, job_ids, TransferDirection.stage_in)


def _hold_stage_ins(conn: sa.Connection, job_ids: list[int]) -> None:
    """Hold the stage-in of ``job_ids`` (re-runs sent back to AWAITING_PARENTS by
    :func:`_rewait_for_parents`) until their parents finish again, as a new child's is held: every
    item not ``awaiting_job`` becomes ``awaiting_job``, task id cleared, with fresh tries (one
    pending or in flight counts the hold: :func:`_held_transfer_info`). A done
    one too: its file came from before the parent's new run (whose output it often is), so it is
    copied again. One in flight (``active``/``inactive``) too: its task copies the same stale file,
    and left in flight it was recorded ``done`` when it ended, the job then released straight to
    STAGED_IN on that file. The site agent no longer finds it in flight and cancels its task once
    no item is left on it (as for a deleted job's); its report of the task, or a submission made
    from a read of the item before this hold, is refused (routes/transfers.py, ``_held_conflict``)."""
    rows = conn.execute(
        sa.select(transfer_items.c.id, transfer_items.c.state, transfer_items.c.transfer_info).where(
            id_in(transfer_items.c.job_id, job_ids, conn.dialect.name),
            transfer_items.c.direction == TransferDirection.stage_in.value,
            transfer_items.c.state != TransferItemState.awaiting_job.value,
        )
    ).all()
    held = {r.id: {"state": TransferItemState.awaiting_job.value, "task_id": "",
                   "transfer_info": _held_transfer_info(r.transfer_info, counted=r.state in _SUBMITTABLE)}
            for r in rows}
    if held:
        update_rows_by_id(conn, transfer_items, held)


#: States of a stage-in item the site agent may have submitted without its record (the agent died
#: between its submission and its PATCH, the journal keeping the task): its hold is counted.
_SUBMITTABLE = (TransferItemState.pending.value, TransferItemState.active.value, TransferItemState.inactive.value)


def _held_transfer_info(info: Any, *, counted: bool) -> dict[str, Any]:
    """``transfer_info`` of an item held again: fresh tries, no task clock, and, ``counted``, ``holds``
    (how many times it was held while pending or in flight) one up. The site agent journals an
    item's ``holds`` with the task it submits it to: an agent restarted after a hold and a release
    finds the item's count ahead of its journal line, and submits it again rather than re-attach it
    to that task (a copy from before the parents' new run)."""
    fresh = {k: v for k, v in _fresh_transfer_info(info).items() if k not in _TASK_INFO_KEYS}
    if not counted:
        return fresh
    try:
        count = int(fresh.get("holds") or 0)
    except (TypeError, ValueError):
        count = 0
    fresh["holds"] = count + 1
    return fresh


def _rewait_for_parents(conn: sa.Connection, job_ids: list[int], final_state: dict[int, JobState],
                        unfinishing: list[int], parent_states: dict[int, str]) -> dict[int, list[tuple[int, str]]]:
    """The jobs among ``job_ids`` (re-run: RESTART_READY) with a parent that still exists and is
    not JOB_FINISHED, each with those parents ``(id, state)`` in id order; the states are those
    this request leaves (``final_state``), else those read under the lock update_jobs took first
    (``parent_states``, :func:`_lock_rerun_parents`), else the stored ones. ``unfinishing``: the
    jobs of the request stored JOB_FINISHED that it moves on (the only ones the stored state calls
    finished wrongly). A 5,000-job re-run, 2 parents each: one more statement, 16 ms on PostgreSQL.

    Only the finish of a parent releases a waiting child: a child re-run while a parent is not
    finished ran before it, with its inputs missing or half written. It was reached by re-running
    every FAILED job (``balsam job modify -f FAILED -s RESTART_READY``) after a stage-in failed
    while the child waited (the server fails it), or with a parent re-run at once (its output
    being made again); such a child now waits again, as a new one would, and the finish of its
    last parent releases it (READY / STAGED_IN, then preprocessed and run as after its creation).

    Race-free with the finish of a parent (PostgreSQL): the unfinished parents were locked before
    the request's own jobs, with them, in id order (:func:`_lock_rerun_parents`), so a finish in
    flight was waited for and then seen; a finish that comes later waits for the parent's lock
    until this commits, then finds the child AWAITING_PARENTS and releases it. A parent re-run by a
    request that committed before the request's jobs were locked was found when they were, and the
    locks were taken again, parent first (:func:`_lock_request_rows`): no lock on a parent is waited
    for while the request's jobs are held, which met a re-run of the same child that locked the
    parent first (40P01). Only a parent re-run after that last read (or after the last round) is
    locked here, late, FOR SHARE, and read again: not skipped, or a finish in flight would leave the
    child waiting for ever. Only the unfinished parents are locked (a fan-in of thousands of
    finished parents is not)."""
    dialect = conn.dialect.name
    parent = _PARENT
    rows = conn.execute(
        sa.select(job_parents.c.child_id, parent.c.id, parent.c.state)
        .join(parent, parent.c.id == job_parents.c.parent_id)
        .where(id_in(job_parents.c.child_id, job_ids, dialect),
               sa.or_(parent.c.state != S.finished.value, id_in(parent.c.id, unfinishing, dialect)))
    ).all()
    state_of = {pid: final_state[pid].value if pid in final_state else parent_states.get(pid, state)
                for _child, pid, state in rows}
    late = sorted(pid for pid in state_of if pid not in final_state and pid not in parent_states)
    if late and dialect == "postgresql":
        locked = dict(conn.execute(
            sa.select(jobs.c.id, jobs.c.state).where(id_in(jobs.c.id, late, dialect))
            .order_by(jobs.c.id).with_for_update(read=True)
        ).all())
        # A parent deleted meanwhile is not returned: it no longer blocks (None).
        state_of.update({pid: locked.get(pid) for pid in late})
    waits: dict[int, list[tuple[int, str]]] = {}
    for child, pid, _state in sorted(rows, key=itemgetter(0, 1)):
        state = state_of[pid]
        if state is not None and state != S.finished.value:
            waits.setdefault(child, []).append((pid, state))
    return waits


def _unfinished_parents_stmt(scoped: bool) -> sa.Select:
    """The parents not JOB_FINISHED of those of the jobs ``:b_ids`` that are the user's (the
    owner parameters of :func:`owned_sites_clause`), read without a lock (:func:`_lock_rerun_parents`)."""
    child, parent = jobs.alias("rerun_child"), jobs.alias("rerun_parent")
    return (
        sa.select(job_parents.c.parent_id)
        .join(child, child.c.id == job_parents.c.child_id)
        .join(parent, parent.c.id == job_parents.c.parent_id)
        .where(ids_in_param(job_parents.c.child_id, "postgresql"), parent.c.state != S.finished.value,
               child.c.site_id.in_(sa.select(sites.c.id).where(owned_sites_clause(scoped))))
        .distinct()
    )


_UNFINISHED_PARENTS = {scoped: _unfinished_parents_stmt(scoped) for scoped in (False, True)}


def _lock_with_parents_stmt(scoped: bool) -> sa.Select:
    """(id, state) of the request's jobs ``:b_ids`` (the user's own, as :data:`_CURRENT_STATES`) and
    of the jobs ``:b_parents``, locked FOR UPDATE in id order."""
    own = sa.and_(ids_in_param(jobs.c.id, "postgresql"),
                  jobs.c.site_id.in_(sa.select(sites.c.id).where(owned_sites_clause(scoped))))
    parents = jobs.c.id == sa.any_(sa.bindparam("b_parents", type_=postgresql.ARRAY(sa.BigInteger)))
    return sa.select(jobs.c.id, jobs.c.state).where(sa.or_(own, parents)).order_by(jobs.c.id).with_for_update(of=jobs)


_LOCK_WITH_PARENTS = {scoped: _lock_with_parents_stmt(scoped) for scoped in (False, True)}


#: Rounds of :func:`_lock_request_rows` before it keeps the rows it holds (then a parent re-run
#: meanwhile is locked late, :func:`_rewait_for_parents`).
_RELOCK_ROUNDS = 3


def _lock_request_rows(conn: sa.Connection, steps: dict[int, list[dict[str, Any]]], scoped: bool,
                       params: dict[str, int]) -> "tuple[dict[int, str], dict[int, Any]]":
    """PostgreSQL: lock the request's jobs, after the unfinished parents of its re-runs
    (:func:`_lock_rerun_parents`); returns those parents' states and the jobs' rows (id, state,
    session_id), read under the lock.

    A parent finished when it was read and re-run by a request that committed before the request's
    jobs were locked is unfinished, and not locked first: locked then (after the children) it met
    a re-run of the same child that locked it first and waited for the child (40P01, 503). So the
    re-runs' unfinished parents are read again once the jobs are locked; when new ones appear, the
    locks taken since a savepoint are released (ROLLBACK TO SAVEPOINT) and taken again, parents
    first. A few rounds at most: one more statement each (two savepoint commands) for any number of
    jobs; then a parent re-run after the last read is locked late, as before."""
    stmt = _CURRENT_STATES[("postgresql", scoped)]
    b_ids = {"b_ids": list(steps), **params}
    rerun = [jid for jid, job_steps in steps.items() if any(p.get("state") == _RESTART_READY_VALUE for p in job_steps)]
    if not rerun:
        return {}, {row.id: row for row in conn.execute(stmt, b_ids)}
    known: set[int] = set()
    for round_ in range(_RELOCK_ROUNDS):
        savepoint = conn.begin_nested()
        parent_states = _lock_rerun_parents(conn, rerun, list(steps), known, scoped, params)
        current = {row.id: row for row in conn.execute(stmt, b_ids)}
        unfinished = set(conn.execute(_UNFINISHED_PARENTS[scoped], {"b_ids": rerun, **params}).scalars())
        if unfinished <= parent_states.keys() or round_ == _RELOCK_ROUNDS - 1:
            savepoint.commit()
            return parent_states, current
        # Nothing is written yet: the locks taken since the savepoint go, the parents are locked first.
        savepoint.rollback()
        known |= unfinished
    raise AssertionError("unreachable")


def _lock_rerun_parents(conn: sa.Connection, rerun: list[int], ids: list[int], known: set[int], scoped: bool,
                        params: dict[str, int]) -> dict[int, str]:
    """PostgreSQL: lock the unfinished parents of the jobs the request re-runs (RESTART_READY)
    together with the request's jobs, in one statement, in id order, before update_jobs reads
    them (that read then waits for nothing); returns those parents' states, read under the lock
    (:func:`_rewait_for_parents`). Two statements for any number of jobs. ``rerun``: the jobs
    the request re-runs; ``ids``: all its jobs; ``known``: parents found unfinished by an earlier
    round of :func:`_lock_request_rows`, locked too.

    Locking the parents after the request's jobs (FOR SHARE, as it was) made a cycle with the
    finish of such a parent, which locks the parent and then its AWAITING_PARENTS children
    (:func:`release_children`): a re-run request holding one of those children (a sibling re-run
    straight out of the wait, ``balsam job modify -f FAILED -f AWAITING_PARENTS``) waited for the
    parent while the finish waited for the child, and PostgreSQL ended one of them (40P01, 503).
    Here both lock the parent first. Parents have lower ids than their children, so the order is
    parent before child, as in release_children. The parents are locked FOR UPDATE, as the rows
    they are locked with (one statement, one lock mode): a child created meanwhile (which reads
    its parents FOR SHARE) waits for this short transaction, as it waits for a parent's update."""
    wanted = known.union(conn.execute(_UNFINISHED_PARENTS[scoped], {"b_ids": rerun, **params}).scalars())
    if not wanted:
        return {}
    rows = conn.execute(_LOCK_WITH_PARENTS[scoped], {"b_ids": ids, "b_parents": sorted(wanted), **params})
    return {row.id: row.state for row in rows if row.id in wanted}


def _fresh_transfer_info(info: Any) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in _TRY_INFO_KEYS} if isinstance(info, dict) else {}


#: Built once (see owned_sites_clause): every bulk update that moves jobs to POSTPROCESSED.
_STAGE_OUT_ITEMS = {
    dialect: sa.select(transfer_items.c.id, transfer_items.c.job_id, transfer_items.c.state,
                       transfer_items.c.transfer_info).where(
        ids_in_param(transfer_items.c.job_id, dialect),
        transfer_items.c.direction == TransferDirection.stage_out.value,
    ).order_by(transfer_items.c.id)
    for dialect in ("postgresql", "sqlite")
}


#: Built once (see owned_sites_clause): every bulk update that moves jobs to RESTART_READY.
_STAGE_IN_UNFINISHED = {
    dialect: sa.select(transfer_items.c.id, transfer_items.c.job_id, transfer_items.c.state,
                       transfer_items.c.transfer_info).where(
        ids_in_param(transfer_items.c.job_id, dialect),
        transfer_items.c.direction == TransferDirection.stage_in.value,
        transfer_items.c.state != TransferItemState.done.value,
    ).order_by(transfer_items.c.id)
    for dialect in ("postgresql", "sqlite")
}


def _with_unfinished_transfers(conn: sa.Connection, job_ids: list[int], direction: TransferDirection) -> set[int]:
    """The jobs among ``job_ids`` with a ``direction`` transfer item not yet done."""
    dialect = conn.dialect.name
    stmt = _UNFINISHED_TRANSFERS[("postgresql" if dialect == "postgresql" else "sqlite", direction)]
    return set(conn.execute(stmt, {"b_ids": ids_param(job_ids, dialect)}).scalars())


#: Built once (see owned_sites_clause): every bulk update that moves jobs to READY or POSTPROCESSED.
_UNFINISHED_TRANSFERS = {
    (dialect, direction): sa.select(transfer_items.c.job_id).where(
        ids_in_param(transfer_items.c.job_id, dialect),
        transfer_items.c.direction == direction.value,
        transfer_items.c.state != TransferItemState.done.value,
    ).distinct()
    for dialect in ("postgresql", "sqlite") for direction in TransferDirection
}


def _execute_grouped_updates(conn: sa.Connection, groups: dict[bytes, tuple[dict[str, Any], list[int]]]) -> None:
    singles: dict[int, dict[str, Any]] = {}
    for values, ids in groups.values():
        if len(ids) > 1:
            conn.execute(sa.update(jobs).where(id_in(jobs.c.id, ids, conn.dialect.name)).values(**values))
        else:
            singles[ids[0]] = values
    update_rows_by_id(conn, jobs, singles)


# Built once: an alias of the 40-column jobs table builds its column proxies on first use, which
# cost more than the queries of a release (every bulk update that finishes jobs releases).
_CHILD = jobs.alias("child")
_PARENT = jobs.alias("parent")


#: The jobs of an app or of a site (:func:`delete_jobs_of`): the column of ``jobs`` that names it
#: (indexed), compared with the parameter ``b_of``.
_OWNER_COLUMNS = {"app": "app_id", "site": "site_id"}


def _release_candidates_stmt(dialect: str, owner: "str | None" = None) -> sa.Select:
    """The AWAITING_PARENTS children of the parents ``:b_ids``, locked in id order on PostgreSQL.
    ``owner`` ("app" / "site", :data:`_OWNER_COLUMNS`): of the parents that are the jobs of the
    app / site ``:b_of`` instead, leaving out the children of that app / site themselves (they are
    deleted with it); read through the index of that column, not a list of ids sent along."""
    if owner is None:
        parents = ids_in_param(job_parents.c.parent_id, dialect)
        outside: list[sa.ColumnElement[bool]] = []
    else:
        column = _OWNER_COLUMNS[owner]
        parents = job_parents.c.parent_id.in_(sa.select(jobs.c.id).where(jobs.c[column] == sa.bindparam("b_of")))
        outside = [_CHILD.c[column] != sa.bindparam("b_of")]
    stmt = (
        sa.select(_CHILD.c.id)
        .where(
            _CHILD.c.id.in_(sa.select(job_parents.c.child_id).where(parents)),
            _CHILD.c.state == S.awaiting_parents.value,
            *outside,
        )
        .order_by(_CHILD.c.id)
    )
    if dialect == "postgresql":
        # Two parents finishing in concurrent transactions: each locks the common children first,
        # so the second one waits and then (new statement, new snapshot) sees both parents done.
        stmt = stmt.with_for_update(of=_CHILD)
    return stmt


#: Built once (see owned_sites_clause): every bulk update that finishes jobs looks for their children.
_RELEASE_CANDIDATES = {dialect: _release_candidates_stmt(dialect) for dialect in ("postgresql", "sqlite")}
#: Those of the jobs of an app or a site about to be deleted (:func:`delete_jobs_of`), by (dialect, owner).
_RELEASE_CANDIDATES_OF = {(dialect, owner): _release_candidates_stmt(dialect, owner)
                          for dialect in ("postgresql", "sqlite") for owner in _OWNER_COLUMNS}


def _releasable_stmt(dialect: str) -> sa.Select:
    """(id, deleted parents) of each candidate child (``:b_ids``) every listed parent of which that
    still exists is JOB_FINISHED: a deleted parent does not block (as in Balsam 0.7's
    update_waiting_children, which read the parents that still existed); "deleted parents" lists
    the ids in ``parent_ids`` that name no job any more (NULL when none), for the release message.

    Read from ``parent_ids``, which keeps a deleted parent's id (the API shows it; docs/api.md),
    not from the ``job_parents`` links, which go with it. Ids are never reused. One statement for
    all the candidates: each listed id is one primary-key lookup, grouped per child. (Counting the
    finished links against the length of ``parent_ids``, a correlated scalar subquery, was planned
    as a scan of ``job_parents`` per child on tables PostgreSQL had not analysed yet: 5.9 s for
    10,000 children.)

    Race-free with deletes (:func:`delete_jobs`) as with finishes: whoever may release a child
    locks it (FOR UPDATE, in id order) and checks it afterwards with this new statement, whose
    snapshot (READ COMMITTED) sees every transaction that held the lock before: see
    :func:`delete_jobs`."""
    child, parent = _CHILD, _PARENT
    if dialect == "postgresql":
        listed = sa.func.jsonb_array_elements_text(child.c.parent_ids).table_valued("value").alias("listed")
        listed_id = sa.cast(listed.c.value, sa.BigInteger)
        deleted = sa.func.string_agg(sa.case((parent.c.id.is_(None), listed.c.value)), sa.literal(","))
    else:
        listed = sa.func.json_each(child.c.parent_ids).table_valued("value").alias("listed")
        listed_id = listed.c.value
        deleted = sa.func.group_concat(sa.case((parent.c.id.is_(None), listed.c.value)), ",")
    blocking = sa.case((parent.c.state == S.finished.value, 0), (parent.c.id.is_(None), 0), else_=1)
    return (
        sa.select(child.c.id, deleted.label("deleted"))
        .select_from(child.join(listed, sa.true()).outerjoin(parent, parent.c.id == listed_id))
        .where(ids_in_param(child.c.id, dialect))
        .group_by(child.c.id)
        .having(sa.func.max(blocking) == 0)
        .order_by(child.c.id)
    )


#: Built once: every bulk update that finishes jobs, and every delete of a parent, tests their
#: waiting children.
_RELEASABLE = {dialect: _releasable_stmt(dialect) for dialect in ("postgresql", "sqlite")}


def release_children(conn: sa.Connection, finished_ids: list[int], now: dt.datetime) -> list[int]:
    """Move AWAITING_PARENTS children whose parents are all JOB_FINISHED (a deleted one does not
    block: :func:`_releasable_stmt`) to READY / STAGED_IN."""
    dialect = conn.dialect.name
    candidates = _RELEASE_CANDIDATES["postgresql" if dialect == "postgresql" else "sqlite"]
    candidate_ids = list(conn.execute(candidates, {"b_ids": ids_param(finished_ids, dialect)}).scalars())
    return _release_checked(conn, candidate_ids, now)


def _release_checked(conn: sa.Connection, candidate_ids: list[int], now: dt.datetime) -> list[int]:
    """Release those of ``candidate_ids`` (AWAITING_PARENTS children, locked by the caller on
    PostgreSQL) whose parents that still exist are all JOB_FINISHED."""
    if not candidate_ids:
        return []
    dialect = conn.dialect.name
    stmt = _RELEASABLE["postgresql" if dialect == "postgresql" else "sqlite"]
    deleted_of = {jid: deleted for jid, deleted in conn.execute(stmt, {"b_ids": ids_param(candidate_ids, dialect)})}
    released = list(deleted_of)
    if not released:
        return []
    pending_in = _start_stage_ins(conn, released)
    to_ready = [jid for jid in released if jid in pending_in]
    to_staged = [jid for jid in released if jid not in pending_in]
    events = EventBuffer()
    all_finished = {"message": "All parents finished"}
    for ids, state in ((to_ready, S.ready), (to_staged, S.staged_in)):
        if ids:
            conn.execute(
                sa.update(jobs).where(id_in(jobs.c.id, ids, dialect)).values(state=state.value, last_update=now)
            )
            for jid in ids:
                deleted = deleted_of[jid]
                data = all_finished if deleted is None else {
                    "message": "All remaining parents finished (deleted: "
                               + ", ".join(str(i) for i in sorted(int(d) for d in str(deleted).split(","))) + ")"
                }
                events.add(jid, S.awaiting_parents.value, state.value, now, data)
    events.flush(conn)
    return released


def set_states(conn: sa.Connection, moves: dict[int, tuple[str, JobState]], now: dt.datetime, data: dict) -> None:
    """Server-driven moves (transfers done, session expiry); follows up with the automatic moves."""
    if not moves:
        return
    final_state = {jid: new for jid, (_old, new) in moves.items()}
    extra: list[tuple[int, JobState, JobState, dict]] = []
    _resolve_automatic_moves(conn, final_state, extra)
    by_state: dict[JobState, list[int]] = defaultdict(list)
    for jid, state in final_state.items():
        by_state[state].append(jid)
    for state, ids in by_state.items():
        values: dict[str, Any] = {"state": state.value, "last_update": now}
        if state != S.running:
            values["session_id"] = None
        # id_in: an expired Session can hold more RUNNING jobs than SQLite's 32,766 parameters.
        conn.execute(sa.update(jobs).where(id_in(jobs.c.id, ids, conn.dialect.name)).values(**values))
    events = EventBuffer()
    for jid, (old, new) in moves.items():
        events.add(jid, old, new.value, now, data)
    for jid, from_state, to_state, extra_data in extra:
        events.add(jid, from_state.value, to_state.value, now, extra_data)
    events.flush(conn)
    finished = [jid for jid, st in final_state.items() if st == S.finished]
    if finished:
        release_children(conn, finished, now)


# ---------------------------------------------------------------------------------------------
# Delete
# ---------------------------------------------------------------------------------------------

def delete_jobs(conn: sa.Connection, ids: list[int], *, skip_running: bool = True,
                released: "list[int] | None" = None, skipped: "list[int] | None" = None,
                deleted_later: "Sequence[int] | None" = None) -> int:
    """Delete the jobs ``ids``; returns how many were deleted.

    ``skip_running`` (a query delete, which may select more than the user meant): the jobs RUNNING
    under a live session (a launcher runs them) are left, their ids appended to ``skipped`` (id
    order), as 0.7 skipped the jobs a session had locked (``FOR UPDATE SKIP LOCKED``); every other
    matching job is deleted, leased or not: the jobs the site agent's processing holds for their
    hooks (leased 1,000 at a time right after their creation) and those a launcher prefetched but
    has not started. Their holders learn it as the delete of one job by id (``skip_running=False``:
    it names the job, RUNNING or not) tells them: a launcher at its next heartbeat (it drops a job
    not started, ends a run), the processing module when the server refuses its hook result (404),
    which is dropped; nothing re-creates the job. (Refusing the whole delete when any job was
    leased, as this did, failed 0.7 scripts that delete their jobs by tag right after creating
    them, or while a slow preprocess hook ran.)

    Against a job moving to RUNNING at the same time (a launcher's RUNNING update, which locks the
    job's row and keeps the lease's session): on PostgreSQL the delete reads the jobs with their
    state and session ``FOR UPDATE`` and decides from what that read returns, so one of the two
    waits for the other's commit. The update first: the delete's lock wait re-reads the row (READ
    COMMITTED), sees it RUNNING under its session and skips it; the run goes on. The delete first:
    the update then finds no row, and the launcher learns at its next heartbeat that the job is
    gone and ends the run it had started (deleted before it started, as far as the server knows).
    Never both, never a deleted job left running unnoticed. SQLite runs one write transaction at a
    time: the read and the delete see the same rows.

    A deleted parent no longer blocks its children (:func:`_releasable_stmt`), so the delete
    releases, in its own transaction, the AWAITING_PARENTS children (not deleted themselves) whose
    remaining parents are all JOB_FINISHED; their ids are appended to ``released``. The children
    are found through the links before the delete cascades them.

    Race-free (PostgreSQL; SQLite runs one write transaction at a time), in the lock order of
    sessions_logic ("Lock order": a job's parents, then its children, each in id order): the delete
    locks the jobs it selected (FOR UPDATE, id order; the skipped ones too, until the commit), then
    the waiting children of those it deletes (FOR UPDATE, id order, :data:`_RELEASE_CANDIDATES`,
    as the finish of a parent does), deletes, and then checks the children with a new statement.
    Against the last other parent finishing at once (its transaction locks that parent, then the
    same children): whichever takes a child's lock second waits until the first commits and then,
    in its next statement's snapshot (READ COMMITTED), sees the first's change (the parent gone,
    or the other one finished) besides its own, and releases the child; the first saw the other's
    change not yet committed and left the child waiting. (A lock wait re-reads the child's row:
    released meanwhile, it is no candidate any more.) Either
    order ends released, once. A child created at the same time reads its parents FOR SHARE: the
    delete's lock of the parent waits for that create's commit, so the next statement (the
    candidates) sees the new child's links; a create that waits for the delete finds no parent.
    (Checking at the finish only, and counting a deleted parent as finished because its links were
    gone, released the child or left it waiting for ever depending on the order; counting it as
    unfinished for ever kept children of routinely cleaned-up finished parents waiting.)

    ``deleted_later`` (a query delete in batches: every id it matched, sorted): waiting children
    among them that a later batch would delete are deleted here instead, with their own waiting
    children in the match (they are locked already, so the lock order holds). Released, a launcher
    could take and run them before that batch came (then skipped as RUNNING, left running); left
    waiting, a delete cut off before that batch left them waiting for ever on a deleted parent.
    The batches go in descending id order (routes.jobs.query_delete), and a child is created after
    its parents (they must exist then; ``parent_ids`` cannot be changed later), so this happens
    only for a child made with ids reserved before its parents' (``POST /jobs/reservations``).

    Bulk: one statement per chunk of ids (one on PostgreSQL) for each step, whatever the number of
    jobs (a chain of such reserved-id children: the steps again for each link, in a loop: it
    recursed, and a chain of ~600 links failed every try with a RecursionError)."""
    total = 0
    while ids:
        pulled: list[int] = []
        total += _delete_once(conn, ids, skip_running, released, skipped, deleted_later, pulled)
        # The waiting children pulled in (deleted_later), with theirs next: never RUNNING.
        ids, skip_running = pulled, False
    return total


def _delete_once(conn: sa.Connection, ids: list[int], skip_running: bool, released: "list[int] | None",
                 skipped: "list[int] | None", deleted_later: "Sequence[int] | None", pulled: list[int]) -> int:
    """One step of :func:`delete_jobs`: ``ids`` locked, deleted and their children checked; the
    waiting children it leaves to the next step appended to ``pulled``."""
    dialect = conn.dialect.name
    chunks = _id_chunks(ids, dialect)
    running = sa.and_(jobs.c.state == S.running.value, jobs.c.session_id.is_not(None))
    left: list[int] = []
    if dialect == "postgresql":
        # The selected jobs first (a parent's row before its children's), with their state and
        # lease as they are once locked: a concurrent RUNNING update has committed or waits.
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.state, jobs.c.session_id).where(chunks[0]).order_by(jobs.c.id).with_for_update()
        ).all()
        if skip_running:
            left = [jid for jid, state, session_id in rows if state == S.running.value and session_id is not None]
    elif skip_running:
        for matching in chunks:
            left.extend(conn.execute(sa.select(jobs.c.id).where(matching, running)).scalars())
        left.sort()
    if skipped is not None:
        skipped.extend(left)
    if left:
        kept = set(left)
        ids = [jid for jid in ids if jid not in kept]
        if not ids:
            return 0
        chunks = _id_chunks(ids, dialect)
    # Their waiting children (locked in id order on PostgreSQL), read before the cascade takes the
    # links; those deleted too are left out of the check.
    candidates = _RELEASE_CANDIDATES["postgresql" if dialect == "postgresql" else "sqlite"]
    return _delete_and_release(conn, candidates, {"b_ids": ids_param(ids, dialect)}, chunks, released,
                               exclude=set(ids), sorted_exclude=deleted_later, pulled_out=pulled)


#: Jobs a query delete (``DELETE /jobs/?filters``) deletes per transaction. One transaction for
#: every matching job held the SQLite write lock, or on PostgreSQL the matching jobs' row locks
#: (skipped RUNNING ones included), for the whole delete: with 10^6 jobs a launcher's acquire and
#: heartbeat waited 10.9 s on SQLite, its update of a skipped RUNNING job 22 s there and 29 s on
#: PostgreSQL, and the server peaked at 0.5 GB. 5,000 (the bulk routes' cap): ~50-100 ms per batch.
QUERY_DELETE_BATCH = 5_000
#: The pause between two batches on SQLite, longer than its busy handler's longest sleep (100 ms):
#: every writer that waits for the lock gets it before the next batch (routes.jobs.query_delete).
SQLITE_WRITERS_TURN_SEC = 0.11
#: ... once the delete has run this long: a shorter one (up to a few tens of thousands of jobs)
#: makes writers wait at most this, and pausing it doubled a 10,000-job delete (0.12 -> 0.23 s).
SQLITE_PAUSES_AFTER_SEC = 1.0


def sqlite_writers_turn(started: float, now: float) -> float:
    """The pause before a query delete's next batch on SQLite (seconds), the delete having started
    at ``started`` (``time.monotonic()``) and ``now`` being now: none in its first
    :data:`SQLITE_PAUSES_AFTER_SEC`, then :data:`SQLITE_WRITERS_TURN_SEC` before each batch."""
    return SQLITE_WRITERS_TURN_SEC if now - started >= SQLITE_PAUSES_AFTER_SEC else 0.0


def matching_ids(conn: sa.Connection, user_id: int, q: QueryParams) -> "array[int]":
    """The ids of the user's jobs matching ``q``, in id order, as a compact array (8 bytes an id:
    10^6 ids take 8 MB, a list of ints ~36 MB): read at once, in a transaction that ends before the
    delete's batches (routes.jobs.query_delete), so that no connection is held beside theirs (a pool
    of one deadlocked: 503 after 30 s), no PostgreSQL snapshot stays open and SQLite's WAL can be
    checkpointed meanwhile. Streamed (a server-side cursor on PostgreSQL): no list of rows beside
    the array. One statement: paging with ``id > last`` ran the filter again per page (on
    PostgreSQL the tags' GIN bitmap read every remaining match each time)."""
    stmt = sa.select(jobs.c.id).where(jobs.c.site_id.in_(owned_site_ids(user_id)))
    stmt = apply_job_filters(stmt, q, conn.dialect.name).order_by(jobs.c.id)
    out = array("q")
    for part in conn.execution_options(yield_per=QUERY_DELETE_BATCH).execute(stmt).scalars().partitions():
        out.extend(part)
    return out


def delete_jobs_of(conn: sa.Connection, *, app_id: "int | None" = None, site_id: "int | None" = None,
                   released: "list[int] | None" = None) -> int:
    """Delete the jobs of the app ``app_id``, or of every app of the site ``site_id``, which the
    caller deletes next in this transaction, as :func:`delete_jobs` deletes jobs: their waiting
    children elsewhere (another app, another site of the user) are re-checked and released when
    their remaining parents have all finished (ids appended to ``released``). The delete of the app
    or the site alone cascaded to its jobs (``ON DELETE CASCADE``) without a look at their
    children, which then waited in AWAITING_PARENTS for ever. Leased jobs are deleted too, as that
    cascade did (their launchers learn it at their next heartbeat).

    Bulk, whatever the number of jobs: a few statements that select the jobs by their app or site
    (the indexes on ``jobs.app_id`` / ``jobs.site_id``), no list of ids sent back and forth. An app
    of 20,000 jobs without children elsewhere: 64-72 ms on PostgreSQL, against 55-64 ms for the
    cascade alone (the lock of the jobs); sending their ids to the server twice, as
    :func:`delete_jobs` does, had made it 160-180 ms.

    Race-free (PostgreSQL) as :func:`delete_jobs`, in the same order: the app (the site's apps, in
    id order) is locked first, ``FOR UPDATE``, so that no job is created in it from then on (a
    create's insert locks its app ``FOR KEY SHARE``: it waits, then finds the app gone) and the
    jobs selected by the app or site are the same in every statement below; then its jobs (id
    order), then their waiting children (id order), as a job delete locks them; the delete; the
    check of the children, a new statement. The cascade, too, took the app before its jobs, and a
    site's apps (with their jobs) before its BatchJobs and sessions, which the caller's delete of
    the site still takes after the jobs."""
    if (app_id is None) == (site_id is None):
        raise TypeError("delete_jobs_of: give app_id or site_id")
    owner, owner_id = ("app", app_id) if app_id is not None else ("site", site_id)
    dialect = conn.dialect.name
    of_jobs = jobs.c[_OWNER_COLUMNS[owner]] == owner_id
    if dialect == "postgresql":
        of_apps = apps.c.id == owner_id if owner == "app" else apps.c.site_id == owner_id
        conn.execute(sa.select(apps.c.id).where(of_apps).order_by(apps.c.id).with_for_update())
        # Locked without sending the ids back (the count of a locking subquery, which PostgreSQL
        # keeps whole: its rows are locked in its own order).
        locking = sa.select(jobs.c.id).where(of_jobs).order_by(jobs.c.id).with_for_update().subquery()
        conn.execute(sa.select(sa.func.count()).select_from(locking))
    candidates = _RELEASE_CANDIDATES_OF["postgresql" if dialect == "postgresql" else "sqlite", owner]
    return _delete_and_release(conn, candidates, {"b_of": owner_id}, [of_jobs], released)


def _sorted_has(values: Sequence[int], value: int) -> bool:
    at = bisect_left(values, value)
    return at < len(values) and values[at] == value


def _id_chunks(ids: list[int], dialect: str) -> list[sa.ColumnElement[bool]]:
    """``jobs.id`` among ``ids``: PostgreSQL takes them as one array parameter (SQLAlchemy
    expanding a 5,000-value IN list cost a fifth of a 10,000-job delete's server time); SQLite, in
    chunks of its parameter limit."""
    if dialect == "postgresql":
        return [jobs.c.id == sa.any_(sa.literal(ids, postgresql.ARRAY(sa.BigInteger)))]
    return [jobs.c.id.in_(ids[start:start + 5000]) for start in range(0, len(ids), 5000)]


def _delete_and_release(conn: sa.Connection, candidates: sa.Select, params: dict[str, Any],
                        deletes: list[sa.ColumnElement[bool]], released: "list[int] | None",
                        exclude: "set[int] | None" = None, sorted_exclude: "Sequence[int] | None" = None,
                        pulled_out: "list[int] | None" = None) -> int:
    """The delete shared by :func:`delete_jobs` and :func:`delete_jobs_of`, once the jobs to delete
    are locked (PostgreSQL, id order): lock and read their waiting children (``candidates`` with
    ``params``: :func:`_release_candidates_stmt`) before the delete cascades the links, delete the
    jobs (``deletes``: conditions on ``jobs``, one statement each), then check those children not
    deleted too (``exclude``: the deleted ids, where the candidates may hold some; ``sorted_exclude``:
    ids a later batch would delete, sorted, looked up by bisection: appended to ``pulled_out``,
    which :func:`delete_jobs` deletes next, see its ``deleted_later``) with a new statement and
    release those whose remaining parents have all finished."""
    children = conn.execute(candidates, params).scalars().all()
    count = sum(conn.execute(sa.delete(jobs).where(condition)).rowcount for condition in deletes)
    if exclude:
        children = [jid for jid in children if jid not in exclude]
    pulled: list[int] = []
    if sorted_exclude and children:
        pulled = [jid for jid in children if _sorted_has(sorted_exclude, jid)]
        if pulled:
            taken = set(pulled)
            children = [jid for jid in children if jid not in taken]
    if children:
        newly = _release_checked(conn, children, utcnow())
        if released is not None:
            released.extend(newly)
    if pulled and pulled_out is not None:
        # Deleted after the release check above: a child waiting on one of them too stays waiting
        # there, and is checked once, by the delete of its last unfinished parent. Waiting
        # children, never RUNNING: none is skipped. Their later batch finds them gone (counts 0).
        pulled_out.extend(pulled)
    return count
