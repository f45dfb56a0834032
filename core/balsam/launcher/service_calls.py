"""The few API calls the launcher makes, in one place (Session, apps, batch jobs, raw client).

Jobs are leased with :class:`balsam.client.lease.JobLease` and reported with
:class:`balsam.client.status_updater.BulkStatusUpdater` (the site agent's processing module uses the
same two), on the REST client of ``balsam.api``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from balsam.util import batch_job_id_from_env

from .batch_job_notes import notes_for

logger = logging.getLogger(__name__)

#: A launcher's updater gives up this long after stopping began once a call fails (a healthy, slow API: 30 s more), then spools.
SHUTDOWN_UPDATE_TIMEOUT_SEC = 5.0
#: An acquire is retried this often inside one call; the lease resends it on the next loop turn.
ACQUIRE_RETRY_COUNT = 2
#: App records a launcher fetches ahead of its first jobs (one request; see :class:`EarlyLease`).
APP_PREFETCH_LIMIT = 32
#: Seconds :meth:`EarlyLease.discard` still waits for the server once the launcher is told to end
#: (a signal): an answer in flight then deletes the Session itself when it comes.
DISCARD_GRACE_SEC = 2.0

def default_client() -> Any:
    """The REST client the ``balsam.api`` models use (built lazily from the login file)."""
    from balsam.client.default import get_default_client

    # A launcher rides out a server restart: no interactive session's connect wait (one started
    # from IPython was taken for one), unless $BALSAM_CLIENT_CONNECT_WAIT_SEC asks for a wait.
    return get_default_client().unattended()


def api_models() -> Any:
    import balsam.api as api

    return api


class UnknownBatchJob(Exception):
    """The server has no BatchJob of this id at the launcher's site (its Session is refused): a
    start-up problem, ``str()`` the one line shown (``Error: ...``) with what to do."""

    def __init__(self, batch_job_id: Optional[int], detail: str) -> None:
        self.batch_job_id = batch_job_id
        self.detail = detail
        super().__init__(
            f"BALSAM_BATCH_JOB_ID={batch_job_id}: the server refused this launcher's session: {detail}. Set "
            "BALSAM_BATCH_JOB_ID to the id of one of this site's BatchJobs (balsam queue ls), or unset it to run "
            "without a BatchJob"
        )


def unknown_batch_job(exc: BaseException, batch_job_id: Optional[int]) -> Optional[UnknownBatchJob]:
    """``exc`` as :class:`UnknownBatchJob` when it is the server's 404 for the Session's BatchJob."""
    if isinstance(exc, UnknownBatchJob):
        return exc
    detail = getattr(exc, "detail", None)
    if batch_job_id is None or getattr(exc, "status_code", None) != 404 or "BatchJob" not in str(detail):
        return None
    return UnknownBatchJob(batch_job_id, str(detail))


def open_lease(site_id: int, batch_job_id: Optional[int], filter_tags: Optional[dict[str, str]] = None,
               **options: Any) -> Any:
    """The launcher's lease on runnable jobs (``acquire()`` returns ``balsam.api.Job`` objects);
    ``options``: the keyword arguments of :func:`open_raw_lease`."""
    lease = open_raw_lease(site_id, batch_job_id, filter_tags, **options)
    lease.wrap = api_models().Job._from_api
    return lease


def open_raw_lease(
    site_id: int,
    batch_job_id: Optional[int],
    filter_tags: Optional[dict[str, str]] = None,
    *,
    sort_by: Optional[str] = None,
    app_ids: Optional[Iterable[int]] = None,
    tick_period: Optional[float] = None,
) -> Any:
    """:func:`open_lease` before ``wrap`` is set: its Session is created with the REST client
    alone, without importing the API models (``acquire()`` returns dicts until ``wrap`` is set)."""
    from balsam.client.lease import JobLease

    try:
        return JobLease(
            default_client(), site_id, batch_job_id, filter_tags=filter_tags, sort_by=sort_by, app_ids=app_ids,
            tick_period=tick_period, acquire_retry_count=ACQUIRE_RETRY_COUNT,
        )
    except Exception as exc:
        unknown = unknown_batch_job(exc, batch_job_id)
        if unknown is None:
            raise
        raise unknown from None


class EarlyLease:
    """A lease (Session) opened in a background thread while the launcher is still starting.

    It is opened before the site's settings are read, so without the acquire filters (tags, sort
    order) that come from them: a Session does not depend on them (each acquire request carries
    them), and :meth:`take` sets them before the lease's first acquire. :meth:`take` waits for the
    lease and raises what opening it raised; if nobody takes it (the start-up failed, or the
    BatchJob turned out to be another one), :meth:`discard` closes it so that the Session does not
    linger until it expires.

    Once the lease is ready, the same thread fetches the site's App records
    (:meth:`ApplicationDefinition.prefetch_site`), while the first acquire is in flight: the
    app of the first job is then loaded without a round trip after the acquire's answer. Best
    effort: an app not fetched (or a failed fetch) is loaded by id as before."""

    def __init__(self, site_id: int, batch_job_id: int, *, prefetch_apps: int = APP_PREFETCH_LIMIT) -> None:
        self.site_id = site_id
        self.batch_job_id = batch_job_id
        self.prefetch_apps = prefetch_apps
        #: How many App records were prefetched (None until done or when it failed).
        self.apps_prefetched: Optional[int] = None
        self._lease: Any = None
        self._error: Optional[BaseException] = None
        self._taken = False
        #: The first acquire, sent early (:meth:`acquire_early`): its thread, and its answer (the
        #: jobs, or what it raised) until :meth:`first_jobs` hands it over (once).
        self._acquire_thread: Optional[threading.Thread] = None
        self._acquired: Optional[list] = None
        self._acquire_error: Optional[BaseException] = None
        self._acquire_took = 0.0
        self._acquire_handed = False
        self._acquire_done = False
        #: Discarded while the Session's opening or the early acquire was still in flight: the thread
        #: that gets the answer deletes the Session (under ``_lock``, with those answers).
        self._discarded = False
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="early-lease", daemon=True)

    @classmethod
    def start(cls, site_id: int, batch_job_id: int) -> "EarlyLease":
        early = cls(site_id, batch_job_id)
        early._thread.start()
        return early

    def _run(self) -> None:
        try:
            self._open()
        finally:
            self._ready.set()
        if self._lease is not None and self.prefetch_apps > 0:
            try:
                self.apps_prefetched = api_models().ApplicationDefinition.prefetch_site(self.site_id, self.prefetch_apps)
            except Exception as exc:  # the apps are loaded one by one as before
                logger.debug("could not prefetch the site's apps: %s", exc)

    def _open(self) -> None:
        # The Session first, with the REST client alone: its round trip then overlaps the imports
        # still ahead of the launcher (the API models among them, imported here right after).
        try:
            lease = open_raw_lease(self.site_id, self.batch_job_id)
        except BaseException as exc:  # handed to whoever takes it
            self._error = exc
            return
        try:
            lease.wrap = api_models().Job._from_api
        except BaseException as exc:
            lease.close(retry_count=0)
            self._error = exc
            return
        with self._lock:
            orphan = self._discarded
            if not orphan:
                self._lease = lease
        if orphan:  # the launcher gave up on it while it opened
            lease.close(retry_count=0)

    def matches(self, site_id: int, batch_job_id: Optional[int]) -> bool:
        return (site_id, batch_job_id) == (self.site_id, self.batch_job_id)

    def take(self, filter_tags: dict[str, str], sort_by: Optional[str] = None) -> Any:
        """The lease, acquiring with these filters (it has acquired nothing yet)."""
        self._ready.wait()
        self._taken = True
        if self._error is not None:
            raise self._error
        self._lease.filter_tags = dict(filter_tags)
        self._lease.sort_by = sort_by
        return self._lease

    def acquire_early(self, filter_tags: dict[str, str], sort_by: Optional[str], count: int, **limits: Any) -> None:
        """Send the lease's first acquire now, in a thread of its own, once the Session is open: the
        job mode calls it as soon as it knows its first request, so that the round trip overlaps
        the rest of its start-up (the spawner's start, the loop's set-up). The owner then takes the
        answer with :meth:`first_jobs` (exactly once); if nobody takes the lease, :meth:`discard`
        waits for the answer and deletes the Session, which gives the jobs back at once."""
        if self._acquire_thread is not None:
            raise RuntimeError("the early lease's first acquire was already sent")

        def run() -> None:
            self._ready.wait()
            lease = self._lease  # None: the Session did not open (take() raises why), or was discarded
            jobs: Optional[list] = None
            error: Optional[BaseException] = None
            began = time.monotonic()
            if lease is not None:
                lease.filter_tags = dict(filter_tags)
                lease.sort_by = sort_by
                try:
                    jobs = lease.acquire(count, **limits)
                except BaseException as exc:  # handed to the owner, as a failed acquire
                    error = exc
            with self._lock:
                self._acquired, self._acquire_error = jobs, error
                self._acquire_took = time.monotonic() - began
                self._acquire_done = True
                orphan = self._discarded and lease is not None
            if orphan:  # discarded while this acquire was in flight: its Session is deleted now
                self._give_back(lease, jobs)

        self._acquire_thread = threading.Thread(target=run, name="early-acquire", daemon=True)
        self._acquire_thread.start()

    def first_jobs(self) -> "tuple[list, float]":
        """The early acquire's jobs and its round trip in seconds, once (it waits for the answer);
        raises what the acquire raised. A second call (or one with no early acquire) raises
        RuntimeError: its jobs would be handed out twice."""
        if self._acquire_thread is None or self._acquire_handed:
            raise RuntimeError("the early acquire's jobs were already handed over (or none was sent)")
        self._acquire_handed = True
        self._acquire_thread.join()
        jobs, self._acquired = self._acquired or [], None
        if self._acquire_error is not None:
            raise self._acquire_error
        return jobs, self._acquire_took

    def refusal(self) -> Optional[UnknownBatchJob]:
        """Why the server refused the Session, when it has no such BatchJob (after :meth:`take` or
        :meth:`discard`, which wait for the opening); else None."""
        if not self._ready.is_set() or self._error is None:
            return None
        return unknown_batch_job(self._error, self.batch_job_id)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the thread (the app prefetch included)."""
        self._thread.join(timeout)

    def discard(self, hurried: Optional[Callable[[], bool]] = None, grace_sec: Optional[float] = None) -> None:
        """Delete the Session (nobody took the lease), once the early acquire in flight is answered:
        deleted under it, the Session could lease jobs after its deletion. That gives back the jobs
        it leased at once. Once ``hurried()`` is true (the launcher is told to end), the server gets
        ``grace_sec`` more (:data:`DISCARD_GRACE_SEC`). If the opening or the early acquire is still
        unanswered then, the thread waiting for it would delete the Session when the answer comes,
        but the launcher ends right after (run_launcher raises the signal again), so in practice the
        Session, and the jobs that acquire leased, are released when the Session expires on the
        server."""
        if self._taken:
            return
        self._taken = True
        grace = DISCARD_GRACE_SEC if grace_sec is None else grace_sec
        timeout = None if hurried is None else 0.05  # in slices: a signal is seen while it waits
        deadline = math.inf
        while time.monotonic() < deadline:
            if not self._ready.is_set():
                self._ready.wait(timeout)
            elif self._acquire_thread is not None and self._acquire_thread.is_alive():
                self._acquire_thread.join(timeout)
            else:
                break
            if deadline == math.inf and hurried is not None and hurried():
                deadline = time.monotonic() + grace
        with self._lock:
            lease, jobs = self._lease, self._acquired
            opening = lease is None and self._error is None
            acquiring = self._acquire_thread is not None and not self._acquire_done
            self._discarded = opening or acquiring
            self._acquired = None
        if self._discarded:
            what = "the opening of its early Session" if opening else "its early acquire"
            logger.info("the launcher is ending and %s got no answer within %g s: the Session, and the jobs it "
                        "leased, are released when the Session expires on the server", what, grace)
        elif lease is not None:
            self._give_back(lease, jobs)

    @staticmethod
    def _give_back(lease: Any, jobs: Optional[list]) -> None:
        if jobs:
            logger.info("%d jobs acquired early are given back: the launcher did not start", len(jobs))
        lease.close(retry_count=0)


def lease_session(lease: Any) -> Any:
    """A callable telling the session ``lease`` holds now (None while it has none): a lost session
    is replaced by a new one, whose jobs are then reported under it."""
    return lambda: getattr(lease, "session_id", None)


def open_updater(spool_path: "Path | str | None", lease: Any = None) -> Any:
    """The launcher's status updater: quick to give up on a vanished API at shutdown, and what it
    could not send is spooled in the site for the agent.

    ``lease``: the launcher's lease; its updates are then sent under its Session (the server refuses
    those of a job the session no longer holds: a user re-queued or failed it meanwhile). Opened
    after the updater, it is set later with ``updater.session_id = lease_session(lease)``."""
    from balsam.client.status_updater import BulkStatusUpdater

    # No client given: the updater's thread resolves the balsam.api client on its first call, off
    # the launcher's start-up path.
    return BulkStatusUpdater(None, close_timeout=SHUTDOWN_UPDATE_TIMEOUT_SEC, spool_dir=spool_path,
                             session_id=lease_session(lease) if lease is not None else None)


def find_batch_job_id(site_id: int, env: Mapping[str, str], platform: Any) -> Optional[int]:
    """The BatchJob this launcher runs in: $BALSAM_BATCH_JOB_ID, else (site_id, scheduler id) lookup."""
    batch_job_id = batch_job_id_from_env(env)
    if batch_job_id is not None:
        return batch_job_id
    try:
        scheduler_id = platform.scheduler_id(env)
    except Exception as exc:
        logger.warning("platform could not tell the scheduler id: %s", exc)
        scheduler_id = None
    if scheduler_id is None:
        return None
    api = api_models()
    matches = list(api.BatchJob.objects.filter(site_id=site_id, scheduler_id=scheduler_id))
    if not matches:
        logger.info("no BatchJob with scheduler id %s at site %s; the session has no batch job", scheduler_id, site_id)
        return None
    return matches[0].id


def note_batch_job(batch_job_id: Optional[int], key: str, message: str) -> None:
    """Set ``status_info[key] = message`` on the launcher's BatchJob (shown by ``balsam queue ls -v``).

    Returns at once: the process's one note writer (:mod:`balsam.launcher.batch_job_notes`) writes
    it in its thread, in order, the latest message per key, tried again through an outage; the
    launcher's exit waits a few seconds for it. Nothing for a launcher without a BatchJob.
    """
    if batch_job_id is None:
        return
    notes_for(batch_job_id).note(key, message)


#: BatchJob states in which a batch job may still run jobs.
ACTIVE_BATCH_JOB_STATES = ("pending_submission", "queued", "running")


def largest_active_batch_job(site_id: int, exclude_id: Optional[int]) -> int:
    """Nodes of the site's largest BatchJob (other than ``exclude_id``) still waiting or running."""
    page = default_client().get("/batch-jobs/", params={"site_id": int(site_id), "state": list(ACTIVE_BATCH_JOB_STATES)})
    rows = page.get("results", page) if isinstance(page, dict) else page
    return max((int(r.get("num_nodes") or 0) for r in rows if r.get("id") != exclude_id), default=0)


def report_batch_job_error(batch_job_id: int, message: str) -> None:
    """Record a launcher failure in the BatchJob's ``status_info`` (``error``, ``error_time``: the
    keys the scheduler module uses, which ``balsam queue ls -v`` shows), through the note writer
    (:func:`note_batch_job`): both keys in one write."""
    notes_for(batch_job_id).note("error", message,
                                 error_time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
