"""A finished job that leaves JOB_FINISHED (a user's re-run) is pending file cleanup again.

The file_cleaner clears ``pending_file_cleanup`` once it has deleted a finished job's
``cleanup_files``; a re-run writes those files again, so the flag must be set again (as a new
job's is) or they are never cleaned. Every update path: bulk PATCH, the query PUT, PUT /jobs/{id}.
"""

from __future__ import annotations

import uuid


def _finished(api, site, app, n):
    prefix = uuid.uuid4().hex[:6]
    ids = [j["id"] for j in api.jobs(app["id"], n, prefix=prefix, tags={"batch": prefix})]
    assert all(api.job(i)["pending_file_cleanup"] is True for i in ids)  # as created
    api.patch_states(ids, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    assert len(api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": n, "filter_tags": {"batch": prefix}})) == n
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states(ids, state)
    assert api.http.delete(f"/sessions/{session['id']}").status_code in (200, 204)
    # What the file_cleaner does once the files are gone.
    api.ok("PATCH", "/jobs/", json=[{"id": i, "pending_file_cleanup": False} for i in ids])
    assert [api.job(i)["state"] for i in ids] == ["JOB_FINISHED"] * n
    assert all(api.job(i)["pending_file_cleanup"] is False for i in ids)
    return ids, prefix


def test_rerun_of_finished_job_is_pending_cleanup_again(api, site_app):
    site, app = site_app
    ids, _ = _finished(api, site, app, 4)
    # Bulk PATCH: two re-runs (grouped in one UPDATE), one field-only patch (stays clean), one
    # re-run that sets the flag itself (its value wins).
    api.ok("PATCH", "/jobs/", json=[
        {"id": ids[0], "state": "RESTART_READY"},
        {"id": ids[1], "state": "RESTART_READY"},
        {"id": ids[2], "data": {"note": "x"}},
        {"id": ids[3], "state": "RESTART_READY", "pending_file_cleanup": False},
    ])
    got = {i: api.job(i) for i in ids}
    assert [got[i]["state"] for i in ids] == ["RESTART_READY", "RESTART_READY", "JOB_FINISHED", "RESTART_READY"]
    assert [got[i]["pending_file_cleanup"] for i in ids] == [True, True, False, False]
    # Only a move out of JOB_FINISHED sets it: other moves keep what the job had.
    api.ok("PATCH", "/jobs/", json=[{"id": ids[3], "state": "FAILED"}])
    assert api.job(ids[3])["pending_file_cleanup"] is False


def test_rerun_via_query_put_and_single_put(api, site_app):
    site, app = site_app
    ids, prefix = _finished(api, site, app, 3)
    # PUT /jobs/{id} on one of them; then the query PUT on the two still finished.
    api.ok("PUT", f"/jobs/{ids[2]}", json={"state": "RESTART_READY"})
    assert api.job(ids[2])["pending_file_cleanup"] is True
    api.ok("PATCH", "/jobs/", json=[{"id": ids[2], "pending_file_cleanup": False}])
    count = api.ok("PUT", "/jobs/", params={"tags": f"batch:{prefix}", "state": "JOB_FINISHED"},
                   json={"state": "RESTART_READY"})
    assert count == 2
    assert [api.job(i)["pending_file_cleanup"] for i in ids] == [True, True, False]
