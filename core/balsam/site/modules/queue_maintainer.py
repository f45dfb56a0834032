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

The scheduler's own refusals are read back, in a cycle that would submit only (one GET of the
queue's newest BatchJobs): when its newest BatchJob was refused for good by the scheduler
(``status_info.refused_for_good``, set by the scheduler module: a partition the scheduler does not
have, a QOS limit) and is one this module posted since the agent started (with the settings it
still has: a request of the previous agent's settings, refused after the restart that fixed them,
does not hold the fixed one), nothing more is posted until the agent restarts (one ERROR line); it
made a new BatchJob and an sbatch call every cycle, each refused alike. Its newest BatchJobs that
failed without a refusal (the scheduler unreachable through the scheduler module's tries) make it
wait ``submit_period``, doubled per such failure in a row, at most :data:`SUBMIT_BACKOFF_MAX_S`,
after the newest.
"""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any, Optional

import attrs

from ...batch_job_rules import BatchJobRefused, check_batch_job
from ...models import SUBMITTED_BY_KEY
from ...options import option
from ...scheduler import REFUSED_FOR_GOOD
from ...serialization import parse_datetime
from ...states import ACTIVE_BATCH_JOB_STATES, BatchJobState
from ..service_client import count, list_all, utcnow
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

    def warnings_with(self, sections: dict[str, Any]) -> dict[str, str]:
        """Its BatchJobs are only posted here; the scheduler module submits them: with ``scheduler:
        null`` they piled up in pending_submission, and nothing said why."""
        if "scheduler" in sections and sections["scheduler"] is None and self.num_queued_jobs > 0:
            return {"": "its BatchJobs would never be submitted: the scheduler module, which submits them, is "
                        "disabled (scheduler: null or left out); they would wait in pending_submission"}
        return {}

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
#: Longest wait (seconds) after its submissions failed without a refusal (the scheduler unreachable).
SUBMIT_BACKOFF_MAX_S = 30 * 60
#: Its newest BatchJobs of the queue read for refusals and failures (one request).
RECENT_READ_LIMIT = 20
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
        #: The BatchJobs this instance posted (its newest: the rows read back are the queue's newest
        #: RECENT_READ_LIMIT). Only a refusal of one of them holds it: a refusal of a request made
        #: before this start (settings.yml may have been fixed: a restart is how a change takes
        #: effect), even one the scheduler answers after it, is not held against the new settings.
        self._posted: collections.deque[int] = collections.deque(maxlen=RECENT_READ_LIMIT)

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
        # Only the BatchJobs this agent's scheduler module submits (filter_tags include the site's).
        # The API's filter is KEY:VALUE split at the first ':' (`a:b: c` read as tag a = "b:c"): a
        # key holding one is matched here, on the BatchJobs the other keys select, as the scheduler
        # module matches them (one listing of the queue's active ones instead of a count).
        server_tags = {k: v for k, v in site_tags.items() if ":" not in k}
        if server_tags:
            params["filter_tags"] = [f"{k}:{v}" for k, v in sorted(server_tags.items())]
        if len(server_tags) < len(site_tags):
            active = sum(1 for row in list_all(self.client, "/batch-jobs/", params) if _has_tags(row, site_tags))
        else:
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
        held = self._held_by_failures(params, site_tags)
        if held is not None:
            if held.startswith("BatchJob"):
                if held != self._refusal:
                    self._refusal = held
                    self.logger.error("%s", held)
            else:
                self.logger.info("cycle: queue %r has %d of %d BatchJobs: %s", queue, active, wanted, held)
            return None
        self._refusal = None
        # Marked as a program's (queue ls shows who submitted it: status_info.submitted_by, docs/cli.md).
        created = self.client.post("/batch-jobs/", json={**body, "status_info": {SUBMITTED_BY_KEY: SUBMITTED_BY}})
        if isinstance((created or {}).get("id"), int):
            self._posted.append(created["id"])
        self.logger.info(
            "queue has %d of %d BatchJobs: created BatchJob %s", active, wanted, (created or {}).get("id")
        )
        return None

    def _held_by_failures(self, params: dict[str, Any], site_tags: Optional[dict[str, str]] = None) -> Optional[str]:
        """Why no BatchJob is posted this cycle, or None, from its newest BatchJobs of the queue (one
        GET): its newest refused for good by the scheduler, when this instance posted it (the same
        request would be refused again), or a run of its newest failing without a refusal (a backoff)."""
        query = {k: v for k, v in params.items() if k != "state"}
        query.update(ordering="-id", limit=RECENT_READ_LIMIT)
        rows = (self.client.get("/batch-jobs/", params=query) or {}).get("results") or []
        streak, newest = 0, None
        for row in rows:
            info = row.get("status_info") or {}
            if info.get(SUBMITTED_BY_KEY) != SUBMITTED_BY or not _has_tags(row, site_tags or {}):
                continue  # not its own
            if row.get("state") != BatchJobState.submit_failed.value or row.get("scheduler_id") is not None:
                break  # a submission that reached the queue (or one not failed): the run ends
            failed_at = _when(info.get("error_time") or row.get("end_time"))
            if info.get(REFUSED_FOR_GOOD) == "true":
                if streak == 0 and row.get("id") in self._posted:
                    return (f"BatchJob {row['id']} ({row['num_nodes']} nodes x {row['wall_time_min']} min in queue "
                            f"{row['queue']!r}, project {row.get('project')!r}) was refused by the scheduler: "
                            f"{info.get('error') or 'no reason given'}. queue_maintainer posts no more BatchJobs: fix "
                            f"settings.yml queue_maintainer: (submit_queue, submit_project, num_nodes, wall_time_min) "
                            f"to fit the scheduler, then restart the agent")
                break
            if newest is None:
                newest = (row, failed_at)
            streak += 1
        if newest is None or newest[1] is None:
            return None
        wait = min(self.period * 2 ** min(streak - 1, 30), SUBMIT_BACKOFF_MAX_S)
        until = newest[1] + dt.timedelta(seconds=wait)
        if utcnow() >= until:
            return None
        error = (newest[0].get("status_info") or {}).get("error") or "no reason given"
        return (f"backing off after {streak} failed submission(s) in a row (BatchJob {newest[0]['id']}: {error}): "
                f"nothing posted until {until:%Y-%m-%d %H:%M:%S} UTC")


def _has_tags(batch_job: dict, site_tags: dict[str, str]) -> bool:
    """Whether the BatchJob's filter_tags include every one of ``site_tags``."""
    tags = batch_job.get("filter_tags") or {}
    return all(tags.get(k) == v for k, v in site_tags.items())


def _when(value: Any) -> Optional[dt.datetime]:
    try:
        when = parse_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when
