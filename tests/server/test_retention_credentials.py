"""Ended credentials are deleted once their retention is over (BALSAM_AUTH_CREDENTIAL_RETENTION_SEC).

A soak run (real agent, 1 s periods) left one credential row per BatchJob and per login, revoked or
expired, for ever: 185 rows after 188 BatchJobs in 30 minutes, hundreds of thousands after months
at a busy site, each of a user's visited by their listing of live credentials and by a password
reset's revoke (benchmarks/credential_retention.py). The server's background sweep now deletes
those that ended longer ago than the retention (30 days by default), in bounded statements, and
keeps the recent ones listed for audit.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from server_testlib import HAND_SWEPT_EXPIRY_SEC, logged_in_test_client

from balsam.server import app as app_module
from balsam.server.settings import ServerSettings
from balsam.server.tables import credentials, users

DAY = dt.timedelta(days=1)


def _insert(engine: sa.Engine, user_id: int, rows: "list[dict]") -> "list[int]":
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    ids = []
    with engine.begin() as conn:
        for row in rows:
            values = {"user_id": user_id, "kind": "launcher", "label": row["label"], "created": now - 90 * DAY,
                      "expires": now + row["expires"], "revoked": None if row.get("revoked") is None else now + row["revoked"]}
            ids.append(conn.execute(sa.insert(credentials).values(**values).returning(credentials.c.id)).scalar_one())
    return ids


def _labels(engine: sa.Engine) -> "set[str]":
    with engine.connect() as conn:
        return set(conn.execute(sa.select(credentials.c.label)).scalars())


@pytest.fixture
def swept(database_url):
    with logged_in_test_client(database_url, "x" * 40, session_expire_sec=HAND_SWEPT_EXPIRY_SEC,
                               session_sweep_sec=3600) as (client, app):
        with app.state.engine.connect() as conn:
            user_id = conn.execute(sa.select(users.c.id).where(users.c.username == "u")).scalar_one()
        yield client, app, user_id


def test_the_background_sweep_deletes_credentials_ended_before_the_retention_and_keeps_the_rest(swept):
    client, app, user_id = swept
    _insert(app.state.engine, user_id, [
        {"label": "revoked 40 days ago", "expires": 10 * DAY, "revoked": -40 * DAY},
        {"label": "expired 40 days ago", "expires": -40 * DAY},
        {"label": "revoked after it expired, 40 days ago", "expires": -45 * DAY, "revoked": -40 * DAY},
        {"label": "revoked 2 days ago", "expires": 10 * DAY, "revoked": -2 * DAY},
        {"label": "expired 29 days ago", "expires": -29 * DAY},
        {"label": "live", "expires": 10 * DAY},
    ])
    app_module._sweep_once(app)
    left = _labels(app.state.engine)
    assert "revoked 40 days ago" not in left and "expired 40 days ago" not in left
    assert "revoked after it expired, 40 days ago" not in left
    assert {"revoked 2 days ago", "expired 29 days ago", "live"} <= left
    # The recent ended ones are still listed for audit; the login's own credential is untouched.
    listed = client.get("/auth/credentials", params={"kind": "launcher"}).json()
    assert sorted(c["label"] for c in listed["results"]) == ["expired 29 days ago", "live", "revoked 2 days ago"]
    assert client.get("/sites/").status_code == 200


def test_the_sweep_deletes_in_bounded_statements_and_a_later_sweep_finishes(swept):
    from balsam.server.auth import sweep_ended_credentials

    _client, app, user_id = swept
    _insert(app.state.engine, user_id, [{"label": f"old {i}", "expires": -40 * DAY} for i in range(7)])
    retention = ServerSettings(database_url="sqlite://", secret_key="x" * 40).credential_retention_sec
    assert sweep_ended_credentials(app.state.engine, retention, batch_rows=3, max_batches=2) == 6
    assert len([label for label in _labels(app.state.engine) if label.startswith("old")]) == 1
    assert sweep_ended_credentials(app.state.engine, retention, batch_rows=3, max_batches=2) == 1
    assert not [label for label in _labels(app.state.engine) if label.startswith("old")]


def test_an_expired_launcher_credential_renewed_meanwhile_is_not_deleted(swept):
    """A renewal holds its row FOR UPDATE (PostgreSQL) before making it live again: the sweep skips
    the row (SKIP LOCKED) instead of waiting, and the renewed credential stays. On SQLite the two
    transactions run one after the other."""
    from balsam.server.auth import sweep_ended_credentials

    _client, app, user_id = swept
    engine = app.state.engine
    (cid,) = _insert(engine, user_id, [{"label": "expired 40 days ago, being renewed", "expires": -40 * DAY}])
    retention = 30 * 24 * 3600
    if engine.dialect.name == "postgresql":
        with engine.connect() as renewal:
            with renewal.begin():
                renewal.execute(sa.select(credentials.c.id).where(credentials.c.id == cid).with_for_update())
                assert sweep_ended_credentials(engine, retention) == 0
                renewal.execute(sa.update(credentials).where(credentials.c.id == cid).values(
                    expires=dt.datetime.now(dt.timezone.utc) + DAY))
    else:
        with engine.begin() as renewal:
            renewal.execute(sa.update(credentials).where(credentials.c.id == cid).values(
                expires=dt.datetime.now(dt.timezone.utc) + DAY))
    assert sweep_ended_credentials(engine, retention) == 0
    assert "expired 40 days ago, being renewed" in _labels(engine)


@pytest.mark.parametrize("value", ["60", "0", "1e3", "-5"])
def test_a_retention_below_an_hour_or_not_a_number_is_refused_in_one_line(monkeypatch, tmp_path, value):
    monkeypatch.setenv("BALSAM_AUTH_CREDENTIAL_RETENTION_SEC", value)
    with pytest.raises(ValueError) as refused:
        ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'b.db'}")
    assert "BALSAM_AUTH_CREDENTIAL_RETENTION_SEC" in str(refused.value) and "\n" not in str(refused.value)


def test_the_retention_setting_is_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BALSAM_AUTH_CREDENTIAL_RETENTION_SEC", "7200")
    assert ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'b.db'}").credential_retention_sec == 7200
