"""The spawner holds the events the launcher has no use for yet: exits 0 whose CPUs went to the task
queued behind them, and those starts, while every running task still has ``EVENT_HOLD_DEPTH`` tasks
queued behind it, at most ``EVENT_HOLD_SEC``. Each message woke the launcher's reader thread and its
loop once per short task (~1 message per task in serial mode). Anything else goes at once, as
before. The spawner's own object over a real pipe, in this process; its clock is the test's."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from balsam.launcher import spawner
from balsam.launcher.runner import SpawnerPool
from balsam.launcher.spawner import FrameReader, Spawner

# (read with defaults, so that the code before the hold runs these tests and fails them, not their import)
EVENT_HOLD_SEC = getattr(spawner, "EVENT_HOLD_SEC", 0.002)
EVENT_HOLD_DEPTH = getattr(spawner, "EVENT_HOLD_DEPTH", 2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def made(monkeypatch: Any) -> Iterator[tuple[Spawner, int, Clock]]:
    clock = Clock()
    monkeypatch.setattr(spawner.time, "monotonic", clock)
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.set_blocking(reply_r, False)
    made = Spawner(request_r, reply_w)
    yield made, reply_r, clock
    for fd in (request_r, request_w, reply_r, reply_w, made.devnull):
        os.close(fd)


def sent(reply_r: int) -> list:
    """The events written to the launcher so far."""
    try:
        data = os.read(reply_r, 1 << 16)
    except BlockingIOError:
        return []
    return [event for _kind, events in FrameReader().feed(data) for event in events]


def chain(made: Spawner, running: dict[int, int], depth: int) -> None:
    """Tasks running (pid -> job id), each with ``depth`` queued behind it (job ids 100 * job + n)."""
    made.running = dict(running)
    for job_id in running.values():
        behind = job_id
        for n in range(1, depth + 1):
            made.after[behind] = (100 * job_id + n, ["/bin/true"], "/tmp", "/tmp/job.out", {}, [])
            behind = 100 * job_id + n


def handed_over(ended: int, started: int) -> list[tuple]:
    return [("e", ended, 0, 1.0, ""), ("h", ended, started, 1.0)]


def test_exits_handed_over_are_held_while_every_task_has_work_queued_then_sent_together(made: Any) -> None:
    made, reply_r, clock = made
    chain(made, {11: 2, 12: 6}, EVENT_HOLD_DEPTH)
    made.events = handed_over(1, 2)
    assert made.send_events() == pytest.approx(EVENT_HOLD_SEC)
    assert sent(reply_r) == []
    clock.now += EVENT_HOLD_SEC / 2
    made.events += handed_over(5, 6)  # the next exit joins the held ones: the hold counts from the first
    assert made.send_events() == pytest.approx(EVENT_HOLD_SEC / 2)
    assert sent(reply_r) == []
    clock.now += EVENT_HOLD_SEC / 2
    assert made.send_events() is None
    assert sent(reply_r) == handed_over(1, 2) + handed_over(5, 6) and made.events == []
    made.events = handed_over(2, 3)  # a new hold starts with the next one
    assert made.send_events() == pytest.approx(EVENT_HOLD_SEC)


@pytest.mark.parametrize("case", ["a task with less queued", "a failed exit", "an exit with nothing behind it",
                                  "a task given back", "a relaunch"])
def test_what_the_launcher_acts_on_goes_at_once_with_what_was_held(made: Any, case: str) -> None:
    made, reply_r, _clock = made
    chain(made, {11: 2, 12: 6}, EVENT_HOLD_DEPTH)
    made.events = handed_over(1, 2)
    assert made.send_events() is not None  # held
    extra = {
        "a task with less queued": [],
        "a failed exit": [("e", 7, 3, 1.0, ""), ("h", 7, 8, 1.0)],
        "an exit with nothing behind it": [("e", 9, 0, 1.0, "")],
        "a task given back": [("d", 205)],
        "a relaunch": [("r", 2, 1, 0.1)],
    }[case]
    if case == "a task with less queued":
        del made.after[601]  # job 6 has one task queued behind it now
    made.events += extra
    assert made.send_events() is None
    assert sent(reply_r) == handed_over(1, 2) + extra


def test_with_nothing_running_or_no_hand_over_nothing_is_held(made: Any) -> None:
    made, reply_r, _clock = made
    made.events = [("e", 1, 0, 1.0, "")]  # the last task ended: its slot is free
    assert made.send_events() is None and sent(reply_r) == [("e", 1, 0, 1.0, "")]
    assert made.send_events() is None and sent(reply_r) == []  # nothing to send


def test_a_held_exit_reaches_the_launcher_while_the_next_task_still_runs(tmp_path: Path) -> None:
    """The hold is bounded by the spawner's own wait (its poll's timeout), not by the next event: an
    exit held behind a long task reaches the pool long before that task ends."""
    pool = SpawnerPool(5, threading.Event())
    try:
        env = dict(os.environ)
        workdirs = []
        for name in "1234":
            (tmp_path / name).mkdir()
            workdirs.append(tmp_path / name)
        pool.start(1, "true", workdirs[0], env)
        for after, job_id, cmd in ((1, 2, "sleep 30"), (2, 3, "true"), (3, 4, "true")):
            assert pool.queue_after(after, job_id, cmd, workdirs[job_id - 1], env)
        done: list = []
        deadline = time.monotonic() + 20  # only keeps a broken test from hanging: the exit comes in ms
        while not done and time.monotonic() < deadline:
            pool.wake.wait(0.1)
            pool.wake.clear()
            done += pool.reap()
        assert [(j, rc) for j, rc, _, _ in done] == [(1, 0)]
        assert [(a, j) for a, j, _ in pool.take_started()] == [(1, 2)]
        assert 2 in pool.running and set(pool.queued) == {3, 4}
    finally:
        pool.terminate_all(1.0)


def test_a_stop_sends_what_was_held_before_its_answer(made: Any) -> None:
    """A start held in the spawner (``"h"``) names a task the launcher still counts as queued; the
    stop's answer names it as ended: the held events go first, so the launcher counts it as started
    (RUN_TIMEOUT, not forgotten as never run)."""
    made, reply_r, _clock = made
    made.events = handed_over(1, 2)
    made.running = {}  # (the task started is gone by the time of the stop: nothing to signal here)
    made.after = {2: (3, ["/bin/true"], "/tmp", "/tmp/job.out", {}, []), 3: (4, ["/bin/true"], "/tmp", "/tmp/job.out", {}, [])}
    made.cpus_of[2] = []
    made.queued.update({3, 4})
    answer_stop = getattr(made, "answer_stop", None)
    assert answer_stop is not None, "no answer_stop: the stop's answer is built in the loop"
    answer_stop(0.0)
    frames = FrameReader().feed(os.read(reply_r, 1 << 16))
    assert [frame[0] for frame in frames] == ["x", "T"]
    assert frames[0][1] == handed_over(1, 2)
