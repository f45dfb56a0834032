"""The churn guard sees the backlog's numbers every cycle, not only in cycles that submit.

Compared only in submitting cycles, a backlog that went 2 -> 0 -> 2 jobs of the same shape in between
read as unchanged: a healthy campaign adding identical batches (BatchJob A running every batch, the
extra BatchJob submitted for each batch ending idle because A had leased it all) got "ERROR ...
their launchers refuse these jobs" and a doubling hold of up to 30 min. Now a cycle with other
numbers (0 runnable jobs included) ends the streak, and a BatchJob counts only if it started after a
cycle first saw the current numbers. The ERROR names node and allocation failures among the likely
causes and quotes the ended BatchJob's status_info (the scheduler's end state among it).
"""

from __future__ import annotations

import datetime as dt
import logging

from balsam_elastic import ElasticQueueOptions
from balsam_elastic.churn import ChurnGuard, backlog_key
from balsam_elastic.module import ElasticQueueModule
from balsam_elastic.strategy import Backlog
from elastic_test_utils import batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}
T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
TWO = backlog_key(Backlog(runnable_count=2, runnable_footprint=2.0, min_runnable_nodes=1, max_runnable_nodes=1))
NONE = backlog_key(Backlog())


def _at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def _options() -> ElasticQueueOptions:
    return ElasticQueueOptions(use_backfill=False, max_num_nodes=1, max_wall_time_min=60)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _start(client, batch_job: dict) -> None:
    client.patch("/batch-jobs/", json=[{"id": batch_job["id"], "state": "queued", "scheduler_id": 5000 + batch_job["id"]}])
    client.patch("/batch-jobs/", json=[{"id": batch_job["id"], "state": "running", "start_time": _now().isoformat()}])


def _end(client, batch_job: dict, **status_info) -> None:
    update = {"id": batch_job["id"], "state": "finished", "end_time": _now().isoformat()}
    if status_info:
        update["status_info_merge"] = status_info
    client.patch("/batch-jobs/", json=[update])


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]


def test_a_cycle_with_other_numbers_ends_the_streak_and_earlier_batch_jobs_do_not_count() -> None:
    guard = ChurnGuard()
    guard.observe(TWO, _at(0))
    guard.update(TWO, [(1, _at(10)), (2, _at(20))], False, started={1: _at(5), 2: _at(6)})
    assert guard.blocked_until(60, _at(21)) is not None  # the real churn: still held back
    guard.observe(NONE, _at(30))  # a cycle that submits nothing sees no runnable job
    assert guard.streak == [] and guard.blocked_until(60, _at(31)) is None
    guard.observe(TWO, _at(40))  # the same numbers again: a new batch, not the old one
    # Started before the cycle that first saw this batch: it may have found the old one taken.
    assert guard.update(TWO, [(3, _at(41)), (4, _at(42))], False, started={3: _at(25), 4: _at(39)}) is False
    assert guard.streak == [] and guard.blocked_until(60, _at(43)) is None
    guard.observe(TWO, _at(100))  # unchanged: the period goes on
    assert guard.update(TWO, [(5, _at(110)), (6, _at(120))], False, started={5: _at(40), 6: _at(101)}) is True
    assert guard.streak == [5, 6] and guard.blocked_until(60, _at(121)) == _at(120 + 120)


def test_identical_batches_run_by_one_batch_job_are_no_churn(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, _options(), client)
    runnable_jobs(client, site, 2)
    module.run_cycle()
    first = batch_jobs_of(client, site)[0]
    _start(client, first)
    session = client.post("/sessions/", json={"site_id": site.site_id, "batch_job_id": first["id"]})["id"]
    for _ in range(3):
        # The first BatchJob's launcher leases the whole batch and runs it.
        got = client.post(f"/sessions/{session}", json={"max_num_jobs": 100})
        ids = [j["id"] for j in (got if isinstance(got, list) else got["results"])]
        assert len(ids) == 2
        for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"):
            client.patch("/jobs/", json=[{"id": i, "state": state} for i in ids])
        for extra in [b for b in batch_jobs_of(client, site) if b["id"] != first["id"] and b["state"] != "finished"]:
            _start(client, extra)
            _end(client, extra)  # found nothing left: the first one had it all
        module.run_cycle()  # no runnable job: submits nothing
        runnable_jobs(client, site, 2)  # the workflow's next batch, of the same shape
        module.run_cycle()
        assert "backing off" not in module.last_decision.reason, module.last_decision
    # Before: the second round's ERROR ("their launchers refuse these jobs") and a hold.
    assert not _errors(caplog)
    assert len(batch_jobs_of(client, site)) == 4


def test_the_error_names_failing_nodes_and_quotes_the_scheduler(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, _options(), client)
    runnable_jobs(client, site, 1)
    for _ in range(2):
        module.run_cycle()
        made = batch_jobs_of(client, site)[-1]
        _start(client, made)
        _end(client, made, scheduler_state="NODE_FAIL", scheduler_message="node nid00012 failed")
    module.run_cycle()
    assert "backing off after 2 BatchJob(s)" in module.last_decision.reason, module.last_decision
    (error,) = _errors(caplog)
    assert f"BatchJob {made['id']}'s status_info: scheduler_state 'NODE_FAIL'; scheduler_message " \
           f"'node nid00012 failed'." in error, error
    assert "nodes or allocations that fail" in error, error
