"""A query delete in batches (``DELETE /jobs/?filters``) cut off midway, and its ``Idempotency-Key``
claim (review r6):

- a delete failing midway leaves no matched child waiting on a parent it deleted: the batches go
  down the ids, children first (ascending, the parent went in batch 1, its child's release was
  left to batch 2, which failed: the child waited for ever);
- a child made with ids reserved before its parent's goes with its parent's batch;
- after a crash mid-delete, our client's retries with the key outlast the claim left behind and
  get the rest deleted (Retry-After was 1 s against a 60 s claim: the client gave up after 10 s,
  "still deleting", though nothing ran);
- a delete whose claim another request took over records nothing and answers its own count (it
  renewed and recorded over the other's claim: whichever recorded last was replayed).

Real uvicorn servers on SQLite and PostgreSQL; the waits are for conditions, never timed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
import time
import uuid
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, lock_job_row, wait_blocked_by

#: The server's batch (jobs_logic.QUERY_DELETE_BATCH), spelled out: the tests also run against older code.
BATCH = 5_000
#: Generous: conditions are waited for, never timed.
WAIT_SEC = 120.0


def _create(api: Api, body: list[dict], headers: "dict | None" = None) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(body), BATCH):
        ids += [j["id"] for j in api.ok("POST", "/jobs/", 201, json=body[start:start + BATCH],
                                        headers={"Prefer": "return=minimal", **(headers or {})})]
    return ids


def _tagged(app_id: int, tag: str, n: int, prefix: str) -> list[dict]:
    return [{"workdir": f"{prefix}/{i}", "app_id": app_id, "tags": {"del": tag}} for i in range(n)]


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))


def _fail_deleting(engine: sa.Engine, job_id: int) -> None:
    """A trigger that makes the delete of ``job_id`` fail (the batch holding it fails: 500)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(f"CREATE TRIGGER qdel_boom BEFORE DELETE ON jobs WHEN old.id = {job_id} "
                                 "BEGIN SELECT RAISE(FAIL, 'qdel boom'); END")
        else:
            conn.exec_driver_sql("CREATE OR REPLACE FUNCTION qdel_boom() RETURNS trigger AS $$ BEGIN "
                                 f"IF OLD.id = {job_id} THEN RAISE EXCEPTION 'qdel boom'; END IF; RETURN OLD; END $$ "
                                 "LANGUAGE plpgsql")
            conn.exec_driver_sql("CREATE TRIGGER qdel_boom BEFORE DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION qdel_boom()")


def _drop_trigger(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER qdel_boom" + ("" if engine.dialect.name == "sqlite" else " ON jobs"))


def _delete_failing_at(api: Api, engine: sa.Engine, tag: str, job_id: int) -> None:
    """Delete the jobs tagged ``del:tag`` while deleting ``job_id`` fails: the delete is refused."""
    _fail_deleting(engine, job_id)
    try:
        resp = api.http.delete("/jobs/", params={"tags": f"del:{tag}"})
    finally:
        _drop_trigger(engine)
    assert resp.status_code >= 400, resp.text


@contextlib.contextmanager
def _server_app_and_tag(live_server_factory: Any, register: Any,
                        database: str) -> Iterator[tuple[Any, Api, sa.Engine, dict, str]]:
    """A server of its own on ``database``, a user's API client, an engine on its database, an app
    of a new site and a fresh tag: (server, api, engine, app, tag); the engine and client closed after."""
    srv = live_server_factory(database=database)
    api = Api(srv.url, register)
    engine = _engine(srv.database_url)
    try:
        yield srv, api, engine, api.app(api.site()["id"]), uuid.uuid4().hex[:8]
    finally:
        engine.dispose()
        api.close()


def _waiting_on_deleted(api: Api, job_ids: list[int]) -> list[int]:
    """Those of ``job_ids`` still AWAITING_PARENTS with a parent that no longer exists."""
    stuck = []
    for jid in job_ids:
        resp = api.http.get(f"/jobs/{jid}")
        if resp.status_code == 404:
            continue
        job = resp.json()
        if job["state"] == "AWAITING_PARENTS" and any(api.http.get(f"/jobs/{p}").status_code == 404
                                                      for p in job["parent_ids"]):
            stuck.append(jid)
    return stuck


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_failed_batch_leaves_no_child_waiting_on_a_deleted_parent(database, live_server_factory, register) -> None:
    """Parents (the lower 5,000 ids), then their children and 10 more jobs above them; deleting one
    of the 10 fails. Whatever batches committed, no child waits on a parent that is gone."""
    with _server_app_and_tag(live_server_factory, register, database) as (srv, api, engine, app, tag):
        parents = _create(api, _tagged(app["id"], tag, BATCH, "p"))
        children = _create(api, [{"workdir": f"c/{i}", "app_id": app["id"], "tags": {"del": tag},
                                  "parent_ids": [parents[i]]} for i in range(3)])
        more = _create(api, _tagged(app["id"], tag, 10, "m"))
        _delete_failing_at(api, engine, tag, more[0])
        assert _waiting_on_deleted(api, children) == []


@pytest.mark.postgres
def test_a_long_chain_of_children_below_their_parents_ids_goes_with_its_top_parent(live_server_factory,
                                                                                 register) -> None:
    """1,000 waiting jobs, each the child of the next (a lower id than its parent, as reserved ids
    make them; the reservations' budget is 200 at once, so the links are written with SQL), below
    5,000 others and their top parent: all pulled into the top parent's batch, link after link (the
    pull recursed: from ~600 links every try failed, 500 RecursionError, review r8)."""
    with _server_app_and_tag(live_server_factory, register, "postgresql") as (srv, api, engine, app, tag):
        chain = _create(api, _tagged(app["id"], tag, 1_000, "c"))
        _create(api, _tagged(app["id"], tag, BATCH, "f"))
        top = _create(api, _tagged(app["id"], tag, 1, "top"))[0]
        with engine.begin() as conn:
            links = [(chain[-1], top)] + [(chain[i], chain[i + 1]) for i in range(len(chain) - 1)]
            conn.execute(sa.text("INSERT INTO job_parents (child_id, parent_id) VALUES (:c, :p)"),
                         [{"c": child, "p": parent} for child, parent in links])
            conn.execute(sa.text("UPDATE jobs SET state = 'AWAITING_PARENTS' WHERE id = ANY(:ids)"), {"ids": chain})
        resp = api.http.delete("/jobs/", params={"tags": f"del:{tag}"})
        assert (resp.status_code, resp.text) == (200, str(1_000 + BATCH + 1))
        assert api.ok("GET", "/jobs/", params={"tags": f"del:{tag}", "limit": 1})["count"] == 0


@pytest.mark.postgres
def test_a_child_with_ids_reserved_before_its_parents_goes_with_them(live_server_factory, register) -> None:
    """A child made with an id reserved before its parent's (and 5,000 jobs') lies in a lower
    batch than its parent: it is deleted with its parent's batch, so a later batch failing leaves
    it neither waiting on the deleted parent nor released before its own batch."""
    with _server_app_and_tag(live_server_factory, register, "postgresql") as (srv, api, engine, app, tag):
        low = _create(api, _tagged(app["id"], tag, 1, "low"))  # fails in the last batch
        reservation = api.ok("POST", "/jobs/reservations", json={"sizes": [1]})["reservations"][0]
        fillers = _create(api, _tagged(app["id"], tag, BATCH, "f"))
        parent = _create(api, _tagged(app["id"], tag, 1, "parent"))[0]
        child = _create(api, [{"workdir": "child", "app_id": app["id"], "tags": {"del": tag}, "parent_ids": [parent]}],
                        headers={"Idempotency-Key": reservation["idempotency_key"]})[0]
        assert child < fillers[0] < parent
        _delete_failing_at(api, engine, tag, low[0])
        assert api.http.get(f"/jobs/{parent}").status_code == 404  # the first batch committed
        assert api.http.get(f"/jobs/{child}").status_code == 404
        resp = api.http.delete("/jobs/", params={"tags": f"del:{tag}"})
        assert resp.status_code == 200 and int(resp.text) >= 1
        assert api.ok("GET", "/jobs/", params={"tags": f"del:{tag}", "limit": 1})["count"] == 0


def test_our_client_outlasts_the_claim_of_a_delete_cut_off_by_a_crash(live_server_factory, register) -> None:
    """The server is killed midway through a 60,000-job delete and restarted: the key's claim is
    left; the Python client's retries with the key (its default budget) wait the Retry-After the
    server gives (the claim's remaining seconds) and then get the rest deleted and counted."""
    from balsam.client.rest import RESTClient

    srv = live_server_factory(database="sqlite")
    api = Api(srv.url, register)
    try:
        app = api.app(api.site()["id"])
        tag = uuid.uuid4().hex[:8]
        n = 12 * BATCH
        _create(api, _tagged(app["id"], tag, n, "d"))
        key = uuid.uuid4().hex
        dbfile = srv.database_url.replace("sqlite:///", "")

        def delete() -> None:
            try:
                with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {api.token}",
                                                             "Idempotency-Key": key}, timeout=WAIT_SEC) as http:
                    http.delete("/jobs/", params={"tags": f"del:{tag}"})
            except httpx.HTTPError:
                pass  # the server was killed under it

        thread = threading.Thread(target=delete)
        thread.start()
        deadline = time.monotonic() + WAIT_SEC
        while True:
            con = sqlite3.connect(dbfile, timeout=60)
            left = con.execute("SELECT count(*) FROM jobs").fetchone()[0]
            con.close()
            if left <= n - 2 * BATCH:
                break
            assert time.monotonic() < deadline, "the delete never got through two batches"
            time.sleep(0.05)
        srv.proc.kill()
        srv.proc.wait()
        thread.join(WAIT_SEC)
        srv.start()
        con = sqlite3.connect(dbfile, timeout=60)
        left = con.execute("SELECT count(*) FROM jobs").fetchone()[0]
        claimed = con.execute("SELECT status_code FROM idempotency_keys WHERE key = ?", (key,)).fetchall()
        con.close()
        assert 0 < left < n and claimed == [(0,)]  # cut off midway, its claim left behind
        client = RESTClient(srv.url, token=api.token, allow_insecure_http=True)
        assert client.delete("/jobs/", params={"tags": f"del:{tag}"}, idempotency_key=key) == left
        assert api.ok("GET", "/jobs/", params={"tags": f"del:{tag}", "limit": 1})["count"] == 0
    finally:
        api.close()


def test_a_request_during_the_delete_is_told_the_claims_remaining_seconds(live_server_factory, register) -> None:
    """The 503 of a request with the key of a running delete says how long the claim has left
    (Retry-After, whole seconds, at least 1): there the claim of a delete cut off has lapsed."""
    srv = live_server_factory(database="sqlite")
    api = Api(srv.url, register)
    try:
        app = api.app(api.site()["id"])
        tag = uuid.uuid4().hex[:8]
        _create(api, _tagged(app["id"], tag, 2, "d"))
        key = uuid.uuid4().hex
        first = api.http.delete("/jobs/", params={"tags": f"del:{tag}x"}, headers={"Idempotency-Key": key})
        assert first.status_code == 200
        # Made to look like a delete still running (or cut off), 40 s left on its claim.
        con = sqlite3.connect(srv.database_url.replace("sqlite:///", ""), timeout=60)
        expires = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=40)).replace(tzinfo=None)
        con.execute("UPDATE idempotency_keys SET status_code = 0, expires = ? WHERE key = ?",
                    (expires.isoformat(sep=" "), key))
        con.commit()
        con.close()
        resp = api.http.delete("/jobs/", params={"tags": f"del:{tag}x"}, headers={"Idempotency-Key": key})
        assert resp.status_code == 503 and "still deleting" in resp.text
        assert 30 <= int(resp.headers["Retry-After"]) <= 40
    finally:
        api.close()


@pytest.mark.postgres
def test_a_delete_whose_claim_was_taken_over_records_nothing(live_server_factory, register) -> None:
    """A delete's claim is taken over while it runs (what a retry with the key does once a batch
    has waited longer than the claim's lease; here a side connection writes the other's expiry):
    the delete finishes, answers its own count, records nothing and logs a warning naming the key,
    leaving the other's claim as it was. (It renewed the claim over the other's and recorded its
    answer: the other's was lost, or overwrote it, whichever came last.)"""
    with _server_app_and_tag(live_server_factory, register, "postgresql") as (srv, api, engine, app, tag):
        ids = _create(api, _tagged(app["id"], tag, 2 * BATCH, "d"))
        key = uuid.uuid4().hex
        job_blocker, job_tx, job_pid = lock_job_row(engine, ids[BATCH + 100])
        answer: dict = {}

        def delete() -> None:
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {api.token}",
                                                         "Idempotency-Key": key}, timeout=WAIT_SEC) as http:
                resp = http.delete("/jobs/", params={"tags": f"del:{tag}"})
                answer["status"], answer["body"] = resp.status_code, resp.text

        def wait_blocked_by_pid(pid: int) -> None:
            with engine.connect() as look:
                wait_blocked_by(look, pid, WAIT_SEC, "the delete never waited")

        thread = threading.Thread(target=delete)
        thread.start()
        key_blocker = engine.connect()
        try:
            wait_blocked_by_pid(job_pid)  # in its first batch, the claim taken and renewed
            key_tx = key_blocker.begin()
            theirs = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=600)
            taken = key_blocker.execute(sa.text("UPDATE idempotency_keys SET expires = :e WHERE key = :k "
                                                "AND status_code = 0"), {"e": theirs, "k": key}).rowcount
            assert taken == 1
            key_pid = key_blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            job_tx.rollback()
            wait_blocked_by_pid(key_pid)  # its next renewal waits for the other's claim to commit
            key_tx.commit()
        finally:
            job_blocker.close()
            key_blocker.close()
            thread.join(WAIT_SEC)
        assert answer == {"status": 200, "body": str(2 * BATCH)}
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT status_code, expires FROM idempotency_keys WHERE key = :k"),
                               {"k": key}).one()
        assert row.status_code == 0 and row.expires == theirs
        assert key in srv.log_tail(200)
