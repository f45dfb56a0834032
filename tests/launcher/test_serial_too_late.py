"""Serial mode's loop does not start a job that can no longer finish before the wall time: the
prefetcher holds back the jobs already too late when the master takes them, and the master checks
again the jobs that wait for a slot (a job taken in time may wait until the time left runs short),
with the same rule (``balsam.launcher.placement.split_too_late``).

The serial master runs without MPI and without its loop thread: a fake transport (rank 1's tasks
are recorded, its exits delivered by the test), the prefetcher's thread never started (jobs are put
in its hand-over as its thread would), the time left injected. No sleep, no timed assertion.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from pathlib import Path

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes.serial_worker import Master
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.prefetch import Prefetcher
from balsam.launcher.runner import ProcessPool
from balsam.platform import NodeInfo
from test_serial_master import FakeLease, FakeTransport, RecordingUpdater


def _prepared(job_id: int, wall_time_min: int = 0, workdir: Path = Path(".")) -> PreparedJob:
    return PreparedJob(job=types.SimpleNamespace(id=job_id, wall_time_min=wall_time_min), id=job_id, workdir=workdir,
                       cmdline="true", env={"PATH": os.environ["PATH"]}, demand=Demand(node_packing_count=2))


def make_master(tmp_path: Path, left: list[float]) -> tuple[Master, Prefetcher, FakeLease, RecordingUpdater, FakeTransport]:
    """Two nodes of two slots: node 0 (the master's own) is out, so every task goes to rank 1,
    whose exits the test delivers. ``left[0]``: the seconds left before the wall time."""
    node_manager = NodeManager([NodeInfo(str(i), f"node{i}", [0, 1]) for i in range(2)])
    assert node_manager.disable_node(0)
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 0, wake)  # idle timeout 0: idle as soon as nothing is busy
    stop.countdown.remaining_sec = lambda: left[0]  # type: ignore[method-assign]
    lease = FakeLease([])
    updater = RecordingUpdater()
    prefetcher = Prefetcher(lambda: lease, lambda job: job, node_manager.check_satisfiable, updater, depth=64,
                            remaining_min=stop.countdown.remaining_min)  # as build_master passes it (never started here)
    prefetcher.lease = lease
    transport = FakeTransport(2)
    master = Master(node_manager=node_manager, rank_of_node=[0, 1], transport=transport, stop=stop, wake=wake,
                    pool=ProcessPool(5, wake=wake), prefetcher=prefetcher, updater=updater, platform=DefaultPlatform(),
                    launch_hook=lambda **kw: None, clock=lambda: 0.0)
    return master, prefetcher, lease, updater, transport


def _sent(transport: FakeTransport) -> list[int]:
    return [task["id"] for task in transport.sent[1]]


def _exit(transport: FakeTransport, job_id: int) -> None:
    transport.inbox.append((1, {"done": [(job_id, 0, "", time.time())]}))


def test_a_job_taken_in_time_that_waits_for_a_slot_is_not_started_once_too_late(tmp_path: Path,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Before: the prefetcher held back the jobs already too late when the loop took them, but a job
    taken in time then waited in ``pending`` for a slot, and was started when one freed up, however
    little time was left (to be ended at the wall time, RUN_TIMEOUT, after running for nothing)."""
    left = [600.0]  # 10 whole minutes
    master, prefetcher, lease, updater, transport = make_master(tmp_path, left)
    prefetcher._ready.extend([_prepared(1, workdir=tmp_path), _prepared(2, workdir=tmp_path),
                              _prepared(3, 5, tmp_path), _prepared(4, workdir=tmp_path), _prepared(5, 3, tmp_path)])
    master.step()
    assert prefetcher.too_late == []  # all fitted when taken
    assert _sent(transport) == [1, 2] and [p.id for p in master.pending] == [3, 4, 5]  # two slots

    left[0] = 200.0  # 3 whole minutes: job 3 (5 min) can no longer finish, job 5 (3 min) still can
    _exit(transport, 1)
    master.step()
    assert _sent(transport) == [1, 2, 4]  # the slot job 1 freed went to job 4, not job 3
    assert list(master.too_late) == [3] and [p.id for p in master.pending] == [5]
    assert prefetcher._held == 1  # job 3 is not counted as held: it takes no room from the next acquire

    left[0] = 150.0  # 2 whole minutes: job 5 too
    _exit(transport, 2)
    with caplog.at_level(logging.INFO, logger="balsam.launcher.placement"):
        master.step()
    assert _sent(transport) == [1, 2, 4] and sorted(master.too_late) == [3, 5] and not master.pending
    assert "job 5 is not started: it asks for 3 min and 2 whole minutes are left" in caplog.text
    assert prefetcher._held == 0

    # Jobs held back are no work for the idle timeout: with the last task done and nothing left to
    # lease, the master is idle although it still holds jobs 3 and 5.
    prefetcher.exhausted = True
    master.step()
    assert master.stop_reason() is None  # job 4 still runs
    _exit(transport, 4)
    master.step()
    assert master.stop_reason() == "idle"

    # At the stop they are released as every leased job that never started: nothing is reported for
    # them, the Session's deletion (after the updates are sent) returns them.
    with caplog.at_level(logging.INFO, logger="balsam.launcher.serial"):
        master.shutdown("idle")
    assert "2 acquired jobs never started (2 of them too long for the time that was left)" in caplog.text
    for job_id in (1, 2, 4):
        assert updater.states(job_id) == ["RUNNING", "RUN_DONE"], job_id
    assert updater.states(3) == [] and updater.states(5) == []
    assert updater.closed and lease.closed == {}


def test_serial_mode_starts_jobs_without_a_wall_time_and_never_reads_the_clock_for_them(tmp_path: Path) -> None:
    left = [0.0]  # no whole minute left: only jobs without a wall time may start
    master, prefetcher, _lease, _updater, transport = make_master(tmp_path, left)
    prefetcher._ready.extend([_prepared(i, workdir=tmp_path) for i in (1, 2, 3)])
    master.stop.countdown.remaining_sec = lambda: 1 / 0  # type: ignore[method-assign]
    master.step()
    _exit(transport, 1)
    master.step()
    assert _sent(transport) == [1, 2, 3] and not master.too_late
    master.stop.countdown.remaining_sec = lambda: left[0]  # type: ignore[method-assign]
    master.shutdown("test over")
