"""``ProcessPool.end`` for a task whose quick failure the reaper thread has already seen but the
loop has not reaped yet (a heartbeat said the job is gone, in that window): the exit is reported
as it is, never relaunched. Before, ``end`` skipped a task with a return code, so the next
``reap()`` started it again (serial mode's quick-failure rule) and the run went on to its end,
for a job its user had deleted or moved. Real processes, no server."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from balsam.launcher.runner import ProcessPool

#: Generous: only keeps a broken test from hanging (the task fails at once).
WAIT_SEC = 30.0


def test_end_of_a_quick_failure_not_reaped_yet_is_not_relaunched(tmp_path: Path) -> None:
    wake = threading.Event()
    pool = ProcessPool(5, wake, relaunch_quick_failures=True)
    # The first run fails at once (exit 1: a quick failure, relaunched by the rule); a second run
    # would leave a marker.
    cmd = "if [ -e first ]; then echo again > relaunched; exit 0; else touch first; exit 1; fi"
    try:
        pool.start(7, cmd, tmp_path, dict(os.environ))
        deadline = time.monotonic() + WAIT_SEC
        while pool.running[7].returncode is None:  # the reaper thread saw the exit; reap() did not run
            assert time.monotonic() < deadline, "the task did not exit"
            time.sleep(0.01)
        pool.end([7], 0.5)  # what the loop does for a gone job
        exits: list[tuple[int, int]] = []
        while not exits:
            assert time.monotonic() < deadline, "no exit reaped"
            wake.wait(0.05)
            wake.clear()
            exits += [(job_id, rc) for job_id, rc, *_ in pool.reap()]
        assert exits == [(7, 1)]
        assert not pool.running
        assert not (tmp_path / "relaunched").exists()
    finally:
        pool.terminate_all(0.5)
