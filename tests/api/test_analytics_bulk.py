"""``first_runs_query`` reads the first runs of all the active BatchJobs in bulk.

It was one ``GET /events/`` per active BatchJob (``batch_job_id=<id>``, first row): a per-record
call in a loop. It is now one for all of them (``batch_job_id`` takes a list) and one ``GET /jobs/``
for those events' jobs, however many BatchJobs there are, with the same answer.

Real server (SQLite and PostgreSQL); the jobs are leased by each BatchJob's Session and stamped
RUNNING at chosen times, as a launcher stamps them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest


def _app(site: Any) -> Any:
    from balsam.api import ApplicationDefinition

    site_name = site.name

    class Sleeper(ApplicationDefinition):
        site = site_name
        command_template = "sleep 1"

    Sleeper.sync()
    return Sleeper


def _batch_job(site: Any, state: str, **fields: Any) -> Any:
    from balsam.api import BatchJob

    bj = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=30, job_mode="serial", queue="local",
                                 project="local")
    bj.state = state
    for name, value in fields.items():
        setattr(bj, name, value)
    bj.save()
    return bj


def _run_in(site: Any, app: Any, bj: Any, minutes_ago: list[float]) -> None:
    """One job per entry of ``minutes_ago``, leased by ``bj``'s Session, RUNNING since then."""
    from balsam.api import Job, Session

    jobs = Job.objects.bulk_create([app.submit(workdir=f"s/{bj.id}/{i}", save=False) for i in range(len(minutes_ago))])
    for job in jobs:
        job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)
    session = Session.objects.create(site_id=site.id, batch_job_id=bj.id)
    acquired = sorted(session.acquire_jobs(max_num_jobs=len(jobs), app_ids={jobs[0].app_id}), key=lambda j: j.id)
    assert len(acquired) == len(jobs)
    now = dt.datetime.now()
    for job, ago in zip(acquired, minutes_ago):
        job.state = "RUNNING"
        job.state_timestamp = now - dt.timedelta(minutes=ago)
        job.state_data = {"num_nodes": 1}
    Job.objects.bulk_update(acquired)


def _minutes_ago(found: dict[int, dt.datetime]) -> dict[int, int]:
    now = dt.datetime.now()
    return {bj_id: round((now - when).total_seconds() / 60) for bj_id, when in found.items()}


def test_first_runs_of_several_batch_jobs_are_one_events_query(bare_site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam import analytics
    from balsam.analytics import available_nodes, first_runs_query
    from balsam.api import BatchJob, EventLog
    from balsam.client import RESTClient

    site, app = bare_site, _app(bare_site)
    utc_now = dt.datetime.now(dt.timezone.utc)
    unrecorded = _batch_job(site, "queued", status_info={"submit_time": (utc_now - dt.timedelta(minutes=10)).isoformat()})
    _run_in(site, app, unrecorded, [3, 3, 2])  # first runs 3 min ago (two at one instant), no start recorded
    late = _batch_job(site, "running", start_time=utc_now - dt.timedelta(minutes=1))
    _run_in(site, app, late, [4, 2])  # ran 4 min ago, start recorded 1 min ago: 4
    on_time = _batch_job(site, "running", start_time=utc_now - dt.timedelta(minutes=5))
    _run_in(site, app, on_time, [2])  # ran after its recorded start: not listed
    rerun = _batch_job(site, "queued", status_info={"submit_time": (utc_now - dt.timedelta(minutes=1)).isoformat()})
    _run_in(site, app, rerun, [5])  # before it was submitted: an earlier allocation's run
    ended = _batch_job(site, "queued")
    _run_in(site, app, ended, [6])
    ended.state = "finished"
    ended.end_time = utc_now
    ended.save()  # not active: not looked at
    _batch_job(site, "queued")  # nothing ran yet
    deleting = _batch_job(site, "pending_deletion",
                          status_info={"submit_time": (utc_now - dt.timedelta(minutes=20)).isoformat()})
    _run_in(site, app, deleting, [7, 8])

    batch_jobs = list(BatchJob.objects.filter(site_id=site.id))
    assert len(batch_jobs) == 7
    sent: list[tuple[str, str]] = []
    real = RESTClient._send

    def counting(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        sent.append((method, path))
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "_send", counting)
    found = first_runs_query(batch_jobs, EventLog)
    assert _minutes_ago(found) == {unrecorded.id: 3, late.id: 4, deleting.id: 8}
    assert list(found) == [bj.id for bj in batch_jobs if bj.id in found]  # in the BatchJobs' order, as before
    many = list(sent)
    sent.clear()
    few = first_runs_query([bj for bj in batch_jobs if bj.id in (unrecorded.id, late.id)], EventLog)
    assert few == {unrecorded.id: found[unrecorded.id], late.id: found[late.id]}
    # The same requests for 2 active BatchJobs as for 6: one for the events, one for their jobs.
    assert many.count(("GET", "/events/")) == 1 and sent.count(("GET", "/events/")) == 1, (many, sent)
    assert len(many) == len(sent) == 2, (many, sent)
    # Read a page at a time (a page of one event here: through the instant two events share, past
    # the recorded starts): the same answer.
    monkeypatch.setattr(analytics, "FIRST_RUNS_PAGE", 1)
    assert first_runs_query(batch_jobs, EventLog) == found
    # What the CLI draws from it: held from the first runs (8 and 4 min ago) where earlier.
    times, held = available_nodes(batch_jobs, first_runs=found)
    assert held[0] == 2 and round((dt.datetime.now() - times[0]).total_seconds() / 60) == 8


def test_a_server_taking_one_batch_job_id_is_told_by_its_refusal(bare_site: Any) -> None:
    # A server before December 2026 refuses two batch_job_id values as it still refuses two values of
    # any single-valued filter (scheduler_id here, on this server): first_runs_query then asks per BatchJob.
    from balsam import analytics
    from balsam.api import EventLog

    with pytest.raises(Exception) as refused:
        list(EventLog.objects.filter(scheduler_id=[1, 2]))
    assert analytics._refuses_list(refused.value, "scheduler_id")
    assert not analytics._refuses_list(refused.value, "batch_job_id")
