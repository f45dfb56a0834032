"""A job its user re-queues while a launcher runs it is not leased again until that run is over.

``balsam job modify -s RESTART_READY`` of a RUNNING job is refused, but ``-s FAILED`` then
``-s RESTART_READY`` was not: the lease ended at the first move, and another launcher leased the
job at once while the first one ran it until its next heartbeat was answered (two runs at once in
one workdir). The job now keeps the session it was taken from (``released_from_session_id``) and
acquires skip it until that session's heartbeats no longer list it (the second heartbeat after the
move at the earliest), or the session is deleted, expires, or its BatchJob ends
(balsam.server.sessions_logic, "Re-queued while running")."""

from __future__ import annotations

import time

import pytest

from balsam.models import MAX_JOB_IDS_PER_SESSION_TICK
from server_testlib import SHORT_EXPIRY_SEC, Api, runnable


def new_session(api: Api, site_id: int, **fields) -> int:
    return api.ok("POST", "/sessions/", 201, json={"site_id": site_id, **fields})["id"]


def acquire(api: Api, session_id: int, **spec) -> list[int]:
    body = {"max_num_jobs": 100, "filter_tags": {}, **spec}
    return sorted(job["id"] for job in api.ok("POST", f"/sessions/{session_id}", json=body))


def tick(api: Api, session_id: int, job_ids=None) -> dict:
    return api.ok("PUT", f"/sessions/{session_id}", json={} if job_ids is None else {"job_ids": job_ids})


def started(api: Api, site_id: int, app_id: int, n: int = 2) -> tuple[int, list[int]]:
    """A launcher's session that leased ``n`` jobs and reported them RUNNING under its lease."""
    session = new_session(api, site_id)
    ids = runnable(api, app_id, n)
    assert acquire(api, session) == sorted(ids)
    api.ok("PATCH", "/jobs/", json=[{"id": i, "state": "RUNNING", "session_id": session} for i in ids])
    return session, sorted(ids)


def requeue(api: Api, job_id: int) -> None:
    """What a user does to re-run a RUNNING job (``balsam job modify -s FAILED``, ``-s RESTART_READY``)."""
    resp = api.http.patch("/jobs/", json=[{"id": job_id, "state": "RESTART_READY"}])
    assert resp.status_code == 409, resp.text  # RUNNING -> RESTART_READY is refused
    for state in ("FAILED", "RESTART_READY"):
        api.patch_states([job_id], state)
    assert api.job(job_id)["state"] == "RESTART_READY"


def test_a_requeued_running_job_waits_for_its_sessions_heartbeats(api, site_app):
    site, app = site_app
    first, (job, other) = started(api, site["id"], app["id"])
    second = new_session(api, site["id"])
    requeue(api, job)
    # Not leased while the first session may still run it, in any acquire's form.
    assert acquire(api, second) == []
    assert acquire(api, second, max_aggregate_nodes=4.0) == []
    assert acquire(api, second, max_aggregate_nodes=4.0, sort_by="long_large_first", max_wall_time_min=60) == []
    # The first heartbeat after the move lists it (the launcher runs it): it is told the job is gone.
    assert tick(api, first, [job, other])["gone"] == [job]
    assert acquire(api, second) == []
    # Still listed: its run is being ended (SIGTERM, the grace). Still not leased.
    assert tick(api, first, [job, other])["gone"] == [job]
    assert acquire(api, second) == []
    # The run has exited: no longer listed. Leasable again, and the second session gets it.
    assert tick(api, first, [other])["gone"] == []
    assert acquire(api, second) == [job]
    # The first session kept its other job all along.
    assert acquire(api, first) == []
    assert tick(api, first, [other])["gone"] == []


def test_the_first_heartbeat_after_the_move_does_not_free_the_job(api, site_app):
    """That heartbeat's list may have been read before the launcher took in the job's acquire."""
    site, app = site_app
    first, (job, other) = started(api, site["id"], app["id"])
    second = new_session(api, site["id"])
    requeue(api, job)
    tick(api, first, [other])
    assert acquire(api, second) == []
    tick(api, first, [other])
    assert acquire(api, second) == [job]


def test_heartbeats_without_job_ids_free_it_at_the_second(api, site_app):
    """``{}``: a launcher holding nothing, or a client that never asks (the processing module, 0.7)."""
    site, app = site_app
    first, (job, _other) = started(api, site["id"], app["id"])
    second = new_session(api, site["id"])
    requeue(api, job)
    tick(api, first)
    assert acquire(api, second) == []
    api.ok("PUT", f"/sessions/{first}")  # no body at all: the same
    assert acquire(api, second) == [job]


def test_a_job_requeued_while_leased_ahead_waits_too(api, site_app):
    """Leased and perhaps started (its RUNNING not reported yet): a direct re-queue is allowed."""
    site, app = site_app
    first = new_session(api, site["id"])
    (job,) = runnable(api, app["id"], 1)
    assert acquire(api, first) == [job]
    second = new_session(api, site["id"])
    api.patch_states([job], "RESTART_READY")
    assert acquire(api, second) == []
    assert tick(api, first, [job])["gone"] == [job]
    assert acquire(api, second) == []
    tick(api, first, [])
    assert acquire(api, second) == [job]


def test_the_sessions_delete_frees_it_at_once(api, site_app):
    site, app = site_app
    first, (job, other) = started(api, site["id"], app["id"])
    second = new_session(api, site["id"])
    requeue(api, job)
    assert acquire(api, second) == []
    api.ok("DELETE", f"/sessions/{first}", 204)
    assert acquire(api, second) == [job]
    assert api.job(other)["state"] == "RUN_TIMEOUT"  # as before: the deleted session's RUNNING job


def test_a_finished_batch_job_frees_it(api, site_app):
    site, app = site_app
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    first = new_session(api, site["id"], batch_job_id=bj["id"])
    (job,) = runnable(api, app["id"], 1)
    assert acquire(api, first) == [job]
    api.ok("PATCH", "/jobs/", json=[{"id": job, "state": "RUNNING", "session_id": first}])
    second = new_session(api, site["id"])
    requeue(api, job)
    assert acquire(api, second) == []
    api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "finished"})
    assert acquire(api, second) == [job]


def test_the_expiry_sweep_frees_it(short_expiry_server, register):
    api = Api(short_expiry_server, register)
    try:
        site = api.site()
        app = api.app(site["id"])
        first, (job, _other) = started(api, site["id"], app["id"])
        second = new_session(api, site["id"])
        requeue(api, job)
        assert acquire(api, second) == []
        deadline = time.monotonic() + SHORT_EXPIRY_SEC * 3 + 5
        got: list[int] = []
        while time.monotonic() < deadline and not got:
            got = acquire(api, second)  # heartbeats the second session; the first never ticks again
            if not got:
                time.sleep(0.5)
        # The job, and the first session's other job once the processing module re-queues it (not here).
        assert got == [job]
        assert api.ok("GET", "/sessions/", params={"id": [first]})["count"] == 0
    finally:
        api.close()


def test_a_full_window_of_ids_frees_nothing(api, site_app):
    """A list of the largest size may be one window of a longer one: the job may still run."""
    site, app = site_app
    first, (job, other) = started(api, site["id"], app["id"])
    second = new_session(api, site["id"])
    requeue(api, job)
    window = [other] + [i for i in range(10**12, 10**12 + MAX_JOB_IDS_PER_SESSION_TICK - 1)]
    for _ in range(2):
        tick(api, first, window)
    assert acquire(api, second) == []
    tick(api, first, [other])  # a shorter list, without the job
    assert acquire(api, second) == [job]


def test_a_job_deleted_meanwhile_and_jobs_never_leased_need_nothing(api, site_app):
    site, app = site_app
    first, (job, other) = started(api, site["id"], app["id"])
    requeue(api, job)
    api.ok("DELETE", f"/jobs/{job}", 204)
    assert tick(api, first, [job, other])["gone"] == [job]
    tick(api, first, [other])
    # A job no session held is leasable at once after a user's move, as before.
    (free,) = runnable(api, app["id"], 1)
    api.patch_states([free], "FAILED")
    api.patch_states([free], "RESTART_READY")
    second = new_session(api, site["id"])
    assert acquire(api, second) == [free]


PROCESSABLE = ["RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT", "STAGED_IN"]


def test_a_balsam_07_launchers_own_reports_mark_nothing(api, site_app):
    """A 0.7 launcher reports RUNNING, then RUN_DONE / RUN_ERROR / RUN_TIMEOUT, without its session
    (as a user's move is sent): the end of its own run. Its jobs are processed and re-run at once."""
    site, app = site_app
    launcher = new_session(api, site["id"])
    ids = runnable(api, app["id"], 3)
    assert acquire(api, launcher) == ids
    api.patch_states(ids, "RUNNING")  # keeps the lease
    for job_id, state in zip(ids, ("RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT")):
        api.patch_states([job_id], state)
    processing = new_session(api, site["id"])
    assert acquire(api, processing, states=PROCESSABLE) == ids
    api.ok("PATCH", "/jobs/", json=[{"id": i, "state": "RESTART_READY", "session_id": processing} for i in ids])
    assert acquire(api, launcher) == ids  # no heartbeat needed


def test_bulk_moves_mark_each_job_with_its_own_session(api, site_app):
    """One request fails the jobs of two sessions, one filtered update re-queues them: each job waits
    for its own session."""
    site, app = site_app
    first, first_jobs = started(api, site["id"], app["id"], 3)
    second, second_jobs = started(api, site["id"], app["id"], 3)
    every = first_jobs + second_jobs
    api.patch_states(every, "FAILED")
    assert api.ok("PUT", "/jobs/", params={"id": every}, json={"state": "RESTART_READY"}) == 6
    third = new_session(api, site["id"])
    assert acquire(api, third) == []
    assert tick(api, first, first_jobs)["gone"] == first_jobs
    tick(api, first)
    assert acquire(api, third) == first_jobs
    api.ok("DELETE", f"/sessions/{second}", 204)
    assert acquire(api, third) == second_jobs


@pytest.mark.postgres
def test_pg_a_session_delete_waiting_for_a_users_move_clears_its_mark(live_server_factory, register) -> None:
    """PostgreSQL, two workers: the user's FAILED of a RUNNING job holds the job's row when the
    session's delete comes (forced with a side connection's lock on the row: the move waits first,
    the delete second). The delete waits for the move, then clears the mark the move left: the
    re-queued job is leased at once (a mark of a deleted session would hold it back forever)."""
    import concurrent.futures

    from test_pg_races import blocked_by, call, pid, side, wait_until

    server = live_server_factory("postgresql", workers=2)
    api = Api(server.url, register)
    try:
        site = api.site()
        app = api.app(site["id"])
        first, (job, _other) = started(api, site["id"], app["id"])
        with concurrent.futures.ThreadPoolExecutor(2) as pool, side(server) as (holder, watch):
            with holder.cursor() as cur:
                cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job,))
            move = pool.submit(call, api, "PATCH", "/jobs/", json=[{"id": job, "state": "FAILED"}])
            mover = wait_until(lambda: blocked_by(watch, {pid(holder)}), "the move to wait for the job's row")
            delete = pool.submit(call, api, "DELETE", f"/sessions/{first}")
            wait_until(lambda: blocked_by(watch, {pid(holder), mover}, exclude={mover}), "the delete to wait")
            holder.rollback()
            assert move.result().status_code == 200, move.result().text
            assert delete.result().status_code == 204, delete.result().text
        # The move went first (the delete found the job no longer held: no RUN_TIMEOUT for it).
        moves = {(e["from_state"], e["to_state"]) for e in api.events(job_id=job)}
        assert ("RUNNING", "FAILED") in moves and ("RUNNING", "RUN_TIMEOUT") not in moves, moves
        assert api.job(_other)["state"] == "RUN_TIMEOUT"
        api.patch_states([job], "RESTART_READY")
        assert acquire(api, new_session(api, site["id"])) == [job]
    finally:
        api.close()
