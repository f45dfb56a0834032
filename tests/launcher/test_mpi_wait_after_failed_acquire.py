"""mpi mode: the answer that follows a failed acquire says nothing of the backlog.

JobLease keeps the body of an acquire whose answer was lost and sends it again, unchanged (same
Idempotency-Key), before anything new. The loop took that answer as one to the request it had just
computed: an empty answer to the old, smaller room was taken as "backlog empty"
(:class:`balsam.launcher.modes.mpi.EmptyBacklog`), and a job that fits only the room freed since
waited ``delay_sec``. The loop test runs MPIMode over a fake pool and a source that resends as
JobLease does (as test_mpi_cycle_empty_backlog.py); the waits are against hangs only.
"""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any, Optional

import pytest

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.node_manager import Demand
from launcher_helpers import FakePool, fake_mpi_leases, mpi_mode
from test_mpi_cycle_empty_backlog import WAIT_SEC, Prep, Updater, running


class ResendingSource:
    """First-fit by footprint, as the server packs; the acquire numbered ``fail_at`` raises after
    "sending", and the next call answers that body instead (JobLease resends an unanswered acquire,
    same key, same body, before anything new)."""

    def __init__(self, jobs: list[Any], fail_at: Optional[int]) -> None:
        self.jobs, self.fail_at, self.calls, self.pending = jobs, fail_at, 0, None
        self.answered: list[tuple[float, list[int]]] = []  # (room of the body answered, job ids)
        self.lock = threading.Condition()

    def acquire(self, count: int, **kw: Any) -> list[Any]:
        with self.lock:
            self.calls += 1
            if self.calls == self.fail_at:
                self.pending = kw
                self.lock.notify_all()
                raise ConnectionError("the answer was lost")
            body, self.pending = (self.pending or kw), None
            room, got = body["max_aggregate_nodes"], []
            for job in list(self.jobs):
                footprint = job.num_nodes / job.packing
                if len(got) < count and job.num_nodes <= body["max_nodes_per_job"] and footprint <= room + 1e-9:
                    room -= footprint
                    got.append(job)
                    self.jobs.remove(job)
            self.answered.append((body["max_aggregate_nodes"], [job.id for job in got]))
            self.lock.notify_all()
            return got


class SizedPrep(Prep):
    def prepare(self, job: Any) -> PreparedJob:
        return PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={},
                           demand=Demand(num_nodes=job.num_nodes, node_packing_count=job.packing))


@pytest.mark.parametrize("fail_at", [2, None])
def test_an_empty_answer_after_a_failed_acquire_does_not_say_the_backlog_is_empty(tmp_path: Path, fail_at: Any) -> None:
    """One two-CPU node: jobs 1-3 take half of it each, job 9 all of it. The second acquire (room
    0.5: job 9 does not fit) fails and its body is resent after job 1's exit, answered empty. That
    answer is to room 0.5, not to the room asked then: job 2's exit, which frees the node for job
    9, must still ask (it was taken as "backlog empty", and job 9 waited ``delay_sec``)."""
    mode = mpi_mode(tmp_path, cpus=2, delay_sec=1)
    jobs = [types.SimpleNamespace(id=i, wall_time_min=0, num_nodes=1, packing=packing)
            for i, packing in ((1, 2), (2, 2), (3, 2), (9, 1))]
    pool, source, updater = FakePool(mode.wake), ResendingSource(jobs, fail_at), Updater()
    fake_mpi_leases(mode, pool, SizedPrep(), source, updater)
    mode.delay_sec = 3600.0
    mode.empty_backlog.reask_sec = 3600.0
    with running(mode):
        updater.wait_for((1, "RUNNING"))
        updater.wait_for((2, "RUNNING"))
        with source.lock:  # the second acquire (room 0.5) is answered, or failed
            assert source.lock.wait_for(lambda: source.calls >= 2, WAIT_SEC)
        pool.finish(1)
        updater.wait_for((3, "RUNNING"))
        with source.lock:  # the acquire job 1's exit sent (a resend of the failed one) is answered
            answers = 2 if fail_at else 3  # (the failed one has no answer)
            assert source.lock.wait_for(lambda: len(source.answered) >= answers, WAIT_SEC), source.answered
        pool.finish(2)
        pool.finish(3)
        updater.wait_for((9, "RUNNING"))
        pool.finish(9)
        updater.wait_for((9, "RUN_DONE"))
