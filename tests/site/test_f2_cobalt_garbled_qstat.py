"""The scheduler module with the real Cobalt driver, against the real API, fed a qstat poll with a
garbled line (review r3 of audit i4).

- A line of a queued job that lacks a column, beside a readable line of a finished job: the driver
  skipped it and the poll read as "that job left the queue"; with no history record (no
  ``.cobaltlog`` yet: a lagging or unwritable qsubmit directory) the BatchJob became submit_failed
  after three polls while its job still waited in Cobalt's queue. The line names its job and state:
  it is now that job's status.
- A line that names no job (a stray warning) is skipped and logged, as the other drivers do; the
  readable lines' BatchJobs go on being updated (a failed poll would stop them all).
"""

from __future__ import annotations

from pathlib import Path

from balsam.scheduler import CommandResult
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing.replay import ReplayRunner
from balsam_scheduler_cobalt import CobaltScheduler
from site_test_utils import batch_job, create_batch_job

QSTAT = Path(__file__).resolve().parents[1] / "schedulers" / "i4_recorded" / "cobalt_qstat_finished_and_garbled.txt"
QUEUES = {"default": {"max_nodes": 128, "max_walltime": 60, "max_queued_jobs": 5},
          "debug-cache-quad": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 5}}
#: The driver's tolerance of failed polls and missing records (Scheduler.status_error_threshold).
THRESHOLD = 3


def module_polling(make_site, client, qstat_stdout: str):
    runner = ReplayRunner({"qstat": CommandResult(("qstat",), 0, qstat_stdout, ""),
                           "nodelist": CommandResult(("nodelist",), 0, "", "")})
    site = make_site(overrides={"scheduler": {"allowed_queues": QUEUES, "allowed_projects": ["datascience"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 30\n")
    return site, SchedulerModule(site, site.settings.scheduler, client,
                                 scheduler=CobaltScheduler(runner, user="alice"))


def queued_batch_job(client, site_id: int, scheduler_id: int, state: str = "queued") -> int:
    bj = create_batch_job(client, site_id, project="datascience", queue="debug-cache-quad", num_nodes=8,
                          wall_time_min=30)["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": scheduler_id}])
    if state == "running":
        client.patch("/batch-jobs/", json=[{"id": bj, "state": "running"}])
    return bj


def test_a_queued_job_on_a_garbled_line_beside_a_finished_one_stays_queued(make_site, client) -> None:
    site, module = module_polling(make_site, client, QSTAT.read_text())
    bj = queued_batch_job(client, site.site_id, 498131)
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    record = batch_job(client, bj)
    assert (record["state"], record["scheduler_id"]) == ("queued", 498131), record
    assert not (record.get("status_info") or {}).get("error"), record["status_info"]


def test_a_line_naming_no_job_is_skipped_and_the_others_are_read(make_site, client) -> None:
    """A line tied to no job (a stray warning qstat printed on its output) is skipped and logged, as
    the other drivers do: the BatchJobs of the readable lines go on being updated, none is ended."""
    lines = QSTAT.read_text().splitlines()
    running = lines[2].replace("498110", "498131").replace("finished", "running ").replace("00:00:00", "00:21:13")
    stray = "WARNING: the qstat configuration file could not be read; using defaults"
    site, module = module_polling(make_site, client, "\n".join(lines[:2] + [running, stray]) + "\n")
    ours = queued_batch_job(client, site.site_id, 498131)
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    record = batch_job(client, ours)
    assert (record["state"], record["scheduler_id"]) == ("running", 498131), record
    assert not (record.get("status_info") or {}).get("error"), record["status_info"]
