"""``first_runs_query`` reads the first runs of all the active BatchJobs in bulk.

It was one ``GET /events/`` per active BatchJob (``batch_job_id=<id>``, first row): a per-record
call in a loop. It is now one for all of them (``batch_job_id`` takes a list) and one ``GET /jobs/``
for those events' jobs, however many BatchJobs there are, with the same answer.

Real server (SQLite and PostgreSQL); the jobs are leased by a Session and stamped RUNNING at chosen
times in the past, in their BatchJob, as a launcher stamps them. The Session names no BatchJob: one
that did would record its BatchJob's start now (sessions_logic.note_batch_job_start), after those
runs, where these tests set the recorded starts themselves.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from failure_proxy import record_requests  # tests/failure_proxy.py


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
    """One job per entry of ``minutes_ago``, of ``bj`` (see the module's docstring), RUNNING since then."""
    from balsam.api import Job, Session

    jobs = Job.objects.bulk_create([app.submit(workdir=f"s/{bj.id}/{i}", save=False) for i in range(len(minutes_ago))])
    for job in jobs:
        job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)
    session = Session.objects.create(site_id=site.id)
    acquired = sorted(session.acquire_jobs(max_num_jobs=len(jobs), app_ids={jobs[0].app_id}), key=lambda j: j.id)
    assert len(acquired) == len(jobs)
    now = dt.datetime.now()
    for job, ago in zip(acquired, minutes_ago):
        job.state, job.batch_job_id = "RUNNING", bj.id
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

    site, app = bare_site, _app(bare_site)
    utc_now = dt.datetime.now(dt.timezone.utc)
    unrecorded = _batch_job(site, "queued", status_info={"submit_time": (utc_now - dt.timedelta(minutes=10)).isoformat()})
    _run_in(site, app, unrecorded, [3, 3, 2])  # first runs 3 min ago (two at one instant), no start recorded
    late = _batch_job(site, "running", start_time=utc_now - dt.timedelta(minutes=1))
    _run_in(site, app, late, [2, 0.5])  # ran 2 min ago, start recorded 1 min ago (within FIRST_RUN_LOOKBACK): 2
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
    sent = record_requests(monkeypatch)
    found = first_runs_query(batch_jobs, EventLog)
    assert _minutes_ago(found) == {unrecorded.id: 3, late.id: 2, deleting.id: 8}
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
    # A server whose /events/ takes one batch_job_id (0.7, or 0.8.0 before the list) refuses two
    # values as this one still refuses two values of any single-valued filter (scheduler_id here).
    from balsam import analytics
    from balsam.api import EventLog

    with pytest.raises(Exception) as refused:
        list(EventLog.objects.filter(scheduler_id=[1, 2]))
    assert analytics._refuses_list(refused.value, "scheduler_id")
    assert not analytics._refuses_list(refused.value, "batch_job_id")


def _run_at(site: Any, app: Any, bj: Any, when: dt.datetime) -> None:
    """One job of ``bj`` (see the module's docstring), RUNNING since ``when``."""
    from balsam.api import Job, Session

    (job,) = Job.objects.bulk_create([app.submit(workdir=f"r/{bj.id}/{when.timestamp()}", save=False)])
    job.state = "PREPROCESSED"
    Job.objects.bulk_update([job])
    (acquired,) = Session.objects.create(site_id=site.id).acquire_jobs(max_num_jobs=1, app_ids={job.app_id})
    acquired.state, acquired.batch_job_id = "RUNNING", bj.id
    acquired.state_timestamp = when
    acquired.state_data = {"num_nodes": 1}
    Job.objects.bulk_update([acquired])


def test_a_job_run_in_an_earlier_allocation_is_not_the_first_run_of_its_batch_job(bare_site: Any) -> None:
    # rev1 finding 1: B was submitted 20 min ago while another allocation ran one of the jobs B later
    # took over (its batch_job_id now B, its earlier RUNNING with it); B started, ran jobs 2 min ago,
    # and the agent recorded its start 1 min ago. B's nodes were held from 10 min ago.
    from balsam.analytics import first_runs_query
    from balsam.api import BatchJob, EventLog

    site, app = bare_site, _app(bare_site)
    utc_now = dt.datetime.now(dt.timezone.utc)
    b = _batch_job(site, "running", start_time=utc_now - dt.timedelta(minutes=1),
                   status_info={"submit_time": (utc_now - dt.timedelta(minutes=20)).isoformat()})
    _run_in(site, app, b, [10, 2])
    other = _batch_job(site, "running", status_info={"submit_time": (utc_now - dt.timedelta(minutes=20)).isoformat()})
    _run_in(site, app, other, [5])  # a second active BatchJob: the bulk path
    batch_jobs = list(BatchJob.objects.filter(site_id=site.id))
    assert _minutes_ago(first_runs_query(batch_jobs, EventLog)) == {b.id: 2, other.id: 5}
    assert _minutes_ago(first_runs_query([bj for bj in batch_jobs if bj.id == b.id], EventLog)) == {b.id: 2}


def test_paging_through_one_instant_keeps_every_batch_jobs_first_run(bare_site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # rev2 finding 1: a page at the cursor's instant settled a BatchJob, and the next request (fewer
    # BatchJobs asked: a smaller result set) was read from the same offset, skipping b's run at T.
    from balsam import analytics
    from balsam.api import BatchJob, EventLog

    site, app = bare_site, _app(bare_site)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    instant = now - dt.timedelta(minutes=5)
    submitted = {"submit_time": (now - dt.timedelta(minutes=10)).isoformat()}
    a = _batch_job(site, "queued", status_info=submitted)
    b = _batch_job(site, "queued", status_info=submitted)
    # c was submitted after the instant: its job's run then is an earlier allocation's
    c = _batch_job(site, "queued", status_info={"submit_time": (now - dt.timedelta(minutes=1)).isoformat()})
    _run_at(site, app, c, instant)  # event ids in this order: c's, a's, b's, all at the instant
    _run_at(site, app, a, instant)
    _run_at(site, app, b, instant)
    _run_at(site, app, b, instant + dt.timedelta(minutes=2))
    bjs = list(BatchJob.objects.filter(site_id=site.id))
    per_batch_job = analytics._first_runs_each(analytics._run_windows(bjs), EventLog)
    assert set(per_batch_job) == {a.id, b.id} and len(set(per_batch_job.values())) == 1, per_batch_job
    for page in (500, 2, 1):
        monkeypatch.setattr(analytics, "FIRST_RUNS_PAGE", page)
        assert analytics.first_runs_query(bjs, EventLog) == per_batch_job, page


def test_more_batch_jobs_than_a_list_filter_takes_are_paged_per_group(bare_site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # rev2 finding 6: beyond the client's list-filter chunk (500 ids, 2 here) the client split the
    # batch_job_id list and read each part whole: every page read every matching event.
    from balsam import analytics
    from balsam._api.query import Query
    from balsam.api import BatchJob, EventLog
    from balsam.client import RESTClient

    site, app = bare_site, _app(bare_site)
    utc_now = dt.datetime.now(dt.timezone.utc)
    submitted = {"submit_time": (utc_now - dt.timedelta(minutes=100)).isoformat()}
    waiting = _batch_job(site, "queued", status_info=submitted)  # no start recorded, never ran: reads on
    for _ in range(2):
        bj = _batch_job(site, "running", start_time=utc_now - dt.timedelta(minutes=90), status_info=submitted)
        _run_in(site, app, bj, [80 - i * 0.5 for i in range(30)])  # 30 runs each, after its start
    late = _batch_job(site, "queued", status_info=submitted)
    _run_in(site, app, late, [85])
    bjs = list(BatchJob.objects.filter(site_id=site.id))
    monkeypatch.setattr(analytics, "FIRST_RUNS_PAGE", 5)
    expected = analytics._first_runs_each(analytics._run_windows(bjs), EventLog)
    assert list(expected) == [late.id] and waiting.id not in expected
    rows: list[int] = []
    real = RESTClient.request_with_headers

    def counting(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        data, headers = real(self, method, path, **kwargs)
        if path == "/events/":
            rows.append(len(data["results"]))
        return data, headers

    monkeypatch.setattr(RESTClient, "request_with_headers", counting)
    monkeypatch.setattr(Query, "filter_chunk_size", 2)
    assert analytics.first_runs_query(bjs, EventLog) == expected
    # Each request reads a page at most (61 RUNNING events match; it read them all, page after page).
    assert rows and max(rows) <= 5 and sum(rows) < 61, rows


def test_a_server_refusing_a_list_of_batch_job_ids_is_asked_per_batch_job(
        monkeypatch: pytest.MonkeyPatch, register: Any, serve_in_process: Any, tmp_path: Path) -> None:
    """rev2 finding 7c: the fallback itself, against this server run in this process with its
    /events/ parsing ``batch_job_id`` as one integer, as 0.7's and 0.8.0's before the list did."""
    from balsam import analytics
    from balsam._api.model import set_default_client
    from balsam.api import BatchJob, EventLog, Site
    from balsam.client import RESTClient
    from balsam.server.app import create_app
    from balsam.server.routes import events
    from balsam.server.settings import ServerSettings

    real_select = events.events_select

    def one_batch_job_id(user_id: int, q: Any, dialect: str) -> Any:
        q.int("batch_job_id")  # the older servers' parse: two values are refused (422, loc batch_job_id)
        return real_select(user_id, q, dialect)

    monkeypatch.setattr(events, "events_select", one_batch_job_id)
    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=f"sqlite:///{tmp_path / 'older.db'}", registration="open",
                                secret_key="first-runs-older-server-0123456789-abcdefghij"),
        create_tables_now=True))
    *_, token, _expiry = register(url)
    set_default_client(RESTClient(url, token=token))
    (tmp_path / "older-site").mkdir()
    site = Site.objects.create(name="older-site", path=str(tmp_path / "older-site"))
    app = _app(site)
    utc_now = dt.datetime.now(dt.timezone.utc)
    submitted = {"submit_time": (utc_now - dt.timedelta(minutes=30)).isoformat()}
    first = _batch_job(site, "queued", status_info=submitted)
    _run_in(site, app, first, [3, 2])
    second = _batch_job(site, "running", start_time=utc_now - dt.timedelta(minutes=1), status_info=submitted)
    _run_in(site, app, second, [1.5, 0.5])
    bjs = list(BatchJob.objects.filter(site_id=site.id))
    sent: list[Any] = []
    real = RESTClient.request_with_headers

    def recording(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        if path == "/events/":
            sent.append((kwargs.get("params") or {}).get("batch_job_id"))
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "request_with_headers", recording)
    found = analytics.first_runs_query(bjs, EventLog)
    assert _minutes_ago(found) == {first.id: 3, second.id: 2}
    # The list once (refused), then one request per BatchJob.
    assert len(sent) == 3 and sent[1:] == [first.id, second.id], sent


@pytest.fixture
def chicago_time(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The process's local zone America/Chicago (UTC-6 in March) for one test."""
    import time

    monkeypatch.setenv("TZ", "America/Chicago")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_submit_time_without_a_zone_is_utc_as_in_the_dashboard(bare_site: Any, chicago_time: Any) -> None:
    # rev6 finding 5: status_info is client-writable; a submit_time written without a zone was read
    # as local time by the Python API (6 h later here: no run counted) and as UTC by the dashboard.
    from balsam.analytics import first_runs_query
    from balsam.api import BatchJob, EventLog

    site, app = bare_site, _app(bare_site)
    naive_utc = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=20)).replace(tzinfo=None)
    b = _batch_job(site, "running", status_info={"submit_time": naive_utc.isoformat()})
    _run_in(site, app, b, [10, 2])
    other = _batch_job(site, "queued", status_info={"submit_time": naive_utc.isoformat()})
    _run_in(site, app, other, [5])
    batch_jobs = list(BatchJob.objects.filter(site_id=site.id))
    assert _minutes_ago(first_runs_query(batch_jobs, EventLog)) == {b.id: 10, other.id: 5}
    assert _minutes_ago(first_runs_query([bj for bj in batch_jobs if bj.id == b.id], EventLog)) == {b.id: 10}


def test_one_submit_time_parser_for_the_api_and_the_dashboard(chicago_time: Any) -> None:
    from balsam.analytics import submit_time
    from balsam.server.dashboard import plots

    assert plots.submit_time is submit_time
    assert submit_time({"submit_time": "2025-03-01T12:00:00"}) == dt.datetime(2025, 3, 1, 12, tzinfo=dt.timezone.utc)
    assert submit_time({"submit_time": "2025-03-01T12:00:00-06:00"}) == dt.datetime(2025, 3, 1, 18, tzinfo=dt.timezone.utc)
    assert submit_time({"submit_time": "soon"}) is None and submit_time(None) is None and submit_time("x") is None
