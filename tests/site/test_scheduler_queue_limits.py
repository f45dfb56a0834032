"""A submission refused because a queue limit is reached waits; it is not a failed BatchJob.

Before, the scheduler module read "would exceed queue debug's per-user limit" (PBS) or
QOSMaxSubmitJobPerUserLimit (Slurm) as a permanent refusal: the BatchJob went to submit_failed,
and the elastic queue, seeing no capacity, created another, refused the same way. Now the queue
is held: its BatchJobs stay pending_submission with the scheduler's words in
``status_info["waiting"]``, are not tried again every cycle, and are submitted as soon as a status
poll lists fewer of the user's jobs in that queue (or after ``queue_limit_retry_sec``).

The hold is kept per (queue, project): a project at its own account/association limit must not
keep another project's BatchJobs of the queue from being tried. Only a limit on the user's own jobs,
refusing a BatchJob 3 times while the poll lists none of the user's jobs in ANY queue, fails it
("the request alone exceeds the limit"); a limit that counts jobs the poll does not show (group,
account, association, project, overall; the user's job in another partition under a shared QOS)
never does. A submit_failed BatchJob keeps no stale ``status_info["waiting"]``.

The retry time is moved by a fake clock standing in for the module's ``time`` (no sleeps).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import balsam.site.modules.scheduler as scheduler_module
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
SLURM = TESTS / "schedulers" / "data" / "slurm"
PBS = TESTS / "schedulers" / "data" / "pbs"
QUEUES = {"debug": {"max_nodes": 1, "max_walltime": 30, "max_queued_jobs": 5}}
#: The Slurm policy line sbatch prints under every limit reason (tests/schedulers/data/slurm).
SLURM_POLICY = ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, "
                "user's size and/or time limits)\n")
#: squeue's line for one pending job of the user (SQUEUE_FORMAT).
SQUEUE_LINE = "{id}|PENDING|{partition}|1|5:00|root|5:00|2026-12-04T03:54:55|N/A|N/A|{reason}"
NOTHING = CommandResult(("cmd",), 0, "", "")
PBS_NO_JOBS = CommandResult(("qstat",), 0, '{"Jobs": {}}', "")
PBS_NO_NODES = CommandResult(("pbsnodes",), 0, '{"nodes": {}}', "")


class FakeClock:
    """Stands in for the scheduler module's ``time``: ``monotonic()`` moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(scheduler_module, "time", fake)
    return fake


def slurm_refusal(reason: str) -> CommandResult:
    """sbatch's refusal by ``reason``, worded as the recorded ones are."""
    return CommandResult(("sbatch",), 1, "", f"sbatch: error: {reason}\n{SLURM_POLICY}")


def pbs_refusal(line: str) -> CommandResult:
    """qsub's refusal by an entity limit: exit code 38 (PBSE_ENTLIMCT), as the recorded ones."""
    return CommandResult(("qsub",), 38, "", f"{line}\n")


def make_module(make_site, client, scheduler, projects: list, script: str, **settings):
    site = make_site(overrides={"scheduler": {"allowed_queues": QUEUES, "allowed_projects": projects, **settings}})
    Path(site.job_template_path).write_text(script)
    return site, SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)


def test_a_pbs_per_user_limit_holds_the_queue_until_a_job_leaves(make_site, client, tmp_path, monkeypatch) -> None:
    """The fake PBS (real processes) enforces max_queued = [u:PBS_GENERIC=1] as qsub does.

    Each job runs until the test creates its release file (``released/<PBS job id>``): a job that
    ended on its own (``sleep 1``) could leave the queue before the cycle that must still see it
    listed, on a loaded machine, and the hold then lifted early. The test decides when each job
    leaves, and polls for its effect."""
    for key, value in fake_batch_env(TESTS / "fixtures" / "fake_pbs", tmp_path / "server", FAKE_BATCH_MAX_QUEUED="1",
                                     FAKE_BATCH_START_DELAY_SEC="0.1").items():
        monkeypatch.setenv(key, value)
    released = tmp_path / "released"
    released.mkdir()
    qsubs: list[tuple] = []

    def runner(command: Command) -> CommandResult:
        if command.args[0] == "qsub":
            qsubs.append(command.args)
        return subprocess_runner(command)

    # Bounded (60 s) so that a job the test never released (it failed) does not outlive it.
    script = ("#!/bin/bash\n"
              f'i=0; while [ ! -e "{released}/${{PBS_JOBID%%.*}}" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); '
              "done\n")
    site, module = make_module(make_site, client, PBSScheduler(runner), ["proj"], script)
    first, second, third = (create_batch_job(client, site.site_id, project="proj", queue="debug")["id"] for _ in range(3))

    def release(batch_job_id: int) -> None:
        """Let the BatchJob's scheduler job end, and wait until the fake PBS no longer lists it."""
        scheduler_id = str(batch_job(client, batch_job_id)["scheduler_id"])
        (released / scheduler_id).touch()
        wait_for(lambda: fakebatch.read_state()["jobs"].get(scheduler_id, {}).get("status") == "finished", timeout=30,
                 what=f"the scheduler job of BatchJob {batch_job_id} ended")

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

    release(first)
    module.run_cycle()  # the poll lists fewer of the user's jobs: the hold lifts
    assert batch_job(client, second)["state"] == "queued"
    assert batch_job(client, third)["state"] == "pending_submission"  # refused again behind the second
    assert len(qsubs) == 4

    release(second)
    module.run_cycle()
    assert batch_job(client, third)["state"] == "queued"
    assert len(qsubs) == 5
    states = {b: batch_job(client, b)["state"] for b in (first, second, third)}
    assert "submit_failed" not in states.values(), states
    assert len({j["id"] for j in fakebatch.read_state()["jobs"].values()}) == 3  # each submitted once
    release(third)


def test_a_limit_counting_jobs_listed_elsewhere_is_retried_after_queue_limit_retry_sec(make_site, client,
                                                                                        clock) -> None:
    """Recorded on the real Slurm: QOSMaxSubmitJobPerUserLimit, with the user's counted job in
    another partition (so no poll of 'debug' ever shrinks): the hold lifts on its retry time, again
    and again; the BatchJob is never failed (the poll lists a job of the user, in 'other')."""
    refused = load_recorded(SLURM, "sbatch_qos_submit_limit")
    runner = ReplayRunner({
        "sbatch": refused,
        "squeue": CommandResult(("squeue",), 0, SQUEUE_LINE.format(id=77, partition="other", reason="Priority") + "\n",
                                ""),
        "sinfo": NOTHING,
    })
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"], "#!/bin/bash\n",
                               queue_limit_retry_sec=60)
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    sbatches = lambda: [c.args[0] for c in runner.calls].count("sbatch")  # noqa: E731
    module.run_cycle()
    module.run_cycle()
    assert sbatches() == 1
    record = batch_job(client, bj)
    assert record["state"] == "pending_submission" and "error" not in record["status_info"]
    assert "QOSMaxSubmitJobPerUserLimit" in record["status_info"]["waiting"]
    for refusals in range(2, 7):  # twice the 3 refusals after which a request alone over the limit fails
        clock.now += 61
        module.run_cycle()
        assert sbatches() == refusals
        module.run_cycle()  # before the next retry time: not tried
        assert sbatches() == refusals
        record = batch_job(client, bj)
        assert record["state"] == "pending_submission", (refusals, record["status_info"])
        assert "error" not in record["status_info"]
        assert "QOSMaxSubmitJobPerUserLimit" in record["status_info"]["waiting"]


#: Refusals by limits that count jobs the user's status poll does not show (other users' of the
#: group, account or project; every user's): the poll listing none of the user's jobs proves nothing.
SHARED_LIMITS = [
    pytest.param("slurm", load_recorded(SLURM, "sbatch_assoc_submit_limit"),
                 id="slurm-AssocMaxSubmitJobLimit-recorded"),
    pytest.param("slurm", slurm_refusal("AssocGrpSubmitJobsLimit"), id="slurm-AssocGrpSubmitJobsLimit"),
    pytest.param("slurm", slurm_refusal("QOSGrpSubmitJobsLimit"), id="slurm-QOSGrpSubmitJobsLimit"),
    pytest.param("slurm", slurm_refusal("QOSMaxSubmitJobPerAccountLimit"), id="slurm-QOSMaxSubmitJobPerAccountLimit"),
    # OpenPBS's wordings (its test_entity_limits.py): group and project max_queued, a project's
    # max_queued_res, the overall max_queued, a per-user queued_jobs_threshold.
    pytest.param("pbs", pbs_refusal("qsub: Maximum number of jobs for group grp0 already in queue debug"),
                 id="pbs-max_queued-group"),
    pytest.param("pbs", pbs_refusal("qsub: would exceed queue debug's per-project limit"), id="pbs-max_queued-project"),
    pytest.param("pbs", pbs_refusal("qsub: would exceed project proj's limit on resource ncpus in complex"),
                 id="pbs-max_queued_res-project"),
    pytest.param("pbs", pbs_refusal("qsub: Maximum number of jobs already in queue debug"),
                 id="pbs-max_queued-overall"),
    pytest.param("pbs", load_recorded(PBS, "qsub_queued_threshold_user"), id="pbs-queued_jobs_threshold-recorded"),
]


def shared_limit_module(make_site, client, driver: str, refusal: CommandResult, **settings):
    """A module whose scheduler refuses every submission with ``refusal`` and lists no job at all."""
    if driver == "slurm":
        runner = ReplayRunner({"sbatch": refusal, "squeue": NOTHING, "sinfo": NOTHING})
        scheduler = SlurmScheduler(runner, user="root")
    else:
        runner = ReplayRunner({"qsub": refusal, "qstat": PBS_NO_JOBS, "pbsnodes": PBS_NO_NODES})
        scheduler = PBSScheduler(runner, user="alice")
    site, module = make_module(make_site, client, scheduler, ["proj"], "#!/bin/bash\n", **settings)
    return site, module, runner


@pytest.mark.parametrize("driver,refusal", SHARED_LIMITS)
def test_a_group_account_or_project_limit_never_fails_the_batch_job(make_site, client, clock, driver,
                                                                     refusal) -> None:
    """The poll lists none of the user's jobs anywhere, yet the limit may be full of other users'
    jobs: after 6 refusals (twice the "alone" threshold) the BatchJob still waits."""
    site, module, runner = shared_limit_module(make_site, client, driver, refusal, queue_limit_retry_sec=60)
    bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
    submits = lambda: len([c for c in runner.calls if c.args[0] in ("sbatch", "qsub")])  # noqa: E731
    for refusals in range(1, 7):
        module.run_cycle()
        assert submits() == refusals
        record = batch_job(client, bj)
        assert record["state"] == "pending_submission", (refusals, record["status_info"])
        assert "error" not in record["status_info"] and "at a scheduler limit" in record["status_info"]["waiting"]
        clock.now += 61


#: Limits on the user's own jobs: refused while the poll lists none of the user's jobs in any
#: queue, the request alone exceeds the limit.
PER_USER_LIMITS = [
    pytest.param("slurm", load_recorded(SLURM, "sbatch_qos_submit_limit"), id="slurm-QOSMaxSubmitJobPerUserLimit"),
    pytest.param("pbs", load_recorded(PBS, "qsub_max_queued_res_user"), id="pbs-max_queued_res-user"),
    pytest.param("pbs", load_recorded(PBS, "qsub_max_queued_named_user"), id="pbs-max_queued-named-user"),
]


@pytest.mark.parametrize("driver,refusal", PER_USER_LIMITS)
def test_a_request_alone_over_a_per_user_limit_fails_without_a_stale_waiting_note(make_site, client, clock, driver,
                                                                                   refusal) -> None:
    site, module, runner = shared_limit_module(make_site, client, driver, refusal, queue_limit_retry_sec=60)
    bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
    for _ in range(2):
        module.run_cycle()
        assert batch_job(client, bj)["state"] == "pending_submission"
        assert "at a scheduler limit" in batch_job(client, bj)["status_info"]["waiting"]
        clock.now += 61
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed"
    assert "the request alone exceeds the limit" in record["status_info"]["error"]
    assert "waiting" not in record["status_info"], record["status_info"]  # balsam queue ls -v showed both


def test_a_held_batch_job_that_fails_after_the_lift_keeps_no_waiting_note(make_site, client, clock) -> None:
    """Held by QOSMaxSubmitJobPerUserLimit (the user's job is listed in the queue), then refused for
    good at the retry (QOSMaxNodePerJobLimit): submit_failed with the error, and no "waiting"."""
    answers = iter([load_recorded(SLURM, "sbatch_qos_submit_limit"), load_recorded(SLURM, "sbatch_qos_node_limit")])
    runner = ReplayRunner({
        "sbatch": lambda command: next(answers),
        "squeue": CommandResult(("squeue",), 0, SQUEUE_LINE.format(id=77, partition="debug", reason="Priority") + "\n",
                                ""),
        "sinfo": NOTHING,
    })
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"], "#!/bin/bash\n",
                               queue_limit_retry_sec=60)
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    module.run_cycle()
    assert "QOSMaxSubmitJobPerUserLimit" in batch_job(client, bj)["status_info"]["waiting"]
    clock.now += 61
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed"
    assert record["status_info"]["error"].startswith("submit failed: sbatch refused the job: QOSMaxNodePerJobLimit: ")
    assert "waiting" not in record["status_info"], record["status_info"]


def test_a_project_at_its_association_limit_does_not_hold_another_projects_batch_jobs(make_site, client,
                                                                                       clock) -> None:
    """projA's association is at its MaxSubmitJobs (recorded AssocMaxSubmitJobLimit); projB's
    submissions go through. Before, the hold was the queue's: projA's lowest-id BatchJob was tried
    first at every retry, refused, and projB's BatchJobs were never tried."""
    refused = load_recorded(SLURM, "sbatch_assoc_submit_limit")
    listed = [SQUEUE_LINE.format(id=77, partition="debug", reason="AssocMaxJobsLimit")]
    submitted: list[str] = []

    def sbatch(command: Command) -> CommandResult:
        project = "projA" if "projA" in " ".join(command.args) else "projB"
        submitted.append(project)
        if project == "projA":
            return CommandResult(tuple(command.args), refused.returncode, refused.stdout, refused.stderr)
        job_id = 100 + len(submitted)
        listed.append(SQUEUE_LINE.format(id=job_id, partition="debug", reason="Priority"))
        return CommandResult(tuple(command.args), 0, f"{job_id}\n", "")

    runner = ReplayRunner({
        "sbatch": sbatch,
        "squeue": lambda command: CommandResult(tuple(command.args), 0, "\n".join(listed) + "\n", ""),
        "sinfo": NOTHING,
        "sacct": NOTHING,
    })
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["projA", "projB"],
                               "#!/bin/bash\n", queue_limit_retry_sec=60)
    a1, a2 = (create_batch_job(client, site.site_id, project="projA", queue="debug")["id"] for _ in range(2))
    b1, b2 = (create_batch_job(client, site.site_id, project="projB", queue="debug")["id"] for _ in range(2))
    module.run_cycle()
    assert submitted == ["projA", "projB", "projB"]  # a2 waits untried behind a1; projB is not held
    assert [batch_job(client, b)["state"] for b in (b1, b2)] == ["queued", "queued"]
    for a in (a1, a2):
        record = batch_job(client, a)
        assert record["state"] == "pending_submission" and "AssocMaxSubmitJobLimit" in record["status_info"]["waiting"]
    b3 = create_batch_job(client, site.site_id, project="projB", queue="debug")["id"]
    module.run_cycle()  # projA still held (its retry time has not come); projB's new BatchJob goes
    assert submitted == ["projA", "projB", "projB", "projB"] and batch_job(client, b3)["state"] == "queued"
    for retry in range(1, 5):  # each retry costs projA one refused submit, and fails nothing
        clock.now += 61
        module.run_cycle()
        assert submitted.count("projA") == 1 + retry
        assert [batch_job(client, a)["state"] for a in (a1, a2)] == ["pending_submission"] * 2


@pytest.mark.parametrize("squeue,expected,unexpected", [
    ("", "submitting again in 60 s (the status poll lists no job of yours in that queue",
     "fewer than the 0"),
    (SQUEUE_LINE.format(id=77, partition="debug", reason="Priority") + "\n",
     "submitting again when a status poll lists fewer than the 1 job of yours there, or in 60 s", "1 jobs"),
])
def test_the_hold_warning_says_when_the_queue_is_tried_again(make_site, client, clock, caplog, squeue, expected,
                                                             unexpected) -> None:
    runner = ReplayRunner({"sbatch": load_recorded(SLURM, "sbatch_assoc_submit_limit"),
                           "squeue": CommandResult(("squeue",), 0, squeue, ""), "sinfo": NOTHING})
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"], "#!/bin/bash\n",
                               queue_limit_retry_sec=60)
    create_batch_job(client, site.site_id, project="root", queue="debug")
    caplog.set_level(logging.INFO, logger="balsam.site.modules.scheduler")
    module.run_cycle()
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "the scheduler refused BatchJob" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert expected in warnings[0] and unexpected not in warnings[0], warnings[0]


def test_a_slurm_size_limit_still_fails_the_batch_job(make_site, client) -> None:
    runner = ReplayRunner({
        "sbatch": load_recorded(SLURM, "sbatch_qos_node_limit"),
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


def test_only_a_request_the_scheduler_refused_for_good_is_marked_so(make_site, client) -> None:
    """``status_info.refused_for_good`` (which the elastic queue reads: a request as large would be
    refused again) is set when the scheduler said no to the request itself (recorded on the real
    Slurm: QOSMaxNodePerJobLimit), not when sbatch kept timing out through the module's retries."""
    refused = load_recorded(SLURM, "sbatch_qos_node_limit")
    timing_out = load_recorded(SLURM, "synthetic_sbatch_timeout")
    runner = ReplayRunner({"sbatch": refused, "squeue": NOTHING, "sinfo": NOTHING})
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"], "#!/bin/bash\n")
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed" and record["status_info"].get("refused_for_good") == "true"

    runner.answers["sbatch"] = timing_out
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    for _ in range(module.threshold):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed" and "refused_for_good" not in record["status_info"], record
