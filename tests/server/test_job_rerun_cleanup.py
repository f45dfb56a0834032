"""A finished job that leaves JOB_FINISHED (a user's re-run) is pending file cleanup again.

The file_cleaner clears ``pending_file_cleanup`` once it has deleted a finished job's
``cleanup_files``; a re-run writes those files again, so the flag must be set again (as a new
job's is) or they are never cleaned. Every update path: bulk PATCH, the query PUT, PUT /jobs/{id}.
"""

from __future__ import annotations

import uuid


def _run_to_finished(api, site, ids, prefix):
    fresh = [i for i in ids if api.job(i)["state"] != "RESTART_READY"]  # a re-run is runnable as it is
    if fresh:
        api.patch_states(fresh, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    n = len(ids)
    assert len(api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": n, "filter_tags": {"batch": prefix}})) == n
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states(ids, state)
    assert api.http.delete(f"/sessions/{session['id']}").status_code in (200, 204)


def _finished(api, site, app, n):
    prefix = uuid.uuid4().hex[:6]
    ids = [j["id"] for j in api.jobs(app["id"], n, prefix=prefix, tags={"batch": prefix})]
    assert all(api.job(i)["pending_file_cleanup"] is True for i in ids)  # as created
    _run_to_finished(api, site, ids, prefix)
    # What the file_cleaner does once the files are gone.
    api.ok("PATCH", "/jobs/", json=[{"id": i, "pending_file_cleanup": False} for i in ids])
    assert [api.job(i)["state"] for i in ids] == ["JOB_FINISHED"] * n
    assert all(api.job(i)["pending_file_cleanup"] is False for i in ids)
    return ids, prefix


def test_rerun_of_finished_job_is_pending_cleanup_again(api, site_app):
    site, app = site_app
    ids, _ = _finished(api, site, app, 4)
    # Bulk PATCH: two re-runs (grouped in one UPDATE), one field-only patch (stays clean), one
    # re-run that clears the flag in the same patch (ignored: the job is not finished, see
    # test_cleared_flag_of_a_job_rerun_meanwhile_is_ignored).
    api.ok("PATCH", "/jobs/", json=[
        {"id": ids[0], "state": "RESTART_READY"},
        {"id": ids[1], "state": "RESTART_READY"},
        {"id": ids[2], "data": {"note": "x"}},
        {"id": ids[3], "state": "RESTART_READY", "pending_file_cleanup": False},
    ])
    got = {i: api.job(i) for i in ids}
    assert [got[i]["state"] for i in ids] == ["RESTART_READY", "RESTART_READY", "JOB_FINISHED", "RESTART_READY"]
    assert [got[i]["pending_file_cleanup"] for i in ids] == [True, True, False, True]


def test_rerun_via_query_put_and_single_put(api, site_app):
    site, app = site_app
    ids, prefix = _finished(api, site, app, 3)
    # PUT /jobs/{id} on one of them; then the query PUT on the two still finished.
    api.ok("PUT", f"/jobs/{ids[2]}", json={"state": "RESTART_READY"})
    assert api.job(ids[2])["pending_file_cleanup"] is True
    count = api.ok("PUT", "/jobs/", params={"tags": f"batch:{prefix}", "state": "JOB_FINISHED"},
                   json={"state": "RESTART_READY"})
    assert count == 2
    assert [api.job(i)["pending_file_cleanup"] for i in ids] == [True, True, True]


def test_cleared_flag_of_a_job_rerun_meanwhile_is_ignored(api, site_app):
    """The file_cleaner lists JOB_FINISHED jobs pending cleanup, deletes their files, then clears
    the flag. A job its user re-ran in between kept the cleared flag, and its new run's files were
    never cleaned. The server ignores ``pending_file_cleanup: false`` for a job that is not
    JOB_FINISHED (every update path); the finished jobs of the same request are cleared."""
    site, app = site_app
    prefix = uuid.uuid4().hex[:6]
    ids = [j["id"] for j in api.jobs(app["id"], 2, prefix=prefix, tags={"batch": prefix})]
    _run_to_finished(api, site, ids, prefix)
    listed = api.ok("GET", "/jobs/", params={"site_id": site["id"], "state": "JOB_FINISHED", "pending_file_cleanup": "true",
                                             "tags": f"batch:{prefix}"})["results"]
    assert sorted(j["id"] for j in listed) == ids
    rerun, done = ids
    api.ok("PATCH", "/jobs/", json=[{"id": rerun, "state": "RESTART_READY"}])  # the user, meanwhile
    api.ok("PATCH", "/jobs/", json=[{"id": j["id"], "pending_file_cleanup": False} for j in listed])  # the cleaner
    assert api.job(rerun)["pending_file_cleanup"] is True, "the re-run's files would never be cleaned"
    assert api.job(done)["pending_file_cleanup"] is False
    api.ok("PUT", f"/jobs/{rerun}", json={"pending_file_cleanup": False})
    assert api.ok("PUT", "/jobs/", params={"tags": f"batch:{prefix}"}, json={"pending_file_cleanup": False}) == 2
    assert api.job(rerun)["pending_file_cleanup"] is True
    _run_to_finished(api, site, [rerun], prefix)
    assert api.job(rerun)["state"] == "JOB_FINISHED" and api.job(rerun)["pending_file_cleanup"] is True
    api.ok("PATCH", "/jobs/", json=[{"id": rerun, "pending_file_cleanup": False}])  # finished: cleared
    assert api.job(rerun)["pending_file_cleanup"] is False
