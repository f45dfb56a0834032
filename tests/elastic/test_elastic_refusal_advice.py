"""The ERROR line of a request the scheduler refused for good advised sizes for every refusal:
Slurm's "Invalid partition name specified" (submit_queue names a partition the cluster does not
have, found on the real Slurm) got "Make elastic_queue.max_num_nodes and max_wall_time_min ... fit
the scheduler's limits", which cannot help. A SchedulerError says only that a refusal is for good,
not why, so the advice names both causes after the scheduler's own words."""

from __future__ import annotations

import logging
from pathlib import Path

from balsam.scheduler import CommandResult
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_elastic.module import ElasticQueueModule
from balsam_scheduler_slurm import SlurmScheduler
from elastic_test_utils import batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
SLURM = Path(__file__).parent.parent / "schedulers" / "data" / "slurm"


def test_a_queue_the_scheduler_does_not_have_gets_queue_advice(make_site, client, caplog) -> None:
    runner = ReplayRunner({"sbatch": load_recorded(SLURM, "sbatch_bad_partition"),
                           "squeue": CommandResult(("squeue",), 0, "", ""), "sinfo": CommandResult(("sinfo",), 0, "", "")})
    slurm = SlurmScheduler(runner, user="root")
    # Listed in allowed_queues (site init wrote it, or a hand edit), unknown to Slurm.
    site = make_site(overrides={"scheduler": {"allowed_queues": {"nosuchpart": {"max_nodes": 4, "max_walltime": 60,
                                                                                "max_queued_jobs": 5}},
                                              "allowed_projects": ["root"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    scheduler = SchedulerModule(site, site.settings.scheduler, client, scheduler=slurm)
    elastic = ElasticQueueModule(site, {"submit_queue": "nosuchpart", "submit_project": "root", "use_backfill": False,
                                        "max_num_nodes": 1, "max_wall_time_min": 60}, client, scheduler=slurm)
    runnable_jobs(client, site, 1)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        elastic.run_cycle()
        scheduler.run_cycle()
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["submit_failed"]
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "Invalid partition name specified" in errors[0], errors
    assert "check elastic_queue.submit_queue and submit_project" in errors[0], errors
    # The size advice is still given, for the refusals it fits (QOSMaxNodePerJobLimit...).
    assert "make elastic_queue.max_num_nodes and max_wall_time_min" in errors[0], errors
