"""The ``queue_maintainer`` agent module: keep a fixed number of BatchJobs queued at this site.

Each cycle (``submit_period`` seconds) it counts this site's BatchJobs in ``submit_queue`` that are
still active (pending_submission, queued, running, pending_deletion) and, when fewer than
``num_queued_jobs``, creates one BatchJob (``num_nodes``, ``wall_time_min``, ``job_mode``,
``submit_project``, ``submit_queue`` and the site's ``filter_tags``). At most one per cycle, as in
Balsam 0.7, so a misconfiguration never floods the scheduler.
"""

from __future__ import annotations

from typing import Optional

import attrs

from ...options import option
from ...states import ACTIVE_BATCH_JOB_STATES
from ..api_util import count
from ..module import AgentModule


@attrs.frozen
class QueueMaintainerSettings:
    """The ``queue_maintainer:`` section of settings.yml."""

    submit_period: int = option(60, "Seconds between two checks of the queue.")
    submit_project: str = option("local", "Project charged by the BatchJobs it submits.")
    submit_queue: str = option("local", "Queue it keeps filled.")
    job_mode: str = option("mpi", "Launcher job mode of the BatchJobs it submits: mpi or serial.")
    num_queued_jobs: int = option(5, "BatchJobs kept queued or running at all times.")
    num_nodes: int = option(1, "Nodes of each BatchJob.")
    wall_time_min: int = option(10, "Wall time of each BatchJob (minutes).")

    def validate(self) -> dict[str, str]:
        problems = {}
        if self.job_mode not in ("mpi", "serial"):
            problems["job_mode"] = f"expected 'mpi' or 'serial', got {self.job_mode!r}"
        for name in ("submit_period", "num_nodes", "wall_time_min"):
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        if self.num_queued_jobs < 0:  # 0: keep the module configured but submit nothing
            problems["num_queued_jobs"] = "must be at least 0"
        return problems


class QueueMaintainerModule(AgentModule):
    section = "queue_maintainer"
    default_period = 60.0
    period_fields = ("submit_period",)
    options_schema = QueueMaintainerSettings
    section_comment = "Keeps a fixed number of BatchJobs queued. null disables it."
    enabled_by_default = False

    def run_cycle(self) -> Optional[float]:
        options: QueueMaintainerSettings = self.options
        queue = options.submit_queue
        active = count(
            self.client,
            "/batch-jobs/",
            {"site_id": self.site_id, "queue": queue, "state": sorted(s.value for s in ACTIVE_BATCH_JOB_STATES)},
        )
        wanted = options.num_queued_jobs
        if active >= wanted:
            self.logger.debug("cycle: queue %r has %d of %d BatchJobs: nothing to submit", queue, active, wanted)
            return None
        settings = getattr(self.site_config, "settings", None)
        body = {
            "site_id": self.site_id,
            "project": options.submit_project,
            "queue": queue,
            "num_nodes": options.num_nodes,
            "wall_time_min": options.wall_time_min,
            "job_mode": options.job_mode,
            "filter_tags": dict(getattr(settings, "filter_tags", None) or {}),
        }
        created = self.client.post("/batch-jobs/", json=body)
        self.logger.info(
            "queue has %d of %d BatchJobs: created BatchJob %s", active, wanted, (created or {}).get("id")
        )
        return None
