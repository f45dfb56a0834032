"""Plot data for the dashboard: throughput and utilization of a site or a tag filter.

The series are made by the same functions as the Python API's (:mod:`balsam.analytics`), fed with
the user's EventLog and BatchJob rows selected by the API's own filter logic; this module only
selects the rows. The busy and available series share one time axis (``align_steps``) and, for long
campaigns, a series is reduced to at most ``max_points`` time buckets (``downsample``: the bucket's
last value for the cumulative throughput, its highest for the node counts, so peaks stay visible).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any, Union

import sqlalchemy as sa

from balsam.analytics import (ACTIVE_BATCH_JOB_STATES, align_steps, available_nodes, batch_jobs_serving, downsample,
                               first_run_window, step_at, submit_time, throughput_report, utilization_report)
from balsam.states import BatchJobState, JobState

from ..http import QueryParams
from ..routes.batch_jobs import batch_jobs_select
from ..routes.events import events_select
from ..tables import batch_jobs, jobs, log_events

Number = Union[int, float]
MAX_POINTS = 1500
#: BatchJobs that never held nodes are left out of "available".
_NEVER_STARTED = (BatchJobState.pending_submission.value, BatchJobState.submit_failed.value)


def _epoch(value: dt.datetime) -> float:
    return value.timestamp()


def throughput_series(conn: sa.Connection, user_id: int, q: QueryParams) -> tuple[list[dt.datetime], list[Number]]:
    """Jobs finished over time (``throughput_report`` of the matching JOB_FINISHED events)."""
    stmt, _order = events_select(user_id, q, conn.dialect.name)
    # Only the columns throughput_report reads (the job's id: a re-run job finishing again counts once).
    stmt = stmt.with_only_columns(log_events.c.id, log_events.c.job_id, log_events.c.timestamp, log_events.c.to_state).where(
        log_events.c.to_state == JobState.finished.value)
    return throughput_report(conn.execute(stmt))


def utilization_series(conn: sa.Connection, user_id: int, q: QueryParams) -> tuple[list[dt.datetime], list[Number]]:
    """Nodes busy running jobs over time (``utilization_report`` of the matching RUNNING events)."""
    stmt, _order = events_select(user_id, q, conn.dialect.name)
    running = JobState.running.value
    stmt = stmt.where(sa.or_(log_events.c.to_state == running, log_events.c.from_state == running))
    return utilization_report(conn.execute(stmt))


def available_series(conn: sa.Connection, user_id: int, q: QueryParams,
                     now: "dt.datetime | None" = None) -> tuple[list[dt.datetime], list[Number]]:
    """Nodes held by the BatchJobs of the selected sites over time (``available_nodes``).

    With a tag filter, only BatchJobs whose ``filter_tags`` ask for a subset of those tags count
    (an allocation that runs any job, or only jobs with these tags).

    An active BatchJob holds its nodes from its first job's start at the latest (``first_runs``,
    as the Python API's ``first_runs_query``): start_time is recorded when the allocation's
    launcher opens its first Session (the server, sessions_logic.note_batch_job_start) or at the
    site agent's status poll that sees it running (the scheduler's own start where the poll gives
    one, which is kept when earlier), and a run may be stamped before it (on a launcher's clock
    behind the server's). A run more than ``FIRST_RUN_LOOKBACK`` (2 min) before start_time is not
    counted (another allocation's run of a job re-run here, or a launcher clock that far behind):
    held from start_time. The agent's late sighting (a scheduler that reports no start, a sync
    period above 2 min, an agent that was down) is the start only of an allocation whose launcher
    never opened a Session."""
    stmt, _order = batch_jobs_select(user_id, q, conn.dialect.name)
    stmt = stmt.where(sa.or_(batch_jobs.c.start_time.is_not(None), batch_jobs.c.state.in_(sorted(ACTIVE_BATCH_JOB_STATES))),
                      batch_jobs.c.state.not_in(_NEVER_STARTED))
    rows = batch_jobs_serving(conn.execute(stmt), q.key_values("tags"))
    return available_nodes(rows, now=now, first_runs=first_runs(conn, rows))


#: Active BatchJobs looked up in one statement by :func:`first_runs` (at most one UNION ALL member
#: each, 4 bound parameters each at most: under SQLite's 500 compound-select members and its 999
#: bound parameters of before 3.32).
FIRST_RUNS_CHUNK = 200


def first_runs(conn: sa.Connection, batch_job_rows: list[Any]) -> dict[int, dt.datetime]:
    """For ``available_nodes(first_runs=...)``: per active BatchJob, when the first of its jobs
    started RUNNING within its :func:`balsam.analytics.first_run_window` (a re-run job's
    batch_job_id is the last BatchJob it ran in, its earlier RUNNING may be another's: not before
    the BatchJob's submission (``status_info["submit_time"]``), nor more than ``FIRST_RUN_LOOKBACK``
    before its recorded start_time, nor after it). The rule of
    :func:`balsam.analytics.first_runs_query`, in one statement per ``FIRST_RUNS_CHUNK`` BatchJobs
    instead of one per BatchJob."""
    active = [row for row in batch_job_rows if row.state in ACTIVE_BATCH_JOB_STATES]
    found: dict[int, dt.datetime] = {}
    for first in range(0, len(active), FIRST_RUNS_CHUNK):
        windows = [(row.id, *first_run_window(submit_time(row.status_info), row.start_time))
                   for row in active[first:first + FIRST_RUNS_CHUNK]]
        shape: list[tuple[tuple[bool, bool], ...]] = []
        params: dict[str, Any] = {}
        k = 0
        for c, (group, earliest, latest) in enumerate(_overlapping(windows)):
            if earliest is not None and len(group) > 1:
                params[f"clo{c}"] = earliest
            if latest is not None and len(group) > 1:
                params[f"chi{c}"] = latest
            for bj_id, lo, hi in group:
                params[f"bj{k}"] = bj_id
                if lo is not None:
                    params[f"lo{k}"] = lo
                if hi is not None:
                    params[f"hi{k}"] = hi
                k += 1
            shape.append(tuple((lo is not None, hi is not None) for _bj, lo, hi in group))
        stmt = _first_runs_statement(tuple(shape))
        found.update({int(bj_id): when for bj_id, when in conn.execute(stmt, params) if when is not None})
    return found


Window = tuple[int, "dt.datetime | None", "dt.datetime | None"]


def _overlapping(windows: list[Window]) -> list[tuple[list[Window], "dt.datetime | None", "dt.datetime | None"]]:
    """The windows (BatchJob id, earliest, latest; an unknown end open) in groups whose ranges
    overlap, oldest first, each with its overall range: what one select of :func:`first_runs`
    scans."""
    def key(window: Window) -> tuple[bool, float]:
        return (window[1] is not None, window[1].timestamp() if window[1] is not None else 0.0)

    groups: list[tuple[list[Window], "dt.datetime | None", "dt.datetime | None"]] = []
    for window in sorted(windows, key=key):
        _bj, lo, hi = window
        if groups:
            group, g_lo, g_hi = groups[-1]
            if g_hi is None or lo is None or lo <= g_hi:
                group.append(window)
                groups[-1] = (group, g_lo, None if g_hi is None or hi is None else max(g_hi, hi))
                continue
        groups.append(([window], lo, hi))
    return groups


@functools.lru_cache(maxsize=64)
def _first_runs_statement(shape: tuple[tuple[tuple[bool, bool], ...], ...]) -> Any:
    """The statement of :func:`first_runs` for groups of overlapping windows with these known ends
    ((earliest, latest) per BatchJob): a UNION ALL of one select per group, each bounding its scan
    of the (to_state, timestamp) index by the group's range. One select for the whole chunk (its
    windows OR-ed) scanned their overall range, from the oldest window to the newest, on SQLite and
    PostgreSQL alike: with allocations hours apart, nearly every RUNNING event between them
    (benchmarks/dashboard_plots.py); one select per window read overlapping windows' events more
    than once. Built once per shape, the values bound (``clo<c>``/``chi<c>`` a group's range,
    ``bj<k>``/``lo<k>``/``hi<k>`` a BatchJob's): building 200 selects cost more than running them."""
    members = []
    k = 0
    for c, group in enumerate(shape):
        terms = []
        for has_earliest, has_latest in group:
            term = [jobs.c.batch_job_id == sa.bindparam(f"bj{k}")]
            if has_earliest:
                term.append(log_events.c.timestamp >= sa.bindparam(f"lo{k}"))
            if has_latest:
                term.append(log_events.c.timestamp <= sa.bindparam(f"hi{k}"))
            terms.append(sa.and_(*term))
            k += 1
        where = [log_events.c.to_state == JobState.running.value, terms[0] if len(terms) == 1 else sa.or_(*terms)]
        # The group's range (its one window's own bounds where it has one).
        if len(group) > 1 and all(has_earliest for has_earliest, _ in group):
            where.append(log_events.c.timestamp >= sa.bindparam(f"clo{c}"))
        if len(group) > 1 and all(has_latest for _, has_latest in group):
            where.append(log_events.c.timestamp <= sa.bindparam(f"chi{c}"))
        members.append(sa.select(jobs.c.batch_job_id, sa.func.min(log_events.c.timestamp))
                       .join(jobs, jobs.c.id == log_events.c.job_id).where(*where)
                       .group_by(jobs.c.batch_job_id))
    return members[0] if len(members) == 1 else sa.union_all(*members)


def plot_data(conn: sa.Connection, user_id: int, q: QueryParams, *, max_points: int = MAX_POINTS,
              now: "dt.datetime | None" = None) -> dict[str, Any]:
    """Everything the plots page draws, times as Unix seconds (UTC)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    done_t, done_y = throughput_series(conn, user_id, q)
    busy_t, busy_y = utilization_series(conn, user_id, q)
    avail_t, avail_y = available_series(conn, user_id, q, now=now)
    axis, (busy, avail) = align_steps((busy_t, busy_y), (avail_t, avail_y))
    thr_t, (thr_y,) = downsample(done_t, [done_y], max_points, ["last"])
    util_t, (busy_r, avail_r) = downsample(axis, [busy, avail], max_points, ["max", "max"])
    return {
        "throughput": {"t": [_epoch(t) for t in thr_t], "finished": thr_y},
        "utilization": {"t": [_epoch(t) for t in util_t], "busy": busy_r, "available": avail_r},
        "summary": {
            "finished": done_y[-1] if done_y else 0,
            "first_finished": _epoch(done_t[0]) if done_t else None,
            "last_finished": _epoch(done_t[-1]) if done_t else None,
            "busy_now": busy_y[-1] if busy_y else 0,
            "available_now": step_at(avail_t, avail_y, now),
            "peak_busy": max(busy_y) if busy_y else 0,
        },
        "generated": _epoch(now),
    }
