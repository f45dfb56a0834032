"""A BatchJob `balsam queue term` marked (pending_deletion) while the scheduler cannot be read, or
while its delete command fails: the scheduler module recorded no outage for it (only queued and
running BatchJobs got "scheduler status unavailable"), so `balsam site stop`, which waits for the
marked BatchJobs unless the agent records that it cannot end them, heard nothing and waited its
whole cap. A failed delete's error also stayed on the BatchJob after the deletion went through.

Real components: the real local scheduler (its queue command run for real) behind a runner that
makes its ``status``/``delete`` commands fail as an unreachable scheduler's do, the real API; and a
real agent with `balsam site stop`, the local scheduler's state directory replaced by a file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import psutil

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.scheduler import Command, CommandResult, subprocess_runner
from balsam.site.modules.scheduler import SchedulerModule
from site_test_utils import assert_site_stop_says_it_cannot_end, batch_job, create_batch_job, wait_for

OUTAGE = "scheduler status unavailable"


class FailingRunner:
    """Runs the local scheduler's commands for real, except the verbs in ``failing``, which exit 1
    with a refusal as an unreachable scheduler's command does. Counts the deletes that ran."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.deletes_run: list[str] = []

    def __call__(self, command: Command) -> CommandResult:
        args = list(command.args)
        verb = args[args.index("--state-dir") + 2]
        if verb in self.failing:
            return CommandResult(tuple(args), 1, "", "cannot connect to the queue server: Connection refused")
        if verb == "delete":
            self.deletes_run.append(args[-1])
        return subprocess_runner(command)


def _sleeps(mark: str) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", mark]]


def test_pending_deletion_records_the_outage_and_is_deleted_once_it_ends(make_site, client, tmp_path) -> None:
    mark = f"{random.randint(100000, 999999)}.25"
    site = make_site()
    Path(site.job_template_path).write_text(f"#!/bin/bash\nexec sleep {mark}\n")
    runner = FailingRunner()
    scheduler = LocalScheduler(runner, state_dir=tmp_path / "queue")
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)
    try:
        bj = create_batch_job(client, site.site_id)["id"]
        for _ in range(2):  # submitted, then seen running
            module.run_cycle()
        assert batch_job(client, bj)["state"] == "running"
        client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])  # `balsam queue term`

        # The status poll fails: from the driver's threshold of failed polls on, the marked BatchJob
        # says so (as a queued or running one does), once (not rewritten every cycle).
        runner.failing = {"status", "delete"}
        for _ in range(scheduler.status_error_threshold):
            module.run_cycle()
        info = batch_job(client, bj)["status_info"]
        # Under a key of its own (`error` is the launcher's too).
        assert str(info.get("scheduler_status_error", "")).startswith(OUTAGE), info
        assert "Connection refused" in info["scheduler_status_error"] and "error" not in info
        module.run_cycle()
        assert batch_job(client, bj)["status_info"]["scheduler_status_error"] == info["scheduler_status_error"]
        assert runner.deletes_run == [] and len(_sleeps(mark)) == 1

        # The poll answers, the delete fails: the outage note gives way to the delete's error.
        runner.failing = {"delete"}
        module.run_cycle()
        record = batch_job(client, bj)
        assert record["state"] == "pending_deletion"
        assert record["status_info"]["error"].startswith("delete failed: "), record["status_info"]
        assert "scheduler_status_error" not in record["status_info"]
        assert "Connection refused" in record["status_info"]["error"]
        assert len(_sleeps(mark)) == 1

        # The scheduler answers again: the job is deleted (once), the error goes, the BatchJob ends.
        runner.failing = set()
        module.run_cycle()
        assert "error" not in batch_job(client, bj)["status_info"]
        wait_for(lambda: not _sleeps(mark), timeout=30, what="the deleted job's process to end")
        module.run_cycle()
        record = batch_job(client, bj)
        assert record["state"] == "finished" and record["end_time"], record
        assert "error" not in record["status_info"], record["status_info"]
        for _ in range(2):
            module.run_cycle()
        assert runner.deletes_run == [str(record["scheduler_id"])]
    finally:
        for process in _sleeps(mark):
            process.kill()


def test_site_stop_says_the_scheduler_is_unreachable_for_a_batch_job_marked_before_the_outage(
        make_site, agent_daemon, client) -> None:
    """The BatchJob is marked before the agent's status poll has failed its threshold of times (the
    case the outage record of a running BatchJob did not cover): `site stop` names the outage."""
    mark = f"{random.randint(100000, 999999)}.375"
    site = make_site()
    Path(site.job_template_path).write_text(f"#!/bin/bash\nexec sleep {mark}\n")
    agent_daemon(site)
    site_path = Path(site.site_path)
    state_dir = Path(os.environ["BALSAM_HOME"]) / "local-scheduler"
    kept = state_dir.with_name("local-scheduler.kept")

    def agent_log() -> str:
        return "\n".join(p.read_text() for p in (site_path / "log").glob("agent_*.log"))

    try:
        bj = create_batch_job(client, site.site_id)["id"]
        wait_for(lambda: batch_job(client, bj)["state"] == "running", timeout=60, what="the BatchJob to run")
        state_dir.rename(kept)
        state_dir.write_text("not a directory\n")  # every status poll and delete fails from now on
        # Marked after the first failed poll (logged at once), before the third (1 s apart).
        wait_for(lambda: "scheduler status poll failed" in agent_log(), timeout=30, what="a failed poll")
        client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])  # `balsam queue term --id`
        assert_site_stop_says_it_cannot_end(site_path, bj, OUTAGE)
    finally:
        if kept.exists():
            state_dir.unlink(missing_ok=True)
            kept.rename(state_dir)  # the teardown then ends the BatchJob's job
    for process in _sleeps(mark):
        process.kill()
