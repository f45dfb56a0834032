"""Campaign analytics from the EventLog and BatchJobs, as ``(X, Y)`` step series for plotting.

- ``throughput_report(events, to_state="JOB_FINISHED")``: the cumulative number of jobs that
  reached ``to_state`` (each job counted once, at its first arrival: a re-run job finishing again
  is not a second job; ``distinct_jobs=False`` counts every such state change, as 0.7 did);
- ``utilization_report(events, node_weighting=True)``: nodes busy over time (+ ``data["num_nodes"]``,
  or +1, when a job starts RUNNING; minus the same when it leaves RUNNING);
- ``available_nodes(batch_jobs, first_runs=first_runs_query(batch_jobs, EventLog))``: nodes held
  by BatchJobs over time (from start_time, or the first job it ran if earlier, to end_time; a
  BatchJob still running counts until now).

Each takes a query (``EventLog.objects.filter(...)``/``BatchJob.objects.filter(...)``) or a list.
Times are naive local datetimes, like the rest of the Python API; events are ordered, and
durations measured, by the instant they stand for (``.timestamp()``, which honours ``fold``), so the
hour daylight saving repeats keeps its order and its length.

Helpers for tables and plots of such step series: ``step_at`` (the value at a time),
``align_steps`` (several series on one time axis), ``time_average`` (the mean over an interval) and
``downsample`` (at most N points, keeping each bucket's last or highest value).
"""

from __future__ import annotations

import bisect
import datetime as dt
from typing import Any, Iterable, Mapping, Sequence, Union

__all__ = ["throughput_report", "utilization_report", "available_nodes", "first_runs_query", "first_run_window",
           "batch_jobs_serving", "step_at", "align_steps", "time_average", "downsample"]

Series = tuple[list[dt.datetime], list[Union[int, float]]]


def _state(value: Any) -> str:
    return getattr(value, "value", value)


def _instant(when: dt.datetime) -> float:
    """The instant a naive local (its ``fold`` honoured) or aware time stands for: a sort key that
    stays right across daylight saving's fall-back, where naive times compare out of order."""
    return when.timestamp()


def _seconds(start: dt.datetime, end: dt.datetime) -> float:
    """Real seconds from ``start`` to ``end``: across daylight saving's fall-back the naive
    difference ``end - start`` ignores ``fold`` and is an hour short (or negative)."""
    return _instant(end) - _instant(start)


def from_instant(seconds: float, like: dt.datetime) -> dt.datetime:
    """The time ``seconds`` after the epoch, of the same kind as ``like``: aware in its zone, or
    naive local (``fold=1`` in the hour the fall-back repeats)."""
    if like.tzinfo is not None:
        return dt.datetime.fromtimestamp(seconds, like.tzinfo)
    return dt.datetime.fromtimestamp(seconds)  # naive local, fold set (PEP 495)


def throughput_report(eventlog_query: Iterable[Any], to_state: str = "JOB_FINISHED", *,
                      distinct_jobs: bool = True) -> Series:
    """Cumulative number of jobs that reached ``to_state`` over time: each job once, at its first
    arrival (``distinct_jobs=False``: every arrival, a re-run's too, as Balsam 0.7 counted)."""
    wanted = _state(to_state)
    events = sorted((e for e in eventlog_query if _state(e.to_state) == wanted),
                    key=lambda e: (_instant(e.timestamp), e.id or 0))
    if distinct_jobs:
        seen: set[Any] = set()
        first = []
        for event in events:
            if event.job_id is None or event.job_id not in seen:
                seen.add(event.job_id)
                first.append(event)
        events = first
    return [e.timestamp for e in events], list(range(1, len(events) + 1))


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
    ``data`` usually has no node count). A job that left RUNNING without entering it among these
    events (it started before a ``timestamp_after`` window) is left out: it took nothing here, and
    giving something back made the series go negative.

    Events of one instant make one point, the value after all of them. A launcher that starts a
    queued job on the CPUs of the one that just ended (its hand-over) stamps that exit and that
    start with the same time, and sends the RUNNING first (a lower event id): one point per event
    counted both jobs for an instant, and the peak read a slot more than the nodes held (2.03125
    busy on 2 nodes in the demo).
    """
    events = sorted(eventlog_query, key=lambda e: (_instant(e.timestamp), e.id or 0))
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
            if event.job_id not in taken:
                continue
            change = -taken.pop(event.job_id)
        else:
            continue
        current += change
        value = int(current) if float(current).is_integer() else current
        if times and _instant(times[-1]) == _instant(event.timestamp):
            values[-1] = value
        else:
            times.append(event.timestamp)
            values.append(value)
    return times, values


def available_nodes(batchjob_query: Iterable[Any], now: "dt.datetime | None" = None,
                    first_runs: "Mapping[int, dt.datetime] | None" = None) -> Series:
    """Nodes held by allocations over time (``num_nodes`` from start_time until end_time).

    A BatchJob without an end_time holds its nodes until ``now`` (default: the current time, naive
    local or UTC-aware like the BatchJobs' own times).

    ``first_runs`` (BatchJob id -> when its first job started RUNNING, see :func:`first_runs_query`):
    an allocation held its nodes from then at the latest. A BatchJob's start_time is the earliest
    of when its launcher opened its first Session (recorded by the server, even while the API
    still says queued) and the site agent's record at the status poll that sees it running (the
    scheduler's own start where the poll gives one, else its sighting), so the runs of its jobs come
    after it on the server's clock. This still counts them where ``batchjob_query`` was read before
    start_time was recorded (a queued copy without one), or where runs are stamped on a launcher
    clock that runs behind the server's: without it such a campaign read busy nodes where no node
    was held (``Busy 0.2``, ``Nodes held 0.0``)."""
    changes: list[tuple[dt.datetime, int]] = []
    for bj in batchjob_query:
        start = bj.start_time
        run = first_runs.get(bj.id) if first_runs else None
        if run is not None and (start is None or _instant(run) < _instant(start)):
            start = run
        if start is None:
            continue
        if now is None:
            now = dt.datetime.now(dt.timezone.utc) if start.tzinfo is not None else dt.datetime.now()
        changes.append((start, bj.num_nodes))
        changes.append((bj.end_time if bj.end_time is not None else now, -bj.num_nodes))
    changes.sort(key=lambda c: (_instant(c[0]), c[1]))
    times: list[dt.datetime] = []
    values: list[Union[int, float]] = []
    current = 0
    for when, delta in changes:
        current += delta
        times.append(when)
        values.append(current)
    return times, values


#: BatchJobs whose start_time the agent may not have recorded yet while their launcher runs jobs
#: (a finished one's start comes from the scheduler's history).
ACTIVE_BATCH_JOB_STATES = frozenset({"queued", "running", "pending_deletion"})


def submit_time(status_info: Any) -> "dt.datetime | None":
    """A BatchJob's submission time as the site agent writes it (``status_info["submit_time"]``, an
    ISO time), aware; one without a zone is UTC, as the server stores times (status_info is
    client-writable: a hand-written naive time read as local here and as UTC by the dashboard
    gave them different windows). None if there is none or it does not read. The dashboard's
    :func:`balsam.server.dashboard.plots.first_runs` reads it with this too."""
    text = status_info.get("submit_time") if isinstance(status_info, Mapping) else None
    try:
        when = dt.datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None
    return when.replace(tzinfo=dt.timezone.utc) if when is not None and when.tzinfo is None else when


#: Events read per request by :func:`first_runs_query` (their jobs' BatchJobs are one more request).
FIRST_RUNS_PAGE = 500
#: Active BatchJobs asked about in one ``/events/`` request by :func:`first_runs_query`, at most the
#: client's list-filter chunk (``Query.filter_chunk_size``, 500): with more ids it splits the list
#: and reads each part whole, so a page would no longer bound what a request downloads.
FIRST_RUNS_GROUP = 500
#: How long before a BatchJob's recorded start_time a run of one of its jobs still counts as its
#: first run. The agent records start_time from the scheduler's own start time where the poll gives
#: one, else when its poll sees the job running: up to ``scheduler.sync_period`` (10 s by default)
#: after the launcher may have started jobs. The server makes it no later than its launcher's
#: first Session (balsam.server.sessions_logic.note_batch_job_start), so a late sighting no longer
#: moves it; what is left is a launcher's clock behind the server's (runs are stamped on it). An
#: earlier run of a job now in this BatchJob is of an earlier allocation (a job re-run here keeps
#: its earlier RUNNING events): counting it held this BatchJob's nodes from the other allocation's
#: run on, for as long as it stayed active.
FIRST_RUN_LOOKBACK = dt.timedelta(minutes=2)


def first_run_window(submitted: "dt.datetime | None",
                     start: "dt.datetime | None") -> tuple["dt.datetime | None", "dt.datetime | None"]:
    """(earliest, latest) time a RUNNING event of an active BatchJob's job may be its first run: not
    before it was submitted, nor more than :data:`FIRST_RUN_LOOKBACK` before its recorded start
    (either end open when unknown). The rule of :func:`first_runs_query` and of the dashboard.

    A job's ``batch_job_id`` is the last BatchJob it was leased by, so its earlier RUNNING events
    may be another allocation's. Until start_time is recorded (by the server when the allocation's
    launcher opens its first Session, or by the agent at most a sync period after the allocation
    started), only the submission bounds them, and a job run in another allocation since then and
    already re-run here still counts from that run. The server keeps start_time no later than that
    first Session (a later sighting of the agent is not stored), so the window starts at most
    :data:`FIRST_RUN_LOOKBACK` before the launcher could run anything: a run before it is another
    allocation's, or stamped by a launcher whose clock runs that far behind the server's."""
    earliest = submitted
    if start is not None:
        # By instant: ``start - LOOKBACK`` on a naive local time drops its ``fold``, so a start in the
        # second pass of the hour daylight saving's fall-back repeats got a floor an hour earlier:
        # a run of another allocation in that hour was taken for this BatchJob's first.
        floor = from_instant(_instant(start) - FIRST_RUN_LOOKBACK.total_seconds(), start)
        earliest = floor if earliest is None or _utc(earliest) < _utc(floor) else earliest
    return earliest, start


def _run_windows(batch_jobs: Iterable[Any]) -> dict[int, tuple["dt.datetime | None", "dt.datetime | None"]]:
    """Active BatchJob id -> :func:`first_run_window` of each active BatchJob: its first run is the
    first RUNNING of its jobs in it."""
    windows: dict[int, tuple["dt.datetime | None", "dt.datetime | None"]] = {}
    for bj in batch_jobs:
        if bj.id is None or _state(bj.state) not in ACTIVE_BATCH_JOB_STATES:
            continue
        windows[bj.id] = first_run_window(submit_time(bj.status_info), bj.start_time)
    return windows


def _utc(when: dt.datetime) -> dt.datetime:
    """``when`` as an aware UTC time (a naive one is local), as the API's filters send it."""
    return when.astimezone(dt.timezone.utc)


def _in_window(when: dt.datetime, window: tuple["dt.datetime | None", "dt.datetime | None"]) -> bool:
    """Within ``window``, both ends included (the API's ``timestamp_after``/``timestamp_before``)."""
    after, before = window
    return (after is None or _utc(when) >= _utc(after)) and (before is None or _utc(when) <= _utc(before))


def first_runs_query(batch_jobs: Iterable[Any], event_log: Any, job_model: Any = None) -> dict[int, dt.datetime]:
    """For ``available_nodes(first_runs=...)``: per active BatchJob (``ACTIVE_BATCH_JOB_STATES``),
    when the first of its jobs started RUNNING within its :func:`first_run_window` (not before it
    was submitted, nor more than :data:`FIRST_RUN_LOOKBACK` before its recorded start_time, and not
    after it). ``event_log`` is the ``EventLog`` model (``job_model`` the ``Job`` model: by default
    the one of ``event_log``'s client).

    Bulk, however many BatchJobs are active (it was one request per active BatchJob): per
    :data:`FIRST_RUNS_GROUP` of them, the RUNNING events of their jobs, oldest first,
    :data:`FIRST_RUNS_PAGE` a request, with one request for those events' jobs (whose
    ``batch_job_id`` tells which BatchJob each is of), until each has its first run or is past its
    recorded start: usually one page. A BatchJob with no start recorded and no run yet reads on
    through its fellows' events (this costs pages, not requests per BatchJob). A server whose
    ``/events/`` takes one ``batch_job_id`` only (Balsam 0.7, and servers of this version, 0.8.0,
    from before the list was taken) answers a list with a 422: then one query per BatchJob, each
    one row, as before."""
    windows = _run_windows(batch_jobs)
    if not windows:
        return {}
    if len(windows) == 1:
        return _first_runs_each(windows, event_log)
    job_model = job_model or event_log._model_for("Job")
    ids = sorted(windows)
    # Never more than the client sends in one request (a query is lazy: this asks nothing).
    size = min(FIRST_RUNS_GROUP, getattr(event_log.objects.filter(), "filter_chunk_size", FIRST_RUNS_GROUP))
    found: dict[int, dt.datetime] = {}
    try:
        for first in range(0, len(ids), size):
            group = {bj_id: windows[bj_id] for bj_id in ids[first:first + size]}
            found.update(_first_runs_bulk(group, event_log, job_model))
    except Exception as exc:
        if not _refuses_list(exc, "batch_job_id"):
            raise
        return _first_runs_each(windows, event_log)
    return {bj_id: found[bj_id] for bj_id in windows if bj_id in found}


def _refuses_list(exc: BaseException, name: str) -> bool:
    """A 422 of a server that takes one value of query parameter ``name`` (``takes one value, got
    N``), read by the place its detail names (``loc``: ``["query", name]``)."""
    # The status as balsam.client.status_updater.http_status reads it (not imported: this module
    # reads records only, and the client package costs its importer 0.15 s).
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if status != 422:
        return False
    detail = getattr(exc, "detail", None)
    if isinstance(detail, list):
        return any(isinstance(entry, dict) and list(entry.get("loc") or [])[-1:] == [name] for entry in detail)
    return f"{name}: takes one value" in str(exc)


def _first_runs_bulk(windows: Mapping[int, tuple["dt.datetime | None", "dt.datetime | None"]], event_log: Any,
                     job_model: Any) -> dict[int, dt.datetime]:
    """The RUNNING events of the jobs of the BatchJobs not settled yet, oldest first, a page at a
    time; a BatchJob is settled once it has its first run, or once the events read are past its
    recorded start (none of its later ones counts), and the next page asks for the others only,
    from the last time read on."""
    found: dict[int, dt.datetime] = {}
    open_ = set(windows)
    afters = [after for after, _ in windows.values()]
    cursor = min(afters, key=_utc) if all(after is not None for after in afters) else None
    offset = 0
    seen: set[int] = set()
    batch_job_of: dict[int, "int | None"] = {}
    while open_:
        # The result set this request pages through is that of these BatchJobs (and the latest
        # start among them): an offset carries over to the next request only if they are the same.
        asked = set(open_)
        filters: dict[str, Any] = {"batch_job_id": sorted(open_), "to_state": "RUNNING"}
        befores = [windows[bj_id][1] for bj_id in open_]
        if all(before is not None for before in befores):
            filters["timestamp_before"] = max(befores, key=_utc)
        if cursor is not None:
            filters["timestamp_after"] = cursor  # inclusive: the events at the cursor again (``seen``)
        page = list(event_log.objects.filter(**filters).order_by("timestamp")[offset : offset + FIRST_RUNS_PAGE])
        fresh = [event for event in page if event.id not in seen]
        seen.update(event.id for event in fresh)
        unknown = sorted({event.job_id for event in fresh} - set(batch_job_of))
        if unknown:
            batch_job_of.update((job.id, job.batch_job_id) for job in job_model.objects.filter(id=unknown))
        for event in fresh:  # oldest first, ties by id: the first that fits is the one the server would give
            bj_id = batch_job_of.get(event.job_id)
            if bj_id in open_ and _in_window(event.timestamp, windows[bj_id]):
                found[bj_id] = event.timestamp
                open_.discard(bj_id)
        if len(page) < FIRST_RUNS_PAGE:
            break
        last = page[-1].timestamp
        open_ = {bj_id for bj_id in open_ if windows[bj_id][1] is None or _utc(last) <= _utc(windows[bj_id][1])}
        if cursor is not None and _utc(last) == _utc(cursor) and open_ == asked:
            offset += FIRST_RUNS_PAGE  # a whole page at one instant, the same set asked: on through it
        else:
            # A new instant, or fewer BatchJobs asked next (a smaller set: an offset into it would
            # skip the others' events): from the start of ``last`` again; ``seen`` drops repeats.
            # Each round either moves the cursor on, settles a BatchJob, or moves the offset on.
            cursor, offset = last, 0
    return {bj_id: found[bj_id] for bj_id in windows if bj_id in found}


def _first_runs_each(windows: Mapping[int, tuple["dt.datetime | None", "dt.datetime | None"]],
                     event_log: Any) -> dict[int, dt.datetime]:
    """One query per BatchJob, each one row (the oldest such event): one BatchJob, or a server
    that takes one ``batch_job_id`` at a time."""
    found: dict[int, dt.datetime] = {}
    for bj_id, (earliest, start) in windows.items():
        filters: dict[str, Any] = {"batch_job_id": bj_id, "to_state": "RUNNING"}
        if start is not None:
            filters["timestamp_before"] = start
        if earliest is not None:
            filters["timestamp_after"] = earliest
        event = event_log.objects.filter(**filters).order_by("timestamp").first()
        if event is not None:
            found[bj_id] = event.timestamp
    return found


def batch_jobs_serving(batchjob_query: Iterable[Any], tags: "dict[str, str] | None") -> list[Any]:
    """The BatchJobs that may run jobs tagged ``tags``: those whose ``filter_tags`` are all among them
    (a BatchJob without filter tags runs any job). With no tags, all of them."""
    if not tags:
        return list(batchjob_query)
    return [bj for bj in batchjob_query if all(tags.get(k) == v for k, v in (bj.filter_tags or {}).items())]


def step_at(times: Sequence[dt.datetime], values: Sequence[Union[int, float]], when: dt.datetime) -> Union[int, float]:
    """The value of a step series at ``when`` (0 before its first point; ``times`` sorted by instant)."""
    # By instant: naive times bisected as such put 01:05 CST (fold=1) before 01:30 CDT.
    index = bisect.bisect_right(times, _instant(when), key=_instant)
    return values[index - 1] if index else 0


def align_steps(*series: Series) -> tuple[list[dt.datetime], list[list[Union[int, float]]]]:
    """Step series on one time axis (the union of their times), each carried forward (0 before it starts)."""
    # Keyed by instant: naive times of the repeated hour compare (and hash) equal whatever their fold.
    by_instant: dict[float, dt.datetime] = {}
    for times, _values in series:
        for t in times:
            by_instant.setdefault(_instant(t), t)
    keys = sorted(by_instant)
    axis = [by_instant[k] for k in keys]
    aligned = []
    for times, values in series:
        instants = [_instant(t) for t in times]
        out: list[Union[int, float]] = []
        i, current = 0, 0
        for key in keys:
            while i < len(instants) and instants[i] <= key:
                current = values[i]
                i += 1
            out.append(current)
        aligned.append(out)
    return axis, aligned


def time_average(times: Sequence[dt.datetime], values: Sequence[Union[int, float]], start: dt.datetime,
                 end: dt.datetime) -> float:
    """The time-weighted mean of a step series over ``[start, end]`` (durations in real time)."""
    span = _seconds(start, end)
    if span <= 0:
        return float(step_at(times, values, start))
    total, at, current = 0.0, start, step_at(times, values, start)
    first = bisect.bisect_right(times, _instant(start), key=_instant)
    for t, v in zip(times[first:], values[first:]):
        if _instant(t) >= _instant(end):
            break
        total += current * _seconds(at, t)
        at, current = t, v
    total += current * _seconds(at, end)
    return total / span


def downsample(times: Sequence[dt.datetime], columns: Sequence[Sequence[Union[int, float]]], max_points: int,
               how: Sequence[str]) -> tuple[list[dt.datetime], list[list[Union[int, float]]]]:
    """At most ``max_points`` points in equal time buckets. Per column, ``how`` is ``"last"`` (the
    bucket's last value: right for cumulative counts) or ``"max"`` (its highest: peaks stay visible)."""
    if len(times) <= max_points or len(times) < 2:
        return list(times), [list(c) for c in columns]
    start = times[0]
    width = _seconds(start, times[-1]) / max_points or 1.0
    out_t: list[dt.datetime] = []
    out_cols: list[list[Union[int, float]]] = [[] for _ in columns]
    bucket = -1
    for i, t in enumerate(times):
        b = min(int(_seconds(start, t) / width), max_points - 1)
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
