"""Campaign analytics from the EventLog and BatchJobs, as ``(X, Y)`` step series for plotting.

- ``throughput_report(events, to_state="JOB_FINISHED")``: times of the matching state changes and
  the cumulative count (1..N) at each;
- ``utilization_report(events, node_weighting=True)``: nodes busy over time (+ ``data["num_nodes"]``,
  or +1, when a job starts RUNNING; minus the same when it leaves RUNNING);
- ``available_nodes(batch_jobs)``: nodes held by BatchJobs over time (from start_time to end_time;
  a BatchJob still running counts until now).

Each takes a query (``EventLog.objects.filter(...)``/``BatchJob.objects.filter(...)``) or a list.
Times are naive local datetimes, like the rest of the Python API.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Union

__all__ = ["throughput_report", "utilization_report", "available_nodes"]

Series = tuple[list[dt.datetime], list[Union[int, float]]]


def _state(value: Any) -> str:
    return getattr(value, "value", value)


def throughput_report(eventlog_query: Iterable[Any], to_state: str = "JOB_FINISHED") -> Series:
    """Cumulative number of jobs that reached ``to_state`` over time."""
    wanted = _state(to_state)
    times = sorted(e.timestamp for e in eventlog_query if _state(e.to_state) == wanted)
    return times, list(range(1, len(times) + 1))


def _node_weight(event: Any, node_weighting: bool) -> float:
    if not node_weighting:
        return 1
    data = event.data or {}
    value = data.get("num_nodes", 1)
    try:
        return float(value)
    except (TypeError, ValueError):
        return 1.0


def utilization_report(eventlog_query: Iterable[Any], node_weighting: bool = True) -> Series:
    """Nodes (or jobs, without ``node_weighting``) in RUNNING over time.

    A job leaving RUNNING gives back what it took when it entered RUNNING (the end event's own
    ``data`` usually has no node count).
    """
    events = sorted(eventlog_query, key=lambda e: (e.timestamp, e.id or 0))
    taken: dict[int, float] = {}
    times: list[dt.datetime] = []
    values: list[Union[int, float]] = []
    current: float = 0
    for event in events:
        change: float = 0
        if _state(event.to_state) == "RUNNING" and _state(event.from_state) != "RUNNING":
            weight = _node_weight(event, node_weighting)
            taken[event.job_id] = taken.get(event.job_id, 0) + weight
            change = weight
        elif _state(event.from_state) == "RUNNING" and _state(event.to_state) != "RUNNING":
            change = -taken.pop(event.job_id, _node_weight(event, node_weighting))
        else:
            continue
        current += change
        times.append(event.timestamp)
        values.append(int(current) if float(current).is_integer() else current)
    return times, values


def available_nodes(batchjob_query: Iterable[Any], now: "dt.datetime | None" = None) -> Series:
    """Nodes held by allocations over time (``num_nodes`` from start_time until end_time).

    A BatchJob without an end_time holds its nodes until ``now`` (default: the current time, naive
    local or UTC-aware like the BatchJobs' own times)."""
    changes: list[tuple[dt.datetime, int]] = []
    for bj in batchjob_query:
        if bj.start_time is None:
            continue
        if now is None:
            now = dt.datetime.now(dt.timezone.utc) if bj.start_time.tzinfo is not None else dt.datetime.now()
        changes.append((bj.start_time, bj.num_nodes))
        changes.append((bj.end_time if bj.end_time is not None else now, -bj.num_nodes))
    changes.sort(key=lambda c: (c[0], c[1]))
    times: list[dt.datetime] = []
    values: list[Union[int, float]] = []
    current = 0
    for when, delta in changes:
        current += delta
        times.append(when)
        values.append(current)
    return times, values
