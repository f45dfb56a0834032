"""A serial worker rank that hangs (SIGSTOP, a node wedged in D state, a hung file system) rather
than dies: the master over a fake transport with an injected clock (no MPI, no server), the
worker's liveness reports, and the cap on the final collect at a stop. The end-to-end check with
real MPICH ranks is ``test_serial_hung_rank_e2e.py``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import Countdown, IdleTimer, StopConditions
from balsam.launcher.modes import serial_worker
from balsam.launcher.modes.serial_worker import Master, Worker
from balsam.launcher.node_manager import NodeManager
from balsam.launcher.prefetch import Prefetcher
from balsam.launcher.runner import ProcessPool
from balsam.platform import NodeInfo
from test_serial_master import FakeJob, FakeLease, FakeTransport, RecordingUpdater, _prepare, run_in_thread


class RecordedOnThread(list):
    """The master's ``record_nodes_out``'s texts, and the thread that handed each over (``threads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[threading.Thread] = []

    def append(self, text: str) -> None:  # type: ignore[override]
        super().append(text)
        self.threads.append(threading.current_thread())


class FakeClock:
    """Monotonic seconds the test sets (``now``) or that advance by ``step`` at every reading."""

    def __init__(self, start: float = 0.0, step: float = 0.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class HungTransport(FakeTransport):
    """FakeTransport that also records end requests and the ranks abandoned."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.ended: list[tuple[int, list[int]]] = []
        self.abandoned: list[int] = []

    def end_tasks(self, rank: int, job_ids: list[int], grace: float) -> None:
        self.ended.append((rank, list(job_ids)))

    def abandon(self, rank: int) -> None:
        self.abandoned.append(rank)


def make_master(tmp_path: Path, jobs: list[FakeJob], clock: FakeClock, *, nodes: int = 2, cpus: int = 2,
                idle_ttl: float = 0.3, wall_min: float = 10, start_time: Optional[float] = None,
                recorded: Optional[list[str]] = None, rank_of_node: Optional[list[int]] = None,
                prepare: Optional[Callable[[FakeJob], PreparedJob]] = None) -> tuple[Master, RecordingUpdater, HungTransport]:
    """``rank_of_node``: the rank serving each node (default: rank i on node i, the master on node 0);
    ``prepare``: the prefetcher's (default: the fake one of test_serial_master)."""
    infos = [NodeInfo(str(i), f"node{i}", list(range(cpus))) for i in range(nodes)]
    node_manager = NodeManager(infos)
    lease = FakeLease(jobs)
    updater = RecordingUpdater()
    wake = threading.Event()
    stop = StopConditions(Countdown(wall_min, start_time=start_time if start_time is not None else time.time()),
                          IdleTimer(idle_ttl), wake)
    transport = HungTransport(nodes)
    prefetcher = Prefetcher(lambda: lease, prepare or _prepare(tmp_path), node_manager.check_satisfiable, updater, depth=64,
                            remaining_min=stop.countdown.remaining_min, retry_sec=0.05, on_ready=wake.set,
                            acquire_kwargs={"serial_only": True}).start()
    rank_of_node = list(range(nodes)) if rank_of_node is None else rank_of_node
    master = Master(node_manager=node_manager, rank_of_node=rank_of_node, transport=transport, stop=stop, wake=wake,
                    pool=ProcessPool(5, wake=wake), prefetcher=prefetcher, updater=updater, platform=DefaultPlatform(),
                    launch_hook=lambda **kw: None, clock=clock,
                    record_nodes_out=(recorded.append if recorded is not None else None))
    return master, updater, transport


def _wait(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_silent_rank_holding_jobs_is_taken_out_its_jobs_timed_out_once_and_the_master_goes_idle(tmp_path: Path) -> None:
    clock = FakeClock()
    jobs = [FakeJob(i, "sleep 0.05") for i in range(1, 21)]
    recorded = RecordedOnThread()
    master, updater, transport = make_master(tmp_path, jobs, clock, recorded=recorded)
    thread, result = run_in_thread(master)
    try:
        # Node 1's two slots go to rank 1, which never reports (hung) ...
        _wait(lambda: len(transport.sent[1]) == 2)
        hung = sorted(t["id"] for t in transport.sent[1])
        # ... past the deadline (the clock jumps: no real wait).
        clock.now += serial_worker.RANK_SILENCE_SEC + 70
        _wait(lambda: all("RUN_TIMEOUT" in updater.states(j) for j in hung))
        # It wakes up: its late reports (and, at the stop, its final one) must not count.
        transport.inbox.append((1, {"done": [(j, 0, "", time.time()) for j in hung]}))
        _wait(lambda: 1 in master._spoke_again)
        thread.join(30)
    finally:
        if thread.is_alive():
            master.stop.request("test over")
            thread.join(30)
    assert result.get("reason") == "idle"  # the rank taken out no longer counts as busy
    for job_id in hung:
        assert updater.states(job_id) == ["RUNNING", "RUN_TIMEOUT"], job_id  # reported once, never flipped back
        reason = next(d["reason"] for j, s, d in updater.updates if j == job_id and s == "RUN_TIMEOUT")
        assert reason.startswith("serial worker rank 1 on node1 unresponsive for 100 s"), reason
        assert "its task there may still be running" in reason, reason  # it was not stopped with its rank
    for job in jobs:
        if job.id not in hung:
            assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id  # all on the master's node
    assert sorted(t["id"] for t in transport.sent[1]) == hung  # nothing more was sent to it
    assert transport.ended == [(1, hung)] and transport.abandoned == [1]
    assert master.node_manager.nodes[1].disabled and not master.remote
    assert 1 in master.ranks_out and 1 in master._spoke_again
    assert len(recorded) == 1 and recorded[0].startswith("serial worker rank 1 on node1 unresponsive for 100 s")
    # Handed to the note writer (which returns at once) on the master's loop thread: no thread of
    # its own per note (the writer keeps the order and retries; the process's exit waits for it).
    assert recorded.threads == [thread]


def _first_job_settles_first(tmp_path: Path, master_of: dict[str, Any]) -> Callable[[FakeJob], PreparedJob]:
    """A prepare that readies job 1 at once but every other job only once job 1 runs and the
    master's own pool runs nothing: the prefetcher hands a first job over alone (its start-up
    rule), and a prefetch thread that loses the CPU while the master starts, and reaps, that job
    on its own node leaves that node empty when the next jobs come (the CI run of 6 December)."""
    prepare = _prepare(tmp_path)

    def held(job: FakeJob) -> PreparedJob:
        if job.id != 1:
            _wait(lambda: "master" in master_of and "RUNNING" in master_of["updater"].states(1)
                  and not master_of["master"].pool.running)
        return prepare(job)

    return held


@pytest.mark.parametrize("ordering", ["as it comes", "first job settles first"])
def test_a_rank_that_keeps_reporting_is_never_taken_out(tmp_path: Path, ordering: str) -> None:
    """Its last report counts, not its first: reports a few seconds apart keep it in for good.

    Rank 1 serves node 0, the node placement fills first, so the first two jobs go to it whatever
    the order the prefetcher hands them over in. With rank 1 on node 1 (the default layout), rank 1
    got only one task whenever the master's node had emptied before the later jobs came (a short
    local task started, ended and reaped before the prefetcher had prepared the next ones): the
    master rightly fills its own free node first, and the wait for rank 1's two tasks never ended
    (``ordering="first job settles first"`` forces that order)."""
    clock = FakeClock()
    jobs = [FakeJob(i, "true") for i in range(1, 5)]
    master_of: dict[str, Any] = {}
    prepare = _first_job_settles_first(tmp_path, master_of) if ordering == "first job settles first" else None
    master, updater, transport = make_master(tmp_path, jobs, clock, rank_of_node=[1, 0], prepare=prepare)
    master_of.update(master=master, updater=updater)
    thread, result = run_in_thread(master)
    try:
        _wait(lambda: len(transport.sent[1]) == 2)
        assert sorted(t["id"] for t in transport.sent[1]) == [1, 2]  # node 0's two slots, the first jobs
        for _ in range(200):  # ten minutes of fake time
            clock.now += serial_worker.HEARTBEAT_SEC
            transport.inbox.append((1, {"done": []}))  # alive, its tasks still running
            _wait(lambda: not transport.inbox)
        assert not master.ranks_out and len(master.remote) == 2
        transport.inbox.append((1, {"done": [(t["id"], 0, "", time.time()) for t in transport.sent[1]]}))
        thread.join(30)
    finally:
        if thread.is_alive():
            master.stop.request("test over")
            thread.join(30)
    assert result.get("reason") == "idle"
    for job in jobs:
        assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id


class QuietPool:
    """A worker's pool with no task; ``reap`` returns one exit at its ``done_at``-th call."""

    running: dict[int, Any] = {}

    def __init__(self, done_at: int) -> None:
        self.calls = 0
        self.done_at = done_at

    def reap(self) -> list[tuple[int, int, str, float]]:
        self.calls += 1
        return [(7, 0, "", 1.0)] if self.calls == self.done_at else []

    def terminate_all(self, grace: float) -> tuple[list[int], list[Any]]:
        return [], []


class WorkerSide:
    """The worker's end of the transport: records each report with the (fake) time it was sent."""

    def __init__(self, clock: FakeClock, stop_after: int) -> None:
        self.clock = clock
        self.stop_after = stop_after
        self.sent: list[tuple[float, dict[str, Any]]] = []

    def receive(self) -> Optional[dict[str, Any]]:
        return {"stop": "test over", "grace": 0} if len(self.sent) >= self.stop_after else None

    def report(self, msg: dict[str, Any]) -> None:
        self.sent.append((self.clock.now, msg))

    def flush(self) -> None:
        pass


def test_the_worker_sends_an_empty_report_when_it_sent_nothing_for_the_heartbeat_period() -> None:
    clock = FakeClock(step=0.5)  # every reading is half a second later
    transport = WorkerSide(clock, stop_after=3)
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 60, wake)
    worker = Worker(transport, wake, stop, QuietPool(done_at=3), clock=clock)  # type: ignore[arg-type]
    assert worker.run() == 0
    period = serial_worker.HEARTBEAT_SEC
    # Started at 0.5; an exit reported at 1.5 (its send noted at 2.0) counts as a sign of life: the
    # next report is an empty one, a period later, and so on; then the stop's final report.
    assert transport.sent[0] == (1.5, {"done": [(7, 0, "", 1.0)]})
    assert transport.sent[1] == (2.0 + period, {"done": []})
    assert transport.sent[2] == (2.0 + 2 * period, {"done": []})
    assert transport.sent[3][1]["final"] is True and len(transport.sent) == 4


def test_the_final_collect_waits_grace_plus_10_s_but_never_past_the_allocation_end(tmp_path: Path) -> None:
    clock = FakeClock()
    start = 1000.0  # the countdown's clock (wall time): each stop below comes at a given moment on it
    long_run, _, _ = make_master(tmp_path / "a", [], clock, wall_min=60, start_time=start)
    assert long_run.final_collect_sec(3.0, start + 55) == 3.0 + serial_worker.FINAL_COLLECT_EXTRA_SEC
    # A one-minute allocation, 5 s before its end: what is left less the reserve for the last updates.
    near_end, _, _ = make_master(tmp_path / "b", [], clock, wall_min=1, start_time=start)
    assert 0 < 5 - serial_worker.FINAL_SEND_RESERVE_SEC < 3.0 + serial_worker.FINAL_COLLECT_EXTRA_SEC
    assert near_end.final_collect_sec(3.0, start + 55) == 5 - serial_worker.FINAL_SEND_RESERVE_SEC
    past_end, _, _ = make_master(tmp_path / "c", [], clock, wall_min=1, start_time=start)
    assert past_end.final_collect_sec(3.0, start + 70) == 0.0
    for master in (long_run, near_end, past_end):
        master.prefetcher.stop()
        master.prefetcher.join()


def test_a_stop_near_the_allocation_end_collects_the_last_reports_only_until_the_cap(tmp_path: Path) -> None:
    """A rank that never confirms the stop: its jobs are reported RUN_TIMEOUT once the capped wait
    is over (the fake clock makes the wait instant), before the launcher's backstop."""
    clock = FakeClock()
    jobs = [FakeJob(i, "sleep 30") for i in range(1, 5)]
    # A one-minute allocation (6 s margin, 3 s grace): its wall-time stop comes 6 s before its end.
    master, updater, transport = make_master(tmp_path, jobs, clock, wall_min=1, start_time=time.time() - 52, idle_ttl=60)
    end = master.stop.countdown.start_time + 60
    seen: list[float] = []
    collect = master._collect_final_reports

    def spy(reason: str, timeout: float) -> None:
        seen.append(timeout)
        collect(reason, timeout)

    master._collect_final_reports = spy  # type: ignore[method-assign]
    transport.stop_workers = lambda reason, grace: transport.stops.append((reason, grace))  # type: ignore[method-assign]
    thread, result = run_in_thread(master)
    try:
        _wait(lambda: master.started == 4)
        clock.step = 0.5  # from now on the wait for the last reports runs on fake time
        left = end - time.time()
        master.stop.request("wall time")
        thread.join(30)
    finally:
        if thread.is_alive():
            thread.join(30)
    assert result.get("reason") == "wall time"
    grace = master.stop.countdown.grace_sec
    assert seen and seen[0] <= left - serial_worker.FINAL_SEND_RESERVE_SEC < grace + 10  # not grace + 10 s
    for task in transport.sent[1]:
        assert updater.states(task["id"]) == ["RUNNING", "RUN_TIMEOUT"]
        reason = next(d["reason"] for j, s, d in updater.updates if j == task["id"] and s == "RUN_TIMEOUT")
        assert "worker did not report" in reason
