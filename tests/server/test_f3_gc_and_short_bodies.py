"""Two faults of the bulk PATCH speed-up (de52e52), fixed:

- the cyclic garbage collector was paused for the whole bulk PATCH (and bulk create), lock waits
  included: a PATCH waiting on a row lock (PostgreSQL, no lock timeout) or on SQLite's write lock
  left it off for every thread of the server as long as the wait lasted. It is paused only while
  the body is parsed now: while the request waits, ``gc.isenabled()`` in the server's process;
- a body of at most 256 bytes was not walked for the size limits, but one of 19 bytes or more can
  hold an integer out of the 64-bit range: ``PUT /jobs/{id}`` stored ``18446744073709551615`` sent
  in a short body and refused it in a long one. Every route now refuses it whatever the body's size,
  with the same 422 as in a long body.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
import uuid
from typing import Any, Callable

import pytest
import sqlalchemy as sa

from server_testlib import create_site_and_app, lock_job_row, logged_in_test_client, wait_blocked_by

BIG = 2**64 - 1  # orjson parses it as an int; over the 64-bit (signed) range
#: The integers orjson parses as ints beyond the signed 64-bit range (below -2**63 or above 2**64 - 1
#: it parses a float: docs/rest-api.md).
OUT_OF_RANGE = [BIG, 2**63]
RANGE_MSG = "integer out of the 64-bit range"
PAD = "p" * 300  # makes a body longer than the old 256-byte shortcut
WAIT_SEC = 30


@pytest.fixture
def server(database_url: str) -> Any:
    with logged_in_test_client(database_url, uuid.uuid4().hex * 2) as (client, app):
        site_id, app_id = create_site_and_app(client)
        yield {"client": client, "app": app, "site_id": site_id, "app_id": app_id}


def _jobs(client: Any, app_id: int, n: int, **fields: Any) -> list[int]:
    resp = client.post("/jobs/", json=[{"workdir": f"w/{uuid.uuid4().hex[:8]}", "app_id": app_id, **fields}
                                       for _ in range(n)])
    assert resp.status_code == 201, resp.text
    return [job["id"] for job in resp.json()]


# --- integers out of the 64-bit range, short bodies as long ones -------------------------------

def _cases(site_id: int, app_id: int, job_id: int, big: int) -> list[tuple[str, str, Callable[[str], Any], list[Any]]]:
    """(method, path, body with a pad, loc of the integer): each route that parses a JSON body."""
    return [
        ("PATCH", "/jobs/", lambda pad: [{"id": job_id, "data": {"x": big, "p": pad}}], ["body", 0, "data", "x"]),
        ("PATCH", "/jobs/", lambda pad: [{"id": job_id, "state": "RUNNING", "state_data": {"x": big, "p": pad}}],
         ["body", 0, "state_data", "x"]),
        ("PUT", f"/jobs/{job_id}", lambda pad: {"data": {"x": big, "p": pad}}, ["body", "data", "x"]),
        ("PUT", f"/jobs/?workdir__contains=w/", lambda pad: {"data": {"x": big, "p": pad}}, ["body", "data", "x"]),
        ("POST", "/jobs/", lambda pad: [{"workdir": "n", "app_id": app_id, "data": {"x": big, "p": pad}}],
         ["body", 0, "data", "x"]),
        ("PUT", f"/sites/{site_id}", lambda pad: {"optional_batch_job_params": {"x": big, "p": pad}},
         ["body", "optional_batch_job_params", "x"]),
    ]


def test_an_out_of_range_integer_is_refused_in_a_short_body_as_in_a_long_one(server):
    client = server["client"]
    (job_id,) = _jobs(client, server["app_id"], 1)
    before = client.get(f"/jobs/{job_id}").json()
    for big in OUT_OF_RANGE:
        for method, path, body, loc in _cases(server["site_id"], server["app_id"], job_id, big):
            answers = {}
            for pad in ("", PAD):
                resp = client.request(method, path, json=body(pad))
                answers[pad] = (resp.status_code, resp.json())
                assert (len(resp.request.content) <= 256) == (pad == ""), "the short body is of the old shortcut's size"
            assert answers[""] == (422, {"detail": [{"loc": loc, "msg": RANGE_MSG, "type": "value_error"}]}), (method, path, big)
            assert answers[""] == answers[PAD], (method, path, big)
    # Nothing was stored (the old short PUT answered 200 and stored it as it came).
    assert client.get(f"/jobs/{job_id}").json() == before
    assert client.get("/jobs/").json()["count"] == 1  # no job created


def test_the_shortest_body_holding_one_is_checked(server):
    # 2**63 alone is 19 bytes: refused by the limit, before the route's own checks.
    client = server["client"]
    (job_id,) = _jobs(client, server["app_id"], 1)
    resp = client.put(f"/jobs/{job_id}", content=b"9223372036854775808", headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == [{"loc": ["body"], "msg": RANGE_MSG, "type": "value_error"}]
    # In range, and short: the route's own answer.
    resp = client.put(f"/jobs/{job_id}", content=b"9223372036854775807", headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["msg"] != RANGE_MSG


# --- the collector stays on while a bulk write waits for a lock --------------------------------

def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["resp"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _assert_gc_on_while_waiting(server: Any, send: Callable[[], Any], lock_row: int, status: int) -> None:
    """``send()`` (a request) waits for the row ``lock_row`` (PostgreSQL: locked FOR UPDATE by a
    transaction of its own) or for SQLite's write lock (held by a connection of its own); while it
    waits, the collector of this process (the server's) is on; once the lock is released the
    request ends with ``status``."""
    engine = server["app"].state.engine
    assert gc.isenabled()
    if engine.dialect.name == "postgresql":
        blocker, tx, pid = lock_job_row(engine, lock_row)
        try:
            thread, out = _in_thread(send)
            with engine.connect() as look:
                wait_blocked_by(look, pid, WAIT_SEC, "the request never waited for the locked row")
            assert thread.is_alive()
            waiting_gc = gc.isenabled()
        finally:
            tx.rollback()
            blocker.close()
    else:
        holder = sqlite3.connect(engine.url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock: the request's BEGIN IMMEDIATE waits (busy timeout 60 s)
        try:
            thread, out = _in_thread(send)
            # No way to see a SQLite lock waiter: a readiness wait (the request parses a tiny body,
            # then waits on BEGIN IMMEDIATE for as long as the lock is held).
            time.sleep(1.0)
            assert thread.is_alive(), out
            waiting_gc = gc.isenabled()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    thread.join(WAIT_SEC)
    assert not thread.is_alive()
    assert "error" not in out, out
    assert out["resp"].status_code == status, out["resp"].text
    assert waiting_gc, "the cyclic GC was off (for every thread of the server) while the request waited for a lock"
    assert gc.isenabled()


def test_the_collector_is_on_while_a_bulk_patch_waits_for_a_lock(server):
    client = server["client"]
    ids = _jobs(client, server["app_id"], 2)
    assert client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids]).status_code == 200
    _assert_gc_on_while_waiting(server, lambda: client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids]),
                                ids[0], 200)
    assert {client.get(f"/jobs/{i}").json()["state"] for i in ids} == {"RUNNING"}


def test_the_collector_is_on_while_a_bulk_create_waits_for_a_lock(server):
    # On PostgreSQL a child's create reads its parents FOR SHARE: it waits for a parent's update.
    client = server["client"]
    (parent,) = _jobs(client, server["app_id"], 1)
    body = [{"workdir": f"c/{i}", "app_id": server["app_id"], "parent_ids": [parent]} for i in range(3)]
    _assert_gc_on_while_waiting(server, lambda: client.post("/jobs/", json=body), parent, 201)
    assert len(client.get("/jobs/", params={"workdir__contains": "c/"}).json()["results"]) == 3
