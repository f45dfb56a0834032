"""The churn guard (balsam_elastic.churn): BatchJobs of the elastic queue that end having leased no
job, while the backlog they were sized for stays the same, space out its submissions (service_period
doubled per such BatchJob, at most 30 min) with one ERROR naming the likely causes; a BatchJob that
leases a job, or a change of the backlog, ends it. Before, a launcher that refused the jobs for a
reason the module cannot see (GPU jobs on GPU-less nodes without elastic_queue.node_gpus 0, a
filter of its acquire) got a new BatchJob every cycle, for ever. The pure logic, then the module
against a real API server."""

from __future__ import annotations

import datetime as dt
import logging

from balsam_elastic import ElasticQueueOptions
from balsam_elastic.churn import CHURN_BACKOFF_MAX_S, ChurnGuard, backlog_key
from balsam_elastic.module import ElasticQueueModule
from balsam_elastic.strategy import Backlog
from elastic_test_utils import batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
KEY = backlog_key(Backlog(runnable_count=2, runnable_footprint=2.0, min_runnable_nodes=1, max_runnable_nodes=1))


def _at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_a_streak_of_idle_batch_jobs_backs_off_doubling_up_to_the_cap() -> None:
    guard = ChurnGuard()
    assert guard.update(KEY, [], False) is False  # the first look: the backlog it counts for
    assert guard.update(KEY, [(1, _at(0))], False) is False and guard.blocked_until(60, _at(1)) is None
    assert guard.update(KEY, [(2, _at(10))], False) is True  # the streak reaches 2: said once
    assert guard.blocked_until(60, _at(11)) == _at(10 + 120) and guard.blocked_until(60, _at(130)) is None
    assert guard.update(KEY, [(3, _at(200)), (4, _at(150))], False) is False  # not said again
    assert guard.streak == [1, 2, 3, 4] and guard.wait_s(60) == 480
    assert guard.blocked_until(60, _at(300)) == _at(200 + 480)
    for i in range(5, 20):
        guard.update(KEY, [(i, _at(i * 1000))], False)
    assert guard.wait_s(60) == CHURN_BACKOFF_MAX_S  # bounded
    assert guard.unseen([(3, _at(0)), (99, _at(0))]) == [(99, _at(0))]


def test_a_batch_job_that_leased_a_job_or_a_changed_backlog_ends_the_streak() -> None:
    guard = ChurnGuard()
    guard.update(KEY, [], False)
    guard.update(KEY, [(1, _at(0)), (2, _at(1))], False)
    assert guard.blocked_until(60, _at(2)) is not None
    guard.update(KEY, [(3, _at(5))], True)  # one of them leased a job
    assert guard.streak == [] and guard.blocked_until(60, _at(6)) is None
    guard.update(KEY, [(4, _at(7)), (5, _at(8))], False)
    assert guard.blocked_until(60, _at(9)) is not None
    changed = backlog_key(Backlog(runnable_count=3, runnable_footprint=3.0, min_runnable_nodes=1, max_runnable_nodes=1))
    guard.update(changed, [(6, _at(10))], False)  # sized for the old backlog: not counted
    assert guard.streak == [] and guard.blocked_until(60, _at(11)) is None
    # The backlog's waiting time is no change (it grows by itself).
    assert backlog_key(Backlog(runnable_count=2, oldest_runnable_wait_min=9)) == backlog_key(Backlog(runnable_count=2))


QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}


def _end(client, batch_job: dict, when: dt.datetime, started: bool = True) -> None:
    """The BatchJob ran (``started``; else it was withdrawn while queued) and ended, as the
    scheduler module records it."""
    client.patch("/batch-jobs/", json=[{"id": batch_job["id"], "state": "queued", "scheduler_id": 1000 + batch_job["id"]}])
    if started:
        client.patch("/batch-jobs/", json=[{"id": batch_job["id"], "state": "running", "start_time": when.isoformat()}])
    client.patch("/batch-jobs/", json=[{"id": batch_job["id"], "state": "finished", "end_time": when.isoformat()}])


def test_the_module_stops_submitting_for_a_backlog_its_batch_jobs_never_lease(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    caplog.set_level(logging.INFO, logger=LOGGER)
    runnable_jobs(client, site, 2)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_num_nodes=4, min_wall_time_min=10,
                                                          wall_time_pad_min=1, max_wall_time_min=60), client)
    module.run_cycle()  # one withdrawn before it started: no launcher, so no verdict on the jobs
    _end(client, batch_jobs_of(client, site)[-1], dt.datetime.now(dt.timezone.utc), started=False)
    for _ in range(2):  # a BatchJob per cycle, each ending with nothing leased
        module.run_cycle()
        _end(client, batch_jobs_of(client, site)[-1], dt.datetime.now(dt.timezone.utc))
    module.run_cycle()
    made = batch_jobs_of(client, site)[1:]
    # Before: a fourth BatchJob, then one more each cycle.
    assert len(made) == 2, made
    assert "backing off after 2 BatchJob(s) in a row ended having leased no job" in module.last_decision.reason
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"BatchJobs {made[0]['id']}, {made[1]['id']} ended without "
                                                     f"leasing any of the 2 runnable job(s)"), errors
    module.run_cycle()
    assert len(batch_jobs_of(client, site)) == 3 and len(
        [r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    # The backlog changes (a job added): the normal rate again.
    runnable_jobs(client, site, 1)
    module.run_cycle()
    third = batch_jobs_of(client, site)[-1]
    assert len(batch_jobs_of(client, site)) == 4, module.last_decision
    # A job its launcher leased keeps the BatchJob's id: that one leased (the streak would end).
    assert not module.leased_any([made[0]["id"], made[1]["id"], third["id"]])
    client.patch("/batch-jobs/", json=[{"id": third["id"], "state": "queued", "scheduler_id": 99}])
    client.patch("/batch-jobs/", json=[{"id": third["id"], "state": "running"}])
    session = client.post("/sessions/", json={"site_id": site.site_id, "batch_job_id": third["id"]})["id"]
    assert client.post(f"/sessions/{session}", json={"max_num_jobs": 1})
    assert module.leased_any([made[0]["id"], third["id"]])
