"""Another user's ids in an update never lock (or wait for) the owner's rows.

Before: ``PUT /transfers/{id}`` and ``PATCH /transfers/`` (PostgreSQL) locked the jobs of the named
items ``FOR UPDATE`` before checking that they were the caller's. A user naming another user's
item ids took row locks on that user's jobs (their writers waited), and waited for them when the
owner held them: the 404 came only once the owner's transaction ended, so its timing told whether
the other user's job was busy.
"""

from __future__ import annotations

import time

import httpx
import pytest
import sqlalchemy as sa


@pytest.mark.postgres
def test_foreign_transfer_items_are_refused_without_waiting_for_their_jobs(_live_server_pg_obj, register):
    from server_testlib import Api

    server = _live_server_pg_obj
    owner, other = Api(server.url, register), Api(server.url, register)
    try:
        site = owner.site(transfer_locations={"aps": "globus://aps-endpoint"})
        app = owner.app(site["id"], "Xfer", transfers={"input": {"required": True, "direction": "in",
                                                                 "local_path": "input.dat"}})
        job = owner.jobs(app["id"], transfers={"input": "aps:/data/in.dat"})[0]
        (item,) = owner.ok("GET", "/transfers/", params={"job_id": [job["id"]]})["results"]

        engine = sa.create_engine(server.database_url.replace("postgresql://", "postgresql+psycopg2://", 1))
        try:
            with engine.connect() as conn:
                # The owner's writer holds its job (as a running update or delete of it would).
                conn.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job["id"]})
                for method, path, body in (("PUT", f"/transfers/{item['id']}", {"state": "done"}),
                                           ("PATCH", "/transfers/", [{"id": item["id"], "state": "done"}])):
                    started = time.monotonic()
                    try:
                        resp = other.http.request(method, path, json=body, timeout=3)
                    except httpx.TimeoutException:
                        pytest.fail(f"{method} {path} of another user's item waited for the owner's row lock")
                    assert resp.status_code == 404, resp.text
                    assert time.monotonic() - started < 2
                conn.rollback()
        finally:
            engine.dispose()
        # The owner's own update still works, and nothing of the other user's requests applied.
        assert owner.ok("GET", f"/transfers/{item['id']}")["state"] == "pending"
        assert owner.ok("PUT", f"/transfers/{item['id']}", json={"state": "done"})["state"] == "done"
        assert owner.job(job["id"])["state"] == "STAGED_IN"
    finally:
        owner.close()
        other.close()
