"""mpi mode's stop on a platform that delivers the stop's SIGTERM itself (``Platform.signal_runs``;
Perlmutter: srun SIGKILLs its step's tasks when it gets SIGTERM, so the signal goes through
``scancel --signal``). The launcher must wait up to the grace for the runs the platform signalled
BEFORE it signals the process groups: srun's group signalled at once would SIGKILL the apps in the
middle of their checkpoint. Fakes: the platform, the process pool and the status updater."""

from __future__ import annotations

import signal
import threading
import time
import types

from balsam.launcher.modes import mpi as mpi_module
from balsam.launcher.modes.mpi import MPIMode
from balsam.launcher.node_manager import NodeFaults
from balsam.schemas import JobState

GRACE_SEC = 5.0


class FakePlatform:
    name = "fake-srun"

    def __init__(self, deliver: bool) -> None:
        self.deliver = deliver
        self.calls: list[tuple[list[int], int]] = []

    def signal_runs(self, job_ids, sig, timeout=None):
        self.calls.append((sorted(job_ids), sig))
        return set(job_ids) if self.deliver else set()


class FakePool:
    """Jobs 1 and 2 run; once the platform has signalled them, job 1 traps the SIGTERM and exits 0
    (its checkpoint saved), job 2 dies of it (an exit by a signal: held in the pool a moment)."""

    def __init__(self, platform: FakePlatform) -> None:
        self.platform = platform
        self.running = {1: object(), 2: object()}
        self.held: dict[int, float] = {}
        self.events: list[str] = []

    def job_ids(self):
        return list(self.running)

    def reap(self):
        if not self.platform.calls or not self.platform.deliver:
            return []
        self.events.append("reap")
        finished = []
        if 1 in self.running:
            del self.running[1]
            finished.append((1, 0, "", time.time()))
        self.held[2] = time.monotonic()
        return finished

    def end(self, job_ids, grace_sec):
        self.events.append(f"end {sorted(job_ids)}")

    def terminate_all(self, grace_sec):
        self.events.append(f"terminate_all (ran: {sorted(self.running)})")
        self.grace = grace_sec
        victims = sorted(self.running)
        self.running.clear()
        self.held.clear()
        return victims, []


class FakeUpdater:
    def __init__(self) -> None:
        self.states: dict[int, JobState] = {}

    def put(self, job_id, state, **_fields):
        self.states[job_id] = state

    def put_updates(self, updates):
        for update in updates:
            self.states[update["id"]] = JobState(update["state"])


def _mode(deliver: bool) -> tuple[MPIMode, FakePlatform, FakePool]:
    platform = FakePlatform(deliver)
    pool = FakePool(platform)
    mode = object.__new__(MPIMode)
    mode.context = types.SimpleNamespace(platform=platform, batch_job_id=None)
    mode.pool = pool
    mode.countdown = types.SimpleNamespace(grace_sec=GRACE_SEC)
    mode.stop = types.SimpleNamespace(requested=False, requested_at=None, reason=None)
    mode.wake = threading.Event()
    mode.faults = NodeFaults(1)
    mode.handover = types.SimpleNamespace(queued={}, forget_queued=lambda: None)
    mode.gone = types.SimpleNamespace(ending=False, successors={}, ready={})
    mode.site_faults = types.SimpleNamespace(given_back=[])
    mode.pending = []
    mode.too_late = []
    mode._postprocess_on_exit = set()
    mode._stopped_at = time.time()  # a wall-time stop, seen by the loop just now
    return mode, platform, pool


def test_runs_signalled_by_the_platform_end_before_the_groups_are_signalled():
    mode, platform, pool = _mode(deliver=True)
    updater = FakeUpdater()
    mode._shutdown(updater, "wall time")
    assert platform.calls == [([1, 2], signal.SIGTERM)]
    # job 1 exited (and job 2 died of the platform's SIGTERM) before any process group was signalled
    assert pool.events[0] == "reap"
    assert pool.events[-1] == "terminate_all (ran: [2])"
    # every run got the signal from the platform: what is left gets only what remains of the grace
    assert pool.grace < GRACE_SEC
    # an exit after the launcher's stop is the stop's doing, its own code whatever (rule (a))
    assert updater.states == {1: JobState.run_timeout, 2: JobState.run_timeout}


def test_without_delivery_the_groups_are_signalled_at_once_with_the_whole_grace():
    mode, platform, pool = _mode(deliver=False)
    updater = FakeUpdater()
    mode._shutdown(updater, "wall time")
    assert platform.calls == [([1, 2], signal.SIGTERM)]
    assert pool.events == ["terminate_all (ran: [1, 2])"]
    assert 0 < pool.grace <= GRACE_SEC
    assert updater.states == {1: JobState.run_timeout, 2: JobState.run_timeout}


# -- the stop's time budget, on a fake clock: the platform's calls and the wait advance it ----------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class ClockWake:
    """``mode.wake``: a wait passes its whole timeout on the clock (no run ends by itself)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def wait(self, timeout):
        self.clock.now += timeout
        return False

    def clear(self):
        pass


class SlowPlatform:
    """Delivers to the jobs in ``reaches``, its calls taking ``takes`` seconds of the clock."""
    name = "slow-srun"

    def __init__(self, clock: Clock, reaches: set[int], takes: float, events: list[str]) -> None:
        self.clock, self.reaches, self.takes, self.events = clock, reaches, takes, events
        self.calls: list[tuple[list[int], int, float]] = []

    def signal_runs(self, job_ids, sig, timeout=None):
        self.events.append(f"signal {sorted(job_ids)} {signal.Signals(sig).name}")
        self.calls.append((sorted(job_ids), sig, timeout))
        self.clock.now += self.takes if timeout is None else min(self.takes, timeout)  # it honours the timeout
        return set(job_ids) & self.reaches


class StuckPool:
    """Jobs 1 and 2 run and never end by themselves (a checkpoint longer than the grace); job 3 is
    queued behind job 1 (a hand-over)."""

    def __init__(self, clock: Clock, events: list[str]) -> None:
        self.clock, self.events = clock, events
        self.running = {1: object(), 2: object()}
        self.held: dict[int, float] = {}
        self.ended: list[tuple[list[int], float, float]] = []

    def job_ids(self):
        return list(self.running)

    def cancel(self, job_id):
        self.events.append(f"cancel {job_id}")

    def reap(self):
        return []

    def end(self, job_ids, grace_sec):
        self.events.append(f"end {sorted(job_ids)}")
        self.ended.append((sorted(job_ids), grace_sec, self.clock.now))

    def terminate_all(self, grace_sec):
        self.events.append(f"terminate_all (ran: {sorted(self.running)})")
        self.grace = grace_sec
        self.terminated_at = self.clock.now
        victims = sorted(self.running)
        self.running.clear()
        return victims, []


def _clocked_mode(monkeypatch, reaches: set[int], takes: float):
    clock = Clock()
    monkeypatch.setattr(mpi_module, "time", types.SimpleNamespace(monotonic=clock.monotonic, time=time.time))
    events: list[str] = []
    platform = SlowPlatform(clock, reaches, takes, events)
    mode, _platform, _pool = _mode(deliver=True)
    pool = StuckPool(clock, events)
    mode.context = types.SimpleNamespace(platform=platform, batch_job_id=None)
    mode.pool = pool
    mode.wake = ClockWake(clock)
    mode.handover = types.SimpleNamespace(queued={3: 1}, forget_queued=lambda: None)
    mode._note_handovers = lambda updater: None
    return mode, platform, pool, clock


def test_runs_still_there_at_the_deadline_get_sigkill_from_the_platform_and_srun_a_moment(monkeypatch):
    mode, platform, pool, clock = _clocked_mode(monkeypatch, reaches={1, 2}, takes=0.0)
    start = clock.now
    mode._shutdown(FakeUpdater(), "wall time")
    # the grace spent waiting for the SIGTERMed runs: the platform SIGKILLs their steps before srun's
    # group is signalled (a SIGKILLed srun may leave its step's app running)...
    assert pool.events[-2:] == ["signal [1, 2] SIGKILL", "terminate_all (ran: [1, 2])"]
    assert clock.now - start >= GRACE_SEC
    # ...and srun still gets a moment between its SIGTERM and SIGKILL to end its step
    assert pool.grace == mpi_module.STOP_MIN_GRACE_SEC


def test_runs_the_platform_did_not_reach_are_signalled_at_once_within_one_grace(monkeypatch):
    mode, platform, pool, clock = _clocked_mode(monkeypatch, reaches={1}, takes=2.0)
    start = clock.now
    mode._shutdown(FakeUpdater(), "wall time")
    # the platform's calls get the grace as their deadline
    assert platform.calls[0] == ([1, 2], signal.SIGTERM, GRACE_SEC)
    # job 2 got no SIGTERM from the platform: its group gets one as soon as the platform has answered,
    # with what is left of the grace (not after a wait of the whole grace)
    assert pool.ended == [([2], GRACE_SEC - 2.0, start + 2.0)]
    # the whole stop stays within the grace (plus srun's moment): not the grace again for terminate_all
    assert pool.terminated_at + pool.grace <= start + GRACE_SEC + mpi_module.STOP_MIN_GRACE_SEC


def test_a_slow_failed_delivery_leaves_terminate_all_only_the_rest_of_the_grace(monkeypatch):
    mode, platform, pool, clock = _clocked_mode(monkeypatch, reaches=set(), takes=3.0)
    mode._shutdown(FakeUpdater(), "wall time")
    assert pool.events[-1] == "terminate_all (ran: [1, 2])"
    assert pool.grace == GRACE_SEC - 3.0


def test_queued_handovers_are_cancelled_before_the_platform_is_asked(monkeypatch):
    for reaches in ({1, 2}, set()):
        mode, platform, pool, clock = _clocked_mode(monkeypatch, reaches=reaches, takes=1.0)
        mode._shutdown(FakeUpdater(), "wall time")
        # the spawner would start job 3 during the platform's calls (and the wait) otherwise
        assert pool.events[:2] == ["cancel 3", "signal [1, 2] SIGTERM"]
