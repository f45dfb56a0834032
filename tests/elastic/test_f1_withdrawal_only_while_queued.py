"""A request the elastic queue withdraws is deleted only while it still waits (audit f1).

The elastic module marked a request pending_deletion when its own status poll showed it queued;
the scheduler module deleted it in its next cycle (up to sync_period later) even when by then it
ran, killing a launcher that had leased jobs (a pending_deletion BatchJob can only finish). Now
the request is marked ``status_info.withdraw_if_queued``, and the scheduler module deletes it only
if its own poll shows it still waiting; one that started keeps running. ``balsam queue term``
(state pending_deletion) still deletes unconditionally. Real API server, both real modules, the
real Slurm driver on replayed squeue / scancel / sacct output."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from balsam.testing import ReplayRunner, result
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of

DEBUG = {"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}}
SCHEDULER_LOGGER = "balsam.site.modules.scheduler"


def _squeue(state: str) -> str:
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    if state == "RUNNING":
        return f"501|RUNNING|debug|2|0:55:00|root|0:54:00|{since}|{since}|N/A|None\n"
    return f"501|PENDING|debug|2|0:55:00|root|0:55:00|{since}|N/A|N/A|Priority\n"


def _setup(make_site, client):
    """A site on the Slurm driver with one request of the elastic queue, queued as scheduler job
    501, and no backlog: the elastic module withdraws it (no runnable job needs it)."""
    from balsam.site.modules.scheduler import SchedulerModule
    from balsam_scheduler_slurm import SlurmScheduler

    squeue = {"out": _squeue("PENDING")}
    runner = ReplayRunner({"squeue": lambda command: result(stdout=squeue["out"]), "sinfo": result(stdout=""),
                           "scancel": result(stdout=""), "sacct": result(stdout="")})
    slurm = SlurmScheduler(runner, user="root")
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["root"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "root", "queue": "debug",
                                             "num_nodes": 2, "wall_time_min": 55, "job_mode": "mpi",
                                             "status_info": {"elastic_request": "backfill"}})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 501}])
    elastic = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "root", "max_num_nodes": 2,
                                        "max_wall_time_min": 60}, client, scheduler=slurm)
    scheduler = SchedulerModule(site, site.settings.scheduler, client, scheduler=slurm)
    return site, made["id"], squeue, runner, elastic, scheduler


def _scancels(runner) -> int:
    return [c.args[0] for c in runner.calls].count("scancel")


def test_a_withdrawn_request_that_started_meanwhile_keeps_running(make_site, client, caplog) -> None:
    site, bj, squeue, runner, elastic, scheduler = _setup(make_site, client)
    caplog.set_level(logging.INFO)
    elastic.run_cycle()  # its poll: still pending, and nothing needs it
    assert elastic.last_decision.cancel == (bj,) and elastic.last_cancelled == (bj,), elastic.last_decision
    squeue["out"] = _squeue("RUNNING")  # its launcher starts before the scheduler module's cycle
    scheduler.run_cycle()
    [row] = batch_jobs_of(client, site)
    assert _scancels(runner) == 0 and row["state"] == "running", (runner.calls, row)
    assert "withdraw_if_queued" not in row["status_info"], row
    dropped = [r.getMessage() for r in caplog.records
               if r.name == SCHEDULER_LOGGER and r.levelno == logging.INFO and "withdrawal dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].startswith(f"BatchJob {bj}: withdrawal dropped (withdraw_if_queued "), dropped
    assert dropped[0].endswith("it started (it was queued, scheduler job 501 is running), so it goes on running")
    scheduler.run_cycle()
    elastic.run_cycle()  # running: counted again, and not cancellable (it may have leased jobs)
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["running"] and _scancels(runner) == 0
    assert elastic.last_cancelled == () and "reserved=2" in elastic.last_decision.log_line("backfill")


def test_a_withdrawn_request_still_queued_is_deleted_by_the_next_scheduler_cycle(make_site, client) -> None:
    site, bj, squeue, runner, elastic, scheduler = _setup(make_site, client)
    elastic.run_cycle()
    [row] = batch_jobs_of(client, site)
    assert row["state"] == "queued" and row["status_info"]["withdraw_if_queued"].endswith(" by elastic_queue"), row
    elastic.run_cycle()  # withdrawn already: not withdrawn again, and it reserves nothing meanwhile
    assert elastic.last_cancelled == () and "reserved=0" in elastic.last_decision.log_line("backfill")
    scheduler.run_cycle()  # its own poll: still pending, deleted now
    assert _scancels(runner) == 1 and [b["state"] for b in batch_jobs_of(client, site)] == ["pending_deletion"]
    squeue["out"] = ""
    scheduler.run_cycle()
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["finished"]


@pytest.mark.parametrize("state", ["queued", "running"])
def test_queue_term_still_deletes_unconditionally(make_site, client, state) -> None:
    site, bj, squeue, runner, elastic, scheduler = _setup(make_site, client)
    if state == "running":
        squeue["out"] = _squeue("RUNNING")
        client.patch("/batch-jobs/", json=[{"id": bj, "state": "running"}])
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])  # balsam queue term
    scheduler.run_cycle()
    assert _scancels(runner) == 1, runner.calls
