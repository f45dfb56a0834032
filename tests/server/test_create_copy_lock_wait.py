"""The bulk job create streams its jobs by COPY; a COPY's backend that waits on a row lock stops
reading what the server sends, the TCP window closes, and libpq's ``tcp_user_timeout`` (60 s by
default: db.PG_CONNECT_DEFAULTS, there to give up on a vanished database host) would cut that live
connection (a 503 as a database outage, and a retry). The lock a create meets on a live database
is its app's: an app or site delete holds it ``FOR UPDATE`` while it deletes the jobs (minutes
for millions). The create's COPY does not wait for it while the server still sends: its foreign
keys are checked at the statement's end (statement triggers, migration 0007) and its ids come
from the sequence, so the COPY reads all its rows first and waits with nothing unsent, which no
timeout cuts. This guards that. Scaled down: ``tcp_user_timeout=300`` ms, the lock held a
second, on the real PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from balsam.server.db import create_db_engine
from server_testlib import logged_in_test_client

HOLD_SEC = 1.0


@pytest.fixture
def short_user_timeout_client(database_url: str) -> Iterator[Any]:
    url = database_url
    with logged_in_test_client(url + ("&" if "?" in url else "?") + "tcp_user_timeout=300", "x" * 40,
                               session_sweep_sec=3600) as (tc, _):
        tc.url = url
        yield tc


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_create_waiting_for_its_apps_lock_is_not_cut(short_user_timeout_client: Any) -> None:
    tc = short_user_timeout_client
    site = tc.post("/sites/", json={"name": "s", "path": "/tmp/s"}).json()
    app = tc.post("/apps/", json={"site_id": site["id"], "name": "A", "serialized_class": "", "source_code": ""}).json()
    pad = "x" * 6000  # ~6 MB of COPY: more than the socket buffers hold while a backend waits (a
    # bare table's COPY whose backend waited on a row lock mid-stream was cut after 0.8 s)
    body = [{"workdir": f"w/{i}", "app_id": app["id"], "data": {"pad": pad}} for i in range(1000)]
    released = threading.Event()
    side = create_db_engine(tc.url)
    try:
        with side.connect() as conn:
            tx = conn.begin()
            # As an app delete holds it while it deletes the app's jobs.
            conn.execute(sa.text("SELECT id FROM apps WHERE id = :id FOR UPDATE"), {"id": app["id"]})
            release = threading.Timer(HOLD_SEC, lambda: (tx.rollback(), released.set()))
            release.start()
            try:
                answer = tc.post("/jobs/", json=body, headers={"Prefer": "return=minimal"})
                waited = released.is_set()  # the create's foreign key check waited for the lock
            finally:
                release.join()
    finally:
        side.dispose()
    assert answer.status_code == 201, answer.text[:300]
    assert waited
    assert tc.get("/jobs/", params={"limit": 0}).json()["count"] == 1000
