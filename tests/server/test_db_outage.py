"""A database outage answers 503 with Retry-After (clients retry it), and the server recovers by itself.

The outage is made on this test's own PostgreSQL database only (connections refused and the open
ones ended), never by restarting the shared PostgreSQL server; the full restart drill runs on a
private cluster (tests/drills/test_postgres_restart.py).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api


def _admin(url: str) -> sa.Engine:
    from balsam.server.db import normalize_database_url

    parsed = sa.engine.make_url(normalize_database_url(url))
    return sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")


def _set_outage(url: str, database: str, down: bool) -> None:
    admin = _admin(url)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"false" if down else "true"}')
            if down:
                conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"),
                    {"db": database},
                )
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_database_outage_answers_503_with_retry_after_and_recovers(live_server_factory: Any, register: Any) -> None:
    server = live_server_factory("postgresql")
    database = sa.engine.make_url(server.database_url.replace('postgresql://', 'postgresql+psycopg2://', 1)).database
    api = Api(server.url, register)
    try:
        site = api.site()
        _set_outage(server.database_url, database, down=True)
        try:
            for method, path, body in (("GET", "/sites/", None), ("POST", "/jobs/", [{"workdir": "x", "app_id": 1}]),
                                       ("PUT", f"/sites/{site['id']}", {"path": "/elsewhere"})):
                resp = api.http.request(method, path, json=body)
                assert resp.status_code == 503, f"{method} {path}: {resp.status_code} {resp.text}"
                assert resp.headers["Retry-After"].isdigit()
                assert "database is unavailable" in resp.json()["detail"]
        finally:
            _set_outage(server.database_url, database, down=False)
        deadline = time.monotonic() + 30
        while api.http.get("/sites/").status_code != 200:  # pre-ping replaces the dead pool connections
            assert time.monotonic() < deadline, "the server did not recover after the database came back"
            time.sleep(0.2)
        assert api.ok("GET", f"/sites/{site['id']}")["name"] == site["name"]
    finally:
        api.close()
