"""The sweep that finds that its server process stood still (sessions_logic, "A server process that
stood still") against a concurrent sweep, and against a stop inside the sweep itself.

The sweep took the watch's gap (resetting it) and only later, after stall_limit() and the warning's
log write (which may block), counted the databases unswept: a concurrent sweep in between found no
gap, the database still swept, skipped the clock restart and expired every session with the cutoff
of after the stand-still, live launchers' too. And it read the time before it took the gap: a stop
between the two restarted the clocks at the time of before the stop, and the next sweep expired them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import HAND_SWEPT_EXPIRY_SEC

from balsam.server import sessions_logic
from balsam.server.db import write_tx
from balsam.server.tables import sessions

EXPIRE_SEC = HAND_SWEPT_EXPIRY_SEC  # the hand_swept_server's
STOOD_STILL_SEC = 70  # longer than the expiry
#: Guards the test against a hang only (a failed wait is reported, nothing is timed).
HANG_SEC = 30


def _sweep(engine: sa.Engine) -> int:
    with write_tx(engine) as conn:
        return sessions_logic.sweep_expired(conn, EXPIRE_SEC)


def _session_row(engine: sa.Engine, session_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(sessions).where(sessions.c.id == session_id)).first()


class _HoldTheWarning(logging.Handler):
    """Holds the thread named ``holder`` in its stand-still warning (a log write that blocks) until
    released."""

    def __init__(self, holder: str) -> None:
        super().__init__(logging.WARNING)
        self.holder = holder
        self.held, self.go_on = threading.Event(), threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread().name == self.holder and "stood still" in record.getMessage():
            self.held.set()
            self.go_on.wait(HANG_SEC)


# Concurrent sweeps run together on PostgreSQL only (SQLite's BEGIN IMMEDIATE serializes them).
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_sweep_beside_the_one_that_found_the_stand_still_restarts_the_clocks(hand_swept_server: Any) -> None:
    engine = hand_swept_server.app.state.engine
    _sweep(engine)  # this process has swept (and watches its clock)
    live = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    # The process stood still: the launcher's last heartbeat heard is older than the expiry, its
    # later ones wait in the socket backlog; the watch thread noted the gap at the resume.
    with write_tx(engine) as conn:
        conn.execute(sa.update(sessions).where(sessions.c.id == live)
                     .values(heartbeat=sessions_logic.utcnow() - dt.timedelta(seconds=STOOD_STILL_SEC - 5)))
    with sessions_logic._process_watch._lock:
        sessions_logic._process_watch._gap = float(STOOD_STILL_SEC)

    hold = _HoldTheWarning("X")
    sessions_logic.logger.addHandler(hold)
    level = sessions_logic.logger.level
    sessions_logic.logger.setLevel(logging.INFO)
    swept: dict[str, int] = {}

    def sweep(name: str) -> None:
        swept[name] = _sweep(engine)

    x = threading.Thread(target=sweep, args=("X",), name="X")  # the sweep that takes the gap
    try:
        x.start()
        assert hold.held.wait(HANG_SEC), "sweep X did not find the stand-still"
        y = threading.Thread(target=sweep, args=("Y",), name="Y")  # a request's sweep meanwhile
        y.start()
        y.join()
    finally:
        hold.go_on.set()
        x.join()
        sessions_logic.logger.removeHandler(hold)
        sessions_logic.logger.setLevel(level)
    assert swept == {"X": 0, "Y": 0}
    row = _session_row(engine, live)
    assert row is not None and row.clock_restarted
    assert hand_swept_server.put(f"/sessions/{live}", json={}).status_code == 200  # the launcher heartbeats again


def test_a_stop_inside_the_sweep_does_not_restart_the_clocks_at_the_time_before_it(
        hand_swept_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = hand_swept_server.app.state.engine
    _sweep(engine)  # this process has swept (and watches its clock)
    live = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    # The process is stopped in the sweep just as it takes the watch's gap (the sweep may take it
    # before the watch thread, both resuming): the wall clock moved on meanwhile.
    stopped = dt.timedelta()
    real_utcnow, real_take_gap = sessions_logic.utcnow, sessions_logic._process_watch.take_gap

    def stop_then_take_gap(*args: Any) -> Any:
        nonlocal stopped
        if not stopped:
            stopped = dt.timedelta(seconds=STOOD_STILL_SEC)
            with sessions_logic._process_watch._lock:
                sessions_logic._process_watch._gap = float(STOOD_STILL_SEC)
        return real_take_gap(*args)

    monkeypatch.setattr(sessions_logic, "utcnow", lambda: real_utcnow() + stopped)
    monkeypatch.setattr(sessions_logic._process_watch, "take_gap", stop_then_take_gap)
    assert _sweep(engine) == 0  # the sweep resumes: it restarts the clocks
    row = _session_row(engine, live)
    assert row is not None and row.clock_restarted
    # The next sweep, before the launcher's heartbeats waiting in the backlog are served.
    assert _sweep(engine) == 0
    assert _session_row(engine, live) is not None
    assert hand_swept_server.put(f"/sessions/{live}", json={}).status_code == 200


def test_a_process_forked_while_the_watch_was_locked_still_sweeps() -> None:
    """A server forked (a process manager's worker) while a thread of the parent held the watch's
    lock: the child's copy of the lock stayed locked, and its first sweep waited forever."""
    watch = sessions_logic._process_watch
    locked, forked = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with watch._lock:
            locked.set()
            forked.wait(HANG_SEC)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert locked.wait(HANG_SEC)
    child = os.fork()
    if child == 0:  # the child: exits 0 if it gets the lock its sweeps take
        try:
            os._exit(0 if watch._lock.acquire(timeout=HANG_SEC) else 1)
        finally:
            os._exit(2)
    forked.set()
    holder.join()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked process's sweep would wait for the watch's lock forever"
