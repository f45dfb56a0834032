"""``ProcessPool.terminate_all`` for a task the reaper thread has reaped but not handed over yet
(it records the exit and removes the run's record, file I/O, before queueing it). Such an exit
came before the stop's SIGTERM: it is the task's own (finished, with its code), not a victim of
the stop. Before, it was counted among the victims, so an exit 0 before a wall-time stop became
RUN_TIMEOUT and the job ran again; under CI load the serial master's stop test saw its reason
without the exit code. Real processes, no server."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from balsam.launcher.runner import STOP_SIGNAL_EXITS, ChildReaper, ProcessPool

#: Generous: only keeps a broken test from hanging (the task exits at once).
WAIT_SEC = 30.0


@pytest.fixture()
def slow_hand_over(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The reaper thread hands each exit over only once ``release`` is set."""
    release = threading.Event()
    hand_over = ChildReaper._done

    def late(self: ChildReaper, proc: object) -> None:
        release.wait(WAIT_SEC)
        hand_over(self, proc)

    monkeypatch.setattr(ChildReaper, "_done", late)
    return release


def _reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("code", [0, 3])
def test_an_exit_reaped_before_the_stop_but_not_handed_over_is_finished(
    tmp_path: Path, slow_hand_over: threading.Event, code: int
) -> None:
    pool = ProcessPool(5, threading.Event())
    proc = pool.start(1, f"exit {code}", tmp_path, dict(os.environ))
    deadline = time.monotonic() + WAIT_SEC
    while not (_reaped(proc.pid) and proc.returncode is not None):  # reaped, not handed over
        assert time.monotonic() < deadline, "the task was not reaped"
        time.sleep(0.01)
    assert not pool.reaper.exited
    try:
        victims, finished = pool.terminate_all(0.5)
    finally:
        slow_hand_over.set()
    assert victims == []
    assert [(job_id, rc) for job_id, rc, *_ in finished] == [(1, code)]


def test_a_task_the_stop_ends_is_still_a_victim(tmp_path: Path) -> None:
    pool = ProcessPool(5, threading.Event())
    pool.start(2, "sleep 30", tmp_path, dict(os.environ))
    victims, finished = pool.terminate_all(0.5)
    assert victims == [2] and finished == []


def test_an_exit_by_a_stop_signal_before_the_stop_is_still_a_victim(tmp_path: Path) -> None:
    """Held (the batch system's SIGTERM reached the task first): ended by the stop."""
    pool = ProcessPool(5, threading.Event())
    pool.start(3, "kill -TERM $$", tmp_path, dict(os.environ))
    deadline = time.monotonic() + WAIT_SEC
    while pool.running[3].returncode not in STOP_SIGNAL_EXITS:
        assert time.monotonic() < deadline, "the task did not exit"
        time.sleep(0.01)
    assert pool.reap() == []  # held
    victims, finished = pool.terminate_all(0.5)
    assert victims == [3] and finished == []
