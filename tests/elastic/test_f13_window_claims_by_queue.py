"""Which of the user's other jobs claim a backfill window (review r11 of f4458bc).

Found by review r11: where the windows include nodes usable from any queue (Slurm with
queue_flag --qos, whose windows are every partition's idle nodes; PBS free nodes tied to no
queue), the user's waiting jobs of every queue or partition claimed any window that fit, nodes
they can never take included, and the site never requested it; a PBS job waiting for its start
time (job_state W, qsub -a), or held with a comment of the scheduler's own, claimed it; Slurm jobs
held by a per-user/account/QOS limit, a reservation, nodes or a partition that are down, claimed
it; and the site's own queued request whose submit time squeue did not give claimed none, so its
window was requested again. Real API server, real modules, the real Slurm and PBS drivers on
replayed squeue / sinfo / qstat / pbsnodes output."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from balsam.states import BatchJobState
from balsam.testing import ReplayRunner, result
from balsam_elastic.module import ElasticQueueModule
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler
from elastic_test_utils import batch_jobs_of, runnable_jobs

RULES = {"scheduler": {"name": "slurm", "allowed_queues": {
    "debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}}
PBS_RULES = {"scheduler": {"allowed_queues": {"debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}}


def _line(job: int, minutes_ago: int, nodes: int = 8, reason: str = "Priority", part: str = "debug") -> str:
    """One squeue line (SQUEUE_FORMAT) of a pending job of the user, submitted minutes_ago."""
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job}|PENDING|{part}|{nodes}|1:55:00|local|1:55:00|{since}|N/A|N/A|{reason}\n"


def _requests(client, site) -> list[tuple[int, int, str]]:
    return sorted((b["num_nodes"], b["wall_time_min"], b["state"]) for b in batch_jobs_of(client, site)
                  if "elastic_request" in (b["status_info"] or {}))


def _slurm_module(site, client, runner, queue_flag: str = "--partition") -> ElasticQueueModule:
    return ElasticQueueModule(site, {"submit_queue": "debug", "max_num_nodes": 8, "max_wall_time_min": 120},
                              client, scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": queue_flag}))


def _pbsnodes(debug_free: int, any_free: int) -> str:
    nodes = {f"d{i}": {"state": "free", "queue": "debug", "resources_available": {"ncpus": 64}}
             for i in range(debug_free)}
    nodes.update({f"a{i}": {"state": "free", "resources_available": {"ncpus": 64}} for i in range(any_free)})
    return json.dumps({"timestamp": 1, "nodes": nodes})


def _qstat(jobs: dict) -> str:
    """qstat -f -F json of the user's jobs: id -> (queue, nodes, job_state, minutes ago, more keys)."""
    now = dt.datetime.now(dt.timezone.utc)
    out = {}
    for jid, (queue, nodes, state, minutes_ago, extra) in jobs.items():
        t = (now - dt.timedelta(minutes=minutes_ago)).strftime("%a %b %d %H:%M:%S %Y")
        out[f"{jid}.pbs"] = {"Job_Name": f"j{jid}", "Job_Owner": "u@login", "job_state": state, "queue": queue,
                             "ctime": t, "qtime": t, "Hold_Types": "n",
                             "Resource_List": {"nodect": nodes, "select": str(nodes), "walltime": "00:55:00"}, **extra}
    return json.dumps({"timestamp": 1, "Jobs": out})


def _pbs_module(site, client, runner) -> ElasticQueueModule:
    return ElasticQueueModule(site, {"submit_queue": "debug", "max_num_nodes": 8, "max_wall_time_min": 60,
                                     "min_wall_time_min": 30}, client, scheduler=PBSScheduler(runner, user="u"))


# -- 1. a job of another queue or partition claims no window, also where windows are of any queue --------------

def test_with_qos_a_job_of_another_partition_claims_no_window(make_site, client) -> None:
    """queue_flag --qos: 8 idle nodes in partition regular; the user's other job waits in partition
    gpu, whose nodes are all allocated: it can never take a node of regular."""
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    sinfo = "regular|up|idle|8|2:00:00\ngpu|up|allocated|16|2:00:00\n"
    runner = ReplayRunner({"sinfo": result(stdout=sinfo),
                           "squeue": result(stdout=_line(901, 3, part="gpu", reason="Resources"))})
    module = _slurm_module(site, client, runner, queue_flag="--qos")
    module.run_cycle()
    line = module.last_decision.log_line("backfill")
    assert _requests(client, site) == [(8, 115, "pending_submission")], line
    assert "by the user's other jobs" not in line, line


def test_pbs_a_job_of_another_queue_claims_no_node_tied_to_the_submit_queue(make_site, client) -> None:
    """8 free nodes tied to debug and one tied to no queue; the user's job waits in prod."""
    site = make_site(overrides=PBS_RULES)
    runnable_jobs(client, site, 20)
    runner = ReplayRunner({"pbsnodes": result(stdout=_pbsnodes(8, 1)),
                           "qstat": result(stdout=_qstat({901: ("prod", 8, "Q", 3, {})}))})
    module = _pbs_module(site, client, runner)
    module.run_cycle()
    line = module.last_decision.log_line("backfill")
    assert (8, 55, "pending_submission") in _requests(client, site), line
    assert "by the user's other jobs" not in line, line


def test_pbs_a_job_of_the_submit_queue_still_claims_its_window(make_site, client) -> None:
    site = make_site(overrides=PBS_RULES)
    runnable_jobs(client, site, 20)
    runner = ReplayRunner({"pbsnodes": result(stdout=_pbsnodes(8, 0)),
                           "qstat": result(stdout=_qstat({901: ("debug", 8, "Q", 3, {})}))})
    module = _pbs_module(site, client, runner)
    module.run_cycle()
    line = module.last_decision.log_line("backfill")
    assert _requests(client, site) == [] and "8 nodes by the user's other jobs" in line, line


# -- 2. PBS: a job in state W or H claims nothing, whatever its comment ------------------------------------------

@pytest.mark.parametrize("state, extra", [
    pytest.param("W", {"Execution_Time": "Thu Dec 31 00:00:00 2099"}, id="W-begin-time"),
    pytest.param("W", {"Execution_Time": "Thu Dec 31 00:00:00 2099",
                       "comment": "Not Running: Insufficient amount of resource: ncpus"}, id="W-with-comment"),
    pytest.param("H", {"Hold_Types": "u", "comment": "Not Running: Insufficient amount of resource: ncpus"},
                 id="H-with-comment"),
    pytest.param("H", {"Hold_Types": "n", "comment": "Not Running: Job would conflict with reservation"},
                 id="H-system-hold-comment"),
])
def test_pbs_a_job_held_or_waiting_for_its_start_time_claims_no_window(make_site, client, state, extra) -> None:
    site = make_site(overrides=PBS_RULES)
    runnable_jobs(client, site, 20)
    runner = ReplayRunner({"pbsnodes": result(stdout=_pbsnodes(8, 0)),
                           "qstat": result(stdout=_qstat({901: ("debug", 8, state, 3, extra)}))})
    module = _pbs_module(site, client, runner)
    module.run_cycle()
    line = module.last_decision.log_line("backfill")
    assert _requests(client, site) == [(8, 55, "pending_submission")], line


def test_pbs_the_reason_of_a_held_or_begin_time_job_says_so_first():
    pbs = PBSScheduler(user="u")
    now = dt.datetime.now(dt.timezone.utc)
    statuses = pbs.parse_status(result(stdout=_qstat({
        1: ("debug", 2, "W", 3, {"Execution_Time": "Thu Dec 31 00:00:00 2099"}),
        2: ("debug", 2, "H", 3, {"Hold_Types": "u", "comment": "Not Running: Insufficient amount of resource"}),
        3: ("debug", 2, "H", 3, {"comment": "Can Never Run: Insufficient amount of queue resource: nodect"}),
        4: ("debug", 2, "Q", 3, {"comment": "Not Running: Insufficient amount of resource"}),
    })), now)
    assert {i: s.message for i, s in statuses.items()} == {
        1: "waiting for its start time (Thu Dec 31 00:00:00 2099)",
        2: "held (Hold_Types u): Not Running: Insufficient amount of resource",
        3: "Can Never Run: Insufficient amount of queue resource: nodect",  # never_starts reads it
        4: "Not Running: Insufficient amount of resource",
    }
    assert {i: pbs.waits_for_other_than_nodes(s) for i, s in statuses.items()} == {1: True, 2: True, 3: False, 4: False}
    assert pbs.never_starts(statuses[3]) and all(s.state is BatchJobState.queued for s in statuses.values())


# -- 3. Slurm: limits, reservations, nodes or partitions down claim nothing ---------------------------------------

@pytest.mark.parametrize("reason", [
    "QOSMaxJobsPerUserLimit", "QOSGrpNodeLimit", "QOSGrpCpuLimit", "AssocGrpNodeLimit", "AssocMaxJobsLimit",
    "ReqNodeNotAvail, Reserved for maintenance", "Reservation", "PartitionDown", "PartitionInactive",
    "JobArrayTaskLimit",
])
def test_slurm_a_job_waiting_for_a_limit_or_a_reservation_claims_no_window(make_site, client, reason) -> None:
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|8|2:00:00\n"),
                           "squeue": result(stdout=_line(901, 3, reason=reason))})
    module = _slurm_module(site, client, runner)
    module.run_cycle()
    assert _requests(client, site) == [(8, 115, "pending_submission")], module.last_decision.log_line("backfill")


def test_slurm_reasons_of_a_job_waiting_for_nodes_are_not_limits():
    slurm = SlurmScheduler(user="u")
    poll = slurm.parse_status(result(stdout="".join(_line(900 + i, 3, reason=r) for i, r in enumerate(
        ("Priority", "Resources", "QOSMaxJobsPerUserLimit", "QOSMaxNodePerJobLimit")))),
        dt.datetime.now(dt.timezone.utc))
    assert {i: slurm.waits_for_other_than_nodes(s) for i, s in poll.statuses.items()} == {
        900: False, 901: False, 902: True, 903: False}  # 903 never starts (never_starts says so)


# -- 4. its own request of unknown submit time keeps its window ---------------------------------------------------

def test_own_request_of_unknown_submit_time_keeps_its_window(make_site, client) -> None:
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    mine = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                             "num_nodes": 8, "wall_time_min": 115, "job_mode": "mpi",
                                             "status_info": {"elastic_request": "backfill"}})
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 700}])
    runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|8|2:00:00\n"),
                           "squeue": result(stdout="700|PENDING|debug|8|1:55:00|local|1:55:00|N/A|N/A|N/A|Priority\n")})
    module = _slurm_module(site, client, runner)
    for _ in range(2):
        module.run_cycle()
    line = module.last_decision.log_line("backfill")
    assert _requests(client, site) == [(8, 115, "queued")], line  # not 16 nodes requested for 8 idle
    assert "8 nodes of them already requested by its BatchJobs not started yet" in line, line


def test_a_job_by_hand_of_unknown_submit_time_still_claims_nothing(make_site, client) -> None:
    """Made by hand at this site (not its own): its age is unknown, its queued_time_min 0 too."""
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "debug",
                                             "num_nodes": 4, "wall_time_min": 115, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 700}])
    runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|8|2:00:00\n"),
                           "squeue": result(stdout="700|PENDING|debug|4|1:55:00|local|1:55:00|N/A|N/A|N/A|Priority\n")})
    module = _slurm_module(site, client, runner)
    module.run_cycle()
    assert _requests(client, site) == [(8, 115, "pending_submission")], module.last_decision.log_line("backfill")
