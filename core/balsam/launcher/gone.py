"""Jobs a launcher's Session no longer holds: deleted or moved by their user while leased.

A user may delete a job a launcher runs (libEnsemble's ``BalsamTask.kill()`` calls ``job.delete()``)
or move it (re-queue, fail it), which ends the lease. The launcher used to find out only when its
final update was refused, after the run had held its nodes, CPUs and GPUs to its end. Now every
heartbeat of the lease carries the ids the mode runs or holds ready, and the server answers those
the Session no longer holds (:meth:`balsam.client.lease.JobLease.watch`, one request per
heartbeat). :class:`GoneJobs` passes the answer to the mode's loop, which:

- ends a running job's process group the way a stop does (SIGTERM, SIGKILL to the group after the
  grace), without waiting for it (the pool's ``end``); on a worker rank of serial mode, the master
  tells that rank to (``{"end": [...]}``);
- takes the exit as any other (the resources are freed or handed over) but reports nothing for it:
  the server would refuse the update, the job being gone or someone else's now; one log line per
  job says what happened;
- drops a job leased ahead that has not started; a job queued behind another (hand-over) is
  cancelled, and if it started meanwhile it is ended at once without its RUNNING.

Copies of one job (``nothing lost, nothing twice``): a job the Session lost may be leased again by
this same launcher (its user re-queued it while it waited here, or the Session expired and the lease
replaced it), so a job id can arrive while an older copy of it is still held. The older copy is
stale (the server's job is the new lease's now): :meth:`GoneJobs.arrive` drops it if it only waits
in ``pending``, or ends it as gone if it runs (here or on another rank) or is queued behind another
job, and holds the new copy back until that exit is settled and its resources are freed (the
NodeManager places by job id: the two copies cannot be placed at once); then the mode queues it
(:meth:`GoneJobs.release_ready`). And a heartbeat answer is only applied to copies it can speak
of: each copy keeps the number of the acquire that brought it (the lease's ``generation``), each
answer the number the lease noted before its request, and an answer older than the copy is ignored
for it (the next heartbeat asks again). Without that, an answer computed just before a re-acquire
dropped or ended the new copy, which then stayed leased and never ran.

Thread contract: :meth:`GoneJobs.held_ids` and the lease's ``on_gone`` callback run on the lease's
heartbeat thread; they only copy the loop's containers (``held``: built by the mode from ``list()``
copies, each one C call; :attr:`GoneJobs.successors` and :attr:`GoneJobs.ready` the same way) and
append to a deque, then set ``wake``. Every other method belongs to
the mode's loop thread, which alone owns the pool, the pending deque, the hand-over,
:attr:`GoneJobs.ending`, :attr:`GoneJobs.copies`, :attr:`GoneJobs.successors` and
:attr:`GoneJobs.ready`.

The status updater tells as well (:meth:`GoneJobs.deleted`, its ``on_gone``): a 404 naming a job
of its PATCH means the job was deleted. The heartbeat comes once a period (60 s by default), so a
job deleted while leased and waiting here (``Job.objects.filter(...).delete()`` at a search's early
stop deletes those and skips the RUNNING ones) was started, its RUNNING refused, and run to its end
for nothing. Now the refused RUNNING ends it (a fraction of a second into its run), as a heartbeat's
answer would; the jobs of one refused call arrive together. Such an answer is of the job as it is on
the server, whatever copy is held: it carries no acquire number.

A lease that lost its Session and opened a new one asks the new one too: the old Session's jobs
were given back by the server (RUNNING ones are RUN_TIMEOUT, to run again), so they are ended the
same way rather than run twice. Copies of the lost Session that were not held yet when it was
found gone (acquired, still on their way to the loop: the lease's ``lost_generation``) are dropped
as they arrive (:meth:`GoneJobs.arrive`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Collection, Container, Iterable, Optional

from .app_run import PreparedJob

logger = logging.getLogger(__name__)


class Acquired(list):
    """The prepared jobs of one acquire, with the lease's number of that acquire
    (:attr:`balsam.client.lease.JobLease.generation`; 0 for a job source that does not number them)."""

    def __init__(self, jobs: Iterable[Any] = (), generation: int = 0) -> None:
        super().__init__(jobs)
        self.generation = generation


def lease_is_fresh(lease: Any, wake: Optional[threading.Event] = None) -> bool:
    """Whether the mode may start leased jobs now: ``lease.check_fresh(wake)``
    (:meth:`balsam.client.lease.JobLease.check_fresh`: the Session is known alive, else a heartbeat
    is asked for, which sets ``wake`` when answered); True for a job source without it."""
    check = getattr(lease, "check_fresh", None)
    return True if check is None else bool(check(wake))


def acquire_generation(source: Any) -> int:
    """The number of the acquire ``source`` answered last (0 if it does not number them); read on
    the acquiring thread right after the acquire."""
    return int(getattr(source, "generation", 0) or 0)


class GoneJobs:
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        #: The ids the mode runs or holds ready (set by the mode; called on the heartbeat thread).
        self.held: Callable[[], Iterable[int]] = list
        #: Jobs whose run is being ended (or whose queued start was cancelled): their exit is not reported.
        self.ending: set[int] = set()
        #: Job id -> the acquire number of the copy the loop holds, from :meth:`arrive` until its
        #: exit, drop or failure (an entry left behind only costs a look when that id arrives again).
        #: Answers older than the copy are not applied to it.
        self.copies: dict[int, int] = {}
        #: Job id -> its new copy, waiting for the exit of the stale copy being ended.
        self.successors: dict[int, PreparedJob] = {}
        #: Job id -> its new copy, whose stale copy has exited: queued once the id is no longer placed.
        self.ready: dict[int, PreparedJob] = {}
        self._inbox: deque[tuple[list[int], Optional[int]]] = deque()
        #: The lease attached (its ``lost_generation`` is read by the loop thread in :meth:`arrive`).
        self._lease: Any = None

    # -- heartbeat thread ----------------------------------------------------------------------
    def attach(self, lease: Any) -> Any:
        """Have ``lease`` ask about the held jobs with each heartbeat (a job source without
        ``watch`` is left as it is); returns ``lease``."""
        self._lease = lease
        watch = getattr(lease, "watch", None)
        if watch is not None:
            try:
                watch(self.held_ids, self._arrived, generation=True)
            except TypeError:  # a job source whose watch does not number its answers
                watch(self.held_ids, self._arrived)
        return lease

    def held_ids(self) -> list[int]:
        # New copies waiting for a stale one's exit are held too: a user may delete them meanwhile.
        return [*self.held(), *list(self.successors), *list(self.ready)]

    def _arrived(self, job_ids: list[int], as_of: Optional[int] = None) -> None:
        self._inbox.append((list(job_ids), as_of))
        self.wake.set()

    # -- status updater thread -----------------------------------------------------------------
    def deleted(self, job_ids: list[int]) -> None:
        """The status updater's ``on_gone``: the server answered 404 for these jobs' updates (they
        were deleted). Handed over as a heartbeat's answer is, for every copy held (a deleted job
        is leased again by no one); the loop ends their runs and reports nothing for them."""
        self._arrived(job_ids, None)

    # -- loop thread ---------------------------------------------------------------------------
    @property
    def news(self) -> bool:
        return bool(self._inbox)

    def arrive(self, jobs: list[PreparedJob], generation: int, running: Callable[[], Iterable[int]],
               pending: "deque[PreparedJob]", queued: Container[int], remote: Optional[dict[int, int]] = None,
               placed: Optional[dict[int, Any]] = None) -> tuple[list[PreparedJob], list[int], list[int], dict[int, list[int]]]:
        """Note newly taken jobs (copies of acquire ``generation``); returns ``(to queue now,
        stale runs here: end them, stale hand-overs: cancel them, {rank: stale runs there})``.

        The usual case (no id held already, none placed) is a few C-level set operations for the
        batch. A job that arrives while an older copy of it is held replaces that copy (see the
        module docstring); the older copy's exit is not reported. ``running()`` is called only
        then; ``placed``: the NodeManager's placements (a job id still placed, e.g. kept for a
        hand-over, cannot be placed again yet).
        """
        lost = int(getattr(self._lease, "lost_generation", 0) or 0)
        if lost and jobs and generation <= lost:
            # Acquired under a Session found gone before they reached the loop: the server gave
            # them back, another launcher may run them now.
            logger.warning("%d jobs acquired under a lost session are not started: %s",
                           len(jobs), [p.id for p in jobs][:20])
            return [], [], [], {}
        copies = self.copies
        ids = [p.id for p in jobs]
        placed = placed if placed is not None else {}
        if copies.keys().isdisjoint(ids) and placed.keys().isdisjoint(ids):
            before = len(copies)
            copies.update(dict.fromkeys(ids, generation))
            if len(copies) == before + len(ids):
                return jobs, [], [], {}
            again: set[int] = set()  # a job twice in one batch (the prefetcher hands over several acquires)
        else:
            again = {i for i in ids if i in copies or i in placed}
            copies.update(dict.fromkeys(ids, generation))
        return self._replace(jobs, again, running, pending, queued, remote, placed)

    def _replace(self, jobs: list[PreparedJob], again: set[int], running: Callable[[], Iterable[int]],
                 pending: "deque[PreparedJob]", queued: Container[int], remote: Optional[dict[int, int]],
                 placed: dict[int, Any]) -> tuple[list[PreparedJob], list[int], list[int], dict[int, list[int]]]:
        latest = {p.id: p for p in jobs}  # twice in one batch: the later copy is the one leased now
        if len(latest) < len(jobs):
            logger.info("%d jobs came twice in one batch of acquired jobs: the later copies are kept",
                        len(jobs) - len(latest))
        here = set(running())
        now: list[PreparedJob] = []
        local: list[int] = []
        cancel: list[int] = []
        by_rank: dict[int, list[int]] = {}
        stale_pending: set[int] = set()
        for job_id, prepared in latest.items():
            if job_id not in again:
                now.append(prepared)
                continue
            if job_id in self.successors:  # a third copy: the one waiting is stale as well
                self.successors[job_id] = prepared
            elif job_id in self.ready:
                self.ready[job_id] = prepared
            elif job_id in here or (remote is not None and job_id in remote) or job_id in queued:
                if job_id not in self.ending:
                    if job_id in here:
                        local.append(job_id)
                    elif remote is not None and job_id in remote:
                        by_rank.setdefault(remote[job_id], []).append(job_id)
                    else:
                        cancel.append(job_id)  # comes back unstarted (dropped), or started (ended at once)
                    self.ending.add(job_id)
                self.successors[job_id] = prepared
            elif job_id in placed:  # its exit is settled, its resources kept for a hand-over decision
                self.ready[job_id] = prepared
            else:
                stale_pending.add(job_id)  # waiting in pending, or nowhere (ended, failed at start)
                now.append(prepared)
            if job_id in self.successors:
                logger.info("job %s was leased again while an older copy of it runs (re-queued by its user, or "
                            "its lost session replaced): that run is ended, the new copy starts after it", job_id)
        if stale_pending and pending:
            kept = [p for p in pending if p.id not in stale_pending]
            if len(kept) < len(pending):
                logger.info("%d jobs were leased again while waiting here: their older copies are dropped",
                            len(pending) - len(kept))
                pending.clear()
                pending.extend(kept)
        return now, local, cancel, by_rank

    def release_ready(self, placed: Container[int]) -> list[PreparedJob]:
        """The new copies whose stale copy has exited and whose id is no longer placed (queue them)."""
        out = [p for job_id, p in self.ready.items() if job_id not in placed]
        for prepared in out:
            del self.ready[prepared.id]
        return out

    def take(self, running: Iterable[int], pending: "deque[PreparedJob]", queued: Any,
             remote: Optional[dict[int, int]] = None) -> tuple[list[int], list[int], dict[int, list[int]]]:
        """Sort the ids that arrived: ``(running here: end them, queued: cancel them, {rank: ids
        running there})``; pending ones are dropped now. Ids found nowhere (the job ended
        meanwhile) are ignored, and so is an answer older than the copy held (see the module
        docstring)."""
        ids = set()
        copies = self.copies
        while self._inbox:
            job_ids, as_of = self._inbox.popleft()
            for job_id in job_ids:
                if as_of is not None and copies.get(job_id, 0) > as_of:
                    logger.info("job %s: a heartbeat answer computed before it was leased again is ignored", job_id)
                    continue
                ids.add(job_id)
        if self.successors:
            for job_id in ids & self.successors.keys():  # the new copy waiting for a stale run is gone too
                del self.successors[job_id]
                logger.info("job %s was deleted or moved by its user: its new copy dropped before it started", job_id)
        ids -= self.ending
        if self.ready:
            for job_id in ids & self.ready.keys():
                del self.ready[job_id]
                copies.pop(job_id, None)
                logger.info("job %s was deleted or moved by its user: dropped before it started", job_id)
        if not ids:
            return [], [], {}
        local, cancel, by_rank = [], [], {}
        here = set(running)
        for job_id in sorted(ids):
            if job_id in here:
                local.append(job_id)
            elif remote is not None and job_id in remote:
                by_rank.setdefault(remote[job_id], []).append(job_id)
            elif job_id in queued:
                cancel.append(job_id)
            else:
                continue
            self.ending.add(job_id)
        self.drop_pending(pending, ids)
        return local, cancel, by_rank

    def drop_pending(self, pending: "deque[PreparedJob]", ids: Optional[Collection[int]] = None) -> int:
        """Drop the pending jobs that are gone (``ids``, else those being ended: a cancelled
        hand-over comes back to ``pending``); how many were dropped. A dropped stale copy lets its
        new copy go to :attr:`ready`."""
        ids = self.ending if ids is None else ids
        if not ids or not pending:
            return 0
        kept = [p for p in pending if p.id not in ids]
        dropped = len(pending) - len(kept)
        if dropped:
            for prepared in pending:
                if prepared.id in ids:
                    self.ending.discard(prepared.id)
                    successor = self.successors.pop(prepared.id, None)
                    if successor is not None:
                        self.ready[prepared.id] = successor
                        logger.info("job %s: its stale copy dropped before it started; the new copy is queued",
                                    prepared.id)
                    else:
                        self.copies.pop(prepared.id, None)
                        logger.info("job %s was deleted or moved by its user: dropped before it started", prepared.id)
            pending.clear()
            pending.extend(kept)
        return dropped

    def settled(self, job_id: int) -> bool:
        """Whether the exit of ``job_id`` is one we caused (then it is not reported). The exit of
        a stale copy lets its new copy go to :attr:`ready`."""
        if job_id not in self.ending:
            return False
        self.ending.discard(job_id)
        successor = self.successors.pop(job_id, None)
        if successor is not None:
            self.ready[job_id] = successor
            logger.info("job %s: the run of its stale copy was ended; the new copy is queued", job_id)
        else:
            self.copies.pop(job_id, None)
            logger.info("job %s was deleted or moved by its user: its run was ended", job_id)
        return True

    def forget(self, job_id: int) -> None:
        """``job_id`` left the loop without a settled exit (failed at start, exit reported)."""
        self.copies.pop(job_id, None)
