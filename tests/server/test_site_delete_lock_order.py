"""The lock order BatchJob, credentials, sessions on PostgreSQL: DELETE /sites/{id} against a
launcher's POST /sessions/, and a BatchJob's finish against a credential's revoke.

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
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, runnable, wait_blocked_by

pytestmark = pytest.mark.postgres


def _blocked_by(look: sa.Connection, pid: int) -> list[tuple[int, str]]:
    """The backends waiting for a lock ``pid`` holds: (pid, the statement each runs)."""
    look.rollback()  # pg_stat_activity is read once per transaction
    return [tuple(r) for r in look.execute(sa.text(
        "SELECT pid, query FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid})]


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
        job_id, = runnable(api, app["id"])
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
        # A lease to a Session of the BatchJob goes on meanwhile (its key-share lock on the BatchJob).
        leased = api.http.post(f"/sessions/{earlier['id']}", json={"max_num_jobs": 1, "filter_tags": {}}, timeout=15)

        threads.append(threading.Thread(target=lambda: out.update(
            create=launcher.post("/sessions/", json={"site_id": site["id"]}))))
        threads[-1].start()
        wait_blocked_by(look, dpid, 15, "the session create never waited for the site delete")
        # The create waits at its first lock, the BatchJob's start_time UPDATE, holding nothing the
        # delete needs (before: its UPDATE went through and it waited for the credential).
        waiting = [query for pid, query in _blocked_by(look, dpid)]
        tx.commit()  # the delete goes on
        for thread in threads:
            thread.join(60)
        delete, create = out["delete"], out["create"]
        # Before: a deadlock, PostgreSQL's victim answered 503 (the create; nothing of it applied).
        assert delete.status_code == 204, (delete.status_code, delete.text)
        # The create, run after the delete, finds its credential gone with the site.
        assert create.status_code == 401 and "no longer exists" in create.text, (create.status_code, create.text)
        assert holds_batch_job == [True, True] and key_share_free == [True, True]
        assert leased.status_code == 200 and [(j["id"], j["batch_job_id"]) for j in leased.json()] == [
            (job_id, other["id"])], leased.text
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
