"""A submission refused because a queue limit is reached waits; it is not a failed BatchJob.

Before, the scheduler module read "would exceed queue debug's per-user limit" (PBS) or
QOSMaxSubmitJobPerUserLimit (Slurm) as a permanent refusal: the BatchJob went to submit_failed,
and the elastic queue, seeing no capacity, created another, refused the same way. Now the queue
is held: its BatchJobs stay pending_submission with the scheduler's words in
``status_info["waiting"]``, are not tried again every cycle, and are submitted as soon as a status
poll lists fewer of the user's jobs in that queue (or after ``queue_limit_retry_sec``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from balsam.config.settings import SettingsError, loads_settings
from balsam.scheduler import Command, CommandResult, subprocess_runner
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing import fakebatch
from balsam.testing.fakebatch import fake_batch_env
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler
from site_test_utils import batch_job, create_batch_job, wait_for

TESTS = Path(__file__).resolve().parents[1]
QUEUES = {"debug": {"max_nodes": 1, "max_walltime": 30, "max_queued_jobs": 5}}


def make_module(make_site, client, scheduler, projects: list, script: str, **settings):
    site = make_site(overrides={"scheduler": {"allowed_queues": QUEUES, "allowed_projects": projects, **settings}})
    Path(site.job_template_path).write_text(script)
    return site, SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)


def test_a_pbs_per_user_limit_holds_the_queue_until_a_job_leaves(make_site, client, tmp_path, monkeypatch) -> None:
    """The fake PBS (real processes) enforces max_queued = [u:PBS_GENERIC=1] as qsub does."""
    for key, value in fake_batch_env(TESTS / "fixtures" / "fake_pbs", tmp_path / "server", FAKE_BATCH_MAX_QUEUED="1",
                                     FAKE_BATCH_START_DELAY_SEC="0.1").items():
        monkeypatch.setenv(key, value)
    qsubs: list[tuple] = []

    def runner(command: Command) -> CommandResult:
        if command.args[0] == "qsub":
            qsubs.append(command.args)
        return subprocess_runner(command)

    site, module = make_module(make_site, client, PBSScheduler(runner), ["proj"], "#!/bin/bash\nsleep 1\n")
    first, second, third = (create_batch_job(client, site.site_id, project="proj", queue="debug")["id"] for _ in range(3))

    module.run_cycle()
    assert batch_job(client, first)["state"] == "queued"
    for waiting in (second, third):
        record = batch_job(client, waiting)
        assert record["state"] == "pending_submission" and "error" not in record["status_info"]
        assert record["status_info"]["waiting"] == (
            "waiting: queue 'debug' is at a scheduler limit: qsub refused the job: would exceed queue debug's per-user limit")
    assert len(qsubs) == 2  # the third was not tried: the queue is held

    module.run_cycle()  # the first job is still listed: nothing is tried
    assert len(qsubs) == 2

    def second_submitted() -> bool:
        module.run_cycle()
        return batch_job(client, second)["state"] == "queued"

    wait_for(second_submitted, timeout=30, what="the second BatchJob submitted once the first left the queue")
    assert batch_job(client, third)["state"] == "pending_submission"  # refused again behind the second
    assert len(qsubs) == 4
    wait_for(lambda: module.run_cycle() or batch_job(client, third)["state"] == "queued", timeout=30,
             what="the third BatchJob submitted")
    assert len(qsubs) == 5
    states = {b: batch_job(client, b)["state"] for b in (first, second, third)}
    assert "submit_failed" not in states.values(), states
    assert len({j["id"] for j in fakebatch.read_state()["jobs"].values()}) == 3  # each submitted once


def test_a_limit_counting_jobs_listed_elsewhere_is_retried_after_queue_limit_retry_sec(make_site, client) -> None:
    """Recorded on the real Slurm: QOSMaxSubmitJobPerUserLimit, with the user's counted job in
    another partition (so no poll of 'debug' ever shrinks): the hold lifts on its retry time."""
    refused = load_recorded(TESTS / "schedulers" / "data" / "slurm", "sbatch_qos_submit_limit")
    runner = ReplayRunner({
        "sbatch": refused,
        "squeue": CommandResult(("squeue",), 0, "77|PENDING|other|1|5:00|root|5:00|2026-12-04T03:54:55|N/A|N/A|Priority\n", ""),
        "sinfo": CommandResult(("sinfo",), 0, "", ""),
    })
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"], "#!/bin/bash\n",
                               queue_limit_retry_sec=1)
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    sbatches = lambda: [c.args[0] for c in runner.calls].count("sbatch")  # noqa: E731
    module.run_cycle()
    module.run_cycle()
    assert sbatches() == 1
    record = batch_job(client, bj)
    assert record["state"] == "pending_submission" and "error" not in record["status_info"]
    assert "QOSMaxSubmitJobPerUserLimit" in record["status_info"]["waiting"]
    time.sleep(1.1)
    module.run_cycle()
    assert sbatches() == 2 and batch_job(client, bj)["state"] == "pending_submission"


def test_a_slurm_size_limit_still_fails_the_batch_job(make_site, client) -> None:
    runner = ReplayRunner({
        "sbatch": load_recorded(TESTS / "schedulers" / "data" / "slurm", "sbatch_qos_node_limit"),
        "squeue": CommandResult(("squeue",), 0, "", ""),
        "sinfo": CommandResult(("sinfo",), 0, "", ""),
    })
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"], "#!/bin/bash\n")
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed"
    assert record["status_info"]["error"].startswith("submit failed: sbatch refused the job: QOSMaxNodePerJobLimit: ")


@pytest.mark.parametrize("value", [0, -5])
def test_queue_limit_retry_sec_is_checked(value) -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(f"scheduler:\n  queue_limit_retry_sec: {value}\n")
    assert str(info.value) == f"settings.yml:2 scheduler.queue_limit_retry_sec: must be at least 1, got {value}"
