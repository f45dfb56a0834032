"""The serial master's turn with every CPU busy: each exit asks for a placement pass (``_try_start``),
also one whose CPUs passed to the job queued behind it (hand-over), and in a full partition that
pass placed nothing, at ~20 us a turn (a refused ``assign`` per job). The turn now makes the pass's
only change itself (the first ``MAX_PLACEMENT_MISSES`` pending jobs to the back) without calling it,
and calls it as before as soon as a CPU is idle. Driven turn by turn over fakes: no process, no
server, no timing."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes import serial_worker
from balsam.launcher.modes.serial_worker import MAX_PLACEMENT_MISSES, Master
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.placement import place_pending
from balsam.platform import NodeInfo


class Job:
    def __init__(self, job_id: int) -> None:
        self.id = job_id


class Pool:
    """A pool with nothing to report: the turn looks only at the placement."""

    can_queue = False

    def __init__(self) -> None:
        self.running: dict[int, Any] = {}
        self.held: dict[int, Any] = {}
        self.events = False
        self.started: list[int] = []

    def job_ids(self) -> list[int]:
        return list(self.running)

    def reap(self) -> list:
        return []

    def start(self, job_id: int, *args: Any, **kwargs: Any) -> None:
        self.started.append(job_id)
        self.running[job_id] = object()


class Prefetcher:
    lease = None
    taken_generation = 0
    may_release = False
    may_give_back = False
    depth = 64
    lean = False
    floor = 8
    backlog = 0
    exhausted = False
    error = None

    def take(self) -> list:
        return []

    def note_held(self, *args: Any) -> None:
        pass


class Updater:
    def put(self, *args: Any, **kwargs: Any) -> None:
        pass

    def put_updates(self, *args: Any) -> None:
        pass

    def flush(self, timeout: Any = None) -> bool:
        return True

    def send_soon(self) -> None:
        pass


def prepared(job_id: int, tmp_path: Path) -> PreparedJob:
    return PreparedJob(job=Job(job_id), id=job_id, workdir=tmp_path, cmdline="true", env={},
                       demand=Demand(node_packing_count=2))


def full_node(cpus: int = 2) -> NodeManager:
    """One node whose CPUs all run a job (ids 1000...)."""
    node_manager = NodeManager([NodeInfo("0", "node0", list(range(cpus)))])
    for job_id in range(1000, 1000 + cpus):
        node_manager.assign(job_id, Demand(node_packing_count=cpus))
    return node_manager


def master_over(node_manager: NodeManager, pending: list[PreparedJob]) -> Master:
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 60, wake)
    master = Master(node_manager=node_manager, rank_of_node=[0], transport=serial_worker.LocalTransport(), stop=stop,
                    wake=wake, pool=Pool(), prefetcher=Prefetcher(), updater=Updater(), platform=DefaultPlatform(),
                    launch_hook=lambda **kw: None)
    master.pending.extend(pending)
    master.started = 1  # not the first start (no first-RUNNING flush to fake)
    return master


@pytest.mark.parametrize("count", [3, MAX_PLACEMENT_MISSES, 20])
def test_a_full_node_turn_leaves_pending_as_the_pass_would_without_calling_it(tmp_path: Path, monkeypatch: Any,
                                                                               count: int) -> None:
    # What the pass itself does in this state: nothing placed, the first jobs moved to the back.
    expected = deque(prepared(i, tmp_path) for i in range(1, count + 1))
    assert place_pending(expected, full_node(), lambda p, pl: pytest.fail("placed on a full node"),
                         lambda j, r: None, max_misses=MAX_PLACEMENT_MISSES) == 0

    calls: list[int] = []
    real = serial_worker.place_pending
    monkeypatch.setattr(serial_worker, "place_pending", lambda *a, **k: calls.append(1) or real(*a, **k))
    master = master_over(full_node(), [prepared(i, tmp_path) for i in range(1, count + 1)])
    for turn in range(3):  # each exit handed over asks for a pass again
        master._try_start = True
        master.step()
        assert not master._try_start
        assert [p.id for p in master.pending] == [p.id for p in expected], turn
        expected.rotate(-min(len(expected), MAX_PLACEMENT_MISSES))
    assert calls == [] and master.pool.started == []


def test_an_idle_cpu_gets_the_placement_pass_as_before(tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[int] = []
    real = serial_worker.place_pending
    monkeypatch.setattr(serial_worker, "place_pending", lambda *a, **k: calls.append(1) or real(*a, **k))
    node_manager = full_node()
    node_manager.free(1001)  # one CPU idle
    master = master_over(node_manager, [prepared(i, tmp_path) for i in range(1, 6)])
    master._try_start = True
    master.step()
    assert calls == [1] and master.pool.started == [1]
    assert [p.id for p in master.pending] == [2, 3, 4, 5]


def test_a_node_full_by_occupancy_with_an_idle_cpu_still_gets_the_pass(tmp_path: Path, monkeypatch: Any) -> None:
    """Not open to placements (its occupancy is full) but with idle CPUs: a job of a tiny share may
    still fit within the occupancy's tolerance, so the pass runs (and judges it) as before."""
    calls: list[int] = []
    real = serial_worker.place_pending
    monkeypatch.setattr(serial_worker, "place_pending", lambda *a, **k: calls.append(1) or real(*a, **k))
    node_manager = NodeManager([NodeInfo("0", "node0", [0, 1, 2, 3])])
    node_manager.assign(1000, Demand())  # a whole-node job on one CPU: three idle, occupancy full
    assert serial_worker.no_idle_cpu(node_manager) is False
    master = master_over(node_manager, [prepared(i, tmp_path) for i in range(1, 4)])
    master._try_start = True
    master.step()
    assert calls == [1]


class CountingWake(threading.Event):
    """Records the loop's waits between its turns (returns at once: nothing to wait for here)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def wait(self, timeout: Any = None) -> bool:
        self.log.append("wait")
        return self.is_set()


@pytest.mark.parametrize("remote", [False, True])
def test_a_turn_that_did_something_is_followed_by_a_wait_not_by_an_empty_turn(tmp_path: Path, remote: bool) -> None:
    """A turn takes every chain of work to its end and anything that arrives meanwhile sets ``wake``,
    so the loop waits after a productive turn too (the wait returns at once if ``wake`` was set):
    the turn that followed at once found nothing in half of the turns. Other ranks' reports are
    polled, not signalled: with tasks on other ranks, the next turn still comes at once."""
    log: list[str] = []
    master = master_over(full_node(), [])
    master.wake = CountingWake(log)
    if remote:
        master.remote[7] = 1  # a task on rank 1
    turns = iter([1, 0, 1])

    def step() -> int:
        log.append("turn")
        return next(turns)

    master.step = step  # type: ignore[method-assign]
    master.stop_reason = lambda: "done" if log.count("turn") == 3 else None  # type: ignore[method-assign]
    master.shutdown = lambda reason: None  # type: ignore[method-assign]
    master.prefetcher.stop = lambda: None  # type: ignore[attr-defined]
    master.prefetcher.acquired = master.prefetcher.depth_peak = 0  # type: ignore[attr-defined]
    assert master.run() == "done"
    if remote:
        assert log == ["turn", "turn", "wait", "turn"]
    else:
        assert log == ["turn", "wait", "turn", "wait", "turn", "wait"]
