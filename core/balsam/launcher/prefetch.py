"""Jobs leased ahead of the free slots, from a background thread (the serial mode's job source).

The serial master starts thousands of short tasks a second; asking the API for each batch on the
loop thread would stall starts for a round trip every time. A :class:`Prefetcher` keeps jobs leased
and prepared (work directory, command line, environment) ahead of the loop: what the partition can
start now (in chunks of at most ``depth``) plus a short lookahead of work, never a fixed number.

Thread contract (two threads, nothing else shared):

* The **prefetch thread** alone opens the lease (so the Session is created while the rest of the
  start-up runs), calls ``lease.acquire``, prepares jobs and reports unbuildable ones FAILED through
  ``updater.put`` (the updater is thread-safe). It writes :attr:`exhausted` and :attr:`error`
  (plain attribute stores, read by the loop thread).
* The **loop thread** calls :meth:`take`, :meth:`note_held`, :meth:`stop`, :meth:`join` and
  :meth:`close_lease`.
* Hand-over: prepared jobs go through ``_ready``, a deque guarded by ``_lock``. The loop reports how
  many taken jobs it still holds unstarted and, when that is none, the room left in the partition
  (:meth:`note_held`, int stores; :meth:`take` adds what it hands over to the held count at once,
  so that the prefetch thread never sees jobs in neither place); the prefetch thread tops up to
  :attr:`depth_now` counting held and ready jobs, and sleeps on ``_want`` until the loop has used
  half.
* Depth (the prefetch thread alone computes it, from the loop's int stores, and writes
  ``depth_now``): the lookahead, ``floor`` jobs or, with ``lookahead_sec``, as many as the loop
  starts in that time at the rate jobs have been ending (each a slot it fills again; a loop that
  does not report its running jobs: the rate of starts) (at most ``max_depth``); and, only
  while the loop placed every job it took (it holds none unstarted: the partition has room), the
  room it reported, in chunks of at most ``depth``. A loop that holds jobs it could not place has
  a full partition: the lease stops at the lookahead, so with long jobs a launcher holds a handful
  beyond what runs. Why: a runnable job a launcher has leased is invisible to everyone else (the
  elastic queue counts only jobs no launcher holds as backlog, a second BatchJob's launcher cannot
  lease them), so jobs leased long before they can start kept nodes idle while the first launcher
  held the whole campaign. Why the rate: every acquire costs the server a fixed ~3 ms of CPU
  besides its jobs (a request, a write transaction, an idempotency record), so short tasks run at
  1,000 a second leased 64 at a time spent a tenth of the server's CPU on acquires; half a second
  of work ahead makes them a few hundred each. Without ``floor`` (the default) the floor is
  ``depth`` and the room is not used: ``depth`` ahead at all times, raised by the rate.
* Copies: each acquire's jobs carry the lease's number for it (``lease.generation``, read by the
  prefetch thread right after the acquire, stored per job in ``_ready_generations``, in step with
  ``_ready`` under ``_lock``). :meth:`take` drops the jobs numbered up to the lease's
  ``lost_generation`` (an int store of the heartbeat thread, read once per take): they were acquired
  under a Session found gone since, whose held-jobs report (the master's held ids) does not see
  ``_ready``, and ``_ready`` mixes several acquires, so the loop's check of one number per batch
  (:meth:`balsam.launcher.gone.GoneJobs.arrive`) would keep them when newer jobs came with them.
  It sets :attr:`taken_generation` to the newest number among the jobs it returns (for the loop,
  :mod:`balsam.launcher.gone`: a heartbeat answer older than a copy is not applied to it, and a
  number too high only defers an answer to the next heartbeat).
* Giving back (``release_after_sec``): the loop hands the jobs it has held unstarted too long while
  the partition had no free room (every slot busy) to :meth:`give_back` (it took them out of its
  start queue first: it never starts them), and so are the jobs set aside as too long for the time
  left, the loop's (``give_back(..., too_late=True)``) and those :meth:`take` holds back (on the
  loop thread too, before they reach it). The prefetch thread sends them (``POST
  /sessions/{id}/release``, at most :data:`MAX_RELEASE_IDS` a request, :meth:`_send_release`),
  before any further acquire: each request resent with the same Idempotency-Key until answered,
  so that no acquire of this launcher can lease one of them again before the server has given them
  back (the race-freedom argument is :mod:`balsam.server.sessions_logic`'s "giving back jobs"; the
  acquire's ``max_wall_time_min`` never leases a too-late job to it again). Jobs acquired under a
  Session the lease lost since are not sent (the server released them with it), and a new Session
  gets a new key. Nor is an old copy whose id this Session leased again (its user re-queued it): its
  release would free the new copy, which the loop may start (run twice); dropped by
  :meth:`_drop_leased_again` at the acquire, and, for one the loop gave back after that check, by
  :meth:`take` (the new copy handed over) or :meth:`_send_release` (the new copy in ``_ready``).
  A server without the route (an older one: 405, or a 404 that names no Session)
  refuses it: the jobs held for a slot return to ``_ready`` with their acquire numbers and are
  started as before, the too-late ones stay leased until the lease's close, the prefetcher is no
  longer lean, and nothing is given back again. Any other refusal (the Session gone, bad input)
  returns them the same way and gives back again at the next stall, except where an earlier try
  of that request went unanswered: it may have been applied, so those jobs are not started here
  (:attr:`release_unknown`; an acquire that leases one again does not hand it over). A resend names
  exactly the first try's jobs (``_release_size``: jobs given back meanwhile wait for the next
  request). A release that keeps failing (5xx, 429, no answer) is given up after
  :data:`MAX_RELEASE_TRIES` tries (one request each: :data:`RELEASE_RETRY_COUNT`, ``retry_sec``
  apart) or once :data:`RELEASE_GIVE_UP_SEC` have passed since its first try (checked after each
  try; a try waits no longer than that bound from the first try: the client call's ``deadline``,
  so a server that accepts and never answers holds acquires back at most RELEASE_GIVE_UP_SEC, not
  one client read timeout, 120 s by default): acquires go on (one that fails for
  good held them back for the whole allocation), its jobs go to :attr:`release_unknown` where a try
  may have been applied (else back to ``_ready``), those never sent back to ``_ready`` (as are those
  the loop gives back after its check of :attr:`may_release` and before the give-up:
  :meth:`_keep_unsent`; the flag is set and read by :meth:`take` under ``_lock``), and nothing
  is given back (:attr:`release_given_up`) until that release has *settled* (below: answered, its
  Session gone, or refused for good; no release is unsettled) and :data:`RELEASE_RESUME_SEC` have
  passed since the give-up, doubled at each give-up in a row up to :data:`RELEASE_RESUME_MAX_SEC`
  (:meth:`_resume_release`; an answered new release starts over at RELEASE_RESUME_SEC): before, one
  minute without the server held the lookahead hidden at every stall for the rest of the run. Not
  on any answer (an acquire): a release route failing for good while acquires were answered
  stranded one more batch of stalled jobs in :attr:`release_unknown` at each resumption; now at
  most the given-up release's. The too-late jobs set aside meanwhile (:attr:`too_late`) are queued
  first when it resumes. A release given back after that is a new request (a new key), sent before
  any acquire as every release; it names only jobs the loop held and too-late ones, never one of
  an unsettled release (those never reach the loop). Acquires then may run while a try
  of the given-up release is still in flight; exactly-once still holds because its jobs are not
  started here: a late try frees only jobs this Session holds and does not start (one key applies
  at most once, and the acquire leases only free jobs). Such a release (and one refused after an
  unanswered try with a status a later answer may differ from: 408, 409, 425; a 429 counts as no
  answer) is *unsettled*
  (:attr:`_unsettled`): resent in the background, same key and ids, :data:`RELEASE_RESEND_FIRST_SEC`
  after, then at doubling waits up to :data:`RELEASE_RESEND_MAX_SEC`, until answered (or its
  Session is gone: the server freed its jobs); before, its jobs were held, hidden from everyone, until the Session's end. Answered, its jobs are
  no longer this launcher's, and one a later acquire leases is started as usual; those an acquire
  leased again while it was unsettled (:attr:`_parked`) are given back in a new release
  (:meth:`_settle`), sent at once, before any acquire. A refusal that would be refused for ever
  (any status below 500 but a 404 naming the Session, 408, 409, 425, 429) stops the resends: its
  jobs stay leased, not started here, until the Session's deletion. A resend past the key's
  lifetime on the server (24 h by default) is applied anew, which is safe: see
  :meth:`_resend_unsettled`. After giving back stalled jobs the prefetcher
  is *lean*: no lookahead; it leases only the room the loop reports (one acquire round trip after a
  slot frees), also beside held jobs that cannot be placed now (at most ``floor`` of them counted), until jobs end fast
  enough that the floor's jobs would start within ``release_after_sec`` (at least ``floor`` jobs
  ended over one such bound, :meth:`_measure_rate`): with long jobs, leasing ahead only hid jobs
  from the elastic queue and from other BatchJobs' launchers for a slot's whole run. The lean
  state and its window are int and float stores of the loop thread (:meth:`give_back`) read by this
  thread: one window may be judged on a stale count.
* ``check_satisfiable`` is passed in by the owner and must only read state fixed at start (the
  NodeManager's node list, never its occupancy).
* :meth:`stop` sets an Event the thread checks between calls; :meth:`join` waits for the thread;
  :meth:`close_lease` (after it) deletes the Session, which releases the unstarted jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

import attrs

from balsam.client.rest import new_idempotency_key
from balsam.models import MAX_JOBS_PER_SESSION_ACQUIRE

from .service_calls import UnknownBatchJob
from .app_run import JobBuildError, PreparedJob, SiteFaults, WorkdirUnavailable
from .gone import acquire_generation
from .node_manager import Demand, UnsatisfiableJob
from .placement import log_too_late, split_too_late
from .runner import disk_wait, report_failed
from .wake import WakeEvent

logger = logging.getLogger(__name__)

#: The rate the loop uses jobs at is measured over windows of at least this long.
RATE_WINDOW_SEC = 0.2
#: The most job ids one release request names (the server's bound: MAX_JOBS_PER_SESSION_ACQUIRE).
MAX_RELEASE_IDS = MAX_JOBS_PER_SESSION_ACQUIRE
#: A release that failed this many times, or for this long since its first try (checked after each
#: try), is given up (see "Giving back"): a route that fails for good (5xx, 429) held every acquire
#: back for the whole allocation.
MAX_RELEASE_TRIES = 5
RELEASE_GIVE_UP_SEC = 60.0
#: The client's retries inside one try (the prefetcher's own tries, retry_sec apart under the same
#: key, are the retries): with the client's default (10, backoff up to 30 s) one try against a route
#: answering 503 blocked this thread, and so every acquire, for ~3 minutes, and one against a
#: server that accepts and never answers for 11 read timeouts (~25 minutes with 120 s): "given up
#: after 5 tries or 60 s" held nothing. Now a try is one request, which waits no longer than
#: RELEASE_GIVE_UP_SEC from the release's first try (the call's ``deadline``; one read timeout of
#: the client, 120 s by default, held acquires back twice the bound): the give-up comes by then.
RELEASE_RETRY_COUNT = 0
#: After a release was given up, giving back resumes once that release has settled (answered, its
#: Session gone, or refused for good: no release is unsettled) and this long has passed since the
#: give-up (see "Giving back"); doubled at each give-up in a row, at most RELEASE_RESUME_MAX_SEC, and
#: back to this once a new release is answered. Settled first: resumed on any answer (an acquire), a
#: release route failing for good (5xx) while acquires were answered stranded one more batch of
#: stalled jobs at each resumption (leased, never started here, never freed) until the Session's end.
RELEASE_RESUME_SEC = 60.0
RELEASE_RESUME_MAX_SEC = 3600.0
#: An unsettled release (see "Giving back") is resent this long after it was given up, then at
#: twice the last wait, at most RELEASE_RESEND_MAX_SEC: its jobs are hidden from everyone until it is
#: answered, and one request every two minutes costs the server nothing.
RELEASE_RESEND_FIRST_SEC = 5.0
RELEASE_RESEND_MAX_SEC = 120.0
#: Statuses of a resend that may be answered otherwise later (besides 5xx and no answer): resent again.
_RESEND_AGAIN = frozenset({408, 409, 425, 429})


class _NoRelease(Exception):
    pass


@attrs.define
class _Unsettled:
    """A release that may have been applied and is not answered yet: resent with the same key and
    the same ids (the same body) until answered (prefetch thread only)."""

    key: str
    session_id: Any
    ids: list[int]  # sorted: the body of every try
    due: float  # time.monotonic() of the next try
    wait: float  # the wait before it
    tries: int = 0  # resends that failed


def _announce(lease: Any) -> None:
    """``lease``'s Session ends soon (:meth:`Prefetcher.announce_end`): a job source without
    ``announce_end`` (or none yet) is left alone, and a failure is logged, never raised (the stop
    goes on)."""
    announce = getattr(lease, "announce_end", None)
    if announce is None:
        return
    try:
        announce()
    except Exception as exc:
        logger.warning("could not announce the session's end: %s", exc)


def _session_gone(exc: BaseException) -> bool:
    """A 404 that names the Session: the server no longer knows it (balsam.server.sessions_logic)."""
    detail = getattr(exc, "detail", None)
    return getattr(exc, "status_code", None) == 404 and isinstance(detail, str) and detail.startswith("Session ")


def _no_route(exc: BaseException) -> bool:
    """Whether a refused release says the server has no such route (an older server): 405, or a 404
    that names no Session (a missing Session is "Session N not found ...", balsam.server.sessions_logic)."""
    status = getattr(exc, "status_code", None)
    if status == 405:
        return True
    detail = getattr(exc, "detail", None)
    return status == 404 and not (isinstance(detail, str) and detail.startswith("Session "))


class Prefetcher:
    def __init__(
        self,
        open_lease: Callable[[], Any],
        prepare: Callable[[Any], PreparedJob],
        check_satisfiable: Callable[[Demand], None],
        updater: Any,
        *,
        depth: int,
        remaining_min: Callable[[], int],
        retry_sec: float = 1.0,
        on_ready: Optional[Callable[[], None]] = None,
        acquire_kwargs: Optional[dict[str, Any]] = None,
        lookahead_sec: float = 0.0,
        max_depth: Optional[int] = None,
        floor: Optional[int] = None,
        room: Optional[int] = None,
        before_prepare: Optional[Callable[[Sequence[Any]], None]] = None,
        release_after_sec: Optional[float] = None,
    ) -> None:
        #: The most jobs one fill of free room leases (the whole depth without ``floor``).
        self.depth = max(1, int(depth))
        #: The fewest jobs kept leased ahead (the lookahead's floor): ``depth`` unless given.
        self.floor = min(self.depth, max(1, int(floor))) if floor is not None else self.depth
        #: The depth in force (:meth:`_target`).
        self.depth_now = self.depth if floor is None else max(self.floor, min(self.depth, room if room is not None else self.depth))
        self.depth_peak = self.depth_now
        self.lookahead_sec = max(0.0, float(lookahead_sec))
        self.max_depth = max(self.depth, int(max_depth)) if max_depth is not None else self.depth
        #: Jobs per second the loop has been starting (taken and no longer held; None: not measured yet).
        self.rate: Optional[float] = None
        self._ahead = self.floor  # the lookahead in jobs (_measure_rate)
        self._running = 0  # jobs the loop placed that have not ended (note_held; 0 when not told)
        self._taken = 0
        self._rate_since = time.monotonic()
        self._rate_used = 0
        self.retry_sec = float(retry_sec)
        self._open_lease = open_lease
        self._prepare = prepare
        #: Called with each acquired batch before its jobs are prepared (this thread): the stale runs
        #: of a batch are ended together, one grace for all (JobPreparer.end_stale_runs).
        self._before_prepare = before_prepare
        self._check = check_satisfiable
        self._updater = updater
        self._remaining_min = remaining_min
        self._on_ready = on_ready or (lambda: None)
        self._acquire_kwargs = dict(acquire_kwargs or {})
        self._lock = threading.Lock()
        self._ready: deque[PreparedJob] = deque()
        #: The acquire number of each job in ``_ready``, in the same order (under ``_lock``; a job
        #: without one counts as 0, not numbered).
        self._ready_generations: deque[int] = deque()
        #: The acquire number of the newest job the last :meth:`take` returned (loop thread).
        self.taken_generation = 0
        self._held = 0
        #: The room the loop reported with no job held (jobs it could start now; the partition's
        #: at first: the owner's ``room``, else ``depth``).
        self._room = self.depth if room is None else max(0, int(room))
        self._want = WakeEvent()  # set by the loop thread on every turn that finds the backlog low
        self._stopping = threading.Event()
        #: The lease (set by the prefetch thread once the Session exists).
        self.lease: Any = None
        #: :meth:`announce_end` was called (under ``_end_lock``, with ``lease``'s setting).
        self._ending = False
        self._end_lock = threading.Lock()
        #: Why the Session could not be created (the launcher cannot run without one).
        self.error: Optional[BaseException] = None
        #: The last acquire returned nothing: the server has no runnable job for us right now.
        self.exhausted = False
        #: The last acquire failed with this message (it is retried every ``retry_sec``).
        self.acquire_error: Optional[str] = None
        self.acquired = 0
        #: Jobs set aside as too late (their ``wall_time_min`` exceeded the time left; never started)
        #: that stay leased until the lease's close: no release bound, or a server without the release
        #: route, or a release it refused (see "Giving back"); those kept while giving back was given
        #: up go back to the release queue when it resumes (:meth:`_resume_release`). Under ``_lock``,
        #: with each one's acquire number (a lost Session's are not sent: the server freed them).
        self.too_late: list[PreparedJob] = []
        self._too_late_generations: dict[int, int] = {}
        #: Jobs given back unstarted because the site's file system failed their workdirs; once
        #: tripped, no more acquires (:attr:`exhausted` stays set: the launcher ends when idle).
        self.site_faults = SiteFaults()
        #: The bound of a lean prefetcher (see "Giving back"; None: the loop never gives back).
        self.release_after_sec = release_after_sec
        #: No lookahead (see "Giving back"): set by :meth:`give_back`, cleared by :meth:`_measure_rate`.
        self.lean = False
        self._lean_since, self._lean_used = 0.0, 0  # the lean count's window (loop thread, then this one)
        #: Jobs to release, not released yet (under ``_lock``): each with its acquire number and
        #: whether it was set aside as too late (else held unstarted while the partition was full).
        self._releasing: list[tuple[PreparedJob, int, bool]] = []
        #: The key of the release in flight and the Session it was sent to (kept until answered; a
        #: new Session gets a new key: the server refuses a key reused on another path).
        self._release_key: Optional[str] = None
        self._release_session: Any = None
        #: How many of ``_releasing`` (its first) the request in flight names: a resend under its key
        #: names exactly those (jobs given back meanwhile made its body differ: the server refuses a
        #: key reused for a different request, 422); its failed tries and when the first went out.
        self._release_size = 0
        self._release_tries = 0
        self._release_first_try = 0.0
        #: The release in flight went out and got no answer at least once: the server may have
        #: applied it, so its jobs are never handed back to the loop (see :meth:`_send_release`).
        self._release_unanswered = False
        self._given_back = 0  # taken jobs the loop gave back (loop thread: the rate does not count them as ended)
        #: Jobs the server gave back for us; and whether it has no release route (no more giving back).
        self.released = 0
        self.release_refused = False
        #: A release failed MAX_RELEASE_TRIES times or for RELEASE_GIVE_UP_SEC: nothing is given back
        #: until it has settled and the back-off passed (:meth:`_resume_release`).
        self.release_given_up = False
        #: Give-ups so far; the time.monotonic() of the last, and from when giving back may resume
        #: (once no release is unsettled); the next back-off.
        self.release_give_ups = 0
        self._given_up_at = self._resume_at = 0.0
        self._resume_wait = RELEASE_RESUME_SEC
        #: Jobs of a release that may have been applied when the server then refused it, or when it
        #: was given up, until it is answered (:meth:`_resend_unsettled`): never started here, not
        #: even when an acquire leases them again. The set mirrors the list (this thread's reads).
        self.release_unknown: list[int] = []
        self._release_unknown_ids: set[int] = set()
        #: Those releases, resent until answered (this thread).
        self._unsettled: list[_Unsettled] = []
        #: Jobs of :attr:`release_unknown` that an acquire leased again, with the Session that leased
        #: them (this thread): released again once their release is answered (:meth:`_settle`).
        self._parked: dict[int, Any] = {}
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    # -- loop thread ---------------------------------------------------------------------------
    def start(self) -> "Prefetcher":
        self._thread.start()
        return self

    def take(self) -> list[PreparedJob]:
        """Every prepared job ready now (oldest first), less those acquired under a Session the
        lease lost since (see "Copies" above) and those that can no longer finish in time
        (:meth:`_hold_back_too_late`)."""
        with self._lock:
            if not self._ready:
                return []
            jobs = list(self._ready)
            generations = list(self._ready_generations)
            # Held until the loop's note_held says otherwise, counted before they leave _ready: the
            # prefetch thread (which reads _ready, then _held) must never see them in neither place,
            # an empty partition, and lease again.
            self._held += len(jobs)
            self._ready.clear()
            self._ready_generations.clear()
            if self._releasing:
                # Old copies of these ids given back by the loop (give_back) after the prefetch
                # thread's check (_drop_leased_again) and before the new copies reached _ready: the
                # release of such an id would free the new copy the loop starts now (run twice).
                # Those of the try in flight stay (a resend names exactly its first try's jobs; no
                # acquire goes out while one is in flight, so none of them was leased again).
                sent = self._release_size if self._release_key is not None else 0
                ids = {p.id for p in jobs}
                unsent = [e for e in self._releasing[sent:] if e[0].id not in ids]
                if len(unsent) < len(self._releasing) - sent:
                    logger.info("%d jobs given back were leased again: the old copies are not given back, the "
                                "new ones go on", len(self._releasing) - sent - len(unsent))
                    self._releasing = self._releasing[:sent] + unsent
            if self.too_late:
                # Newer copies of jobs held back (leased again after the prefetch thread's check,
                # _drop_leased_again, and before they reached _ready): the old copies are not given back.
                dropped = self._prune_too_late({p.id for p in jobs})
                if dropped:
                    logger.info("%d jobs held back unstarted were leased again: the old copies are not given "
                                "back, the new ones go on: %s", len(dropped), dropped[:20])
        generations = [0] * (len(jobs) - len(generations)) + generations
        lost = int(getattr(self.lease, "lost_generation", 0) or 0)
        if lost and generations[0] <= lost:  # in acquire order: the oldest first
            void = [p.id for p, g in zip(jobs, generations) if g <= lost]
            logger.warning("%d jobs acquired under a lost session are not started (the server released them "
                           "with it): %s", len(void), void[:20])
            kept = [(p, g) for p, g in zip(jobs, generations) if g > lost]
            self._held -= len(jobs) - len(kept)  # never started: neither held nor used
            jobs = [p for p, _ in kept]
            generations = [g for _, g in kept]
            if not jobs:
                return []
        self.taken_generation = max(generations)
        may_start = self._hold_back_too_late(jobs, generations)
        self._held -= len(jobs) - len(may_start)  # those held back never start: neither held nor used
        self._taken += len(may_start)
        return may_start

    def _hold_back_too_late(self, jobs: list[PreparedJob], generations: list[int]) -> list[PreparedJob]:
        """Jobs that can no longer finish before the wall time are not handed to the loop
        (:func:`~balsam.launcher.placement.split_too_late`, the rule every mode applies, against the
        same ``remaining_min`` the acquire passes as ``max_wall_time_min``): the acquire asked only
        for jobs that fit the time left then, but these were leased ahead and would start later, to
        be ended at the wall time (RUN_TIMEOUT) after running for nothing. They are given back at
        once (``POST /sessions/{id}/release``, see "Giving back"), to a launcher with time left, and
        visible to the elastic queue again; with a server without that route, or without a release
        bound, they stay leased in :attr:`too_late` and go back unstarted when the lease is closed,
        as every leased job that never started. They are neither work for the idle timeout nor held
        jobs that take the next acquire's room. Jobs with
        no wall time (0, the default) are never held back, and without any the time left is not
        read. The serial master checks again the jobs that wait for a slot (Master.step). Each keeps
        its own acquire number (``generations``, in step with ``jobs``): one of a Session lost since
        is not sent (:meth:`_send_release`), whatever newer jobs came in the same take."""
        split = split_too_late(jobs, self._remaining_min)
        if split.too_late:
            last = {p.id: i for i, p in enumerate(jobs)}
            if len(last) < len(jobs):
                # One id twice (leased again while its old copy waited in _ready): only the newest
                # copy counts; an older one held back and given back would free the new copy, and
                # an older one started beside a newer held back one would run while it is freed.
                order = {id(p): i for i, p in enumerate(jobs)}
                split.may_start[:] = [p for p in split.may_start if last[p.id] == order[id(p)]]
                split.too_late[:] = [p for p in split.too_late if last[p.id] == order[id(p)]]
        if split.too_late:
            numbers = {p.id: g for p, g in zip(jobs, generations)}
            # Read and stored in one locked block: the prefetch thread gives up (_refused) and resumes
            # (_resume_release, which empties too_late) under _lock. Read before it and stored after,
            # a job stored in too_late once giving back was on again stayed leased, unstarted and
            # hidden until the Session's end; one queued once it was given up went out meanwhile.
            with self._lock:
                now = self.may_release  # given back now, so that the elastic queue sees them (see "Giving back")
                if now:
                    self._releasing.extend((p, numbers[p.id], True) for p in split.too_late)
                else:  # the prefetch thread drops those of an answered release (_settle)
                    self._set_too_late([(p, numbers[p.id]) for p in split.too_late])
            if now:
                log_too_late(split, "a release request (POST /sessions/{id}/release)")
                self._want.set()
            else:
                log_too_late(split, "the lease's close (its Session's deletion)")
        return split.may_start

    def note_held(self, count: int, room: Optional[int] = None, running: Optional[int] = None) -> None:
        """The loop holds ``count`` taken jobs that have not started: top up when they run low.
        ``room``: with none held, the jobs the partition could start now (None: unchanged).
        ``running``: the jobs placed and not ended (the rate is then that of jobs ending)."""
        if room is not None:
            self._room = max(0, int(room))
        if running is not None:
            self._running = max(0, int(running))
        self._held = count
        if count + len(self._ready) <= self.depth_now // 2:
            self._want.set()

    def give_back(self, jobs: Sequence[tuple[PreparedJob, int]], *, too_late: bool = False) -> None:
        """Release ``jobs`` (each with its acquire number), which the loop took and will never start:
        it took them out of its start queue and no longer counts them held (see "Giving back").
        Held unstarted with every slot busy (the prefetcher turns lean), or ``too_late``: set aside
        as too long for the time left (:class:`~balsam.launcher.placement.TooLateJobs`)."""
        if not jobs:
            return
        with self._lock:
            self._releasing.extend((p, generation, too_late) for p, generation in jobs)
        self._given_back += len(jobs)
        self._held = max(0, self._held - len(jobs))
        if not too_late:
            # The jobs ended from now on are counted over the bound (_measure_rate).
            self._lean_since, self._lean_used = time.monotonic(), self._taken - self._held - self._running - self._given_back
            self.lean = True
            self._ahead = 0
        self._want.set()

    @property
    def may_release(self) -> bool:
        """Whether jobs may be given back at all (a bound is set and the server has the route)."""
        return self.release_after_sec is not None and not self.release_refused and not self.release_given_up

    @property
    def may_give_back(self) -> bool:
        """Whether the loop should give stalled jobs back (:attr:`may_release`, and no release is
        still in flight)."""
        return self.may_release and not self._releasing

    @property
    def releasing(self) -> int:
        """Jobs given back and not released yet (the Session's deletion returns them at the end)."""
        return len(self._releasing)

    @property
    def backlog(self) -> int:
        return len(self._ready)

    def stop(self) -> None:
        self._stopping.set()
        self._want.set()

    def join(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait for it (an acquire in flight finishes first)."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def announce_end(self) -> None:
        """The owner stops: the lease's Session is said to end soon (balsam.client.lease, "An
        announced end"), now if the lease is open, else as soon as this prefetcher's thread has
        opened it. A stop requested while the Session was being created (the batch system's SIGTERM
        right after the start) announced nothing: the lease was not there yet. Any thread but a
        signal handler's."""
        with self._end_lock:
            self._ending = True
            lease = self.lease
        _announce(lease)

    def close_lease(self, *, quick: bool = False) -> None:
        """Close the lease, which gives unstarted jobs back (``quick``: no retry on an unreachable
        API; the server expires the Session by itself). After :meth:`join`."""
        if self.lease is not None:
            if quick:
                self.lease.close(retry_count=0)
            else:
                self.lease.close()

    # -- prefetch thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            lease = self._open_lease()
            with self._end_lock:  # announce_end either sees the lease or is seen here
                self.lease = lease
                ending = self._ending
            if ending:
                _announce(lease)
        except BaseException as exc:
            if isinstance(exc, UnknownBatchJob):
                # A start-up problem the launcher prints as one ``Error:`` line: no traceback here.
                logger.info("could not create the session: %s", exc)
            else:
                logger.exception("could not create the session")
            self.error = exc
            self._on_ready()
            return
        while not self._stopping.is_set():
            if self._unsettled:
                self._resend_unsettled()  # those due only: acquires do not wait for them
            if self.release_given_up:
                self._resume_release()
            if self.site_faults.tripped:
                self.exhausted = True
                self._stopping.wait(self.retry_sec)
                continue
            if disk_wait.paused():
                # The workdirs' file system is full: runs ending there are given back (runner.DiskWait);
                # no job is acquired until it has room. Exhausted (nothing comes): the launcher
                # ends at its idle time if the disk stays full; the next acquire with jobs clears it.
                self.exhausted = True
                self._stopping.wait(self.retry_sec)
                continue
            if self._releasing:
                if self.release_given_up and self._release_key is None:
                    # Given back after the loop's check of may_give_back and before the give-up:
                    # not sent while given up (the release would be a new request while the given-up
                    # one is unsettled); kept as _refused keeps those never sent.
                    self._keep_unsent()
                    continue
                # Before any acquire: none may lease a job of an unanswered release again.
                self._send_release()
                continue
            self._measure_rate()
            target = self._target()
            unstarted = len(self._ready) + self._held  # in this order: see take
            # Lean: the free room beside the held jobs, at once (see "Giving back"); 0: lean and full.
            if target <= 0 or unstarted > (target - 1 if self.lean else target // 2):
                self._want.wait(0.05)
                self._want.clear()
                continue
            try:
                jobs = self.lease.acquire(target - unstarted, max_wall_time_min=self._remaining_min(), **self._acquire_kwargs)
                self.acquire_error = None
            except Exception as exc:
                self.acquire_error = str(exc)
                logger.warning("acquire failed (retrying in %.1f s): %s", self.retry_sec, exc)
                self._stopping.wait(self.retry_sec)
                continue
            self.acquired += len(jobs)
            generation = acquire_generation(self.lease)  # this thread is the lease's only acquirer
            if jobs and (self.too_late or self._releasing):
                self._drop_leased_again(jobs)
            if self._release_unknown_ids and jobs:
                jobs = self._drop_release_unknown(jobs)
            if jobs and self._before_prepare is not None:
                self._before_prepare(jobs)
            batch = []
            for job in jobs:
                prepared = self._prepare_one(job)
                if prepared is not None:
                    batch.append(prepared)
                    if len(batch) == 1 and not self._ready:
                        # The loop may be idle: hand the first job over at once (start-up latency).
                        with self._lock:
                            self._ready.append(batch.pop())
                            self._ready_generations.append(generation)
                        self._on_ready()
            if batch:
                with self._lock:
                    self._ready.extend(batch)
                    self._ready_generations.extend([generation] * len(batch))
                self._on_ready()
            self.exhausted = not jobs
            if not jobs:
                self._stopping.wait(self.retry_sec)

    def _send_release(self) -> None:
        """Release the jobs given back, at most MAX_RELEASE_IDS a request (see "Giving back")."""
        lease = self.lease
        client, session_id = getattr(lease, "client", None), getattr(lease, "session_id", None)
        # After the Session's id: a replacement numbers the lost copies before it changes the id.
        lost = int(getattr(lease, "lost_generation", 0) or 0)
        with self._lock:
            void = [entry for entry in self._releasing if lost and entry[1] <= lost]
            if void:  # the lost Session's: the server released them with it, and they are not ours
                self._releasing = [entry for entry in self._releasing if not (lost and entry[1] <= lost)]
            # A resend under the key in flight names exactly its first try's jobs: jobs are only
            # appended meanwhile (give_back), and a void entry comes with a new Session (a new key).
            held = self._release_key is not None and self._release_session == session_id and not void
            if not held and self._ready:
                # A new request: an old copy given back (give_back) after _drop_leased_again's check,
                # whose id was leased again and is now in _ready, is not named: its release would
                # free the new copy the loop may start (take drops those it hands over as well).
                newer = {p.id for p in self._ready}
                self._releasing = [e for e in self._releasing if e[0].id not in newer]
            batch = self._releasing[:self._release_size if held else MAX_RELEASE_IDS]
        if void:
            logger.info("%d jobs to give back were leased by a lost session, which the server ended with "
                        "them: nothing to give back", len(void))
            self._forget_release()
        if not batch:
            return
        ids = sorted({entry[0].id for entry in batch})
        if self._release_key is None or self._release_session != session_id:
            self._release_key, self._release_session = new_idempotency_key(), session_id
            self._release_unanswered = False
            self._release_size, self._release_tries, self._release_first_try = len(batch), 0, time.monotonic()
        try:
            if client is None or session_id is None:
                raise _NoRelease("this job source cannot give jobs back")
            # The give-up's bound holds for a server that accepts and never answers: no try waits past
            # it (the client's read timeout alone, 120 s, held every acquire back twice as long).
            answer = client.post(f"/sessions/{session_id}/release", json={"job_ids": ids},
                                 idempotency_key=self._release_key, retry_count=RELEASE_RETRY_COUNT,
                                 deadline=self._release_first_try + RELEASE_GIVE_UP_SEC)
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if not isinstance(exc, _NoRelease) and (not isinstance(status, int) or status >= 500 or status == 429):
                # No answer (or the server could not answer now): resent under the same key,
                # before any acquire (it may have been applied), up to the bound.
                self._release_unanswered = True
                self._release_tries += 1
                if (self._release_tries >= MAX_RELEASE_TRIES
                        or time.monotonic() - self._release_first_try >= RELEASE_GIVE_UP_SEC):
                    self._refused(batch, exc, no_route=False, gave_up=True)
                    return
                logger.warning("giving %d leased jobs back failed (retrying in %.1f s, before any acquire): %s",
                               len(ids), self.retry_sec, exc)
                self._stopping.wait(self.retry_sec)
                return
            self._refused(batch, exc, no_route=isinstance(exc, _NoRelease) or _no_route(exc))
            return
        released = answer.get("released", []) if isinstance(answer, dict) else []
        with self._lock:
            self._releasing = self._releasing[len(batch):]
        self._forget_release()
        self._resume_wait = RELEASE_RESUME_SEC  # the route works again: the next give-up waits the first wait
        self.released += len(released)
        late = sum(1 for entry in batch if entry[2])
        logger.info("gave back %d leased jobs never started (%d of them released, the others had left this session; "
                    "%d set aside as too long for the time left, %d held while every slot was busy): %s",
                    len(ids), len(released), late, len(batch) - late, ids[:20])

    def _keep_unsent(self) -> None:
        """While giving back is given up, the jobs queued and never sent go back as :meth:`_refused`
        returns them after a give-up: those held for a slot to ``_ready`` (with their acquire
        numbers), the too-late ones to :attr:`too_late` (queued again at the resumption)."""
        with self._lock:
            stalled = [(p, g) for p, g, late in self._releasing if not late]
            self._set_too_late([(p, g) for p, g, late in self._releasing if late])
            self._releasing = []
            for prepared, generation in reversed(stalled):
                self._ready.appendleft(prepared)
                self._ready_generations.appendleft(generation)
        logger.info("giving back is given up: %d jobs given back meanwhile are kept (not sent)", len(stalled))
        if stalled:
            self._on_ready()

    def _forget_release(self) -> None:
        self._release_key, self._release_session, self._release_unanswered = None, None, False
        self._release_size = self._release_tries = 0

    def _drop_leased_again(self, jobs: list[Any]) -> None:
        """An acquire leased again jobs held back here unreleased (:attr:`too_late`, or queued in
        ``_releasing`` and never sent: no acquire goes out while a try is in flight): the server
        freed the old copy since (its user re-queued it, which ends the lease, and the mark that
        keeps it from acquires is cleared by heartbeats that do not list it: the held-jobs report
        does not see these; or the Session was lost and replaced). Released later under its id, it
        freed the new copy, which the loop may start meanwhile, to another launcher too (run twice).
        The old copies are dropped; the new one is checked as any job (:meth:`take`). An old copy the
        loop gives back after this check is dropped by :meth:`take` or :meth:`_send_release`."""
        ids = {int(job.id) for job in jobs}
        with self._lock:
            old = self._prune_too_late(ids)
            if self._release_key is None:  # never sent (a resend must name its first try's jobs)
                queued = [entry[0].id for entry in self._releasing if entry[0].id in ids]
                if queued:
                    self._releasing = [entry for entry in self._releasing if entry[0].id not in ids]
                    old += queued
        if old:
            logger.info("%d jobs held back unstarted were leased again (re-queued by their user, or their lost "
                        "session replaced): the old copies are not given back, the new ones go on: %s",
                        len(old), sorted(set(old))[:20])

    def _prune_too_late(self, ids: "set[int]") -> list[int]:
        """Drop the copies of ``ids`` from :attr:`too_late` (under ``_lock``); the ids dropped."""
        held = self._too_late_generations  # the ids of too_late: one look per id of ``ids``
        old = [i for i in ids if i in held]
        if old:
            self.too_late = [p for p in self.too_late if p.id not in ids]
            for job_id in old:
                self._too_late_generations.pop(job_id, None)
        return old

    def _set_too_late(self, late: Sequence[tuple[PreparedJob, int]]) -> None:
        """Keep ``late`` (each with its acquire number) in :attr:`too_late` (under ``_lock``): a job
        already there under the same id is an older copy (one id twice gave the second one acquire
        number 0 at the resumption): the newer copy replaces it."""
        latest = {p.id: (p, g) for p, g in late}  # in acquire order: the last copy is the newest
        if self.too_late and not latest.keys().isdisjoint(self._too_late_generations):
            self.too_late = [p for p in self.too_late if p.id not in latest]
        self.too_late.extend(p for p, _g in latest.values())
        self._too_late_generations.update((job_id, g) for job_id, (_p, g) in latest.items())

    def _drop_release_unknown(self, jobs: list[Any]) -> list[Any]:
        """An acquire leased again jobs of a release that may have been applied (:attr:`release_unknown`):
        a try of it may still be in flight and free them while they run here, so they are not started
        here; they stay leased, parked (:attr:`_parked`) until that release is answered, then given
        back (:meth:`_settle`)."""
        again = [job for job in jobs if int(job.id) in self._release_unknown_ids]
        if not again:
            return jobs
        session_id = getattr(self.lease, "session_id", None)
        for job in again:
            self._parked[int(job.id)] = session_id
        logger.warning("%d jobs leased again after a release that may have been applied are not started here "
                       "(given back once that release is answered): %s", len(again), [job.id for job in again][:20])
        return [job for job in jobs if int(job.id) not in self._release_unknown_ids]

    def _resend_unsettled(self) -> None:
        """Resend each release of :attr:`_unsettled` that is due, one request each, under its key and
        with its first try's ids (the same body): a try the server applied is answered from its
        record (replayed, never applied twice), one it never got is applied now. One attempt (no
        client retries): the acquires go on between resends, and the next one comes after twice
        the wait. Until answered its jobs stay out of the loop's reach (:attr:`release_unknown`). The
        new release :meth:`_settle` makes of an answered one's jobs leased again meanwhile goes out
        in the same call, before any acquire. Resends stop at an answer, a 404 naming the Session
        (gone: settled), or a refusal that would be refused for ever: every other status below 500
        (422: the key reused for another body); 408, 409, 425 and 429 may be answered otherwise
        later, and 5xx or no answer at all, so those are resent.

        The key's record lives ``BALSAM_IDEMPOTENCY_TTL_SEC`` on the server (24 h by default),
        maybe less than an allocation; a resend after that is applied anew. Safe: it frees only jobs
        this Session holds in a runnable state, and of its ids this Session holds only those it
        never starts (the release's own, and those leased again meanwhile, parked); the answer then
        says what it freed."""
        lease = self.lease
        client, session_id = getattr(lease, "client", None), getattr(lease, "session_id", None)
        pending = list(self._unsettled)
        while pending:
            entry = pending.pop(0)
            if entry.session_id != session_id:
                # The lease replaced that Session, which the server no longer knew: it released its
                # jobs with it, and no try naming it can be applied any more (404).
                pending.extend(self._settle(entry, None))
                continue
            if time.monotonic() < entry.due or client is None:
                continue
            try:
                answer = client.post(f"/sessions/{entry.session_id}/release", json={"job_ids": entry.ids},
                                     idempotency_key=entry.key, retry_count=0,
                                     # on the prefetch thread: a silent server must not hold acquires longer
                                     deadline=time.monotonic() + RELEASE_GIVE_UP_SEC)
            except Exception as exc:
                status = getattr(exc, "status_code", None)
                if _session_gone(exc):
                    pending.extend(self._settle(entry, None))
                elif isinstance(status, int) and status < 500 and status not in _RESEND_AGAIN:
                    # Refused as it is (it would be refused for ever): kept leased, never started here.
                    self._unsettled.remove(entry)
                    logger.warning("could not give %d leased jobs back (%s): never started here (a try may have "
                                   "given them back; the session's deletion returns them otherwise)", len(entry.ids), exc)
                else:
                    entry.tries += 1
                    entry.wait = min(RELEASE_RESEND_MAX_SEC, max(entry.wait * 2, RELEASE_RESEND_FIRST_SEC))
                    entry.due = time.monotonic() + entry.wait
                    (logger.warning if entry.tries == 1 else logger.info)(
                        "resending the release of %d leased jobs failed %d times (next in %.0f s; they are not "
                        "started here meanwhile): %s", len(entry.ids), entry.tries, entry.wait, exc)
                continue
            # Its "again" release goes out now, in this step: see _settle.
            pending.extend(self._settle(entry, answer.get("released", []) if isinstance(answer, dict) else []))

    def _settle(self, entry: _Unsettled, released: Optional[list[int]]) -> list[_Unsettled]:
        """``entry`` was answered (``released``: the ids the server gave back for it), or is void
        (None: its Session is gone, and the server released its jobs with it). Its jobs are no
        longer this launcher's: those not released had left the Session or were no longer runnable,
        as with any answered release, and one that a later acquire leases is started as usual. Those
        an acquire leased again meanwhile (:attr:`_parked`, under the Session in force) are given
        back in a new release (returned, due now): the answer may be the replay of a try applied
        before that acquire (they are still held here) or a try applied now (then they are not);
        either way none of them was started here, and a release frees only what the Session holds.

        The caller sends that release in the same step, before any acquire (as :meth:`_send_release`
        goes before acquires): where the answer was a try applied now (a key expired on the server)
        the jobs are free already, and an acquire sent first leased them again, parked them again,
        and the new release freed them again, for ever (one acquire and one release a retry_sec,
        the jobs never started anywhere). Sent first, it finds them free or frees them; its own
        answer then has nothing parked (no acquire came between), so nothing follows it, and an
        acquire that leases them later starts them (no unsettled release names them). Only a lost
        answer of it leaves it unsettled, resent as any other."""
        self._unsettled.remove(entry)
        ids = set(entry.ids)
        self.release_unknown = [i for i in self.release_unknown if i not in ids]
        self._release_unknown_ids -= ids
        with self._lock:  # its too-late jobs were kept for the lease's close: no longer held
            self.too_late = [p for p in self.too_late if p.id not in ids]
            for i in ids:
                self._too_late_generations.pop(i, None)
        session_id = getattr(self.lease, "session_id", None)
        parked = {i: self._parked.pop(i) for i in entry.ids if i in self._parked}
        # Leased again by a Session since lost, or by the gone one (the lease may not know yet): freed with it.
        gone = entry.session_id if released is None else None
        again = sorted(i for i, leased_by in parked.items()
                       if leased_by == session_id and session_id is not None and leased_by != gone)
        if released is None:
            logger.info("the release of %d leased jobs whose answer was lost went to session %s, which is gone: the "
                        "server released its jobs with it", len(entry.ids), entry.session_id)
        else:
            self.released += len(released)
            logger.info("the release of %d leased jobs whose answer was lost is answered after %d resends: %d released, "
                        "the others had left this session: %s", len(entry.ids), entry.tries + 1, len(released),
                        entry.ids[:20])
        if not again:
            return []
        fresh = _Unsettled(new_idempotency_key(), session_id, again, due=time.monotonic(), wait=RELEASE_RESEND_FIRST_SEC)
        self._unsettled.append(fresh)
        self.release_unknown.extend(again)
        self._release_unknown_ids.update(again)
        logger.info("%d of them were leased again meanwhile (not started): given back in a new release: %s",
                    len(again), again[:20])
        return [fresh]

    def _refused(self, batch: list[tuple[PreparedJob, int, bool]], exc: BaseException, no_route: bool,
                 gave_up: bool = False) -> None:
        """The server answered the release with a refusal (nothing of that answer was applied), or
        ``gave_up``: it failed MAX_RELEASE_TRIES times or for RELEASE_GIVE_UP_SEC (5xx, 429, no answer).

        ``no_route``: a server without the route (an older one: 405, or a 404 that names no
        Session): nothing is given back again, and the prefetcher is no longer lean (its jobs
        stay, and a lean one left slots idle for good). Else (the Session is gone, 404; or bad
        input): the next stall gives back again. The jobs held for a slot go back to the loop as
        they were, with their acquire numbers (those of a lost Session are then dropped by
        :meth:`take` once the lease has replaced it, as every job leased ahead under it), unless an
        earlier try of this request went unanswered: it may have been applied, and another launcher
        may run them now; such jobs are never started here. Those too late stay leased until the
        lease's close, as before the release route (after a give-up: until giving back resumes, which
        queues them again). Given up: as with ``no_route``, nothing is given back (acquires go on),
        but only until this release has settled and the back-off has passed
        (:meth:`_resume_release`), and the jobs of a try that may have been applied are not
        started here: the request is resent later (:meth:`_resend_unsettled`) until answered, as
        after a refusal that a later answer may differ from (408, 409, 425; a 429 never gets here
        but by giving up: it counts as no answer); every other refusal below 500 but a 404 naming
        the Session (it would be refused for ever, as 422) leaves them leased, not started here,
        until the Session's deletion; resends stop the same way (:meth:`_resend_unsettled`). A
        refusal that says the Session is gone (404): the server released its jobs with it, and no try can apply any more."""
        maybe_applied = self._release_unanswered and not no_route
        gone = maybe_applied and _session_gone(exc)
        status = getattr(exc, "status_code", None)
        resend = maybe_applied and not gone and (gave_up or status in _RESEND_AGAIN)
        if no_route:
            self.release_refused = True
        if gave_up:
            with self._lock:  # one step with take's read of may_release (_hold_back_too_late)
                self.release_given_up = True
            self.release_give_ups += 1
            self._given_up_at = time.monotonic()
            self._resume_at = self._given_up_at + self._resume_wait
            self._resume_wait = min(RELEASE_RESUME_MAX_SEC, self._resume_wait * 2)
        if no_route or gave_up:
            self.lean = False
        tries = f" after {self._release_tries} tries in {time.monotonic() - self._release_first_try:.0f} s" if gave_up else ""
        stalled = [(p, g) for p, g, late in batch if not late]
        late = [(p, g) for p, g, is_late in batch if is_late]
        with self._lock:
            self._releasing = self._releasing[len(batch):]
            never_sent: list[tuple[PreparedJob, int]] = []
            if gave_up:  # nothing is given back for a while: those never sent are kept as if refused at once
                never_sent = [(p, g) for p, g, is_late in self._releasing if not is_late]
                late += [(p, g) for p, g, is_late in self._releasing if is_late]
                self._releasing = []
            if maybe_applied:
                if not gone:  # a gone Session's jobs are not ours: neither started nor held
                    self.release_unknown.extend(p.id for p, _g in stalled)
                    self._release_unknown_ids.update(p.id for p, _g in stalled)
                stalled = never_sent
            else:
                stalled += never_sent
            for prepared, generation in reversed(stalled):
                self._ready.appendleft(prepared)
                self._ready_generations.appendleft(generation)
            self._set_too_late(late)
        if resend and self._release_key is not None:  # the same key and ids: an applied try is replayed, never applied twice
            self._unsettled.append(_Unsettled(
                self._release_key, self._release_session, sorted({p.id for p, _g, _l in batch}),
                due=time.monotonic() + RELEASE_RESEND_FIRST_SEC, wait=RELEASE_RESEND_FIRST_SEC))
        self._forget_release()
        if gone:
            what = "the session is gone: the server released them with it"
        elif resend:
            what = (f"not started here until the request is answered (an earlier try may have given them back): "
                    f"resent in {RELEASE_RESEND_FIRST_SEC:.0f} s, then less often")
        elif maybe_applied:
            what = "never started here (an earlier try may have given them back; the session's deletion returns them otherwise)"
        else:
            what = "they stay with this launcher"
        if no_route:
            what += ", which gives back none from now on"
        elif gave_up:
            what += (f"; nothing is given back until that release is settled (answered), "
                     f"{self._resume_at - self._given_up_at:.0f} s from now at the earliest")
        logger.warning("could not give %d leased jobs back%s (%s): %s", len(batch), tries, exc, what)
        if stalled:
            self._on_ready()

    def _resume_release(self) -> None:
        """Give back again after a give-up (never after a server without the route): once no release
        is unsettled (the given-up one answered, its Session gone, or refused for good:
        :meth:`_resend_unsettled`) and RELEASE_RESUME_SEC (doubled at each give-up in a row) have
        passed since the give-up. Before, one give-up stopped giving back for the rest of the run: a
        launcher whose server was out of reach for a minute held its lookahead, hidden from the
        elastic queue and other BatchJobs, at every stall for hours. Not on any answer (an acquire):
        a release route failing for good while acquires were answered then gave up each resumed
        release in turn, each batch of stalled jobs stranded (leased by this Session, never started
        here, never freed) until the Session's end; now at most the one given-up release's are.

        Exactly-once holds as before the give-up: the next release is a new request (a new key,
        :meth:`_send_release`), sent before any acquire; it names only jobs the loop gave back and
        too-late ones never started here, and the jobs of an unsettled release
        (:attr:`release_unknown`) never reach the loop (an acquire that leases one parks it).

        The jobs set aside as too late while it was off (:attr:`too_late`: by :meth:`take`, and those
        of a release refused for good) are queued first: before, they stayed leased, hidden from the
        elastic queue and from launchers with time left, until the Session's end. None of them is
        named by an unsettled release (there is none here; an answered one dropped its own,
        :meth:`_settle`), a lost Session's are not sent (:meth:`_send_release`, by their acquire
        numbers), and those this Session leased again meanwhile are no longer there (their old copies
        dropped by :meth:`_drop_leased_again` and :meth:`take`: the id's release would free the new copy)."""
        if self.release_refused or self._unsettled or time.monotonic() < self._resume_at:
            return
        with self._lock:
            back, self.too_late = self.too_late, []
            # One copy per id (_set_too_late, _drop_leased_again): each goes with its own acquire number.
            self._releasing.extend((p, self._too_late_generations.pop(p.id, 0), True) for p in back)
            # In the block that empties too_late: take (_hold_back_too_late) reads may_release and
            # stores under _lock, so a job it holds back lands either in too_late before this block
            # (queued here) or in _releasing after it, never in too_late once giving back is on.
            self.release_given_up = False
        logger.info("the release given up is settled: giving back leased jobs resumes (%d give-ups so far; the next "
                    "one waits %.0f s)%s", self.release_give_ups, self._resume_wait,
                    f"; {len(back)} jobs set aside as too long for the time left meanwhile go first" if back else "")

    def _target(self) -> int:
        """The jobs to keep leased ahead now (held and ready): the lookahead and, while the loop
        holds none unstarted (it placed all it took: the partition has room), the room it reported,
        at most ``depth``. Without ``floor``: :attr:`depth_now` as :meth:`_measure_rate` set it."""
        if self.floor >= self.depth:
            return self.depth_now
        if self.lean:
            # Held jobs that do not fit now (a whole-node job beside a running one) take no slot:
            # the room beside them is leased (at most the floor of them counted, so that a queue of
            # such jobs is not leased whole), and a slot that frees is not left idle behind them.
            chunk = min(self.depth, min(self._held, self.floor) + self._room)
        else:
            chunk = min(self.depth, self._room) if self._held == 0 else 0  # two int stores: may lag, never torn
        self.depth_now = max(self._ahead, chunk)
        self.depth_peak = max(self.depth_peak, self.depth_now)
        return self.depth_now

    def _measure_rate(self) -> None:
        """Update :attr:`rate` (the jobs the loop started, taken and no longer held, per second; the
        mean of the last window and the estimate before it), the lookahead and :attr:`depth_now`."""
        if not self.lookahead_sec:
            return
        now = time.monotonic()
        elapsed = now - self._rate_since
        if elapsed < RATE_WINDOW_SEC:
            return
        # Jobs started (taken and no longer held) less those still running: the jobs that ended,
        # each a slot the loop fills again; with long jobs a partition's first fill starts
        # thousands a second and ends none, and counted as starts it leased a quarter second of
        # that ahead: hundreds of jobs held for hours. Int stores of the loop thread: may lag.
        used = self._taken - self._held - self._running - self._given_back
        window = max(0.0, (used - self._rate_used) / elapsed)
        self._rate_since, self._rate_used = now, used
        self.rate = window if self.rate is None else (self.rate + window) / 2
        if self.lean and self.release_after_sec is not None and now - self._lean_since >= self.release_after_sec:
            # Counted over the whole bound, not from the rate: two long jobs ending together make
            # one window's rate high, and the floor leased again was held for another run.
            if used - self._lean_used >= self.floor:
                self.lean = False  # the floor's jobs would have started within the bound
            else:
                self._lean_since, self._lean_used = now, used
        self._ahead = 0 if self.lean else max(self.floor, min(self.max_depth, int(self.rate * self.lookahead_sec)))
        self.depth_now = self._ahead
        self.depth_peak = max(self.depth_peak, self.depth_now)

    def _prepare_one(self, job: Any) -> Optional[PreparedJob]:
        faults = self.site_faults
        if faults.tripped:  # the rest of an acquire after the file system failed: not even tried
            faults.given_back.append(int(job.id))
            return None
        try:
            prepared = self._prepare(job)
            faults.ok()
            self._check(prepared.demand)
            return prepared
        except WorkdirUnavailable as exc:  # the site's fault: left leased, the Session's release gives it back
            faults.fault(job.id, exc)
        except (JobBuildError, UnsatisfiableJob) as exc:
            logger.error("job %s FAILED: %s", job.id, exc)
            report_failed(self._updater, job.id, str(exc))
        except Exception as exc:  # keep the thread alive whatever one job holds
            logger.exception("job %s FAILED while preparing", job.id)
            report_failed(self._updater, job.id, f"An exception occurred while preparing the job: {type(exc).__name__}: {exc}")
        return None
