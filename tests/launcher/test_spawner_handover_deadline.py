"""A task queued in the spawner with a deadline (the lease's ``fresh_until()``, on the spawner's node_clock) is not
started after it: a launcher frozen past its Session's expiry must not have its queued jobs started
(the server may have given them to another launcher). It comes back unstarted (``take_dropped``),
with what is queued behind it, and the loop places it again after its own freshness check. Real
spawner processes, no server; the deadlines are in the past or an hour away (no timing)."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.handover import HandOver
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.runner import SpawnerPool, SpawnerShards
from balsam.launcher.spawner import node_clock
from balsam.platform import NodeInfo

from test_serial_master import FakeJob, FakeLease, make_master


@pytest.fixture(params=["one spawner", "two spawners"])
def pool(request: pytest.FixtureRequest) -> Any:
    pool = SpawnerPool(5, threading.Event()) if request.param == "one spawner" else SpawnerShards(2, 5, threading.Event())
    yield pool
    pool.close()


def _wake(pool: Any) -> threading.Event:
    return pool.shards[0].wake if isinstance(pool, SpawnerShards) else pool.wake


def _settle(pool: Any, exits: int, dropped: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Reap until ``exits`` tasks ended and ``dropped`` came back (the timeout only keeps a broken test from hanging)."""
    done: list[tuple[int, int]] = []
    back: list[int] = []
    limit = time.monotonic() + 20
    while (len(done) < exits or len(back) < dropped) and time.monotonic() < limit:
        _wake(pool).wait(0.1)
        _wake(pool).clear()
        done += [(job_id, rc) for job_id, rc, _, _ in pool.reap()]
        back += pool.take_dropped()
    return done, back


def _workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_a_queued_task_whose_deadline_passed_is_not_started_but_reported_back(pool: Any, tmp_path: Path) -> None:
    env = dict(os.environ)
    pool.start(1, "sleep 0.3", _workdir(tmp_path, "1"), env)
    # The Session was known alive until a moment ago: by the time 1 exits, 2 may no longer start.
    assert pool.queue_after(1, 2, "touch started", _workdir(tmp_path, "2"), env, node_clock())
    assert pool.queue_after(2, 3, "touch started", _workdir(tmp_path, "3"), env, node_clock() + 3600)
    done, back = _settle(pool, 1, 2)
    assert done == [(1, 0)]
    assert sorted(back) == [2, 3]  # with what is queued behind it (it starts on 2's CPUs, which never came)
    assert not pool.take_started() and not pool.queued
    assert not (tmp_path / "2" / "started").exists() and not (tmp_path / "3" / "started").exists()


def test_a_queued_task_within_its_deadline_is_handed_over(pool: Any, tmp_path: Path) -> None:
    env = dict(os.environ)
    pool.start(1, "sleep 0.2", _workdir(tmp_path, "1"), env)
    assert pool.queue_after(1, 2, "touch started", _workdir(tmp_path, "2"), env, node_clock() + 3600)
    done, back = _settle(pool, 2, 0)
    assert done == [(1, 0), (2, 0)] and not back
    assert [(a, j) for a, j, _ in pool.take_started()] == [(1, 2)]
    assert (tmp_path / "2" / "started").exists()


def test_a_late_queue_request_past_its_deadline_comes_back(pool: Any, tmp_path: Path) -> None:
    """A request that reaches the spawner after the task ahead ended starts at once on its CPUs,
    unless its deadline has passed."""
    env = dict(os.environ)
    pool.start(1, "true", _workdir(tmp_path, "1"), env)
    assert _settle(pool, 1, 0)[0] == [(1, 0)]
    assert pool.queue_after(1, 2, "touch started", _workdir(tmp_path, "2"), env, node_clock())
    done, back = _settle(pool, 0, 1)
    assert back == [2] and not done and not pool.take_started()
    assert not (tmp_path / "2" / "started").exists()


class ExpiringLease(FakeLease):
    """Known alive at each of the loop's checks, but its ``fresh_until()`` is always already past:
    the launcher froze between its check and the exit of the job ahead of a queued one."""

    def check_fresh(self, wake: Any = None) -> bool:
        return True

    def fresh_until(self, margin: Any = None) -> float:
        return node_clock() - 1.0


def test_the_serial_master_queues_with_the_leases_deadline_and_places_what_comes_back(tmp_path: Path) -> None:
    jobs = [FakeJob(i, "sleep 0.2") for i in range(1, 9)]
    master, _, updater, _ = make_master(tmp_path, jobs, pool=SpawnerPool, lease=ExpiringLease(jobs))
    assert master.run() == "idle"
    for job in jobs:
        assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id
    assert master.handover.given_back >= 1  # queued (two slots, eight jobs), came back unstarted
    assert master.handover.handed_over == 0  # never started by the spawner past the deadline
    assert not master.node_manager.placements and not master.handover.queued


def test_hand_over_passes_the_deadline_to_the_pool_and_none_without_one() -> None:
    calls: list[tuple[Any, ...]] = []

    class Pool:
        can_queue = True
        events: list = []
        held: dict = {}

        def queue_after(self, *args: Any) -> bool:
            calls.append(args)
            return True

    nm = NodeManager([NodeInfo("0", "node0", [0, 1])])
    handover = HandOver(Pool(), nm, depth=1, max_age_sec=60)
    demand = Demand(node_packing_count=2)
    for job_id in (1, 2):
        prepared = PreparedJob(job=None, id=job_id, workdir=Path("."), cmdline="true", env={}, demand=demand)
        handover.started_local(prepared, nm.assign(job_id, demand))
    command = lambda prepared, placement: ("true", {})  # noqa: E731
    for job_id, fresh_until in ((3, 123.5), (4, None)):
        pending = deque([PreparedJob(job=None, id=job_id, workdir=Path("."), cmdline="true", env={}, demand=demand)])
        assert handover.queue_behind(pending, command, lambda *a: None, fresh_until) == 1
    assert [len(c) for c in calls] == [6, 5] and calls[0][-1] == 123.5  # the old call without one (fake pools)
