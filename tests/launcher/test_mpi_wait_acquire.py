"""mpi mode's waiting acquire (``Prefer: wait``, :class:`balsam.launcher.modes.mpi.AcquireWait`).

With the backlog found empty, nothing leased waiting and a request that offers room for any job the
nodes could run, the acquire asks the server to hold its answer until a job can be leased: a job a
workflow creates then is leased when it is created, not ``delay_sec`` later. A stop does not wait
for such an acquire. A server that does not wait (answers at once) is asked once per ``delay_sec``,
as before.

The loop tests run MPIMode over a fake pool and fake sources (as test_mpi_cycle_empty_backlog.py),
with ``delay_sec`` far longer than the test: a job leased without an exit is one a waiting acquire
got (test_mpi_wait_real_launcher.py: the same with a real server and launcher). Nothing is timed;
the waits are against hangs only.
"""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any, Optional

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.modes.mpi import ACQUIRE_WAIT_SEC, AcquireWait, MPIMode
from launcher_helpers import FakePool, fake_mpi_leases, mpi_mode
from test_mpi_cycle_empty_backlog import WAIT_SEC, Prep, Updater, running


def _request(max_nodes: int = 1, room: float = 1.0) -> dict[str, Any]:
    return {"count": 10, "max_nodes_per_job": max_nodes, "max_aggregate_nodes": room, "probe": False}


# -- the accounting ---------------------------------------------------------------------------------
def test_waits_only_after_an_empty_answer_with_nothing_held_and_room_for_any_job() -> None:
    wait = AcquireWait()
    empty = _request()
    assert wait.wait_for(_request(), empty, in_service=1, holding=False) == ACQUIRE_WAIT_SEC
    assert wait.wait_for(_request(), None, in_service=1, holding=False) == 0  # backlog not known empty
    assert wait.wait_for(_request(), empty, in_service=1, holding=True) == 0  # jobs wait leased
    # Two nodes in service, one idle: a node that frees could take a 2-node job this request cannot.
    assert wait.wait_for(_request(max_nodes=1, room=2.0), empty, in_service=2, holding=False) == 0
    # Jobs of up to 2 nodes allowed but room for half a node: a larger one may not fit.
    assert wait.wait_for(_request(max_nodes=2, room=0.5), empty, in_service=2, holding=False) == 0
    assert wait.wait_for(_request(max_nodes=2, room=2.0), empty, in_service=2, holding=False) == ACQUIRE_WAIT_SEC


def test_an_empty_answer_held_by_the_server_asks_again_at_once_one_not_held_after_delay_sec() -> None:
    wait = AcquireWait(wait_sec=4.0)
    assert wait.waited(4.0, took=4.01) and wait.server_waits
    assert not wait.waited(4.0, took=0.01)  # a server that does not wait
    assert not wait.server_waits
    assert wait.waited(4.0, took=3.0) and wait.server_waits  # it waits again (restarted, upgraded)
    assert not wait.waited(0.0, took=10.0) and wait.server_waits  # no wait asked: says nothing of the server


# -- the loop ---------------------------------------------------------------------------------------
class WaitingSource:
    """Hands out ``batches`` one per acquire; an acquire asked to wait with none to hand out blocks
    until jobs are added (or ``release``); ``honours_wait=False`` answers at once, as a server that
    does not wait. Records every acquire's ``wait_sec`` and answer."""

    def __init__(self, batches: list[list[Any]], honours_wait: bool = True) -> None:
        self.batches = batches
        self.honours_wait = honours_wait
        self.calls: list[tuple[float, int]] = []  # (wait_sec asked, jobs answered)
        self.blocked = 0  # acquires waiting now
        self.released = False
        self.lock = threading.Condition()

    def acquire(self, count: int, wait_sec: Optional[float] = None, **kw: Any) -> list[Any]:
        with self.lock:
            if wait_sec and self.honours_wait and not self.batches:
                self.blocked += 1
                self.lock.notify_all()
                self.lock.wait_for(lambda: self.batches or self.released)
                self.blocked -= 1
            jobs = self.batches.pop(0) if self.batches else []
            self.calls.append((wait_sec or 0.0, len(jobs)))
            self.lock.notify_all()
            return jobs

    def add(self, jobs: list[Any]) -> None:
        with self.lock:
            self.batches.append(jobs)
            self.lock.notify_all()

    def release(self) -> None:
        with self.lock:
            self.released = True
            self.lock.notify_all()

    def wait_until(self, predicate: Any) -> None:
        with self.lock:
            assert self.lock.wait_for(predicate, WAIT_SEC), (self.calls, self.blocked)


class RecordingPrep(Prep):
    def __init__(self) -> None:
        self.prepared: list[int] = []

    def prepare(self, job: Any) -> PreparedJob:
        self.prepared.append(job.id)
        return super().prepare(job)


def _job(job_id: int) -> Any:
    return types.SimpleNamespace(id=job_id, wall_time_min=0)


def make_mode(tmp_path: Path, source: Any) -> tuple[MPIMode, Updater, FakePool]:
    """An MPIMode on one one-CPU node; ``delay_sec`` far longer than the test, ``reask_sec`` 0 (the
    first waiting acquire follows the empty answer at once); the server's wait as long as the test."""
    mode = mpi_mode(tmp_path, cpus=1, delay_sec=1)
    pool, updater = FakePool(mode.wake), Updater()
    fake_mpi_leases(mode, pool, RecordingPrep(), source, updater)
    mode.delay_sec = 3600.0
    mode.empty_backlog.reask_sec = 0.0
    mode.acquire_wait.wait_sec = 3600.0
    return mode, updater, pool


def run_job_1_until_an_acquire_waits(source: Any, updater: Updater, pool: FakePool) -> None:
    """Job 1 (already leased) runs and ends; returns once an acquire is blocked in ``source``'s wait."""
    updater.wait_for((1, "RUNNING"))
    pool.finish(1)
    updater.wait_for((1, "RUN_DONE"))
    source.wait_until(lambda: source.blocked)


def test_a_job_created_while_the_partition_is_idle_is_leased_by_the_waiting_acquire(tmp_path: Path) -> None:
    """Job 1 runs and ends; the backlog is empty; job 2 comes with no exit after it: only an acquire
    waiting in the server leases it (the next plain one would go ``delay_sec``, an hour, later)."""
    source = WaitingSource([[_job(1)]])
    mode, updater, pool = make_mode(tmp_path, source)
    try:
        with running(mode):
            run_job_1_until_an_acquire_waits(source, updater, pool)  # the waiting acquire is in flight
            source.add([_job(2)])
            updater.wait_for((2, "RUNNING"))
            pool.finish(2)
            updater.wait_for((2, "RUN_DONE"))
    finally:
        source.release()
    waits = [wait for wait, got in source.calls]
    assert waits[0] == 0  # the first acquire: nothing known of the backlog yet
    assert (3600.0, 1) in source.calls, source.calls  # job 2 came to a waiting acquire


def test_a_stop_does_not_wait_for_the_waiting_acquire_and_what_it_gets_later_is_not_prepared(tmp_path: Path) -> None:
    source = WaitingSource([[_job(1)]])
    mode, updater, pool = make_mode(tmp_path, source)
    try:
        with running(mode):  # its exit asserts that run() returned
            run_job_1_until_an_acquire_waits(source, updater, pool)
        assert source.blocked == 1  # run() returned with the acquire still waiting
        source.add([_job(7)])  # answered after the stop (as the Session's deletion would free it)
        source.wait_until(lambda: (3600.0, 1) in source.calls)
    finally:
        source.release()
    mode._acquire_closed.wait(WAIT_SEC)
    assert 7 not in mode.preparer.prepared  # type: ignore[attr-defined]
    assert not any(job_id == 7 for job_id, _ in updater.puts)


def test_a_server_that_does_not_wait_is_asked_once_per_delay_sec(tmp_path: Path) -> None:
    """Its waiting acquire comes back empty at once: the next one is ``delay_sec`` later (an hour),
    not at once in a loop."""
    source = WaitingSource([[_job(1)]], honours_wait=False)
    mode, updater, pool = make_mode(tmp_path, source)
    turns = [0]
    turned = threading.Condition()
    should_stop = mode.should_stop

    def counting() -> Any:
        with turned:
            turns[0] += 1
            turned.notify_all()
        return should_stop()

    mode.should_stop = counting  # type: ignore[method-assign]
    with running(mode):
        updater.wait_for((1, "RUNNING"))  # job 1 keeps running: the loop turns every POLL_SEC
        source.wait_until(lambda: any(wait for wait, _ in source.calls))  # the waiting acquire, answered at once
        with turned:  # 20 more turns of the loop (a loop asking at once would have asked by then)
            seen = turns[0]
            assert turned.wait_for(lambda: turns[0] >= seen + 20, WAIT_SEC)
        calls = list(source.calls)
    assert calls == [(0.0, 1), (0.0, 0), (3600.0, 0)], calls


class GracefulPool(FakePool):
    """Its stop's grace (``terminate_all``) runs ``during_grace`` first: what happens while the
    running jobs are being ended."""

    during_grace: Any = None

    def terminate_all(self, grace: float) -> tuple[list[int], list]:
        if self.during_grace is not None:
            self.during_grace()
        return super().terminate_all(grace)


def test_a_job_the_waiting_acquire_leases_while_the_stop_ends_the_running_jobs_is_not_prepared(tmp_path: Path) -> None:
    """Job 1 runs and a waiting acquire is out; the stop ends job 1 (its grace may last seconds) and
    job 7 comes to the waiting acquire meanwhile: it never starts, so it is not prepared either
    (no workdir made, nothing held by a launcher that is going)."""
    source = WaitingSource([[_job(1)]])
    mode, updater, _ = make_mode(tmp_path, source)
    pool = GracefulPool(mode.wake)
    mode.pool = pool
    mode.handover.pool = pool
    fetched = threading.Event()
    fetch = mode._fetch

    def recording_fetch(*args: Any) -> Any:
        try:
            return fetch(*args)
        finally:
            fetched.set()

    mode._fetch = recording_fetch  # type: ignore[method-assign]

    def job_comes_during_grace() -> None:
        fetched.clear()
        source.add([_job(7)])
        assert fetched.wait(WAIT_SEC)  # the waiting acquire answered job 7 and its call is done

    pool.during_grace = job_comes_during_grace
    try:
        with running(mode):
            updater.wait_for((1, "RUNNING"))
            source.wait_until(lambda: source.blocked)  # the waiting acquire is out while job 1 runs
    finally:
        source.release()
    assert (3600.0, 1) in source.calls, source.calls
    assert pool.terminated == [[1]]
    assert 7 not in mode.preparer.prepared  # type: ignore[attr-defined]
    assert not any(job_id == 7 for job_id, _ in updater.puts)


class ProbedSource(WaitingSource):
    """Also records the oversized-job probe's acquires (those without ``max_nodes_per_job``)."""

    def __init__(self, batches: list[list[Any]]) -> None:
        super().__init__(batches)
        self.probes = 0
        self.waits_before_probe = 0  # waiting acquires sent before the first probe

    def acquire(self, count: int, wait_sec: Optional[float] = None, **kw: Any) -> list[Any]:
        if "max_nodes_per_job" not in kw:
            with self.lock:
                self.probes += 1
                self.lock.notify_all()
            return []
        if wait_sec and not self.probes:
            self.waits_before_probe += 1
        return super().acquire(count, wait_sec, **kw)


def test_the_partition_going_idle_looks_for_oversized_jobs_before_any_waiting_acquire(
        tmp_path: Path, monkeypatch: Any) -> None:
    """The probe runs after an empty answer of an acquire sent with the partition idle: that acquire
    does not wait (a wait the idle timeout ended first left a job larger than the partition leased
    by no one and never failed: tests/platforms/test_launcher_platform_limits.py); later ones do."""
    import balsam.launcher.modes.mpi as mpi_module

    monkeypatch.setattr(mpi_module, "largest_active_batch_job", lambda site_id, exclude: 0)
    source = ProbedSource([[_job(1)]])
    mode, updater, pool = make_mode(tmp_path, source)
    mode._probe_oversized = True
    try:
        with running(mode):
            run_job_1_until_an_acquire_waits(source, updater, pool)  # then a waiting acquire is out
    finally:
        source.release()
    assert source.probes == 1 and source.waits_before_probe == 0, (source.probes, source.calls)
