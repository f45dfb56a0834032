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

Thread contract: :meth:`GoneJobs.held_ids` and the lease's ``on_gone`` callback run on the lease's
heartbeat thread; they only copy the loop's containers (``held``: built by the mode from ``list()``
copies, each one C call) and append to a deque, then set ``wake``. Every other method belongs to
the mode's loop thread, which alone owns the pool, the pending deque, the hand-over and
:attr:`GoneJobs.ending`.

A lease that lost its Session and opened a new one asks the new one too: the old Session's jobs
were given back by the server (RUNNING ones are RUN_TIMEOUT, to run again), so they are ended the
same way rather than run twice.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Iterable, Optional

from .app_run import PreparedJob

logger = logging.getLogger(__name__)


class GoneJobs:
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        #: The ids the mode runs or holds ready (set by the mode; called on the heartbeat thread).
        self.held: Callable[[], Iterable[int]] = list
        #: Jobs whose run is being ended (or whose queued start was cancelled): their exit is not reported.
        self.ending: set[int] = set()
        self._inbox: deque[int] = deque()

    # -- heartbeat thread ----------------------------------------------------------------------
    def attach(self, lease: Any) -> Any:
        """Have ``lease`` ask about the held jobs with each heartbeat (a job source without
        ``watch`` is left as it is); returns ``lease``."""
        watch = getattr(lease, "watch", None)
        if watch is not None:
            watch(self.held_ids, self._arrived)
        return lease

    def held_ids(self) -> list[int]:
        return list(self.held())

    def _arrived(self, job_ids: list[int]) -> None:
        self._inbox.extend(job_ids)
        self.wake.set()

    # -- loop thread ---------------------------------------------------------------------------
    @property
    def news(self) -> bool:
        return bool(self._inbox)

    def take(self, running: Iterable[int], pending: "deque[PreparedJob]", queued: Any,
             remote: Optional[dict[int, int]] = None) -> tuple[list[int], list[int], dict[int, list[int]]]:
        """Sort the ids that arrived: ``(running here: end them, queued: cancel them, {rank: ids
        running there})``; pending ones are dropped now. Ids found nowhere (the job ended
        meanwhile) are ignored."""
        ids = set()
        while self._inbox:
            ids.add(self._inbox.popleft())
        ids -= self.ending
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

    def drop_pending(self, pending: "deque[PreparedJob]", ids: Optional[set[int]] = None) -> int:
        """Drop the pending jobs that are gone (``ids``, else those being ended: a cancelled
        hand-over comes back to ``pending``); how many were dropped."""
        ids = self.ending if ids is None else ids
        if not ids or not pending:
            return 0
        kept = [p for p in pending if p.id not in ids]
        dropped = len(pending) - len(kept)
        if dropped:
            for prepared in pending:
                if prepared.id in ids:
                    self.ending.discard(prepared.id)
                    logger.info("job %s was deleted or moved by its user: dropped before it started", prepared.id)
            pending.clear()
            pending.extend(kept)
        return dropped

    def settled(self, job_id: int) -> bool:
        """Whether the exit of ``job_id`` is one we caused (then it is not reported)."""
        if job_id not in self.ending:
            return False
        self.ending.discard(job_id)
        logger.info("job %s was deleted or moved by its user: its run was ended", job_id)
        return True
