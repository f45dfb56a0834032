"""/events/: the read-only job state history (one row per state change)."""

from __future__ import annotations

import sqlalchemy as sa
from starlette.responses import Response

from balsam.states import JobState

from ..db import count_and_page, where_eq, where_gt, where_in
from ..http import ID_AFTER, PAGINATION, QueryParams, json_response, pagination, wire_datetime
from ..jobs_logic import json_contains, owned_site_ids, owned_sites_clause, owner_params
from ..routing import Ctx, route
from ..tables import batch_jobs, jobs, log_events, sites

EV_FIELDS = ["id", "job_id", "timestamp", "from_state", "to_state", "data"]
EV_COLUMNS = [log_events.c[f] for f in EV_FIELDS]
FILTERS = {"id", "job_id", "site_id", "batch_job_id", "scheduler_id", "tags", "data", "timestamp_before", "timestamp_after",
           "from_state", "to_state", "ordering", ID_AFTER}


def _event_filters(user_id: int, q: QueryParams, dialect: str, *, by_state: "bool | None" = None,
                   by_time: "bool | None" = None) -> tuple[sa.Select, sa.Select, bool, list[sa.ColumnElement]]:
    """The query's filters: on the events (a select of their columns), on their jobs (a select of
    the owner's jobs' ids), whether any of them is on the jobs besides the owner's sites, and the
    ordering. :func:`events_select` joins the two, :func:`events_page_select` may look up each
    event's job instead. ``by_state`` (:func:`events_by_id_select`) fixes the plan of an id-ordered
    page: True, through the state's index (the bounds on the id as an expression the primary key
    does not serve), False, by the primary key (the state's test as an expression no index serves).
    ``by_time`` (:func:`_few_in_time_range`) likewise: True, through ``ix_log_events_timestamp``
    (the bounds on the id as ``id + 0``), False, not through it (the timestamp tests on ``+timestamp``)."""
    events = sa.select(*EV_COLUMNS)
    owned_jobs = sa.select(jobs.c.id).where(jobs.c.site_id.in_(owned_site_ids(user_id)))
    owner_only = owned_jobs
    events = where_in(events, log_events.c.id, q.int_list("id", bits=64))
    events = where_gt(events, log_events.c.id + 0 if by_state or by_time else log_events.c.id, q.int(ID_AFTER, bits=64))
    events = where_in(events, log_events.c.job_id, q.int_list("job_id", bits=64))
    owned_jobs = where_in(owned_jobs, jobs.c.site_id, q.int_list("site_id"))
    # A list (repeated or comma-separated) as well as the one id of Balsam 0.7: the first runs of a
    # site's active BatchJobs are one query for all of them (balsam.analytics.first_runs_query). The
    # OpenAPI document still says one id: this route's worst query documented with a list of them
    # outgrows QUERY_BUDGET (tests/server/test_openapi.py), and one id is what it promised 0.7 clients.
    owned_jobs = where_in(owned_jobs, jobs.c.batch_job_id, q.int_list("batch_job_id"))
    scheduler_id = q.int("scheduler_id", bits=64)
    if scheduler_id is not None:
        owned_jobs = owned_jobs.where(
            jobs.c.batch_job_id.in_(sa.select(batch_jobs.c.id).where(batch_jobs.c.scheduler_id == scheduler_id)))
    for condition in _time_range(q, unindexed=by_time is False):
        events = events.where(condition)
    events = where_eq(events, log_events.c.from_state, q.enum("from_state", JobState))
    to_state = log_events.c.to_state.concat("") if by_state is False else log_events.c.to_state
    events = where_eq(events, to_state, q.enum("to_state", JobState))
    tags, data = q.key_values("tags"), q.key_values("data")
    if tags:
        owned_jobs = owned_jobs.where(json_contains(jobs.c.tags, tags, dialect))
    if data:
        events = events.where(json_contains(log_events.c.data, data, dialect, loose=True))
    ordering = q.choice("ordering", ["timestamp", "-timestamp"], default="-timestamp")
    order = [log_events.c.timestamp.desc(), log_events.c.id.desc()] if ordering == "-timestamp" else [
        log_events.c.timestamp.asc(), log_events.c.id.asc()]
    return events, owned_jobs, owned_jobs is not owner_only, order


#: ``+timestamp``: the same value (SQLite's unary plus is a no-op on text too), which no index serves.
_UNINDEXED_TIMESTAMP = sa.type_coerce(sa.literal_column("+log_events.timestamp"), log_events.c.timestamp.type)


def _time_range(q: QueryParams, *, unindexed: bool = False) -> list[sa.ColumnElement[bool]]:
    """The query's conditions on the events' ``timestamp`` (``timestamp_before``, ``timestamp_after``)."""
    stamp = _UNINDEXED_TIMESTAMP if unindexed else log_events.c.timestamp
    conditions = []
    before, after = q.datetime("timestamp_before"), q.datetime("timestamp_after")
    if before is not None:
        conditions.append(stamp <= before)
    if after is not None:
        conditions.append(stamp >= after)
    return conditions


def events_select(user_id: int, q: QueryParams, dialect: str) -> tuple[sa.Select, list[sa.ColumnElement]]:
    """The user's events matching the query's filters, joined with their jobs, and their ordering:
    the form for reading every match (the exact count, the dashboard's plots), and for pages that
    :func:`events_page_select` leaves to the planner."""
    events, owned_jobs, _narrowed, order = _event_filters(user_id, q, dialect)
    return events.join(jobs, jobs.c.id == log_events.c.job_id).where(owned_jobs.whereclause), order


def events_page_select(conn: sa.Connection, user_id: int,
                       q: QueryParams) -> tuple[sa.Select, list[sa.ColumnElement], bool]:
    """:func:`events_select` for reading a page: a few rows in an index's order, then stop; and
    whether the same statement is also the one to count the matches with (a few in a time range).

    On SQLite, when the request's sites hold every site (a one-user server, SQLite's usual) and no
    filter is on the jobs, the owner check is an ``EXISTS`` lookup of each event's job by its
    primary key. Joined, SQLite's planner first builds a Bloom filter over every job of the user's
    sites (the join's inner table, filtered), before it reads the page: 10^5 jobs, 9*10^5 events,
    17 ms for a page of 100 that the lookup reads in 0.1 ms. Elsewhere the join stays: where the
    user's events are a few among others', the walk in the page's order passes the others' events,
    each a lookup (0.6 s for 9*10^5) where the filter rejects it for less (0.1 s); a filter on the
    jobs (a site, a BatchJob, tags) can narrow them to a few, which the join reads first. Only the
    plan depends on the check, not what the user may read. PostgreSQL plans the join as such lookups
    itself (a nested loop under the limit).

    A ``timestamp`` range of few events (:func:`_few_in_time_range`; no filter on the jobs) is read
    through ``ix_log_events_timestamp``, each event's job looked up, whatever the other sites: its
    page, and its count too. Without statistics SQLite's planner took the join's count (and, with
    another user's site, its page) from every job of the site and all their events (10^5 jobs,
    9*10^5 events, an hour of 3,240: 400 ms for the count, 1 s for page and count, 3 ms read
    through the range)."""
    dialect = conn.dialect.name
    events, owned_jobs, narrowed, order = _event_filters(user_id, q, dialect)
    lookup = _looks_up_jobs(conn, user_id, narrowed)
    # The bound only for a range: measuring it is a query (0.1 ms) that a page without one skips.
    if (dialect == "sqlite" and not narrowed and _time_ranged(q)
            and _few_in_time_range(conn, q, _time_bound(conn, lookup))):
        events = _event_filters(user_id, q, dialect, by_time=True)[0]
        return _owner_checked(events, owned_jobs, True), order, True
    return _owner_checked(events, owned_jobs, lookup), order, False


def _looks_up_jobs(conn: sa.Connection, user_id: int, narrowed: bool) -> bool:
    """Whether :func:`events_page_select` checks the owner by a lookup of each event's job."""
    return conn.dialect.name == "sqlite" and not narrowed and not _another_site(conn, user_id)


#: A ``timestamp`` range (``timestamp_after``/``_before``) of at most this many events of all users
#: is read through ``ix_log_events_timestamp`` on SQLite (:func:`_few_in_time_range`), its page and
#: its count, each event's job looked up: bounded by the range, where the planner, without
#: statistics, took every job of the site and all their events first. At 10^5 jobs, 9*10^5 events,
#: a range of 9,720: the dashboard's Events page (read and sorted by id) 11 ms, ``GET /events/``
#: (its page of 100 and its count through the lookup) 9 ms.
FEW_IN_TIME_RANGE = 10_000


def _time_ranged(q: QueryParams) -> bool:
    """Whether the query has a ``timestamp`` range and no ``job_id``/``id`` filter (those events are
    read by their index whatever the range)."""
    return bool(_time_range(q)) and not (q.has("job_id") or q.has("id"))


def _few_in_time_range(conn: sa.Connection, q: QueryParams, bound: int) -> bool:
    """Whether the query has a ``timestamp`` range (:func:`_time_ranged`) holding at most ``bound``
    events of all users. Counted in ``ix_log_events_timestamp`` alone, no row read, up to the bound
    (0.2 ms for 3,240 entries, 45 ms for 450,000): what SQLite's planner would need statistics for,
    exact and bounded."""
    if not _time_ranged(q):
        return False
    conditions = _time_range(q)
    probe = sa.select(log_events.c.id).where(*conditions).limit(bound + 1).subquery()
    return conn.execute(sa.select(sa.func.count()).select_from(probe)).scalar_one() <= bound


def _time_bound(conn: sa.Connection, lookup: bool) -> int:
    """The bound of :func:`_few_in_time_range` for a page and its count. Where the owner check is a
    lookup anyway (a one-user server) the count decides: through the join it reads all the user's
    events, ~0.5 us each, through the range's lookups ~0.7 us a matching event, so the range is
    read up to half the events (from the ids' span: one lookup at each end of the primary key)."""
    if not lookup:
        return FEW_IN_TIME_RANGE
    # Two subqueries: SQLite reads a lone min() or max() at the key's end, both together by a scan.
    first, last = conn.execute(sa.select(sa.select(sa.func.min(log_events.c.id)).scalar_subquery(),
                                         sa.select(sa.func.max(log_events.c.id)).scalar_subquery())).one()
    return FEW_IN_TIME_RANGE if first is None else max(FEW_IN_TIME_RANGE, (last - first + 1) // 2)


def _owner_checked(events: sa.Select, owned_jobs: sa.Select, lookup: bool) -> sa.Select:
    if lookup:
        return events.where(owned_jobs.where(jobs.c.id == log_events.c.job_id).exists())
    return events.join(jobs, jobs.c.id == log_events.c.job_id).where(owned_jobs.whereclause)


#: A state at most this many events (of all users) reached: the dashboard's Events page filtered by
#: it reads them all and sorts them by id on SQLite (:func:`events_by_id_select`); a state more
#: reached, it walks the events by id until the page is full. The two cost the same near 1,700 at
#: 9*10^5 events (a read and sort ~30 times a walked row: 5.5 ms against 21 ms for 1,000 events
#: spread over the table, 45 ms against 6 ms for 5,000); counting up to the bound takes 0.1 ms.
FEW_IN_STATE = 1_000


def events_by_id_select(conn: sa.Connection, user_id: int, q: QueryParams, *, newest_first: bool,
                        before: "int | None" = None) -> sa.Select:
    """:func:`events_page_select` in id order (the dashboard's Events page, paged by id: ``before``
    an id, and the query's ``id__gt``), without its limit.

    On SQLite, filtered by ``to_state`` (and no ``job_id``/``id``: those are read by their index),
    with the owner checked by a lookup, SQLite's planner chooses between reading the state's events
    through ``ix_log_events_to_state_timestamp`` and sorting them, and walking every event by id
    until the page is full, blind to how many the state has: without statistics (the server does
    not ANALYZE) it read a common state's 3*10^5 of 9*10^5 and sorted them (130-290 ms for a page,
    0.25-1 ms walked), with them it walked every event for a rare one (50-210 ms for a page with no
    match, 0.1-0.6 ms read through the index). The state's index entries, counted up to
    :data:`FEW_IN_STATE` (no row read), tell which; the plan is then fixed with expressions: the
    order and the bounds on the id as ``id + 0`` (which the primary key does not serve) for a few,
    the state's test as ``to_state || ''`` (which no index serves) for more. Only the plan depends
    on other users' events, never the answer. With a filter on the jobs or another user's site the
    join stays, and its plan the planner's (see :func:`events_page_select`).

    Filtered by a ``timestamp`` range (no filter on the jobs): at most :data:`FEW_IN_TIME_RANGE`
    events, read through ``ix_log_events_timestamp`` and sorted, each event's job looked up whatever
    the other sites; more, with the lookup, walked by id, the range's tests on ``+timestamp`` (which
    no index serves). Without statistics SQLite's planner read a two-sided range's every event and
    sorted them (the whole log of 9*10^5: 450-950 ms, 12 ms walked), and with another user's site
    every job of the site and all their events (for an hour of them: 300-600 ms, 7 ms now)."""
    dialect = conn.dialect.name
    events, owned_jobs, narrowed, _order = _event_filters(user_id, q, dialect)
    lookup = _looks_up_jobs(conn, user_id, narrowed)
    by_state = by_time = None
    if dialect == "sqlite" and not narrowed and _time_ranged(q):
        by_time = _few_in_time_range(conn, q, FEW_IN_TIME_RANGE)
        if by_time:
            lookup = True
        elif not lookup:
            by_time = None  # the join's plan stays
    state = q.enum("to_state", JobState)
    if lookup and not by_time and state is not None and not (q.has("job_id") or q.has("id")):
        probe = sa.select(log_events.c.id).where(log_events.c.to_state == state).limit(FEW_IN_STATE + 1).subquery()
        by_state = conn.execute(sa.select(sa.func.count()).select_from(probe)).scalar_one() <= FEW_IN_STATE
    if by_state is not None or by_time is not None:
        events = _event_filters(user_id, q, dialect, by_state=by_state, by_time=by_time)[0]
    key = log_events.c.id + 0 if by_state or by_time else log_events.c.id
    if before is not None:
        events = events.where(key < before)
    return _owner_checked(events, owned_jobs, lookup).order_by(key.desc() if newest_first else key.asc())


#: A site outside the request's sites (jobs_logic.owned_sites_clause), by whether the credential is site-scoped.
_OTHER_SITE = {scoped: sa.select(sites.c.id).where(sa.not_(owned_sites_clause(scoped))).limit(1) for scoped in (False, True)}


def _another_site(conn: sa.Connection, user_id: int) -> bool:
    scoped, params = owner_params(user_id)
    return conn.execute(_OTHER_SITE[scoped], params).first() is not None


def _page_and_count(conn: sa.Connection, page: sa.Select, every: sa.Select, order: list[sa.ColumnElement],
                    limit: int, offset: int) -> tuple[int, list[sa.Row]]:
    """:func:`count_and_page` with the page read from ``page`` and the count, when the page cannot
    tell it, from ``every``: the same events, each in the form its planner reads fastest (a count
    through the lookup of :func:`events_page_select` took 0.55 s where the join took 0.13-0.2 s)."""
    if limit == 0:
        return count_and_page(conn, every, order, 0, 0)
    rows = conn.execute(page.order_by(*order).limit(limit + 1).offset(offset)).all()
    if len(rows) <= limit and (rows or offset == 0):
        return offset + len(rows), rows
    return count_and_page(conn, every, order, 0, 0)[0], rows[:limit]


def list_events(ctx: Ctx) -> Response:
    q = ctx.query(FILTERS | PAGINATION)
    limit, offset = pagination(q)
    with ctx.read() as conn:
        stmt, order = events_select(ctx.user.id, q, conn.dialect.name)
        page = stmt
        # Given jobs' or ids' events are read by their index either way, not worth a second
        # statement (building one is ~0.15 ms, the page itself less). A count alone (limit=0, as
        # Balsam 0.7's .count() asks) reads the join unless a few in a time range count faster.
        every = stmt
        if conn.dialect.name == "sqlite" and (_time_ranged(q) or (limit and not (q.has("job_id") or q.has("id")))):
            page, _order, few = events_page_select(conn, ctx.user.id, q)
            every = page if few else stmt  # a few in a time range: counted through their index
        count, rows = _page_and_count(conn, page, every, order, limit, offset)
    results = []
    for row in rows:
        event = dict(zip(EV_FIELDS, row))
        event["timestamp"] = wire_datetime(event["timestamp"])
        results.append(event)
    return json_response({"count": count, "results": results})


routes = [route("/events/", {"GET": list_events})]
