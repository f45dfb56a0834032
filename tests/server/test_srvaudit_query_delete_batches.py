"""A query delete (``DELETE /jobs/?filters``, 0.7's ``Job.objects.filter(tags=...).delete()``)
deletes in batches, each in its own short transaction, with the answer one transaction gave.

It deleted every matching job in one transaction: 10^6 jobs held SQLite's write lock 11 s (a
launcher's acquire and heartbeat waited 10.9 s) and on PostgreSQL the jobs' row locks 24 s (a
launcher's RUN_DONE of a skipped RUNNING job waited that long), with every id in the server's memory.

Real uvicorn servers on SQLite and PostgreSQL; the waits are for conditions, never timed.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, lock_job_row, wait_blocked_by

#: Spelled out: the tests also run against older code.
SKIPPED_RUNNING_HEADER = "Balsam-Skipped-Running"
#: The server's batch (jobs_logic.QUERY_DELETE_BATCH), spelled out for the same reason.
BATCH = 5_000
#: Generous: conditions are waited for, never timed.
WAIT_SEC = 120.0


def _create(api: Api, app_id: int, n: int, tags: dict) -> list[int]:
    ids: list[int] = []
    for start in range(0, n, BATCH):
        body = [{"workdir": f"d/{i}", "app_id": app_id, "tags": tags} for i in range(start, min(n, start + BATCH))]
        ids += [job["id"] for job in api.ok("POST", "/jobs/", 201, json=body)]
    return ids


def _count(api: Api, **params: Any) -> int:
    return api.ok("GET", "/jobs/", params={**params, "limit": 1})["count"]


def test_the_answer_spans_batches(api, site_app) -> None:
    """Three batches' worth: one count, every skipped RUNNING job named (one in each batch), a child
    whose parent was deleted in the first batch released, other jobs left, and a retry with the
    same Idempotency-Key replays the answer without deleting the matching jobs made since."""
    site, app = site_app
    tag = uuid.uuid4().hex[:8]
    ids = _create(api, app["id"], 2 * BATCH + 300, {"del": tag})
    running = [ids[10], ids[BATCH + 10], ids[2 * BATCH + 10]]
    api.patch_states(running, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    leased = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {"del": tag}})
    assert sorted(j["id"] for j in leased) == running
    api.patch_states(running, "RUNNING")
    parent = ids[0]
    child = api.ok("POST", "/jobs/", 201, json=[{"workdir": "child", "app_id": app["id"], "parent_ids": [parent]}])[0]
    assert child["state"] == "AWAITING_PARENTS"
    kept = _create(api, app["id"], 5, {"del": "other"})

    key = {"Idempotency-Key": uuid.uuid4().hex}
    resp = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=key)
    assert resp.status_code == 200, resp.text
    assert resp.json() == len(ids) - 3
    assert resp.headers[SKIPPED_RUNNING_HEADER] == "count=3; ids=" + ",".join(map(str, running))
    assert sorted(j["id"] for j in api.ok("GET", "/jobs/", params={"tags": f"del:{tag}"})["results"]) == running
    assert api.job(child["id"])["state"] != "AWAITING_PARENTS"
    assert _count(api, tags="del:other") == len(kept)

    later = _create(api, app["id"], 2, {"del": tag})
    again = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=key)
    assert (again.status_code, again.json(), again.headers[SKIPPED_RUNNING_HEADER]) == (
        200, len(ids) - 3, resp.headers[SKIPPED_RUNNING_HEADER])
    assert {j["id"] for j in api.ok("GET", "/jobs/", params={"tags": f"del:{tag}"})["results"]} == {*running, *later}


def test_the_python_api_deletes_across_batches(balsam_env) -> None:
    """0.7's call, unchanged: ``Job.objects.filter(tags=...).delete()`` returns the whole count."""
    from balsam.api import App, Job, Site

    site = Site.objects.create(name=f"s-{uuid.uuid4().hex[:6]}", path=f"/p/{uuid.uuid4().hex[:6]}")
    app = App.objects.create(site_id=site.id, name="A", serialized_class="eA==", source_code="x")
    Job.objects.bulk_create([Job(workdir=f"w/{i}", app_id=app.id, tags={"k": "many"}) for i in range(BATCH + 7)])
    assert Job.objects.filter(tags={"k": "many"}).delete() == BATCH + 7
    assert Job.objects.filter(tags={"k": "many"}).count() == 0


def _delete_in_thread(api: Api, tag: str) -> tuple[threading.Thread, dict]:
    answer: dict = {}

    def delete() -> None:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.token}"}, timeout=WAIT_SEC) as http:
            resp = http.delete("/jobs/", params={"tags": f"del:{tag}"})
            answer["status"], answer["body"] = resp.status_code, resp.json()

    thread = threading.Thread(target=delete)
    thread.start()
    return thread, answer


@pytest.mark.postgres
def test_postgresql_batches_commit_before_a_locked_job_is_reached(_live_server_pg_obj, live_server_pg, register) -> None:
    """A job of the second batch (the lower ids: the batches go down the ids) is locked (a
    launcher's update in flight): the delete waits for it with the first batch committed (its row
    locks released), not with every matching job locked."""
    api = Api(live_server_pg, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        site = api.site()
        app = api.app(site["id"])
        tag = uuid.uuid4().hex[:8]
        ids = _create(api, app["id"], 2 * BATCH, {"del": tag})
        blocker, tx, blocker_pid = lock_job_row(engine, ids[100])
        thread, answer = _delete_in_thread(api, tag)
        try:
            with engine.connect() as look:
                wait_blocked_by(look, blocker_pid, WAIT_SEC, "the delete never waited for the locked job")
                left = look.execute(sa.text("SELECT count(*) FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).scalar()
            assert left == BATCH, "the first batch was not committed before the delete reached the locked job"
        finally:
            tx.rollback()
            blocker.close()
            thread.join(WAIT_SEC)
        assert answer == {"status": 200, "body": 2 * BATCH}
    finally:
        engine.dispose()
        api.close()


#: Longer than jobs_logic.SQLITE_PAUSES_AFTER_SEC (1 s), after which a delete pauses between batches.
SQLITE_STALL_SEC = 2.5


def test_sqlite_writers_get_in_between_batches(live_server, _live_server_obj, register) -> None:
    """While the delete runs, another writer (a launcher's heartbeat, here a side connection's write
    transaction) gets SQLite's write lock between two batches: it finds some batches committed and
    some matching jobs still there, where one transaction held the lock until every job was gone.
    The delete pauses for writers once it has run a second (a shorter one does not): the side
    connection holds the lock for longer than that first, as another long writer would."""
    import sqlite3

    api = Api(live_server, register)
    try:
        site = api.site()
        app = api.app(site["id"])
        tag = uuid.uuid4().hex[:8]
        ids = _create(api, app["id"], 4 * BATCH, {"del": tag})
        path = _live_server_obj.database_url.split("///", 1)[1]
        side = sqlite3.connect(path, timeout=WAIT_SEC, isolation_level=None)
        marks = ",".join("?" * 500)
        count_sql = f"SELECT count(*) FROM jobs WHERE id IN ({marks})"
        sample = ids[::40]  # 500 ids spread over the four batches
        side.execute("BEGIN IMMEDIATE")
        thread, answer = _delete_in_thread(api, tag)
        try:
            time.sleep(SQLITE_STALL_SEC)  # the delete waits for the lock meanwhile
            side.execute("COMMIT")
            deadline = time.monotonic() + WAIT_SEC
            while side.execute(count_sql, sample).fetchone()[0] == len(sample):
                assert time.monotonic() < deadline, "nothing was deleted"
            side.execute("BEGIN IMMEDIATE")  # a writer: waits for the batch in progress, if any
            left = side.execute(count_sql, sample).fetchone()[0]
            side.execute("COMMIT")
            assert 0 < left < len(sample), f"{left} of {len(sample)} left: the delete held the write lock throughout"
        finally:
            side.close()
            thread.join(WAIT_SEC)
        assert answer == {"status": 200, "body": 4 * BATCH}
    finally:
        api.close()
