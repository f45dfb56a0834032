"""Four faults of the REST server's input handling and refusals, on a real server (SQLite and
PostgreSQL):

- ``K:V`` filters (``tags=``, ``data=``, ``filter_tags=``) without a cap: some 500 made SQLite
  refuse the statement ("Expression tree is too large (maximum depth 1000)"), answered and logged
  as a database outage (503). Now more than ``http.MAX_TAG_FILTERS`` are a one-line 422;
- query and path integers read by ``int()`` with a float fallback: ``1e3`` read as 1000, ``١٢``
  (Arabic-Indic) as 12 and ``１`` (full-width) as 1. Now ASCII decimal digits only;
- the app's fallback for an IntegrityError no route wrapped answered the database's first line;
- a launcher credential created for a BatchJob whose finish was committing escaped the finish's
  revocation: a live credential of a finished BatchJob."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api, logged_in_test_client, runnable, wait_blocked_by

from balsam.server import http

RAW_TEXT = ("violates", "constraint", "UNIQUE", "duplicate key", "Key (", "IntegrityError")

#: http.MAX_TAG_FILTERS (the dashboard's cap too).
MAX_TAG_FILTERS = 100
#: Every listing route that takes K:V filters, and the parameter.
KEY_VALUE_FILTERS = [("/jobs/", "tags"), ("/events/", "tags"), ("/events/", "data"),
                     ("/batch-jobs/", "filter_tags"), ("/transfers/", "tags")]


def _one_line_422(resp: Any, name: str) -> str:
    assert resp.status_code == 422, (resp.status_code, resp.text[:300])
    [item] = resp.json()["detail"]
    assert item["loc"] == ["query", name] and "\n" not in item["msg"], item
    return item["msg"]


def test_too_many_key_value_filters_answer_one_line_422(api: Api, site_app: Any) -> None:
    _, app = site_app
    made = [job["id"] for job in api.jobs(app["id"], 2, tags={"k0": "v"})]
    for path, name in KEY_VALUE_FILTERS:
        many = [(name, f"k{i}:v") for i in range(500)]
        # Before: 503 "The database is unavailable; retry shortly" on SQLite.
        assert _one_line_422(api.http.get(path, params=many), name) == f"at most {MAX_TAG_FILTERS} {name} filters, got 500"
        # As many as the cap: answered.
        resp = api.http.get(path, params=many[:MAX_TAG_FILTERS])
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
        # The cap counts distinct pairs (clauses): the same pair sent 500 times is one filter.
        resp = api.http.get(path, params=[(name, "k0:v")] * 500)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    # The query update and delete read the listing's filters: refused before anything changes.
    many = [("tags", f"k{i}:v") for i in range(MAX_TAG_FILTERS + 1)]
    assert _one_line_422(api.http.delete("/jobs/", params=many), "tags") == \
        f"at most {MAX_TAG_FILTERS} tags filters, got {MAX_TAG_FILTERS + 1}"
    assert api.ok("GET", "/jobs/", params={"tags": "k0:v"})["count"] == 2
    # Lists of ids and states are one IN each, bounded by the request line: no cap (the client
    # sends up to Query.filter_chunk_size, 500, ids per request).
    ids = [("id", str(i)) for i in made + list(range(10**9, 10**9 + 1498))]  # the server's ids grow across tests
    assert api.ok("GET", "/jobs/", params=ids)["count"] == 2
    assert api.ok("GET", "/jobs/", params=[("state", "RUN_DONE")] * 1000)["count"] == 0
    assert getattr(http, "MAX_TAG_FILTERS", None) == MAX_TAG_FILTERS


def test_an_acquire_with_too_many_filter_tags_answers_one_line_422(api: Api, site_app: Any) -> None:
    site, app = site_app
    runnable(api, app["id"], 2, tags={"k0": "v"})
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    tags = {f"k{i}": "v" for i in range(500)}
    resp = api.http.post(f"/sessions/{session['id']}", json={"max_num_jobs": 5, "filter_tags": tags})
    # Before: 503 "The database is unavailable; retry shortly" on SQLite (a launcher retried it as an outage).
    assert resp.status_code == 422, resp.text[:300]
    assert resp.json()["detail"] == [{"loc": ["body", "filter_tags"], "msg": "at most 100 tags, got 500", "type": "value_error"}]
    tags = {f"k{i}": "v" for i in range(MAX_TAG_FILTERS)}
    assert api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 5, "filter_tags": tags}) == []
    assert len(api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 5, "filter_tags": {"k0": "v"}})) == 2


def test_a_batch_job_with_too_many_filter_tags_is_refused_where_it_is_made(api: Api, site_app: Any) -> None:
    """Its launchers' acquires send its filter_tags: a BatchJob that could never lease a job is
    refused at its create and update (before: created, then every acquire answered 422)."""
    site, _ = site_app
    body = {"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"}
    many = {f"k{i}": "v" for i in range(MAX_TAG_FILTERS + 1)}
    resp = api.http.post("/batch-jobs/", json={**body, "filter_tags": many})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "filter_tags"], resp.text[:300]
    parts = [{"job_mode": "serial", "num_nodes": 1, "filter_tags": many}]
    resp = api.http.post("/batch-jobs/", json={**body, "partitions": parts})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "partitions", 0, "filter_tags"]
    bj = api.ok("POST", "/batch-jobs/", 201, json={**body, "filter_tags": dict(list(many.items())[:MAX_TAG_FILTERS])})
    resp = api.http.patch("/batch-jobs/", json=[{"id": bj["id"], "filter_tags": many}])
    assert resp.status_code == 422, resp.text[:300]
    assert resp.json()["detail"][0]["msg"].endswith(f"got {MAX_TAG_FILTERS + 1}")
    assert len(api.ok("GET", f"/batch-jobs/{bj['id']}")["filter_tags"]) == MAX_TAG_FILTERS
    # A partition's tags are sent merged with the BatchJob's: 60 + 50 others is 110 in each acquire.
    own = {f"b{i}": "v" for i in range(60)}
    parts = [{"job_mode": "serial", "num_nodes": 1, "filter_tags": {f"p{i}": "v" for i in range(50)}}]
    resp = api.http.post("/batch-jobs/", json={**body, "filter_tags": own, "partitions": parts})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "partitions", 0, "filter_tags"]
    assert resp.json()["detail"][0]["msg"].endswith("got 110")


def test_the_openapi_document_states_the_filter_tags_cap(api: Api) -> None:
    """Where a body's filter_tags are capped, /openapi.json says so (before: no maxProperties, so a
    client built from the document sent 101 and was refused)."""
    schemas = api.ok("GET", "/openapi.json")["components"]["schemas"]
    for name in ("SessionAcquire", "BatchJobCreate", "BatchJobUpdate", "BatchJobPatch", "BatchJobPartition"):
        assert schemas[name]["properties"]["filter_tags"].get("maxProperties") == MAX_TAG_FILTERS, name


@pytest.mark.parametrize("text", ["1e3", "5.0", "١٢", "１", "+5", " 5", "1_0", "0x10", "-"])
def test_query_and_path_integers_are_ascii_decimal_digits(api: Api, site_app: Any, text: str) -> None:
    _, app = site_app
    [job] = api.jobs(app["id"], 1)
    # Before: 1e3 was limit 1000, ١٢ offset 12, １ job 1 (200 each).
    # (An id list's items may have blanks around them: ``id=1, 2``.)
    for name in ("limit", "offset", "id__gt", "app_id") + (("id",) if text == text.strip() else ()):
        assert _one_line_422(api.http.get("/jobs/", params={name: text}), name) == f"expected an integer, got {text!r}"
    resp = api.http.get(f"/jobs/{text}")
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["path", "job_id"], (resp.status_code, resp.text)
    # What is a plain integer still is, negatives included where they mean something.
    assert [r["id"] for r in api.ok("GET", "/jobs/", params={"id": f"{job['id']},-1", "limit": "5", "offset": "0"})["results"]] == [job["id"]]
    assert api.ok("GET", "/jobs/", params={"id__gt": "-1", "app_id": str(app["id"])})["count"] == 1
    assert api.ok("GET", f"/jobs/{job['id']}")["id"] == job["id"]
    assert api.http.get("/jobs/-5").status_code == 404


def test_an_unwrapped_integrity_error_answers_one_line_without_the_database_text(database_url: str) -> None:
    """A route that lets the database's refusal through (none should: this one is added here)
    is answered as errors.refusals_answered answers it."""
    from starlette.routing import Route

    from balsam.server.http import json_response
    from balsam.server.tables import sites

    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        site = client.post("/sites/", json={"name": "twice", "path": "/tmp/twice"}).json()
        engine = app.state.engine

        def insert_twice(request: Any) -> Any:
            with engine.begin() as conn:
                row = conn.execute(sa.select(sites).where(sites.c.id == site["id"])).one()._asdict()
                conn.execute(sa.insert(sites).values({k: v for k, v in row.items() if k != "id"}))
            return json_response({})

        app.router.routes.insert(0, Route("/test-unwrapped-refusal", insert_twice, methods=["POST"]))
        resp = client.post("/test-unwrapped-refusal")
        # Before: 409 'The change conflicts with existing data: UNIQUE constraint failed: sites.owner_id, sites.name'
        # (PostgreSQL: 'duplicate key value violates unique constraint "..."').
        assert resp.status_code == 409, resp.text
        detail = resp.json()["detail"]
        assert "\n" not in detail and not any(w in detail for w in RAW_TEXT), detail
        # It names the record and the columns refused (PostgreSQL adds their values: the caller's own).
        assert detail.startswith("A Site with this owner_id, name ") and detail.endswith(" already exists"), detail


def _bj(api: Api, site_id: int) -> dict:
    return api.ok("POST", "/batch-jobs/", 201, json={"site_id": site_id, "project": "p", "queue": "q", "num_nodes": 1,
                                                     "wall_time_min": 30, "job_mode": "mpi"})


def _live_credentials(api: Api, bj_id: int) -> list[int]:
    return [c["id"] for c in api.ok("GET", "/auth/credentials", params={"batch_job_id": bj_id, "active": "true"})["results"]]


def test_no_launcher_credential_for_a_finished_batch_job(api: Api, site_app: Any) -> None:
    site, _ = site_app
    bj = _bj(api, site["id"])
    api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "finished"})
    resp = api.http.post("/auth/credentials", json={"site_id": site["id"], "batch_job_id": bj["id"], "ttl_sec": 600})
    # Before: 201, a live credential of a finished BatchJob.
    assert resp.status_code == 409, resp.text
    assert resp.json()["detail"] == (f"BatchJob {bj['id']} has finished: its launcher credentials are revoked, "
                                     "and no new one is issued")
    assert _live_credentials(api, bj["id"]) == []


def _blocked_by(look: sa.Connection, pid: int) -> list[tuple[int, str]]:
    look.rollback()  # pg_stat_activity is read once per transaction
    return [tuple(r) for r in look.execute(sa.text(
        "SELECT pid, query FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid})]


@pytest.mark.postgres
def test_a_credential_create_racing_its_batch_jobs_finish_is_refused(_live_server_pg_obj: Any, register: Any) -> None:
    """Deterministic: a third connection (the holder) holds a launcher credential of the BatchJob,
    so the finish stops in its revocation (the UPDATE of the credentials), after it locked and
    changed the BatchJob row, before its commit. The create is sent then. Before, it read the
    BatchJob unlocked (not finished: uncommitted) and inserted its credential at once; the
    finish's UPDATE, whose snapshot predates it, never revoked it. Now it waits for the finish on
    the BatchJob row (FOR SHARE) and reads it finished: 409."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    out: dict[str, Any] = {}
    threads: list[threading.Thread] = []

    def send(name: str, call: Any) -> None:
        threads.append(threading.Thread(target=lambda: out.update({name: call()})))
        threads[-1].start()

    try:
        site = api.site()
        bj = _bj(api, site["id"])
        sid, bid = site["id"], bj["id"]
        first = api.ok("POST", "/auth/credentials", 201, json={"site_id": sid, "batch_job_id": bid, "ttl_sec": 600})
        tx = holder.begin()
        holder.execute(sa.text("SELECT id FROM credentials WHERE id = :id FOR UPDATE"), {"id": first["id"]})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        send("finish", lambda: api.http.put(f"/batch-jobs/{bid}", json={"state": "finished"}))
        wait_blocked_by(look, hpid, 15, "the finish never waited for the holder")
        [(fpid, query)] = _blocked_by(look, hpid)
        assert query.lstrip().upper().startswith("UPDATE CREDENTIALS"), query
        send("create", lambda: api.http.post("/auth/credentials", json={"site_id": sid, "batch_job_id": bid,
                                                                         "ttl_sec": 600}))
        # Now the create waits for the finish; before, it answered at once.
        deadline = time.monotonic() + 30
        while "create" not in out and not _blocked_by(look, fpid):
            assert time.monotonic() < deadline, "the create neither answered nor waited for the finish"
            time.sleep(0.05)
        tx.commit()
        for thread in threads:
            thread.join(60)
        assert out["finish"].status_code == 200, out["finish"].text
        # Before: 201, and the credential stayed live after the finish committed.
        assert _live_credentials(api, bid) == []
        assert out["create"].status_code == 409, out["create"].text
        assert out["create"].json()["detail"] == (f"BatchJob {bid} has finished: its launcher credentials are "
                                                  "revoked, and no new one is issued")
    finally:
        if holder.in_transaction():
            holder.rollback()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        engine.dispose()
        api.close()
