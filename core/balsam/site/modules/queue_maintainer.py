"""The ``queue_maintainer`` agent module: keep a fixed number of BatchJobs queued at this site.

Each cycle (``submit_period`` seconds) it counts this site's BatchJobs in ``submit_queue`` that are
still active (pending_submission, queued, running, pending_deletion) and that this agent's scheduler
module would submit (their ``filter_tags`` include the site's ``filter_tags``: a BatchJob for other
tags is never submitted here, so it must not stand in for this one's), and, when fewer than
``num_queued_jobs``, creates one BatchJob (``num_nodes``, ``wall_time_min``, ``job_mode``,
``submit_project``, ``submit_queue`` and the site's ``filter_tags``). At most one per cycle, as in
Balsam 0.7, so a misconfiguration never floods the scheduler.

Before posting it checks the BatchJob against the site's ``scheduler`` settings
(``allowed_queues``, ``allowed_projects``: :func:`balsam.batch_job_rules.check_batch_job`, the rule
the scheduler module applies before submitting). A BatchJob the site would refuse is not posted (it
would only fail, every cycle); the reason is logged once at ERROR level, and again only when it
changes.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from ...batch_job_rules import BatchJobRefused, check_batch_job
from ...models import SUBMITTED_BY_KEY
from ...options import option
from ...states import ACTIVE_BATCH_JOB_STATES
from ..api_util import count
from ..module import AgentModule


#: The most BatchJobs kept queued: the API counts them in 32-bit integers (a queue's
#: max_queued_jobs has the same bound); 1e20 passed the check, and no scheduler queues that many.
MAX_NUM_QUEUED_JOBS = 2**31 - 1


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
        elif self.num_queued_jobs > MAX_NUM_QUEUED_JOBS:
            problems["num_queued_jobs"] = f"must be at most {MAX_NUM_QUEUED_JOBS}, got {self.num_queued_jobs!r}"
        return problems

    def validate_with(self, sections: dict[str, Any]) -> dict[str, str]:
        """The ``scheduler`` section's rules: BatchJobs they refuse are refused when settings.yml is
        read, not found by the agent one cycle at a time (``num_queued_jobs: 0`` submits nothing)."""
        scheduler = sections.get("scheduler")
        if scheduler is None or self.num_queued_jobs == 0:
            return {}
        request = {"queue": self.submit_queue, "project": self.submit_project, "num_nodes": self.num_nodes,
                   "wall_time_min": self.wall_time_min}
        try:
            check_batch_job(request, scheduler.allowed_queues, scheduler.allowed_projects,
                            scheduler.optional_batch_job_params)
        except BatchJobRefused as exc:
            reason = str(exc)
            field = next((name for prefix, name in _REFUSED_FIELD if reason.startswith(prefix)), "submit_queue")
            return {field: f"the scheduler section refuses its BatchJobs: {reason}"}
        return {}


#: This module's name in the BatchJobs it creates (status_info.submitted_by: ``queue ls``).
SUBMITTED_BY = "queue_maintainer"
#: Which of the section's keys a refusal of check_batch_job is about (by the start of its message).
_REFUSED_FIELD = (("num_nodes", "num_nodes"), ("wall_time_min", "wall_time_min"), ("project", "submit_project"))


class QueueMaintainerModule(AgentModule):
    section = "queue_maintainer"
    default_period = 60.0
    period_fields = ("submit_period",)
    options_schema = QueueMaintainerSettings
    section_comment = "Keeps a fixed number of BatchJobs queued. null disables it."
    enabled_by_default = False

    def __init__(self, site_config: Any, config: Any, client: Any) -> None:
        super().__init__(site_config, config, client)
        self._refusal: Optional[str] = None  # the reason last logged, so each is logged once

    def _refused(self, body: dict) -> Optional[str]:
        """Why the site's scheduler settings refuse ``body``, or None (None too when the site's
        settings are not at hand: the scheduler module still checks before submitting)."""
        settings = getattr(self.site_config, "settings", None)
        scheduler = getattr(settings, "scheduler", None)
        if scheduler is None:
            return None
        try:
            check_batch_job(body, scheduler.allowed_queues, scheduler.allowed_projects,
                            scheduler.optional_batch_job_params)
        except BatchJobRefused as exc:
            return str(exc)
        return None

    def run_cycle(self) -> Optional[float]:
        options: QueueMaintainerSettings = self.options
        queue = options.submit_queue
        settings = getattr(self.site_config, "settings", None)
        site_tags = {str(k): str(v) for k, v in dict(getattr(settings, "filter_tags", None) or {}).items()}
        body = {
            "site_id": self.site_id,
            "project": options.submit_project,
            "queue": queue,
            "num_nodes": options.num_nodes,
            "wall_time_min": options.wall_time_min,
            "job_mode": options.job_mode,
            "filter_tags": site_tags,
        }
        params: dict[str, Any] = {
            "site_id": self.site_id, "queue": queue, "state": sorted(s.value for s in ACTIVE_BATCH_JOB_STATES),
        }
        if site_tags:
            # Only the BatchJobs this agent's scheduler module submits (filter_tags include the site's).
            params["filter_tags"] = [f"{k}:{v}" for k, v in sorted(site_tags.items())]
        active = count(self.client, "/batch-jobs/", params)
        wanted = options.num_queued_jobs
        if active >= wanted:
            self.logger.debug("cycle: queue %r has %d of %d BatchJobs: nothing to submit", queue, active, wanted)
            return None
        refusal = self._refused(body)
        if refusal is not None:
            if refusal != self._refusal:
                self._refusal = refusal
                self.logger.error(
                    "queue_maintainer settings refused by the site's scheduler settings, nothing is submitted "
                    "until one of them changes: %s", refusal,
                )
            return None
        self._refusal = None
        # Marked as a program's (queue ls shows who submitted it: status_info.submitted_by, docs/cli.md).
        created = self.client.post("/batch-jobs/", json={**body, "status_info": {SUBMITTED_BY_KEY: SUBMITTED_BY}})
        self.logger.info(
            "queue has %d of %d BatchJobs: created BatchJob %s", active, wanted, (created or {}).get("id")
        )
        return None
