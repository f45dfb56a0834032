"""A launcher's lease on jobs: one API Session, a heartbeat thread, and acquire calls.

The Session is created with the site id and the BatchJob id, ticked from a background thread every
``tick_period`` seconds (``$BALSAM_LAUNCHER_TICK_SEC``, default 60 s, well under the server's 5 min
expiry) and deleted at close, which makes the server turn jobs still RUNNING into RUN_TIMEOUT and free
the acquired jobs that never started.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterable, Optional

from balsam.models import MAX_JOBS_PER_SESSION_ACQUIRE
from balsam.states import RUNNABLE_STATES

from . import _api

logger = logging.getLogger(__name__)

#: Retries of the final Session delete (about 3.5 s of backoff) when the API does not answer.
SHUTDOWN_RETRY_COUNT = 3

DEFAULT_TICK_SEC = 60.0


def tick_period_from_env() -> float:
    raw = os.environ.get("BALSAM_LAUNCHER_TICK_SEC", "")
    try:
        value = float(raw) if raw else DEFAULT_TICK_SEC
    except ValueError:
        logger.warning("ignoring BALSAM_LAUNCHER_TICK_SEC=%r (not a number)", raw)
        value = DEFAULT_TICK_SEC
    return max(0.1, value)


def _status(exc: BaseException) -> Optional[int]:
    value = getattr(exc, "status_code", None)
    return value if isinstance(value, int) else None


class SessionJobSource:
    """Acquire jobs under one Session and keep that Session alive."""

    def __init__(
        self,
        site_id: int,
        batch_job_id: Optional[int],
        filter_tags: Optional[dict[str, str]] = None,
        *,
        tick_period: Optional[float] = None,
        sort_by: Optional[str] = None,
        app_ids: Optional[Iterable[int]] = None,
    ) -> None:
        self.site_id = site_id
        self.batch_job_id = batch_job_id
        self.filter_tags = dict(filter_tags or {})
        self.sort_by = sort_by
        self.app_ids = set(app_ids or ())
        self.tick_period = tick_period if tick_period is not None else tick_period_from_env()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.closed = False
        self.session = self._create_session()
        self.tick_errors = 0
        self._thread = threading.Thread(target=self._heartbeat, name="session-heartbeat", daemon=True)
        self._thread.start()

    def _create_session(self) -> Any:
        api = _api.api_models()
        session = api.Session.objects.create(site_id=self.site_id, batch_job_id=self.batch_job_id)
        self._session_id = session.id
        logger.info("session %s created (site %s, batch job %s)", session.id, self.site_id, self.batch_job_id)
        return session

    def _replace_lost_session(self, exc: BaseException) -> bool:
        """The server no longer knows our session (it expired while we could not reach it): start a
        new one. Jobs the old one had RUNNING are RUN_TIMEOUT on the server already."""
        if _status(exc) != 404 or self.closed:
            return False
        logger.warning("session %s is gone on the server (%s); creating a new one", self._session_id, exc)
        with self._lock:
            self.session = self._create_session()
        return True

    @property
    def session_id(self) -> int:
        return self._session_id

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.tick_period):
            try:
                with self._lock:
                    self.session.tick()
                self.tick_errors = 0
            except Exception as exc:
                try:
                    if self._replace_lost_session(exc):
                        continue
                except Exception as create_exc:
                    exc = create_exc
                self.tick_errors += 1
                logger.warning("session %s heartbeat failed (%d in a row): %s", self.session.id, self.tick_errors, exc)

    def acquire(
        self,
        max_num_jobs: int,
        *,
        max_wall_time_min: Optional[int] = None,
        max_nodes_per_job: Optional[int] = None,
        max_aggregate_nodes: Optional[float] = None,
        serial_only: bool = False,
    ) -> list[Any]:
        """Lease up to ``max_num_jobs`` runnable jobs (API Job objects)."""
        if self.closed or max_num_jobs <= 0:
            return []
        max_num_jobs = min(int(max_num_jobs), MAX_JOBS_PER_SESSION_ACQUIRE)
        kwargs: dict[str, Any] = dict(
            max_num_jobs=max_num_jobs,
            max_wall_time_min=max_wall_time_min,
            max_nodes_per_job=max_nodes_per_job,
            max_aggregate_nodes=max_aggregate_nodes,
            serial_only=serial_only,
            sort_by=self.sort_by,
            filter_tags=self.filter_tags,
            states=set(RUNNABLE_STATES),
        )
        if self.app_ids:
            kwargs["app_ids"] = set(self.app_ids)
        t0 = time.perf_counter()
        try:
            jobs = list(self.session.acquire_jobs(**kwargs))
        except Exception as exc:
            if not self._replace_lost_session(exc):
                raise
            jobs = list(self.session.acquire_jobs(**kwargs))
        if jobs:
            logger.debug("acquired %d jobs in %.3f s", len(jobs), time.perf_counter() - t0)
        return jobs

    def close(self) -> None:
        """Stop the heartbeat and delete the Session (its RUNNING jobs become RUN_TIMEOUT server-side)."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._thread.join(5)
        session_id = self.session.id
        # At shutdown a few quick retries are enough: if the API is down, the server expires the
        # lease by itself, and the allocation should not idle for minutes waiting to say goodbye.
        client = _api.default_client()
        saved_retries = client.retry_count
        client.retry_count = min(saved_retries, SHUTDOWN_RETRY_COUNT)
        try:
            with self._lock:
                self.session.delete()
            logger.info("session %s deleted", session_id)
        except Exception as exc:
            logger.warning("could not delete session %s (it will expire on the server): %s", session_id, exc)
        finally:
            client.retry_count = saved_retries
