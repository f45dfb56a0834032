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
import json
from pathlib import Path

import pytest

from balsam.config import SettingsError, loads_settings
from balsam.site.modules.scheduler import SchedulerModule
from balsam.scheduler import Command, CommandResult
from balsam.testing import ReplayRunner, result
from balsam.testing.replay import load_recorded
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler
from site_test_utils import batch_job, create_batch_job

#: Recorded scheduler output (tests/schedulers/data, see the READMEs there).
DATA = Path(__file__).resolve().parents[1] / "schedulers" / "data"


def _line(job: int, qos: str, part: str = "debug") -> str:
    """One squeue line (``...|%e|%q|%r``) of the user's job pending for 3 minutes."""
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{job}|PENDING|{part}|1|1:55:00|local|1:55:00|{since}|N/A|N/A|{qos}|Priority\n"


def _settings(flag: str, queue: str) -> str:
    return ("scheduler:\n  name: slurm\n  options:\n    queue_flag: " + flag + "\n  allowed_queues:\n"
            f"    {queue}:\n      max_nodes: 64\n      max_walltime: 120\n      max_queued_jobs: 2\n")


#: ``sinfo`` of an idle partition ``debug``: nodes for any queue the tests submit to.
SINFO_DEBUG = "debug|up|idle|8|2:00:00\n"


def _slurm_site(make_site, queue: str = "regular", queue_flag: str | None = "--qos"):
    """A site on Slurm (``queue_flag`` as given, none: partition mode) whose one allowed queue
    ``queue`` takes 2 queued jobs at most, with a job template."""
    scheduler = {"name": "slurm", "allowed_projects": ["local"], "allowed_queues": {
        queue: {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 2}}}
    if queue_flag:
        scheduler["options"] = {"queue_flag": queue_flag}
    site = make_site(overrides={"scheduler": scheduler})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 1\n")
    return site


def _queued(client, site, queue: str = "regular", scheduler_id: int = 700) -> int:
    """A BatchJob of ``queue`` already queued as Slurm job ``scheduler_id``: its id."""
    job = create_batch_job(client, site.site_id, queue=queue)["id"]
    client.patch("/batch-jobs/", json=[{"id": job, "state": "queued", "scheduler_id": scheduler_id}])
    return job


def _scheduler_module(site, client, squeue: str, sinfo: str = SINFO_DEBUG,
                      queue_flag: str | None = "--qos") -> tuple[SchedulerModule, list[tuple]]:
    """The site's scheduler module on the real Slurm driver, squeue / sinfo replayed; sbatch
    answers job 555: ``(module, sbatch)``, the arguments of each sbatch run."""
    sbatch: list[tuple] = []

    def run_sbatch(command):
        sbatch.append(command.args)
        return result(stdout="555\n")

    runner = ReplayRunner({"squeue": result(stdout=squeue), "sbatch": run_sbatch, "sinfo": result(stdout=sinfo)})
    options = {"queue_flag": queue_flag} if queue_flag else None
    return SchedulerModule(site, site.settings.scheduler, client,
                           scheduler=SlurmScheduler(runner, user="u", options=options)), sbatch


def test_a_qos_queue_with_capitals_is_refused_in_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(_settings("--qos", "Normal"))
    assert len(info.value.errors) == 1, info.value.errors
    line = info.value.errors[0]
    assert "\n" not in line, line
    assert line.startswith("settings.yml:6 scheduler.allowed_queues.Normal: 'Normal' is a QOS name"), line
    assert "write 'normal'" in line


#: Three queues, two of them with capitals (on lines 7 and 11).
THREE_QUEUES = """scheduler:
  name: slurm
  options:
    queue_flag: --qos
  allowed_queues:
    regular: {max_nodes: 64, max_walltime: 120, max_queued_jobs: 2}
    Normal:
      max_nodes: 64
      max_walltime: 120
      max_queued_jobs: 2
    Premium: {max_nodes: 8, max_walltime: 60, max_queued_jobs: 1}
"""


def test_each_qos_queue_with_capitals_is_refused_on_its_own_line() -> None:
    """Each bad queue is named at its own line, as a queue's bad max_nodes is
    (``settings.yml:15 scheduler.allowed_queues.Premium.max_nodes: ...``). Review of 9642518 (F3):
    one error, for the first queue only, on the line of ``allowed_queues:``
    (``settings.yml:5 scheduler.allowed_queues: 'Normal' ...``): a user fixed it, and the next
    check found the next one."""
    with pytest.raises(SettingsError) as info:
        loads_settings(THREE_QUEUES)
    assert info.value.errors == [
        "settings.yml:7 scheduler.allowed_queues.Normal: 'Normal' is a QOS name (queue_flag: --qos), which Slurm "
        "lists in lower case: write 'normal'",
        "settings.yml:11 scheduler.allowed_queues.Premium: 'Premium' is a QOS name (queue_flag: --qos), which "
        "Slurm lists in lower case: write 'premium'",
    ], info.value.errors


def test_after_the_rename_a_pending_batch_job_of_the_old_name_is_refused(make_site, client) -> None:
    """The upgrade path docs/schedulers/slurm.md gives: the queue renamed in settings.yml
    (``Normal`` -> ``normal``), a BatchJob still waiting for submission under the old name is
    refused as not in allowed_queues (submit_failed, its error says why), never submitted; it is
    to be submitted again under the new name. One already queued under the old name is followed
    as before (the queue is checked at submission only)."""
    site = _slurm_site(make_site, "normal")
    old = create_batch_job(client, site.site_id, queue="Normal")["id"]
    queued = _queued(client, site, "Normal")
    module, sbatch = _scheduler_module(site, client, _line(700, "normal"))
    module.run_cycle()
    record = batch_job(client, old)
    assert sbatch == [] and record["state"] == "submit_failed", record
    assert record["status_info"]["error"] == "refused: queue 'Normal' is not in the site's allowed_queues (normal)"
    still = batch_job(client, queued)
    assert still["state"] == "queued" and "error" not in (still["status_info"] or {}), still


@pytest.mark.parametrize("flag, queue", [("--qos", "normal"), ("--partition", "Normal")])
def test_a_lower_case_qos_and_a_partition_with_capitals_are_accepted(flag, queue) -> None:
    """Partition names keep their case in Slurm: only a QOS name is refused."""
    assert list(loads_settings(_settings(flag, queue)).scheduler.allowed_queues) == [queue]


def test_max_queued_jobs_counts_the_users_other_jobs_under_the_qos_its_own_jobs_show(make_site, client) -> None:
    """The site's own job 700 (a ``regular`` BatchJob, listed as ``gpu_regular``) and the user's
    other job 901 of that QOS: 2 jobs toward ``regular``'s limit of 2, so the third waits. Counted
    under ``gpu_regular`` alone, 901 counted toward no limit and the third went to sbatch."""
    site = _slurm_site(make_site)
    _queued(client, site)
    module, sbatch = _scheduler_module(site, client, _line(700, "gpu_regular") + _line(901, "gpu_regular"))
    waiting = create_batch_job(client, site.site_id, queue="regular")["id"]
    module.run_cycle()
    record = batch_job(client, waiting)
    assert sbatch == [] and record["state"] == "pending_submission", record
    assert record["status_info"]["waiting"] == "waiting: 2 jobs already in queue 'regular' (max_queued_jobs 2)"


def test_a_job_of_another_qos_is_not_counted_toward_the_queue(make_site, client) -> None:
    """Only the name the site's own jobs show joins: the user's job of QOS premium does not count
    toward ``regular`` (one job there: the new BatchJob is submitted)."""
    site = _slurm_site(make_site)
    _queued(client, site)
    module, sbatch = _scheduler_module(site, client, _line(700, "gpu_regular") + _line(901, "premium"))
    waiting = create_batch_job(client, site.site_id, queue="regular")["id"]
    module.run_cycle()
    assert len(sbatch) == 1 and batch_job(client, waiting)["state"] == "queued"


# -- every driver and mode: the name the site's own jobs are listed under -------------------------
# (docs/settings.md: max_queued_jobs counts the scheduler's jobs of a queue, whatever name the
# scheduler lists them under. Kept general by decision after the review of 9642518, F2: these
# tests state it for the two other cases the review named.)


@pytest.mark.parametrize("listed_as, submitted", [("regular", 1), ("regular_milan_ss11", 0)])
def test_partition_mode_counts_the_users_jobs_of_the_partition_its_own_jobs_are_listed_in(
        make_site, client, listed_as, submitted) -> None:
    """Partition mode (``queue_flag: --partition``): the site's ``regular`` job is listed in
    partition ``regular_milan_ss11`` (a job_submit plugin's rewrite), where the user's other job
    901 waits too: 901 counts toward ``regular`` (2 of 2: the new BatchJob waits). Where the own job
    is listed as ``regular``, 901 is another partition's and the new BatchJob is submitted."""
    site = _slurm_site(make_site, queue_flag=None)
    _queued(client, site)
    squeue = _line(700, "normal", part=listed_as) + _line(901, "normal", part="regular_milan_ss11")
    module, sbatch = _scheduler_module(site, client, squeue, sinfo="regular|up|idle|8|2:00:00\n", queue_flag=None)
    waiting = create_batch_job(client, site.site_id, queue="regular")["id"]
    module.run_cycle()
    record = batch_job(client, waiting)
    assert len(sbatch) == submitted, record
    if not submitted:
        assert record["status_info"]["waiting"] == "waiting: 2 jobs already in queue 'regular' (max_queued_jobs 2)"


def test_a_pbs_routing_queue_counts_the_users_jobs_of_the_execution_queue_its_own_jobs_are_listed_in(
        make_site, client) -> None:
    """Polaris: ``-q prod`` is a routing queue; qstat lists the site's job in the execution queue it
    was routed to (``small``), where the user's other job (another site's, by hand) is listed too:
    it counts toward ``prod`` (2 of 2: the next BatchJob waits). Before any of the site's jobs is
    listed it counts toward ``small`` only (the first BatchJob is submitted)."""
    doc = json.loads(load_recorded(DATA / "pbs", "qstat_f_json_routed.txt").stdout)
    own_id, other_id = list(doc["Jobs"])
    in_queue = {other_id: doc["Jobs"][other_id]}  # the user's other job, queued in small
    submitted: list[str] = []

    def qsub(command: Command) -> CommandResult:
        submitted.append(own_id)
        in_queue[own_id] = doc["Jobs"][own_id]
        return CommandResult(tuple(command.args), 0, own_id + "\n", "")

    def qstat(command: Command) -> CommandResult:
        return CommandResult(tuple(command.args), 0, json.dumps({**doc, "Jobs": in_queue}), "")

    pbs = PBSScheduler(ReplayRunner({"qsub": qsub, "qstat": qstat,
                                     "pbsnodes": load_recorded(DATA / "pbs", "pbsnodes_a_json")}), user="alice")
    site = make_site(overrides={"scheduler": {"allowed_projects": ["datascience"], "allowed_queues": {
        "prod": {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 2}}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 1\n")
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=pbs)
    first = create_batch_job(client, site.site_id, project="datascience", queue="prod")["id"]
    module.run_cycle()
    assert submitted == [own_id] and batch_job(client, first)["state"] == "queued"
    second = create_batch_job(client, site.site_id, project="datascience", queue="prod")["id"]
    module.run_cycle()
    record = batch_job(client, second)
    assert submitted == [own_id] and record["state"] == "pending_submission", record
    assert record["status_info"]["waiting"] == "waiting: 2 jobs already in queue 'prod' (max_queued_jobs 2)"
