"""A task exits (0), the reader thread reads its exit, and the spawner dies before the launcher's
thread reaps: the reader thread also reports every task still in ``running`` lost with the
spawner (-1, SPAWNER_GONE), the one whose exit it just read included.

Before: ``reap()`` let the made-up -1 overwrite the real exit (and -1, SIGHUP's code, was held
as a stop signal, then reported as lost with the spawner: RUN_TIMEOUT, so a finished job ran
again; a second reap of the doubled task raised KeyError). Real spawner, real processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from balsam.launcher import runner
from balsam.launcher.runner import SPAWNER_GONE, SpawnerPool, lost_with_spawner


def _until(condition, pool: SpawnerPool, timeout: float = 30.0) -> None:
    """Wait for ``condition`` (the timeout only keeps a broken test from hanging)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        pool.wake.wait(0.05)
        pool.wake.clear()
    assert condition()


def test_an_exit_read_before_the_spawner_died_stands(tmp_path: Path) -> None:
    pool = SpawnerPool(5, threading.Event())
    try:
        pool.start(1, "true", tmp_path, dict(os.environ))
        _until(lambda: any(e[0] == "e" and e[1] == 1 for e in list(pool.events)), pool)  # its exit is read
        os.kill(pool.proc.pid, signal.SIGKILL)  # the spawner dies before the launcher's reap
        _until(pool._answered.is_set, pool)  # the reader thread has reported what it ran
        assert [e[1] for e in pool.events if e[0] == "e"] == [1, 1]  # the real exit and the made-up loss
        finished = pool.reap()
        assert [(f[0], f[1]) for f in finished] == [(1, 0)], finished
        assert not any(lost_with_spawner(f[1], f[2]) for f in finished)
        assert pool.reap() == [] and pool.job_ids() == []
    finally:
        pool.proc.kill()
        pool.proc.wait()


def test_a_loss_of_a_task_whose_exit_was_never_read_is_still_reported(tmp_path: Path, monkeypatch) -> None:
    # -1 is SIGHUP's code: such an exit is held STOP_SIGNAL_HOLD_SEC before it is reported.
    monkeypatch.setattr(runner, "STOP_SIGNAL_HOLD_SEC", 0.0)
    pool = SpawnerPool(5, threading.Event())
    try:
        for job_id, command in ((1, "true"), (2, "sleep 60")):
            (tmp_path / str(job_id)).mkdir()
            pool.start(job_id, command, tmp_path / str(job_id), dict(os.environ))
        _until(lambda: any(e[0] == "e" and e[1] == 1 for e in list(pool.events)), pool)
        os.kill(pool.proc.pid, signal.SIGKILL)
        _until(pool._answered.is_set, pool)
        finished = {f[0]: (f[1], f[2]) for f in pool.reap()}
        assert finished[1] == (0, "")
        assert lost_with_spawner(*finished[2]) and finished[2][1].startswith(SPAWNER_GONE)
    finally:
        pool.proc.kill()
        pool.proc.wait()
