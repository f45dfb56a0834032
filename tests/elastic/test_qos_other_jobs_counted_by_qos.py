"""With ``queue_flag: --qos`` the user's other jobs claim windows by their QOS.

docs/elastic.md (Limits) said: "squeue shows a job's partition, never its QOS: until one of the
site's BatchJobs of submit_queue is listed in the poll, the user's other jobs of that QOS (another
site's requests) are not counted, and a window they wait for may be requested twice". squeue does
print the QOS (``%q``; tests/schedulers/test_qos_squeue_column.py has the real output): the Slurm
driver now reports it as a job's queue under ``queue_flag: --qos``, and the scheduler module's
``max_queued_jobs`` count, fed by the same poll, counts them by QOS too. Real API server, real
elastic and scheduler modules, the real Slurm driver on replayed squeue / sinfo / sbatch output in
the recorded 12-column shape."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing import ReplayRunner, result
from balsam_elastic.module import ElasticQueueModule
from balsam_scheduler_slurm import SlurmScheduler
from elastic_test_utils import batch_jobs_of, runnable_jobs
from site_test_utils import batch_job, create_batch_job

RULES = {"scheduler": {"name": "slurm", "options": {"queue_flag": "--qos"}, "allowed_queues": {
    "regular": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}}
#: 8 idle nodes of a partition the QOS reaches (Perlmutter's shape): under --qos, a window of any queue.
SINFO = "regular_milan_ss11|up|idle|8|2:00:00\nregular_milan_ss11|up|allocated|60|2:00:00\n"


def _line(job: int, minutes_ago: int, nodes: int = 8, qos: str = "regular", reason: str = "Priority",
          part: str = "regular_milan_ss11") -> str:
    """One squeue line of the driver's format (``...|%e|%q|%r``) of a pending job of the user."""
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job}|PENDING|{part}|{nodes}|1:55:00|local|1:55:00|{since}|N/A|N/A|{qos}|{reason}\n"


def _module(site, client, runner) -> ElasticQueueModule:
    return ElasticQueueModule(site, {"submit_queue": "regular", "max_num_nodes": 8, "max_wall_time_min": 120},
                              client, scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": "--qos"}))


def _requests(client, site) -> list[tuple[int, int]]:
    return sorted((b["num_nodes"], b["wall_time_min"]) for b in batch_jobs_of(client, site)
                  if "elastic_request" in (b["status_info"] or {}))


def _own_request(client, site, scheduler_id: int = 700) -> None:
    """The site's own backfill request of 2 nodes, queued as job ``scheduler_id``."""
    mine = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "regular",
                                             "num_nodes": 2, "wall_time_min": 115, "job_mode": "mpi",
                                             "status_info": {"elastic_request": "backfill"}})
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": scheduler_id}])


def _cycle(make_site, client, squeue: str, sinfo: str = SINFO,
           own_request: bool = False) -> tuple[ElasticQueueModule, Any]:
    """A site of RULES with 20 runnable jobs (and its own backfill request queued as job 700 if
    ``own_request``) after one elastic cycle on replayed ``squeue`` / ``sinfo``: ``(module, site)``."""
    site = make_site(overrides=RULES)
    runnable_jobs(client, site, 20)
    if own_request:
        _own_request(client, site)
    module = _module(site, client, ReplayRunner({"sinfo": result(stdout=sinfo), "squeue": result(stdout=squeue)}))
    module.run_cycle()
    return module, site


def test_another_sites_request_of_the_qos_claims_its_window_before_any_own_job_is_listed(make_site, client) -> None:
    """The user's other site asked for the 8 idle nodes 3 minutes ago (QOS regular); this site has
    no BatchJob in the queue. It was taken for a job of partition regular_milan_ss11, not of QOS
    regular: the same window was requested again, and one of the two waited until cancelled."""
    module, site = _cycle(make_site, client, _line(901, 3))
    line = module.last_decision.log_line("backfill")
    assert _requests(client, site) == [], line
    assert "8 nodes by the user's other jobs" in line, line


@pytest.mark.parametrize("qos", ["premium", "shared"])
def test_a_job_of_another_qos_in_the_same_partition_claims_nothing(make_site, client, qos) -> None:
    """Before any of the site's own jobs is listed the site does not know which partitions its
    QOS reaches (the windows are every partition's idle nodes): a job claims only if it is of its
    QOS (and waits in a partition the windows came from)."""
    module, site = _cycle(make_site, client, _line(901, 3, qos=qos))
    line = module.last_decision.log_line("backfill")
    assert _requests(client, site) == [(8, 115)], line
    assert "by the user's other jobs" not in line, line


def test_a_job_of_another_qos_in_the_partition_of_the_sites_own_job_claims_its_nodes(make_site, client) -> None:
    """For a window the partition is the key: the user's premium job waiting in the partition
    the site's own request is listed in takes those idle nodes (a QOS says which limits and
    priority a job has, not which nodes it may take). Left out, as when claims were by QOS alone,
    the 4 nodes were requested too, and that request waited until cancelled."""
    squeue = _line(700, 2, nodes=2) + _line(901, 3, nodes=4, qos="premium")
    module, site = _cycle(make_site, client, squeue, own_request=True)
    # 8 idle: 2 claimed by its own request, 4 by the premium job: 2 requested.
    assert _requests(client, site) == [(2, 115), (2, 115)], module.last_decision.log_line("backfill")


#: Perlmutter's shape: one QOS (regular) in the CPU and the GPU partitions; only CPU nodes idle.
SINFO_TWO_PARTITIONS = "regular_milan_ss11|up|idle|8|2:00:00\ngpu_ss11|up|allocated|16|2:00:00\n"


@pytest.mark.parametrize("own_job_listed", [False, True], ids=["before_an_own_job_is_listed", "own_job_listed"])
def test_a_job_of_the_qos_in_another_partition_claims_nothing(make_site, client, own_job_listed) -> None:
    """The user's GPU job of QOS regular (``--qos regular -C gpu``: partition gpu_ss11) can never
    take the idle CPU nodes; claimed by QOS alone, it held the CPU window (nothing or too little
    was requested for it), as before review r11 (commit 2e57d7a) when every queue claimed there."""
    squeue = _line(901, 3, nodes=4, reason="Resources", part="gpu_ss11")
    if own_job_listed:
        squeue = _line(700, 2, nodes=2) + squeue
    module, site = _cycle(make_site, client, squeue, SINFO_TWO_PARTITIONS, own_request=own_job_listed)
    line = module.last_decision.log_line("backfill")
    # 8 idle CPU nodes (less the own request's 2): all requested, none claimed by the GPU job.
    assert _requests(client, site) == ([(2, 115), (6, 115)] if own_job_listed else [(8, 115)]), line
    assert "by the user's other jobs" not in line, line


def test_a_job_sharing_only_a_partition_without_idle_nodes_with_the_sites_own_job_claims_nothing(
        make_site, client) -> None:
    """The site's own request waits in both partitions (``-p regular_milan_ss11,gpu_ss11``, or a
    job_submit plugin that adds every partition the QOS reaches); only the CPU nodes are idle. The
    user's premium job waits in gpu_ss11 alone: it shares a partition with the own request, but
    not one the windows came from, and can never take the idle CPU nodes. Counted by the shared
    partition alone (review of 9642518, F1), it claimed 4 of them and only 2 were requested."""
    squeue = (_line(700, 2, nodes=2, part="regular_milan_ss11,gpu_ss11")
              + _line(901, 3, nodes=4, qos="premium", part="gpu_ss11"))
    module, site = _cycle(make_site, client, squeue, SINFO_TWO_PARTITIONS, own_request=True)
    line = module.last_decision.log_line("backfill")
    # 8 idle CPU nodes, 2 claimed by its own request: the other 6 requested.
    assert _requests(client, site) == [(2, 115), (6, 115)], line
    assert "by the user's other jobs" not in line, line


def test_a_job_sharing_the_partition_with_idle_nodes_with_the_sites_own_job_claims_them(make_site, client) -> None:
    """The same own request (both partitions); the user's job waits in the CPU partition, the one
    with idle nodes: it claims its 4 of them, so 2 are requested."""
    squeue = (_line(700, 2, nodes=2, part="regular_milan_ss11,gpu_ss11")
              + _line(901, 3, nodes=4, qos="premium", part="regular_milan_ss11"))
    module, site = _cycle(make_site, client, squeue, SINFO_TWO_PARTITIONS, own_request=True)
    assert _requests(client, site) == [(2, 115), (2, 115)], module.last_decision.log_line("backfill")


def test_a_qos_the_site_renames_is_counted_under_the_name_its_own_jobs_show(make_site, client) -> None:
    """A site's job_submit plugin may set another QOS than the one asked for (``--qos regular``
    kept as ``gpu_regular``): the user's other job of the name the site's own request shows claims
    its 4 nodes, as a PBS routing queue's execution queue does."""
    squeue = _line(700, 2, nodes=2, qos="gpu_regular") + _line(901, 3, nodes=4, qos="gpu_regular")
    module, site = _cycle(make_site, client, squeue, own_request=True)
    # 8 idle: 2 claimed by its own request, 4 by the other job: 2 requested.
    assert _requests(client, site) == [(2, 115), (2, 115)], module.last_decision.log_line("backfill")


def test_the_scheduler_module_counts_the_users_other_jobs_of_the_qos_toward_max_queued_jobs(make_site,
                                                                                           client) -> None:
    """The same status poll feeds ``max_queued_jobs``: the user's 2 other jobs of QOS regular were
    counted under their partition, and a third job went to sbatch past the QOS's limit of 2."""
    site = make_site(overrides={"scheduler": {**RULES["scheduler"], "allowed_projects": ["local"], "allowed_queues": {
        "regular": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 2}}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 1\n")
    sbatch: list[tuple] = []

    def run_sbatch(command):
        sbatch.append(command.args)
        return result(stdout="555\n")

    runner = ReplayRunner({"squeue": result(stdout=_line(901, 3, nodes=1) + _line(902, 3, nodes=1)),
                           "sbatch": run_sbatch, "sinfo": result(stdout=SINFO)})
    module = SchedulerModule(site, site.settings.scheduler, client,
                             scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": "--qos"}))
    waiting = create_batch_job(client, site.site_id, queue="regular")["id"]
    module.run_cycle()
    record = batch_job(client, waiting)
    assert sbatch == [] and record["state"] == "pending_submission", record
    assert record["status_info"]["waiting"] == "waiting: 2 jobs already in queue 'regular' (max_queued_jobs 2)"
