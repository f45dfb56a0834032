"""Two things a README walk-through met on a running campaign.

1. ``balsam analytics utilization`` read ``Busy 0.2`` against ``Nodes held 0.0``: the agent records a
   BatchJob's start_time when its next status poll sees it running, while its launcher may have run
   jobs for seconds already (and none at all while the API still says queued). An allocation holds
   its nodes from its first job's start at the latest.
2. A BatchJob the agent refused (``BatchJob.objects.create(queue="nope")`` from Python, accepted as
   in 0.7) was visible only in ``queue ls --history``: plain ``queue ls`` said "No active batch jobs".
   It now names the recent submit failures with their reason (on stderr: stdout stays 0.7's).
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest
from cli_test_utils import balsam, fresh_api_state, make_marked_site, record_requests  # noqa: F401

NOW = dt.datetime(2026, 3, 1, 12)


@pytest.fixture
def site(balsam_env, tmp_path):
    return make_marked_site(tmp_path, "ux-site")


def _run_in(site, batch_job, *, minutes_ago: float, count: int = 2):
    """``count`` one-node jobs RUNNING in ``batch_job``'s launcher since ``minutes_ago`` (stamped as
    a launcher stamps them, with its own state_timestamp)."""
    from balsam.api import ApplicationDefinition, Job, Session

    class Sleeper(ApplicationDefinition):
        site = "ux-site"
        command_template = "sleep 1"

    Sleeper.sync()
    jobs = Job.objects.bulk_create([Sleeper.submit(workdir=f"s/{batch_job.id}/{i}", save=False) for i in range(count)])
    Job.objects.bulk_refresh(jobs)
    for job in jobs:
        job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)
    session = Session.objects.create(site_id=site.id, batch_job_id=batch_job.id)
    acquired = session.acquire_jobs(max_num_jobs=count, app_ids={jobs[0].app_id})
    assert len(acquired) == count
    started = dt.datetime.now() - dt.timedelta(minutes=minutes_ago)
    for job in acquired:
        job.state = "RUNNING"
        job.state_timestamp = started
        job.state_data = {"num_nodes": 1}
    Job.objects.bulk_update(acquired)
    assert {j.batch_job_id for j in Job.objects.filter(id=[j.id for j in jobs])} == {batch_job.id}
    return started


def _batch_job(site, **fields):
    from balsam.api import BatchJob

    bj = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=30, job_mode="serial", queue="local",
                                 project="local")
    for name, value in fields.items():
        setattr(bj, name, value)
    bj.save()
    return bj


def _table_rows(text: str) -> list[tuple[float, float]]:
    """(busy, held) of each row of the utilization table."""
    rows = []
    for line in text.splitlines()[1:]:
        if line.startswith("Peak"):
            break
        parts = line.split()
        rows.append((float(parts[2]), float(parts[3])))
    return rows


def test_a_batch_job_still_queued_in_the_api_holds_the_nodes_its_jobs_run_on(site):
    """The agent has not polled since the launcher started: state queued, no start_time."""
    bj = _batch_job(site, state="queued", scheduler_id=101)
    _run_in(site, bj, minutes_ago=2)

    out = balsam("analytics", "utilization", "--site", "ux-site", "--rows", "4")
    assert out.exit_code == 0, out.output
    rows = _table_rows(out.stdout)
    assert rows and all(busy <= held for busy, held in rows), out.stdout
    assert rows[0] == (2.0, 2.0), out.stdout


def test_a_running_batch_job_whose_start_was_recorded_late_holds_from_its_first_job(site):
    """The agent's poll stamped start_time a minute after the launcher's first job started."""
    bj = _batch_job(site, state="queued", scheduler_id=102)
    started = _run_in(site, bj, minutes_ago=3)
    bj.state = "running"
    bj.start_time = started + dt.timedelta(minutes=1)
    bj.save()

    out = balsam("analytics", "utilization", "--site", "ux-site", "--rows", "6")
    assert out.exit_code == 0, out.output
    rows = _table_rows(out.stdout)
    assert rows and all(busy <= held for busy, held in rows), out.stdout

    from balsam.analytics import available_nodes, first_runs_query  # after the CLI: it failed first
    from balsam.api import BatchJob, EventLog

    batch_jobs = list(BatchJob.objects.filter(site_id=site.id))
    times, held = available_nodes(batch_jobs, first_runs=first_runs_query(batch_jobs, EventLog))
    assert held[0] == 2 and abs((times[0] - started).total_seconds()) < 1
    assert held[-1] == 0  # still running: held until now


def test_first_runs_is_one_query_per_active_batch_job_only(site, monkeypatch):
    from balsam.analytics import first_runs_query
    from balsam.api import BatchJob, EventLog

    active = _batch_job(site, state="queued", scheduler_id=103)
    started = _run_in(site, active, minutes_ago=1)
    _batch_job(site, state="submit_failed", status_info={"error": "refused"})
    sent = record_requests(monkeypatch)
    found = first_runs_query(list(BatchJob.objects.filter(site_id=site.id)), EventLog)
    assert list(found) == [active.id] and abs((found[active.id] - started).total_seconds()) < 1
    assert [path for _method, path in sent].count("/events/") == 1


def test_available_nodes_holds_from_the_first_run_when_earlier_only():
    from balsam.analytics import available_nodes

    late = SimpleNamespace(id=1, num_nodes=4, start_time=NOW, end_time=NOW + dt.timedelta(minutes=10))
    unrecorded = SimpleNamespace(id=2, num_nodes=1, start_time=None, end_time=None)
    never_ran = SimpleNamespace(id=3, num_nodes=8, start_time=None, end_time=None)
    first_runs = {1: NOW - dt.timedelta(minutes=1), 2: NOW + dt.timedelta(minutes=2)}
    times, held = available_nodes([late, unrecorded, never_ran], now=NOW + dt.timedelta(minutes=20),
                                  first_runs=first_runs)
    assert held == [4, 5, 1, 0]
    assert [(t - NOW).total_seconds() / 60 for t in times] == [-1, 2, 10, 20]
    # A first run after the recorded start changes nothing (the start is the earlier of the two).
    assert available_nodes([late], first_runs={1: NOW + dt.timedelta(minutes=5)})[0][0] == NOW


def _refused(site, queue: str, hours_ago: float):
    from balsam.api import BatchJob

    bj = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="serial", queue=queue,
                                 project="local")
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)
    bj.state = "submit_failed"  # as the agent marks a refused one
    bj.status_info = {"error": f"refused: queue '{queue}' is not in the site's allowed_queues (local)",
                      "error_time": when.isoformat()}
    bj.save()
    return bj


def test_queue_ls_names_a_batch_job_that_failed_to_submit(site, monkeypatch):
    recent = _refused(site, "nope", hours_ago=1)
    also = _refused(site, "nada", hours_ago=2)
    old = _refused(site, "ancient", hours_ago=72)
    sent = record_requests(monkeypatch)

    out = balsam("queue", "ls", "--site", "ux-site")
    assert out.exit_code == 0, out.output
    assert out.stdout == "No active batch jobs.  Use --history option to list completed batch jobs.\n"
    lines = out.stderr.splitlines()
    assert len(lines) == 3 and "--history" in lines[0], out.stderr
    assert lines[1].startswith(f"  BatchJob {also.id} (site ux-site, queue nada")  # oldest failure first
    assert lines[2] == (f"  BatchJob {recent.id} (site ux-site, queue nope, project local, 1 node): refused: queue "
                        "'nope' is not in the site's allowed_queues (local)")
    assert f"BatchJob {old.id} " not in out.stderr
    # The failures are one query, however many there are (not one per BatchJob).
    assert [path for method, path in sent if method == "GET"].count("/batch-jobs/") == 2


def test_queue_ls_shows_failures_below_the_active_table_and_leaves_json_and_history_alone(site):
    active = _batch_job(site, state="queued", scheduler_id=104)
    refused = _refused(site, "nope", hours_ago=0)

    out = balsam("queue", "ls", "--site", "ux-site")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[0].split()[0] == "id" and str(active.id) in out.stdout.splitlines()[1]
    assert "nope" not in out.stdout
    assert f"BatchJob {refused.id} (site ux-site, queue nope" in out.stderr

    for args in (("--history",), ("--json",), ("--scheduler-id", "104")):
        other = balsam("queue", "ls", "--site", "ux-site", *args)
        assert other.exit_code == 0 and other.stderr == "", (args, other.output)


def test_first_runs_leave_out_a_rerun_job_s_run_in_an_earlier_allocation(site):
    """A job's batch_job_id is its last BatchJob: its RUNNING of an earlier allocation, before this
    one was submitted, is not this one's first run."""
    from balsam.analytics import first_runs_query
    from balsam.api import BatchJob, EventLog

    submitted = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    bj = _batch_job(site, state="queued", scheduler_id=105, status_info={"submit_time": submitted.isoformat()})
    _run_in(site, bj, minutes_ago=5)  # stamped before the submission: an earlier allocation's run
    assert first_runs_query(list(BatchJob.objects.filter(site_id=site.id)), EventLog) == {}
