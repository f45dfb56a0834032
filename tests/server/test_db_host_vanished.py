"""A database host that vanishes without closing its connections (power loss, a network partition,
a fail-over that moves its address) is given up on in bounded time: every PostgreSQL connection of
the server, the pool's and the acquire listener's, carries libpq's connect timeout, TCP keepalives
and TCP user timeout (db.PG_CONNECT_DEFAULTS), unless the database URL sets them.

Measured in a drill (a private cluster reached through a veth pair into a network namespace whose
host side was set down for 150 s, every packet dropped; 20 clients sending job updates): without
them, nothing was answered for the first 135 s (each request's thread hung on its connection
attempt, the kernel's SYN retries, or on its pooled connection, TCP retransmissions: ~15 min for a
host that never comes back), then 19 requests got 503 and one hung until the link came back; with
them, every request was answered 503 with Retry-After within ~10 s throughout, and the first one
after the link came back succeeded. The drill needs root and a network namespace; these tests check
the parameters on real connections. Also: a background sweep during an outage logs one line."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import sqlalchemy as sa

from balsam.server.acquire_notify import WakeBridge
from balsam.server.acquire_waits import AcquireWaits
from balsam.server.db import create_db_engine

_PARAMS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
           "tcp_user_timeout")


DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py


def _pg_url(query: str = "") -> str:
    url = os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    return url + ("&" if "?" in url else "?") + query if query else url


@pytest.fixture
def engine_of() -> Iterator:
    engines: list[sa.Engine] = []

    def make(url: str) -> sa.Engine:
        engines.append(create_db_engine(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


def _params(dbapi_connection: object) -> dict[str, str]:
    params = dbapi_connection.get_dsn_parameters()  # type: ignore[attr-defined]
    return {name: params.get(name) for name in _PARAMS}


@pytest.mark.postgres
def test_pooled_connections_give_up_on_a_vanished_host(engine_of) -> None:  # noqa: ANN001
    with engine_of(_pg_url()).connect() as conn:
        params = _params(conn.connection.dbapi_connection)
    # Before: {'connect_timeout': None, 'keepalives': None, ..., 'tcp_user_timeout': None}.
    assert params == {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                      "keepalives_count": "3", "tcp_user_timeout": "60000"}


@pytest.mark.postgres
def test_the_database_urls_own_values_win(engine_of) -> None:  # noqa: ANN001
    with engine_of(_pg_url("connect_timeout=3&tcp_user_timeout=5000")).connect() as conn:
        params = _params(conn.connection.dbapi_connection)
    assert params["connect_timeout"] == "3" and params["tcp_user_timeout"] == "5000"
    assert params["keepalives_idle"] == "30"  # the defaults of what it does not set


@pytest.mark.postgres
def test_the_acquire_listener_gives_up_on_a_vanished_host(engine_of) -> None:  # noqa: ANN001
    # Its ping after 30 s of silence hung as long as a pooled connection's (deaf meanwhile).
    bridge = WakeBridge(engine_of(_pg_url("keepalives_count=5")), AcquireWaits())
    conn = bridge._connect()
    try:
        params = _params(conn)
    finally:
        conn.close()
    assert params == {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                      "keepalives_count": "5", "tcp_user_timeout": "60000"}


def test_a_sweep_during_an_outage_is_logged_in_one_line(monkeypatch, caplog) -> None:  # noqa: ANN001
    """A failed background sweep during an outage was logged with its whole traceback (~70 lines)
    every period, beside the one line each request's 503 gets (a fault of ours keeps its traceback)."""
    import asyncio
    
    from starlette.applications import Starlette

    from balsam.server import app as app_module
    from balsam.server.acquire_waits import AcquireWaits
    from balsam.server.settings import ServerSettings

    def sweep_in_outage(app: object) -> None:
        raise sa.exc.OperationalError("COMMIT", {}, Exception(
            'connection to server at "db.example.org" (10.0.0.5), port 5432 failed: timeout expired\n'))

    monkeypatch.setattr(app_module, "_sweep_once", sweep_in_outage)
    # The lifespan's sweeper alone (no routes, no schema): its period is at least 0.5 s.
    app = Starlette()
    app.state.settings = ServerSettings(database_url="sqlite://", secret_key="k" * 48, session_sweep_sec=0.5)
    app.state.engine = sa.create_engine("sqlite://")
    app.state.wake_bridge, app.state.acquire_waits = None, AcquireWaits()

    def sweep_logged() -> bool:
        return any("weep" in record.getMessage() for record in caplog.records)

    async def run_until_swept() -> None:
        async with app_module._lifespan(app):
            for _ in range(600):
                if sweep_logged():
                    return
                await asyncio.sleep(0.05)

    with caplog.at_level("WARNING", logger="balsam.server"):
        asyncio.run(run_until_swept())
    outage = next(r for r in caplog.records if "weep" in r.getMessage())
    assert outage.exc_info is None, "the outage's sweep was logged with its traceback"
    assert outage.getMessage() == ('Session sweep not done: the database is unavailable (connection to server at '
                                   '"db.example.org" (10.0.0.5), port 5432 failed: timeout expired); retried next period')
