"""A query update (``PUT /jobs/?filters``) racing a delete of some of the jobs it matched, on
PostgreSQL: it read the matching ids unlocked, then locked them for its update; a delete that
committed in between made the lock find fewer rows, and the update answered 404 "Job not found: ..."
(with ``refused_ids``) and applied nothing, although the client named no id: the jobs deleted
simply no longer match. Now the update applies to the jobs that still exist and counts them.

Deterministic: a second connection deletes one matched job and holds its commit until the update
waits for that row's lock."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api, wait_blocked_by

pytestmark = pytest.mark.postgres


def test_query_update_skips_jobs_deleted_while_it_waits(_live_server_pg_obj: Any, register: Any) -> None:
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    try:
        site = api.site()
        app = api.app(site["id"])
        ids = [job["id"] for job in api.jobs(app["id"], 3, prefix="race")]
        victim = ids[1]
        tx = holder.begin()
        holder.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": victim})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        out: dict[str, Any] = {}
        sender = threading.Thread(target=lambda: out.update(put=api.http.put(
            "/jobs/", params={"app_id": app["id"]}, json={"data": {"seen": True}})))
        sender.start()
        wait_blocked_by(look, hpid, 30, "the query update never waited for the deleted row")
        tx.commit()
        sender.join(60)
        resp = out["put"]
        assert resp.status_code == 200, resp.text  # before: 404 "Job not found: <victim>"
        assert resp.json() == 2
        remaining = api.ok("GET", "/jobs/", params={"app_id": app["id"]})["results"]
        assert sorted((j["id"], j["data"]) for j in remaining) == [(i, {"seen": True}) for i in ids if i != victim]
    finally:
        holder.close()
        look.close()
        engine.dispose()
        api.close()
