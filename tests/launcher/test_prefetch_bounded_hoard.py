"""The serial mode's prefetcher leases what the partition can start now plus a short lookahead, not a
fixed number of jobs per CPU: a full launcher holds only a handful beyond what runs, so that the
rest stays visible to the elastic queue (runnable jobs no launcher holds) and to other BatchJobs.

The prefetch thread's loop (:meth:`Prefetcher._run`) runs on the test's thread against a simulated
serial loop (:class:`Loop`): it takes the prepared jobs, places them with a real NodeManager and
reports what it holds as :class:`~balsam.launcher.modes.serial_worker.Master` does, on every idle
wait of the prefetcher (a turn of the loop). The clock is the test's: no timing.
"""

from __future__ import annotations

import threading
import time
import types
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes import serial_worker
from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager
from balsam.launcher.prefetch import Prefetcher
from balsam.platform import NodeInfo


class FakeJob:
    def __init__(self, job_id: int) -> None:
        self.id = job_id
        self.wall_time_min = 0


class FakeLease:
    def __init__(self, count: int) -> None:
        self.jobs = deque(FakeJob(i) for i in range(1, count + 1))
        self.calls: list[int] = []
        #: Called when an acquire finds no job: the loop's turn (it runs while the prefetcher waits).
        self.when_dry: Callable[[], None] = lambda: None

    def acquire(self, count: int, **kwargs: Any) -> list[FakeJob]:
        self.calls.append(count)
        if not self.jobs:
            self.when_dry()
        return [self.jobs.popleft() for _ in range(min(count, len(self.jobs)))]

    def close(self, **kwargs: Any) -> None:
        pass


class Captured(Exception):
    pass


def production_settings(monkeypatch: Any, nodes: list[NodeInfo], per_rank: int = 64) -> dict[str, Any]:
    """The keyword arguments build_master gives the serial master's Prefetcher for ``nodes``."""
    seen: dict[str, Any] = {}

    def capture(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Captured()

    monkeypatch.setattr(serial_worker, "Prefetcher", capture)
    monkeypatch.setattr(serial_worker, "open_updater", lambda *args, **kwargs: types.SimpleNamespace())  # the master sets its on_gone
    config = {
        "launcher": {"serial_mode_prefetch_per_rank": per_rank, "delay_sec": 1, "default_postprocess_in_launcher": True},
        "nodes": [{"node_id": n.node_id, "hostname": n.hostname, "cpu_ids": list(n.cpu_ids)} for n in nodes],
        "data_path": ".",
    }
    wake = threading.Event()
    stop = StopConditions.for_launcher(60, time.time(), 60, wake)
    with pytest.raises(Captured):
        serial_worker.build_master(config, None, list(range(len(nodes))), stop, wake, lambda: None, lease=lambda: None)
    for name in ("on_ready", "remaining_min", "retry_sec", "acquire_kwargs"):
        seen.pop(name, None)
    return seen


class FakeWant:
    """The prefetcher's wake-up: its idle wait is a turn of the simulated loop."""

    def __init__(self, loop: "Loop") -> None:
        self.loop = loop

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.loop.turn()
        return True

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass


class Loop:
    """The serial master's part: take, place what fits, report the held count (and, with none held,
    the room), as Master.step does. ``ends``: jobs that end on each turn (0: long jobs)."""

    def __init__(self, prefetcher: Prefetcher, lease: FakeLease, node_manager: NodeManager, demand: Demand, *, turns: int,
                 ends: int = 0, clock: Optional[list[float]] = None, tick_sec: float = 0.05) -> None:
        self.prefetcher, self.node_manager, self.demand = prefetcher, node_manager, demand
        self.turns, self.ends, self.clock, self.tick_sec = turns, ends, clock, tick_sec
        self.held: deque[PreparedJob] = deque()
        self.running: deque[int] = deque()
        self.started = 0
        prefetcher._want = FakeWant(self)  # type: ignore[assignment]
        prefetcher.retry_sec = 0.0
        lease.when_dry = self.turn

    def turn(self) -> None:
        self.turns -= 1
        if self.turns <= 0:
            self.prefetcher.stop()
        if self.clock is not None:
            self.clock[0] += self.tick_sec
        for _ in range(min(self.ends, len(self.running))):
            self.node_manager.free(self.running.popleft())
        self.held.extend(self.prefetcher.take())
        while self.held:
            try:
                self.node_manager.assign(self.held[0].id, self.demand)
            except InsufficientResources:
                break
            self.running.append(self.held.popleft().id)
            self.started += 1
        if self.held:
            self.prefetcher.note_held(len(self.held), None, len(self.running))
        else:
            self.prefetcher.note_held(0, serial_worker.free_room(self.node_manager), len(self.running))


def prepared(job: FakeJob) -> PreparedJob:
    return PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={})


def nodes_of(count: int, cpus: int) -> list[NodeInfo]:
    return [NodeInfo(str(i), f"node{i}", list(range(cpus))) for i in range(count)]


def test_a_full_partition_of_long_jobs_leases_only_a_handful_beyond_what_runs(monkeypatch: Any) -> None:
    """The audit's campaign: 60 jobs of node_packing_count 2 on a 2-node partition of 8 CPUs (4 run
    at a time, for minutes). The prefetcher used to lease 64 per CPU (all 60: the elastic queue saw
    no backlog, a second BatchJob nothing to run)."""
    nodes = nodes_of(2, 8)
    settings = production_settings(monkeypatch, nodes)
    lease = FakeLease(60)
    fetcher = Prefetcher(lambda: lease, prepared, lambda demand: None, None, remaining_min=lambda: 60, **settings)
    loop = Loop(fetcher, lease, NodeManager(nodes), Demand(node_packing_count=2), turns=200)
    fetcher._run()
    assert loop.started == 4  # the partition is full, nothing ends
    leased = 60 - len(lease.jobs)
    assert leased == len(loop.running) + len(loop.held)
    assert leased <= 4 + 8  # what runs and a handful: the rest is the others' backlog
    assert len(loop.held) <= serial_worker.PREFETCH_FLOOR
    assert len(lease.calls) <= 3  # and it stopped asking once it held its lookahead


@pytest.mark.parametrize("tick_sec", [0.0001, 0.05, 0.3])
def test_a_full_partition_of_long_jobs_holds_the_floor_whatever_its_size(monkeypatch: Any, tick_sec: float) -> None:
    """64 nodes of 64 CPUs, one CPU a job (4,096 run): the lease is the partition plus the floor,
    however fast the first fill went on the test's clock (a fill counted as the start rate leased
    a quarter second of it ahead: it failed on a loaded CI host with the real clock)."""
    clock = [100.0]
    monkeypatch.setattr(prefetch.time, "monotonic", lambda: clock[0])
    nodes = nodes_of(64, 64)
    settings = production_settings(monkeypatch, nodes)
    lease = FakeLease(20000)
    fetcher = Prefetcher(lambda: lease, prepared, lambda demand: None, None, remaining_min=lambda: 60, **settings)
    loop = Loop(fetcher, lease, NodeManager(nodes), Demand(node_packing_count=64), turns=300, clock=clock,
                tick_sec=tick_sec)
    fetcher._run()
    assert loop.started == 64 * 64
    assert 0 < len(loop.held) <= serial_worker.PREFETCH_FLOOR
    assert 20000 - len(lease.jobs) == 64 * 64 + len(loop.held)
    assert max(lease.calls) <= settings["depth"]  # chunks of at most the depth


def test_free_room_is_leased_in_chunks_of_at_most_the_depth() -> None:
    """While the loop places every job it takes, the prefetcher keeps leasing the room it reports
    (here: 4 nodes of 16 one-CPU slots whose jobs all end each turn), in chunks bounded by ``depth``."""
    nodes = nodes_of(4, 16)
    lease = FakeLease(5000)
    fetcher = Prefetcher(lambda: lease, prepared, lambda demand: None, None, remaining_min=lambda: 60,
                         depth=40, floor=4, room=len(nodes))
    loop = Loop(fetcher, lease, NodeManager(nodes), Demand(node_packing_count=16), turns=40, ends=64)
    fetcher._run()
    assert max(lease.calls) == 40  # the room (up to 64 jobs) in chunks of the depth
    assert lease.calls.count(40) >= 10  # it kept leasing while there was room
    assert loop.started >= 10 * 40


def test_a_high_start_rate_raises_the_depth_to_the_lookahead(monkeypatch: Any) -> None:
    """Short tasks (every running job ends each 50 ms turn of the test's clock) on a full partition:
    the lease grows to a quarter second of work at the start rate, above the floor and the room,
    at most ``max_depth``."""
    clock = [100.0]
    monkeypatch.setattr(prefetch.time, "monotonic", lambda: clock[0])
    nodes = nodes_of(2, 64)
    lease = FakeLease(100000)  # more than 200 turns use: never dry (a dry lease waits retry_sec)
    fetcher = Prefetcher(lambda: lease, prepared, lambda demand: None, None, remaining_min=lambda: 60,
                         depth=128, floor=8, room=len(nodes), lookahead_sec=0.25, max_depth=2048)
    loop = Loop(fetcher, lease, NodeManager(nodes), Demand(node_packing_count=64), turns=200, ends=128, clock=clock)
    fetcher._run()
    assert fetcher.rate is not None and fetcher.rate > 1000  # 128 jobs each 50 ms: 2,560/s
    assert fetcher.depth_peak > 128 and fetcher.depth_peak <= 2048
    assert max(lease.calls) > 128  # leases larger than the room or a chunk: fewer acquires
    assert loop.started > 128


def test_free_room_counts_what_the_partition_can_start_now() -> None:
    nodes = nodes_of(2, 8)
    manager = NodeManager(nodes)
    assert serial_worker.free_room(manager) == 2  # nothing runs: one a node until the jobs' size is known
    manager.assign(1, Demand(node_packing_count=2))
    assert serial_worker.free_room(manager) == 1 + 2  # half-node jobs: one more here, two on the empty node
    manager.assign(2, Demand(node_packing_count=2))
    manager.assign(3, Demand(node_packing_count=2))
    manager.assign(4, Demand(node_packing_count=2))
    assert serial_worker.free_room(manager) == 0
    manager.free(4)
    assert serial_worker.free_room(manager) == 1
    manager = NodeManager(nodes)
    manager.assign(1, Demand(node_packing_count=8, threads_per_rank=2))  # 2 CPUs, an eighth of a node
    assert serial_worker.free_room(manager) == 3 + 4  # 6 idle CPUs hold 3 more, the empty node's 8 hold 4


def test_free_room_counts_free_gpus() -> None:
    """The review's case: 4 nodes of 64 CPUs and 4 GPUs running 1-GPU jobs. With every GPU busy the
    CPUs alone said 240 more (60 idle CPUs a node): the prefetcher leased jobs that could not start."""
    nodes = [NodeInfo(str(i), f"node{i}", list(range(64)), [str(g) for g in range(4)]) for i in range(4)]
    manager = NodeManager(nodes, cpu_ids_are_cores=False)
    for job_id in range(1, 17):
        manager.assign(job_id, Demand(node_packing_count=64, gpus_per_rank=1))
    assert serial_worker.free_room(manager) == 0
    for job_id in (1, 2, 16):
        manager.free(job_id)
    assert serial_worker.free_room(manager) == 3  # the three GPUs freed, not their nodes' idle CPUs
    assert serial_worker.free_room(manager, cap=2) == 2  # the prefetcher leases at most its depth of room
    half = NodeManager(nodes, cpu_ids_are_cores=False)
    half.assign(1, Demand(node_packing_count=64, gpus_per_rank=0.5))  # two such jobs share a GPU
    assert serial_worker.free_room(half) == 7 + 3 * 8


def test_float_residue_of_freed_gpu_shares_is_no_gpu_work() -> None:
    """Freeing 0.1 + 0.2 of a GPU left 2.8e-17 busy while a CPU job stayed on the node: the running
    jobs then counted as GPU work and the room of a node without GPUs was left out."""
    nodes = [NodeInfo("0", "g0", list(range(64)), ["0"]), NodeInfo("1", "c1", list(range(64)))]
    manager = NodeManager(nodes, cpu_ids_are_cores=False)
    manager.assign(1, Demand(node_packing_count=64))  # a CPU job keeps the GPU node busy
    manager.assign(2, Demand(node_packing_count=64, gpus_per_rank=0.1))
    manager.assign(3, Demand(node_packing_count=64, gpus_per_rank=0.2))
    manager.free(2)
    manager.free(3)
    assert manager.nodes[0].gpu_busy == 0.0
    assert serial_worker.free_room(manager) == 127  # 63 beside the CPU job, 64 on the node without GPUs
