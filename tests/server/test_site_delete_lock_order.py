"""The lock order BatchJob, credentials, sessions, jobs on PostgreSQL: DELETE /sites/{id} against a
launcher's POST /sessions/, its release and the expiry sweep, and a BatchJob's finish against a
credential's revoke.

A launcher's Session create locks its BatchJob (the start_time UPDATE,
sessions_logic.note_batch_job_start) and then its credential FOR SHARE. The site delete locked the
site's credentials FOR UPDATE first and reached the BatchJob only in its cascade, last: each held
what the other waited for, a deadlock that PostgreSQL ended with a 503. Now the site delete locks
the site's BatchJobs (FOR NO KEY UPDATE) before its credentials. Deterministic: a third connection
holds the site's app row, so the delete stops (at its apps, after its first locks) until the
create has come as far as it can; no sleeps stand for an order.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, runnable, wait_blocked_by

from balsam.server import sessions_logic

pytestmark = pytest.mark.postgres


def _blocked_by(look: sa.Connection, pid: int) -> list[tuple[int, str]]:
    """The backends waiting for a lock ``pid`` holds: (pid, the statement each runs)."""
    look.rollback()  # pg_stat_activity is read once per transaction
    return [tuple(r) for r in look.execute(sa.text(
        "SELECT pid, query FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid})]


def _wait_blocked_count(look: sa.Connection, pid: int, count: int, what: str, timeout: float = 15) -> None:
    """Wait until ``count`` backends wait for a lock ``pid`` holds (``what``: the message if not)."""
    deadline = time.monotonic() + timeout
    while len(_blocked_by(look, pid)) < count:
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _lock_free(look: sa.Connection, bj_id: int, mode: str) -> bool:
    """Whether the BatchJob row can be locked in ``mode`` now (NOWAIT), by ``look``."""
    look.rollback()
    try:
        look.execute(sa.text(f"SELECT id FROM batch_jobs WHERE id = :id FOR {mode} NOWAIT"), {"id": bj_id})
        return True
    except sa.exc.OperationalError as exc:
        assert getattr(exc.orig, "pgcode", None) == "55P03", exc  # lock_not_available
        return False
    finally:
        look.rollback()


def test_session_create_and_site_delete_take_the_batch_job_before_the_credential(
        _live_server_pg_obj: Any, register: Any) -> None:
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    launcher = None
    tx = None
    threads: list[threading.Thread] = []
    try:
        site = api.site()
        app = api.app(site["id"])
        runnable(api, app["id"])  # a job of the site: the delete locks and deletes it (delete_jobs_of)
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "queued"})
        cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600,
                                                               "batch_job_id": bj["id"]})
        launcher = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {cred['access_token']}"},
                                timeout=60)
        # Warm the launcher's token in the credential cache: its create goes to its transaction at once.
        assert launcher.get(f"/batch-jobs/{bj['id']}").status_code == 200
        # Another allocation of the site, whose Session (opened earlier) leases a job while the
        # delete waits. (Not the launcher's: that BatchJob's start_time stays unknown until its
        # create, whose UPDATE then has a row to lock.)
        other = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                           "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        earlier = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": other["id"]})

        tx = holder.begin()
        holder.execute(sa.text("SELECT id FROM apps WHERE id = :id FOR UPDATE"), {"id": app["id"]})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        out: dict[str, Any] = {}
        threads.append(threading.Thread(target=lambda: out.update(delete=api.http.delete(f"/sites/{site['id']}"))))
        threads[-1].start()
        # The delete took its first locks and waits for the site's app (held here).
        wait_blocked_by(look, hpid, 15, "the site delete never waited for the app")
        [(dpid, _query)] = _blocked_by(look, hpid)
        # It holds the BatchJob as a BatchJob update does (FOR NO KEY UPDATE), taken before its
        # credentials; a key-share lock (a lease's, a session's, a credential's reference) is free.
        holds_batch_job = [not _lock_free(look, b["id"], "NO KEY UPDATE") for b in (bj, other)]
        key_share_free = [_lock_free(look, b["id"], "KEY SHARE") for b in (bj, other)]
        # A lease to a Session of the site waits for the delete at its heartbeat (the delete holds
        # the site's sessions, taken before its jobs), not at the BatchJob (a key-share lock).
        threads.append(threading.Thread(target=lambda: out.update(leased=api.http.post(
            f"/sessions/{earlier['id']}", json={"max_num_jobs": 1, "filter_tags": {}}, timeout=60))))
        threads[-1].start()
        wait_blocked_by(look, dpid, 15, "the lease never waited for the site delete")
        lease_waits = [query for pid, query in _blocked_by(look, dpid)]

        threads.append(threading.Thread(target=lambda: out.update(
            create=launcher.post("/sessions/", json={"site_id": site["id"]}))))
        threads[-1].start()
        _wait_blocked_count(look, dpid, 2, "the session create never waited for the site delete")
        # The create waits at its first lock, the BatchJob's start_time UPDATE, holding nothing the
        # delete needs (before: its UPDATE went through and it waited for the credential).
        waiting = [query for pid, query in _blocked_by(look, dpid) if query not in lease_waits]
        tx.commit()  # the delete goes on
        for thread in threads:
            thread.join(60)
        delete, create, leased = out["delete"], out["create"], out["leased"]
        # Before: a deadlock, PostgreSQL's victim answered 503 (the create; nothing of it applied).
        assert delete.status_code == 204, (delete.status_code, delete.text)
        # The create, run after the delete, finds its credential gone with the site.
        assert create.status_code == 401 and "no longer exists" in create.text, (create.status_code, create.text)
        assert holds_batch_job == [True, True] and key_share_free == [True, True]
        # The lease waited for the session the delete held, then found it gone with the site.
        assert len(lease_waits) == 1 and lease_waits[0].lstrip().upper().startswith("UPDATE SESSIONS"), lease_waits
        assert leased.status_code == 404 and f"Session {earlier['id']} not found" in leased.text, leased.text
        assert len(waiting) == 1 and waiting[0].lstrip().upper().startswith("UPDATE BATCH_JOBS"), waiting
    finally:
        if tx is not None and tx.is_active:
            tx.commit()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        if launcher is not None:
            launcher.close()
        engine.dispose()
        api.close()


def _site_with_a_lease(api: Api) -> "tuple[dict, int, dict]":
    """A site whose one job is leased to a Session: (site, job id, session)."""
    site = api.site()
    app = api.app(site["id"])
    job_id, = runnable(api, app["id"])
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    assert [j["id"] for j in api.ok("POST", f"/sessions/{session['id']}",
                                    json={"max_num_jobs": 1, "filter_tags": {}})] == [job_id]
    return site, job_id, session


def _delete_held_at_the_site_row(api: Api, holder: sa.Connection, look: sa.Connection, site_id: int,
                                 out: dict, threads: list) -> "tuple[sa.RootTransaction, int]":
    """Start DELETE /sites/{site_id} while ``holder`` holds the site row FOR KEY SHARE: the delete
    takes its locks (BatchJobs, credentials, sessions, jobs) and stops at its DELETE of the site row.
    Returns the holder's transaction and the delete's backend pid."""
    tx = holder.begin()
    holder.execute(sa.text("SELECT id FROM sites WHERE id = :id FOR KEY SHARE"), {"id": site_id})
    hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    threads.append(threading.Thread(target=lambda: out.update(delete=api.http.delete(f"/sites/{site_id}"))))
    threads[-1].start()
    wait_blocked_by(look, hpid, 15, "the site delete never waited for the site row")
    [(dpid, query)] = _blocked_by(look, hpid)
    assert query.lstrip().upper().startswith("DELETE FROM SITES"), query
    return tx, dpid


def test_a_site_delete_locks_its_sessions_before_their_jobs_against_a_release(
        _live_server_pg_obj: Any, register: Any) -> None:
    """A launcher's release locks its session (the heartbeat) and then its jobs. The site delete
    locked the jobs (delete_jobs_of) and reached the sessions only in the site row's cascade: each
    held what the other waited for (a deadlock, one answered 503). Now the delete locks the site's
    sessions before its jobs: the release waits at its heartbeat, then finds its session gone."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    tx = None
    threads: list[threading.Thread] = []
    out: dict[str, Any] = {}
    try:
        site, job_id, session = _site_with_a_lease(api)
        tx, dpid = _delete_held_at_the_site_row(api, holder, look, site["id"], out, threads)
        threads.append(threading.Thread(target=lambda: out.update(release=api.http.post(
            f"/sessions/{session['id']}/release", json={"job_ids": [job_id]}, timeout=60))))
        threads[-1].start()
        wait_blocked_by(look, dpid, 15, "the release never waited for the site delete")
        waiting = [query for pid, query in _blocked_by(look, dpid)]
        tx.commit()
        for thread in threads:
            thread.join(60)
        # Before: the release held its session and waited for the job (a deadlock; 503).
        assert len(waiting) == 1 and waiting[0].lstrip().upper().startswith("UPDATE SESSIONS"), waiting
        assert out["delete"].status_code == 204, (out["delete"].status_code, out["delete"].text)
        assert out["release"].status_code == 404, (out["release"].status_code, out["release"].text)
    finally:
        if tx is not None and tx.is_active:
            tx.commit()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        engine.dispose()
        api.close()


def test_the_expiry_sweep_skips_the_sessions_of_a_site_being_deleted(
        _live_server_pg_obj: Any, register: Any) -> None:
    """The sweep locks stale sessions (SKIP LOCKED) and then their jobs. With the site delete
    holding the jobs and reaching the sessions last, a sweep holding a stale session of the site
    waited for its job while the delete waited for the session (PostgreSQL's DeadlockDetected).
    Now the delete holds the sessions first, and the sweep passes them by without waiting."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look, sweeper = engine.connect(), engine.connect(), engine.connect()
    tx = None
    threads: list[threading.Thread] = []
    out: dict[str, Any] = {}
    restarts, database = False, ""
    try:
        site, _job_id, session = _site_with_a_lease(api)
        with engine.begin() as conn:  # its launcher died: the session is stale, its clock restarted once
            conn.execute(sa.text("UPDATE sessions SET heartbeat = now() - interval '1 hour', clock_restarted = true "
                                 "WHERE id = :id"), {"id": session["id"]})
        database = str(sweeper.engine.url)
        restarts = database not in sessions_logic._swept_since_outage
        sessions_logic._swept_since_outage.add(database)  # no clock restart by this sweep
        tx, dpid = _delete_held_at_the_site_row(api, holder, look, site["id"], out, threads)

        def sweep() -> None:
            try:
                with sweeper.begin():
                    out["sweep"] = sessions_logic.sweep_expired(sweeper, 60, api.user_id)  # this user's
            except Exception as exc:  # the deadlock's victim, before
                out["sweep"] = exc

        sweeping = threading.Thread(target=sweep)
        threads.append(sweeping)
        sweeping.start()
        # Before, the sweep waited for the delete; the delete going on then made the deadlock.
        deadline = time.monotonic() + 15
        while sweeping.is_alive() and not _blocked_by(look, dpid):
            assert time.monotonic() < deadline, "the sweep neither ended nor waited for the site delete"
            time.sleep(0.05)
        tx.commit()
        for thread in threads:
            thread.join(60)
        assert out["sweep"] == 0, out["sweep"]  # the session the delete holds is left to it
        assert out["delete"].status_code == 204, (out["delete"].status_code, out["delete"].text)
    finally:
        if tx is not None and tx.is_active:
            tx.commit()
        for thread in threads:
            thread.join(60)
        if restarts:
            sessions_logic._swept_since_outage.discard(database)
        holder.close()
        look.close()
        sweeper.close()
        engine.dispose()
        api.close()


def test_a_site_delete_locks_its_credentials_in_id_order(_live_server_pg_obj: Any, register: Any) -> None:
    """The declared rule: each kind of row in id order. The delete's credentials FOR UPDATE had no
    ORDER BY: rows came in the scan's (physical) order, which an UPDATE of a credential changes.
    Here the lower credential's row version is written after the higher one's,
    and a third connection holds the higher: in id order the delete waits for it holding the lower."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    tx = None
    threads: list[threading.Thread] = []
    out: dict[str, Any] = {}
    try:
        site = api.site()
        low, high = sorted(api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600})["id"]
                           for _ in range(2))
        with engine.begin() as conn:  # new versions of the lower one's row (and index entries), after the higher's
            for site_id in (None, site["id"]):
                conn.execute(sa.text("UPDATE credentials SET site_id = :site WHERE id = :id"), {"site": site_id, "id": low})
        tx = holder.begin()
        holder.execute(sa.text("SELECT id FROM credentials WHERE id = :id FOR UPDATE"), {"id": high})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        threads.append(threading.Thread(target=lambda: out.update(delete=api.http.delete(f"/sites/{site['id']}"))))
        threads[-1].start()
        wait_blocked_by(look, hpid, 15, "the site delete never waited for the held credential")
        look.rollback()
        try:
            look.execute(sa.text("SELECT id FROM credentials WHERE id = :id FOR UPDATE NOWAIT"), {"id": low})
            low_held = False
        except sa.exc.OperationalError as exc:
            assert getattr(exc.orig, "pgcode", None) == "55P03", exc  # lock_not_available
            low_held = True
        finally:
            look.rollback()
        tx.commit()
        for thread in threads:
            thread.join(60)
        assert low_held  # before: the scan took the higher first, and waited for it holding nothing
        assert out["delete"].status_code == 204, (out["delete"].status_code, out["delete"].text)
    finally:
        if tx is not None and tx.is_active:
            tx.commit()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        engine.dispose()
        api.close()


def test_a_batch_job_finishing_and_its_launcher_credentials_revoke_take_the_credential_first(
        _live_server_pg_obj: Any, register: Any) -> None:
    """A revoke (DELETE /auth/credentials/{id}) locks the credential, then the sessions it ends; a
    BatchJob's finish ended its sessions (locked) and then revoked its credentials: each held what
    the other waited for (a deadlock, one answered 503). Now the finish revokes first. A side
    connection holds the leased job, so the finish stops at the jobs of its sessions while the
    revoke comes."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    tx = None
    threads: list[threading.Thread] = []
    try:
        site = api.site()
        app = api.app(site["id"])
        job_id, = runnable(api, app["id"])
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "queued"})
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "running"})
        cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600,
                                                               "batch_job_id": bj["id"]})
        session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})
        assert [j["id"] for j in api.ok("POST", f"/sessions/{session['id']}",
                                        json={"max_num_jobs": 1, "filter_tags": {}})] == [job_id]

        tx = holder.begin()
        holder.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        out: dict[str, Any] = {}
        threads.append(threading.Thread(target=lambda: out.update(
            finish=api.http.put(f"/batch-jobs/{bj['id']}", json={"state": "finished"}))))
        threads[-1].start()
        wait_blocked_by(look, hpid, 15, "the finish never waited for its session's job")
        [(fpid, _query)] = _blocked_by(look, hpid)
        threads.append(threading.Thread(target=lambda: out.update(
            revoke=api.http.delete(f"/auth/credentials/{cred['id']}"))))
        threads[-1].start()
        wait_blocked_by(look, fpid, 15, "the revoke never waited for the finish")
        # It waits at its first lock, the credential's UPDATE, holding nothing the finish needs
        # (before: its UPDATE went through, and it waited for the sessions the finish held).
        waiting = [query for pid, query in _blocked_by(look, fpid)]
        tx.commit()
        for thread in threads:
            thread.join(60)
        finish, revoke = out["finish"], out["revoke"]
        # Before: a deadlock, PostgreSQL's victim (either) answered 503, nothing of it applied.
        assert finish.status_code == 200 and finish.json()["state"] == "finished", finish.text
        assert revoke.status_code == 204, revoke.text
        assert len(waiting) == 1 and waiting[0].lstrip().upper().startswith("UPDATE CREDENTIALS"), waiting
        # Both done: the session ended, the credential revoked.
        assert api.ok("GET", "/sessions/", params={"id": [session["id"]]})["results"] == []
        [row] = [c for c in api.ok("GET", "/auth/credentials")["results"] if c["id"] == cred["id"]]
        assert row["revoked"] is not None
    finally:
        if tx is not None and tx.is_active:
            tx.commit()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        engine.dispose()
        api.close()
