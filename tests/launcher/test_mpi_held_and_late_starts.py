"""mpi mode's loop over a fake process pool: when a quick failure is reported (NodeFaults' hold), and
jobs leased ahead that can no longer finish before the wall time.

- A quick failure that cannot lead to taking its node out (no MPI launcher message, or the last
  node in) is reported at once, not held until the next exit on its node (behind a long job: hours,
  its job RUNNING meanwhile, and lost if the launcher was killed).
- A held quick failure is reported when no further exit comes on its node within NodeFaults'
  bound.
- A job leased a wave ahead whose ``wall_time_min`` exceeds the time left when it would start is
  not started (it only ran to be ended at the wall time); it stays leased, out of ``pending``.

No timed assertion: the tests wait for events, with generous deadlines against hangs.
"""

from __future__ import annotations

import contextlib
import threading
import time
import types
from pathlib import Path
from typing import Any

from balsam.builtin.default_platform import DefaultPlatform
from balsam.config.schema import LauncherSettings
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes.mpi import MPIMode
from balsam.platform import NodeInfo
from launcher_helpers import FakePool, RecordingUpdater, WholeNodePrep, fake_mpi_leases, mode_running

#: Deadline of every wait (against hangs only).
WAIT_SEC = 30.0
PROXY = "ssh: Could not resolve hostname nid-down-001\n[mpiexec@x] Launch proxy failed."


class Pool(FakePool):
    """The pool interface MPIMode uses. ``outcome(job_id)`` says how a started job ends: None (it
    runs until the test finishes it), or (returncode, output tail), at once."""

    def __init__(self, wake: threading.Event, outcome: Any) -> None:
        super().__init__(wake)
        self.outcome = outcome

    def start(self, job_id: int, cmd: str, workdir: Any, env: dict, cpu_ids: Any = ()) -> None:
        super().start(job_id, cmd, workdir, env, cpu_ids)
        ends = self.outcome(job_id)
        if ends is not None:
            self.finish(job_id, *ends)


class Updater(RecordingUpdater):
    def wait_for(self, predicate: Any, what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.puts), WAIT_SEC), f"{what}: {self.puts}"


def make_mode(tmp_path: Path, nodes: int, outcome: Any, batches: list[list[Any]]) -> tuple[MPIMode, Updater]:
    """An MPIMode on ``nodes`` one-CPU nodes whose source hands out ``batches`` one per acquire."""
    context = LauncherContext(site_config=None, settings=types.SimpleNamespace(launcher=LauncherSettings(delay_sec=1)),
                              site_id=1, data_path=tmp_path, log_path=tmp_path, platform=DefaultPlatform(),
                              nodes=[NodeInfo(str(i), f"h{i}", [0]) for i in range(nodes)], wall_time_min=10)
    mode = MPIMode(context)

    class Source:
        def acquire(self, count: int, **kw: Any) -> list[Any]:
            return batches.pop(0) if batches else []

    updater = Updater()
    # Each job (given as (id, wall_time_min)) takes a whole node.
    fake_mpi_leases(mode, Pool(mode.wake, outcome), WholeNodePrep(), Source(), updater)
    return mode, updater


def running(mode: MPIMode) -> contextlib.AbstractContextManager[None]:
    """Runs ``mode``'s loop for the ``with`` block."""
    return mode_running(mode, WAIT_SEC)


def _job(job_id: int, wall_time_min: int = 0) -> Any:
    return types.SimpleNamespace(id=job_id, wall_time_min=wall_time_min)


def test_an_apps_quick_failure_on_a_one_node_partition_is_reported_while_a_long_job_runs(tmp_path: Path) -> None:
    """The audit's case: job 1 exits 3 at once (its own error, no MPI launcher message), job 2 then
    runs for long on the only node. Job 1's RUN_ERROR was held until job 2 ended."""
    outcomes = {1: (3, "bad input"), 2: None}
    mode, updater = make_mode(tmp_path, 1, outcomes.get, [[_job(1), _job(2)]])
    with running(mode):
        updater.wait_for(lambda puts: (2, "RUNNING") in puts, "job 2 did not start")
        updater.wait_for(lambda puts: (1, "RUN_ERROR") in puts, "job 1's failure was not reported")
        assert 2 in mode.pool.running and not mode.faults.held
    assert updater.puts[-1] == (2, "RUN_TIMEOUT")  # job 2 ran until the stop


def test_an_apps_quick_failure_is_reported_at_once_on_a_larger_partition_too(tmp_path: Path) -> None:
    """Two nodes: a node can be taken out, but the failure bears no MPI launcher message."""
    outcomes = {1: (1, "Traceback: ValueError"), 2: None, 3: None}
    mode, updater = make_mode(tmp_path, 2, outcomes.get, [[_job(1), _job(2), _job(3)]])
    with running(mode):
        updater.wait_for(lambda puts: (1, "RUN_ERROR") in puts, "job 1's failure was not reported")
        assert not mode.faults.held


def test_a_held_launch_failure_is_reported_when_no_further_exit_comes_on_its_node(tmp_path: Path) -> None:
    """A failure with the MPI launcher's message on a node that could be taken out is held for a
    verdict; with no further exit on that node it is reported after NodeFaults' bound."""
    outcomes = {1: (255, PROXY), 2: None}
    mode, updater = make_mode(tmp_path, 2, outcomes.get, [[_job(1), _job(2)]])
    mode.faults.max_held_sec = 0.2
    with running(mode):
        updater.wait_for(lambda puts: (1, "RUN_ERROR") in puts, "the held failure of job 1 was never reported")
        assert 2 in mode.pool.running and not mode.faults.held  # job 2 (the other node) still runs
    assert not mode.node_manager.nodes[0].disabled


def test_jobs_that_cannot_finish_before_the_wall_time_are_not_started_from_the_jobs_leased_ahead(tmp_path: Path) -> None:
    """100 s left: a job of wall_time_min 2 (leased ahead while more was left) is not started;
    jobs of 1 minute or without a wall time are."""
    jobs = [_job(1), _job(2, wall_time_min=1), _job(3, wall_time_min=2), _job(4)]
    mode, updater = make_mode(tmp_path, 1, lambda job_id: (0, ""), [jobs])
    mode.countdown.deadline = time.time() + 100.0
    with running(mode):
        updater.wait_for(lambda puts: all((i, "RUN_DONE") in puts for i in (1, 2, 4)), "jobs 1, 2 and 4 did not run")
        updater.wait_for(lambda puts: not mode.pending, "a job was left pending")
    assert 3 not in mode.pool.starts and mode.pool.starts == [1, 2, 4]
    assert all(job_id != 3 for job_id, _ in updater.puts)  # still leased, unstarted: the Session's end returns it
    assert list(mode.too_late) == [3]
