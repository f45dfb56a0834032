"""/events/: the read-only job state history (one row per state change)."""

from __future__ import annotations

import sqlalchemy as sa
from starlette.responses import Response

from balsam.states import JobState

from ..db import count_and_page, where_eq, where_gt, where_in
from ..http import ID_AFTER, PAGINATION, QueryParams, json_response, pagination, wire_datetime
from ..jobs_logic import json_contains, owned_site_ids
from ..routing import Ctx, route
from ..tables import batch_jobs, jobs, log_events

EV_FIELDS = ["id", "job_id", "timestamp", "from_state", "to_state", "data"]
EV_COLUMNS = [log_events.c[f] for f in EV_FIELDS]
FILTERS = {"id", "job_id", "site_id", "batch_job_id", "scheduler_id", "tags", "data", "timestamp_before", "timestamp_after",
           "from_state", "to_state", "ordering", ID_AFTER}


def events_select(user_id: int, q: QueryParams, dialect: str) -> tuple[sa.Select, list[sa.ColumnElement]]:
    """The user's events matching the query's filters, and their ordering (API and dashboard)."""
    stmt = sa.select(*EV_COLUMNS).join(jobs, jobs.c.id == log_events.c.job_id).where(
        jobs.c.site_id.in_(owned_site_ids(user_id))
    )
    stmt = where_in(stmt, log_events.c.id, q.int_list("id", bits=64))
    stmt = where_gt(stmt, log_events.c.id, q.int(ID_AFTER, bits=64))
    stmt = where_in(stmt, log_events.c.job_id, q.int_list("job_id", bits=64))
    stmt = where_in(stmt, jobs.c.site_id, q.int_list("site_id"))
    # A list (repeated or comma-separated) as well as the one id of Balsam 0.7: the first runs of a
    # site's active BatchJobs are one query for all of them (balsam.analytics.first_runs_query). The
    # OpenAPI document still says one id: this route's worst query documented with a list of them
    # outgrows QUERY_BUDGET (tests/server/test_openapi.py), and one id is what it promised 0.7 clients.
    stmt = where_in(stmt, jobs.c.batch_job_id, q.int_list("batch_job_id"))
    scheduler_id = q.int("scheduler_id", bits=64)
    if scheduler_id is not None:
        stmt = stmt.where(jobs.c.batch_job_id.in_(sa.select(batch_jobs.c.id).where(batch_jobs.c.scheduler_id == scheduler_id)))
    before, after = q.datetime("timestamp_before"), q.datetime("timestamp_after")
    if before is not None:
        stmt = stmt.where(log_events.c.timestamp <= before)
    if after is not None:
        stmt = stmt.where(log_events.c.timestamp >= after)
    stmt = where_eq(stmt, log_events.c.from_state, q.enum("from_state", JobState))
    stmt = where_eq(stmt, log_events.c.to_state, q.enum("to_state", JobState))
    tags, data = q.key_values("tags"), q.key_values("data")
    if tags:
        stmt = stmt.where(json_contains(jobs.c.tags, tags, dialect))
    if data:
        stmt = stmt.where(json_contains(log_events.c.data, data, dialect, loose=True))
    ordering = q.choice("ordering", ["timestamp", "-timestamp"], default="-timestamp")
    order = [log_events.c.timestamp.desc(), log_events.c.id.desc()] if ordering == "-timestamp" else [
        log_events.c.timestamp.asc(), log_events.c.id.asc()]
    return stmt, order


def list_events(ctx: Ctx) -> Response:
    q = ctx.query(FILTERS | PAGINATION)
    limit, offset = pagination(q)
    with ctx.read() as conn:
        stmt, order = events_select(ctx.user.id, q, conn.dialect.name)
        count, rows = count_and_page(conn, stmt, order, limit, offset)
    results = []
    for row in rows:
        event = dict(zip(EV_FIELDS, row))
        event["timestamp"] = wire_datetime(event["timestamp"])
        results.append(event)
    return json_response({"count": count, "results": results})


routes = [route("/events/", {"GET": list_events})]
