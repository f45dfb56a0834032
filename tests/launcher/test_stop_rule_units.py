"""The launcher's stop rule, unit by unit, without MPI, processes or a server.

The rule (``balsam.launcher.runner.ended_by_stop``; module docstrings of modes.mpi and
modes.serial_worker): an exit at or after the launcher's stop is RUN_TIMEOUT whatever its code; at
a signal stop (the scheduler's SIGTERM/SIGINT, a refused credential) an exit reaped after it that
ended up to STOP_WINDOW_SEC before it is RUN_TIMEOUT too, and so is an exit by a stop signal in
that window; at the launcher's own wall-time or idle stop an exit before it is the job's own result
(RUN_DONE, RUN_ERROR). An exit by a stop signal is held STOP_SIGNAL_HOLD_SEC in its pool before it
is reported, so no RUN_ERROR of it is queued while a stop may still claim it.

Here: the pure rule, the pools' hold, mpi mode's reap at a signal stop and its shutdown at either
kind of stop, and the serial master's judgement of a rank's ``reaped_at_stop`` exits.
"""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path
from typing import Any, Optional

import pytest

from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes.serial_worker import Worker
from balsam.launcher.runner import (
    STOP_SIGNAL_EXITS, STOP_SIGNAL_HOLD_SEC, STOP_WINDOW_SEC, ended_by_stop, settle_exits,
)
from launcher_helpers import FakePool, mpi_mode
from test_serial_master import RecordingUpdater, make_master

STOP = 1_000_000.0  # a stop's time (time.time() clock); exits are placed around it
INSIDE = STOP - STOP_WINDOW_SEC + 0.5  # within the window before the stop
BEFORE = STOP - STOP_WINDOW_SEC - 5.0  # earlier than the window


@pytest.mark.parametrize("rc", [0, 3, -15, 143])
@pytest.mark.parametrize("signal_stop", [True, False])
def test_an_exit_at_or_after_the_stop_is_the_stops_whatever_its_code(rc: int, signal_stop: bool) -> None:
    for ended in (STOP, STOP + 0.1):
        assert ended_by_stop(rc, ended, STOP, signal_stop=signal_stop)
        assert ended_by_stop(rc, ended, STOP, reaped_after_stop=True, signal_stop=signal_stop)


@pytest.mark.parametrize("rc", [-15, 143, -9, -2])
def test_a_stop_signal_exit_within_the_window_before_a_signal_stop_is_the_stops(rc: int) -> None:
    assert rc in STOP_SIGNAL_EXITS
    assert ended_by_stop(rc, INSIDE, STOP, signal_stop=True)
    assert not ended_by_stop(rc, BEFORE, STOP, signal_stop=True)  # earlier: the job's own (a user's kill)


@pytest.mark.parametrize("rc", [0, 3])
def test_at_a_signal_stop_another_exit_in_the_window_is_the_stops_only_if_reaped_after_it(rc: int) -> None:
    assert ended_by_stop(rc, INSIDE, STOP, reaped_after_stop=True, signal_stop=True)
    assert not ended_by_stop(rc, INSIDE, STOP, reaped_after_stop=False, signal_stop=True)  # reported before it
    assert not ended_by_stop(rc, BEFORE, STOP, reaped_after_stop=True, signal_stop=True)


@pytest.mark.parametrize("rc", [0, 3, -15, 143])
def test_before_a_wall_time_or_idle_stop_every_exit_is_the_jobs_own(rc: int) -> None:
    assert not ended_by_stop(rc, INSIDE, STOP, reaped_after_stop=True, signal_stop=False)
    assert not ended_by_stop(rc, STOP - 0.01, STOP, reaped_after_stop=True, signal_stop=False)


def test_no_stop_or_no_end_time() -> None:
    assert not ended_by_stop(-15, STOP, None)
    assert ended_by_stop(0, None, STOP, reaped_after_stop=True, signal_stop=True)
    assert not ended_by_stop(0, None, STOP, reaped_after_stop=True, signal_stop=False)
    assert not ended_by_stop(-15, None, STOP, reaped_after_stop=False, signal_stop=True)


class Proc:
    """What settle_exits reads of an exited task."""

    def __init__(self, job_id: int, returncode: int, workdir: Path) -> None:
        self.job_id, self.returncode, self.workdir, self.end_time = job_id, returncode, workdir, STOP

    def tail(self, n: int) -> str:
        return "out"


def test_a_stop_signal_exit_is_held_for_the_window_before_it_is_reported(tmp_path: Path) -> None:
    """A -15 exit stays in ``running`` (resources held) and is not a finished record until it has
    been held STOP_SIGNAL_HOLD_SEC; an exit 3 is reported at once."""
    assert STOP_SIGNAL_HOLD_SEC >= STOP_WINDOW_SEC
    killed, failed = Proc(1, -15, tmp_path), Proc(2, 3, tmp_path)
    running: dict[int, Any] = {1: killed, 2: failed}
    held: dict[int, float] = {}
    finished = settle_exits([killed, failed], running, held, 5)
    assert [r[0] for r in finished] == [2] and 1 in running and 1 in held
    assert settle_exits([], running, held, 5) == []  # still within the hold
    held[1] = time.monotonic() - STOP_SIGNAL_HOLD_SEC  # noticed a whole hold ago
    finished = settle_exits([], running, held, 5)
    assert [(r[0], r[1]) for r in finished] == [(1, -15)] and not running and not held


# -- mpi mode ------------------------------------------------------------------------------------

class Updater:
    def __init__(self) -> None:
        self.updates: list[tuple[int, str, dict[str, Any]]] = []

    def put(self, job_id: int, state: Any, state_data: Optional[dict] = None, **kw: Any) -> None:
        self.updates.append((job_id, str(getattr(state, "value", state)), state_data or {}))

    def put_updates(self, updates: list[dict]) -> None:
        for u in updates:
            self.put(u["id"], u["state"], u.get("state_data"))

    def last(self, job_id: int) -> tuple[str, dict[str, Any]]:
        rows = [(s, d) for j, s, d in self.updates if j == job_id]
        assert len(rows) == 1, rows  # each exit reported once
        return rows[0]


class StopPool(FakePool):
    """The pool at the stop: ``reaped`` come out of the next reap(), ``at_stop`` (victims, exits)
    out of terminate_all()."""

    def __init__(self, wake: threading.Event, reaped: list, at_stop: tuple[list[int], list]) -> None:
        super().__init__(wake)
        self.exits = list(reaped)
        self.at_stop = at_stop

    def terminate_all(self, grace: float) -> tuple[list[int], list]:
        return self.at_stop


def _mode(tmp_path: Path, reaped: list = (), at_stop: tuple[list[int], list] = ([], [])) -> Any:
    mode = mpi_mode(tmp_path)
    mode.pool = StopPool(mode.wake, list(reaped), at_stop)
    mode.handover.pool = mode.pool
    return mode


def _signal_stop(mode: Any) -> float:
    mode.stop.request("signal 15")
    assert mode.stop.requested_at is not None
    return mode.stop.requested_at


def test_mpi_exits_reaped_after_a_signal_stop(tmp_path: Path) -> None:
    """The loop's reap after a stop signal came (before its stop check saw it)."""
    mode = _mode(tmp_path)
    stop = _signal_stop(mode)
    inside = stop - STOP_WINDOW_SEC + 0.5
    before = stop - STOP_WINDOW_SEC - 5
    mode.pool.exits = [(1, -15, "", inside), (2, 0, "", inside), (3, 3, "boom", inside),
                       (4, 0, "", before), (5, -15, "killed", before), (6, 0, "", stop + 0.2)]
    updater = Updater()
    assert mode._reap(updater) == 6
    for job_id in (1, 2, 3, 6):
        state, data = updater.last(job_id)
        assert state == "RUN_TIMEOUT" and data["reason"].startswith("launcher stopped (signal 15)"), (job_id, data)
    assert updater.last(4)[0] == "RUN_DONE"
    state, data = updater.last(5)
    assert state == "RUN_ERROR" and data["returncode"] == -15


def test_mpi_shutdown_at_a_signal_stop(tmp_path: Path) -> None:
    mode = _mode(tmp_path)
    stop = _signal_stop(mode)
    mode.pool.at_stop = ([7], [(1, 0, "", stop - 1.0), (2, -15, "", stop - 2.0), (3, 2, "x", stop + 1.0),
                              (4, 0, "", stop - STOP_WINDOW_SEC - 1.0), (5, 1, "own", stop - STOP_WINDOW_SEC - 1.0)])
    updater = Updater()
    mode._shutdown(updater, "signal 15")
    for job_id in (1, 2, 3, 7):
        state, data = updater.last(job_id)
        assert state == "RUN_TIMEOUT" and data["reason"].startswith("launcher stopped (signal 15)"), (job_id, data)
    assert "exit code 0" in updater.last(1)[1]["reason"]
    assert updater.last(4)[0] == "RUN_DONE"
    assert updater.last(5) == ("RUN_ERROR", {"returncode": 1, "error": "own"})


@pytest.mark.parametrize("reason", ["wall time", "idle"])
def test_mpi_shutdown_at_its_own_stop_leaves_earlier_exits_to_the_job(tmp_path: Path, reason: str) -> None:
    """Nothing outside signalled the jobs: an exit 0 the loop had not reaped is RUN_DONE, a -15 a
    second before is the job's RUN_ERROR; what ended at or after the stop, or was ended by it, runs again."""
    mode = _mode(tmp_path)
    stop = time.time()
    mode._stopped_at = stop
    assert not mode.stop.requested
    mode.pool.at_stop = ([9], [(1, 0, "", stop - 0.5), (2, -15, "", stop - 1.0), (3, 0, "", stop + 0.5)])
    updater = Updater()
    mode._shutdown(updater, reason)
    assert updater.last(1)[0] == "RUN_DONE"
    assert updater.last(2)[0] == "RUN_ERROR"
    for job_id in (3, 9):
        state, data = updater.last(job_id)
        assert state == "RUN_TIMEOUT" and data["reason"].startswith(f"launcher stopped ({reason})"), (job_id, data)


# -- serial mode ---------------------------------------------------------------------------------

@pytest.fixture
def master(tmp_path: Path) -> Any:
    master, _, _, transport = make_master(tmp_path, [], nodes=2, cpus=1, idle_ttl=60)
    yield master
    master.prefetcher.stop()


def _rank_reports_at_stop(master: Any, stop: float, reason: str) -> RecordingUpdater:
    """Rank 1 ran jobs 1-6 and answers the stop message with its pool's unreaped exits."""
    master.remote.update({i: 1 for i in range(1, 7)})
    master.transport.inbox.append((1, {
        "done": [],
        "reaped_at_stop": [(1, 0, "", stop - 1.0), (2, -15, "", stop - 1.0), (3, 3, "boom", stop - 1.0),
                           (4, 0, "", stop + 0.5), (5, 0, "", stop - STOP_WINDOW_SEC - 2.0)],
        "killed": [6], "final": True,
    }))
    master._collect_final_reports(reason, 5.0)
    return master.updater


def test_serial_reaped_at_stop_exits_at_a_signal_stop(master: Any) -> None:
    master.stop.request("signal 15")
    updater = _rank_reports_at_stop(master, master.stop.requested_at, "signal 15")
    for job_id in (1, 2, 3, 4, 6):
        assert updater.states(job_id) == ["RUN_TIMEOUT"], (job_id, updater.updates)
    assert updater.states(5) == ["RUN_DONE"]
    assert not master.remote


def test_serial_reaped_at_stop_exits_at_a_wall_time_stop(master: Any) -> None:
    stop = time.time()
    master._stop_reason, master._stopped_at = "wall time", stop
    updater = _rank_reports_at_stop(master, stop, "wall time")
    assert updater.states(1) == ["RUN_DONE"] and updater.states(5) == ["RUN_DONE"]
    assert updater.states(2) == ["RUN_ERROR"] and updater.states(3) == ["RUN_ERROR"]
    for job_id in (4, 6):
        assert updater.states(job_id) == ["RUN_TIMEOUT"], (job_id, updater.updates)
    reasons = [d["reason"] for j, s, d in updater.updates if s == "RUN_TIMEOUT"]
    assert all(r.startswith("launcher stopped (wall time)") for r in reasons), reasons


class WorkerTransport:
    def __init__(self, stop_msg: dict[str, Any]) -> None:
        self.inbox = [stop_msg]
        self.reports: list[dict[str, Any]] = []

    def receive(self) -> Optional[dict[str, Any]]:
        return self.inbox.pop(0) if self.inbox else None

    def report(self, msg: dict[str, Any]) -> None:
        self.reports.append(msg)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("own_signal", [False, True])
def test_a_worker_rank_reports_its_unreaped_exits_at_the_stop_message(own_signal: bool) -> None:
    """With no stop signal of its own, a rank hands its pool's exits to the master as
    ``reaped_at_stop`` (with their end times: the master judges them); after its own stop signal
    every exit is the stop's (``killed``), never ``done``."""
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 60, wake)
    if own_signal:
        stop.request("signal 15")
    finished = [(1, 0, "", STOP), (2, -15, "", STOP)]
    pool = types.SimpleNamespace(terminate_all=lambda grace: ([3], list(finished)), running={}, held={})
    transport = WorkerTransport({"stop": "wall time", "grace": 1})
    assert Worker(transport, wake, stop, pool).run() == 0  # type: ignore[arg-type]
    (report,) = transport.reports
    assert report["final"] and report["done"] == []
    if own_signal:
        assert sorted(report["killed"]) == [1, 2, 3] and not report.get("reaped_at_stop")
    else:
        assert report["killed"] == [3] and report["reaped_at_stop"] == finished
