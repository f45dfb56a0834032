"""The server's libpq defaults (db.PG_CONNECT_DEFAULTS) and its session ``options`` give way to
what libpq would take from elsewhere than the URL's query: a service's section of the service
file (``?service=`` or ``$PGSERVICE``), ``$PGCONNECT_TIMEOUT``, ``$PGOPTIONS``, the URL's own
``?options=``. Parameters passed to the connect override all of those, so they were silently
replaced: a service's ``connect_timeout=30`` became 10 s, a ``statement_timeout`` set by
``?options=-c statement_timeout=...`` was not set. Real connections to the test PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from balsam.server.db import create_db_engine

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py


@pytest.fixture
def connected(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    for variable in ("PGSERVICE", "PGSERVICEFILE", "PGSYSCONFDIR", "PGCONNECT_TIMEOUT", "PGOPTIONS"):
        monkeypatch.delenv(variable, raising=False)
    engines: list[sa.Engine] = []

    def connect(url: str) -> "tuple[dict, str, str]":
        engines.append(create_db_engine(url))
        with engines[-1].connect() as conn:
            params = conn.connection.dbapi_connection.get_dsn_parameters()
            settings = conn.execute(sa.text("SELECT current_setting('statement_timeout'), current_setting('TimeZone')")).one()
        return params, settings[0], settings[1]

    yield connect
    for engine in engines:
        engine.dispose()


def _test_url() -> sa.engine.URL:
    return sa.engine.make_url(os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL))


@pytest.mark.postgres
def test_a_services_parameters_are_kept(connected, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    url = _test_url()
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(f"[balsamsvc]\nhost={url.host}\nport={url.port or 5432}\ndbname={url.database}\n"
                            f"user={url.username}\nconnect_timeout=30\ntcp_user_timeout=120000\n")
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    params, _, zone = connected("postgresql://?service=balsamsvc")
    assert (params["connect_timeout"], params["tcp_user_timeout"]) == ("30", "120000")
    assert params["keepalives_idle"] == "30" and zone == "UTC"  # ours where the service says nothing
    monkeypatch.setenv("PGSERVICE", "balsamsvc")  # named by the environment
    params, _, _ = connected("postgresql://")
    assert params["connect_timeout"] == "30"


@pytest.mark.postgres
def test_the_environments_connect_timeout_and_options_are_kept(connected, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "25")
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321")
    params, statement_timeout, zone = connected(str(_test_url().render_as_string(hide_password=False)))
    assert params["connect_timeout"] == "25" and params["tcp_user_timeout"] == "60000"
    assert statement_timeout == "4321ms" and zone == "UTC"


@pytest.mark.postgres
def test_the_urls_options_are_kept(connected) -> None:  # noqa: ANN001
    base = _test_url().render_as_string(hide_password=False)
    url = base + ("&" if "?" in base else "?") + "options=" + quote("-c statement_timeout=5000")
    _, statement_timeout, zone = connected(url)
    assert statement_timeout == "5s" and zone == "UTC"
