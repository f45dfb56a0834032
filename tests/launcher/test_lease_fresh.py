"""A launcher starts leased jobs only while its Session is known alive (balsam.client.lease,
"Known alive").

A launcher frozen longer than the server's session expiry (SIGSTOP, a file-system hang) resumed
with jobs leased ahead under a Session the server had expired, and started them before its next
heartbeat said so: another launcher ran them meanwhile. Now the lease notes when its last
successful request was sent; past the assumed expiry the modes start nothing and ask for a
heartbeat at once: a success lets them start, a 404 hands the held jobs over as gone first.

The lease over a fake client and a fake clock; the serial master and mpi mode over a scripted
lease whose freshness the test sets. No timed assertion: bounded waits against hangs only.
"""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import balsam.client.lease as lease_module
from balsam.client.lease import JobLease
from balsam.launcher.runner import ProcessPool
from launcher_helpers import FakePool
from test_lease_races import FakeUpdater, ScriptedLease, make_master, make_mode, turn_until, with_lease
from test_serial_master import FakeJob

WAIT_SEC = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Gone404(Exception):
    status_code = 404


class Unreachable(Exception):
    pass


class FakeClient:
    """Sessions 1, 2, ...; a heartbeat answers what ``tick_fails`` says (None: success)."""

    def __init__(self) -> None:
        self.sessions = 0
        self.puts: list[str] = []
        self.tick_fails: Optional[Exception] = None
        self.during_put: Optional[Callable[[], None]] = None

    def request(self) -> None:  # a client, not a factory
        pass

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        if path == "/sessions/":
            self.sessions += 1
            return {"id": self.sessions}
        return [{"id": 7}]

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        self.puts.append(path)
        if self.during_put is not None:
            self.during_put()
        if self.tick_fails is not None:
            raise self.tick_fails
        return {"id": int(path.rsplit("/", 1)[1]), "gone": []}

    def delete(self, path: str, **kw: Any) -> None:
        pass


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(lease_module, "time", types.SimpleNamespace(monotonic=clock.monotonic,
                                                                    perf_counter=time.perf_counter))
    monkeypatch.setattr(lease_module, "session_clock", clock.monotonic)  # the lease's clock (CLOCK_BOOTTIME)
    monkeypatch.delenv("BALSAM_SESSION_EXPIRE_SEC", raising=False)
    return clock


def test_the_lease_is_fresh_until_the_assumed_expiry_of_its_last_successful_request(clock: Clock) -> None:
    client = FakeClient()
    lease = JobLease(client, 1, tick_period=10, heartbeat_thread=False)
    assert lease.expiry_sec == lease_module.FRESH_TICKS * 10
    assert lease.fresh()
    clock.now += lease.expiry_sec - 10 - 0.01  # the margin: one period
    assert lease.fresh()
    clock.now += 0.02
    assert not lease.fresh()
    client.tick_fails = Unreachable("no route to host")
    with pytest.raises(Unreachable):
        lease.tick()
    assert not lease.fresh(), "a heartbeat that failed says nothing about the Session"
    client.tick_fails = None
    sent = clock.now
    lease.tick()
    assert lease.fresh() and lease.fresh_until() == sent + lease.expiry_sec - 10
    clock.now += lease.expiry_sec
    lease.acquire(1)  # an acquire heartbeats the Session too
    assert lease.fresh()


def test_a_shorter_expiry_in_the_environment_is_assumed(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", "6")
    lease = JobLease(FakeClient(), 1, tick_period=10, heartbeat_thread=False)
    assert lease.expiry_sec == 6
    clock.now += 6 - 6 / 4 + 0.01
    assert not lease.fresh()


def test_a_lost_session_is_fresh_again_only_after_its_held_jobs_were_handed_over(clock: Clock) -> None:
    client = FakeClient()
    lease = JobLease(client, 1, tick_period=1, heartbeat_thread=False)
    lease.acquire(1)
    fresh_when_handed: list[bool] = []
    lease.watch(lambda: [7], lambda ids, as_of: fresh_when_handed.append(lease.fresh()), generation=True)
    clock.now += 100
    client.tick_fails = Gone404("Session 1 not found")
    assert lease.tick() == [7]
    assert lease.session_id == 2
    assert fresh_when_handed == [False], "the lease was fresh before the lost jobs were handed over"
    assert lease.fresh() and lease.lost_generation == 1


def test_check_fresh_asks_the_heartbeat_thread_for_a_heartbeat_and_wakes_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", "0.4")
    client = FakeClient()
    lease = JobLease(client, 1, tick_period=1000)  # its own heartbeats would come much later
    try:
        deadline = time.monotonic() + WAIT_SEC
        while lease.fresh():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        wake = threading.Event()
        asked = threading.Event()
        client.during_put = asked.set
        assert not lease.check_fresh(wake)
        assert wake.wait(WAIT_SEC) and asked.is_set()
        assert client.puts == ["/sessions/1"]
    finally:
        lease.close()


class FreshnessLease(ScriptedLease):
    """A scripted lease whose Session the test declares alive or lost (JobLease's check_fresh and watch)."""

    def __init__(self) -> None:
        super().__init__()
        self.is_fresh = True
        self.asked = 0
        self.lost_generation = 0
        self.wakes: list[threading.Event] = []
        self.held: Callable[[], Any] = list
        self.on_gone: Callable[..., None] = lambda ids, as_of: None

    def watch(self, held_ids: Callable[[], Any], on_gone: Callable[..., None], *, generation: bool = False) -> None:
        self.held, self.on_gone = held_ids, on_gone

    def check_fresh(self, wake: Optional[threading.Event] = None) -> bool:
        if not self.is_fresh:
            self.asked += 1
            if wake is not None and wake not in self.wakes:
                self.wakes.append(wake)
        return self.is_fresh

    def heartbeat_answered(self) -> None:
        self.is_fresh = True
        for wake in self.wakes:
            wake.set()

    def session_lost(self) -> list[int]:
        """What JobLease does when a heartbeat finds its Session gone: the held jobs go to on_gone,
        then the lease is fresh (the new Session)."""
        self.lost_generation = self.generation
        held = sorted(set(self.held()))
        self.on_gone(held, self.generation)
        self.heartbeat_answered()
        return held


def _serial(tmp_path: Path) -> tuple[Any, Any, FreshnessLease]:
    lease = FreshnessLease()
    master, updater = make_master(tmp_path, lease, ProcessPool)
    master.gone.attach(lease)
    return master, updater, lease


def test_the_serial_master_starts_no_job_while_the_lease_is_stale_and_starts_it_after_a_heartbeat(tmp_path: Path) -> None:
    master, updater, lease = _serial(tmp_path)
    lease.is_fresh = False
    lease.batches.append([FakeJob(1)])
    try:
        turn_until(master, lambda: [p.id for p in master.pending] == [1] and lease.asked >= 3,
                   "job 1 was not taken, or no heartbeat was asked for")
        assert updater.states(1) == [] and master.pool.job_ids() == [], "a job was started under a stale lease"
        lease.heartbeat_answered()
        turn_until(master, lambda: "RUN_DONE" in updater.states(1), "job 1 did not run after the heartbeat")
    finally:
        master.shutdown("test over")
    assert updater.states(1) == ["RUNNING", "RUN_DONE"]


def test_the_serial_master_drops_the_jobs_of_a_session_found_gone_instead_of_starting_them(tmp_path: Path) -> None:
    master, updater, lease = _serial(tmp_path)
    lease.is_fresh = False
    lease.batches.append([FakeJob(1), FakeJob(2)])
    try:
        turn_until(master, lambda: [p.id for p in master.pending] == [1, 2], "jobs 1 and 2 were not taken")
        assert lease.session_lost() == [1, 2]
        turn_until(master, lambda: not master.pending, "the lost jobs were not dropped")
        # Acquired under the lost Session, still on their way to the loop: not started either.
        lease.generation = lease.lost_generation - 1
        lease.batches.append([FakeJob(3)])
        turn_until(master, lambda: not lease.batches and not master.prefetcher._ready, "job 3 was not handed to the loop")
        master.step()
        assert not master.pending and 3 not in master.gone.copies
    finally:
        master.shutdown("test over")
    assert all(updater.states(j) == [] for j in (1, 2, 3)), "a job of the lost Session was started"


class Source:
    """mpi mode's job source: job 1 (and 2) once, then nothing; freshness as the test says."""

    def __init__(self, jobs: list[int]) -> None:
        self.lease = FreshnessLease()
        self.jobs = jobs
        self.generation = 0

    def acquire(self, count: int, **kw: Any) -> list[dict]:
        if not self.jobs:
            return []
        self.generation += 1
        self.lease.generation = self.generation
        jobs, self.jobs = self.jobs, []
        return [{"id": j} for j in jobs]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lease, name)


def _mpi(tmp_path: Path, jobs: list[int]) -> tuple[Any, Source, FakeUpdater, threading.Thread]:
    mode = make_mode(tmp_path, delay_sec=0.01)
    source = Source(jobs)
    source.lease.is_fresh = False
    updater = FakeUpdater()
    with_lease(mode, source, updater, [])
    runner = threading.Thread(target=mode.run, daemon=True)
    runner.start()
    return mode, source, updater, runner


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SEC
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_mpi_mode_starts_no_job_while_the_lease_is_stale_and_starts_it_after_a_heartbeat(tmp_path: Path) -> None:
    mode, source, updater, runner = _mpi(tmp_path, [1])
    try:
        _wait(lambda: [p.id for p in mode.pending] == [1] and source.lease.asked >= 3, "job 1 was not taken")
        assert mode.pool.starts == [], "a job was started under a stale lease"
        source.lease.heartbeat_answered()
        _wait(lambda: mode.pool.starts == [1], "job 1 did not start after the heartbeat")
    finally:
        mode.request_stop("signal 15")
        runner.join(WAIT_SEC)
    assert not runner.is_alive()


def test_mpi_mode_drops_the_jobs_of_a_session_found_gone_instead_of_starting_them(tmp_path: Path) -> None:
    mode, source, updater, runner = _mpi(tmp_path, [1, 2])
    try:
        _wait(lambda: [p.id for p in mode.pending] == [1, 2] and source.lease.asked >= 3, "jobs were not taken")
        assert source.lease.session_lost() == [1, 2]
        _wait(lambda: not mode.pending, "the lost jobs were not dropped")
    finally:
        mode.request_stop("signal 15")
        runner.join(WAIT_SEC)
    assert not runner.is_alive()
    assert mode.pool.starts == [], "a job of the lost Session was started"
    assert updater.puts == []


class HandOverPool(FakePool):
    """A FakePool that queues hand-overs; the test says when the spawner started one."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__(wake)
        self.can_queue = True
        self.cancelled: list[int] = []
        self._started: list[tuple[int, int, float]] = []

    def queue_after(self, after_id: int, job_id: int, cmd: str, workdir: Any, env: dict) -> bool:
        self.queued[job_id] = after_id
        return True

    def cancel(self, job_id: int) -> None:
        self.cancelled.append(job_id)  # too late: the spawner started it already (below)

    def spawner_started(self, job_id: int) -> None:
        after_id = self.queued.pop(job_id)
        self.running[job_id] = True
        self._started.append((after_id, job_id, time.time()))

    def take_started(self) -> list:
        started, self._started = self._started, []
        return started


def test_a_hand_over_the_spawner_started_before_its_cancel_as_gone_is_ended_at_once(tmp_path: Path) -> None:
    """The lost Session's jobs: 1 runs, 2 is queued behind it in the spawner. The gone answer ends 1
    and cancels 2, but the spawner started 2 as 1 exited, before the cancel reached it: the start
    comes back with the next reap, and 2 must be ended then, without a RUNNING (not left running
    until a later heartbeat names it again)."""
    from balsam.launcher.app_run import PreparedJob
    from balsam.launcher.node_manager import Demand

    mode = make_mode(tmp_path)
    mode.pool = HandOverPool(mode.wake)
    mode.handover.pool = mode.pool
    updater = FakeUpdater()
    whole_node = [PreparedJob(job=None, id=i, workdir=Path("."), cmdline="true", env={}, demand=Demand()) for i in (1, 2)]
    mode._take(whole_node, updater)
    mode._start_pending(updater)
    assert mode.pool.starts == [1] and mode._queue_behind(updater) == 1 and 2 in mode.handover.queued
    mode.gone._arrived([1, 2], 10)  # what the lease hands over when it finds the Session gone
    mode._end_gone()
    assert mode.pool.ended == [1] and mode.pool.cancelled == [2]
    mode.pool.spawner_started(2)  # 1 exited (-15) and the spawner started 2 before the cancel came
    mode._reap(updater)
    assert 2 in mode.pool.ended, "a started hand-over of a gone job was left running"
    mode._reap(updater)
    assert not mode.pool.running and not mode.gone.ending and not mode.node_manager.placements
    assert [state for job_id, state in updater.puts if job_id == 1] == ["RUNNING"]  # nothing after the gone answer
    assert [state for job_id, state in updater.puts if job_id == 2] == []


class DeadlinePool(HandOverPool):
    def __init__(self, wake: Any) -> None:
        super().__init__(wake)
        self.deadlines: dict[int, Optional[float]] = {}

    def queue_after(self, after_id: int, job_id: int, cmd: str, workdir: Any, env: dict,
                    deadline: Optional[float] = None) -> bool:
        self.deadlines[job_id] = deadline
        return super().queue_after(after_id, job_id, cmd, workdir, env)


def test_mpi_mode_queues_a_hand_over_with_the_leases_deadline(tmp_path: Path) -> None:
    """As serial mode: the spawner starts a queued job only while the Session is known alive."""
    from balsam.launcher.app_run import PreparedJob
    from balsam.launcher.node_manager import Demand

    mode = make_mode(tmp_path)
    mode.pool = DeadlinePool(mode.wake)
    mode.handover.pool = mode.pool
    updater = FakeUpdater()
    mode._take([PreparedJob(job=None, id=i, workdir=Path("."), cmdline="true", env={}, demand=Demand()) for i in (1, 2)],
               updater)
    mode._start_pending(updater)
    source = types.SimpleNamespace(fresh_until=lambda: 1234.5)
    assert mode._queue_behind(updater, source) == 1
    assert mode.pool.deadlines == {2: 1234.5}
