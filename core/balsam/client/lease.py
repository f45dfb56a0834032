"""A lease on jobs: one API Session, its heartbeat, and acquire calls that never lose a job.

Launchers (``balsam.launcher``) and the site agent's ``processing`` module both hold jobs this way.
The Session is created with the site id (and the BatchJob id, for launchers), ticked every
``tick_period`` seconds (from a background thread, or by calling :meth:`JobLease.tick_if_due`), and
deleted at close, which makes the server turn jobs still RUNNING into RUN_TIMEOUT and free the
acquired jobs that never started (unless updates sent under it wait in the spool: see :meth:`JobLease.close`).

Exactly-once acquisition: every acquire is sent with an ``Idempotency-Key``. The client retries it
with the same key; if it still gets no answer, the key and the request body stay *pending* and the
next :meth:`acquire` sends them again, unchanged, before anything new, until an answer comes. The
server answers a repeated key with the jobs that request leased and this session still holds (see
``balsam.server.sessions_logic``), so an answer lost on the wire leaves no job leased to a launcher
that never saw it.

Jobs taken away: a user may delete a leased job or move it (which ends the lease). With
:meth:`JobLease.watch`, every heartbeat carries the ids of the jobs the owner runs or holds ready
(``{"job_ids": [...]}``, at most :data:`MAX_JOB_IDS_PER_SESSION_TICK`; more are sent a window per
heartbeat) and the server answers those the Session no longer holds (``"gone"``); the lease hands
them to the owner, which ends their runs. Still one request per heartbeat.

Copies of a job: a job the Session lost can be leased again by the same lease (its user re-queued
it, or the Session expired and was replaced), while an answer computed before that acquire is still
on its way. So the lease numbers the acquires that return jobs (:attr:`JobLease.generation`), and a
heartbeat notes the number before its request: its ``gone`` ids say nothing about copies acquired
after that number (``watch(..., generation=True)`` hands the number to the owner with the ids).

A replaced Session: when a heartbeat or an acquire finds the Session gone (404: it expired while the
API could not be reached), the lease opens a new one and at once reports every job the owner holds
as gone, as of the number of acquires answered so far (all of them under the lost Session): their
lease ended with the old Session and another launcher may run them now. The running copies are
ended and the ones leased ahead are not started; later copies (the new Session may lease the same
jobs again) are numbered higher and untouched.

Known alive (:meth:`JobLease.fresh`): the lease notes when its last heartbeat or acquire that
succeeded was *sent* (on :func:`session_clock`, which counts the time the machine was suspended:
``CLOCK_MONOTONIC`` stands still during a suspend and some VM pauses, and a node resumed from one
kept a fresh lease while its Session had expired); the server stamped the Session's heartbeat at or after that
moment, so the Session lives at least until that moment plus the server's expiry. A process frozen
longer than that (SIGSTOP, a file-system hang, a node hiccup) resumes with its jobs leased ahead and
its Session maybe expired, their jobs run by another launcher meanwhile; nothing on the wire tells it
until its next heartbeat, and its loop used to start them first. So the modes start a leased job
only while the lease is fresh; otherwise they ask for a heartbeat at once (:meth:`JobLease.check_fresh`)
and start nothing until its answer: a success makes the lease fresh again, a 404 hands the held
jobs over as gone (above) before the lease is fresh again. The server does not say its expiry (its
create answer is fixed by the API schema), so the lease assumes the shortest one it can rely on:
:data:`FRESH_TICKS` heartbeat periods (the period must be well under the expiry, or a healthy
launcher would lose its Session to one slow heartbeat), or ``$BALSAM_SESSION_EXPIRE_SEC`` when that
is set here and shorter (set it in the launcher's environment where a server's expiry is under
:data:`FRESH_TICKS` periods). The cost: a launcher cut off from the API for that long starts no new
job until a heartbeat gets through (its running jobs go on); it cannot tell an API outage, under
which its Session survives, from its own isolation, under which the Session expires.

An announced end (:meth:`JobLease.announce_end`): the batch system SIGKILLs an allocation's
processes some time after its SIGTERM (Slurm's ``KillWait``), and a launcher killed before it
reported its jobs left them RUNNING until its Session expired (5 minutes). So at the stop the lease
tells the server at once, in a heartbeat (``{"ending_in_sec": N}``, :data:`ENDING_IN_SEC`), that the
Session ends within N seconds, and repeats it every :data:`ENDING_TICK_SEC` until the lease closes:
a launcher still ending its jobs and reporting them keeps its Session, and one killed meanwhile has
its Session expired by the server N seconds after its last heartbeat (its RUNNING jobs RUN_TIMEOUT,
run again; ``balsam.server.sessions_logic``, "A launcher's announced end"). Once ending, the lease
sends no acquire (an answer's lease would only wait for the Session's end) and replaces no lost
Session (a 404 then means the server expired it: its jobs are the server's again). An acquire or a
release already on its way may land after an announcement and write a full heartbeat: the next
announcement, seconds later, shortens the expiry again. A server that does not know the field
(older ones ignore the body, Balsam 0.7's too) answers without ``expires``, or refuses it (422
naming the field): one INFO line, and the lease heartbeats as before at once (the Session then
expires as it did). An announcement waits ENDING_IN_SEC at most for its answer (a stuck request
held the heartbeat thread for the client's read timeout, 2 minutes). A Session left to expire for
the site agent's replay of a spool (:meth:`JobLease.close`) first gets a plain heartbeat: a full
expiry again, as before the stop, for that replay to find the jobs still held.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional

from balsam.models import MAX_JOB_IDS_PER_SESSION_TICK, MAX_JOBS_PER_SESSION_ACQUIRE
from balsam.states import RUNNABLE_STATES, JobState
from balsam.util import MIN_SESSION_EXPIRE_SEC, env_number, number_problem, session_expire_from_env, warn_env_once

from .rest import new_idempotency_key
from .status_updater import send_spooled

logger = logging.getLogger(__name__)

#: Retries of the final Session delete (about 3.5 s of backoff) when the API does not answer.
SHUTDOWN_RETRY_COUNT = 3
DEFAULT_TICK_SEC = 60.0
#: Retries inside one heartbeat call.
TICK_RETRY_COUNT = 2
#: Heartbeat periods a Session is assumed to outlive its last heartbeat (see "Known alive" above).
FRESH_TICKS = 4.0
#: Shortest pause between heartbeats asked for by :meth:`JobLease.check_fresh` while they fail.
MIN_ASKED_TICK_GAP_SEC = 5.0

#: The time left a stopping launcher announces in each heartbeat (see "An announced end" above): a
#: killed launcher's jobs are RUN_TIMEOUT that long after its last heartbeat, and a live one must
#: get a heartbeat through within it (several :data:`ENDING_TICK_SEC` periods, each retried).
ENDING_IN_SEC = 10.0
#: The most :meth:`JobLease.close` waits for an announcement in flight, and then for the plain
#: heartbeat that gives a Session left for the spool its full expiry back (each).
RESTORE_WAIT_SEC = 3.0
#: The heartbeat period of a stopping launcher.
ENDING_TICK_SEC = 2.0

#: The launcher's heartbeat period, in seconds (:func:`tick_period_from_env`).
TICK_ENV = "BALSAM_LAUNCHER_TICK_SEC"


#: The shortest heartbeat period taken from the environment: a shorter one is a request a tick to
#: the server, not a setting anybody means (a shorter value is raised to it, with a warning).
MIN_TICK_SEC = 0.1
#: The longest: a day. A period past the server's Session expiry (300 s by default,
#: ``BALSAM_SESSION_EXPIRE_SEC``) lets the server expire a launcher still running its jobs; the
#: bound is on what is a heartbeat at all: a server may be run with a long expiry.
MAX_TICK_SEC = 24 * 3600.0


def tick_period_from_env() -> float:
    """``$BALSAM_LAUNCHER_TICK_SEC`` (default 60 s, well under the server's 5 min session expiry).

    A plain decimal number of seconds up to a day (:func:`balsam.util.env_number`); anything else is
    warned about once and the default used: the launcher reading it is running jobs. One under
    :data:`MIN_TICK_SEC` (0, 0.05) is raised to it with a warning: the fastest heartbeat, as before.
    float() took "nan" (a heartbeat every 0.1 s: max(0.1, nan) is 0.1), "inf" (none at all, so the
    server expired the Session of a launcher still running its jobs), "-5" (0.1 s) and "1_000"."""
    period = env_number(TICK_ENV, DEFAULT_TICK_SEC, fraction=True, maximum=MAX_TICK_SEC, warn=logger.warning)
    if period < MIN_TICK_SEC:
        raw = os.environ.get(TICK_ENV, "")
        # The one form of env_number's warnings, with the bounds that hold here and what is used.
        problem = number_problem(f"environment variable {TICK_ENV}", raw, fraction=True, minimum=MIN_TICK_SEC,
                                 maximum=MAX_TICK_SEC)
        warn_env_once(TICK_ENV, raw, f"{problem}: using {MIN_TICK_SEC:g}, the shortest heartbeat period",
                      logger.warning)
        return MIN_TICK_SEC
    return period


def assumed_expiry_sec(tick_period: float) -> float:
    """How long a Session is assumed to outlive a heartbeat (see "Known alive" in the module's
    docstring): ``FRESH_TICKS`` periods, or ``$BALSAM_SESSION_EXPIRE_SEC`` if shorter (the server's
    rule, :func:`balsam.util.session_expire_from_env`: float() took "nan", which min() then
    ignored, and "-5", which made every lease look stale)."""
    window = FRESH_TICKS * tick_period
    expiry = session_expire_from_env(None, on_bad="warn", warn=logger.warning,
                                     instead=f"assuming a Session outlives {FRESH_TICKS:g} heartbeat periods")
    return max(MIN_SESSION_EXPIRE_SEC, window if expiry is None else min(window, expiry))


if hasattr(time, "CLOCK_BOOTTIME"):
    def session_clock() -> float:
        """Seconds on ``CLOCK_BOOTTIME`` (Linux): monotonic, and it goes on while the machine is
        suspended, as the server's expiry clock does (``time.monotonic`` stands still then)."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
else:
    def session_clock() -> float:
        """``time.monotonic()`` where there is no ``CLOCK_BOOTTIME`` (it may miss a suspend)."""
        return time.monotonic()


def _status(exc: BaseException) -> Optional[int]:
    value = getattr(exc, "status_code", None)
    return value if isinstance(value, int) else None


def acquire_request(
    max_num_jobs: int,
    *,
    max_wall_time_min: Optional[int] = None,
    max_nodes_per_job: Optional[int] = None,
    max_aggregate_nodes: Optional[float] = None,
    serial_only: bool = False,
    sort_by: Optional[str] = None,
    filter_tags: Optional[dict[str, str]] = None,
    states: Iterable["JobState | str"] = RUNNABLE_STATES,
    app_ids: Optional[Iterable[int]] = None,
    max_gpus_per_node: Optional[float] = None,
) -> dict[str, Any]:
    """The body of ``POST /sessions/{id}`` (SessionAcquire)."""
    body = {
        "max_num_jobs": max_num_jobs,
        "max_wall_time_min": max_wall_time_min,
        "max_nodes_per_job": max_nodes_per_job,
        "max_aggregate_nodes": max_aggregate_nodes,
        "serial_only": serial_only,
        "sort_by": sort_by,
        "filter_tags": dict(filter_tags or {}),
        "states": sorted(JobState.parse(s).value for s in states),
        "app_ids": sorted(set(app_ids or ())),
    }
    if max_gpus_per_node is not None:
        # Sent only when set: a server older than the field refuses unknown fields (422).
        body["max_gpus_per_node"] = max_gpus_per_node
    return body


def _rows(payload: Any) -> list[dict]:
    if isinstance(payload, dict) and "results" in payload:
        payload = payload["results"]
    if not isinstance(payload, list):
        raise ValueError(f"unexpected acquire response from the server: {str(payload)[:200]}")
    return payload


class JobLease:
    """Acquire jobs under one Session and keep that Session alive.

    ``client`` is a :class:`balsam.client.RESTClient` (or a callable returning one, resolved on first
    use). ``wrap`` turns each acquired job (a dict as the API sends it) into what the caller wants,
    e.g. ``balsam.api.Job._from_api``. With ``heartbeat_thread=False`` the owner calls
    :meth:`tick_if_due` from its own loop (the agent's modules run on a period already).
    """

    def __init__(
        self,
        client: Any,
        site_id: int,
        batch_job_id: Optional[int] = None,
        *,
        filter_tags: Optional[dict[str, str]] = None,
        states: Iterable["JobState | str"] = RUNNABLE_STATES,
        sort_by: Optional[str] = None,
        app_ids: Optional[Iterable[int]] = None,
        tick_period: Optional[float] = None,
        heartbeat_thread: bool = True,
        wrap: Optional[Callable[[dict], Any]] = None,
        name: str = "session",
        acquire_retry_count: Optional[int] = None,
        clock: Optional[Callable[[], float]] = None,
    ) -> None:
        self._client_or_factory = client
        self.site_id = site_id
        self.batch_job_id = batch_job_id
        self.filter_tags = dict(filter_tags or {})
        self.states = sorted(JobState.parse(s).value for s in states)
        self.sort_by = sort_by
        self.app_ids = sorted(set(app_ids or ()))
        self.tick_period = tick_period if tick_period is not None else tick_period_from_env()
        self.wrap = wrap
        self.name = name
        #: Retries inside one acquire call (None: the client's budget). A caller that acquires in a
        #: loop keeps this short: the pending request is resent on its next turn anyway, and a
        #: SIGTERM is not kept waiting behind minutes of backoff.
        self.acquire_retry_count = acquire_retry_count
        #: The clock of freshness and heartbeat periods (:func:`session_clock` unless given).
        self._clock = clock if clock is not None else session_clock
        self.closed = False
        self.tick_errors = 0
        #: (idempotency key, body) of an acquire whose answer never came: resent before anything new,
        #: and only to the Session it was sent to (:attr:`_pending_session`; a replacement drops it).
        self.pending: Optional[tuple[str, dict]] = None
        self._pending_session: Optional[int] = None
        #: The server refused ``max_gpus_per_node`` as an unknown field (it is older than this
        #: client): the filter is not sent again.
        self._no_gpu_filter = False
        #: See :meth:`watch`.
        self._held_ids: Optional[Callable[[], Optional[Iterable[int]]]] = None
        self._on_gone: Optional[Callable[[list[int]], None]] = None
        self._gone_with_generation = False
        self._window = 0  # where the next heartbeat's window of held ids starts (more than the limit)
        #: Acquires answered with jobs so far (see :attr:`generation`).
        self._generation = 0
        #: The generation as of the last lost Session: copies numbered up to it are void.
        self.lost_generation = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: Set to have the heartbeat thread tick now (:meth:`check_fresh`).
        self._tick_now = threading.Event()
        #: Events to set once an asked-for heartbeat is answered (the owners' loop wake-ups), and
        #: their own lock (the lease's is held over the creation of a replacing Session).
        self._tick_waiters: list[threading.Event] = []
        self._waiters_lock = threading.Lock()
        self._last_tick = self._clock()
        #: See :meth:`fresh`: the assumed expiry, and when the last request that succeeded was sent
        #: (-inf while a lost Session's jobs are not handed over yet).
        self.expiry_sec = assumed_expiry_sec(self.tick_period)
        self._confirmed = float("-inf")
        self._replacing = False
        #: Set by :meth:`announce_end`: the heartbeats say the Session ends soon (see "An announced end").
        self.ending = False
        #: False once a server answered an announcement without ``expires`` (it does not know it).
        self._ending_known: Optional[bool] = None
        sent = self._clock()
        self._session_id = self._create_session()
        self._confirmed = sent
        self._thread: Optional[threading.Thread] = None
        if heartbeat_thread:
            self._thread = threading.Thread(target=self._heartbeat, name=f"{name}-heartbeat", daemon=True)
            self._thread.start()

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        value = self._client_or_factory
        if callable(value) and not hasattr(value, "request"):
            value = self._client_or_factory = value()
        return value

    @property
    def session_id(self) -> int:
        return self._session_id

    @property
    def generation(self) -> int:
        """How many acquires have returned jobs: read on the acquiring thread right after
        :meth:`acquire`, the number of the copies it returned (only acquire changes it, and a lease
        has one acquiring thread). A heartbeat's ``gone`` answer holds for copies numbered up to
        the number it noted before its request, not for later ones (see :meth:`watch`)."""
        return self._generation

    # -- known alive ---------------------------------------------------------------------------
    def fresh(self, margin: Optional[float] = None) -> bool:
        """Whether the Session is known alive for ``margin`` seconds more (default: a heartbeat
        period, at most a quarter of the assumed expiry): the last request that succeeded was
        sent less than the assumed expiry minus ``margin`` ago. One clock read: cheap."""
        return self._clock() < self._fresh_deadline(margin)

    def fresh_until(self, margin: Optional[float] = None) -> float:
        """The :func:`session_clock` time until which :meth:`fresh` holds (-inf while a lost
        Session's jobs are being handed over, see :meth:`_replace_lost_session`): a deadline for
        other processes of the node (the spawner compares it on the same clock, its
        ``node_clock``), computed from the lease's own (injected) clock."""
        left = self._fresh_deadline(margin) - self._clock()
        return session_clock() + left

    def _fresh_deadline(self, margin: Optional[float]) -> float:
        if margin is None:
            margin = min(self.tick_period, self.expiry_sec / 4)
        return self._confirmed + self.expiry_sec - margin

    def check_fresh(self, wake: Optional[threading.Event] = None) -> bool:
        """:meth:`fresh`; if not, ask the heartbeat thread for a heartbeat now (``wake`` is set
        when it is answered: a success makes the lease fresh, a 404 hands the held jobs over as
        gone first) and return False. Called by a mode's loop once a turn, before it starts jobs.
        A lease without its heartbeat thread is ticked by its owner (:meth:`tick_if_due`)."""
        if self.fresh() or self.closed:
            return True
        if self._thread is not None:
            if wake is not None:
                with self._waiters_lock:
                    if wake not in self._tick_waiters:
                        self._tick_waiters.append(wake)
            self._tick_now.set()
        return False

    def _confirm(self, sent: float, session_id: int) -> None:
        """A request of ``session_id`` sent at ``sent`` succeeded: the Session lived then."""
        with self._lock:
            if session_id == self._session_id and not self._replacing and sent > self._confirmed:
                self._confirmed = sent

    def _create_session(self, retry_count: Optional[int] = None) -> int:
        body: dict[str, Any] = {"site_id": self.site_id}
        if self.batch_job_id is not None:
            body["batch_job_id"] = self.batch_job_id
        created = (self.client.post("/sessions/", json=body) if retry_count is None
                   else self.client.post("/sessions/", json=body, retry_count=retry_count))
        session_id = int(created["id"])
        self._last_tick = self._clock()
        logger.info("%s %s created (site %s, batch job %s)", self.name, session_id, self.site_id, self.batch_job_id)
        return session_id

    def _replace_lost_session(self, exc: BaseException, lost_id: int) -> Optional[list[int]]:
        """The server no longer knows session ``lost_id`` (it expired while we could not reach it):
        start a new one (once, whoever notices first). Jobs the old one held were freed by the server
        (RUNNING ones are RUN_TIMEOUT), so a pending acquire of the old session is void.

        Returns None when ``exc`` is no lost session (the caller raises it), else the held jobs
        reported gone (empty when another thread replaced it first, or without :meth:`watch`).
        Every copy acquired so far was acquired under the lost session (or an earlier one): none of
        them is held any more, and another launcher may already run them. So they are all handed
        to ``on_gone`` at once, numbered with the generation read under the lock that orders the
        replacement with acquires: a running copy is ended and a copy leased ahead is never started.
        Waiting for the next heartbeat to ask the new Session left a whole tick period in which the
        launcher started its prefetched jobs, which then ran twice at once (here and on the
        launcher that leased them after the expiry), in the same workdir. A copy acquired after the
        replacement is numbered higher and is not touched (the owner's generation check). An
        acquire of the old session answered only after the replacement (it was committed before the
        expiry, which gave its jobs back) returns no job (:meth:`acquire`)."""
        if _status(exc) != 404 or self.closed or self.ending:
            return None
        with self._lock:
            if self._session_id != lost_id:
                return []  # replaced already, and reported by whoever did
            logger.warning("%s %s is gone on the server (%s); creating a new one", self.name, lost_id, exc)
            self.pending = None  # the lost Session's key: never resent to the new one
            as_of = self._generation
            # Not fresh until the lost jobs are handed over (the owner's loop reads the lease fresh
            # before it looks at the jobs handed over: a copy of the lost Session never starts).
            self._replacing = True
            self._confirmed = float("-inf")
            # Copies acquired up to this number were the lost Session's (see GoneJobs.arrive).
            self.lost_generation = as_of
            sent = self._clock()
            try:
                # Retried as a heartbeat is, not for the client's whole budget (minutes, more with
                # slow 503s): the lease's lock is held meanwhile, and the acquiring thread and
                # every confirmation wait for it. A failure leaves the lost Session in place, and
                # the next request finds it gone again and retries the replacement.
                self._session_id = self._create_session(retry_count=TICK_RETRY_COUNT)
            except BaseException:
                self._replacing = False  # still the lost one: the next request finds it gone again
                raise
        try:
            return self._report_lost(lost_id, as_of)
        finally:
            with self._lock:
                self._replacing = False
                self._confirmed = max(self._confirmed, sent)

    def _report_lost(self, lost_id: int, as_of: int) -> list[int]:
        """Hand every held job to ``on_gone`` as of generation ``as_of`` (see :meth:`_replace_lost_session`);
        outside the lock, as the watch contract asks."""
        if self._held_ids is None or self._on_gone is None:
            return []
        held: Optional[Iterable[int]] = None
        for _ in range(3):
            try:
                held = self._held_ids()
                break
            except Exception as exc:  # the owner's containers changed under the copy: read them again
                logger.debug("%s: held jobs not read at the replacement (%s)", self.name, exc)
        else:
            # Left to the next heartbeat, which asks the new Session about every held job.
            logger.warning("%s: could not read the held jobs when %s was lost", self.name, lost_id)
            return []
        ids = sorted(set(held or ()))
        if not ids:
            return []
        logger.warning("%s %s was lost with %d held jobs, which are no longer this launcher's: %s",
                       self.name, lost_id, len(ids), ids[:20])
        self._hand_gone(ids, as_of)
        return ids

    def _hand_gone(self, ids: list[int], as_of: int) -> None:
        """``on_gone(ids)``, with the generation the copies were acquired under when it takes one."""
        if self._on_gone is None:
            return
        if self._gone_with_generation:
            self._on_gone(ids, as_of)
        else:
            self._on_gone(ids)

    # -- an announced end ------------------------------------------------------------------------
    def announce_end(self) -> None:
        """The owner is stopping: heartbeat now, and every :data:`ENDING_TICK_SEC` until :meth:`close`,
        saying the Session ends within :data:`ENDING_IN_SEC` (see "An announced end" above). From
        then on no acquire is sent and a lost Session is not replaced. Call it from any thread
        but a signal handler (it sets an Event: its lock may be held by the code a signal
        interrupted). A lease without its heartbeat thread announces at its owner's next
        :meth:`tick_if_due`."""
        if self.ending or self.closed:
            return
        self.ending = True
        # Freshness as the server now reckons it: nothing is started after a stop anyway.
        self.expiry_sec = min(self.expiry_sec, ENDING_IN_SEC)
        self._last_tick = float("-inf")  # due at once (tick_if_due)
        self._tick_now.set()

    def _ending_period(self) -> float:
        """The heartbeat period now: :data:`ENDING_TICK_SEC` while an announced end is repeated."""
        if self.ending and self._ending_known is not False:
            return min(self.tick_period, ENDING_TICK_SEC)
        return self.tick_period

    def _noted_end(self, answer: Any, session_id: int) -> None:
        """The answer to an announcement: a server that does not know it said nothing of ``expires``."""
        if isinstance(answer, dict) and answer.get("expires") is not None:
            if self._ending_known is None:
                logger.info("%s %s ends on the server by %s unless this launcher heartbeats again", self.name,
                            session_id, answer["expires"])
            self._ending_known = True
        elif self._ending_known is None:
            self._ending_known = False
            logger.info("%s %s: the server does not take an announced end (an older server): if this launcher "
                        "is killed before it reports its jobs, they stay RUNNING until the Session expires",
                        self.name, session_id)

    def _restore_full_expiry(self, client: Any) -> None:
        """The Session is left to expire for the site agent's replay of the spool (:meth:`close`):
        after an announced end it would expire :data:`ENDING_IN_SEC` after the last announcement,
        and the replay, which comes at the agent's next cycle, was refused (the job no longer held:
        its result lost, the job run again). One plain heartbeat gives it a full expiry again, as
        it had before the stop. An announcement still on its way (the heartbeat thread did not
        end within close's wait) is waited for first, at most its deadline: landing after this
        heartbeat it would shorten the expiry again."""
        if not self.ending or self._ending_known is False:
            return
        # Bounded, one attempt: this runs when the API did not take the reports, usually still hung
        # (a stopped server whose backlog takes connections and never answers), and the batch system
        # kills the launcher KillWait (30 s by default) after its SIGTERM. Unbounded, the heartbeat
        # waited the client's read timeout (120 s) per retry: close() took minutes. The thread's
        # announcement is not waited for when its last tick failed (the API is not answering).
        if self._thread is not None and self._thread.is_alive() and not self.tick_errors:
            self._thread.join(RESTORE_WAIT_SEC)
        try:
            client.put(f"/sessions/{self._session_id}", json=self._tick_body(), retry_count=0,
                       deadline=time.monotonic() + RESTORE_WAIT_SEC)
            logger.info("%s %s: a full expiry again for the site agent's replay of the spool", self.name,
                        self._session_id)
        except Exception as exc:
            if _status(exc) == 404:
                logger.warning("%s %s is already gone on the server: the site agent's replay of its spooled updates "
                               "will be refused (those jobs run again)", self.name, self._session_id)
                return
            # The API is down: when it is back, the server restarts every clock (an outage).
            logger.warning("%s %s: could not give it a full expiry for the site agent's replay (%s): it expires "
                           "%g s after the last announcement unless the server was down meanwhile", self.name,
                           self._session_id, exc, ENDING_IN_SEC)

    # -- heartbeat -------------------------------------------------------------------------------
    def watch(self, held_ids: Callable[[], Optional[Iterable[int]]], on_gone: Callable[..., None], *,
              generation: bool = False) -> None:
        """Ask, with every heartbeat, which held jobs the Session lost (deleted or moved by their user).

        Thread contract: both callables run on the thread that ticks (the heartbeat thread, or the
        caller of :meth:`tick_if_due`), or on the acquiring thread when an acquire finds the
        Session lost (see :meth:`_replace_lost_session`), never under the lease's lock. ``held_ids()`` returns the ids
        the owner runs or holds ready now (None: skip this heartbeat's question); it reads the
        owner's state from another thread, so it copies it (a job it misses is asked about next
        time, and one that ended meanwhile is answered gone and must be ignored). ``on_gone(ids)``
        gets the answer (only when not empty) and must only hand it over (a deque, an Event):
        the owner's loop ends those runs and sends no update for them (the server would refuse it).

        With ``generation=True`` the callback is ``on_gone(ids, as_of)``: ``as_of`` is
        :attr:`generation` as it was before the heartbeat's request went out. The answer is true of
        the copies acquired up to that number only: a job leased again since (a re-queue, a
        replaced Session) is held anew, and its new copy must not be ended on this answer (it is
        asked about again at the next heartbeat).
        """
        self._held_ids = held_ids
        self._on_gone = on_gone
        self._gone_with_generation = generation

    def _tick_body(self) -> dict[str, Any]:
        if self._held_ids is None:
            return {}
        try:
            held = self._held_ids()
        except Exception as exc:  # the owner's containers changed under the copy: ask next time
            logger.debug("%s: held jobs not read this heartbeat: %s", self.name, exc)
            return {}
        ids = sorted(set(held or ()))
        if len(ids) > MAX_JOB_IDS_PER_SESSION_TICK:
            # A window per heartbeat, moving on each time: every held job is asked about within
            # a few heartbeats, and a heartbeat stays one request of bounded size.
            start = self._window % len(ids)
            ids = (ids[start:] + ids[:start])[:MAX_JOB_IDS_PER_SESSION_TICK]
            self._window = start + MAX_JOB_IDS_PER_SESSION_TICK
        return {"job_ids": ids} if ids else {}

    def _body(self) -> dict[str, Any]:
        """A heartbeat's body: the held ids (:meth:`_tick_body`), and the announced end once stopping."""
        body = self._tick_body()
        if self.ending and self._ending_known is not False:
            body["ending_in_sec"] = ENDING_IN_SEC
        return body

    def tick(self) -> list[int]:
        """Heartbeat now (a lost session is replaced); returns the held jobs the Session no longer
        holds (always empty without :meth:`watch`), after handing them to ``on_gone``."""
        session_id = self._session_id
        # Before the request: every acquire counted up to here was answered before the server
        # computes this heartbeat's answer, so that answer is true of those copies (and maybe not of
        # later ones).
        as_of = self._generation
        body = self._body()
        sent = self._clock()
        # An announcement waits for its answer ENDING_IN_SEC at most (its tries included), not the
        # client's read timeout (2 minutes): past that its Session may be gone anyway, and the next
        # one, ENDING_TICK_SEC later, goes out on a connection of its own.
        extra = {"deadline": time.monotonic() + ENDING_IN_SEC} if "ending_in_sec" in body else {}
        try:
            # A missed tick is retried at the next period (the server waits several periods), so one
            # tick never sits in minutes of backoff that would also hold up close().
            answer = self.client.put(f"/sessions/{session_id}", json=body, retry_count=TICK_RETRY_COUNT, **extra)
            self.tick_errors = 0
            self._confirm(sent, session_id)
            if "ending_in_sec" in body:
                self._noted_end(answer, session_id)
        except Exception as exc:
            if self.ending and _status(exc) == 404:
                # Expired after the announced end (this launcher was slower than it said): its jobs
                # are the server's again, and reports of them are refused. Not replaced: it stops.
                logger.warning("%s %s ended on the server before this launcher reported its jobs (%s): they "
                               "run again", self.name, session_id, exc)
                self._stop.set()  # nothing to heartbeat any more
                return []
            if ("ending_in_sec" in body and _status(exc) == 422 and "ending_in_sec" in str(exc)
                    and self._ending_known is None):
                # A server that checks a heartbeat's fields and does not know this one: told once
                # (INFO), and this heartbeat sent again at once without it (it failed for no fault
                # of the Session's: no "heartbeat failed" WARNING, no period's wait).
                self._noted_end(None, session_id)
                return self.tick()
            lost = self._replace_lost_session(exc, session_id)
            if lost is None:
                self.tick_errors += 1
                raise
            return lost
        finally:
            self._last_tick = self._clock()
        # A server that does not know job_ids (Balsam 0.7's) answers without "gone".
        gone = answer.get("gone") if isinstance(answer, dict) and body else None
        if not gone:
            return []
        ids = [int(i) for i in gone]
        logger.info("%s %s no longer holds %d of its jobs: %s", self.name, session_id, len(ids), ids[:20])
        self._hand_gone(ids, as_of)
        return ids

    def tick_if_due(self) -> None:
        if not self.closed and self._clock() - self._last_tick >= self._ending_period():
            self.tick()

    def _heartbeat(self) -> None:
        paused = 0.0
        while True:
            # The period (shorter once an end is announced), or a heartbeat asked for now.
            self._tick_now.wait(max(0.0, self._ending_period() - paused))
            if self._stop.is_set():
                return
            self._tick_now.clear()
            with self._waiters_lock:  # those asking from now on are answered by the next heartbeat
                waiters, self._tick_waiters = self._tick_waiters, []
            failed = False
            try:
                self.tick()
            except Exception as exc:
                failed = True
                logger.warning("%s %s heartbeat failed (%d in a row): %s", self.name, self._session_id, self.tick_errors, exc)
            for wake in waiters:  # the asking loops look at the lease again
                wake.set()
            # Asked again at once while the API does not answer: not in a tight loop (the pause
            # counts towards the period, whose cadence stays as it was).
            paused = min(self._ending_period(), MIN_ASKED_TICK_GAP_SEC) if failed else 0.0
            if paused and self._stop.wait(paused):
                return

    # -- acquire ---------------------------------------------------------------------------------
    def acquire(
        self,
        max_num_jobs: int,
        *,
        max_wall_time_min: Optional[int] = None,
        max_nodes_per_job: Optional[int] = None,
        max_aggregate_nodes: Optional[float] = None,
        serial_only: bool = False,
        wait_sec: Optional[float] = None,
        max_gpus_per_node: Optional[float] = None,
        states: Optional[Iterable["JobState | str"]] = None,
    ) -> list[Any]:
        """Lease up to ``max_num_jobs`` jobs (at most 2,048) in the lease's states (``states``: in
        these instead, for this acquire only).

        ``max_gpus_per_node``: only jobs asking at most that many GPUs per node (0: a launcher
        whose nodes have none leaves the GPU jobs to others).

        When an earlier acquire got no answer, its request is sent again first (same key, same
        body) and its jobs are returned instead: call again for more.

        ``wait_sec``: when there is nothing to lease, the server may hold the answer up to that
        long (at most 10 s) and answer as soon as jobs can be leased (``Prefer: wait=N``); a
        server that does not wait answers at once, as without it. A resent request never waits.
        """
        if self.closed or self.ending or max_num_jobs <= 0:
            return []  # (ending: see "An announced end" above)
        headers = None
        with self._lock:  # one acquirer thread per lease; the lock orders it with session replacement
            session_id = self._session_id
            if self.pending is not None and self._pending_session != session_id:
                # Sent to a Session replaced since (the replacement drops it; this holds it to that):
                # its key means nothing to the new Session, whose answer could only be another lease.
                logger.info("%s %s: the unanswered acquire of %s is not resent", self.name, session_id,
                            self._pending_session)
                self.pending = None
            if self.pending is None:
                if wait_sec is not None and wait_sec > 0:
                    headers = {"Prefer": f"wait={wait_sec:g}"}
                body = acquire_request(
                    min(int(max_num_jobs), MAX_JOBS_PER_SESSION_ACQUIRE), max_wall_time_min=max_wall_time_min,
                    max_nodes_per_job=max_nodes_per_job, max_aggregate_nodes=max_aggregate_nodes,
                    serial_only=serial_only, sort_by=self.sort_by, filter_tags=self.filter_tags,
                    states=self.states if states is None else states,
                    app_ids=self.app_ids, max_gpus_per_node=None if self._no_gpu_filter else max_gpus_per_node,
                )
                self.pending = (new_idempotency_key(), body)
                self._pending_session = session_id
            else:
                logger.info("%s %s: resending the acquire whose answer was lost", self.name, self._session_id)
            key, body = self.pending
        t0 = time.perf_counter()
        sent = self._clock()
        try:
            extra = {"headers": headers} if headers is not None else {}
            rows = _rows(self.client.post(f"/sessions/{session_id}", json=body, idempotency_key=key,
                                          retry_count=self.acquire_retry_count, **extra))
        except Exception as exc:
            if _status(exc) == 422:
                # The server read the request and refused it: nothing was leased, and the same body
                # would be refused for ever (it was resent every call, the launcher idling out).
                with self._lock:
                    if self.pending is not None and self.pending[0] == key:
                        self.pending = None
                said = str(exc)
                if ("max_gpus_per_node" in body and "max_gpus_per_node" in said and "unknown field" in said
                        and not self._no_gpu_filter):
                    self._no_gpu_filter = True
                    logger.warning("%s %s: the server is older than this launcher and cannot hold back the jobs that "
                                   "need GPUs (%s); acquiring without that filter", self.name, session_id, exc)
                    return self.acquire(
                        max_num_jobs, max_wall_time_min=max_wall_time_min, max_nodes_per_job=max_nodes_per_job,
                        max_aggregate_nodes=max_aggregate_nodes, serial_only=serial_only, wait_sec=wait_sec)
                raise
            if self._replace_lost_session(exc, session_id) is None:
                raise  # still pending: the next call resends it
            return self.acquire(
                max_num_jobs, max_wall_time_min=max_wall_time_min, max_nodes_per_job=max_nodes_per_job,
                max_aggregate_nodes=max_aggregate_nodes, serial_only=serial_only, wait_sec=wait_sec,
                max_gpus_per_node=max_gpus_per_node,
            )
        self._confirm(sent, session_id)  # every acquire heartbeats its Session on the server
        with self._lock:
            if self.pending is not None and self.pending[0] == key:
                self.pending = None
            if rows and session_id != self._session_id:
                # Answered after the heartbeat thread found this Session gone and replaced it (the
                # server committed the lease before the expiry, the answer came late): the expiry
                # gave these jobs back, another launcher may run them, and the replacement's report
                # of held jobs could not include them. Numbered, they would count as copies of the
                # new Session (above lost_generation), start, and run twice.
                logger.warning("%s %s was replaced while its acquire was answered: its %d jobs are not this "
                               "launcher's (the server released them with the expiry): %s", self.name, session_id,
                               len(rows), [row.get("id") if isinstance(row, dict) else row for row in rows][:20])
                rows = []
            if rows:
                # Counted once the answer is here (the server committed the lease before it): a
                # heartbeat that notes this number or a later one was computed after this lease.
                self._generation += 1
        if rows:
            logger.debug("acquired %d jobs in %.3f s", len(rows), time.perf_counter() - t0)
        return [self.wrap(row) for row in rows] if self.wrap is not None else rows

    # -- close -----------------------------------------------------------------------------------
    def close(self, retry_count: int = SHUTDOWN_RETRY_COUNT) -> None:
        """Stop the heartbeat and delete the Session (its RUNNING jobs become RUN_TIMEOUT server-side).

        At shutdown a few quick retries are enough: if the API is down, the server expires the lease
        by itself, and an allocation should not idle for minutes waiting to say goodbye.

        Updates sent under the Session that an updater of this process spooled (the API was gone
        when it gave up) are sent first, once more (:func:`~balsam.client.status_updater.send_spooled`);
        if they still cannot be, the Session is not deleted but left to expire, so that the site
        agent's replay of the spool finds the jobs still held by it. Either order of "the API comes
        back" and "the launcher ends" then records the launcher's results.
        """
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._tick_now.set()
        if self._thread is not None:
            self._thread.join(5)
        client = self.client
        saved = getattr(client, "retry_count", None)
        if saved is not None:
            client.retry_count = min(saved, retry_count)
        try:
            if not send_spooled(client, self._session_id):
                # Updates sent under this Session wait in the spool for the site agent (the API was
                # gone when the updater gave up, and still is). Deleting the Session would make its
                # RUNNING jobs RUN_TIMEOUT and the spooled RUN_DONE would be refused at replay: the
                # job run again, its result lost. Left to expire instead: the agent's replay lands
                # while the Session still holds the jobs (the server restarts the expiry clock after
                # an outage), and the jobs it leased ahead wait for the expiry to be leased again.
                logger.warning("%s %s is not deleted: updates sent under it are spooled for the site agent; it "
                               "expires on the server", self.name, self._session_id)
                self._restore_full_expiry(client)
                return
            client.delete(f"/sessions/{self._session_id}")
            logger.info("%s %s deleted", self.name, self._session_id)
        except Exception as exc:
            if _status(exc) == 404:
                logger.info("%s %s was already gone on the server", self.name, self._session_id)
            else:
                logger.warning("could not delete %s %s (it will expire on the server): %s", self.name, self._session_id, exc)
        finally:
            if saved is not None:
                client.retry_count = saved
