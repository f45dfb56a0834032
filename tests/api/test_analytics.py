"""balsam.analytics on real EventLog and BatchJob records."""

from __future__ import annotations

import datetime as dt

import pytest


def test_reports_from_a_real_campaign(site, run_jobs):
    from balsam.analytics import available_nodes, throughput_report, utilization_report
    from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job

    site_name = site.name

    class Work(ApplicationDefinition):
        site = site_name
        command_template = "true"

    jobs = Job.objects.bulk_create([Work.submit(workdir=f"a/{i}", num_nodes=2, tags={"c": "1"}, save=False)
                                   for i in range(3)]
                                  + [Work.submit(workdir=f"b/{i}", num_nodes=1, node_packing_count=4, tags={"c": "1"},
                                                 save=False) for i in range(2)])
    run_jobs(site, jobs, fail=[jobs[-1].id])
    events = EventLog.objects.filter(tags={"c": "1"})

    times, counts = throughput_report(events, to_state="JOB_FINISHED")
    assert counts == [1, 2, 3, 4] and times == sorted(times)
    assert all(isinstance(t, dt.datetime) for t in times)
    assert throughput_report(events, to_state="FAILED")[1] == [1]

    times, busy = utilization_report(events, node_weighting=True)
    assert max(busy) == 6.5 and busy[-1] == 0  # 3 x 2 nodes + 2 x 1/4 node at the peak
    assert utilization_report(events, node_weighting=False)[1][-1] == 0
    assert max(utilization_report(events, node_weighting=False)[1]) == 5

    now = dt.datetime.now()
    a = BatchJob.objects.create(site_id=site.id, num_nodes=4, wall_time_min=10, job_mode="mpi", queue="debug",
                                project="datascience")
    b = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=10, job_mode="mpi", queue="debug",
                                project="datascience")
    for bj, start, end in ((a, now - dt.timedelta(minutes=30), now - dt.timedelta(minutes=10)),
                           (b, now - dt.timedelta(minutes=20), now - dt.timedelta(minutes=5))):
        bj.state = "running"
        bj.start_time = start
        bj.save()
        bj.state = "finished"
        bj.end_time = end
        bj.save()
    times, nodes = available_nodes(BatchJob.objects.filter(site_id=site.id))
    assert nodes == [4, 6, 2, 0]
    assert abs((times[0] - (now - dt.timedelta(minutes=30))).total_seconds()) < 1


def _event(i: int, job: int, from_state: str, to_state: str, when: dt.datetime, nodes: float = 0):
    from types import SimpleNamespace

    return SimpleNamespace(id=i, job_id=job, from_state=from_state, to_state=to_state, timestamp=when,
                           data={"num_nodes": nodes} if nodes else {})


def test_throughput_counts_a_rerun_job_once_unless_asked_for_every_arrival() -> None:
    from balsam.analytics import throughput_report

    t0 = dt.datetime(2026, 3, 1, 12)
    events = [_event(1, 1, "POSTPROCESSED", "JOB_FINISHED", t0), _event(2, 1, "POSTPROCESSED", "JOB_FINISHED", t0 + dt.timedelta(minutes=5)),
              _event(3, 2, "POSTPROCESSED", "JOB_FINISHED", t0 + dt.timedelta(minutes=6))]
    assert throughput_report(events) == ([t0, t0 + dt.timedelta(minutes=6)], [1, 2])
    assert throughput_report(events, distinct_jobs=False)[1] == [1, 2, 3]  # 0.7's count of state changes


def test_utilization_of_a_window_leaves_out_jobs_that_started_before_it() -> None:
    """EventLog filtered by timestamp_after: job 1's RUNNING is outside, its exit inside. It gave
    back a node it never took here (-1)."""
    from balsam.analytics import utilization_report

    t0 = dt.datetime(2026, 3, 1, 12)
    events = [_event(2, 1, "RUNNING", "RUN_DONE", t0), _event(3, 2, "RESTART_READY", "RUNNING", t0 + dt.timedelta(seconds=10), 4),
              _event(4, 2, "RUNNING", "RUN_TIMEOUT", t0 + dt.timedelta(seconds=20))]
    assert utilization_report(events)[1] == [4, 0]


def test_reports_keep_the_order_of_the_hour_daylight_saving_repeats(monkeypatch) -> None:
    """01:30 CDT then 01:10 CST, 40 minutes later: as naive local times they compared the other way
    round, and a job ended before it started (utilization -8 then +8 for good)."""
    import time

    from balsam._api.model import to_local_naive
    from balsam.analytics import available_nodes, utilization_report

    monkeypatch.setenv("TZ", "America/Chicago")
    time.tzset()
    try:
        utc = dt.timezone.utc
        start = to_local_naive(dt.datetime(2026, 11, 1, 6, 30, tzinfo=utc))
        end = to_local_naive(dt.datetime(2026, 11, 1, 7, 10, tzinfo=utc))
        assert (start.hour, start.minute, start.fold, end.hour, end.minute, end.fold) == (1, 30, 0, 1, 10, 1)
        assert end.timestamp() - start.timestamp() == 40 * 60
        events = [_event(2, 1, "RUNNING", "RUN_DONE", end), _event(1, 1, "PREPROCESSED", "RUNNING", start, 8)]
        assert utilization_report(events) == ([start, end], [8, 0])
        from types import SimpleNamespace

        assert available_nodes([SimpleNamespace(start_time=start, end_time=end, num_nodes=8)])[1] == [8, 0]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_durations_across_the_fall_back_are_real_time(monkeypatch) -> None:
    """America/Chicago, 2026-11-01: a job RUNNING 00:50 CDT .. 01:20 CST (90 real minutes) in a BatchJob
    held 00:45 CDT .. 01:30 CST (105 minutes). Naive differences ignore ``fold`` (an hour short): the
    mean came out wrong, the value at 01:05 CST read 0, and the CLI's table edges were uneven."""
    import time
    from types import SimpleNamespace

    from balsam._api.model import to_local_naive
    from balsam.analytics import (align_steps, available_nodes, downsample, step_at, time_average,
                                  utilization_report)
    from balsam.cli.analytics import _edges

    monkeypatch.setenv("TZ", "America/Chicago")
    time.tzset()
    try:
        def local(hour: int, minute: int) -> dt.datetime:
            return to_local_naive(dt.datetime(2026, 11, 1, hour, minute, tzinfo=dt.timezone.utc))

        events = [_event(1, 1, "PREPROCESSED", "RUNNING", local(5, 50), 1), _event(2, 1, "RUNNING", "RUN_DONE", local(7, 20))]
        bt, by = utilization_report(events)
        at, ay = available_nodes([SimpleNamespace(start_time=local(5, 45), end_time=local(7, 30), num_nodes=1)])
        start, end = at[0], at[-1]
        assert time_average(bt, by, start, end) == pytest.approx(90 / 105)
        assert time_average(at, ay, start, end) == pytest.approx(1.0)
        assert step_at(bt, by, local(7, 5)) == 1  # 01:05 CST, the job runs
        assert step_at(bt, by, local(7, 25)) == 0
        axis, (busy, held) = align_steps((bt, by), (at, ay))
        assert [t.timestamp() for t in axis] == sorted(t.timestamp() for t in axis) and len(axis) == 4
        assert busy == [0, 1, 0, 0] and held == [1, 1, 1, 0]
        edges = _edges(start, end, 7)  # 105 minutes: 15 each
        assert [round(b.timestamp() - a.timestamp()) for a, b in zip(edges, edges[1:])] == [15 * 60] * 7
        # 00:45 CDT, 01:40 CDT, 01:10 CST, 01:30 CST (0, 55, 85, 105 real minutes) in 3 buckets of 35
        points = [local(5, 45), local(6, 40), local(7, 10), local(7, 30)]
        times, (cols,) = downsample(points, [[1, 2, 3, 4]], 3, ["max"])
        assert cols == [1, 2, 4] and times == [points[0], points[1], points[3]]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
