"""Edges of "the history says the job is still active" and of the queue-limit hold, found by the
review of the change that added them:

- sacct behind a busy slurmdbd still says RUNNING after squeue listed the job COMPLETED: the poll's
  final record must win (it kept the BatchJob running, and its launcher credential renewed, for up
  to its whole wall time);
- a history stuck in a queued state (PBS M for a job moved to another server; a Slurm runaway job)
  has no start to bound it: it is bounded from when the poll first missed the job;
- a PBS job requeued to Q keeps its earlier run's stime, which is not its start;
- a job refused "at a queue limit" while none of the user's jobs is in that queue exceeds the
  limit alone: after a few such refusals it is submit_failed, instead of holding the queue for ever.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import balsam.site.modules.scheduler as scheduler_module
from balsam.scheduler import CommandResult
from balsam.site.modules.scheduler import ACTIVE_RECORD_GRACE_MIN, SchedulerModule
from balsam.states import BatchJobState
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler
from site_test_utils import batch_job, create_batch_job

DATA = Path(__file__).resolve().parents[1] / "schedulers" / "data"
QUEUES = {"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}}
EMPTY = CommandResult(("cmd",), 0, "", "")


def make_module(make_site, client, scheduler, projects: list, **settings):
    site = make_site(overrides={"scheduler": {"allowed_queues": QUEUES, "allowed_projects": projects, **settings}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    return site, SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)


def active_batch_job(client, site_id: int, scheduler_id: int, state: str, project: str) -> int:
    bj = create_batch_job(client, site_id, project=project, queue="debug", wall_time_min=30)["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": scheduler_id}])
    if state == "running":
        client.patch("/batch-jobs/", json=[{"id": bj, "state": "running"}])
    return bj


def test_squeues_final_record_beats_a_sacct_still_saying_running(make_site, client) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    start, end = (now - dt.timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M:%S"), now.strftime("%Y-%m-%dT%H:%M:%S")
    squeue = CommandResult(("squeue",), 0, f"19|COMPLETED|debug|1|30:00|root|0:00|{start}|{start}|{end}|None\n", "")
    sacct = CommandResult(("sacct",), 0, f"19|RUNNING|{start}|{start}|Unknown|0:0|None\n", "")
    site, module = make_module(make_site, client, SlurmScheduler(ReplayRunner({"squeue": squeue, "sacct": sacct,
                                                                                "sinfo": EMPTY}), user="root"), ["root"])
    bj = active_batch_job(client, site.site_id, 19, "running", "root")
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished" and record["status_info"]["scheduler_state"] == "COMPLETED"


def test_a_history_stuck_queued_is_bounded_from_when_the_poll_first_missed_it(make_site, client, monkeypatch) -> None:
    moved = {"Jobs": {"1196300.polaris-pbs-01": {"Job_Name": "qlaunch1", "Job_Owner": "alice@login", "job_state": "M",
                                                  "queue": "debug"}}}
    runner = ReplayRunner({"qstat": lambda c: CommandResult(tuple(c.args), 0, json.dumps(moved) if "-x" in c.args
                                                            else '{"Jobs": {}}', ""),
                           "pbsnodes": CommandResult(("pbsnodes",), 0, '{"nodes": {}}', "")})
    site, module = make_module(make_site, client, PBSScheduler(runner, user="alice"), ["proj"])
    bj = active_batch_job(client, site.site_id, 1196300, "queued", "proj")
    clock = [dt.datetime.now(dt.timezone.utc)]
    monkeypatch.setattr(scheduler_module, "utcnow", lambda: clock[0])
    for _ in range(4):
        module.run_cycle()
    assert batch_job(client, bj)["state"] == "queued"  # missed, but its history says queued
    clock[0] += dt.timedelta(minutes=30 + ACTIVE_RECORD_GRACE_MIN + 1)
    for _ in range(4):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed"
    assert record["status_info"]["error"] == "scheduler job 1196300 left the queue and has no history record"


def test_a_requeued_pbs_jobs_old_stime_is_not_its_start() -> None:
    old = "Tue Nov 21 17:58:13 2023"
    history = PBSScheduler.history_from_record(1, {"job_state": "Q", "stime": old})
    assert history.state is BatchJobState.queued and history.start_time is None
    assert PBSScheduler.history_from_record(1, {"job_state": "R", "stime": old}).start_time is not None


def test_a_request_alone_over_the_limit_fails_instead_of_holding_the_queue(make_site, client) -> None:
    refusal = load_recorded(DATA / "pbs", "qsub_max_queued_res_user")
    runner = ReplayRunner({"qsub": refusal, "qstat": CommandResult(("qstat",), 0, '{"Jobs": {}}', ""),
                           "pbsnodes": CommandResult(("pbsnodes",), 0, '{"nodes": {}}', "")})
    site, module = make_module(make_site, client, PBSScheduler(runner, user="alice"), ["proj"], queue_limit_retry_sec=1)
    big = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
    module.run_cycle()
    assert batch_job(client, big)["state"] == "pending_submission"
    for _ in range(2):
        time.sleep(1.1)
        module.run_cycle()
    record = batch_job(client, big)
    assert record["state"] == "submit_failed"
    assert "while the scheduler listed no job of yours in queue 'debug': the request alone exceeds the limit" in \
        record["status_info"]["error"]
    assert [c.args[0] for c in runner.calls].count("qsub") == 3
