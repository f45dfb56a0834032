"""Deleting an app or a site takes its jobs along; their waiting children elsewhere (another app,
another site of the user) are re-checked in the same transaction, as a job delete re-checks them
(jobs_logic.delete_jobs): released when every parent that still exists is JOB_FINISHED, with the
event "All remaining parents finished (deleted: ...)". Before, the cascade removed the parents
without looking at the children, which then waited in AWAITING_PARENTS for ever."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from server_testlib import Api
from test_jobs import _moves as moves  # (from, to, message) of a job's events, oldest first
from test_jobs import run_to as run_to_finished  # to POSTPROCESSED, which finishes a job without stage-out
from test_pg_races import blocked_by, call, pid, race_delete_with_finish, side, states, wait_until


def remaining(deleted: "list[int]") -> str:
    return "All remaining parents finished (deleted: " + ", ".join(str(i) for i in sorted(deleted)) + ")"


STAGE_IN = {"in": {"required": False, "direction": "in", "local_path": "in.dat"}}


def test_app_delete_releases_the_children_of_its_jobs_in_other_apps(api: Api) -> None:
    """Parents in app A, children in app B of the same site: deleting A releases the children whose
    other parents (if any) finished, a child with an input to stage in to READY; a child whose other
    parent still runs waits for it, and its finish says which parent was gone. A grandchild in B of
    a job of A whose own parent was in A too is released: neither exists any more. A's own children
    go with it."""
    site = api.site(transfer_locations={"dtn": "globus://endpoint-1"})
    app_a = api.app(site["id"], name="ParentsApp")
    app_b = api.app(site["id"], name="ChildrenApp", transfers=STAGE_IN)
    parent, inner_parent = (j["id"] for j in api.jobs(app_a["id"], 2))
    inner = api.jobs(app_a["id"], 1, parent_ids=[inner_parent])[0]["id"]  # a child of A, in A
    done, running = (j["id"] for j in api.jobs(app_b["id"], 2))
    run_to_finished(api, [done])
    only = api.jobs(app_b["id"], 1, parent_ids=[parent])[0]["id"]
    with_done = api.jobs(app_b["id"], 1, parent_ids=[parent, done])[0]["id"]
    staging = api.jobs(app_b["id"], 1, parent_ids=[parent], transfers={"in": "dtn:/remote/in.dat"})[0]["id"]
    waits = api.jobs(app_b["id"], 1, parent_ids=[parent, running])[0]["id"]
    grandchild = api.jobs(app_b["id"], 1, parent_ids=[inner])[0]["id"]
    children = [only, with_done, staging, waits, grandchild]
    assert set(states(api, children).values()) == {"AWAITING_PARENTS"}

    api.ok("DELETE", f"/apps/{app_a['id']}", 204)

    for gone in (parent, inner_parent, inner):
        assert api.http.get(f"/jobs/{gone}").status_code == 404
    assert moves(api, only)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([parent]))]
    assert moves(api, with_done)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([parent]))]
    assert moves(api, staging)[1:] == [("AWAITING_PARENTS", "READY", remaining([parent]))]
    assert moves(api, grandchild)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([inner]))]
    assert api.job(only)["parent_ids"] == [parent]  # the deleted id stays listed (docs/api.md)
    assert api.job(waits)["state"] == "AWAITING_PARENTS"
    run_to_finished(api, [running])
    assert moves(api, waits)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([parent]))]


def test_app_delete_leaves_children_with_an_unfinished_or_failed_parent_waiting(api: Api) -> None:
    """Re-checked, not released blindly: a parent elsewhere that FAILED or has not finished keeps
    the child waiting, as after a job delete."""
    site = api.site()
    app_a, app_b = api.app(site["id"], name="A1"), api.app(site["id"], name="B1")
    parent = api.jobs(app_a["id"])[0]["id"]
    failed, unfinished = (j["id"] for j in api.jobs(app_b["id"], 2))
    for state in ("PREPROCESSED", "RUNNING", "RUN_ERROR", "FAILED"):
        api.patch_states([failed], state)
    blocked = [api.jobs(app_b["id"], 1, parent_ids=[parent, other])[0]["id"] for other in (failed, unfinished)]
    api.ok("DELETE", f"/apps/{app_a['id']}", 204)
    assert set(states(api, blocked).values()) == {"AWAITING_PARENTS"}


def test_site_delete_releases_the_children_of_its_jobs_on_other_sites(api: Api) -> None:
    """A job's parents may live on any site of its user: deleting the parents' site (its apps and
    their jobs go with it) releases the children on another site whose remaining parents finished;
    one whose other parent runs waits for it."""
    doomed_site, kept_site = api.site(), api.site()
    doomed_app = api.app(doomed_site["id"])
    kept_app = api.app(kept_site["id"])
    p1, p2 = (j["id"] for j in api.jobs(doomed_app["id"], 2))
    done, running = (j["id"] for j in api.jobs(kept_app["id"], 2))
    run_to_finished(api, [done])
    both = api.jobs(kept_app["id"], 1, parent_ids=[p1, p2])[0]["id"]
    with_done = api.jobs(kept_app["id"], 1, parent_ids=[p2, done])[0]["id"]
    waits = api.jobs(kept_app["id"], 1, parent_ids=[p1, running])[0]["id"]
    api.ok("DELETE", f"/sites/{doomed_site['id']}", 204)
    assert api.http.get(f"/jobs/{p1}").status_code == 404
    assert moves(api, both)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([p1, p2]))]
    assert moves(api, with_done)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([p2]))]
    assert api.job(waits)["state"] == "AWAITING_PARENTS"
    run_to_finished(api, [running])
    assert moves(api, waits)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining([p1]))]


def test_site_delete_with_leased_jobs_and_sessions(api: Api) -> None:
    """A site deleted while a launcher session holds jobs of it (as before: a site delete does not
    refuse leased jobs) still releases the children of its jobs on the other site."""
    doomed_site, kept_site = api.site(), api.site()
    doomed_app, kept_app = api.app(doomed_site["id"]), api.app(kept_site["id"])
    parents = [j["id"] for j in api.jobs(doomed_app["id"], 3)]
    api.patch_states(parents, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": doomed_site["id"]})["id"]
    leased = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 3, "filter_tags": {}})
    assert sorted(j["id"] for j in leased) == sorted(parents)
    child = api.jobs(kept_app["id"], 1, parent_ids=parents)[0]["id"]
    api.ok("DELETE", f"/sites/{doomed_site['id']}", 204)
    assert moves(api, child)[1:] == [("AWAITING_PARENTS", "STAGED_IN", remaining(parents))]
    assert api.ok("GET", "/sessions/", params={"id": [session]})["count"] == 0


# ---------------------------------------------------------------------------------------------
# PostgreSQL: an app delete racing the finish of the child's last other parent
# ---------------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("first", ["delete", "finish", "both_at_the_child"])
def test_an_app_deleted_while_the_last_other_parent_finishes_releases_the_child(race_api: Api, race_server: Any,
                                                                                 first: str) -> None:
    """c (app B) waits for a (app A) and b (app B, RUN_DONE). ``DELETE /apps/A`` and b's finish,
    forced into each order with a row lock held on a side connection (as test_pg_races does for
    ``DELETE /jobs/{a}``): "delete": the finish stops at b's lock while the app delete commits;
    "finish": the app delete stops at a's lock while b finishes; "both_at_the_child": both stop at
    c's lock, the finish first. Every order ends with c released once, saying a was gone."""
    api = race_api
    site = api.site()
    app_a, app_b = api.app(site["id"], name="A2"), api.app(site["id"], name="B2")
    a = api.jobs(app_a["id"])[0]["id"]
    b = api.jobs(app_b["id"])[0]["id"]
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE"):
        api.patch_states([b], state)
    c = api.jobs(app_b["id"], 1, parent_ids=[a, b])[0]["id"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        delete, finish = race_delete_with_finish(api, race_server, pool, first, (a, b, c), f"/apps/{app_a['id']}",
                                                 "the app delete")
        assert delete.result().status_code == 204, delete.result().text
        assert finish.result().status_code == 200, finish.result().text
    assert states(api, [b, c]) == {b: "JOB_FINISHED", c: "STAGED_IN"}
    assert api.http.get(f"/jobs/{a}").status_code == 404
    assert moves(api, c) == [("CREATED", "AWAITING_PARENTS", None),
                             ("AWAITING_PARENTS", "STAGED_IN", remaining([a]))]


@pytest.mark.postgres
def test_a_job_created_in_an_app_being_deleted_waits_and_is_refused(race_api: Api, race_server: Any) -> None:
    """The app delete locks the app before it reads its jobs: a job created in the app meanwhile
    waits for the delete and then finds the app gone. (Had it been created, the cascade of the
    app would have taken it without its children being checked.) The delete is stopped at the
    cascade of its job's events, after it has read the app's jobs, by a lock held on one event."""
    api = race_api
    site = api.site()
    app_a = api.app(site["id"], name="A3")
    a = api.jobs(app_a["id"])[0]["id"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool, side(race_server) as (holder, watch):
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM log_events WHERE job_id = %s FOR UPDATE", (a,))
        delete = pool.submit(call, api, "DELETE", f"/apps/{app_a['id']}")
        deleter = wait_until(lambda: blocked_by(watch, {pid(holder)}), "the app delete to wait at its cascade")
        create = pool.submit(call, api, "POST", "/jobs/", json=[{"workdir": "late", "app_id": app_a["id"]}])
        wait_until(lambda: create.done() or blocked_by(watch, {deleter}), "the create to wait for the app delete")
        assert not create.done(), create.result().text
        holder.rollback()
        assert delete.result().status_code == 204, delete.result().text
        # The app is gone: answered as when it was gone before the create (its foreign key refused the
        # INSERT; that was a 409 with PostgreSQL's text).
        assert create.result().status_code == 404, create.result().text
        assert create.result().json()["detail"] == f"App not found: {app_a['id']}"
    assert api.ok("GET", "/jobs/", params={"app_id": app_a["id"]})["count"] == 0
