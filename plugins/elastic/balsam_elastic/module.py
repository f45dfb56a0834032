"""The ``elastic_queue`` agent module: BatchJobs created and cancelled as the backlog asks.

Each cycle (``elastic_queue.service_period`` seconds) it reads, in bulk:

- this site's BatchJobs in ``submit_queue`` whose ``filter_tags`` contain the site's (one GET);
- the backlog in numbers, ``GET /sites/{id}/backlog`` with the site's ``filter_tags`` (one aggregate
  query on the server, whatever the number of jobs);
- from the site's scheduler driver (``settings.yml`` ``scheduler:`` name and options): one status poll
  (how long each queued BatchJob has waited) and, for strategies that use them, the backfill windows
  of ``submit_queue`` (plus those a driver reports for any queue, key ``*``, as PBS does for nodes
  not tied to a queue).

The strategy (:mod:`balsam_elastic.strategy`) turns that snapshot into a decision; the module creates
the BatchJobs it asks for (carrying the site's ``filter_tags``, so the launchers run only this site's
matching jobs) and marks the cancelled ones ``pending_deletion`` in one bulk PATCH (the scheduler
module then deletes them from the scheduler). Every cycle logs one INFO line: the action or
"nothing", the reason, and the numbers it was based on. Launchers release their nodes themselves
after ``launcher.idle_ttl_sec`` without work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import attrs

from balsam.batch_job_rules import BatchJobRefused, check_batch_job
from balsam.models import BackfillWindow
from balsam.options import build_options
from balsam.serialization import parse_datetime
from balsam.site.api_util import bulk_patch, list_all, utcnow
from balsam.site.module import AgentModule
from balsam.states import BatchJobState, JobState

from .options import ElasticQueueOptions
from .strategy import Backlog, BatchJobView, Decision, Snapshot, load_strategy

#: The key under which a driver reports windows usable from any queue (PBS nodes without a queue).
ANY_QUEUE = "*"
#: BatchJob states the module reads (finished ones no longer matter).
READ_STATES = [s.value for s in (BatchJobState.pending_submission, BatchJobState.queued, BatchJobState.running,
                                 BatchJobState.pending_deletion)]
RUNNABLE = (JobState.preprocessed.value, JobState.restart_ready.value)
#: status_info key and value marking a BatchJob submitted to wait in the regular queue.
REQUEST_KIND, REGULAR_QUEUE = "elastic_request", "regular_queue"


def as_options(config: Any) -> ElasticQueueOptions:
    """The section as an :class:`ElasticQueueOptions` (the settings loader builds one; a dict or
    another attrs section with the same keys is converted, unknown keys refused)."""
    if isinstance(config, ElasticQueueOptions):
        return config
    if config is None:
        return ElasticQueueOptions()
    if not isinstance(config, dict):
        config = attrs.asdict(config, recurse=False)
    options = build_options(ElasticQueueOptions, config, where="elastic_queue")
    problems = options.validate()
    if problems:
        key, text = next(iter(problems.items()))
        raise ValueError(f"elastic_queue.{key}: {text}")
    return options


class ElasticQueueModule(AgentModule):
    section = "elastic_queue"
    default_period = 60.0
    period_fields = ("service_period",)
    options_schema = ElasticQueueOptions
    section_comment = ("Submits BatchJobs sized to the runnable backlog (strategy backfill: fitted to the scheduler's "
                       "backfill windows; simple: fixed blocks). null disables it. See docs/elastic.md.")
    enabled_by_default = False

    def __init__(self, site_config: Any, config: Any, client: Any, *, scheduler: Any = None) -> None:
        options = as_options(config)
        super().__init__(site_config, options, client)
        self.strategy = load_strategy(options)
        self._scheduler = scheduler
        self.last_decision: Optional[Decision] = None
        #: Clamp and refusal messages already logged: each is logged once, not every cycle.
        self._reported: set[str] = set()

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        if self._scheduler is None:
            self._scheduler = self.site_scheduler()
        return self._scheduler

    def filter_tags(self) -> dict[str, str]:
        return dict(getattr(getattr(self.site_config, "settings", None), "filter_tags", None) or {})

    def _tag_params(self) -> list[str]:
        return [f"{k}:{v}" for k, v in sorted(self.filter_tags().items())]

    def read_backlog(self) -> Backlog:
        params: dict[str, Any] = {"state": [*RUNNABLE, JobState.running.value]}
        if self.filter_tags():
            params["tags"] = self._tag_params()
        states = (self.client.get(f"/sites/{self.site_id}/backlog", params=params) or {}).get("states") or {}
        runnable = [states[s] for s in RUNNABLE if s in states]
        running = states.get(JobState.running.value) or {}
        oldest = min((parse_datetime(r["oldest_last_update"]) for r in runnable if r.get("oldest_last_update")), default=None)
        waited = max(0.0, (utcnow() - oldest).total_seconds() / 60) if oldest is not None else 0.0
        return Backlog(
            runnable_count=sum(int(r["count"]) for r in runnable),
            runnable_footprint=sum(float(r["footprint"]) for r in runnable),
            min_runnable_nodes=min((int(r["min_num_nodes"]) for r in runnable), default=0),
            max_runnable_nodes=max((int(r["max_num_nodes"]) for r in runnable), default=0),
            running_count=int(running.get("count", 0)),
            running_footprint=float(running.get("footprint", 0.0)),
            oldest_runnable_wait_min=waited,
        )

    def read_batch_jobs(self) -> list[dict]:
        params: dict[str, Any] = {"site_id": self.site_id, "queue": self.options.submit_queue, "state": READ_STATES}
        if self.filter_tags():
            params["filter_tags"] = self._tag_params()
        return list_all(self.client, "/batch-jobs/", params)

    def read_queued_times(self) -> dict[int, int]:
        """scheduler id -> minutes queued (empty when the poll failed: nothing is then cancelled)."""
        try:
            statuses = self.scheduler.get_statuses()
        except Exception as exc:  # the drivers raise SchedulerError only; never let a cycle die of it
            self.logger.warning("scheduler status poll failed: %s (no stale BatchJob is cancelled this cycle)", exc)
            return {}
        return {int(sid): int(getattr(st, "queued_time_min", 0) or 0) for sid, st in (statuses or {}).items()
                if getattr(getattr(st, "state", None), "value", getattr(st, "state", None)) == BatchJobState.queued.value}

    def read_windows(self) -> tuple[Optional[tuple[BackfillWindow, ...]], str]:
        if not self.options.use_backfill or not self.strategy.uses_backfill_windows:
            return (), ""
        try:
            windows = self.scheduler.get_backfill_windows() or {}
        except Exception as exc:
            return None, str(exc)
        found: list[BackfillWindow] = []
        # A driver may name its "usable from any queue" key (PBS's any_queue_key option).
        any_queue = str(getattr(getattr(self.scheduler, "options", None), "any_queue_key", ANY_QUEUE) or ANY_QUEUE)
        for key in dict.fromkeys((self.options.submit_queue, any_queue, ANY_QUEUE)):
            for w in windows.get(key, ()):
                found.append(w if isinstance(w, BackfillWindow) else
                             BackfillWindow(num_nodes=int(w["num_nodes"]), wall_time_min=int(w["wall_time_min"])))
        return tuple(found), ""

    def snapshot(self) -> Snapshot:
        rows = self.read_batch_jobs()
        backlog = self.read_backlog()
        queued_times = self.read_queued_times() if any(r["state"] == BatchJobState.queued.value for r in rows) else {}
        windows, error = self.read_windows()
        views = tuple(
            BatchJobView(id=int(r["id"]), state=BatchJobState(r["state"]), num_nodes=int(r["num_nodes"]),
                         wall_time_min=int(r["wall_time_min"]),
                         regular_queue=(r.get("status_info") or {}).get(REQUEST_KIND) == REGULAR_QUEUE,
                         queued_time_min=queued_times.get(r["scheduler_id"]) if r.get("scheduler_id") is not None else None)
            for r in sorted(rows, key=lambda r: r["id"])
        )
        return Snapshot(batch_jobs=views, backlog=backlog, windows=windows, windows_error=error)

    # -- one cycle ---------------------------------------------------------------------------------
    def run_cycle(self) -> Optional[float]:
        decision = self.strategy.decide(self.snapshot())
        self.last_decision = decision
        self.logger.info("%s", decision.log_line(self.strategy.name))
        if decision.cancel:
            bulk_patch(self.client, "/batch-jobs/",
                       [{"id": i, "state": BatchJobState.pending_deletion.value} for i in decision.cancel])
        for request in decision.submit:
            body = {
                "site_id": self.site_id,
                "project": self.options.submit_project,
                "queue": self.options.submit_queue,
                "num_nodes": request.num_nodes,
                "wall_time_min": request.wall_time_min,
                "job_mode": self.options.job_mode,
                "filter_tags": self.filter_tags(),
                **({"status_info": {REQUEST_KIND: REGULAR_QUEUE}} if request.regular_queue else {}),
            }
            refused = self.fit_to_site_rules(body)
            if refused:
                self._report_once(f"no BatchJob created: {refused} (settings.yml scheduler: / elastic_queue:)", error=True)
                continue
            created = self.client.post("/batch-jobs/", json=body)
            self.logger.info("created BatchJob %s (%d nodes x %d min in %s%s)", (created or {}).get("id"),
                             body["num_nodes"], body["wall_time_min"], self.options.submit_queue,
                             ", regular queue" if request.regular_queue else "")
        return None

    def _report_once(self, message: str, error: bool = False) -> None:
        if message not in self._reported:
            self._reported.add(message)
            (self.logger.error if error else self.logger.warning)("%s", message)

    def fit_to_site_rules(self, body: dict) -> Optional[str]:
        """Clamp ``body`` to the submit queue's ``max_nodes`` / ``max_walltime`` (the most the site
        allows, which a user who set larger elastic limits would take), then check it with the
        scheduler module's rules; the reason it would be refused, or None. A refused BatchJob is
        not created: the scheduler module would mark it submit_failed, and the next cycle would
        create another."""
        rules = getattr(getattr(self.site_config, "settings", None), "scheduler", None)
        if rules is None:
            return None  # no scheduler section: no rules to check against (nothing submits them either)
        allowed_queues = getattr(rules, "allowed_queues", None) or {}
        limits = allowed_queues.get(body["queue"])
        if limits is not None:
            for field, limit_name in (("num_nodes", "max_nodes"), ("wall_time_min", "max_walltime")):
                limit = int(limits[limit_name] if isinstance(limits, Mapping) else getattr(limits, limit_name))
                if body[field] > limit:
                    self._report_once(f"{field} {body[field]} clamped to queue {body['queue']!r}'s {limit_name} {limit} "
                                      f"(settings.yml scheduler.allowed_queues)")
                    body[field] = limit
        try:
            check_batch_job(body, allowed_queues, getattr(rules, "allowed_projects", None) or [],
                            getattr(rules, "optional_batch_job_params", None) or {})
        except BatchJobRefused as exc:
            return str(exc)
        return None

    def describe(self) -> str:
        return f"{self.name} (strategy {self.strategy.name}, every {self.period:g} s)"
