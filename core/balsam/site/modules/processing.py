"""The ``processing`` agent module: runs the app hooks between the launcher's runs.

========================  ==================  ==========================================
job state                 hook                default (app does not override the hook)
========================  ==================  ==========================================
STAGED_IN                 ``preprocess``      PREPROCESSED
RUN_DONE                  ``postprocess``     POSTPROCESSED
RUN_ERROR                 ``handle_error``    FAILED (tail of job.out in the event)
RUN_TIMEOUT               ``handle_timeout``  RESTART_READY
========================  ==================  ==========================================

Jobs are leased through a Session of their own (no BatchJob), ``prefetch_depth`` at most at once.
Jobs whose app keeps the default hook are moved in bulk in the agent process (no process is spawned:
this path carries the launchers' thousands of jobs per second). Jobs whose app overrides the hook go
to a pool of ``num_workers`` worker processes, which append the hook's output to the job's
``balsam.log``. ``run()`` apps get their return value or exception from ``job.out``. Results go to
the launcher's BulkStatusUpdater (bulk PATCHes; retried through API outages, so no result is lost
while the jobs stay leased to this module's session).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import signal
import time
from pathlib import Path
from typing import Any, Optional

from ...models import MAX_JOBS_PER_SESSION_ACQUIRE
from ...states import PROCESSABLE_STATES, JobState
from ..api_util import results
from ..apps import AppCache
from ..hooks_runner import HOOK_FOR_STATE, default_update, now_iso, run_hooks
from ..module import AgentModule, config_value

#: Jobs handed to one worker task (amortizes the IPC and app deserialization).
WORKER_CHUNK = 16
SESSION_TICK_SEC = 30.0


def _worker_init() -> None:
    # Ctrl-C in a foreground agent reaches the whole process group: the agent stops the pool itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _count_states(jobs: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.get("state", "?")] = counts.get(job.get("state", "?"), 0) + 1
    return counts


class ProcessingModule(AgentModule):
    section = "processing"
    default_period = 1.0
    period_fields = ("period", "service_period")

    def __init__(self, site_config: Any, config: Any, client: Any) -> None:
        super().__init__(site_config, config, client)
        self.apps = AppCache(client)
        self.session_id: Optional[int] = None
        self.last_tick = 0.0
        self.pool: Optional[cf.ProcessPoolExecutor] = None
        self.pending: dict[cf.Future, list[dict]] = {}
        self.updater: Any = None
        #: Jobs leased but not yet handled (e.g. the app lookup failed in an API outage): kept for
        #: the next cycle, since no other session can take them while we hold them.
        self.backlog: list[dict] = []
        self.processed = 0

    # -- configuration -----------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return max(1, int(config_value(self.config, "num_workers", 2)))

    @property
    def prefetch_depth(self) -> int:
        return max(1, int(config_value(self.config, "prefetch_depth", 1000)))

    @property
    def data_path(self) -> Path:
        return Path(getattr(self.site_config, "data_path", Path(self.site_config.site_path) / "data"))

    @property
    def tail_num_lines(self) -> int:
        launcher = getattr(getattr(self.site_config, "settings", None), "launcher", None)
        return int(getattr(launcher, "error_tail_num_lines", 10) or 10)

    def _filter_tags(self) -> dict:
        return dict(getattr(getattr(self.site_config, "settings", None), "filter_tags", None) or {})

    # -- session -----------------------------------------------------------------------------------
    def _session(self) -> int:
        if self.session_id is None:
            created = self.client.post("/sessions/", json={"site_id": self.site_id})
            self.session_id = int(created["id"])
            self.last_tick = time.monotonic()
            self.logger.info("processing session %s created", self.session_id)
        return self.session_id

    def _acquire(self, max_jobs: int) -> list[dict]:
        body = {
            "max_num_jobs": max_jobs,
            "filter_tags": self._filter_tags(),
            "states": sorted(s.value for s in PROCESSABLE_STATES),
        }
        session_id = self._session()
        try:
            return results(self.client.post(f"/sessions/{session_id}", json=body))
        except Exception as exc:
            if getattr(exc, "status_code", None) == 404:  # our session expired: start a new one
                self.logger.warning("processing session %s is gone; creating a new one", session_id)
                self.session_id = None
                return results(self.client.post(f"/sessions/{self._session()}", json=body))
            raise

    def _tick(self) -> None:
        if self.session_id is not None and time.monotonic() - self.last_tick > SESSION_TICK_SEC:
            try:
                self.client.put(f"/sessions/{self.session_id}")
            except Exception as exc:
                if getattr(exc, "status_code", None) == 404:
                    self.session_id = None
                else:
                    raise
            self.last_tick = time.monotonic()

    # -- worker pool -------------------------------------------------------------------------------
    def _pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            # forkserver: the agent has threads, and forking a threaded process is unsafe.
            self.pool = cf.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_worker_init
            )
        return self.pool

    def _send(self, updates: list[dict]) -> None:
        if self.updater is None:
            from ...launcher.status_updater import BulkStatusUpdater

            self.updater = BulkStatusUpdater(self.client, max_wait_sec=0.05, close_timeout=30.0, name="processing-updates")
        for update in updates:
            fields = dict(update)
            job_id = fields.pop("id")
            state = fields.pop("state", None)
            timestamp = fields.pop("state_timestamp", None)
            state_data = fields.pop("state_data", None)
            self.updater.put(job_id, state, timestamp, state_data, **fields)
        self.processed += len(updates)

    def _harvest(self) -> list[dict]:
        updates: list[dict] = []
        for future in [f for f in self.pending if f.done()]:
            jobs = self.pending.pop(future)
            try:
                updates.extend(future.result())
            except Exception as exc:  # the worker process itself died (e.g. a hook called os._exit)
                self.logger.error("hook worker failed for jobs %s: %s", [j["id"] for j in jobs], exc)
                if isinstance(exc, cf.process.BrokenProcessPool):
                    self.pool = None
                updates.extend(
                    {
                        "id": j["id"],
                        "state": JobState.failed.value,
                        "state_timestamp": now_iso(),
                        "state_data": {"message": f"the hook worker process died: {exc}"},
                    }
                    for j in jobs
                )
        return updates

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every result handed to the status updater has been sent."""
        return self.updater.flush(timeout) if self.updater is not None else True

    def in_flight(self) -> int:
        return sum(len(jobs) for jobs in self.pending.values())

    # -- cycle -------------------------------------------------------------------------------------
    def run_cycle(self) -> Optional[float]:
        harvested = self._harvest()
        if harvested:
            self._send(harvested)
        room = min(self.prefetch_depth - self.in_flight() - len(self.backlog), MAX_JOBS_PER_SESSION_ACQUIRE)
        acquired: list[dict] = []
        if room > 0:
            acquired = self._acquire(room)
            self.backlog.extend(acquired)
        if self.backlog:
            jobs, self.backlog = self.backlog, []
            try:
                self.apps.prefetch(job["app_id"] for job in jobs)
            except Exception:
                self.backlog = jobs
                raise
            updates = self._dispatch(jobs)
            if updates:
                self._send(updates)
        self._tick()
        self.logger.debug("cycle: harvested %d results, room for %d, acquired %d %s, %d jobs in hook workers",
                          len(harvested), max(room, 0), len(acquired),
                          _count_states(acquired) if acquired else "", self.in_flight())
        if room > 0 and len(acquired) >= room:
            return 0.0  # more work is likely waiting
        if self.pending:
            return min(self.period, 0.2)
        return None

    def _dispatch(self, jobs: list[dict]) -> list[dict]:
        """Default hooks now (returned as updates), user hooks to the worker pool. Apps are prefetched."""
        updates: list[dict] = []
        custom: dict[int, list[dict]] = {}
        for job in jobs:
            state = JobState(job["state"])
            if state not in HOOK_FOR_STATE:
                self.logger.warning("job %s: acquired in state %s, which has no hook; left as it is", job["id"], state)
                continue
            info = self.apps.info(job["app_id"])
            if info.cls is None:
                updates.append(
                    {
                        "id": job["id"],
                        "state": JobState.failed.value,
                        "state_timestamp": now_iso(),
                        "state_data": {"message": "An exception occurred while loading the app", "error": info.error or ""},
                    }
                )
            elif HOOK_FOR_STATE[state] in info.hooks:
                custom.setdefault(job["app_id"], []).append(job)
            else:
                try:
                    updates.append(default_update(job, info.python_app, self.data_path, self.tail_num_lines))
                except Exception as exc:
                    self.logger.exception("job %s: default %s failed", job["id"], HOOK_FOR_STATE[state])
                    updates.append(
                        {
                            "id": job["id"],
                            "state": JobState.failed.value,
                            "state_timestamp": now_iso(),
                            "state_data": {"message": f"An exception occurred in {HOOK_FOR_STATE[state]}", "error": str(exc)},
                        }
                    )
        for app_id, app_jobs in custom.items():
            info = self.apps.info(app_id)
            for start in range(0, len(app_jobs), WORKER_CHUNK):
                chunk = app_jobs[start : start + WORKER_CHUNK]
                args = (run_hooks, info.record, chunk, info.python_app, str(self.data_path), self.tail_num_lines)
                try:
                    future = self._pool().submit(*args)
                except RuntimeError:  # a broken pool (a worker died): start a fresh one
                    self.pool = None
                    future = self._pool().submit(*args)
                self.pending[future] = chunk
        return updates

    def close(self) -> None:
        # Let running hooks finish (they are short by design) and send their results.
        if self.pending:
            cf.wait(list(self.pending), timeout=20)
            updates = self._harvest()
            if updates:
                self._send(updates)
        if self.updater is not None:
            self.updater.close()  # sends what is queued (retrying for up to 30 s)
            if self.updater.dropped:
                self.logger.error("%d job updates could not be sent: %s", len(self.updater.dropped), self.updater.dropped[:3])
            self.updater = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.session_id is not None:
            try:
                self.client.delete(f"/sessions/{self.session_id}")
            except Exception as exc:
                self.logger.warning("could not delete processing session %s: %s", self.session_id, exc)
            self.session_id = None
