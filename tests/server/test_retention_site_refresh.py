"""A site agent's status refresh (``PUT /sites/{id}`` of ``queued_jobs``/``backfill_windows``, or an
empty one) leaves no Idempotency-Key record; a user's update of the site record still does.

The soak found the scheduler module's refresh, sent with a key every ``sync_period`` (10 s), kept
with the whole site record as its answer for ``BALSAM_IDEMPOTENCY_TTL_SEC`` (24 h): 8,640 rows a day
per agent (benchmarks/site_refresh_records.py: 2,610 rows an hour at a 1 s period, 0 after). A
resend of a refresh carries the same snapshot: applying it again is harmless, and its answer is the
record as it is then.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from server_testlib import create_site_and_app, logged_in_test_client

from balsam.server.tables import idempotency_keys

KEY = "Idempotency-Key"
STATUS = {"queued_jobs": {"17": {"scheduler_id": 17, "state": "queued", "queue": "debug", "num_nodes": 1,
                                 "wall_time_min": 5, "project": "p", "time_remaining_min": 5,
                                 "queued_time_min": 0}},
          "backfill_windows": {"debug": [{"num_nodes": 2, "wall_time_min": 30}]}}


def _rows(app) -> int:
    with app.state.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(idempotency_keys)).scalar_one()


def test_a_status_refresh_is_not_recorded_and_its_resend_is_applied_afresh(database_url: str) -> None:
    with logged_in_test_client(database_url, uuid.uuid4().hex * 2) as (client, app):
        site_id, _app_id = create_site_and_app(client)
        before = _rows(app)
        for body in (STATUS, {}, {**STATUS, "id": site_id, "last_refresh": "2020-01-01T00:00:00+00:00"}):
            key = uuid.uuid4().hex
            first = client.put(f"/sites/{site_id}", json=body, headers={KEY: key})
            assert first.status_code == 200, first.text
            again = client.put(f"/sites/{site_id}", json=body, headers={KEY: key})
            assert again.status_code == 200, again.text
            # Answered afresh: the record as it is now (a later last_refresh), not replayed.
            assert again.json()["last_refresh"] >= first.json()["last_refresh"]
            assert again.json()["backfill_windows"] == first.json()["backfill_windows"]
        assert _rows(app) == before
        assert client.get(f"/sites/{site_id}").json()["backfill_windows"] == STATUS["backfill_windows"]


def test_an_update_naming_any_other_field_is_still_recorded_and_replayed(database_url: str) -> None:
    with logged_in_test_client(database_url, uuid.uuid4().hex * 2) as (client, app):
        site_id, _app_id = create_site_and_app(client)
        before = _rows(app)
        key = uuid.uuid4().hex
        body = {**STATUS, "allowed_projects": ["one"]}
        first = client.put(f"/sites/{site_id}", json=body, headers={KEY: key})
        assert first.status_code == 200, first.text
        client.put(f"/sites/{site_id}", json={"allowed_projects": ["two"]}).raise_for_status()
        again = client.put(f"/sites/{site_id}", json=body, headers={KEY: key})
        assert again.status_code == 200 and again.json() == first.json()  # replayed as it was
        assert client.get(f"/sites/{site_id}").json()["allowed_projects"] == ["two"]  # not applied again
        assert _rows(app) == before + 1
