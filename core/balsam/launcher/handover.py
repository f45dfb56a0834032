"""Hand-over: jobs queued in the spawner behind running jobs, shared by the serial master and mpi mode.

When the partition is full and jobs wait, a job mode queues up to ``depth`` pending jobs of the same
demand behind each young running local job, in the spawner process
(:meth:`~balsam.launcher.runner.SpawnerPool.queue_after`). The spawner starts the next one on the
same resources the moment the one ahead exits, without a round trip through the mode's loop: a
short job otherwise leaves its CPUs idle while its exit travels to the loop and the next start back.
The loop learns of such a start together with the exit before it; the started job is then RUNNING
with the time it really started, and the placement passes to it (:meth:`NodeManager.hand_over`).

Rules, and why:
- Only behind a job of the **same demand** (so the placement fits as it is) and only the head of
  ``pending`` is looked at (the placement order is kept).
- Only behind a job younger than ``max_age_sec``; the queue behind an older one is cancelled and its
  jobs placed again, so a long job does not hold jobs that could run elsewhere.
- Not while the pool holds unread events: an exit among them would make a job queued behind that
  task come back unstarted (queued and placed again: work done twice).
- No hand-over after an exit by a termination signal (the spawner's rule: the allocation is ending).
- A queued job is not RUNNING until it starts, so a stop simply forgets it (the Session's release
  gives it back).
- Jobs are queued only while the lease is known alive (the modes call :meth:`HandOver.queue_behind`
  only then; :mod:`balsam.client.lease`, "Known alive"). Once queued, the spawner starts them
  without the loop, also while the launcher's main process is frozen: so each is queued with the
  lease's ``fresh_until()`` (``queue_behind``'s ``fresh_until``, a CLOCK_BOOTTIME time: one clock for
  every process of the node) as its deadline, after which the spawner does not start it but gives
  it back unstarted (:mod:`balsam.launcher.spawner`, ``"Q"``); the loop places it again after its
  own freshness check.
- A queue request can reach the spawner just after the job ahead ended; the spawner then starts it at
  once on that job's resources. So the placement of an ended job with a job queued behind it is kept
  (``deferred``) until the spawner says whether that job started (passed on) or came back (freed).

Thread contract: every method runs on the mode's loop thread, which owns the NodeManager, the
pending deque and the pool. Pure bookkeeping over the pool's answers: unit-tested with a fake pool.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Optional

from .app_run import PreparedJob
from .node_manager import NodeManager, Placement

logger = logging.getLogger(__name__)

#: ``command(prepared, placement) -> (shell line, environment)`` of a job started on ``placement``.
CommandFn = Callable[[PreparedJob, Placement], "tuple[str, dict[str, str]]"]
#: ``fail(job_id, reason)``: report the job FAILED.
FailFn = Callable[[int, str], None]
#: ``on_start(prepared, when)``: a queued job started (``when``: epoch seconds, by the spawner).
StartedFn = Callable[[PreparedJob, float], None]


def lease_fresh_until(lease: Any) -> Optional[float]:
    """``lease.fresh_until()`` (CLOCK_BOOTTIME, the spawner's ``node_clock``), or None for a job source that does not say (no deadline)."""
    fresh_until = getattr(lease, "fresh_until", None)
    return None if fresh_until is None else float(fresh_until())


class HandOver:
    """The jobs queued behind running local jobs and what becomes of their placements."""

    def __init__(self, pool: Any, node_manager: NodeManager, *, depth: int, max_age_sec: float) -> None:
        self.pool = pool
        self.node_manager = node_manager
        self.depth = depth
        self.max_age_sec = max_age_sec
        #: started local jobs -> (prepared, placement, monotonic start): the heads jobs queue behind
        self.local: dict[int, tuple[PreparedJob, Placement, float]] = {}
        #: queued in the spawner, not started (job id -> prepared)
        self.queued: dict[int, PreparedJob] = {}
        #: job id -> the job queued right behind it
        self.behind: dict[int, int] = {}
        #: job id -> the queued job that started on its resources when it ended (its placement
        #: passes to that job when this one's exit is settled)
        self.handed_to: dict[int, int] = {}
        #: ended jobs whose resources are kept for the job queued behind them (see the module docstring)
        self.deferred: set[int] = set()
        self._cancelled: set[int] = set()
        self._next_age_check = 0.0
        #: Jobs started by a hand-over, and queued jobs given back unstarted.
        self.handed_over = 0
        self.given_back = 0

    @property
    def available(self) -> bool:
        """Whether the pool can queue (a spawner that is alive; not the in-process fallback pool)."""
        return bool(getattr(self.pool, "can_queue", False))

    def started_local(self, prepared: PreparedJob, placement: Placement) -> None:
        """``prepared`` was started on this node on ``placement``: jobs may queue behind it."""
        self.local[prepared.id] = (prepared, placement, time.monotonic())

    def queue_behind(self, pending: "deque[PreparedJob]", command: CommandFn, fail: FailFn,
                     fresh_until: Optional[float] = None) -> int:
        """Queue the head of ``pending`` behind young local jobs of the same demand, up to
        ``depth`` each; returns how many were queued. ``fresh_until``: the lease's
        :meth:`~balsam.client.lease.JobLease.fresh_until` (the spawner's node_clock), the spawner's deadline to start them."""
        if not (pending and self.local and self.available) or self.pool.events:
            return 0
        queued = 0
        now = time.monotonic()
        for head_id, (head, placement, since) in list(self.local.items()):
            if not pending or pending[0].demand != head.demand:
                break
            if head_id in self.pool.held or now - since > self.max_age_sec:
                continue
            tail, depth = head_id, 0
            while tail in self.behind:
                tail = self.behind[tail]
                depth += 1
            while depth < self.depth and pending and pending[0].demand == head.demand:
                prepared = pending.popleft()
                try:
                    cmd, env = command(prepared, placement)
                except Exception as exc:
                    reason = f"An exception occurred while preparing the launch: {type(exc).__name__}: {exc}"
                    logger.error("job %s FAILED: %s", prepared.id, reason)
                    fail(prepared.id, reason)
                    continue
                queued_ok = (self.pool.queue_after(tail, prepared.id, cmd, prepared.workdir, env) if fresh_until is None
                             else self.pool.queue_after(tail, prepared.id, cmd, prepared.workdir, env, fresh_until))
                if not queued_ok:
                    pending.appendleft(prepared)
                    return queued
                self.queued[prepared.id] = prepared
                self.behind[tail] = prepared.id
                tail = prepared.id
                depth += 1
                queued += 1
        return queued

    def note_handovers(self, pending: "deque[PreparedJob]", on_start: StartedFn) -> tuple[int, int]:
        """Queued jobs that started (``on_start`` for each, with when it started) or came back
        unstarted (to the front of ``pending``); returns (started, given back). Call it after the
        pool's ``reap`` and before the exits it returned are released."""
        started = self.pool.take_started()
        for after_id, job_id, when in started:
            prepared = self.queued.pop(job_id)  # every start the pool reports was queued here
            self.behind.pop(after_id, None)
            self._cancelled.discard(job_id)
            placement = self.node_manager.placements.get(after_id)
            if placement is not None:
                self.local[job_id] = (prepared, placement, time.monotonic())
            if after_id in self.deferred:  # its end was settled already: pass the resources on now
                self.deferred.discard(after_id)
                self.node_manager.hand_over(after_id, job_id)
            else:
                self.handed_to[after_id] = job_id
            on_start(prepared, when)
        self.handed_over += len(started)
        dropped = self.pool.take_dropped()
        self.given_back += len(dropped)
        for job_id in reversed(dropped):
            prepared = self.queued.pop(job_id, None)
            if prepared is not None:
                pending.appendleft(prepared)
        if dropped:
            drop = set(dropped)
            for after_id in [a for a, j in self.behind.items() if j in drop]:
                del self.behind[after_id]
                if after_id in self.deferred:
                    self.deferred.discard(after_id)
                    self.node_manager.free(after_id)
            self._cancelled -= drop
        return len(started), len(dropped)

    def cancel_behind_old(self) -> None:
        """Give back the queue behind a local job running longer than ``max_age_sec``."""
        if not self.queued:
            return
        now = time.monotonic()
        if now < self._next_age_check:
            return
        self._next_age_check = now + self.max_age_sec / 4
        for head_id, (_, _, since) in list(self.local.items()):
            first = self.behind.get(head_id)
            if first is not None and first not in self._cancelled and now - since > self.max_age_sec:
                self._cancelled.add(first)
                self.pool.cancel(first)

    def release(self, job_id: int) -> None:
        """An exit is settled: its resources pass to the job that started on them, wait for the
        fate of the job queued behind it (not known yet), or are freed."""
        self.local.pop(job_id, None)
        successor = self.handed_to.pop(job_id, None)
        if successor is not None:
            self.node_manager.hand_over(job_id, successor)
        elif job_id in self.behind:
            self.deferred.add(job_id)
        else:
            self.node_manager.free(job_id)

    def forget_queued(self) -> None:
        """At a stop, after the pool ended every task and :meth:`note_handovers` reported the ones
        that started: what is still queued will not start (the Session's release gives it back)."""
        self.queued.clear()
        self.behind.clear()
        for job_id in self.deferred:
            self.node_manager.free(job_id)
        self.deferred.clear()
