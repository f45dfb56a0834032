"""mpi mode: the oversized-job probe comes as the partition goes idle, even when the empty answer
that made the backlog known empty came while a job still ran.

The race (seen under CPU load in test_mpi_wait_acquire.py): on a one-node partition the request
made while job 1 runs offers room for any job the node could take, so after its empty answer the
next acquire asked the server to wait, without the probe flag (job 1 still ran). The lease holds one
acquire at a time: with that wait in flight as job 1 ended, no probe followed the partition going
idle, and an idle stop during the wait (it is not waited for) left a job larger than the partition
leased by no one and never failed. Here the ordering is forced: job 1 ends only once the loop has
handled that empty answer and gone to sleep (the turn in which it would send the waiting acquire).
Nothing is timed; the waits are against hangs only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from test_mpi_cycle_empty_backlog import WAIT_SEC, running
from test_mpi_wait_acquire import ProbedSource, _job, make_mode


def test_a_job_running_when_the_backlog_is_found_empty_does_not_put_off_the_idle_probe(
        tmp_path: Path, monkeypatch: Any) -> None:
    import balsam.launcher.modes.mpi as mpi_module

    monkeypatch.setattr(mpi_module, "largest_active_batch_job", lambda site_id, exclude: 0)
    source = ProbedSource([[_job(1)]])
    mode, updater, pool = make_mode(tmp_path, source)
    mode._probe_oversized = True

    # The loop's turn that handles the empty answer sent while job 1 runs ends in wake.wait: by
    # then any acquire that turn sends is in flight.
    empty_while_running = threading.Event()
    turn_done = threading.Event()
    answered = mode.empty_backlog.answered
    wait = mode.wake.wait

    def noting_answered(request: dict[str, Any], got: int, now: float) -> None:
        if not got and pool.running:
            empty_while_running.set()
        answered(request, got, now)

    def noting_wait(timeout: Any = None) -> bool:
        if empty_while_running.is_set():
            turn_done.set()
        return wait(timeout)

    mode.empty_backlog.answered = noting_answered  # type: ignore[method-assign]
    mode.wake.wait = noting_wait  # type: ignore[method-assign]
    try:
        with running(mode):
            updater.wait_for((1, "RUNNING"))
            assert turn_done.wait(WAIT_SEC), source.calls  # the empty answer came with job 1 running
            assert pool.running  # job 1 still runs: the forced ordering
            pool.finish(1)
            updater.wait_for((1, "RUN_DONE"))
            # The partition is idle: the probe comes (before the fix a waiting acquire sent while
            # job 1 ran was in flight, and none came while it waited).
            source.wait_until(lambda: source.probes)
    finally:
        source.release()
    assert source.probes == 1 and source.waits_before_probe == 0, (source.probes, source.calls)
