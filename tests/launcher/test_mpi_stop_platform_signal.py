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

from balsam.launcher.modes.mpi import MPIMode
from balsam.launcher.node_manager import NodeFaults
from balsam.schemas import JobState

GRACE_SEC = 5.0


class FakePlatform:
    name = "fake-srun"

    def __init__(self, deliver: bool) -> None:
        self.deliver = deliver
        self.calls: list[tuple[list[int], int]] = []

    def signal_runs(self, job_ids, sig):
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
    assert pool.grace == GRACE_SEC
    assert updater.states == {1: JobState.run_timeout, 2: JobState.run_timeout}
