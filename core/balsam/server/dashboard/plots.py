"""Plot data for the dashboard: throughput and utilization of a site or a tag filter.

The series are made by the same functions as the Python API's (:mod:`balsam.analytics`), fed with
the user's EventLog and BatchJob rows selected by the API's own filter logic; this module only
selects the rows, aligns the busy and available series on one time axis and, for long campaigns,
reduces a series to at most ``max_points`` time buckets (the bucket's last value for the cumulative
throughput, its highest for the node counts, so peaks stay visible).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence, Union

import sqlalchemy as sa

from balsam.analytics import available_nodes, throughput_report, utilization_report
from balsam.states import BatchJobState, JobState

from ..http import QueryParams
from ..routes.batch_jobs import batch_jobs_select
from ..routes.events import events_select
from ..tables import batch_jobs, log_events

Number = Union[int, float]
MAX_POINTS = 1500
#: BatchJobs that never held nodes are left out of "available".
_NEVER_STARTED = (BatchJobState.pending_submission.value, BatchJobState.submit_failed.value)


def _epoch(value: dt.datetime) -> float:
    return value.timestamp()


def throughput_series(conn: sa.Connection, user_id: int, q: QueryParams) -> tuple[list[dt.datetime], list[Number]]:
    """Jobs finished over time (``throughput_report`` of the matching JOB_FINISHED events)."""
    stmt, _order = events_select(user_id, q, conn.dialect.name)
    stmt = stmt.where(log_events.c.to_state == JobState.finished.value)
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
    (an allocation that runs any job, or only jobs with these tags)."""
    stmt, _order = batch_jobs_select(user_id, q, conn.dialect.name)
    stmt = stmt.where(batch_jobs.c.start_time.is_not(None), batch_jobs.c.state.not_in(_NEVER_STARTED))
    rows = list(conn.execute(stmt))
    wanted = q.key_values("tags") or {}
    if wanted:
        rows = [r for r in rows if all(wanted.get(k) == v for k, v in (r.filter_tags or {}).items())]
    return available_nodes(rows, now=now)


def step_value_at(times: Sequence[dt.datetime], values: Sequence[Number], when: dt.datetime) -> Number:
    """The value of a step series at ``when`` (0 before its first point)."""
    current: Number = 0
    for t, v in zip(times, values):
        if t > when:
            break
        current = v
    return current


def align(series: Sequence[tuple[Sequence[dt.datetime], Sequence[Number]]]) -> tuple[list[dt.datetime], list[list[Number]]]:
    """Step series on one time axis (the union of their times), each carried forward (0 before its start)."""
    axis = sorted({t for times, _values in series for t in times})
    aligned: list[list[Number]] = []
    for times, values in series:
        out: list[Number] = []
        i, current = 0, 0
        for t in axis:
            while i < len(times) and times[i] <= t:
                current = values[i]
                i += 1
            out.append(current)
        aligned.append(out)
    return axis, aligned


def reduce_points(times: list[float], columns: list[list[Number]], max_points: int, how: Sequence[str]) -> tuple[list[float], list[list[Number]]]:
    """At most ``max_points`` equal time buckets; per column ``how`` is "last" or "max"."""
    if len(times) <= max_points or len(times) < 2:
        return times, columns
    start, end = times[0], times[-1]
    width = (end - start) / max_points or 1.0
    out_t: list[float] = []
    out_cols: list[list[Number]] = [[] for _ in columns]
    bucket = -1
    for i, t in enumerate(times):
        b = min(int((t - start) / width), max_points - 1)
        if b != bucket:
            bucket = b
            out_t.append(t)
            for col, values in zip(out_cols, columns):
                col.append(values[i])
            continue
        out_t[-1] = t
        for col, values, rule in zip(out_cols, columns, how):
            col[-1] = max(col[-1], values[i]) if rule == "max" else values[i]
    return out_t, out_cols


def plot_data(conn: sa.Connection, user_id: int, q: QueryParams, *, max_points: int = MAX_POINTS,
              now: "dt.datetime | None" = None) -> dict[str, Any]:
    """Everything the plots page draws, times as Unix seconds (UTC)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    done_t, done_y = throughput_series(conn, user_id, q)
    busy_t, busy_y = utilization_series(conn, user_id, q)
    avail_t, avail_y = available_series(conn, user_id, q, now=now)
    axis, (busy, avail) = align([(busy_t, busy_y), (avail_t, avail_y)])
    thr_t, (thr_y,) = reduce_points([_epoch(t) for t in done_t], [list(done_y)], max_points, ["last"])
    util_t, (busy_r, avail_r) = reduce_points([_epoch(t) for t in axis], [busy, avail], max_points, ["max", "max"])
    return {
        "throughput": {"t": thr_t, "finished": thr_y},
        "utilization": {"t": util_t, "busy": busy_r, "available": avail_r},
        "summary": {
            "finished": done_y[-1] if done_y else 0,
            "first_finished": _epoch(done_t[0]) if done_t else None,
            "last_finished": _epoch(done_t[-1]) if done_t else None,
            "busy_now": busy_y[-1] if busy_y else 0,
            "available_now": step_value_at(avail_t, avail_y, now) if avail_t else 0,
            "peak_busy": max(busy_y) if busy_y else 0,
        },
        "generated": _epoch(now),
    }
