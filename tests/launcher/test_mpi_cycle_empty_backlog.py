"""mpi mode's acquires once the backlog is empty (:class:`balsam.launcher.modes.mpi.EmptyBacklog`).

An acquire that found no job although it offered room for any job the nodes could run says the
backlog is empty: job exits no longer send an acquire each (measured with 100 no-op jobs: 16 of the
run's 26 acquires were such empty ones, each a request the server handled on the jobs' CPUs); they
bring the next one forward to ``reask_sec`` after the empty answer. An empty answer to a request
that offered less, a request that could now lease a larger job, or the first one that looks for
oversized jobs are asked at once, as before.

The loop tests run MPIMode over a fake pool and a fake source (as test_mpi_held_and_late_starts.py):
the acquires are counted after the mode stopped (its acquire in flight is waited for), so nothing
is timed; the waits are against hangs only.
"""

from __future__ import annotations

import contextlib
import threading
import types
from pathlib import Path
from typing import Any

from balsam.launcher.modes.mpi import EMPTY_BACKLOG_REASK_SEC, EmptyBacklog, MPIMode
from launcher_helpers import FakePool, RecordingUpdater, WholeNodePrep, fake_mpi_leases, mode_running, mpi_mode

WAIT_SEC = 30.0


def _request(max_nodes: int = 1, room: float = 2.0, probe: bool = False) -> dict[str, Any]:
    return {"count": 10, "max_nodes_per_job": max_nodes, "max_aggregate_nodes": room, "probe": probe}


# -- the accounting ---------------------------------------------------------------------------------
def test_after_an_answer_with_jobs_an_exit_asks_at_once() -> None:
    backlog = EmptyBacklog()
    backlog.answered(_request(), 3, now=10.0)
    assert backlog.request is None
    assert backlog.after_exit(_request(), now=10.01) == 10.01


def test_after_a_conclusive_empty_answer_an_exit_asks_only_reask_sec_after_it() -> None:
    """Room for any job of up to one node (aggregate 2 >= 1): more room freed changes nothing."""
    backlog = EmptyBacklog()
    assert backlog.reask_sec == EMPTY_BACKLOG_REASK_SEC
    backlog.answered(_request(room=2.0), 0, now=10.0)
    assert backlog.after_exit(_request(room=5.0), now=10.01) == 10.0 + EMPTY_BACKLOG_REASK_SEC
    # Past that time the loop asks at once (its check is next_acquire <= now).
    assert backlog.after_exit(_request(room=5.0), now=11.0) <= 11.0


def test_an_empty_answer_to_less_room_than_a_job_may_take_is_asked_again_when_room_grows() -> None:
    """Aggregate 0.5 with jobs of up to 2 nodes allowed: a 1-node job may not have fitted."""
    backlog = EmptyBacklog()
    backlog.answered(_request(max_nodes=2, room=0.5), 0, now=10.0)
    assert backlog.after_exit(_request(max_nodes=2, room=1.0), now=10.01) == 10.01
    assert backlog.after_exit(_request(max_nodes=2, room=0.5), now=10.01) == 10.0 + EMPTY_BACKLOG_REASK_SEC


def test_more_idle_nodes_or_the_first_oversized_probe_ask_at_once() -> None:
    backlog = EmptyBacklog()
    backlog.answered(_request(max_nodes=1, room=2.0), 0, now=10.0)
    assert backlog.after_exit(_request(max_nodes=2, room=2.0), now=10.01) == 10.01  # a 2-node job may fit now
    assert backlog.after_exit(_request(probe=True), now=10.01) == 10.01  # the partition went idle
    backlog.answered(_request(probe=True), 0, now=10.02)
    assert backlog.after_exit(_request(probe=True), now=10.03) == 10.02 + EMPTY_BACKLOG_REASK_SEC


def test_a_failed_acquire_says_nothing_of_the_backlog() -> None:
    """After an empty answer, a failed acquire (no answer): exits ask at once again, as before."""
    backlog = EmptyBacklog()
    backlog.answered(_request(), 0, now=10.0)
    backlog.clear()
    assert backlog.after_exit(_request(), now=10.01) == 10.01


def test_no_room_to_ask_leaves_it_to_the_loop() -> None:
    """No request (no room): the loop's own check finds nothing to send, as before."""
    backlog = EmptyBacklog()
    backlog.answered(_request(), 0, now=10.0)
    assert backlog.after_exit(None, now=10.01) == 10.01


# -- the loop ---------------------------------------------------------------------------------------
Prep = WholeNodePrep


class Source:
    """Hands out ``batches`` one per acquire (then nothing); records every acquire and its answer."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches
        self.answers: list[int] = []
        self.lock = threading.Condition()

    def acquire(self, count: int, **kw: Any) -> list[Any]:
        with self.lock:
            jobs = self.batches.pop(0) if self.batches else []
            self.answers.append(len(jobs))
            self.lock.notify_all()
            return jobs

    def wait_for_answers(self, n: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.answers) >= n, WAIT_SEC), self.answers


class Updater(RecordingUpdater):
    def wait_for(self, item: tuple[int, str]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: item in self.puts, WAIT_SEC), f"no {item}: {self.puts}"


def make_mode(tmp_path: Path, batches: list[list[Any]], reask_sec: float) -> tuple[MPIMode, Source, Updater, FakePool]:
    """An MPIMode on one one-CPU node (one whole-node job at a time), jobs running until the test ends
    them; ``delay_sec`` far longer than the test, so every acquire after an empty answer is one an
    exit asked for."""
    mode = mpi_mode(tmp_path, cpus=1, delay_sec=1)
    pool, source, updater = FakePool(mode.wake), Source(batches), Updater()
    fake_mpi_leases(mode, pool, Prep(), source, updater)
    mode.delay_sec = 3600.0
    mode.empty_backlog.reask_sec = reask_sec
    return mode, source, updater, pool


def running(mode: MPIMode) -> contextlib.AbstractContextManager[None]:
    """Runs ``mode``'s loop for the ``with`` block (the other MPI loop tests import it from here)."""
    return mode_running(mode, WAIT_SEC)


def _job(job_id: int) -> Any:
    return types.SimpleNamespace(id=job_id, wall_time_min=0)


def _run_until_empty_answer(mode: MPIMode, source: Source, updater: Updater, pool: FakePool) -> int:
    """Jobs 1 and 2 leased, job 1 runs; job 1 ends, job 2 starts; the answer with no job comes
    back. Returns how many acquires had been sent by then."""
    updater.wait_for((1, "RUNNING"))
    source.wait_for_answers(2)  # job 2, leased ahead
    pool.finish(1)
    updater.wait_for((2, "RUNNING"))
    with source.lock:
        assert source.lock.wait_for(lambda: 0 in source.answers, WAIT_SEC), source.answers
    # The empty answer is taken by the loop (it wakes on it) before job 2's exit below, or in
    # the same turn as that exit: either way that exit is the first one after the empty answer.
    return len(source.answers)


def test_an_exit_after_the_backlog_was_found_empty_sends_no_acquire(tmp_path: Path) -> None:
    mode, source, updater, pool = make_mode(tmp_path, [[_job(1)], [_job(2)]], reask_sec=3600.0)
    with running(mode):
        sent = _run_until_empty_answer(mode, source, updater, pool)
        pool.finish(2)
        updater.wait_for((2, "RUN_DONE"))
    # The mode has stopped and waited for any acquire in flight: none followed job 2's exit.
    assert len(source.answers) == sent, source.answers
    assert source.answers[:2] == [1, 1]


def test_jobs_that_arrive_after_an_empty_answer_are_leased_at_the_next_exit_once_reask_sec_passed(tmp_path: Path) -> None:
    """reask_sec 0: the next exit asks again and gets job 3 (the behaviour kept for workflows that
    create jobs as others end)."""
    mode, source, updater, pool = make_mode(tmp_path, [[_job(1)], [_job(2)]], reask_sec=0.0)
    with running(mode):
        _run_until_empty_answer(mode, source, updater, pool)
        with source.lock:
            source.batches.append([_job(3)])
        pool.finish(2)
        updater.wait_for((3, "RUNNING"))
        pool.finish(3)
        updater.wait_for((3, "RUN_DONE"))
    assert [job_id for job_id, state in updater.puts if state == "RUN_DONE"] == [1, 2, 3]
