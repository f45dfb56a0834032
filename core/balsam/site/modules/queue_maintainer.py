"""The ``queue_maintainer`` agent module: keep a fixed number of BatchJobs queued at this site.

Each cycle (``submit_period`` seconds) it counts this site's BatchJobs in ``submit_queue`` that are
still active (pending_submission, queued, running, pending_deletion) and, when fewer than
``num_queued_jobs``, creates one BatchJob (``num_nodes``, ``wall_time_min``, ``job_mode``,
``submit_project``, ``submit_queue`` and the site's ``filter_tags``). At most one per cycle, as in
Balsam 0.7, so a misconfiguration never floods the scheduler.
"""

from __future__ import annotations

from typing import Optional

from ...states import ACTIVE_BATCH_JOB_STATES
from ..api_util import count
from ..module import AgentModule, config_value


class QueueMaintainerModule(AgentModule):
    section = "queue_maintainer"
    default_period = 60.0
    period_fields = ("submit_period", "service_period")

    def run_cycle(self) -> Optional[float]:
        queue = config_value(self.config, "submit_queue", "local")
        active = count(
            self.client,
            "/batch-jobs/",
            {"site_id": self.site_id, "queue": queue, "state": sorted(s.value for s in ACTIVE_BATCH_JOB_STATES)},
        )
        wanted = int(config_value(self.config, "num_queued_jobs", 1))
        if active >= wanted:
            self.logger.debug("cycle: queue %r has %d of %d BatchJobs: nothing to submit", queue, active, wanted)
            return None
        settings = getattr(self.site_config, "settings", None)
        body = {
            "site_id": self.site_id,
            "project": config_value(self.config, "submit_project", "local"),
            "queue": queue,
            "num_nodes": int(config_value(self.config, "num_nodes", 1)),
            "wall_time_min": int(config_value(self.config, "wall_time_min", 1)),
            "job_mode": str(getattr(config_value(self.config, "job_mode", "mpi"), "value", config_value(self.config, "job_mode", "mpi"))),
            "filter_tags": dict(getattr(settings, "filter_tags", None) or {}),
        }
        created = self.client.post("/batch-jobs/", json=body)
        self.logger.info(
            "queue has %d of %d BatchJobs: created BatchJob %s", active, wanted, (created or {}).get("id")
        )
        return None
