"""An idle agent leaves no idempotency record per poll (SQLite and PostgreSQL).

The soak (benchmarks/soak_idle_records.py) found the idempotency table of a server whose sites sat idle
growing by one row a second per site agent: the processing module asks for jobs every second
(``POST /sessions/{id}`` with an ``Idempotency-Key``, a 1 s long poll), and every empty answer was
kept for ``BALSAM_IDEMPOTENCY_TTL_SEC`` (24 h): 86,400 rows a day per idle agent, 8.6 million for
100 users' agents, written and swept for nothing. An acquire that leased nothing changed nothing but
its session's heartbeat: its resend, answered afresh, leases what is there then, and its client
gets it. One that leased jobs is kept, as before: its resend gets those jobs again.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from server_testlib import create_site_and_app, logged_in_test_client

from balsam.server.tables import idempotency_keys

KEY = "Idempotency-Key"
BODY = {"max_num_jobs": 10, "states": ["PREPROCESSED"], "filter_tags": {}}


def _recorded(app, resource: str) -> int:
    with app.state.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(idempotency_keys)
                            .where(idempotency_keys.c.resource == resource)).scalar_one()


def _acquire(client, session_id: int, key: str) -> list[int]:
    resp = client.post(f"/sessions/{session_id}", json=BODY, headers={KEY: key})
    assert resp.status_code == 200, resp.text
    return [job["id"] for job in resp.json()]


def test_empty_acquires_leave_no_record_and_leasing_ones_are_kept(database_url: str) -> None:
    with logged_in_test_client(database_url, uuid.uuid4().hex * 2) as (client, app):
        site_id, app_id = create_site_and_app(client)
        session = client.post("/sessions/", json={"site_id": site_id}).json()["id"]
        for _ in range(50):  # an idle agent's polls
            assert _acquire(client, session, uuid.uuid4().hex) == []
        assert _recorded(app, "acquire") == 0

        # The resend of an empty acquire whose answer was lost is answered afresh: the jobs there now.
        key = uuid.uuid4().hex
        assert _acquire(client, session, key) == []
        jobs = client.post("/jobs/", json=[{"workdir": f"w/{i}", "app_id": app_id} for i in range(3)]).json()
        ids = sorted(job["id"] for job in jobs)
        assert client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids]).status_code == 200
        assert sorted(_acquire(client, session, key)) == ids
        # That acquire leased jobs: it is kept, and a resend of it gets the same jobs (never lost).
        assert _recorded(app, "acquire") == 1
        assert sorted(_acquire(client, session, key)) == ids
        assert _acquire(client, session, uuid.uuid4().hex) == []
        assert _recorded(app, "acquire") == 1
