"""PostgreSQL refusing a new connection for its connection limit (``max_connections`` reached by
other clients, the slots kept for superusers, a role's or a database's CONNECTION LIMIT) is the
server being busy, not a database outage: answered 503 with Retry-After (the client retries), and
no note_outage, which would make the next sweep restart the expiry clock of every session of every
user (dead launchers' sessions, and their RUNNING jobs, outliving their expiry) while the database
was serving the pool's other connections, heartbeats among them. The texts are libpq's, as a
PostgreSQL 15 with ``max_connections=12`` answered (PostgreSQL 16 words the reserved slots'
refusal "... reserved for roles with the SUPERUSER attribute")."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest
import sqlalchemy as sa

from balsam.server import app as server_app

REFUSALS = [
    'connection to server at "127.0.0.1", port 55432 failed: FATAL:  sorry, too many clients already\n',
    'connection to server at "127.0.0.1", port 55432 failed: FATAL:  remaining connection slots are reserved '
    "for non-replication superuser connections\n",
    'connection to server at "db", port 5432 failed: FATAL:  remaining connection slots are reserved for roles '
    "with the SUPERUSER attribute\n",
    'connection to server at "db", port 5432 failed: FATAL:  too many connections for role "balsam"\n',
]


def _request(method: str = "PATCH", path: str = "/jobs/") -> Any:
    return types.SimpleNamespace(method=method, url=types.SimpleNamespace(path=path),
                                 app=types.SimpleNamespace(state=types.SimpleNamespace(engine="the engine")))


@pytest.mark.parametrize("text", REFUSALS, ids=["too-many-clients", "reserved-pg15", "reserved-pg16", "role-limit"])
def test_a_connection_limit_answers_503_and_is_no_outage(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    noted: list[Any] = []
    monkeypatch.setattr(server_app, "note_outage", noted.append)
    refused = sa.exc.OperationalError(None, None, Exception(text))
    assert not server_app._is_db_outage(refused)
    resp = asyncio.run(server_app._database_error(_request(), refused))
    assert resp.status_code == 503 and resp.headers["Retry-After"].isdigit()
    assert noted == [], "a database at its connection limit restarted the expiry clock of every session"


@pytest.mark.parametrize("method,path", [("PUT", "/sessions/1"), ("POST", "/sessions/12"),
                                         ("POST", "/sessions/12/release"), ("PUT", "/api/sessions/3/")])
def test_a_refused_heartbeat_restarts_the_expiry_clocks(monkeypatch: pytest.MonkeyPatch, method: str, path: str) -> None:
    """A heartbeat (tick, acquire, release) refused for the connection limit went unrecorded: the
    sessions' clocks restart (one expiry more at most for a dead launcher's; see
    app._refusal_silences_heartbeats), or a live launcher expired for its server's refusals."""
    noted: list[Any] = []
    monkeypatch.setattr(server_app, "note_outage", noted.append)
    resp = asyncio.run(server_app._database_error(_request(method, path), sa.exc.OperationalError(None, None, Exception(REFUSALS[0]))))
    assert resp.status_code == 503 and resp.headers["Retry-After"].isdigit()
    assert noted == ["the engine"]


def test_a_database_that_is_down_still_is_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    noted: list[Any] = []
    monkeypatch.setattr(server_app, "note_outage", noted.append)
    for text in ('connection to server at "127.0.0.1", port 55432 failed: Connection refused\n',
                 "FATAL:  the database system is starting up\n",
                 "FATAL:  terminating connection due to administrator command\n"):
        down = sa.exc.OperationalError(None, None, Exception(text))
        assert server_app._is_db_outage(down)
        assert asyncio.run(server_app._database_error(_request(), down)).status_code == 503
    assert noted == ["the engine"] * 3


def _app_whose_sweeps_are_refused(monkeypatch: pytest.MonkeyPatch, refusal: str, engine: sa.Engine) -> Any:
    """An app on ``engine`` for the lifespan's sweeper alone (every 0.5 s), each sweep refused with
    libpq's ``refusal``."""
    from starlette.applications import Starlette

    from balsam.server.acquire_waits import AcquireWaits
    from balsam.server.settings import ServerSettings

    def sweep_refused(app: object) -> None:
        raise sa.exc.OperationalError(None, None, Exception(refusal))

    monkeypatch.setattr(server_app, "_sweep_once", sweep_refused)
    app = Starlette()
    app.state.settings = ServerSettings(database_url="sqlite://", secret_key="k" * 48, session_sweep_sec=0.5)
    app.state.engine = engine
    app.state.wake_bridge, app.state.acquire_waits = None, AcquireWaits()
    return app


def test_a_sweep_refused_a_connection_for_the_limit_is_no_outage(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    """The background sweep refused its connection likewise: retried next period, no note_outage
    (the lifespan's sweeper alone, as tests/server/test_db_host_vanished.py runs it)."""
    noted: list[Any] = []
    monkeypatch.setattr(server_app, "note_outage", noted.append)
    app = _app_whose_sweeps_are_refused(monkeypatch, REFUSALS[0], sa.create_engine("sqlite://"))

    async def run_until_swept() -> None:
        async with server_app._lifespan(app):
            for _ in range(600):
                if any("weep" in record.getMessage() for record in caplog.records):
                    return
                await asyncio.sleep(0.05)

    with caplog.at_level("WARNING", logger="balsam.server"):
        asyncio.run(run_until_swept())
    line = next(r.getMessage() for r in caplog.records if "weep" in r.getMessage())
    assert "too many clients" in line and "retried next period" in line, line
    assert noted == [], "a sweep refused for the connection limit restarted the expiry clock of every session"


def test_a_sweep_refused_with_no_open_connection_is_an_outage(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The pool holds no open connection (its backends terminated, a quick restart or an idle cut
    emptied it) and PostgreSQL refuses every new one: no heartbeat can be recorded, so the sessions'
    clocks restart once it accepts one again (a live launcher expired for its server's refusals)."""
    noted: list[Any] = []
    monkeypatch.setattr(server_app, "note_outage", noted.append)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}", poolclass=sa.pool.QueuePool)
    app = _app_whose_sweeps_are_refused(monkeypatch, REFUSALS[1], engine)

    async def run_until_noted() -> None:
        async with server_app._lifespan(app):
            for _ in range(600):
                if noted:
                    return
                await asyncio.sleep(0.05)

    asyncio.run(run_until_noted())
    assert noted and noted[0] is engine, "a sweep refused with no open connection left the expiry clocks running"
