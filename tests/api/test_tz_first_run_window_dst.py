"""``first_runs_query`` across daylight saving changes, on a real server, the client in America/Chicago.

A BatchJob's first run is looked for from ``FIRST_RUN_LOOKBACK`` (2 minutes) before its recorded
start. The start reads back as a naive local time; ``start - 2 min`` dropped its ``fold``: a start
in the hour the fall-back repeats (01:30 CST) got a floor of 01:28 CDT, 62 minutes earlier, and a run
of another allocation in that hour was taken for its first. (A start just after the spring-forward,
03:01 CDT, gets 02:59, in the skipped hour, which Python reads as 01:59 CST: right; checked too.)
"""

from __future__ import annotations

import datetime as dt
from typing import Any

UTC = dt.timezone.utc


def _batch_job_with_runs(site: Any, start: dt.datetime, runs: list[dt.datetime]) -> Any:
    """A running BatchJob started at ``start`` (aware), submitted 3 hours before, with one job per
    entry of ``runs`` stamped RUNNING then in it, as a launcher stamps them."""
    from balsam.api import ApplicationDefinition, BatchJob, Job, Session

    app = type("Sleeper", (ApplicationDefinition,), {"site": site.name, "command_template": "sleep 1"})
    app.sync()
    bj = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=30, job_mode="serial", queue="local",
                                 project="local")
    bj.state, bj.start_time = "running", start
    bj.status_info = {"submit_time": (start - dt.timedelta(hours=3)).isoformat()}
    bj.save()
    jobs = Job.objects.bulk_create([app.submit(workdir=f"r/{bj.id}/{i}", save=False) for i in range(len(runs))])
    for job in jobs:
        job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)
    session = Session.objects.create(site_id=site.id)
    acquired = sorted(session.acquire_jobs(max_num_jobs=len(jobs), app_ids={jobs[0].app_id}), key=lambda j: j.id)
    assert len(acquired) == len(runs)
    for job, when in zip(acquired, runs):
        job.state, job.batch_job_id, job.state_timestamp = "RUNNING", bj.id, when
        job.state_data = {"num_nodes": 1}
    Job.objects.bulk_update(acquired)
    return BatchJob.objects.get(id=bj.id)


def _utc(found: dict[int, dt.datetime]) -> dict[int, dt.datetime]:
    from balsam._api.model import to_aware_utc

    return {bj_id: to_aware_utc(when) for bj_id, when in found.items()}


def test_the_first_run_window_keeps_its_two_minutes_across_daylight_saving(bare_site: Any, chicago: Any) -> None:
    from balsam.analytics import available_nodes, first_run_window, first_runs_query
    from balsam.api import EventLog

    # 01:30 CST, the hour repeated; runs at 01:40 CDT (50 minutes before: another allocation's) and
    # 01:29 CST (a minute before its recorded start: its first).
    fall_start = dt.datetime(2026, 11, 1, 7, 30, tzinfo=UTC)
    fall = _batch_job_with_runs(bare_site, fall_start, [dt.datetime(2026, 11, 1, 6, 40, tzinfo=UTC),
                                                        dt.datetime(2026, 11, 1, 7, 29, tzinfo=UTC)])
    # 03:01 CDT, a minute after the spring-forward; a run at 03:00 CDT.
    spring_start = dt.datetime(2026, 3, 8, 8, 1, tzinfo=UTC)
    spring = _batch_job_with_runs(bare_site, spring_start, [dt.datetime(2026, 3, 8, 8, 0, tzinfo=UTC)])
    assert (fall.start_time.hour, fall.start_time.minute, fall.start_time.fold) == (1, 30, 1)  # naive local

    expected = {fall.id: dt.datetime(2026, 11, 1, 7, 29, tzinfo=UTC), spring.id: dt.datetime(2026, 3, 8, 8, 0, tzinfo=UTC)}
    assert _utc(first_runs_query([fall, spring], EventLog)) == expected  # bulk: one query for both
    assert _utc(first_runs_query([fall], EventLog)) == {fall.id: expected[fall.id]}  # one BatchJob: its own query
    assert _utc(first_runs_query([spring], EventLog)) == {spring.id: expected[spring.id]}
    earliest, latest = first_run_window(None, fall.start_time)
    assert earliest.timestamp() == fall_start.timestamp() - 120 and latest == fall.start_time
    assert first_run_window(None, spring.start_time)[0].timestamp() == spring_start.timestamp() - 120

    times, nodes = available_nodes([fall], now=fall.start_time, first_runs=first_runs_query([fall], EventLog))
    assert [t.timestamp() for t in times] == [expected[fall.id].timestamp(), fall_start.timestamp()]
    assert nodes == [2, 0]
