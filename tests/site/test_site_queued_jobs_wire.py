"""Site.queued_jobs entries keep Balsam 0.7's fields: the scheduler's ``message`` (not in 0.7's
SchedulerJobStatus) only when there is one. A 0.7 client under pydantic's extra="allow" (set by
importing libEnsemble's executor) refused the unknown key, so ``Site.objects.get`` failed while a
BatchJob was queued."""

from __future__ import annotations

from pathlib import Path

from balsam.scheduler import CommandResult
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing.replay import ReplayRunner
from balsam_scheduler_slurm import SlurmScheduler

QUEUED = "77|PENDING|debug|1|5:00|root|5:00|2026-12-04T03:54:55|N/A|N/A|None\n"
HELD = "78|PENDING|debug|1|5:00|root|5:00|2026-12-04T03:54:55|N/A|N/A|JobHeldUser\n"


def test_queued_jobs_carry_message_only_when_the_scheduler_gave_one(make_site, client) -> None:
    runner = ReplayRunner({"squeue": CommandResult(("squeue",), 0, QUEUED + HELD, ""),
                           "sinfo": CommandResult(("sinfo",), 0, "", "")})
    site = make_site(overrides={"scheduler": {"allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 30, "max_queued_jobs": 5}},
                                              "allowed_projects": ["root"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    SchedulerModule(site, site.settings.scheduler, client, scheduler=SlurmScheduler(runner, user="root")).run_cycle()
    queued = client.get(f"/sites/{site.site_id}")["queued_jobs"]
    assert "message" not in queued["77"] and queued["78"]["message"] == "JobHeldUser"
    assert set(queued["77"]) == {"scheduler_id", "state", "queue", "num_nodes", "wall_time_min", "project",
                                 "time_remaining_min", "queued_time_min"}
