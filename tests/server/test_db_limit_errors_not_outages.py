"""A statement past one of the database's own limits fails the same way on every retry: it is
answered 500, not 503 "The database is unavailable; retry shortly". Both were taken for outages
(SQLite's "too many SQL variables", which a create naming more than 32,766 distinct parents met;
PostgreSQL's SQLSTATE class 54, program limit exceeded, which psycopg2 raises as OperationalError),
so clients retried them until their time budget ran out and every session's expiry clock was
restarted as for a real outage. The errors here are the databases' own, raised by real statements."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from balsam.server import app as server_app


def _sqlite_too_many_variables() -> sa.exc.OperationalError:
    engine = sa.create_engine("sqlite://")

    @sa.event.listens_for(engine, "connect")
    def _low_limit(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)

    binds = {f"p{i}": i for i in range(20)}
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.OperationalError, match="too many SQL variables") as caught:
            conn.execute(sa.text("SELECT 1 WHERE 1 IN (" + ", ".join(f":{name}" for name in binds) + ")"), binds)
    finally:
        engine.dispose()
    return caught.value


def _postgres_program_limit(url: str) -> sa.exc.OperationalError:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.OperationalError, match="more than 100 arguments") as caught:
            conn.execute(sa.text("SELECT concat(" + ", ".join(str(i) for i in range(101)) + ")"))
    finally:
        engine.dispose()
    assert caught.value.orig.pgcode == "54023"
    return caught.value


def _answer(exc: Exception) -> Any:
    """What the server's handler of database errors answers for ``exc``."""
    def raising(_request: Request) -> Any:
        raise exc

    app = Starlette(routes=[Route("/x", raising)], exception_handlers={sa.exc.OperationalError: server_app._database_error})
    app.state.engine = None
    with TestClient(app, raise_server_exceptions=False) as client:
        return client.get("/x")


def test_sqlite_too_many_variables_is_a_fault_not_an_outage() -> None:
    error = _sqlite_too_many_variables()
    assert not server_app._is_db_outage(error)
    answer = _answer(error)
    assert answer.status_code == 500, answer.text
    assert "retry" not in answer.text.lower()


@pytest.mark.postgres
def test_postgres_program_limit_is_a_fault_not_an_outage() -> None:
    error = _postgres_program_limit(os.environ.get("BALSAM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/balsam_test"))
    assert not server_app._is_db_outage(error)
    answer = _answer(error)
    assert answer.status_code == 500, answer.text


def test_a_locked_sqlite_database_is_still_an_outage(tmp_path: Any) -> None:
    """The other side of the line: SQLite's "database is locked" is still an outage (503, retried)."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.OperationalError, match="locked") as caught:
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            conn.commit()
    finally:
        engine.dispose()
        holder.close()
    assert server_app._is_db_outage(caught.value)
