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
    drain_for: Optional[int] = None,
    unfit: Optional[Callable[[PreparedJob], None]] = None,
    queued: Iterable[PreparedJob] = (),
) -> int:
    """Start as many of ``pending`` as fit (at most ``room``); returns how many started.

    ``max_misses``: stop after this many jobs in a row did not fit (None: one full pass).
    ``drain_for``: the id of a pending job the nodes drain for (:class:`DrainForLarge`): it is tried
    first, and while it does not fit, the nodes it is to get (``NodeManager.nodes_to_drain``: the
    least occupied that could hold it) take no other job, and the others go on filling the rest of
    the partition; once it starts, the others fill what is left.
    ``unfit``: called at the end of the pass with each job that did not fit while a smaller job (of
    fewer occupied nodes, ``Demand.occupied_nodes``) was pending in it: that one, or the next like it, takes what frees up
    first. A job that waits only for a slot like the others is not reported: it starts in its turn.
    ``queued``: jobs waiting elsewhere for the nodes (mpi mode: behind running jobs, in the spawner),
    counted with the pending ones for ``unfit``.
    """
    started = 0
    held: "frozenset[int]" = frozenset()  # nodes kept for the drain target: no other job goes there
    if drain_for is not None and (room is None or room > 0):
        index = next((i for i, p in enumerate(pending) if p.id == drain_for), None)
        if index is not None:
            target = pending[index]
            try:
                placement = node_manager.assign(target.id, target.demand)
            except InsufficientResources:
                # The nodes it will get stay as they empty; the rest of the partition keeps working
                # (stopping every start idled all nodes until one of them was empty).
                held = node_manager.nodes_to_drain(target.demand)
            else:
                del pending[index]
                started += _start_one(target, placement, node_manager, start, fail)
    misses = 0
    full_for: set[Any] = set()  # demands that did not fit in this pass: they will not fit again in it
    skipped: list[PreparedJob] = []  # did not fit (for ``unfit``)
    # the smallest footprint waiting (for ``unfit``)
    smallest = min((p.occupied_nodes for p in queued), default=float("inf")) if unfit is not None else float("inf")
    for _ in range(len(pending)):
        if room is not None and started >= room:
            break
        if max_misses is not None and misses >= max_misses:
            break
        prepared = pending.popleft()
        if unfit is not None and prepared.occupied_nodes < smallest:
            smallest = prepared.occupied_nodes
        if prepared.demand in full_for:
            pending.append(prepared)
            misses += 1
            if unfit is not None:
                skipped.append(prepared)
            continue
        if prepared.id == drain_for:  # still waiting for its nodes
            pending.append(prepared)
            continue
        try:
            placement = (node_manager.assign(prepared.id, prepared.demand, exclude=held) if held
                         else node_manager.assign(prepared.id, prepared.demand))
        except InsufficientResources:
            pending.append(prepared)
            full_for.add(prepared.demand)
            misses += 1
            if unfit is not None:
                skipped.append(prepared)
            continue
        misses = 0
        started += _start_one(prepared, placement, node_manager, start, fail)
    if unfit is not None:
        for waiting in skipped:
            if waiting.occupied_nodes > smallest + 1e-9:  # smaller jobs would take its nodes as they free up
                unfit(waiting)
    return started


def _start_one(prepared: PreparedJob, placement: Placement, node_manager: NodeManager, start: StartFn, fail: FailFn) -> int:
    """``start`` a placed job: 1, or 0 when it raised (the job is FAILED, its placement freed)."""
    try:
        start(prepared, placement)
    except Exception as exc:
        node_manager.free(prepared.id)
        reason = f"An exception occurred while preparing the launch: {type(exc).__name__}: {exc}"
        logger.error("job %s FAILED: %s", prepared.id, reason)
        fail(prepared.id, reason)
        return 0
    return 1


# -- jobs larger than the idle nodes (mpi mode) ----------------------------------------------------
def acquire_size_limits(empty: int, in_service: int, waiting_nodes: Iterable[int], room_nodes: float) -> tuple[int, float]:
    """``(max_nodes_per_job, max_aggregate_nodes)`` of an mpi-mode acquire. Pure.

    ``empty``: the idle nodes now; ``in_service``: the nodes the partition has (not taken out);
    ``waiting_nodes``: ``num_nodes`` of each job leased and not started; ``room_nodes``: the
    footprint the acquire may lease (free nodes plus the lookahead, less what waits).

    Normally only jobs that fit the idle nodes: a job larger than them would wait, and while short
    jobs keep ending and being replaced, several nodes are rarely idle together, so a multi-node job
    was leased only once no smaller job was left. So while no job larger than the idle nodes waits
    leased, the acquire may lease jobs up to the whole partition, and offers room for at least one
    such job (``max_aggregate_nodes`` of at least ``in_service``): the head of the line, for which
    :class:`DrainForLarge` then drains nodes (the price: with no such job in the backlog, small
    jobs fill that room, up to a partition's worth beyond the lookahead). Once one waits, the cap is
    the idle nodes again, so a launcher holds few jobs it cannot start (several launchers may share
    the site's backlog).
    """
    cap = max(1, empty)
    if in_service <= cap or any(n > cap for n in waiting_nodes):
        return cap, room_nodes
    return in_service, max(room_nodes, float(in_service))


class DrainForLarge:
    """Which leased job the partition stops starting other jobs for, so that nodes drain to it
    (mpi mode; pure accounting on the loop thread, with the times passed in).

    A job that does not fit the free nodes while smaller jobs are pending (mostly a multi-node job
    while smaller ones keep the nodes busy) is noted by the placement pass that finds it so
    (:meth:`note_unfit`; ``place_pending(unfit=...)``). Placing greedily,
    as soon as one job ends another takes its node, and several nodes are never free together:
    the large job would wait until no smaller job is left. So once the oldest of them has waited
    ``after_sec`` (the ``mpi_drain_for_large_jobs_sec`` setting), :meth:`choose` names it, and the
    placement keeps the nodes it is to get free of new jobs until it fits there, the other nodes
    still taking smaller ones (``place_pending(drain_for=...)``). Before that,
    smaller jobs fill the free nodes as before (backfill). ``after_sec`` None or negative: never
    drain (the old greedy placement); 0: drain at once. A job that could not start even on the
    empty nodes in service (nodes were taken out: too many nodes, or GPUs per node that only a node
    taken out had) is never drained for: it could not start anyway, and the nodes held for it stayed
    idle to the wall time while the jobs behind it waited. ``choose(cannot_fit=...)`` says which
    (``NodeManager.check_satisfiable(in_service=True)``'s reason); each such job is logged once with
    it, and stays leased, unstarted, until the Session returns it to another launcher.
    """

    def __init__(self, after_sec: Optional[float]) -> None:
        self.after_sec = None if after_sec is None or after_sec < 0 else float(after_sec)
        #: job id -> when it was first found not to fit (insertion order: oldest first)
        self.unfit_since: dict[int, float] = {}
        #: the job the nodes drain for now (None: jobs start greedily)
        self.target: Optional[int] = None
        #: job id -> why it cannot start on the nodes in service (logged once; never drained for)
        self.cannot_fit: dict[int, str] = {}

    @property
    def enabled(self) -> bool:
        return self.after_sec is not None

    def note_unfit(self, prepared: PreparedJob, now: float) -> None:
        if self.after_sec is not None and prepared.id not in self.unfit_since:
            self.unfit_since[prepared.id] = now

    def choose(self, pending: Iterable[PreparedJob], now: float, in_service: int,
               cannot_fit: Optional[Callable[[Any], Optional[str]]] = None) -> Optional[int]:
        """The job to drain for now (None: start greedily); logs once when a drain begins.

        ``cannot_fit(demand)``: why a job could not start even on the empty nodes in service (None:
        it could); such a job is skipped, and logged once with the reason."""
        if not self.unfit_since:
            self.target = None
            return None
        waiting = {p.id: p for p in pending}
        for job_id in [j for j in self.unfit_since if j not in waiting]:  # started, failed, set aside, gone
            del self.unfit_since[job_id]
            self.cannot_fit.pop(job_id, None)
        target = None
        for job_id, since in self.unfit_since.items():
            if job_id in self.cannot_fit:
                continue
            demand = waiting[job_id].demand
            reason = (f"job asks for {demand.num_nodes} nodes; this launcher has {in_service} in service"
                      if demand.num_nodes > in_service else cannot_fit(demand) if cannot_fit is not None else None)
            if reason is not None:
                self.cannot_fit[job_id] = reason
                logger.warning("job %s cannot start on the nodes still in service, so no nodes are drained for it: %s; "
                               "it stays leased, unstarted, until the launcher's Session returns it", job_id, reason)
                continue
            if now - since >= self.after_sec:  # type: ignore[operator]
                target = job_id
            break  # only the oldest that could ever start: a younger one has waited less
        if target is not None and target != self.target:
            logger.info("draining nodes for job %s (%d nodes; it has waited %.1f s without fitting): the nodes it "
                        "will get take no other job until it starts", target, waiting[target].demand.num_nodes, now - self.unfit_since[target])
        self.target = target
        return target

    def started(self, job_id: int, now: float) -> None:
        """``job_id`` started: the drain for it, if any, is over."""
        since = self.unfit_since.pop(job_id, None)
        if job_id == self.target:
            self.target = None
            logger.info("job %s started on the drained nodes after waiting %.1f s", job_id,
                        now - since if since is not None else 0.0)


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

    The serial master gives them back at once (``POST /sessions/{id}/release``: its prefetcher's
    "Giving back", which takes them out of :attr:`jobs`), so that the elastic queue sees them and a
    launcher with time left leases them. Otherwise (mpi mode, or a server without that route) they
    stay leased until the loop ends, and the Session's deletion returns them unstarted (to a
    launcher with time left), as every leased job that never started. The loop counts them neither
    as work (its idle timeout ends a launcher that holds only these) nor as room taken for the next
    acquire, nor lists them in its heartbeats (a user's move of one of them needs no answer). A job
    queued behind a running one starts within about
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
