"""A waiting acquire (``Prefer: wait=N``) whose look saw jobs that another transaction took first
waits again instead of answering "nothing" before its deadline.

A write wakes every waiting acquire of its user at once; each looks (a read), and those that saw a
job go on to lease, but the first takes it and the others' leases find nothing. They answered an
empty list at once, seconds before their deadline, and their clients asked again at once: a drill
with 200 waits and 600 jobs made 80 such early empty answers. The interleaving is forced here: a
side connection holds the job's row ``FOR KEY SHARE`` (as another acquire's lock would), so the
look sees it and the lease (``FOR UPDATE SKIP LOCKED``) skips it.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, runnable

from balsam.server.db import create_db_engine


@pytest.mark.postgres
def test_a_wait_whose_jobs_were_taken_first_waits_again(_live_server_pg_obj: Any, register: Any) -> None:
    server = _live_server_pg_obj  # the shared PostgreSQL server (its database, for the side connection)
    race_api = Api(server.url, register)
    site = race_api.site()
    app = race_api.app(site["id"])
    session = race_api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    [job] = runnable(race_api, app["id"], 1)
    engine = create_db_engine(server.database_url, pool_size=1, max_overflow=0)

    def acquire() -> list:
        with httpx.Client(base_url=race_api.url, headers={"Authorization": f"Bearer {race_api.token}"},
                          timeout=60) as http:
            resp = http.post(f"/sessions/{session}", json={"max_num_jobs": 5},
                             headers={"Prefer": "wait=4", "Idempotency-Key": "k-taken-first"})
            assert resp.status_code == 200, resp.text
            return [j["id"] for j in resp.json()]

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with engine.connect() as side:
                side.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR KEY SHARE"), {"id": job})
                answer = pool.submit(acquire)
                # While the job is held, the acquire's lease skips it. Waiting again, it answers at its
                # deadline with the job (released by then); answering at once, it said "nothing".
                concurrent.futures.wait([answer], timeout=2)
                side.rollback()
            assert answer.result() == [job]
    finally:
        engine.dispose()
    # Its key was claimed by the lease it answered, not by the look that found the job taken.
    again = httpx.post(f"{race_api.url}/sessions/{session}", json={"max_num_jobs": 5}, timeout=60,
                       headers={"Authorization": f"Bearer {race_api.token}", "Idempotency-Key": "k-taken-first"})
    assert [j["id"] for j in again.json()] == [job]
    race_api.close()
