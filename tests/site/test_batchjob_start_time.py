"""BatchJob.start_time is the scheduler's own start time of the job, not the agent's sighting.

The scheduler module set ``start_time`` to "now" at the status poll that first showed the job
running: up to one ``sync_period`` late, though Slurm, PBS and the local scheduler report when the
job started. It now takes the poll's ``StatusPoll.start_times``; a start more than
``START_TIME_SKEW_SEC`` past the agent's clock or before the BatchJob's submission is not taken
(garbage, or a clock far off: logged, the first of each kind at INFO), nor is one without a time
zone (a driver's ``datetime.fromtimestamp()`` is local time: read as UTC it was hours off, unseen),
and a start a little past the agent's clock is the sighting (the job was seen running then).

A BatchJob whose submission is recorded after the fact (an interrupted or timed-out submit command
whose job was found, an id that reached only the ``.scheduler_id`` marker) gets its marker's time
as ``submit_time``, not the time of the recording: its job may have run for long already, and its
true start was not taken ("before its submission").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.models import SchedulerJobStatus
from balsam.scheduler import JobHistory, SchedulerError, SubmitRequest
from balsam.serialization import parse_datetime
from balsam.site.modules.scheduler import START_TIME_SKEW_SEC, SchedulerModule
from balsam.states import BatchJobState
from site_test_utils import InMemoryScheduler, batch_job, create_batch_job

R, Q = BatchJobState.running, BatchJobState.queued


@pytest.fixture
def setup(make_site, client):
    site = make_site(overrides={"scheduler": {"sync_period": 5}})
    fake = InMemoryScheduler()
    return site, fake, SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _submitted(client, site, module, count: int = 1) -> list[dict]:
    ids = [create_batch_job(client, site.site_id, "serial")["id"] for _ in range(count)]
    module.run_cycle()
    records = [batch_job(client, i) for i in ids]
    assert all(r["state"] == "queued" and r["scheduler_id"] for r in records), records
    return records


def _start(client, record: dict) -> Optional[dt.datetime]:
    text = batch_job(client, record["id"])["start_time"]
    return parse_datetime(text).replace(tzinfo=dt.timezone.utc) if text else None


def _running_cycle(module) -> tuple[dt.datetime, dt.datetime]:
    before = _utcnow()
    module.run_cycle()
    return before, _utcnow()


def test_start_time_is_the_schedulers_own(setup, client):
    site, fake, module = setup
    (record,) = _submitted(client, site, module)
    started = _utcnow() - dt.timedelta(seconds=4)  # a sync_period before the poll that sees it
    fake.run_job(record["scheduler_id"], started)
    before, _ = _running_cycle(module)
    assert batch_job(client, record["id"])["state"] == "running"
    assert _start(client, record) == started, f"the poll's time ({before}), not the scheduler's start"


def test_the_schedulers_start_wins_over_a_start_recorded_from_the_launchers_session(setup, client):
    """The launcher opened its Session before the poll that sees the job running: the server
    recorded its start then (its first Session's time), and the agent's copy has a start. The
    scheduler's own start is earlier and exact: it is still sent, and kept."""
    site, fake, module = setup
    (record,) = _submitted(client, site, module)
    started = _utcnow() - dt.timedelta(seconds=4)
    fake.run_job(record["scheduler_id"], started)
    client.post("/sessions/", json={"site_id": site.site_id, "batch_job_id": record["id"]})
    recorded = _start(client, record)
    assert recorded is not None and recorded > started  # the Session's time
    _running_cycle(module)
    assert _start(client, record) == started


def test_no_start_time_from_the_scheduler_is_the_sighting(setup, client):
    site, fake, module = setup
    (record,) = _submitted(client, site, module)
    fake.run_job(record["scheduler_id"])
    before, after = _running_cycle(module)
    assert before <= _start(client, record) <= after


def test_a_start_a_little_past_the_agents_clock_is_the_sighting(setup, client, caplog):
    """The scheduler's clock a few seconds ahead: the job was seen running at the poll, so it
    started no later than that (by the agent's clock)."""
    site, fake, module = setup
    (record,) = _submitted(client, site, module)
    fake.run_job(record["scheduler_id"], _utcnow() + dt.timedelta(seconds=START_TIME_SKEW_SEC // 2))
    with caplog.at_level(logging.DEBUG, logger="balsam"):
        before, after = _running_cycle(module)
    assert before <= _start(client, record) <= after
    assert "not taken" not in caplog.text


@pytest.mark.parametrize("kind", ["future", "before submission", "not a time", "no time zone"])
def test_a_start_far_off_is_not_taken_and_logged_once_at_info(setup, client, caplog, kind):
    site, fake, module = setup
    records = _submitted(client, site, module, count=2)
    for record in records:
        submitted = parse_datetime(record["status_info"]["submit_time"])
        start = {"future": _utcnow() + dt.timedelta(hours=1),
                 "before submission": submitted - dt.timedelta(seconds=START_TIME_SKEW_SEC + 60),
                 "not a time": "yesterday",
                 # a true start, but naive: taken as UTC it is off by the agent's UTC offset
                 "no time zone": (_utcnow() - dt.timedelta(seconds=2)).replace(tzinfo=None)}[kind]
        fake.run_job(record["scheduler_id"], start)
    with caplog.at_level(logging.DEBUG, logger="balsam"):
        before, after = _running_cycle(module)
    for record in records:
        assert batch_job(client, record["id"])["state"] == "running"
        assert before <= _start(client, record) <= after
    ignored = [r for r in caplog.records if "is not taken" in r.getMessage()]
    # the first at INFO, the second (same kind) at DEBUG: a clock far off is not a line per BatchJob
    assert [r.levelno for r in ignored] == [logging.INFO, logging.DEBUG], [r.getMessage() for r in ignored]
    assert f"job {records[0]['scheduler_id']}" in ignored[0].getMessage()


def test_a_start_a_little_before_the_recorded_submission_is_taken(setup, client):
    """submit_time is written after the submit command returned, and the scheduler's clock may be
    a little behind: a start up to START_TIME_SKEW_SEC before it is the scheduler's word."""
    site, fake, module = setup
    (record,) = _submitted(client, site, module)
    started = parse_datetime(record["status_info"]["submit_time"]) - dt.timedelta(seconds=START_TIME_SKEW_SEC - 30)
    fake.run_job(record["scheduler_id"], started)
    _running_cycle(module)
    assert _start(client, record) == started


def test_a_requeued_job_keeps_its_first_start(setup, client):
    site, fake, module = setup
    (record,) = _submitted(client, site, module)
    sid = record["scheduler_id"]
    first = _utcnow() - dt.timedelta(seconds=30)
    fake.run_job(sid, first)
    module.run_cycle()
    fake.queue[sid] = attrs.evolve(fake.queue[sid], state=Q)  # requeued
    fake.starts.pop(sid)
    module.run_cycle()
    assert batch_job(client, record["id"])["state"] == "queued"
    fake.run_job(sid, _utcnow())
    module.run_cycle()
    assert batch_job(client, record["id"])["state"] == "running" and _start(client, record) == first


def test_a_job_seen_running_only_in_its_history_after_its_launchers_session_gets_the_schedulers_start(
        setup, client):
    """The server recorded the launcher's first Session while the BatchJob was queued; the poll then
    misses the job (a cut qstat, Cobalt's .cobaltlog) and its history says it runs. That stored start
    is not a requeued job's first start: the history's exact, earlier start is sent and kept, and no
    last_start_time is written (before: it went to status_info as if the job had been requeued).
    A history start later than the Session's (the scheduler's clock behind) changes nothing."""
    site, fake, module = setup
    records = _submitted(client, site, module, count=2)
    started = _utcnow()  # the scheduler started both right after their submission
    for record in records:
        client.post("/sessions/", json={"site_id": site.site_id, "batch_job_id": record["id"]})
    early, late = records
    session_start = _start(client, late)
    assert session_start is not None and session_start > started
    histories = {early["scheduler_id"]: started, late["scheduler_id"]: session_start + dt.timedelta(seconds=5)}
    for sid in histories:
        del fake.queue[sid]
    fake.get_histories = lambda jobs, last_poll=None: {
        sid: JobHistory(scheduler_id=sid, state=R, start_time=histories[sid]) for sid in jobs}
    module.run_cycle()
    for record in records:
        after = batch_job(client, record["id"])
        assert after["state"] == "running"
        assert "last_start_time" not in after["status_info"], after["status_info"]
    assert _start(client, early) == started
    assert _start(client, late) == session_start


def test_real_local_scheduler_start_is_its_queues_record(make_site, client, tmp_path):
    """The real local scheduler (its queue command run each poll): the BatchJob's start is the
    queue's record of the job's start, not the time of the poll that saw it running."""
    site = make_site(overrides={"scheduler": {"sync_period": 5}})
    Path(site.job_template_path).write_text("#!/bin/bash\nexec sleep 60\n")
    local = LocalScheduler(state_dir=tmp_path / "local-scheduler")
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=local)
    (record,) = _submitted(client, site, module)
    try:
        before, _ = _running_cycle(module)
        assert batch_job(client, record["id"])["state"] == "running"
        jobs = json.loads((tmp_path / "local-scheduler" / "jobs.json").read_text())["jobs"]
        queue_start = dt.datetime.fromtimestamp(jobs[str(record["scheduler_id"])]["start_time"], dt.timezone.utc)
        assert queue_start < before
        assert abs(_start(client, record) - queue_start) < dt.timedelta(milliseconds=1), \
            f"start_time {_start(client, record)}, the queue's start {queue_start}, the poll at {before}"
    finally:
        local.delete_job(record["scheduler_id"])


# -- a submission recorded after the fact -------------------------------------------------------------


class FindingScheduler(InMemoryScheduler):
    """Looks an earlier submission up by name: the job whose id ``found`` holds."""

    found: Optional[int] = None

    def find_submitted(self, request: SubmitRequest) -> Optional[list[int]]:
        return [self.found] if self.found in self.queue else []


def _running_since(fake: InMemoryScheduler, scheduler_id: int, minutes: float) -> dt.datetime:
    started = _utcnow() - dt.timedelta(minutes=minutes)
    fake.queue[scheduler_id] = SchedulerJobStatus(
        scheduler_id=scheduler_id, state=R, queue="local", num_nodes=1, wall_time_min=60, project="local",
        time_remaining_min=30, queued_time_min=0)
    fake.starts[scheduler_id] = started
    return started


def _with_token(client, record: dict) -> str:
    """The submit token the earlier agent stored before its submit command (its markers hold it)."""
    token = "feedfacefeedface"
    client.patch("/batch-jobs/", json=[{"id": record["id"], "status_info": {"submit_token": token}}])
    return token


@pytest.mark.parametrize("marker", [".scheduler_id", ".submitting"])
def test_a_job_recorded_late_gets_its_submission_time_and_the_schedulers_start(make_site, client, caplog, marker):
    """The earlier agent submitted 31 minutes ago and stopped before the API heard of it: the id
    only in the ``.scheduler_id`` marker (an API outage), or the submit command interrupted (its
    ``.submitting`` marker, the job found by name). The job has run for 30 minutes."""
    site = make_site(overrides={"scheduler": {"sync_period": 5}})
    fake = FindingScheduler()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    record = create_batch_job(client, site.site_id, "serial")
    token = _with_token(client, record)
    script = module.script_path(record["id"])
    script.parent.mkdir(parents=True, exist_ok=True)
    submitted = _utcnow() - dt.timedelta(minutes=31)
    if marker == ".scheduler_id":  # its time is the file's: written as the submit command returned
        path = script.with_name(script.name + marker)
        path.write_text(f"777 {token}\n")
        os.utime(path, (submitted.timestamp(), submitted.timestamp()))
    else:  # written, with the time, just before the submit command ran
        script.with_name(script.name + marker).write_text(f"{submitted.isoformat()} {token}\n")
        fake.found = 777
    started = _running_since(fake, 777, minutes=30)
    with caplog.at_level(logging.INFO, logger="balsam"):
        for _ in range(2):  # recorded as queued; then seen running
            module.run_cycle()
    record = batch_job(client, record["id"])
    assert record["scheduler_id"] == 777 and record["state"] == "running"
    assert abs(parse_datetime(record["status_info"]["submit_time"]) - submitted) < dt.timedelta(milliseconds=1)
    assert _start(client, record) == started, caplog.text
    assert "not taken" not in caplog.text


def test_a_timed_out_submission_found_afterwards_is_submitted_when_its_command_started(make_site, client):
    """The submit command timed out, and the job it queued is found by name: submit_time is when
    the command was started (its ``.submitting`` marker's time; a command that hung for minutes
    while its job started made the start look "before its submission"), not when it was found."""

    class TimingOut(FindingScheduler):
        status_error_threshold = 1  # the first failed try is the last: looked up at once

        def submit(self, request: SubmitRequest) -> int:
            pending = Path(str(request.script_path) + ".submitting")
            self.command_started = pending.read_text().split()[0]
            self.found = super().submit(request)
            raise SchedulerError("sbatch: Socket timed out on send/recv operation", permanent=False)

    site = make_site(overrides={"scheduler": {"sync_period": 5}})
    fake = TimingOut()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    record = create_batch_job(client, site.site_id, "serial")
    module.run_cycle()
    record = batch_job(client, record["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == fake.found
    assert record["status_info"]["submit_time"] == fake.command_started
