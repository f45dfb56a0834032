"""The credential retention sweep never deletes the launcher credential of a BatchJob that may still run.

An agent down longer than a BatchJob's queue allowance (3 days) plus the retention (30 days, or as
little as an hour) left the credential of its still-queued BatchJob expired "long ago": the sweep
deleted it, the agent's renewal then answered 404 and the launcher's token 401 "no longer exists",
and the allocation was wasted. Such a credential now ends with its BatchJob (the server revokes it
when the BatchJob finishes or is deleted). And the renewal route's row lock, which makes a renewal
racing a sweep's DELETE answer 404 instead of failing, is exercised on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
import sqlalchemy as sa
from server_testlib import create_site_and_app, logged_in_test_client, wait_blocked_by

from balsam.server import app as app_module
from balsam.server.auth import _ended_batch
from balsam.server.tables import credentials

DAY = dt.timedelta(days=1)
#: What the agent asks for: its queue allowance (3 days) plus the wall time.
TTL = 3 * 86400 + 3600


def _batch_job(client, site_id: int) -> int:
    resp = client.post("/batch-jobs/", json={"site_id": site_id, "num_nodes": 1, "wall_time_min": 60,
                                             "job_mode": "serial", "queue": "q", "project": "p"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _launcher_credential(client, site_id: int, bj_id: "int | None") -> dict:
    body = {"site_id": site_id, "ttl_sec": TTL, **({"batch_job_id": bj_id} if bj_id is not None else {})}
    resp = client.post("/auth/credentials", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _expire(app, ids: "list[int]", ago: dt.timedelta) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    with app.state.engine.begin() as conn:
        conn.execute(sa.update(credentials).where(credentials.c.id.in_(ids)).values(expires=now - ago))


def _existing(app, ids: "list[int]") -> "set[int]":
    with app.state.engine.connect() as conn:
        return set(conn.execute(sa.select(credentials.c.id).where(credentials.c.id.in_(ids))).scalars())


def _sweep(app) -> None:
    app.state.next_credential_sweep = 0.0
    app_module._sweep_once(app)  # the server's background sweep, as its timer runs it


def test_the_expired_credential_of_a_queued_batch_job_survives_the_sweep_and_is_renewed(database_url):
    with logged_in_test_client(database_url, uuid.uuid4().hex * 2, session_sweep_sec=3600) as (client, app):
        site_id, _ = create_site_and_app(client)
        queued, to_finish, to_delete, failed = (_batch_job(client, site_id) for _ in range(4))
        resp = client.put(f"/batch-jobs/{queued}", json={"state": "queued", "scheduler_id": 77})
        assert resp.status_code == 200, resp.text
        creds = {name: _launcher_credential(client, site_id, bj) for name, bj in
                 [("queued", queued), ("to_finish", to_finish), ("to_delete", to_delete), ("failed", failed),
                  ("no batch job", None)]}
        ids = {name: c["id"] for name, c in creds.items()}
        assert client.put(f"/batch-jobs/{to_finish}", json={"state": "finished"}).status_code == 200
        assert client.delete(f"/batch-jobs/{to_delete}").status_code in (200, 204)
        assert client.put(f"/batch-jobs/{failed}", json={"state": "submit_failed"}).status_code == 200
        # The agent was stopped on day 0; on day 34 every credential expired 31 days ago.
        _expire(app, list(ids.values()), 31 * DAY)
        _sweep(app)
        # Only the queued BatchJob's survives: the others' BatchJobs can no longer run (or there is none).
        assert _existing(app, list(ids.values())) == {ids["queued"]}
        # The agent comes back and renews it; its launcher starts with the renewed token.
        renewed = client.post(f"/auth/credentials/{ids['queued']}/renew", json={"ttl_sec": TTL})
        assert renewed.status_code == 200, renewed.text
        session = client.post("/sessions/", json={"site_id": site_id, "batch_job_id": queued},
                              headers={"Authorization": f"Bearer {renewed.json()['access_token']}"})
        assert session.status_code == 201, session.text
        # It ends with its BatchJob: revoked when the BatchJob finishes, then swept as any other.
        assert client.put(f"/batch-jobs/{queued}", json={"state": "finished"}).status_code == 200
        _expire(app, [ids["queued"]], 31 * DAY)
        _sweep(app)
        assert _existing(app, [ids["queued"]]) == set()


# PostgreSQL only (row locks; SQLite runs one write transaction at a time).
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_renewal_waiting_on_a_sweeps_uncommitted_delete_answers_404(database_url):
    with logged_in_test_client(database_url, uuid.uuid4().hex * 2, session_sweep_sec=3600) as (client, app):
        site_id, _ = create_site_and_app(client)
        cid = _launcher_credential(client, site_id, None)["id"]
        _expire(app, [cid], 31 * DAY)
        now = dt.datetime.now(dt.timezone.utc)
        sweep = app.state.engine.connect()
        look = app.state.engine.connect()
        try:
            tx = sweep.begin()
            # The sweep's own statement, its transaction left open: the row is deleted, not yet committed.
            assert sweep.execute(_ended_batch(now - 30 * DAY, 1000)).rowcount == 1
            pid = sweep.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            answer: dict = {}

            def renew() -> None:
                try:
                    answer["resp"] = client.post(f"/auth/credentials/{cid}/renew", json={"ttl_sec": TTL})
                except Exception as exc:  # noqa: BLE001 - what the route raised is the finding
                    answer["error"] = exc

            thread = threading.Thread(target=renew)
            thread.start()
            # The renewal's FOR UPDATE read waits for the sweep's row lock (unlocked, it read the
            # row, its UPDATE then found none, and its re-read raised NoResultFound: a 500).
            wait_blocked_by(look, pid, 30, "the renewal never waited for the sweep's lock on its row")
            tx.commit()
            thread.join(30)
            assert not thread.is_alive()
        finally:
            sweep.close()
            look.close()
        assert "error" not in answer, answer.get("error")
        assert answer["resp"].status_code == 404, answer["resp"].text
        assert answer["resp"].json()["detail"] == f"Credential {cid} not found"
