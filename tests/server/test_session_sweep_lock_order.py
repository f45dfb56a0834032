"""A request's own expiry sweep against a BatchJob's finish, on PostgreSQL (sessions_logic, "Lock
order").

A tick or an acquire sweeps the user's stale sessions first (maybe_sweep). In the request's own
transaction, that sweep locked a stale session S2 (and waited for its jobs), and the request then
locked its own session S with the heartbeat. A BatchJob's finish locks the BatchJob's sessions in
id order, S then S2, without SKIP LOCKED: each held what the other waited for, a deadlock that
PostgreSQL ended with a 503. Now the sweep commits in a transaction of its own before the request's
begins, and holds nothing when the request locks its session. Deterministic: a third connection
holds S2's leased job, so the sweep stops holding S2 while the finish takes S and waits for S2; no
sleeps stand for an order. The sessions and the lease are written in SQL so that this request is
the user's first session request in the server process, the one whose sweep runs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api, runnable, wait_blocked_by

from balsam.server.acquire_waits import MAX_WAIT_SEC

pytestmark = pytest.mark.postgres

#: The requests that sweep first: a tick (PUT, the heartbeat alone) and an acquire (POST).
REQUESTS = {
    "tick": lambda api, sid: api.http.put(f"/sessions/{sid}", timeout=60),
    "acquire": lambda api, sid: api.http.post(f"/sessions/{sid}", json={"max_num_jobs": 1, "filter_tags": {}},
                                              timeout=60),
}


def _blocked(look: sa.Connection, pid: int) -> list[int]:
    look.rollback()  # pg_stat_activity is read once per transaction
    return list(look.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                             {"pid": pid}).scalars())


@pytest.mark.parametrize("request_kind", sorted(REQUESTS))
def test_a_requests_sweep_holds_no_stale_session_when_it_locks_its_own(
        _live_server_pg_obj: Any, register: Any, request_kind: str) -> None:
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    threads: list[threading.Thread] = []
    out: dict[str, Any] = {}
    tx = None
    try:
        site = api.site()
        app = api.app(site["id"])
        job_id, = runnable(api, app["id"])
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "running"})
        insert = ("INSERT INTO sessions (site_id, batch_job_id, heartbeat, clock_restarted) "
                  "VALUES (:site, :bj, {}, true) RETURNING id")  # clock_restarted: no restart clears S2
        with engine.begin() as conn:
            live = conn.execute(sa.text(insert.format("clock_timestamp()")), {"site": site["id"], "bj": bj["id"]}).scalar()
            stale = conn.execute(sa.text(insert.format("now() - interval '1 day'")),
                                 {"site": site["id"], "bj": bj["id"]}).scalar()
            conn.execute(sa.text("UPDATE jobs SET session_id = :s WHERE id = :j"), {"s": stale, "j": job_id})
        assert live < stale  # the finish locks the live session first

        tx = holder.begin()
        holder.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        threads.append(threading.Thread(target=lambda: out.update(request=REQUESTS[request_kind](api, live))))
        threads[-1].start()
        wait_blocked_by(look, hpid, 15, f"the {request_kind}'s sweep never waited for the stale session's job")
        [spid] = _blocked(look, hpid)
        threads.append(threading.Thread(target=lambda: out.update(finish=api.http.put(
            f"/batch-jobs/{bj['id']}", json={"state": "finished"}, timeout=60))))
        threads[-1].start()
        wait_blocked_by(look, spid, 15, "the finish never waited for the sweep (the stale session)")
        look.rollback()
        tx.commit()  # the sweep goes on
        for thread in threads:
            thread.join(60)
        request, finish = out["request"], out["finish"]
        # Before: a deadlock, PostgreSQL's victim answered 503 (nothing of it applied).
        assert finish.status_code == 200 and finish.json()["state"] == "finished", (finish.status_code, finish.text)
        # The request waited for the finish, which ended its session: 404, the launcher's cue.
        assert request.status_code == 404 and f"Session {live} not found" in request.text, (
            request.status_code, request.text)
        # Both sessions ended, the job free again (it was leased, never RUNNING).
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM sessions WHERE id IN (:a, :b)"),
                                {"a": live, "b": stale}).scalar() == 0
            assert conn.execute(sa.text("SELECT session_id FROM jobs WHERE id = :j"), {"j": job_id}).scalar() is None
    finally:
        if tx is not None and tx.is_active:
            tx.commit()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        engine.dispose()
        api.close()


@pytest.mark.parametrize("tick_target", ["live", "stale_itself"])
def test_jobs_a_requests_own_sweep_frees_wake_waiting_acquires_even_when_the_request_fails(
        _live_server_pg_obj: Any, register: Any, tick_target: str) -> None:
    """The sweep commits in its own transaction: a tick of the very Session it expired (404) still
    freed the stale Session's job, and a waiting acquire must hear of it at once, not at its
    ``Prefer: wait`` deadline (the wake was read only after a handler returned normally)."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    out: dict[str, Any] = {}
    try:
        site = api.site()
        app = api.app(site["id"])
        job_id, = runnable(api, app["id"])
        ins = "INSERT INTO sessions (site_id, heartbeat, clock_restarted) VALUES (:s, {}, true) RETURNING id"
        with engine.begin() as c:
            waiter = c.execute(sa.text(ins.format("clock_timestamp()")), {"s": site["id"]}).scalar()
            live = c.execute(sa.text(ins.format("clock_timestamp()")), {"s": site["id"]}).scalar()
            stale = c.execute(sa.text(ins.format("now() - interval '1 day'")), {"s": site["id"]}).scalar()
            c.execute(sa.text("UPDATE jobs SET session_id = :s WHERE id = :j"), {"s": stale, "j": job_id})

        def wait_acquire() -> None:
            t0 = time.monotonic()
            r = api.http.post(f"/sessions/{waiter}", json={"max_num_jobs": 1, "filter_tags": {}},
                              headers={"Prefer": "wait=30"}, timeout=90)
            out["acq"] = (r.status_code, [j["id"] for j in r.json()] if r.status_code == 200 else r.text,
                          time.monotonic() - t0)

        th = threading.Thread(target=wait_acquire)
        th.start()
        time.sleep(1.0)  # its look found nothing: it waits (had it not yet looked, it finds the job)
        tick = api.http.put(f"/sessions/{live if tick_target == 'live' else stale}", timeout=60)
        th.join(90)
        assert tick.status_code == (200 if tick_target == "live" else 404)
        code, got, took = out["acq"]
        assert (code, got) == (200, [job_id])
        # Woken by the sweep, not at the server's cap on a wait (MAX_WAIT_SEC, 10 s): a liveness
        # check with a wide margin (the wake takes milliseconds after the tick at +1 s).
        assert took < MAX_WAIT_SEC / 2, f"the waiting acquire heard of job {job_id} only at its deadline ({took:.1f} s)"
    finally:
        engine.dispose()
        api.close()
