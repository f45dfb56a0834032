"""Creates racing a delete of what they refer to, on PostgreSQL: the create checks its site (its
BatchJob, its app) unlocked, and a delete that committed between that check and the INSERT made the
INSERT's foreign key refuse it, answered 409 with the database's text ("insert or update on table
"sessions" violates foreign key constraint ..."). Now the answer is the one the same request gets
when the record was already gone: 404 naming it. And a unique key taken by a concurrent create
between the check and the INSERT answers the check's 409, not the database's text.

Deterministic: a third connection (the holder) holds a row the delete's cascade needs, so the
delete stops after its DELETE of the site (or BatchJob) row, before its commit; the creates are
sent then, and the holder lets the delete commit only once each create waits for it (a create's
check reads what committed, so it passed; its INSERT, or now its locking check, waits)."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from server_testlib import Api, runnable, wait_blocked_by

pytestmark = pytest.mark.postgres

RAW_TEXT = ("violates", "constraint", "duplicate key", "Key (")


def _blocked_by(look: sa.Connection, pid: int) -> list[tuple[int, str]]:
    look.rollback()  # pg_stat_activity is read once per transaction
    return [tuple(r) for r in look.execute(sa.text(
        "SELECT pid, query FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid})]


def _wait_blocked_count(look: sa.Connection, pid: int, count: int, what: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while len(_blocked_by(look, pid)) < count:
        assert time.monotonic() < deadline, (what, _blocked_by(look, pid))
        time.sleep(0.05)


class _Race:
    """A delete stopped by ``holder`` before its commit, and requests sent meanwhile."""

    def __init__(self, server: Any) -> None:
        self.engine = sa.create_engine(server.database_url)
        self.holder, self.look = self.engine.connect(), self.engine.connect()
        self.tx: "sa.RootTransaction | None" = None
        self.threads: list[threading.Thread] = []
        self.out: dict[str, Any] = {}

    def hold(self, statement: str, params: dict) -> int:
        self.tx = self.holder.begin()
        self.holder.execute(sa.text(statement), params)
        return self.holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()

    def send(self, name: str, call: Callable[[], Any]) -> None:
        self.threads.append(threading.Thread(target=lambda: self.out.update({name: call()})))
        self.threads[-1].start()

    def stopped_delete(self, hpid: int, deleted: str) -> int:
        """The backend pid of the delete sent, once it waits for the holder inside its DELETE of
        ``deleted`` (the row is deleted, not committed)."""
        wait_blocked_by(self.look, hpid, 15, "the delete never waited for the holder")
        [(dpid, query)] = _blocked_by(self.look, hpid)
        assert query.lstrip().upper().startswith(f"DELETE FROM {deleted.upper()}"), query
        return dpid

    def finish(self) -> dict[str, Any]:
        if self.tx is not None and self.tx.is_active:
            self.tx.commit()
        for thread in self.threads:
            thread.join(60)
        return self.out

    def close(self) -> None:
        self.finish()
        self.holder.close()
        self.look.close()
        self.engine.dispose()


def _refused(resp: Any, status: int, detail: str) -> None:
    assert resp.status_code == status and resp.json()["detail"] == detail, (resp.status_code, resp.text)
    assert not any(word in resp.text for word in RAW_TEXT), resp.text


def _all_refused(expected: dict[str, tuple[Any, int, str]]) -> None:
    """:func:`_refused` for each (name: (answer, status, detail)), every mismatch reported at once."""
    wrong = {name: (resp.status_code, resp.text) for name, (resp, status, detail) in expected.items()
             if resp.status_code != status or resp.json().get("detail") != detail
             or any(word in resp.text for word in RAW_TEXT)}
    assert not wrong, wrong


def test_creates_at_a_site_being_deleted_answer_404_naming_the_site(_live_server_pg_obj: Any, register: Any) -> None:
    api = Api(_live_server_pg_obj.url, register)
    race = _Race(_live_server_pg_obj)
    try:
        site = api.site()
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        # The holder's key-share lock on the site's BatchJob lets the delete lock it (FOR NO KEY
        # UPDATE) and delete the site row; its cascade's DELETE of the BatchJob then waits.
        hpid = race.hold("SELECT id FROM batch_jobs WHERE id = :id FOR KEY SHARE", {"id": bj["id"]})
        race.send("delete", lambda: api.http.delete(f"/sites/{site['id']}"))
        dpid = race.stopped_delete(hpid, "sites")
        sid = site["id"]
        race.send("session", lambda: api.http.post("/sessions/", json={"site_id": sid}))
        race.send("app", lambda: api.http.post("/apps/", json={
            "site_id": sid, "name": "Late", "serialized_class": "", "source_code": "class Late: ..."}))
        race.send("batch_job", lambda: api.http.post("/batch-jobs/", json={
            "site_id": sid, "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"}))
        race.send("credential", lambda: api.http.post("/auth/credentials", json={"site_id": sid, "ttl_sec": 600}))
        # Each create passed its check (the site row's delete is not committed) and waits for the delete.
        _wait_blocked_count(race.look, dpid, 4, "the creates never waited for the site delete")
        out = race.finish()
        assert out["delete"].status_code == 204, out["delete"].text
        # Before: 409 "The change conflicts with existing data: insert or update on table
        # "sessions" violates foreign key constraint ..." (and likewise for each).
        _all_refused({name: (out[name], 404, f"Site {sid} not found")
                      for name in ("session", "app", "batch_job", "credential")})
        # What the same request answers once the site is gone: the same.
        _refused(api.http.post("/sessions/", json={"site_id": sid}), 404, f"Site {sid} not found")
    finally:
        race.close()
        api.close()


def test_creates_naming_a_batch_job_being_deleted_answer_404_naming_it(_live_server_pg_obj: Any, register: Any) -> None:
    api = Api(_live_server_pg_obj.url, register)
    race = _Race(_live_server_pg_obj)
    try:
        site = api.site()
        app = api.app(site["id"])
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        # Started already: a Session's start_time UPDATE (sessions_logic.note_batch_job_start)
        # matches no row then, and locks none.
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"start_time": "2026-01-01T00:00:00+00:00"})
        held = api.jobs(app["id"], 1, batch_job_id=bj["id"])[0]
        other = api.jobs(app["id"], 1)[0]
        # The holder locks a job of the BatchJob: the delete's SET NULL of it, in its DELETE of the
        # BatchJob row (a statement trigger), waits.
        hpid = race.hold("SELECT id FROM jobs WHERE id = :id FOR UPDATE", {"id": held["id"]})
        bid, sid = bj["id"], site["id"]
        race.send("delete", lambda: api.http.delete(f"/batch-jobs/{bid}"))
        dpid = race.stopped_delete(hpid, "batch_jobs")
        race.send("session", lambda: api.http.post("/sessions/", json={"site_id": sid, "batch_job_id": bid}))
        race.send("credential", lambda: api.http.post("/auth/credentials", json={
            "site_id": sid, "batch_job_id": bid, "ttl_sec": 600}))
        race.send("jobs", lambda: api.http.post("/jobs/", json=[{"workdir": f"late/{uuid.uuid4().hex[:6]}",
                                                                  "app_id": app["id"], "batch_job_id": bid}]))
        race.send("patch", lambda: api.http.patch("/jobs/", json=[{"id": other["id"], "batch_job_id": bid}]))
        _wait_blocked_count(race.look, dpid, 4, "the requests never waited for the BatchJob delete")
        out = race.finish()
        assert out["delete"].status_code == 204, out["delete"].text
        # Before: 409 with "... violates foreign key constraint "fk_sessions_batch_job_id_batch_jobs"" etc.
        _all_refused({"session": (out["session"], 404, f"BatchJob {bid} not found at site {sid}"),
                      "credential": (out["credential"], 404, f"BatchJob {bid} not found at site {sid}"),
                      "jobs": (out["jobs"], 404, f"BatchJob not found: {bid}"),
                      "patch": (out["patch"], 404, f"BatchJob not found: {bid}")})
        # As when it was gone before the request:
        _refused(api.http.post("/sessions/", json={"site_id": sid, "batch_job_id": bid}), 404,
                 f"BatchJob {bid} not found at site {sid}")
        _refused(api.http.patch("/jobs/", json=[{"id": other["id"], "batch_job_id": bid}]), 404, f"BatchJob not found: {bid}")
        assert api.job(other["id"])["batch_job_id"] is None
    finally:
        race.close()
        api.close()


def test_a_job_create_whose_app_is_deleted_meanwhile_answers_404_naming_the_app(
        _live_server_pg_obj: Any, register: Any) -> None:
    """The create reads its app, then waits for its parent (FOR SHARE, held here); the app's delete
    commits meanwhile; the INSERT's foreign key (a statement trigger, migration 0007) refused it."""
    api = Api(_live_server_pg_obj.url, register)
    race = _Race(_live_server_pg_obj)
    try:
        site = api.site()
        doomed, kept = api.app(site["id"], name="Doomed"), api.app(site["id"], name="Kept")
        parent = api.jobs(kept["id"], 1)[0]
        hpid = race.hold("SELECT id FROM jobs WHERE id = :id FOR UPDATE", {"id": parent["id"]})
        race.send("create", lambda: api.http.post("/jobs/", json=[{
            "workdir": "child/0", "app_id": doomed["id"], "parent_ids": [parent["id"]]}]))
        wait_blocked_by(race.look, hpid, 15, "the create never waited for its parent")
        api.ok("DELETE", f"/apps/{doomed['id']}", 204)
        out = race.finish()
        # Before: 409 'The change conflicts with existing data: insert or update on table "jobs"
        # violates foreign key constraint "fk_jobs_app_id_apps"'.
        _refused(out["create"], 404, f"App not found: {doomed['id']}")
        _refused(api.http.post("/jobs/", json=[{"workdir": "child/1", "app_id": doomed["id"]}]), 404,
                 f"App not found: {doomed['id']}")
    finally:
        race.close()
        api.close()


def test_a_name_taken_between_the_check_and_the_insert_answers_the_checks_409(
        _live_server_pg_obj: Any, register: Any) -> None:
    """The holder inserts a row with the name and does not commit: the create's check does not see
    it, its INSERT waits on the unique index, and the holder's commit makes the key refuse it."""
    api = Api(_live_server_pg_obj.url, register)
    race = _Race(_live_server_pg_obj)
    try:
        site = api.site()
        name = f"taken-{uuid.uuid4().hex[:6]}"
        hpid = race.hold("INSERT INTO sites (owner_id, name, path, globus_endpoint_id, backfill_windows, queued_jobs, "
                         "optional_batch_job_params, allowed_projects, allowed_queues, transfer_locations, last_refresh, "
                         "creation_date) SELECT owner_id, :name, path, globus_endpoint_id, backfill_windows, queued_jobs, "
                         "optional_batch_job_params, allowed_projects, allowed_queues, transfer_locations, last_refresh, "
                         "creation_date FROM sites WHERE id = :id", {"name": name, "id": site["id"]})
        race.send("site", lambda: api.http.post("/sites/", json={"name": name, "path": "/projects/x"}))
        wait_blocked_by(race.look, hpid, 15, "the site create never waited for the holder's row")
        out = race.finish()
        taken = race.look.execute(sa.text("SELECT id FROM sites WHERE name = :name"), {"name": name}).scalar()
        # Before: 409 'The change conflicts with existing data: duplicate key value violates unique
        # constraint "uq_sites_owner_id_name"'.
        _refused(out["site"], 409, f"A site named {name!r} already exists (id {taken})")

        app = api.app(site["id"], name="First")
        race.out.clear()
        race.threads.clear()
        hpid = race.hold("INSERT INTO apps (site_id, name, description, parameters, transfers, serialized_class, "
                         "source_code) SELECT site_id, 'Twin', description, parameters, transfers, serialized_class, "
                         "source_code FROM apps WHERE id = :id", {"id": app["id"]})
        race.send("app", lambda: api.http.post("/apps/", json={
            "site_id": site["id"], "name": "Twin", "serialized_class": "", "source_code": "class Twin: ..."}))
        race.send("rename", lambda: api.http.put(f"/apps/{app['id']}", json={"name": "Twin"}))
        _wait_blocked_count(race.look, hpid, 2, "the app create and rename never waited for the holder's row")
        out = race.finish()
        _all_refused({name: (out[name], 409, "An app with this site_id and name already exists") for name in ("app", "rename")})

        user = f"user{uuid.uuid4().hex[:8]}"
        race.out.clear()
        race.threads.clear()
        hpid = race.hold("INSERT INTO users (username, hashed_password, date_joined) VALUES (:name, '', now())",
                         {"name": user})
        race.send("register", lambda: api.http.post("/auth/password/register", json={
            "username": user, "password": "a long enough password"}))
        wait_blocked_by(race.look, hpid, 15, "the registration never waited for the holder's row")
        _refused(race.finish()["register"], 409, f"Username {user!r} already taken")
    finally:
        race.close()
        api.close()


def test_a_batch_job_delete_after_a_session_create_began_ends_the_new_session(
        _live_server_pg_obj: Any, register: Any) -> None:
    """A Session create holds its BatchJob FOR SHARE (sessions_logic.hold_batch_job): a delete of
    the BatchJob sent while the create runs waits for its commit, then ends the new Session with
    the BatchJob's others. Before, only the delete's final DELETE waited (for the foreign key's
    key-share lock), after it had ended the BatchJob's sessions: the new Session outlived its
    BatchJob (batch_job_id set NULL by the cascade). The holder stops the create at its site check."""
    api = Api(_live_server_pg_obj.url, register)
    race = _Race(_live_server_pg_obj)
    try:
        site = api.site()
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"start_time": "2026-01-01T00:00:00+00:00"})
        hpid = race.hold("SELECT id FROM sites WHERE id = :id FOR UPDATE", {"id": site["id"]})
        race.send("session", lambda: api.http.post("/sessions/", json={"site_id": site["id"], "batch_job_id": bj["id"]}))
        wait_blocked_by(race.look, hpid, 15, "the session create never waited for the site row")
        [(cpid, _query)] = _blocked_by(race.look, hpid)
        race.send("delete", lambda: api.http.delete(f"/batch-jobs/{bj['id']}"))
        wait_blocked_by(race.look, cpid, 15, "the BatchJob delete never waited for the session create")
        out = race.finish()
        assert out["session"].status_code == 201, out["session"].text
        assert out["delete"].status_code == 204, out["delete"].text
        new = out["session"].json()["id"]
        # Before: [{"id": new, "batch_job_id": None, ...}], a live Session of no BatchJob.
        assert api.ok("GET", "/sessions/", params={"id": new})["results"] == []
    finally:
        race.close()
        api.close()


def test_a_job_create_whose_parent_is_being_deleted_answers_404_naming_the_parent(
        _live_server_pg_obj: Any, register: Any) -> None:
    """Audit of the parents' path (no change): the create reads its parents FOR SHARE, so a parent
    whose delete has deleted its row is waited for and then found gone, as when it was gone before
    (404 naming it); the links' foreign keys never see it. The holder stops the parent's delete in
    its cascade (the parent's event row, held), after its DELETE of the job row."""
    api = Api(_live_server_pg_obj.url, register)
    race = _Race(_live_server_pg_obj)
    try:
        site = api.site()
        app = api.app(site["id"])
        parent_id, = runnable(api, app["id"])  # its state changes made event rows
        event = race.look.execute(sa.text("SELECT min(id) FROM log_events WHERE job_id = :id"), {"id": parent_id}).scalar()
        race.look.rollback()
        assert event is not None
        hpid = race.hold("SELECT id FROM log_events WHERE id = :id FOR UPDATE", {"id": event})
        race.send("delete", lambda: api.http.delete(f"/jobs/{parent_id}"))
        wait_blocked_by(race.look, hpid, 15, "the job delete never waited for its event row")
        [(dpid, _query)] = _blocked_by(race.look, hpid)
        race.send("create", lambda: api.http.post("/jobs/", json=[{
            "workdir": "orphan/0", "app_id": app["id"], "parent_ids": [parent_id]}]))
        wait_blocked_by(race.look, dpid, 15, "the create never waited for its parent's delete")
        out = race.finish()
        assert out["delete"].status_code == 204, out["delete"].text
        _refused(out["create"], 404, f"Parent job not found: {parent_id}")
    finally:
        race.close()
        api.close()
