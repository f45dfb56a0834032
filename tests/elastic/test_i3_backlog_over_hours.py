"""The elastic queue over a campaign of hours (audit i3): a queue whose ``min_nodes`` no backfill
window reaches gets no request sized to such a window (it got one each cycle, each raised to
``min_nodes``, larger than the window, stale after ``max_queue_wait_time_min`` and requested again),
and the requests left in the queue ``submit_queue`` named before a settings change (and an agent
restart) are withdrawn while they have not started (they were never counted nor cancelled); two
sites of one user no longer both request one backfill window."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from balsam.models import BackfillWindow
from balsam.testing import ReplayRunner, result
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
W = BackfillWindow


class Windows:
    """A scheduler driver for the elastic module alone: no queued job, the given windows in ``queue``."""

    def __init__(self, queue: str, *windows: BackfillWindow) -> None:
        self.queue, self.windows = queue, list(windows)

    def get_statuses(self) -> dict:
        return {}

    def get_backfill_windows(self) -> dict:
        return {self.queue: self.windows}


def _logged(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


PROD = {"prod": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 20, "min_nodes": 10}}


def test_windows_narrower_than_the_queues_min_nodes_get_no_request(make_site, client, caplog) -> None:
    """Polaris prod (min_nodes 10), 4 nodes idle: a 4-node request raised to 10 nodes, which the
    window cannot hold and which claimed none of it, so each cycle made another (5 in 5 cycles, up
    to max_queued_jobs: 200 nodes queued for a 4-node window, each cancelled as stale 10 minutes
    later and requested again)."""
    site = make_site(overrides={"scheduler": {"allowed_queues": PROD}})
    scheduler = Windows("prod", W(num_nodes=4, wall_time_min=60))
    module = ElasticQueueModule(site, {"submit_queue": "prod", "max_num_nodes": 64, "max_wall_time_min": 120,
                                       "max_queued_jobs": 20}, client, scheduler=scheduler)
    caplog.set_level(logging.INFO, logger=LOGGER)
    runnable_jobs(client, site, 100)
    for _ in range(3):
        module.run_cycle()
    assert batch_jobs_of(client, site) == []
    assert module.last_decision.reason == (
        "no backfill window fits (need >= 10 nodes x >= 35 min; queue 'prod' takes no job of fewer than 10 nodes "
        "(min_nodes); windows 4x60min)"), module.last_decision

    # A window as wide as the minimum is used; a shortfall below it asks for the minimum (the log
    # line says the size submitted), and that request claims the window.
    scheduler.windows = [W(num_nodes=4, wall_time_min=60), W(num_nodes=12, wall_time_min=60)]
    client.delete("/jobs/", params={"site_id": site.site_id})
    runnable_jobs(client, site, 3)
    module.run_cycle()
    module.run_cycle()
    assert [(b["num_nodes"], b["wall_time_min"]) for b in batch_jobs_of(client, site)] == [(10, 55)]
    assert any(line.startswith("[backfill] submit 10 nodes x 55 min:") for line in _logged(caplog, logging.INFO))
    assert not any("raised to the min_nodes" in line for line in _logged(caplog, logging.WARNING))


QUEUES = {"debug": {"max_nodes": 8, "max_walltime": 120, "max_queued_jobs": 20},
          "prod": {"max_nodes": 8, "max_walltime": 120, "max_queued_jobs": 20}}


@pytest.mark.parametrize("left", ["pending_submission", "queued", "running"])
def test_requests_left_in_the_former_submit_queue_are_withdrawn_unless_started(make_site, client, caplog,
                                                                              left) -> None:
    """settings.yml's submit_queue changed from debug to prod (the agent restarted): its request
    waiting in debug was read no more, so prod got a second one for the same backlog, and the debug
    one was never cancelled when the backlog went (it started later and ran nothing). One that has
    not started is withdrawn; one that runs is left to drain, as is a request of another agent's
    filter_tags and a BatchJob it did not create."""
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides={"filter_tags": {"campaign": "c1"}, "scheduler": {"name": "slurm",
                                                                                "allowed_queues": QUEUES}})
    settings = {"use_backfill": False, "max_num_nodes": 4, "max_wall_time_min": 60}
    ElasticQueueModule(site, {**settings, "submit_queue": "debug"}, client, scheduler=Windows("debug")).run_cycle()
    runnable_jobs(client, site, 4, tags={"campaign": "c1"})
    ElasticQueueModule(site, {**settings, "submit_queue": "debug"}, client, scheduler=Windows("debug")).run_cycle()
    [old] = batch_jobs_of(client, site)
    base = {"site_id": site.site_id, "project": "local", "queue": "debug", "num_nodes": 1, "wall_time_min": 10,
            "job_mode": "mpi"}
    others = [client.post("/batch-jobs/", json={**base, "filter_tags": {"campaign": "c2"},
                                                "status_info": {"elastic_request": "backfill"}}),
              client.post("/batch-jobs/", json={**base, "filter_tags": {"campaign": "c1"}})]
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    squeue = ""
    if left != "pending_submission":
        client.patch("/batch-jobs/", json=[{"id": old["id"], "state": "queued", "scheduler_id": 501}])
        if left == "running":
            client.patch("/batch-jobs/", json=[{"id": old["id"], "state": "running"}])
            squeue = f"501|RUNNING|debug|4|0:55:00|local|0:54:00|{since}|{since}|N/A|None\n"
        else:
            squeue = f"501|PENDING|debug|4|0:55:00|local|0:55:00|{since}|N/A|N/A|Priority\n"
    runner = ReplayRunner({"squeue": result(stdout=squeue), "sinfo": result(stdout="")})
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, {**settings, "submit_queue": "prod"}, client,
                                scheduler=SlurmScheduler(runner, user="u"))
    module.run_cycle()
    states = {b["id"]: (b["queue"], b["state"]) for b in batch_jobs_of(client, site)}
    assert [s for i, s in states.items() if i > others[-1]["id"]] == [("prod", "pending_submission")], states
    assert [states[o["id"]][1] for o in others] == ["pending_submission"] * 2, states
    warned = [line for line in _logged(caplog, logging.WARNING) if f"BatchJob {old['id']}," in line]
    if left == "running":
        assert states[old["id"]] == ("debug", "running") and warned == [], states
    else:
        # A queued one is withdrawn only if it still waits when the scheduler module acts (audit f1).
        withdrawn = "pending_deletion" if left == "pending_submission" else "queued"
        assert states[old["id"]] == ("debug", withdrawn), states
        marked = "withdraw_if_queued" in client.get(f"/batch-jobs/{old['id']}")["status_info"]
        assert marked == (left == "queued")
        assert warned == [f"BatchJob {old['id']}, requested by the elastic queue in another queue than submit_queue "
                          f"'prod' (settings.yml elastic_queue.submit_queue changed since), had not started: withdrawn"]
    module.run_cycle()  # said once: a withdrawn request is not read as one left over again
    assert len([line for line in _logged(caplog, logging.WARNING) if f"BatchJob {old['id']}," in line]) == len(warned)


def test_two_sites_of_one_user_do_not_both_request_one_window(make_site, client) -> None:
    """Two sites of one user on one machine see the same sinfo windows; each counted only its own
    requests against them, so both requested the 4 idle nodes (one request then waited past
    max_queue_wait_time_min and was cancelled, window after window). The user's other jobs waiting
    in the queue (squeue lists them all) claim the windows they fit, unless they have waited longer
    than max_queue_wait_time_min (they wait for reasons of their own) or wait in another queue."""
    from balsam_scheduler_slurm import SlurmScheduler

    rules = {"scheduler": {"name": "slurm", "allowed_queues": {
        "debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}}
    first, second = make_site(overrides=rules), make_site(overrides=rules)
    now = dt.datetime.now(dt.timezone.utc)
    squeue = {"line": ""}

    def pending(job: int, queue: str, minutes_ago: int) -> str:
        since = (now - dt.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{job}|PENDING|{queue}|4|1:55:00|local|1:55:00|{since}|N/A|N/A|Priority\n"

    def module(site) -> ElasticQueueModule:
        runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|4|2:00:00\ndebug|up|allocated|60|2:00:00\n"),
                               "squeue": lambda command: result(stdout=squeue["line"])})
        return ElasticQueueModule(site, {"submit_queue": "debug", "max_wall_time_min": 120}, client,
                                  scheduler=SlurmScheduler(runner, user="u"))

    runnable_jobs(client, first, 20)
    runnable_jobs(client, second, 20)
    mod = module(first)
    mod.run_cycle()  # the first site's request for the window, submitted: job 701, pending a minute
    [mine] = batch_jobs_of(client, first)
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 701}])
    squeue["line"] = pending(701, "debug", 1)
    other = module(second)
    other.run_cycle()
    assert batch_jobs_of(client, second) == [], other.last_decision
    assert other.last_decision.reason.endswith(
        "windows 4x120min, 4 nodes by the user's other jobs that wait in the queue (another site's requests, "
        "jobs submitted by hand))"), other.last_decision
    mod.run_cycle()  # its own request is its own, not another's
    assert [b["id"] for b in batch_jobs_of(client, first)] == [mine["id"]]
    assert mod.last_decision.reason.endswith("windows 4x120min, 4 nodes of them already requested by its BatchJobs "
                                             "not started yet)"), mod.last_decision

    # Waiting longer than max_queue_wait_time_min (10), or in another queue: no claim on the window.
    for line in (pending(701, "debug", 30), pending(701, "other", 1)):
        squeue["line"] = line
        site = make_site(overrides=rules)
        runnable_jobs(client, site, 20)
        module(site).run_cycle()
        assert [(b["num_nodes"], b["wall_time_min"]) for b in batch_jobs_of(client, site)] == [(4, 115)], line
