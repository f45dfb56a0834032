"""Which start-up database errors a server waits for (``transient``: up to 60 s, then exit 4, which a
--workers supervisor restarts) and which it refuses at once (``permanent``: one line, exit 3, the
supervisor stops). libpq's errors while connecting carry no SQLSTATE, and all of them were waited
for: a misconfiguration (SSL required of a server without it, a missing root certificate, an
unknown server option, a misspelled host) waited 60 s, exited 4 and was restarted for ever. The
real driver's exceptions, real PostgreSQL and SQLite."""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from balsam.server.app import _database_problem

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py


def _pg(query: str = "", database: str = "postgres") -> str:
    url = sa.engine.make_url(os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL))
    url = url.set(drivername="postgresql+psycopg2", database=database)
    return url.render_as_string(hide_password=False) + query


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _error(url: str, sql: str = "SELECT 1", **kw: object) -> sa.exc.DBAPIError:
    engine = sa.create_engine(url, **kw)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(sql))
    except sa.exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    pytest.fail(f"connected to {url}")


@pytest.mark.postgres
@pytest.mark.parametrize("query", [
    "?sslmode=require",  # the test server has no SSL
    "?sslmode=verify-full&sslrootcert=/nonexistent/f4/root.crt",
    "?options=-cstatement_timeoutx%3D1",  # "unrecognized configuration parameter"
], ids=["ssl-required", "root-cert-missing", "unknown-option"])
def test_a_misconfigured_connection_is_refused_not_waited_for(query: str) -> None:
    exc = _error(_pg(query))
    assert getattr(exc.orig, "pgcode", None) is None  # the words are all there is
    assert _database_problem(exc) == "permanent", str(exc.orig).splitlines()[0]


def test_a_host_name_that_does_not_exist_is_refused_not_waited_for() -> None:
    exc = _error("postgresql+psycopg2://balsam@no-such-host-f4.invalid:5432/balsam")
    assert "could not translate host name" in str(exc.orig)
    assert _database_problem(exc) == "permanent", str(exc.orig).splitlines()[0]


def test_a_refused_connection_is_still_waited_for() -> None:
    exc = _error(f"postgresql+psycopg2://balsam@127.0.0.1:{_free_port()}/balsam")
    assert "Connection refused" in str(exc.orig)
    assert _database_problem(exc) == "transient"


@pytest.mark.postgres
def test_a_database_closed_to_connections_for_now_is_still_waited_for() -> None:
    """As during maintenance (and as tests/server/test_f2_worker_start_during_db_outage.py's outage)."""
    admin = sa.create_engine(_pg(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS f4_closed")
            conn.exec_driver_sql("CREATE DATABASE f4_closed ALLOW_CONNECTIONS false")
        try:
            exc = _error(_pg(database="f4_closed"))
            assert "is not currently accepting connections" in str(exc.orig)
            assert _database_problem(exc) == "transient"
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql("DROP DATABASE IF EXISTS f4_closed")
    finally:
        admin.dispose()


def test_a_sqlite_database_locked_by_another_writer_is_waited_for_not_a_fault(tmp_path: Path) -> None:
    """A fault prints a traceback and exits 3 (a --workers supervisor stops for good) while another
    process (a migration, a long write) holds the lock a moment longer than the busy timeout."""
    path = tmp_path / "balsam.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        exc = _error(f"sqlite:///{path}", "SELECT count(*) FROM t", connect_args={"timeout": 0})
        assert "database is locked" in str(exc.orig)
        assert _database_problem(exc) == "transient"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
