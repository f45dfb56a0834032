"""Helpers for the server tests: every test runs against real uvicorn servers, SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from server_testlib import HAND_SWEPT_EXPIRY_SEC, SHORT_EXPIRY_SEC, Api, logged_in_test_client


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server_url(db_kind: str, request: pytest.FixtureRequest) -> str:
    """A live server URL, once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("live_server" if db_kind == "sqlite" else "live_server_pg")


@pytest.fixture
def api(server_url: str, register: Any) -> Iterator[Api]:
    client = Api(server_url, register)
    yield client
    client.close()


@pytest.fixture
def other_api(server_url: str, register: Any) -> Iterator[Api]:
    client = Api(server_url, register)
    yield client
    client.close()


@pytest.fixture
def site_app(api: Api) -> tuple[dict, dict]:
    site = api.site()
    return site, api.app(site["id"])


@pytest.fixture(scope="session")
def _short_expiry_servers() -> dict:
    return {}


@pytest.fixture
def short_expiry_server(db_kind: str, live_server_factory: Any, _short_expiry_servers: dict) -> str:
    """Same database kind as ``server_url``, but sessions expire after 2 s without heartbeat."""
    if db_kind not in _short_expiry_servers:
        server = live_server_factory(db_kind, env={"BALSAM_SESSION_EXPIRE_SEC": str(SHORT_EXPIRY_SEC),
                                                  "BALSAM_SESSION_SWEEP_SEC": "1"})
        _short_expiry_servers[db_kind] = server.url
    return _short_expiry_servers[db_kind]


@pytest.fixture(scope="module")
def race_server(live_server_factory: Any) -> Any:
    """PostgreSQL behind 2 workers, one per module: the race tests force interleavings of two
    requests with row locks held by a side connection (test_pg_races.py has its own, with a fast
    expiry sweep)."""
    return live_server_factory("postgresql", workers=2)


@pytest.fixture
def race_api(race_server: Any, register: Any) -> Iterator[Api]:
    client = Api(race_server.url, register)
    yield client
    client.close()


@pytest.fixture
def hand_swept_server(database_url: str) -> Iterator[Any]:
    """An in-process server on ``database_url`` whose sessions expire after ``HAND_SWEPT_EXPIRY_SEC``
    and whose own sweeps (the background one and the requests') run at most every hour, so the
    test sweeps itself (``sessions_logic.sweep_expired``): a starlette TestClient logged in as a
    freshly registered user ``u``, with the app in ``.app`` and a site ``s`` in ``.site``."""
    with logged_in_test_client(database_url, "x" * 40, session_expire_sec=HAND_SWEPT_EXPIRY_SEC,
                               session_sweep_sec=3600) as (tc, _):
        tc.site = tc.post("/sites/", json={"name": "s", "path": "/tmp/s"}).json()
        yield tc
