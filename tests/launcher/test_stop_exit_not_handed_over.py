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

from balsam.launcher import runner
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


@pytest.mark.parametrize("handed_over", [True, False])
def test_a_quick_failure_at_the_stop_has_one_outcome(
    tmp_path: Path, slow_hand_over: threading.Event, handed_over: bool
) -> None:
    """Serial mode's relaunch rule: a quick exit 1 handed over in time is relaunched by the stop's
    reap() and the stop ends that relaunch (a victim: it runs again); the same exit not handed
    over yet was reported as finished, RUN_ERROR (a review's finding). One outcome either way."""
    if handed_over:
        slow_hand_over.set()
    pool = ProcessPool(5, threading.Event(), relaunch_quick_failures=True)
    proc = pool.start(1, "exit 1", tmp_path, dict(os.environ))
    deadline = time.monotonic() + WAIT_SEC
    while not (_reaped(proc.pid) and proc.returncode is not None and (not handed_over or pool.reaper.exited)):
        assert time.monotonic() < deadline, "the task was not reaped"
        time.sleep(0.01)
    try:
        victims, finished = pool.terminate_all(0.5)
    finally:
        slow_hand_over.set()
    assert (victims, [r[:2] for r in finished]) == ([1], [])


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_an_exit_0_before_the_stop_reaped_after_its_signal_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the reaper thread may reap (and date) an exit only after the stop's signal went
    out: the task exited 0 before it (a zombie at the stop), so the exit is its own, not a victim
    run again (a review found the first version judged it by the reap's time)."""
    go = threading.Event()
    real_reap = ChildReaper._reap

    def delayed_reap(self: ChildReaper, pid: int, proc: object) -> None:
        go.wait(WAIT_SEC)  # the thread's turn comes late
        real_reap(self, pid, proc)

    real_signal = runner._signal_group

    def signal_then_let_the_reaper_run(pgid: int, sig: int) -> None:
        real_signal(pgid, sig)
        go.set()

    monkeypatch.setattr(ChildReaper, "_reap", delayed_reap)
    monkeypatch.setattr(runner, "_signal_group", signal_then_let_the_reaper_run)
    pool = ProcessPool(5, threading.Event())
    proc = pool.start(1, "exit 0", tmp_path, dict(os.environ))
    deadline = time.monotonic() + WAIT_SEC
    while _state(proc.pid) != "Z":  # exited before the stop, not reaped yet
        assert time.monotonic() < deadline, "the task did not exit"
        time.sleep(0.01)
    try:
        victims, finished = pool.terminate_all(0.5)
    finally:
        go.set()
    assert (victims, [r[:2] for r in finished]) == ([], [(1, 0)])


def test_a_quick_failure_is_judged_at_its_exit_not_when_the_stop_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow_hand_over: threading.Event
) -> None:
    """A retry-code exit inside the relaunch window, looked at by the stop only after the window
    has passed (the reaper's hand-over late, a grace): due for a relaunch when it exited, so a
    victim that runs again, as reap() would have made it (a review found it reported RUN_ERROR)."""
    monkeypatch.setattr(runner, "RETRY_WINDOW", 1.0)
    pool = ProcessPool(5, threading.Event(), relaunch_quick_failures=True)
    proc = pool.start(1, "exit 1", tmp_path, dict(os.environ))
    deadline = time.monotonic() + WAIT_SEC
    while proc.returncode is None:  # reaped at once, not handed over
        assert time.monotonic() < deadline, "the task was not reaped"
        time.sleep(0.01)
    while time.time() - proc.start_time < 1.5:  # the window has passed by the time the stop looks
        time.sleep(0.05)
    try:
        victims, finished = pool.terminate_all(0.5)
    finally:
        slow_hand_over.set()
    assert (victims, [r[:2] for r in finished]) == ([1], [])
