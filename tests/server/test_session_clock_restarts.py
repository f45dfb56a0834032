"""The expiry clock restart after a server start or a database outage, with several worker processes.

Every server process restarted the clock of every stale session at its first sweep (its "start"),
so workers that a process manager recycles more often than the session expiry (``--max-requests``,
a crashed worker) kept a dead launcher's session, and the jobs it held, forever. A new worker is
modelled here by what it is to this code: the module's per-process state, empty. And a pool
timeout (busy, not down) counted as a database outage, which restarted every clock under load.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import types
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import HAND_SWEPT_EXPIRY_SEC

from balsam.server import app as server_app
from balsam.server import sessions_logic
from balsam.server.db import write_tx
from balsam.server.tables import sessions

EXPIRE_SEC = HAND_SWEPT_EXPIRY_SEC  # the hand_swept_server's


def _heartbeats(engine: sa.Engine) -> dict[int, dt.datetime]:
    with engine.connect() as conn:
        return {row.id: row.heartbeat for row in conn.execute(sa.select(sessions.c.id, sessions.c.heartbeat))}


def _age(engine: sa.Engine, ids: list[int], seconds: int) -> None:
    """As if ``seconds`` had passed for these sessions (whole seconds: the microseconds, which tell
    a clock restart from a heartbeat, are kept)."""
    with write_tx(engine) as conn:
        for session_id, beat in _heartbeats(engine).items():
            if session_id in ids:
                conn.execute(sa.update(sessions).where(sessions.c.id == session_id)
                             .values(heartbeat=beat - dt.timedelta(seconds=seconds)))


def _sweep(engine: sa.Engine, *, new_worker: bool) -> None:
    if new_worker:
        sessions_logic._swept_since_outage.clear()  # a new process: nothing swept yet
    with write_tx(engine) as conn:
        sessions_logic.sweep_expired(conn, EXPIRE_SEC)


def test_new_workers_do_not_keep_a_dead_launchers_session_alive(hand_swept_server: Any) -> None:
    engine = hand_swept_server.app.state.engine
    dead = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    live = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    _age(engine, [dead, live], 30)
    before = _heartbeats(engine)
    _sweep(engine, new_worker=True)  # the server (re)starts: both clocks restarted
    assert all(beat > before[i] + dt.timedelta(seconds=20) for i, beat in _heartbeats(engine).items())
    assert hand_swept_server.put(f"/sessions/{live}", json={}).status_code == 200  # the live launcher heartbeats
    _age(engine, [dead, live], 50)
    _sweep(engine, new_worker=True)  # a worker recycled while the others served
    _age(engine, [dead, live], 20)  # 70 s since the dead launcher's clock restart, 20 s since the new worker
    _sweep(engine, new_worker=False)
    left = _heartbeats(engine)
    assert dead not in left, "a new worker restarted the dead launcher's clock again: it never expires"
    # A session that heartbeated since the first restart is covered by the next one (a real outage
    # or restart would have cost it that time).
    assert live in left


def test_a_pool_timeout_answers_503_and_is_no_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    noted: list[Any] = []
    monkeypatch.setattr(server_app, "note_outage", noted.append)
    request = types.SimpleNamespace(method="PUT", url=types.SimpleNamespace(path="/sessions/1"),
                                    app=types.SimpleNamespace(state=types.SimpleNamespace(engine="the engine")))
    busy = sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out")
    resp = asyncio.run(server_app._database_error(request, busy))
    assert resp.status_code == 503 and resp.headers["Retry-After"].isdigit()
    assert noted == [], "a busy pool restarted the expiry clock of every session"
    down = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    assert asyncio.run(server_app._database_error(request, down)).status_code == 503
    assert noted == ["the engine"]  # a lost connection still is an outage
