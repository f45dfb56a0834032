"""Which jobs claim a backfill window, and whose requests are the elastic queue's own (audit f8).

A user's other jobs waiting in the submit queue claim the windows their nodes would take
(``Snapshot.others_waiting``), so that two sites of one user do not both request each window.
Found by review r7: a job that cannot take a window (held, waiting for a dependency or a begin
time, one that never starts, one whose submit time the scheduler did not give) claimed it too, for
ever; the site's own BatchJobs made by hand claimed none; jobs of submit_queue listed under another
name (queue_flag --qos shows the partition, a PBS routing queue the execution queue) were never
counted; the scheduler module's PATCH, written from the copy it read before the elastic module
marked a request ``withdraw_if_queued``, dropped the mark; and an agent without filter_tags took
another agent's stamped requests for its own and withdrew them. Real API server, real modules, the
real Slurm driver on replayed squeue / sinfo / scancel output."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest

from balsam.testing import ReplayRunner, result
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

sys.path.insert(0, str(Path(__file__).parent))
from test_f1_withdrawal_only_while_queued import _scancels, _setup  # noqa: E402

RULES = {"scheduler": {"name": "slurm", "allowed_queues": {
    "debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}}
#: 8 idle nodes of partition debug, for up to 2 hours.
SINFO = "debug|up|idle|8|2:00:00\ndebug|up|allocated|60|2:00:00\n"


def _line(job: int, minutes_ago: int, nodes: int = 8, reason: str = "Priority", part: str = "debug") -> str:
    """One squeue line (SQUEUE_FORMAT) of a pending job of the user, submitted minutes_ago."""
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job}|PENDING|{part}|{nodes}|1:55:00|local|1:55:00|{since}|N/A|N/A|{reason}\n"


def _module(site, client, runner, queue_flag: str = "--partition", **opts) -> ElasticQueueModule:
    from balsam_scheduler_slurm import SlurmScheduler

    return ElasticQueueModule(site, {"submit_queue": "debug", "max_num_nodes": 8, "max_wall_time_min": 120, **opts},
                              client, scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": queue_flag}))


def _requests(client, site) -> list[tuple[int, int]]:
    return [(b["num_nodes"], b["wall_time_min"]) for b in batch_jobs_of(client, site)
            if "elastic_request" in (b["status_info"] or {})]


# The user's other job (a pending job's submit time and reason, or a whole squeue line), and
# whether it claims the 8 idle nodes. The lines are written when the test runs, not when pytest
# collects: in the whole suite a test runs many minutes after collection, and a job "submitted 3
# minutes ago" at collection had waited longer than max_queue_wait_time_min by then (CI stop 51).
OTHERS = [
    pytest.param({"minutes_ago": 3}, True, id="waits-its-turn"),
    pytest.param({"minutes_ago": 3, "reason": "Resources"}, True, id="waits-for-resources"),
    pytest.param({"minutes_ago": 3, "reason": "Dependency"}, False, id="dependency"),
    pytest.param({"minutes_ago": 3, "reason": "DependencyNeverSatisfied"}, False, id="dependency-never-satisfied"),
    pytest.param({"minutes_ago": 3, "reason": "JobHeldUser"}, False, id="held-by-user"),
    pytest.param({"minutes_ago": 3, "reason": "JobHeldAdmin"}, False, id="held-by-admin"),
    pytest.param({"minutes_ago": 3, "reason": "BeginTime"}, False, id="begin-time"),
    pytest.param({"minutes_ago": 3, "reason": "QOSMaxNodePerJobLimit"}, False, id="never-starts"),
    pytest.param("901|PENDING|debug|8|1:55:00|local|1:55:00|N/A|N/A|N/A|Priority\n", False, id="unknown-submit-time"),
    pytest.param({"minutes_ago": 200}, False, id="waited-longer-than-max_queue_wait_time_min"),
]


@pytest.mark.parametrize("other, claims", OTHERS)
def test_only_a_job_waiting_for_nodes_claims_the_window(make_site, client, other, claims) -> None:
    squeue = other if isinstance(other, str) else _line(901, **other)
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    runner = ReplayRunner({"sinfo": result(stdout=SINFO), "squeue": result(stdout=squeue)})
    module = _module(site, client, runner)
    for _ in range(2):  # the unknown submit time reads 0 minutes each cycle: it must not claim then either
        module.run_cycle()
    line = module.last_decision.log_line("backfill")
    if claims:
        assert _requests(client, site) == [], line
        assert "8 nodes by the user's other jobs that wait in the queue" in line, line
    else:  # the window is requested once; the request then claims it
        assert _requests(client, site) == [(8, 115)], line
        assert "8 nodes of them already requested by its BatchJobs not started yet" in line, line


def test_the_sites_own_batch_job_made_by_hand_claims_its_window(make_site, client) -> None:
    """Made by hand at this site, it runs the backlog (capacity); its 4 nodes of the 8 idle ones
    were requested again, as neither its own request nor the user's other job."""
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                             "num_nodes": 4, "wall_time_min": 115, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 700}])
    runner = ReplayRunner({"sinfo": result(stdout=SINFO), "squeue": result(stdout=_line(700, 3, nodes=4))})
    module = _module(site, client, runner)
    module.run_cycle()
    assert _requests(client, site) == [(4, 115)], module.last_decision.log_line("backfill")


def test_a_held_batch_job_made_by_hand_claims_no_window(make_site, client) -> None:
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                             "num_nodes": 4, "wall_time_min": 115, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 700}])
    runner = ReplayRunner({"sinfo": result(stdout=SINFO),
                           "squeue": result(stdout=_line(700, 3, nodes=4, reason="JobHeldUser"))})
    module = _module(site, client, runner)
    module.run_cycle()
    assert _requests(client, site) == [(8, 115)], module.last_decision.log_line("backfill")


def test_with_queue_flag_qos_the_users_job_in_the_partition_claims_the_window(make_site, client) -> None:
    """sbatch --qos debug: squeue shows the job's partition (compute), never the QOS, and the
    windows are every partition's idle nodes: the other job was never counted. It is counted in
    the partition the site's own job of the QOS shows (review r11: not in any partition, whose
    nodes it may never take; test_f13_window_claims_by_queue.py)."""
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    mine = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                             "num_nodes": 2, "wall_time_min": 115, "job_mode": "mpi",
                                             "status_info": {"elastic_request": "backfill"}})
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 700}])
    squeue = _line(700, 2, nodes=2, part="compute") + _line(901, 3, nodes=4, part="compute")
    # The 8 idle nodes are compute's, the partition both jobs wait in (a window only the jobs of
    # its partition claim: test_qos_other_jobs_counted_by_qos.py).
    runner = ReplayRunner({"sinfo": result(stdout=SINFO.replace("debug", "compute")), "squeue": result(stdout=squeue)})
    module = _module(site, client, runner, queue_flag="--qos")
    module.run_cycle()
    line = module.last_decision.log_line("backfill")
    # 8 idle: 2 claimed by its own request, 4 by the other job: 2 requested.
    assert sorted(_requests(client, site)) == [(2, 115), (2, 115)], line


@pytest.mark.parametrize("other_queue, claims", [("small", True), ("medium", False)])
def test_the_users_job_in_the_queue_the_sites_jobs_show_claims_the_window(make_site, client, other_queue,
                                                                          claims) -> None:
    """A routing queue (PBS, Polaris prod): the site's BatchJob of submit_queue is listed under the
    execution queue it was routed to (small); the user's other job there claims its 4 nodes, one in
    a queue none of the site's jobs shows does not."""
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    mine = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                             "num_nodes": 2, "wall_time_min": 115, "job_mode": "mpi",
                                             "status_info": {"elastic_request": "backfill"}})
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 700}])
    squeue = _line(700, 2, nodes=2, part="small") + _line(901, 3, nodes=4, part=other_queue)
    runner = ReplayRunner({"sinfo": result(stdout=SINFO), "squeue": result(stdout=squeue)})
    module = _module(site, client, runner)
    module.run_cycle()
    # 8 idle: 2 claimed by its own request; the other job's 4 too when it is of the queue.
    assert sorted(_requests(client, site)) == ([(2, 115), (2, 115)] if claims else [(2, 115), (6, 115)]), \
        module.last_decision.log_line("backfill")


def test_the_scheduler_module_keeps_a_withdrawal_marked_during_its_poll(make_site, client) -> None:
    """The elastic module marks its request while the scheduler module polls; the scheduler
    module's PATCH (scheduler_reason copied) came from its earlier read and dropped the mark."""
    site, bj, squeue, runner, elastic, scheduler = _setup(make_site, client)
    inner = {"done": False}

    def poll(command):
        if not inner["done"]:
            inner["done"] = True
            elastic.run_cycle()  # the elastic cycle runs while the scheduler module polls
        return result(stdout=squeue["out"])

    runner.answers["squeue"] = poll
    scheduler.run_cycle()
    [row] = batch_jobs_of(client, site)
    assert elastic.last_cancelled == (bj,)
    assert row["state"] == "queued" and "withdraw_if_queued" in row["status_info"], row
    assert row["status_info"].get("scheduler_reason") == "Priority", row  # the module's own update went through
    scheduler.run_cycle()  # still waiting: deleted now
    [row] = batch_jobs_of(client, site)
    assert _scancels(runner) == 1 and row["state"] == "pending_deletion", row


def test_an_agent_without_filter_tags_leaves_another_agents_request_alone(make_site, client) -> None:
    """No runnable job: its own request is withdrawn; another agent's (filter_tags campaign=c2),
    which the server's tag filter also returns to an agent without filter_tags, is not."""
    site = make_site(overrides=RULES)
    ids = {}
    for name, tags, sid in (("theirs", {"campaign": "c2"}, 801), ("mine", {}, 802)):
        made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                                 "num_nodes": 4, "wall_time_min": 115, "job_mode": "mpi",
                                                 "filter_tags": tags, "status_info": {"elastic_request": "backfill"}})
        client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": sid}])
        ids[name] = made["id"]
    runner = ReplayRunner({"sinfo": result(stdout=SINFO),
                           "squeue": result(stdout=_line(801, 2, nodes=4) + _line(802, 2, nodes=4))})
    module = _module(site, client, runner)
    module.run_cycle()
    assert module.last_cancelled == (ids["mine"],), module.last_decision.log_line("backfill")
    assert "withdraw_if_queued" not in client.get(f"/batch-jobs/{ids['theirs']}")["status_info"]
    assert "withdraw_if_queued" in client.get(f"/batch-jobs/{ids['mine']}")["status_info"]
