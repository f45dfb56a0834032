"""A launcher credential revoked by another server process (another uvicorn worker, or
``balsam server revoke``) is still trusted by this process's CredentialCache for up to
``BALSAM_AUTH_REVOCATION_CACHE_SEC``. Before: in that window the revoked launcher created new
sessions and leased jobs that stayed leased until the sessions expired (the revoke had already
ended the sessions that existed). Now ``POST /sessions/``, the acquire and the tick of a launcher
credential check its row inside their own write transaction: 401 as soon as the revoke committed.

The other worker is simulated: this process's cache is warmed by a request, then the credential is
revoked through a second engine (as ``balsam server revoke`` does), so this process never hears of
it."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa
from server_testlib import create_site_and_app, logged_in_test_client

import balsam.server.auth as auth
from balsam.server.auth import AuthUser, revoke_credentials, utcnow
from balsam.server.db import create_db_engine, write_tx
from balsam.server.sessions_logic import heartbeat
from balsam.server.tables import credentials, jobs, sessions


def _setup(client):
    """A site with 10 leasable jobs, a BatchJob and a launcher credential for it: the launcher's
    headers, the site, the BatchJob and the credential id."""
    site_id, app_id = create_site_and_app(client)
    made = client.post("/jobs/", json=[{"app_id": app_id, "workdir": f"w/{i}"} for i in range(10)])
    assert made.status_code == 201, made.text
    ids = [j["id"] for j in made.json()]
    assert client.patch("/jobs/", json=[{"id": j, "state": "PREPROCESSED"} for j in ids]).status_code == 200
    bj = client.post("/batch-jobs/", json={"site_id": site_id, "num_nodes": 1, "wall_time_min": 10,
                                           "job_mode": "serial", "queue": "q", "project": "p"})
    assert bj.status_code == 201, bj.text
    bj_id = bj.json()["id"]
    cred = client.post("/auth/credentials", json={"site_id": site_id, "ttl_sec": 3600, "batch_job_id": bj_id})
    assert cred.status_code == 201, cred.text
    headers = {"Authorization": f"Bearer {cred.json()['access_token']}"}
    return headers, site_id, bj_id, cred.json()["id"]


def _revoke_elsewhere(database_url: str, cred_id: int) -> None:
    """What another worker (or ``balsam server revoke``) does: this process's cache is not told."""
    engine = create_db_engine(database_url)
    try:
        with write_tx(engine) as conn:
            assert [r.id for r in revoke_credentials(conn, credentials.c.id == cred_id)] == [cred_id]
    finally:
        engine.dispose()


def _blocked_on_a_lock(engine: sa.Engine) -> bool:
    """Whether a session of this database waits for a lock, polled until one does (up to ~10 s):
    a state to reach, not a duration to measure. Each read in its own transaction (autocommit):
    pg_stat_activity is read once per transaction."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
        for _ in range(1000):
            if watcher.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND wait_event_type = 'Lock'")).scalar_one():
                return True
            watcher.execute(sa.text("SELECT pg_sleep(0.01)"))
    return False


def test_revoked_launcher_cannot_create_sessions_or_lease_while_cached_elsewhere(database_url):
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        launcher, site_id, bj_id, cred_id = _setup(client)
        body = {"site_id": site_id, "batch_job_id": bj_id}
        first = client.post("/sessions/", headers=launcher, json=body)
        assert first.status_code == 201, first.text
        s0 = first.json()["id"]
        leased = client.post(f"/sessions/{s0}", headers=launcher, json={"max_num_jobs": 2})
        assert leased.status_code == 200 and len(leased.json()) == 2, leased.text
        cache = app.state.credential_cache
        user = AuthUser(id=0, username="", credential_id=cred_id, site_id=site_id)
        assert cache.fresh(user)  # warm: this process would not read the credential again

        _revoke_elsewhere(database_url, cred_id)
        assert cache.fresh(user)  # still trusted from memory, as by another worker's cache
        with app.state.engine.connect() as conn:  # the revoke ended the session it found
            assert conn.execute(sa.select(sessions.c.id).where(sessions.c.id == s0)).first() is None

        created = client.post("/sessions/", headers=launcher, json=body)
        assert created.status_code == 401 and "revoked" in created.text, created.text
        # Without the BatchJob as well (a session its revoke would not end).
        created = client.post("/sessions/", headers=launcher, json={"site_id": site_id})
        assert created.status_code == 401 and "revoked" in created.text, created.text
        with app.state.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar_one() == 0
            assert conn.execute(sa.select(sa.func.count()).select_from(jobs)
                                .where(jobs.c.session_id.is_not(None))).scalar_one() == 0

        # The user's own token is not affected: a session, a lease, a tick.
        mine = client.post("/sessions/", json=body)
        assert mine.status_code == 201, mine.text
        sid = mine.json()["id"]
        got = client.post(f"/sessions/{sid}", json={"max_num_jobs": 3})
        assert got.status_code == 200 and len(got.json()) == 3, got.text
        assert client.put(f"/sessions/{sid}", json={}).status_code == 200
        # The launcher, still cached, cannot lease or heartbeat on it (its site's session).
        resp = client.post(f"/sessions/{sid}", headers=launcher, json={"max_num_jobs": 3})
        assert resp.status_code == 401 and "revoked" in resp.text, resp.text
        resp = client.put(f"/sessions/{sid}", headers=launcher, json={})
        assert resp.status_code == 401 and "revoked" in resp.text, resp.text
        with app.state.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(jobs)
                                .where(jobs.c.session_id.is_not(None))).scalar_one() == 3
        # Refused once, forgotten: the next request is refused by the credential check itself.
        assert not cache.fresh(user)
    app.state.engine.dispose()


def test_expired_launcher_credential_cannot_lease_while_cached(database_url):
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        launcher, site_id, bj_id, cred_id = _setup(client)
        first = client.post("/sessions/", headers=launcher, json={"site_id": site_id, "batch_job_id": bj_id})
        assert first.status_code == 201, first.text
        engine = create_db_engine(database_url)
        try:
            with write_tx(engine) as conn:
                conn.execute(sa.update(credentials).where(credentials.c.id == cred_id)
                             .values(expires=utcnow() - dt.timedelta(hours=1)))
        finally:
            engine.dispose()
        resp = client.post(f"/sessions/{first.json()['id']}", headers=launcher, json={"max_num_jobs": 2})
        assert resp.status_code == 401 and "expired" in resp.text, resp.text
    app.state.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_pg_revoke_waits_for_a_create_that_read_the_credential(database_url):
    """The race on PostgreSQL (READ COMMITTED): a create that found the credential live holds it
    ``FOR SHARE`` until it commits, so a concurrent revoke's ``UPDATE`` waits for it and its
    session-ending statement (which starts after) sees the new session and ends it."""
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        _, site_id, bj_id, cred_id = _setup(client)
        engine = create_db_engine(database_url)
        revoked = threading.Event()
        try:
            with write_tx(app.state.engine) as conn:  # the create, between its check and its commit
                user_id = conn.execute(sa.select(credentials.c.user_id).where(credentials.c.id == cred_id)).scalar_one()
                user = AuthUser(id=user_id, username="", credential_id=cred_id, site_id=site_id)
                assert auth.launcher_credential_problem(conn, user, share_lock=True) is None
                conn.execute(sa.insert(sessions).values(site_id=site_id, batch_job_id=bj_id, heartbeat=utcnow()))

                def revoke() -> None:
                    with write_tx(engine) as other:
                        revoke_credentials(other, credentials.c.id == cred_id)
                    revoked.set()

                thread = threading.Thread(target=revoke)
                thread.start()
                # The revoke cannot commit while the create holds the credential row: check that
                # it is blocked on that lock (pg_locks), not by waiting some time.
                assert _blocked_on_a_lock(engine), "the revoke did not wait for the create's lock"
                assert not revoked.is_set()
            thread.join(60)
            assert revoked.is_set()
            with engine.connect() as conn:  # the session the create committed was ended by the revoke
                assert conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar_one() == 0
        finally:
            engine.dispose()
    app.state.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_pg_revoke_ends_a_session_an_acquire_leased_to_meanwhile(database_url):
    """The acquire reads the credential without a lock, but after its heartbeat locked the session:
    a concurrent revoke's session-ending statement waits for the acquire's commit, then ends the
    session with the jobs it just leased (nothing stays leased)."""
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        launcher, site_id, bj_id, cred_id = _setup(client)
        sid = client.post("/sessions/", headers=launcher, json={"site_id": site_id, "batch_job_id": bj_id}).json()["id"]
        engine = create_db_engine(database_url)
        revoked = threading.Event()
        try:
            with write_tx(app.state.engine) as conn:  # the acquire, between its check and its commit
                user_id = conn.execute(sa.select(credentials.c.user_id).where(credentials.c.id == cred_id)).scalar_one()
                heartbeat(conn, sid, utcnow())
                user = AuthUser(id=user_id, username="", credential_id=cred_id, site_id=site_id)
                assert auth.launcher_credential_problem(conn, user) is None
                first = conn.execute(sa.select(sa.func.min(jobs.c.id))).scalar_one()
                conn.execute(sa.update(jobs).where(jobs.c.id == first).values(session_id=sid))

                def revoke() -> None:
                    with write_tx(engine) as other:
                        revoke_credentials(other, credentials.c.id == cred_id)
                    revoked.set()

                thread = threading.Thread(target=revoke)
                thread.start()
                assert _blocked_on_a_lock(engine), "the revoke did not wait for the acquire's session lock"
                assert not revoked.is_set()
            thread.join(60)
            assert revoked.is_set()
            with engine.connect() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar_one() == 0
                assert conn.execute(sa.select(sa.func.count()).select_from(jobs)
                                    .where(jobs.c.session_id.is_not(None))).scalar_one() == 0
        finally:
            engine.dispose()
    app.state.engine.dispose()


def test_a_launcher_credential_opens_sessions_of_its_own_batch_job_only(database_url):
    """A revoke ends the sessions of the credential's BatchJob: one opened for no BatchJob (or
    another) kept its leases until it expired. Without one, the session gets the credential's;
    another BatchJob's is 403."""
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        launcher, site_id, bj_id, cred_id = _setup(client)
        bare = client.post("/sessions/", headers=launcher, json={"site_id": site_id})
        assert bare.status_code == 201 and bare.json()["batch_job_id"] == bj_id, bare.text
        other = client.post("/batch-jobs/", json={"site_id": site_id, "num_nodes": 1, "wall_time_min": 10,
                                                  "job_mode": "serial", "queue": "q", "project": "p"}).json()["id"]
        refused = client.post("/sessions/", headers=launcher, json={"site_id": site_id, "batch_job_id": other})
        assert refused.status_code == 403 and f"BatchJob {bj_id}" in refused.text, refused.text
        # The user's token opens any (a launcher started by hand, the agent's processing).
        assert client.post("/sessions/", json={"site_id": site_id, "batch_job_id": other}).status_code == 201
        _revoke_elsewhere(database_url, cred_id)
        with app.state.engine.connect() as conn:  # the revoke ended the session opened without a BatchJob
            assert conn.execute(sa.select(sessions.c.id).where(sessions.c.id == bare.json()["id"])).first() is None
    app.state.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_pg_site_delete_waits_for_a_session_create_without_a_deadlock(database_url):
    """A create holds its credential FOR SHARE, then its session insert checks the site (FOR KEY
    SHARE). The site delete deleted the site row first and its cascade then waited for the
    credential: the two locks in opposite orders, a deadlock (one aborted, 503). It now locks the
    credentials first: it waits for the create, which commits; then it deletes everything."""
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        _, site_id, bj_id, cred_id = _setup(client)
        engine = create_db_engine(database_url)
        answers: list[int] = []
        try:
            with write_tx(engine) as conn:  # the create, between its credential read and its insert
                user_id = conn.execute(sa.select(credentials.c.user_id).where(credentials.c.id == cred_id)).scalar_one()
                user = AuthUser(id=user_id, username="", credential_id=cred_id, site_id=site_id)
                assert auth.launcher_credential_problem(conn, user, share_lock=True) is None
                thread = threading.Thread(target=lambda: answers.append(client.delete(f"/sites/{site_id}").status_code))
                thread.start()
                assert _blocked_on_a_lock(engine), "the delete did not wait for the create's lock"
                conn.execute(sa.insert(sessions).values(site_id=site_id, batch_job_id=bj_id, heartbeat=utcnow()))
            thread.join(60)
            assert answers == [204]
            with engine.connect() as conn:  # the site went with the session the create committed
                assert conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar_one() == 0
        finally:
            engine.dispose()
    app.state.engine.dispose()
