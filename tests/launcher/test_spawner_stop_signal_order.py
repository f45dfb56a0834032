"""The batch system's SIGTERM in the order Slurm's proctrack/linuxproc sends it: a process's
descendants before the process itself, so the tasks before their spawner.

Seen on a real Slurm cluster (1 of 7 runs with 12 tasks) and with a real spawner (8 of 10 with a
2 ms gap between the two signals, 10 of 10 with 10 ms): a task that traps SIGTERM and exits at
once was reaped before the spawner noted its own signal, so its quick failure was relaunched (its
job.out truncated) or its exit reported as the job's own (RUN_ERROR). Now such an exit is kept
``spawner.STOP_RACE_SEC`` (the relaunch too) and the signal claims it when it comes.

Also: while a stop signal is noted the spawner starts nothing (a fresh start is reported back as
not started: RUN_TIMEOUT; a hand-over request that comes after the job ahead ended is dropped), the
launcher's log says so (one WARNING), and a signal no stop follows is cleared (one INFO line).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher import runner, spawner
from balsam.launcher.runner import SpawnerPool
from launcher_helpers import SAVES_AND_EXITS_1, wait_for_task_pid

#: How long the spawner keeps an exit for a stop signal (0.05 s); the code before had no such wait.
RACE_SEC = getattr(spawner, "STOP_RACE_SEC", 0.05)


def _task_then_spawner(pool: SpawnerPool, pid: int) -> bool:
    """SIGTERM to the task's group, then, once the spawner has reaped the task, to the spawner
    (kill_tree's order, with the gap a busy kill loop leaves). False if this process was too slow
    to send the second signal within the spawner's keeping time (the attempt proves nothing)."""
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}"):  # gone from /proc: reaped by the spawner
        assert time.monotonic() < deadline, "the task did not exit on SIGTERM"
        time.sleep(0.0005)
    seen = time.monotonic()
    os.kill(pool.proc.pid, signal.SIGTERM)
    return time.monotonic() - seen < RACE_SEC / 2


@pytest.mark.parametrize("relaunch", [True, False], ids=["serial pool", "mpi pool"])
def test_the_task_signalled_before_its_spawner_is_not_relaunched_nor_its_exit_the_jobs(relaunch: bool, tmp_path: Path) -> None:
    for attempt in range(3):
        workdir = tmp_path / str(attempt)
        workdir.mkdir()
        pool = SpawnerPool(5, threading.Event(), relaunch_quick_failures=relaunch)
        try:
            pool.start(1, SAVES_AND_EXITS_1, workdir, dict(os.environ))
            pid = wait_for_task_pid(workdir / "pid")
            in_time = _task_then_spawner(pool, pid)
            time.sleep(0.2)  # the relaunch (the code before) or the report would be done by now
            reported = pool.reap()
            victims, finished = pool.terminate_all(0.5)  # the launcher's stop, a moment later
            reported += finished
        finally:
            pool.close()
        if not in_time:
            continue
        assert (workdir / "runs").read_text().count("run") == 1, "relaunched after the allocation's SIGTERM"
        assert "saved checkpoint" in (workdir / "job.out").read_text(), "job.out truncated by a relaunch"
        assert victims == [1] and reported == [], (victims, reported)
        return
    pytest.skip("this machine was too busy to send the two signals close enough together")


def _spawner_in_process(relaunch: Any = None) -> tuple[spawner.Spawner, int]:
    """A Spawner object in this process (not its loop), and the read end of its reply pipe."""
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.close(request_w)
    os.set_blocking(reply_r, False)
    return spawner.Spawner(request_r, reply_w, relaunch=relaunch), reply_r


def _sent(sp: spawner.Spawner, reply_r: int) -> list:
    assert sp.send_events() is None, "events kept back"
    try:
        data = os.read(reply_r, 1 << 16)
    except BlockingIOError:
        return []
    (kind, events), = spawner.FrameReader().feed(data)
    return events


def test_an_exit_0_of_a_long_task_is_kept_for_the_stop_signal_a_short_ones_is_not() -> None:
    """A wrapper that traps SIGTERM and exits 0 after a long run (cut short): kept, then claimed by
    the spawner's signal (held by the launcher: RUN_TIMEOUT at its stop). It was reported at once
    (RUN_DONE). A short task's exit 0 (serial mode's thousands a second) is sent at once."""
    sp, reply_r = _spawner_in_process()
    try:
        sp._ended(1, 0, "", spawner.node_clock() - 600)  # ran 10 minutes
        assert sp.send_events() is not None, "an exit 0 after a long run was sent at once"
        sp.stop_signalled(signal.SIGTERM)  # the spawner's own signal, a moment later
        events = _sent(sp, reply_r)
        assert ("e", 1) == events[0][:2] and events[0][5:] == (True,), events
        assert ("g", int(signal.SIGTERM)) in events, events
    finally:
        os.close(reply_r)
    sp, reply_r = _spawner_in_process()
    try:
        sp._ended(2, 0, "", spawner.node_clock() - 0.01)  # a short task: its report is not delayed
        events = _sent(sp, reply_r)
        assert events[0][:3] == ("e", 2, 0) and len(events[0]) == 5, events
    finally:
        os.close(reply_r)


def test_a_stop_signal_no_stop_follows_is_cleared() -> None:
    """A stray SIGTERM (a user's kill of the spawner) made it hold every exit 3 s, drop hand-overs and
    stop relaunching for good, silently. Now it is cleared after STOP_SIGNAL_CLEAR_SEC with no "t"."""
    rule = runner.relaunch_rule()
    sp, reply_r = _spawner_in_process(relaunch=rule)
    try:
        sp.stop_signalled(signal.SIGTERM)
        assert ("g", int(signal.SIGTERM)) in _sent(sp, reply_r)
        assert sp.stopping and sp.relaunch is None
        sp._stop_clear_at = time.monotonic() - 1  # STOP_SIGNAL_CLEAR_SEC over
        assert sp._check_stop_clear() is None
        assert not sp.stopping and sp.relaunch == rule
        assert ("g", 0) in _sent(sp, reply_r)
        sp._ended(3, 0)
        assert len(_sent(sp, reply_r)[0]) == 5, "an exit after the clear is still marked"
    finally:
        os.close(reply_r)


def test_the_launcher_logs_the_spawners_stop_signal(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="balsam.launcher.runner")
    pool = SpawnerPool(5, threading.Event())
    try:
        pool.start(1, "bash -c 'echo $$ > pid; exec sleep 30'", tmp_path, dict(os.environ))
        wait_for_task_pid(tmp_path / "pid")
        os.kill(pool.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 20
        while "got SIGINT" not in caplog.text:
            assert time.monotonic() < deadline, "no log line for the spawner's signal"
            pool.reap()
            time.sleep(0.01)
        records = [r for r in caplog.records if "got SIGINT" in r.getMessage()]
        assert len(records) == 1 and records[0].levelno == logging.WARNING
        assert f"pid {pool.proc.pid}" in records[0].getMessage()
    finally:
        pool.terminate_all(0.5)


def test_no_start_after_the_spawners_stop_signal(tmp_path: Path) -> None:
    """(a) a hand-over request that comes just after the job ahead ended (the spawner's ``freed``
    path) started the queued job on the ending allocation; (b) so did a fresh start. Now the first
    is given back unstarted and the second reported not started (held for the stop: RUN_TIMEOUT)."""
    first, second, third = tmp_path / "a1", tmp_path / "a2", tmp_path / "a3"
    for path in (first, second, third):
        path.mkdir()
    pool = SpawnerPool(5, threading.Event())
    try:
        pool.start(1, "bash -c 'trap \"exit 0\" TERM; echo $$ > pid; sleep 30 & wait'", first, dict(os.environ))
        pid = wait_for_task_pid(first / "pid")
        os.kill(pool.proc.pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not any(e[0] == "e" for e in pool.events):  # the spawner reaped it; the loop has not read it
            assert time.monotonic() < deadline, "no exit event"
            time.sleep(0.01)
        assert pool.queue_after(1, 2, "bash -c 'echo started > ran'", second, dict(os.environ))
        pool.start(3, "bash -c 'echo started > ran'", third, dict(os.environ))
        dropped: list = []
        while 2 not in dropped or 3 not in pool.held:
            assert time.monotonic() < deadline, (dropped, pool.queued, pool.held, (second / "ran").exists())
            pool.reap()
            dropped += pool.take_dropped()
            time.sleep(0.01)
        assert pool.take_started() == []
        victims, finished = pool.terminate_all(0.5)
        assert not (second / "ran").exists() and not (third / "ran").exists(), "a job started after the signal"
        assert sorted(victims) == [1, 3] and finished == [], (victims, finished)
    finally:
        pool.close()


class _Updater:
    def __init__(self) -> None:
        self.calls: list = []

    def put(self, job_id: int, state: Any, **kw: Any) -> None:
        self.calls.append((job_id, str(getattr(state, "value", state)), kw))


@pytest.mark.parametrize("reason", [getattr(spawner, "NOT_STARTED", "not started: a stop signal reached the spawner"),
                                    runner.SPAWNER_GONE + " (status -9)"])
def test_a_job_not_run_to_its_end_by_the_spawner_runs_again_whatever_its_job_out_holds(reason: str) -> None:
    """The error tail of such an exit starts with the job's output (an earlier run's, or this run's
    before its spawner died) and ends with the reason: it was RUN_ERROR -1 (FAILED by the default
    handle_error) unless job.out was empty."""
    updater = _Updater()
    runner.report_exit(updater, 7, -1, f"step 1 of 3 done\n{reason}")
    (job_id, state, kw), = updater.calls
    assert (job_id, state) == (7, "RUN_TIMEOUT"), updater.calls
