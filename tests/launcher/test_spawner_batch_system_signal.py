"""The batch system's SIGTERM reaches the spawner too (Slurm signals every process of the job at
scancel or the time limit; the launcher's own group kill never reaches the spawner's session).

Seen with a real spawner: an app that saves its state on SIGTERM and exits 1 within 20 s of its
start was relaunched by serial mode's quick-failure rule after Slurm's signal, its ``job.out``
(the "saved" line) truncated and the app started over while the allocation was ending; in either
mode an exit 1 reaped before the launcher's own stop was reported as the job's RUN_ERROR. Now an
exit the spawner reaps after a stop signal reached it is never relaunched and is held as an exit by
a stop signal: the launcher's stop that follows ends it as RUN_TIMEOUT (it runs again)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from balsam.launcher.runner import SpawnerPool
from launcher_helpers import SAVES_AND_EXITS_1, wait_for_task_pid


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the task did not exit on SIGTERM"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.mark.parametrize("relaunch", [True, False], ids=["serial pool", "mpi pool"])
def test_an_exit_after_the_batch_systems_signal_is_the_stops_not_relaunched(relaunch: bool, tmp_path: Path) -> None:
    pool = SpawnerPool(5, threading.Event(), relaunch_quick_failures=relaunch)
    try:
        pool.start(1, SAVES_AND_EXITS_1, tmp_path, dict(os.environ))
        pid = wait_for_task_pid(tmp_path / "pid")
        # The batch system's SIGTERM, the spawner first, then the task (the other order, Slurm's
        # proctrack/linuxproc's, is test_spawner_stop_signal_order.py's).
        os.kill(pool.proc.pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGTERM)
        _wait_gone(pid)
        reported = pool.reap()
        # The launcher's stop, as it comes a moment later.
        victims, finished = pool.terminate_all(0.5)
        reported += finished
        assert (tmp_path / "runs").read_text().count("run") == 1, "relaunched after the allocation's SIGTERM"
        assert "saved checkpoint" in (tmp_path / "job.out").read_text(), "job.out truncated by a relaunch"
        assert victims == [1] and reported == [], (victims, reported)
    finally:
        pool.close()


def test_no_queued_task_starts_after_the_batch_systems_signal(tmp_path: Path) -> None:
    """A task that traps SIGTERM and exits 0 handed its CPUs to the task queued behind it, which
    started after the allocation's SIGTERM (a fresh job on an ending allocation, killed by the
    launcher's stop a moment later). Now the queued one is given back unstarted."""
    pool = SpawnerPool(5, threading.Event())
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    try:
        pool.start(1, "bash -c 'trap \"exit 0\" TERM; echo $$ > pid; sleep 30 & wait'", first, dict(os.environ))
        pid = wait_for_task_pid(first / "pid")
        assert pool.queue_after(1, 2, "bash -c 'echo started > ran'", second, dict(os.environ))
        os.kill(pool.proc.pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGTERM)
        _wait_gone(pid)
        victims, finished = pool.terminate_all(0.5)
        assert not (second / "ran").exists(), "the queued task started after the allocation's SIGTERM"
        assert pool.take_started() == [] and 2 not in victims + [f[0] for f in finished], (victims, finished)
        assert victims == [1], (victims, finished)
    finally:
        pool.close()
