"""An update by filter (``PUT /jobs/?id=N&state=S``) sent while launchers take the same job: the two
windows in which a site hook's change made after its own save (hooks_runner._saved_by_hook) still
overwrote a launcher's run, against real servers.

1. A job a launcher has acquired but not yet reported RUNNING is still in state S: the update
   applied and ended that launcher's lease (its RUNNING refused, 409). ``leased=false`` (PUT by
   filter only) leaves the jobs a session holds alone.
2. PostgreSQL: the server read the ids the filters match before it locked them, so a RUNNING (or
   an acquire) committed in between was overwritten (RUNNING -> FAILED, the launcher's RUN_DONE
   refused). The filters are now checked again under the row locks. Each interleaving is forced
   with the job's row lock held on a side connection (test_pg_races' pattern), never by timing.
   SQLite takes its write lock before the read (BEGIN IMMEDIATE): nothing lands in between.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
from typing import Any, Iterator

import pytest
from server_testlib import Api
from sqlalchemy.engine import make_url
from test_pg_races import blocked_by, call, pid, side, wait_until

FAILED = {"state": "FAILED", "state_data": {"message": "the hook's later change"}}


def _leased_preprocessed(api: Api, n: int = 1) -> tuple[int, list[int]]:
    """``n`` PREPROCESSED jobs a launcher's session has acquired (not yet reported RUNNING)."""
    site = api.site()
    app = api.app(site["id"])
    ids = sorted(j["id"] for j in api.jobs(app["id"], n))
    api.patch_states(ids, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    got = sorted(j["id"] for j in api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": n, "filter_tags": {}}))
    assert got == ids
    return session, ids


def _run_goes_on(api: Api, job: int, session: int, *, reported: bool = False) -> None:
    """The launcher's run of ``job`` is untouched: its RUNNING (unless ``reported``) and RUN_DONE are taken."""
    if not reported:
        api.ok("PATCH", "/jobs/", json=[{"id": job, "state": "RUNNING", "session_id": session}])
    api.ok("PATCH", "/jobs/", json=[{"id": job, "state": "RUN_DONE", "session_id": session}])
    assert api.job(job)["state"] == "RUN_DONE"


def test_leased_false_leaves_a_job_a_launcher_acquired_to_it(api: Api) -> None:
    """Window 1: the job is PREPROCESSED, as the hook saved it, and leased to a launcher; the update
    by ``state=PREPROCESSED`` alone still applies (Balsam 0.7's contract: a user's update by filter
    reaches leased jobs, and ends their lease), with ``leased=false`` it does not."""
    session, (job, other) = _leased_preprocessed(api, 2)
    assert api.ok("PUT", "/jobs/", params={"id": job, "state": "PREPROCESSED", "leased": "false"}, json=FAILED) == 0
    assert api.job(job)["state"] == "PREPROCESSED"
    _run_goes_on(api, job, session)
    # leased=true: the jobs a session holds; the 0.7 filter alone is unchanged (it takes the lease).
    assert api.ok("PUT", "/jobs/", params={"id": other, "state": "PREPROCESSED", "leased": "true"},
                  json={"data": {"seen": 1}}) == 1
    assert api.ok("PUT", "/jobs/", params={"id": other, "state": "PREPROCESSED"}, json=FAILED) == 1
    assert api.job(other)["state"] == "FAILED"
    # A job no session holds is updated.
    free = api.jobs(api.app(api.site()["id"])["id"])[0]["id"]
    assert api.ok("PUT", "/jobs/", params={"id": free, "leased": "false"}, json=FAILED) == 1
    # Narrow: PUT by filter only, a boolean.
    bad = api.http.put("/jobs/", params={"id": free, "leased": "maybe"}, json=FAILED)
    assert bad.status_code == 422 and "leased" in bad.text, bad.text
    for method in ("GET", "DELETE"):
        other_route = api.http.request(method, "/jobs/", params={"leased": "false"})
        assert other_route.status_code == 422 and "leased" in other_route.text, (method, other_route.text)


@pytest.fixture(scope="module")
def race_server(live_server_factory: Any) -> Any:
    """PostgreSQL behind 2 workers (the update and the launcher's request in flight at once)."""
    return live_server_factory("postgresql", workers=2, env={"BALSAM_SESSION_EXPIRE_SEC": "3600"})


@pytest.fixture
def race_api(race_server: Any, register: Any) -> Iterator[Api]:
    client = Api(race_server.url, register)
    yield client
    client.close()


@pytest.mark.postgres
def test_a_running_committed_between_the_filters_read_and_the_row_lock_is_not_overwritten(
        race_api: Api, race_server: Any) -> None:
    """Window 2: the launcher's RUNNING holds the job's row lock (it waits for the holder first, so
    it is ahead in the row's queue) when the update by ``state=PREPROCESSED`` reads the ids its
    filters match: still PREPROCESSED (RUNNING is not committed), so the job matched, and once the
    RUNNING committed the update locked it and failed the launcher's run. Now the filters are
    checked again under the lock: nothing is updated."""
    api = race_api
    session, (job,) = _leased_preprocessed(api)
    with concurrent.futures.ThreadPoolExecutor(2) as pool, side(race_server) as (holder, watch):
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job,))
        start = pool.submit(call, api, "PATCH", "/jobs/",
                            json=[{"id": job, "state": "RUNNING", "session_id": session}])
        starter = wait_until(lambda: blocked_by(watch, {pid(holder)}), "the RUNNING to wait for the job's lock")
        update = pool.submit(call, api, "PUT", "/jobs/", params={"id": job, "state": "PREPROCESSED"}, json=FAILED)
        # The update read its ids (unlocked: PREPROCESSED) and waits for the row, behind the RUNNING.
        wait_until(lambda: blocked_by(watch, {pid(holder), starter}, exclude={starter}),
                   "the update to wait for the job's lock")
        holder.rollback()
        started, updated = start.result(), update.result()
    assert started.status_code == 200, started.text
    assert updated.status_code == 200 and updated.json() == 0, updated.text
    assert api.job(job)["state"] == "RUNNING"
    _run_goes_on(api, job, session, reported=True)


@pytest.mark.postgres
def test_an_acquire_committed_between_the_filters_read_and_the_row_lock_keeps_its_job(
        race_api: Api, race_server: Any) -> None:
    """Window 2 with ``leased=false``: the job was free when the update read it, and leased (the
    acquire's write, held open on a side connection) before the update locked it. The lease is
    checked again under the lock: the update leaves it, and the launcher's RUNNING is taken."""
    api = race_api
    site = api.site()
    job = api.jobs(api.app(site["id"])["id"])[0]["id"]
    api.patch_states([job], "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool, side(race_server) as (holder, watch):
        with holder.cursor() as cur:  # what an acquire writes, in its transaction, not committed yet
            cur.execute("UPDATE jobs SET session_id = %s WHERE id = %s AND session_id IS NULL", (session, job))
            assert cur.rowcount == 1
        update = pool.submit(call, api, "PUT", "/jobs/", params={"id": job, "state": "PREPROCESSED", "leased": "false"},
                             json=FAILED)
        # (An answer before that is checked below: a server without the filter refuses it, 422.)
        wait_until(lambda: update.done() or blocked_by(watch, {pid(holder)}), "the update to wait for the job's lock")
        holder.commit()
        updated = update.result()
    assert updated.status_code == 200 and updated.json() == 0, updated.text
    assert api.job(job)["state"] == "PREPROCESSED"
    _run_goes_on(api, job, session)


@pytest.fixture
def sqlite_api(live_server: str, register: Any) -> Iterator[Api]:
    client = Api(live_server, register)
    yield client
    client.close()


def test_sqlite_reads_the_filters_under_its_write_lock(sqlite_api: Api, request: Any) -> None:
    """SQLite: the launcher's RUNNING is written (not committed) on a side connection holding the
    write lock when the update by ``state=PREPROCESSED`` comes; the update's transaction begins
    with BEGIN IMMEDIATE, so it reads its ids once the RUNNING committed: no match. (Whenever the
    update gets there, the RUNNING committed first: the outcome does not depend on the timing.)"""
    api = sqlite_api
    session, (job,) = _leased_preprocessed(api)
    path = make_url(request.getfixturevalue("_live_server_obj").database_url).database
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE jobs SET state = 'RUNNING' WHERE id = ? AND session_id = ?", (job, session))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            update = pool.submit(call, api, "PUT", "/jobs/", params={"id": job, "state": "PREPROCESSED"}, json=FAILED)
            try:
                update.result(timeout=1)  # not answered while the write lock is held: it waits for it
                raise AssertionError(f"answered while the write lock was held: {update.result().text}")
            except concurrent.futures.TimeoutError:
                pass
            holder.execute("COMMIT")
            updated = update.result()
    finally:
        holder.close()
    assert updated.status_code == 200 and updated.json() == 0, updated.text
    assert api.job(job)["state"] == "RUNNING"
    _run_goes_on(api, job, session, reported=True)


def test_the_hook_worker_sends_the_servers_filter_name() -> None:
    """The hook worker does not import the server: its name for the filter is the server's."""
    from balsam.server import jobs_logic
    from balsam.server.openapi import JOB_UPDATE_QUERY
    from balsam.site import hooks_runner

    assert hooks_runner.LEASED_FILTER == jobs_logic.LEASED_FILTER
    assert set(JOB_UPDATE_QUERY) == jobs_logic.UPDATE_FILTERS - jobs_logic.JOB_FILTERS
