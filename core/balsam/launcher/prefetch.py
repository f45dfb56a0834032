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
  1,000 a second leased 64 at a time spent a tenth of the server's CPU on acquires; a quarter
  second of work ahead makes them a few hundred each. Without ``floor`` (the default) the floor is
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

from ._api import UnknownBatchJob
from .app_run import JobBuildError, PreparedJob, SiteFaults, WorkdirUnavailable
from .gone import acquire_generation
from .node_manager import Demand, UnsatisfiableJob
from .placement import log_too_late, split_too_late
from .runner import report_failed
from .wake import WakeEvent

logger = logging.getLogger(__name__)

#: The rate the loop uses jobs at is measured over windows of at least this long.
RATE_WINDOW_SEC = 0.2


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
        #: Why the Session could not be created (the launcher cannot run without one).
        self.error: Optional[BaseException] = None
        #: The last acquire returned nothing: the server has no runnable job for us right now.
        self.exhausted = False
        #: The last acquire failed with this message (it is retried every ``retry_sec``).
        self.acquire_error: Optional[str] = None
        self.acquired = 0
        #: Jobs :meth:`take` held back: their ``wall_time_min`` exceeded the time left (never started).
        self.too_late: list[PreparedJob] = []
        #: Jobs given back unstarted because the site's file system failed their workdirs; once
        #: tripped, no more acquires (:attr:`exhausted` stays set: the launcher ends when idle).
        self.site_faults = SiteFaults()
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
        may_start = self._hold_back_too_late(jobs)
        self._held -= len(jobs) - len(may_start)  # those held back never start: neither held nor used
        self._taken += len(may_start)
        return may_start

    def _hold_back_too_late(self, jobs: list[PreparedJob]) -> list[PreparedJob]:
        """Jobs that can no longer finish before the wall time are not handed to the loop
        (:func:`~balsam.launcher.placement.split_too_late`, the rule every mode applies, against the
        same ``remaining_min`` the acquire passes as ``max_wall_time_min``): the acquire asked only
        for jobs that fit the time left then, but these were leased ahead and would start later, to
        be ended at the wall time (RUN_TIMEOUT) after running for nothing. They stay leased (the API
        gives back a Session's jobs only with the Session) and go back unstarted when the lease is
        closed, to a launcher with time left, as every leased job that never started; they are
        neither work for the idle timeout nor held jobs that take the next acquire's room. Jobs with
        no wall time (0, the default) are never held back, and without any the time left is not
        read. The serial master checks again the jobs that wait for a slot (Master.step)."""
        split = split_too_late(jobs, self._remaining_min)
        if split.too_late:
            self.too_late.extend(split.too_late)
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
            self.lease = self._open_lease()
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
            if self.site_faults.tripped:
                self.exhausted = True
                self._stopping.wait(self.retry_sec)
                continue
            self._measure_rate()
            target = self._target()
            unstarted = len(self._ready) + self._held  # in this order: see take
            if unstarted > target // 2:
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

    def _target(self) -> int:
        """The jobs to keep leased ahead now (held and ready): the lookahead and, while the loop
        holds none unstarted (it placed all it took: the partition has room), the room it reported,
        at most ``depth``. Without ``floor``: :attr:`depth_now` as :meth:`_measure_rate` set it."""
        if self.floor >= self.depth:
            return self.depth_now
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
        used = self._taken - self._held - self._running
        window = max(0.0, (used - self._rate_used) / elapsed)
        self._rate_since, self._rate_used = now, used
        self.rate = window if self.rate is None else (self.rate + window) / 2
        self._ahead = max(self.floor, min(self.max_depth, int(self.rate * self.lookahead_sec)))
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
