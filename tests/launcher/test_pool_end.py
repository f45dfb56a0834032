"""Ending some running tasks while the others go on (``pool.end``: jobs their user deleted or
moved), in every pool a job mode uses: SIGTERM to each group, SIGKILL to what is left of it after
the grace (children that ignore or handle SIGTERM included), no relaunch of a quick failure, the
exit reported as any other, the other tasks untouched. Real processes, no server."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher.runner import ProcessPool, SpawnerPool, SpawnerShards
from test_spawner import SURVIVING_CHILDREN, _running, _wait_for_pid


@pytest.fixture(params=["in-process", "one spawner", "two spawners"])
def pool(request: pytest.FixtureRequest) -> Any:
    wake = threading.Event()
    # relaunch_quick_failures: serial mode's pools, which must not start an ended task again.
    if request.param == "in-process":
        pool = ProcessPool(5, wake, relaunch_quick_failures=True)
    elif request.param == "one spawner":
        pool = SpawnerPool(5, wake, relaunch_quick_failures=True)
    else:
        pool = SpawnerShards(2, 5, wake, relaunch_quick_failures=True)
    pool.test_wake = wake
    yield pool
    if isinstance(pool, ProcessPool):
        pool.terminate_all(0.5)
    else:
        pool.close()


def _reap_until(pool: Any, job_ids: set[int], timeout: float = 30.0) -> dict[int, int]:
    """Reap until these tasks exited (the timeout only keeps a broken test from hanging)."""
    exits: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while not job_ids <= set(exits) and time.monotonic() < deadline:
        pool.test_wake.wait(0.05)
        pool.test_wake.clear()
        for job_id, rc, _tail, _when in pool.reap():
            assert job_id not in exits, f"job {job_id} reported twice"
            exits[job_id] = rc
    return exits


def test_end_stops_those_tasks_whole_groups_and_nothing_else(pool: Any, tmp_path: Path) -> None:
    env = dict(os.environ)
    commands = {
        1: SURVIVING_CHILDREN[0],
        2: SURVIVING_CHILDREN[1],
        # Exits 1 on SIGTERM, within the quick-failure window: ended on request, it is not relaunched.
        3: "trap 'exit 1' TERM; echo $$ > child.pid; sleep 300 & wait",
        4: "echo $$ > child.pid; exec sleep 300",  # not ended
    }
    workdirs = {}
    for job_id, cmd in commands.items():
        workdirs[job_id] = tmp_path / str(job_id)
        workdirs[job_id].mkdir()
        pool.start(job_id, cmd, workdirs[job_id], env, [0] if job_id % 2 else [])
    pids = {job_id: _wait_for_pid(workdir / "child.pid") for job_id, workdir in workdirs.items()}
    time.sleep(0.2)  # the python child's handler is set once it wrote its pid; the traps before
    pool.end([1, 2, 3], 0.5)
    exits = _reap_until(pool, {1, 2, 3})
    assert set(exits) == {1, 2, 3}, exits
    assert exits[3] == 1  # its own exit, reported once (a relaunch would have started it again)
    deadline = time.monotonic() + 10
    while any(_running(pids[j]) for j in (1, 2, 3)) and time.monotonic() < deadline:
        pool.reap()  # the SIGKILLs after the grace are sent from here (in-process pool)
        time.sleep(0.05)
    assert [j for j in (1, 2, 3) if _running(pids[j])] == []
    assert _running(pids[4]) and 4 in pool.job_ids() and not {1, 2, 3} & set(pool.job_ids())
