"""The hand-over bookkeeping (balsam.launcher.handover) over a scripted pool: no process, no server.

The pool's side (a spawner that starts a queued task when the one ahead exits) is tested with real
processes in test_spawner.py and test_serial_master.py; here, what the job modes do with its answers.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.handover import HandOver
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import NodeInfo

SMALL = Demand(node_packing_count=2)
WIDE = Demand(num_nodes=2)


class ScriptedPool:
    """What HandOver uses of a SpawnerPool; the test says what the spawner reported."""

    def __init__(self) -> None:
        self.can_queue = True
        self.events: deque = deque()
        self.held: dict[int, Any] = {}
        self.requests: list[tuple[int, int, str]] = []  # (after, job, command line)
        self.cancelled: list[int] = []
        self.refuse = False
        self.started: list[tuple[int, int, float]] = []
        self.dropped: list[int] = []

    def queue_after(self, after_id: int, job_id: int, cmd: str, workdir: Any, env: dict[str, str]) -> bool:
        if self.refuse:
            return False
        self.requests.append((after_id, job_id, cmd))
        return True

    def cancel(self, job_id: int) -> None:
        self.cancelled.append(job_id)

    def take_started(self) -> list[tuple[int, int, float]]:
        started, self.started = self.started, []
        return started

    def take_dropped(self) -> list[int]:
        dropped, self.dropped = self.dropped, []
        return dropped


def job(job_id: int, demand: Demand = SMALL) -> PreparedJob:
    return PreparedJob(job=None, id=job_id, workdir=Path(f"w/{job_id}"), cmdline=f"app {job_id}", env={}, demand=demand)


def command(prepared: PreparedJob, placement: Any) -> tuple[str, dict[str, str]]:
    return f"run {prepared.id} on {placement.hostnames[0]} cpus {list(placement.cpu_ids[0])}", {}


def setup(nodes: int = 1, cpus: int = 2, depth: int = 2, max_age_sec: float = 1.0) -> tuple[HandOver, ScriptedPool, NodeManager]:
    pool = ScriptedPool()
    nm = NodeManager([NodeInfo(str(i), f"node{i}", list(range(cpus))) for i in range(nodes)])
    return HandOver(pool, nm, depth=depth, max_age_sec=max_age_sec), pool, nm


def start(handover: HandOver, nm: NodeManager, prepared: PreparedJob) -> None:
    handover.started_local(prepared, nm.assign(prepared.id, prepared.demand))


def no_failure(job_id: int, reason: str) -> None:
    raise AssertionError(f"job {job_id} failed: {reason}")


def no_start(prepared: PreparedJob, when: float) -> None:
    raise AssertionError(f"job {prepared.id} started")


def test_jobs_queue_behind_running_ones_of_the_same_demand_up_to_the_depth_on_their_placement() -> None:
    handover, pool, nm = setup(depth=2)
    start(handover, nm, job(1))
    start(handover, nm, job(2))
    pending = deque(job(i) for i in range(3, 10))
    assert handover.queue_behind(pending, command, no_failure) == 4
    # Chains of two behind each running job, each rendered on the placement of the job it follows.
    cpu_of = {1: nm.placements[1].cpu_ids[0][0], 2: nm.placements[2].cpu_ids[0][0]}
    assert [(a, j) for a, j, _ in pool.requests] == [(1, 3), (3, 4), (2, 5), (5, 6)]
    assert pool.requests[0][2] == f"run 3 on node0 cpus [{cpu_of[1]}]"
    assert pool.requests[2][2] == f"run 5 on node0 cpus [{cpu_of[2]}]"
    assert set(handover.queued) == {3, 4, 5, 6} and [p.id for p in pending] == [7, 8, 9]
    assert handover.queue_behind(pending, command, no_failure) == 0  # every chain is full


def test_nothing_is_queued_behind_another_demand_an_old_job_held_resources_or_unread_events() -> None:
    handover, pool, nm = setup(nodes=2)
    start(handover, nm, job(1))
    pending = deque([job(2, WIDE), job(3)])
    assert handover.queue_behind(pending, command, no_failure) == 0  # the head of pending differs: order kept
    pending.popleft()
    pool.events.append(("e", 1, 0, 0.0, ""))  # an exit not read yet: a queued job could come back
    assert handover.queue_behind(pending, command, no_failure) == 0
    pool.events.clear()
    pool.held[1] = [0]  # the spawner holds its CPUs (ended, nothing queued): the loop places anew
    assert handover.queue_behind(pending, command, no_failure) == 0
    pool.held.clear()
    handover.local[1] = (handover.local[1][0], handover.local[1][1], time.monotonic() - 5)
    assert handover.queue_behind(pending, command, no_failure) == 0  # runs long: place elsewhere
    pool.can_queue = False  # a dead spawner, or the in-process pool
    handover.local[1] = (handover.local[1][0], handover.local[1][1], time.monotonic())
    assert handover.queue_behind(pending, command, no_failure) == 0
    pool.can_queue = True
    assert handover.queue_behind(pending, command, no_failure) == 1


def test_a_request_the_pool_refuses_leaves_the_job_pending_and_a_bad_one_fails_alone() -> None:
    handover, pool, nm = setup()
    start(handover, nm, job(1))
    failed: list[int] = []
    pending = deque([job(2), job(3)])

    def flaky(prepared: PreparedJob, placement: Any) -> tuple[str, dict[str, str]]:
        if prepared.id == 2:
            raise ValueError("no such app")
        return command(prepared, placement)

    pool.refuse = True
    assert handover.queue_behind(pending, command, no_failure) == 0 and [p.id for p in pending] == [2, 3]
    pool.refuse = False
    assert handover.queue_behind(pending, flaky, lambda job_id, reason: failed.append(job_id)) == 1
    assert failed == [2] and set(handover.queued) == {3} and not pending


def test_a_started_job_takes_over_the_placement_when_the_exit_ahead_is_settled_in_either_order() -> None:
    handover, pool, nm = setup(depth=1)
    start(handover, nm, job(1))
    start(handover, nm, job(2))
    pending = deque([job(3), job(4)])
    handover.queue_behind(pending, command, no_failure)
    placement_1, placement_2 = nm.placements[1], nm.placements[2]
    running: list[tuple[int, float]] = []
    on_start = lambda prepared, when: running.append((prepared.id, when))  # noqa: E731

    # Job 1 exits and 3 starts on its CPUs; the loop notes the start before settling the exit.
    pool.started = [(1, 3, 100.0)]
    assert handover.note_handovers(pending, on_start) == (1, 0)
    handover.release(1)
    assert running == [(3, 100.0)] and 1 not in nm.placements
    assert nm.placements[3].cpu_ids == placement_1.cpu_ids
    # Job 2's exit is settled first (its queued job's fate unknown): its CPUs are kept, then passed on.
    handover.release(2)
    assert nm.placements[2] == placement_2 and handover.deferred == {2}
    pool.started = [(2, 4, 101.0)]
    handover.note_handovers(pending, on_start)
    assert nm.placements[4].cpu_ids == placement_2.cpu_ids and not handover.deferred and 2 not in nm.placements
    assert running[-1] == (4, 101.0) and handover.handed_over == 2 and not handover.queued
    # The handed-over jobs are heads now: the next jobs queue behind them.
    pending.extend([job(5), job(6)])
    assert handover.queue_behind(pending, command, no_failure) == 2
    assert {(a, j) for a, j, _ in pool.requests[-2:]} == {(3, 5), (4, 6)}


def test_jobs_given_back_unstarted_return_to_the_front_of_pending_in_order_and_free_what_was_kept() -> None:
    handover, pool, nm = setup(depth=2)
    start(handover, nm, job(1))
    pending = deque([job(2), job(3), job(9, WIDE)])
    handover.queue_behind(pending, command, no_failure)
    assert set(handover.queued) == {2, 3}
    handover.release(1)  # its exit settled while 2 was in flight: CPUs kept for it
    assert handover.deferred == {1} and 1 in nm.placements
    pool.dropped = [2, 3]  # the spawner got the request after the exit and it ran no task: back
    assert handover.note_handovers(pending, no_start) == (0, 2)
    assert [p.id for p in pending] == [2, 3, 9] and not handover.queued and not handover.behind
    assert not handover.deferred and not nm.placements and handover.given_back == 2


def test_the_queue_behind_a_long_job_is_cancelled_once() -> None:
    handover, pool, nm = setup(depth=2, max_age_sec=0.2)
    start(handover, nm, job(1))
    handover.queue_behind(deque([job(2), job(3)]), command, no_failure)
    handover.cancel_behind_old()
    assert pool.cancelled == []  # young
    handover.local[1] = (handover.local[1][0], handover.local[1][1], time.monotonic() - 1)
    handover._next_age_check = 0.0
    handover.cancel_behind_old()
    handover._next_age_check = 0.0
    handover.cancel_behind_old()
    assert pool.cancelled == [2]  # the head of the chain (the spawner drops what is behind it too)


def test_a_stop_forgets_what_is_queued_and_frees_what_was_kept_for_it() -> None:
    handover, pool, nm = setup()
    start(handover, nm, job(1))
    handover.queue_behind(deque([job(2)]), command, no_failure)
    handover.release(1)
    handover.forget_queued()
    assert not handover.queued and not handover.behind and not handover.deferred and not nm.placements


@pytest.mark.parametrize("depth", [0, 1])
def test_depth_bounds_each_chain(depth: int) -> None:
    handover, pool, nm = setup(depth=depth)
    start(handover, nm, job(1))
    pending = deque([job(2), job(3)])
    assert handover.queue_behind(pending, command, no_failure) == depth
    assert len(pending) == 2 - depth
