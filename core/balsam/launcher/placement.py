"""The placement loop shared by the job modes: put pending jobs on free resources, start them.

Both built-in modes keep a deque of prepared jobs that are leased but not started. When resources
were freed or jobs arrived, :func:`place_pending` walks the deque once: each job is given a
:class:`~balsam.launcher.node_manager.Placement` by the NodeManager and handed to the mode's
``start`` callback (which spawns it locally, or sends it to another node's worker); a job that does
not fit goes back to the end of the deque. A demand that did not fit is not tried again in the same
pass (resources only grow when jobs end), and the pass can stop after ``max_misses`` jobs in a row
did not fit: the serial mode keeps thousands of identical tasks pending, and once a node is full
walking the rest of the deque only costs time.

Jobs leased ahead that can no longer finish before the wall time (:func:`split_too_late`): the
acquire asks only for jobs that fit the time left then, but a job leased ahead starts later, and
one started with less time left than its ``wall_time_min`` would only be ended at the wall time
(RUN_TIMEOUT) after running for nothing. Every job mode applies this one rule before it starts
jobs: mpi mode before placing or queueing pending jobs, serial mode where the prefetcher hands jobs
to the master and again before the master places or queues them (a job taken in time may wait for
a slot until the time runs short).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

from .app_run import PreparedJob
from .node_manager import InsufficientResources, NodeManager, Placement

logger = logging.getLogger(__name__)

#: ``start(prepared, placement)``: launch the job (raise to fail it; the placement is then freed).
StartFn = Callable[[PreparedJob, Placement], None]
#: ``fail(job_id, reason)``: report the job FAILED.
FailFn = Callable[[int, str], None]


def place_pending(
    pending: "deque[PreparedJob]",
    node_manager: NodeManager,
    start: StartFn,
    fail: FailFn,
    *,
    max_misses: Optional[int] = None,
    room: Optional[int] = None,
) -> int:
    """Start as many of ``pending`` as fit (at most ``room``); returns how many started.

    ``max_misses``: stop after this many jobs in a row did not fit (None: one full pass).
    """
    started = 0
    misses = 0
    full_for: set[Any] = set()  # demands that did not fit in this pass: they will not fit again in it
    for _ in range(len(pending)):
        if room is not None and started >= room:
            break
        if max_misses is not None and misses >= max_misses:
            break
        prepared = pending.popleft()
        if prepared.demand in full_for:
            pending.append(prepared)
            misses += 1
            continue
        try:
            placement = node_manager.assign(prepared.id, prepared.demand)
        except InsufficientResources:
            pending.append(prepared)
            full_for.add(prepared.demand)
            misses += 1
            continue
        misses = 0
        try:
            start(prepared, placement)
        except Exception as exc:
            node_manager.free(prepared.id)
            reason = f"An exception occurred while preparing the launch: {type(exc).__name__}: {exc}"
            logger.error("job %s FAILED: %s", prepared.id, reason)
            fail(prepared.id, reason)
            continue
        started += 1
    return started


# -- jobs that can no longer finish before the wall time ----------------------------------------
def wall_time_min(prepared: PreparedJob) -> int:
    """The ``wall_time_min`` a job asks for (0, the default: none; such a job is never too late)."""
    return getattr(prepared.job, "wall_time_min", 0) or 0


def max_wall_time_min(*groups: Iterable[PreparedJob]) -> int:
    """The largest ``wall_time_min`` among the jobs of ``groups`` (0: none asks for a wall time)."""
    return max((wall_time_min(p) for group in groups for p in group), default=0)


class WallTimeSplit(NamedTuple):
    """What :func:`split_too_late` found: the jobs that may still start (in their order), those that
    can no longer finish before the wall time, and the minutes left it compared them with (None:
    no job asked for a wall time, the time left was not read)."""

    may_start: list[PreparedJob]
    too_late: list[PreparedJob]
    minutes_left: Optional[int] = None


def split_too_late(jobs: Sequence[PreparedJob], minutes_left: Union[int, Callable[[], int]]) -> WallTimeSplit:
    """Split ``jobs`` (not started yet) into those that may still start and those too late: a job is
    too late when its ``wall_time_min`` exceeds ``minutes_left``. Pure: ``jobs`` is not changed.

    ``minutes_left`` (or a function returning it, called at most once, and only when one of
    ``jobs`` asks for a wall time: with none, the usual case, this is one pass over the jobs and
    no clock is read) must be the value the mode passes as the acquire's ``max_wall_time_min``:
    :meth:`Countdown.remaining_min <balsam.launcher.job_mode.Countdown.remaining_min>`, the whole
    minutes left (rounded down, at least 0). Why that rounding: the server leases only jobs with
    ``wall_time_min <= max_wall_time_min``, so a job is held back here exactly when an acquire made
    now would have refused it, in every mode alike; and since ``wall_time_min`` is a whole number,
    ``wall_time_min <= floor(seconds_left / 60)`` is the same as ``wall_time_min * 60 <= seconds_left``:
    no job is held back that fits the time left, none started that does not.
    """
    if not any(map(wall_time_min, jobs)):
        return WallTimeSplit(list(jobs), [])
    left = minutes_left() if callable(minutes_left) else minutes_left
    may_start: list[PreparedJob] = []
    too_late: list[PreparedJob] = []
    for prepared in jobs:
        (too_late if wall_time_min(prepared) > left else may_start).append(prepared)
    return WallTimeSplit(may_start, too_late, left)


def log_too_late(split: WallTimeSplit, released_by: str) -> None:
    """One log line per job :func:`split_too_late` held back (``released_by``: what gives it back)."""
    for prepared in split.too_late:
        logger.info("job %s is not started: it asks for %d min and %s whole minutes are left before the wall time; "
                    "it stays leased, unstarted, until %s returns it", prepared.id, wall_time_min(prepared),
                    split.minutes_left, released_by)


class TooLateJobs:
    """A launcher loop's leased jobs set aside because they can no longer finish before the wall
    time (:func:`split_too_late`), never started, and the bound that keeps checking them cheap.
    One per loop (mpi mode's, the serial master's).

    They stay leased until the loop ends: the API gives back a Session's jobs only with the Session,
    whose deletion returns them unstarted (to a launcher with time left), as every leased job that
    never started. The loop counts them neither as work (its idle timeout ends a launcher that holds
    only these) nor as room taken for the next acquire, nor lists them in its heartbeats (a user's
    move of one of them needs no answer). A job queued behind a running one starts within about
    ``HANDOVER_MAX_AGE_SEC`` of a check, or comes back to ``pending`` and is checked again."""

    def __init__(self, released_by: str) -> None:
        #: what gives these jobs back (for the log line)
        self.released_by = released_by
        #: job id -> the job set aside
        self.jobs: dict[int, PreparedJob] = {}
        #: An upper bound of the ``wall_time_min`` of the leased jobs not started yet; 0: none asks
        #: for a wall time, and :meth:`set_aside` reads no clock.
        self.bound = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Any:
        return iter(self.jobs)

    def note_leased(self, jobs: Iterable[PreparedJob]) -> None:
        """Jobs the loop has just taken (also those that will wait for a stale copy to end)."""
        self.bound = max(self.bound, max_wall_time_min(jobs))

    def set_aside(self, pending: "deque[PreparedJob]", minutes_left: Callable[[], int], *waiting: Iterable[PreparedJob],
                  forget: Callable[[int], Any]) -> int:
        """Take out of ``pending`` (in place) the jobs too late to start, before anything starts
        jobs from it. ``minutes_left``: the mode's ``Countdown.remaining_min``, read only while
        some job waiting asks for more than the bound allows (the usual case: one comparison);
        ``waiting``: the other leased jobs not started (queued behind running ones, held by the
        gone-jobs handling), which bound the next check; ``forget``: drops a job set aside from the
        gone-jobs bookkeeping. Returns how many were set aside."""
        if not self.bound:
            return 0
        left = minutes_left()
        if self.bound <= left:
            return 0
        split = split_too_late(pending, left)
        if split.too_late:
            log_too_late(split, self.released_by)
            for prepared in split.too_late:
                self.jobs[prepared.id] = prepared
                forget(prepared.id)
            pending.clear()
            pending.extend(split.may_start)
        self.bound = max_wall_time_min(pending, *waiting)
        return len(split.too_late)
