"""The user's other waiting jobs claim backfill windows (two sites of one user requested the same
one), but not a request of its own that the scheduler module submitted while the elastic module
read its snapshot (audit f1, a review of that fix): the poll lists the new job before the API
carries its scheduler id, and counted as another's it made the window look taken twice."""

from __future__ import annotations

import datetime as dt

from balsam.testing import ReplayRunner, result
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

RULES = {"scheduler": {"name": "slurm", "allowed_queues": {
    "debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}}


def _pending(job: int, minutes_ago: int) -> str:
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job}|PENDING|debug|4|1:55:00|local|1:55:00|{since}|N/A|N/A|Priority\n"


def test_its_own_request_submitted_meanwhile_is_not_another_sites(make_site, client) -> None:
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides=RULES)
    squeue = {"out": ""}
    runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|8|2:00:00\ndebug|up|allocated|60|2:00:00\n"),
                           "squeue": lambda command: result(stdout=squeue["out"])})
    module = ElasticQueueModule(site, {"submit_queue": "debug", "max_num_nodes": 4, "max_wall_time_min": 120},
                                client, scheduler=SlurmScheduler(runner, user="u"))
    runnable_jobs(client, site, 20)
    module.run_cycle()  # 4 of the 8 idle nodes (max_num_nodes), waiting for its submission
    [first] = batch_jobs_of(client, site)
    assert (first["num_nodes"], first["wall_time_min"], first["state"]) == (4, 115, "pending_submission")
    # The scheduler module submitted it as job 801 meanwhile; the API does not say so yet.
    squeue["out"] = _pending(801, 0)
    module.run_cycle()  # the other 4 idle nodes are still free: requested
    assert [(b["num_nodes"], b["wall_time_min"]) for b in batch_jobs_of(client, site)] == [(4, 115), (4, 115)], \
        module.last_decision

    # Another site's request of the same size waiting 5 minutes still claims its window.
    other = make_site(overrides=RULES)
    runnable_jobs(client, other, 20)
    squeue["out"] = _pending(901, 5)
    mod = ElasticQueueModule(other, {"submit_queue": "debug", "max_num_nodes": 4, "max_wall_time_min": 120},
                             client, scheduler=SlurmScheduler(runner, user="u"))
    mod.run_cycle()
    [made] = batch_jobs_of(client, other)
    mod.run_cycle()  # 8 idle: its own 4 and the other site's 4 claim them all
    assert [b["id"] for b in batch_jobs_of(client, other)] == [made["id"]], mod.last_decision
    assert "4 nodes by the user's other jobs that wait in the queue" in mod.last_decision.reason, mod.last_decision
