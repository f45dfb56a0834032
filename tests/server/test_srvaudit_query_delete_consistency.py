"""A query delete in batches (``DELETE /jobs/?filters``, see test_srvaudit_query_delete_batches.py)
behaves as the one transaction it replaced, beyond its answer:

- a child that the delete matches is never released when its parent goes in an earlier batch (it
  was: 120-180 of 10,000 children of a DAG deleted by tag were taken by a launcher and run,
  skipped as RUNNING and left);
- no pooled connection is held beside a batch's (a pool of one answered a 3-job delete 503 after
  30 s: the id reader stayed open while each batch waited for a second connection);
- its ``Idempotency-Key`` is claimed before the first batch (two requests with one key both
  deleted, one answering part of the count);
- on SQLite it pauses for other writers only once it has run a while (a 10,000-job delete took
  twice as long with a pause between every two batches).

Real uvicorn servers on SQLite and PostgreSQL; the waits are for conditions, never timed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from typing import Any, Callable

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, lock_job_row, wait_blocked_by

#: The server's batch (jobs_logic.QUERY_DELETE_BATCH), spelled out: the tests also run against older code.
BATCH = 5_000
#: Generous: conditions are waited for, never timed.
WAIT_SEC = 120.0


def _create(api: Api, body: list[dict]) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(body), BATCH):
        ids += [j["id"] for j in api.ok("POST", "/jobs/", 201, json=body[start:start + BATCH],
                                        headers={"Prefer": "return=minimal"})]
    return ids


def _delete_in_thread(api: Api, tag: str, headers: "dict | None" = None) -> tuple[threading.Thread, dict]:
    answer: dict = {}

    def delete() -> None:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.token}", **(headers or {})},
                          timeout=WAIT_SEC) as http:
            resp = http.delete("/jobs/", params={"tags": f"del:{tag}"})
            answer["status"], answer["body"] = resp.status_code, resp.text

    thread = threading.Thread(target=delete)
    thread.start()
    return thread, answer


def _dag_scenario(api: Api, read_states: Callable[[list[int]], list[str]]) -> None:
    """5,000 parents (the first batch) and 15,000 children (the next three), all tagged, and one
    child not tagged whose parent is in the first batch. While the delete runs, ``read_states`` (a
    side connection to the database, outside the server) reads the tagged children's states over
    and over: none may leave AWAITING_PARENTS before its own batch deletes it; the untagged child is
    released as before."""
    site = api.site()
    app = api.app(site["id"])
    tag = uuid.uuid4().hex[:8]
    parents = _create(api, [{"workdir": f"p/{i}", "app_id": app["id"], "tags": {"del": tag}} for i in range(BATCH)])
    children = _create(api, [{"workdir": f"c/{i}", "app_id": app["id"], "tags": {"del": tag},
                              "parent_ids": [parents[i % BATCH]]} for i in range(3 * BATCH)])
    outside = api.ok("POST", "/jobs/", 201, json=[{"workdir": "out", "app_id": app["id"], "parent_ids": [parents[7]]}])[0]
    assert outside["state"] == "AWAITING_PARENTS"
    sample = children[::50]  # 300 children spread over the three batches
    seen: set[str] = set()
    looks = 0
    thread, answer = _delete_in_thread(api, tag)
    try:
        while thread.is_alive():
            seen.update(read_states(sample))
            looks += 1
    finally:
        thread.join(WAIT_SEC)
    assert answer == {"status": 200, "body": str(4 * BATCH)}
    assert looks > 0
    assert seen <= {"AWAITING_PARENTS"}, f"children the delete matched were released before their batch: {seen}"
    assert api.ok("GET", "/jobs/", params={"tags": f"del:{tag}", "limit": 1})["count"] == 0
    assert api.job(outside["id"])["state"] in ("READY", "STAGED_IN")


def test_sqlite_dag_children_are_not_released_before_their_batch(live_server, _live_server_obj, register) -> None:
    api = Api(live_server, register)
    side = sqlite3.connect(_live_server_obj.database_url.split("///", 1)[1], timeout=WAIT_SEC, isolation_level=None)
    try:
        def states(ids: list[int]) -> list[str]:
            marks = ",".join("?" * len(ids))
            return [s for (s,) in side.execute(f"SELECT DISTINCT state FROM jobs WHERE id IN ({marks})", ids)]

        _dag_scenario(api, states)
    finally:
        side.close()
        api.close()


@pytest.mark.postgres
def test_postgresql_dag_children_are_not_released_before_their_batch(_live_server_pg_obj, live_server_pg,
                                                                      register) -> None:
    api = Api(live_server_pg, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as side:
            def states(ids: list[int]) -> list[str]:
                with side.begin():
                    return list(side.execute(sa.text("SELECT DISTINCT state FROM jobs WHERE id = ANY(:ids)"),
                                             {"ids": ids}).scalars())

            _dag_scenario(api, states)
    finally:
        engine.dispose()
        api.close()


@pytest.mark.postgres
def test_a_pool_of_one_connection_deletes(live_server_factory, register) -> None:
    """The ids are read, and their transaction ended, before the batches take a connection: with a
    pool of one (no overflow) a query delete answers, where it waited for a second connection until
    the pool's timeout (503); eight at once on a pool of four all answer."""
    server = live_server_factory(database="postgresql", env={"BALSAM_DB_POOL_SIZE": "1", "BALSAM_DB_MAX_OVERFLOW": "0"})
    api = Api(server.url, register)
    try:
        app = api.app(api.site()["id"])
        tags = [uuid.uuid4().hex[:8] for _ in range(4)]
        for tag in tags:
            _create(api, [{"workdir": f"d/{tag}/{i}", "app_id": app["id"], "tags": {"del": tag}} for i in range(3)])
        threads = [_delete_in_thread(api, tag) for tag in tags]
        for thread, _answer in threads:
            thread.join(WAIT_SEC)
        assert [answer for _thread, answer in threads] == [{"status": 200, "body": "3"}] * len(tags)
    finally:
        api.close()


@pytest.mark.postgres
def test_postgresql_a_duplicate_key_waits_for_the_delete(_live_server_pg_obj, live_server_pg, register) -> None:
    """A second request with the key of a delete that is still running (its second batch, the lower ids, waits for
    a locked job) deletes nothing beside it: it is answered 503 with a Retry-After (our client
    retries it); once the first has answered, the key replays its whole count. (The key was claimed
    after the batches: the second request deleted the rest alongside, and one answered part of it.)"""
    api = Api(live_server_pg, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        app = api.app(api.site()["id"])
        tag = uuid.uuid4().hex[:8]
        ids = _create(api, [{"workdir": f"d/{i}", "app_id": app["id"], "tags": {"del": tag}} for i in range(2 * BATCH)])
        key = {"Idempotency-Key": uuid.uuid4().hex}
        blocker, tx, blocker_pid = lock_job_row(engine, ids[100])
        first, first_answer = _delete_in_thread(api, tag, key)
        try:
            with engine.connect() as look:
                wait_blocked_by(look, blocker_pid, WAIT_SEC, "the delete never waited for the locked job")
            second, second_answer = _delete_in_thread(api, tag, key)
            # Answered at once, or (older code) waits for the same lock: 60 s, not 5, so that a
            # loaded host's slow round trip is not taken for the wait (the lock is released below).
            second.join(60.0)
        finally:
            tx.rollback()
            blocker.close()
            first.join(WAIT_SEC)
        second.join(WAIT_SEC)
        assert first_answer == {"status": 200, "body": str(2 * BATCH)}
        assert second_answer["status"] == 503, second_answer
        assert "still deleting" in second_answer["body"]
        replay = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=key)
        assert (replay.status_code, replay.text) == (200, str(2 * BATCH))
    finally:
        engine.dispose()
        api.close()


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_requests_with_one_key_delete_once(database, live_server, live_server_factory, register) -> None:
    """Two requests with one key, 0.15 s apart: one deletes and answers the whole count, the other
    is answered that count (a replay) or 503 (in progress), and a retry after both replays it."""
    url = live_server if database == "sqlite" else live_server_factory(database="postgresql").url
    api = Api(url, register)
    try:
        app = api.app(api.site()["id"])
        tag = uuid.uuid4().hex[:8]
        n = 4 * BATCH
        _create(api, [{"workdir": f"d/{i}", "app_id": app["id"], "tags": {"del": tag}} for i in range(n)])
        key = {"Idempotency-Key": uuid.uuid4().hex}
        first, first_answer = _delete_in_thread(api, tag, key)
        time.sleep(0.15)  # to overlap the two; the assertions hold whatever the overlap
        second, second_answer = _delete_in_thread(api, tag, key)
        first.join(WAIT_SEC)
        second.join(WAIT_SEC)
        answers = sorted([first_answer, second_answer], key=lambda a: a["status"])
        assert answers[0] == {"status": 200, "body": str(n)}, answers
        assert answers[1]["status"] in (200, 503) and (answers[1]["status"] == 503 or answers[1]["body"] == str(n)), answers
        replay = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=key)
        assert (replay.status_code, replay.text) == (200, str(n))
    finally:
        api.close()


def test_sqlite_pauses_only_once_the_delete_has_run_a_while() -> None:
    """No pause for other writers in a query delete's first second on SQLite (pausing between every
    two batches doubled a 10,000-job delete: 0.12 -> 0.23 s), then one before each batch, longer
    than SQLite's busy handler's longest sleep (every waiting writer gets in)."""
    from balsam.server import jobs_logic

    turn: Any = jobs_logic.sqlite_writers_turn
    assert turn(100.0, 100.0) == 0.0
    assert turn(100.0, 100.0 + jobs_logic.SQLITE_PAUSES_AFTER_SEC / 2) == 0.0
    assert jobs_logic.SQLITE_PAUSES_AFTER_SEC <= 1.0
    assert turn(100.0, 100.0 + jobs_logic.SQLITE_PAUSES_AFTER_SEC) == jobs_logic.SQLITE_WRITERS_TURN_SEC > 0.1
    assert turn(100.0, 100.0 + 60.0) == jobs_logic.SQLITE_WRITERS_TURN_SEC
