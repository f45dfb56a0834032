"""A connection-limit refusal that keeps launchers' heartbeats from being recorded is an outage to
the sessions' expiry clocks (app._refusal_silences_heartbeats). Counted as 'busy' alone, a live
launcher whose heartbeats PostgreSQL refused (max_connections reached while the server's pool had
lost its connections: backends terminated, a quick restart, an idle connection cut) saw its session
expire and its RUNNING job go to RUN_TIMEOUT and run again while the first run went on (reproduced
with a real PostgreSQL at max_connections 12 and a launcher heartbeating every second through a
20 s spell: 404 Session not found, RUN_TIMEOUT). Here the refusal is PostgreSQL's own text, raised
by the pool's connect on the real database; the spell's length is set on the session's heartbeat."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from server_testlib import HAND_SWEPT_EXPIRY_SEC

from balsam.server import sessions_logic
from balsam.server.db import write_tx
from balsam.server.tables import jobs, sessions

REFUSED = 'connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many clients already\n'


def _refuse_new_connections(engine: sa.Engine) -> Any:
    import psycopg2

    def refuse(*_args: Any) -> None:
        raise psycopg2.OperationalError(REFUSED)

    engine.pool.dispose()  # the pool lost its connections (terminated backends, a quick restart)
    event.listen(engine, "do_connect", refuse)
    return lambda: event.remove(engine, "do_connect", refuse)


def _running_job(tc: Any) -> tuple[int, int]:
    app = tc.post("/apps/", json={"site_id": tc.site["id"], "name": "A", "serialized_class": "", "source_code": ""}).json()
    job = tc.post("/jobs/", json=[{"workdir": "w/0", "app_id": app["id"]}]).json()[0]["id"]
    tc.patch("/jobs/", json=[{"id": job, "state": "PREPROCESSED"}]).raise_for_status()
    session = tc.post("/sessions/", json={"site_id": tc.site["id"]}).json()["id"]
    assert [j["id"] for j in tc.post(f"/sessions/{session}", json={"max_num_jobs": 1}).json()] == [job]
    tc.patch("/jobs/", json=[{"id": job, "state": "RUNNING", "session_id": session}]).raise_for_status()
    return session, job


def _age(conn: sa.Connection, session: int) -> None:
    """As if twice the expiry had passed since the session's last heartbeat."""
    conn.execute(sa.text("UPDATE sessions SET heartbeat = heartbeat - make_interval(secs => :s) WHERE id = :id"),
                 {"s": 2 * HAND_SWEPT_EXPIRY_SEC, "id": session})


def _sweep(engine: sa.Engine) -> None:
    with write_tx(engine) as conn:
        sessions_logic.sweep_expired(conn, HAND_SWEPT_EXPIRY_SEC)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("path", ["tick", "acquire"])
def test_refused_heartbeats_do_not_expire_a_live_launcher(hand_swept_server: Any, path: str) -> None:
    tc = hand_swept_server
    engine = tc.app.state.engine
    session, job = _running_job(tc)
    _sweep(engine)  # this process swept the database: its start-up clock restart is spent
    restore = _refuse_new_connections(engine)
    try:
        answer = (tc.put(f"/sessions/{session}", json={"job_ids": [job]}) if path == "tick"
                  else tc.post(f"/sessions/{session}", json={"max_num_jobs": 1}))
    finally:
        restore()
    assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
    with write_tx(engine) as conn:  # the spell lasted longer than the expiry
        _age(conn, session)
    _sweep(engine)
    with engine.connect() as conn:
        kept = conn.execute(sa.select(sessions.c.id).where(sessions.c.id == session)).first()
        state = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job)).scalar_one()
    assert kept is not None and state == "RUNNING", (
        f"a live launcher's session expired for heartbeats its server could not record (job {state})")
    assert tc.put(f"/sessions/{session}", json={"job_ids": [job]}).status_code == 200


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_refusal_of_another_request_with_open_connections_stays_busy(hand_swept_server: Any) -> None:
    """The pool still holds a connection, which serves the heartbeats: a refused job listing is no
    outage, and a dead launcher's session expires on time."""
    import psycopg2

    tc = hand_swept_server
    engine = tc.app.state.engine
    session, job = _running_job(tc)
    _sweep(engine)
    held = engine.connect()  # the pool holds an open connection (checked out by another request)

    def refuse(*_args: Any) -> None:
        raise psycopg2.OperationalError(REFUSED)

    event.listen(engine, "do_connect", refuse)
    try:
        assert tc.get("/jobs/").status_code == 503
    finally:
        event.remove(engine, "do_connect", refuse)
        held.close()
    with write_tx(engine) as conn:
        _age(conn, session)
    _sweep(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sessions.c.id).where(sessions.c.id == session)).first() is None
        assert conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job)).scalar_one() == "RUN_TIMEOUT"
