"""max_queued_jobs with Slurm ``queue_flag: --qos``: QOS names as Slurm lists them.

Under ``--qos`` the Slurm driver reports a job's QOS (squeue ``%q``) as its queue, so the user's
other jobs (another site's, by hand) count toward the QOS's ``max_queued_jobs``. Two ways they
were never counted:

- Slurm keeps QOS names in lower case: the real CI Slurm 22.05.8 lists ``sbatch --qos Normal`` as
  ``normal`` (/tmp/rqos/qos_case_real.py), so a settings.yml queue ``Normal`` matched none of
  them. The settings check now refuses it, in one line naming the key.
- A site's ``job_submit`` plugin may keep another QOS than the one asked for (``--qos regular``
  listed as ``gpu_regular``, docs/elastic.md): the site's own job counts toward its BatchJob's
  queue, the user's other jobs of that QOS counted only under ``gpu_regular``, which no limit
  names. They now also count toward each queue whose BatchJobs the poll lists under that name, as
  the elastic queue's window claims do.

Real API server and scheduler module, the real Slurm driver on replayed squeue / sbatch output in
its recorded 12-column shape (tests/schedulers/test_qos_squeue_column.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from balsam.config import SettingsError, loads_settings
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing import ReplayRunner, result
from balsam_scheduler_slurm import SlurmScheduler
from site_test_utils import batch_job, create_batch_job


def _line(job: int, qos: str) -> str:
    """One squeue line (``...|%e|%q|%r``) of the user's job pending for 3 minutes."""
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job}|PENDING|debug|1|1:55:00|local|1:55:00|{since}|N/A|N/A|{qos}|Priority\n"


def _settings(flag: str, queue: str) -> str:
    return ("scheduler:\n  name: slurm\n  options:\n    queue_flag: " + flag + "\n  allowed_queues:\n"
            f"    {queue}:\n      max_nodes: 64\n      max_walltime: 120\n      max_queued_jobs: 2\n")


def test_a_qos_queue_with_capitals_is_refused_in_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(_settings("--qos", "Normal"))
    assert len(info.value.errors) == 1, info.value.errors
    line = info.value.errors[0]
    assert "\n" not in line and line.startswith("settings.yml:5 scheduler.allowed_queues: 'Normal' is a QOS name"), line
    assert "write 'normal'" in line


@pytest.mark.parametrize("flag, queue", [("--qos", "normal"), ("--partition", "Normal")])
def test_a_lower_case_qos_and_a_partition_with_capitals_are_accepted(flag, queue) -> None:
    """Partition names keep their case in Slurm: only a QOS name is refused."""
    assert list(loads_settings(_settings(flag, queue)).scheduler.allowed_queues) == [queue]


def test_max_queued_jobs_counts_the_users_other_jobs_under_the_qos_its_own_jobs_show(make_site, client) -> None:
    """The site's own job 700 (a ``regular`` BatchJob, listed as ``gpu_regular``) and the user's
    other job 901 of that QOS: 2 jobs toward ``regular``'s limit of 2, so the third waits. Counted
    under ``gpu_regular`` alone, 901 counted toward no limit and the third went to sbatch."""
    site = make_site(overrides={"scheduler": {"name": "slurm", "options": {"queue_flag": "--qos"},
                                              "allowed_projects": ["local"], "allowed_queues": {
        "regular": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 2}}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 1\n")
    mine = create_batch_job(client, site.site_id, queue="regular")["id"]
    client.patch("/batch-jobs/", json=[{"id": mine, "state": "queued", "scheduler_id": 700}])
    sbatch: list[tuple] = []

    def run_sbatch(command):
        sbatch.append(command.args)
        return result(stdout="555\n")

    runner = ReplayRunner({"squeue": result(stdout=_line(700, "gpu_regular") + _line(901, "gpu_regular")),
                           "sbatch": run_sbatch, "sinfo": result(stdout="debug|up|idle|8|2:00:00\n")})
    module = SchedulerModule(site, site.settings.scheduler, client,
                             scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": "--qos"}))
    waiting = create_batch_job(client, site.site_id, queue="regular")["id"]
    module.run_cycle()
    record = batch_job(client, waiting)
    assert sbatch == [] and record["state"] == "pending_submission", record
    assert record["status_info"]["waiting"] == "waiting: 2 jobs already in queue 'regular' (max_queued_jobs 2)"


def test_a_job_of_another_qos_is_not_counted_toward_the_queue(make_site, client) -> None:
    """Only the name the site's own jobs show joins: the user's job of QOS premium does not count
    toward ``regular`` (one job there: the new BatchJob is submitted)."""
    site = make_site(overrides={"scheduler": {"name": "slurm", "options": {"queue_flag": "--qos"},
                                              "allowed_projects": ["local"], "allowed_queues": {
        "regular": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 2}}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 1\n")
    mine = create_batch_job(client, site.site_id, queue="regular")["id"]
    client.patch("/batch-jobs/", json=[{"id": mine, "state": "queued", "scheduler_id": 700}])
    sbatch: list[tuple] = []

    def run_sbatch(command):
        sbatch.append(command.args)
        return result(stdout="555\n")

    runner = ReplayRunner({"squeue": result(stdout=_line(700, "gpu_regular") + _line(901, "premium")),
                           "sbatch": run_sbatch, "sinfo": result(stdout="debug|up|idle|8|2:00:00\n")})
    module = SchedulerModule(site, site.settings.scheduler, client,
                             scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": "--qos"}))
    waiting = create_batch_job(client, site.site_id, queue="regular")["id"]
    module.run_cycle()
    assert len(sbatch) == 1 and batch_job(client, waiting)["state"] == "queued"
