"""A job waiting for its parents (AWAITING_PARENTS) holds its stage-in until it leaves the wait.

Its stage-in items were created ``pending`` at once (as in Balsam 0.7), so the site agent's
transfers module copied the child's inputs while its parents had not run: in a DAG whose parent
stages out to a location and whose child stages in from there, the child got the stale file (or
none, and failed after its retries). Now they are created ``awaiting_job`` (as stage-outs are) and
become ``pending`` when the job leaves AWAITING_PARENTS for READY, on every way out: the finish of
its last parent (by a job update or by its stage-out's end), the delete of its parents (by id, by
query, with their app or site), a user's move to READY or re-run; a re-run sent back to wait for a
parent that runs again holds them again (a done one is copied again, from the parent's new run).
A user's move to FAILED or STAGED_IN (skipping the stage-in) leaves them held."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from server_testlib import Api
from test_pg_races import blocked_by, call, pid, side, states, wait_until

SLOTS = {
    "input": {"required": False, "direction": "in", "local_path": "in.dat"},
    "result": {"required": False, "direction": "out", "local_path": "out.dat"},
}


@pytest.fixture
def xfer(api: Api) -> tuple[dict, dict]:
    site = api.site(transfer_locations={"aps": "globus://aps-endpoint"})
    return site, api.app(site["id"], "Xfer", transfers=SLOTS)


def run_to(api: Api, ids: list[int], last: str) -> None:
    for state in ("PREPROCESSED", "RUNNING", last):
        api.patch_states(ids, state)


def finish(api: Api, ids: list[int]) -> None:
    """To POSTPROCESSED: JOB_FINISHED for a job without stage-out."""
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states(ids, state)


def stage_ins(api: Api, ids: list[int]) -> dict[int, dict[str, Any]]:
    """{job id: its (one) stage-in item}."""
    rows = api.ok("GET", "/transfers/", params={"job_id": ids, "direction": "in", "limit": 10000})["results"]
    assert len(rows) == len(ids)
    return {r["job_id"]: r for r in rows}


def in_states(api: Api, ids: list[int]) -> set[str]:
    return {r["state"] for r in stage_ins(api, ids).values()}


def agent_reads(api: Api, site_id: int) -> set[int]:
    """The job ids of the items the site agent's transfers module reads (its GET, as it sends it)."""
    rows = api.ok("GET", "/transfers/", params={"site_id": site_id, "state": ["pending", "active", "inactive"],
                                                "ordering": "state", "limit": 10000})["results"]
    return {r["job_id"] for r in rows}


def last_move(api: Api, job_id: int) -> tuple[str, str, Any]:
    events = sorted(api.events(job_id=job_id), key=lambda e: (e["timestamp"], e["id"]))
    e = events[-1]
    return e["from_state"], e["to_state"], (e.get("data") or {}).get("message")


def test_a_waiting_child_holds_its_stage_in_until_its_last_parent_finishes(api: Api, xfer: tuple) -> None:
    site, app = xfer
    a, b, done = (j["id"] for j in api.jobs(app["id"], 3))
    finish(api, [done])
    children = [j["id"] for j in api.jobs(app["id"], 300, parent_ids=[a, b], transfers={"input": "aps:/a/out.dat"})]
    free = api.jobs(app["id"], parent_ids=[done], transfers={"input": "aps:/a/out.dat"})[0]["id"]
    out_only = api.jobs(app["id"], parent_ids=[a], transfers={"result": "aps:/c/out.dat"})[0]["id"]
    assert {api.job(c)["state"] for c in children} == {"AWAITING_PARENTS"}
    assert in_states(api, children) == {"awaiting_job"}
    assert (api.job(free)["state"], in_states(api, [free])) == ("READY", {"pending"})  # its parent had finished
    assert agent_reads(api, site["id"]) == {free}

    finish(api, [a])
    assert in_states(api, children) == {"awaiting_job"}  # b has not finished
    assert api.job(out_only)["state"] == "STAGED_IN"  # nothing to stage in
    finish(api, [b])
    assert {api.job(c)["state"] for c in children} == {"READY"}
    assert in_states(api, children) == {"pending"}
    assert agent_reads(api, site["id"]) == {free, *children}
    assert last_move(api, children[0]) == ("AWAITING_PARENTS", "READY", "All parents finished")
    api.ok("PATCH", "/transfers/", json=[{"id": i["id"], "state": "done"} for i in stage_ins(api, children).values()])
    assert {api.job(c)["state"] for c in children} == {"STAGED_IN"}


def test_the_end_of_the_parents_stage_out_starts_the_childs_stage_in(api: Api, xfer: tuple) -> None:
    """The DAG of the fault: the parent stages out to aps:/p/out.dat, the child stages in from there."""
    _site, app = xfer
    parent = api.jobs(app["id"], transfers={"result": "aps:/p/out.dat"})[0]["id"]
    child = api.jobs(app["id"], parent_ids=[parent], transfers={"input": "aps:/p/out.dat"})[0]["id"]
    finish(api, [parent])
    out = api.ok("GET", "/transfers/", params={"job_id": [parent], "direction": "out"})["results"][0]
    assert (api.job(parent)["state"], out["state"]) == ("POSTPROCESSED", "pending")
    assert in_states(api, [child]) == {"awaiting_job"}  # the parent's output is not there yet
    api.ok("PATCH", "/transfers/", json=[{"id": out["id"], "state": "done"}])
    assert (api.job(parent)["state"], api.job(child)["state"]) == ("JOB_FINISHED", "READY")
    assert in_states(api, [child]) == {"pending"}


@pytest.mark.parametrize("how", ["job", "query", "app", "site"])
def test_deleting_the_parents_starts_the_stage_in(api: Api, xfer: tuple, how: str) -> None:
    _site, app = xfer
    other_site = api.site()
    other_app = api.app(other_site["id"])
    parents = [j["id"] for j in api.jobs(other_app["id"], 2)]
    children = [j["id"] for j in api.jobs(app["id"], 3, parent_ids=parents, transfers={"input": "aps:/x"})]
    assert in_states(api, children) == {"awaiting_job"}
    if how == "job":
        for p in parents:
            api.ok("DELETE", f"/jobs/{p}", 204)
    elif how == "query":
        api.ok("DELETE", "/jobs/", params={"id": parents})
    elif how == "app":
        api.ok("DELETE", f"/apps/{other_app['id']}", 204)
    else:
        api.ok("DELETE", f"/sites/{other_site['id']}", 204)
    assert {api.job(c)["state"] for c in children} == {"READY"}
    assert in_states(api, children) == {"pending"}


def test_a_users_moves_out_of_the_wait(api: Api, xfer: tuple) -> None:
    """READY or a re-run (RESTART_READY, the documented way past the wait) start the stage-in; FAILED
    and STAGED_IN (the user skips it) leave it held; a FAILED job re-run while its parent still has
    not finished waits again with its stage-in held, and the parent's finish starts it."""
    _site, app = xfer
    parent = api.jobs(app["id"])[0]["id"]
    ready, rerun, failed, skipped = (j["id"] for j in api.jobs(app["id"], 4, parent_ids=[parent],
                                                                 transfers={"input": "aps:/x"}))
    bare = api.jobs(app["id"], parent_ids=[parent])[0]["id"]
    api.patch_states([ready, bare], "READY")
    api.patch_states([rerun], "RESTART_READY")
    api.patch_states([failed], "FAILED")
    api.patch_states([skipped], "STAGED_IN")
    assert states(api, [ready, rerun, failed, skipped, bare]) == {
        ready: "READY", rerun: "READY", failed: "FAILED", skipped: "STAGED_IN", bare: "STAGED_IN"}
    assert last_move(api, bare) == ("READY", "STAGED_IN", "Skipped stage in")
    items = stage_ins(api, [ready, rerun, failed, skipped])
    assert {j: i["state"] for j, i in items.items()} == {
        ready: "pending", rerun: "pending", failed: "awaiting_job", skipped: "awaiting_job"}

    api.patch_states([failed], "RESTART_READY")  # `balsam job modify -f FAILED -s RESTART_READY`
    assert (api.job(failed)["state"], in_states(api, [failed])) == ("AWAITING_PARENTS", {"awaiting_job"})
    finish(api, [parent])
    assert (api.job(failed)["state"], in_states(api, [failed])) == ("READY", {"pending"})
    assert api.job(skipped)["state"] == "STAGED_IN"  # runs on as the user chose


def test_a_re_run_waiting_again_stages_in_again_after_its_parent(api: Api, xfer: tuple) -> None:
    """A parent and its child re-run at once (the parent's output was wrong): the child's stage-in
    done in the first run, and one in ``error``, are held (fresh tries) and copied again once the
    parent has finished again. Done and not held, the child went to STAGED_IN at the release with
    the first run's file."""
    _site, app = xfer
    parent = api.jobs(app["id"])[0]["id"]
    child, broken = (j["id"] for j in api.jobs(app["id"], 2, parent_ids=[parent], transfers={"input": "aps:/p"}))
    finish(api, [parent])
    items = stage_ins(api, [child, broken])
    api.ok("PATCH", "/transfers/", json=[
        {"id": items[child]["id"], "state": "done", "task_id": "globus:1", "transfer_info": {"bytes": 5}},
        {"id": items[broken]["id"], "state": "error", "task_id": "globus:1",
         "transfer_info": {"bytes": 5, "attempts": 3, "error": "endpoint down"}},
    ])
    assert states(api, [child, broken]) == {child: "STAGED_IN", broken: "FAILED"}
    run_to(api, [child], "RUN_DONE")

    api.patch_states([parent, child, broken], "RESTART_READY")
    assert states(api, [parent, child, broken]) == {parent: "RESTART_READY", child: "AWAITING_PARENTS",
                                                    broken: "AWAITING_PARENTS"}
    held = stage_ins(api, [child, broken])
    assert {(i["state"], i["task_id"]) for i in held.values()} == {("awaiting_job", "")}
    assert [held[j]["transfer_info"] for j in (child, broken)] == [{"bytes": 5}, {"bytes": 5}]
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states([parent], state)
    assert states(api, [child, broken]) == {child: "READY", broken: "READY"}
    assert in_states(api, [child, broken]) == {"pending"}


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a child created while its parent finishes
# ---------------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("first", ["create", "finish"])
def test_a_child_created_while_its_parent_finishes_stages_in_once_released(race_api: Api, race_server: Any,
                                                                           first: str) -> None:
    """``create``: the create has read the parent RUN_DONE (FOR SHARE) and stops at its insert (a
    side connection holds the app's row); the finish waits for it, then releases the child and
    starts its stage-in, created held. ``finish``: the finish stops after writing the parent (a side
    connection holds the parent's other, waiting child, which the release locks); the create waits
    for the parent's lock, then reads it finished: READY, its stage-in pending from the start.
    Either way the child is READY with its stage-in pending, never READY with it held."""
    api = race_api
    site = api.site(transfer_locations={"aps": "globus://aps-endpoint"})
    app = api.app(site["id"], "Xfer", transfers=SLOTS)
    parent = api.jobs(app["id"])[0]["id"]
    sibling = api.jobs(app["id"], parent_ids=[parent])[0]["id"]
    run_to(api, [parent], "RUN_DONE")
    body = [{"workdir": "child", "app_id": app["id"], "parent_ids": [parent], "transfers": {"input": "aps:/p/out"}}]
    with side(race_server) as (holder, watch), concurrent.futures.ThreadPoolExecutor(2) as pool:
        with holder.cursor() as cur:
            if first == "create":
                cur.execute("SELECT id FROM apps WHERE id = %s FOR UPDATE", (app["id"],))
            else:
                cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (sibling,))
        if first == "create":
            create = pool.submit(call, api, "POST", "/jobs/", json=body)
            stopped = wait_until(lambda: blocked_by(watch, {pid(holder)}), "the create to wait at its insert")
            finish = pool.submit(call, api, "PATCH", "/jobs/", json=[{"id": parent, "state": "POSTPROCESSED"}])
            wait_until(lambda: finish.done() or blocked_by(watch, {stopped}), "the finish to wait for the create")
        else:
            finish = pool.submit(call, api, "PATCH", "/jobs/", json=[{"id": parent, "state": "POSTPROCESSED"}])
            stopped = wait_until(lambda: blocked_by(watch, {pid(holder)}), "the finish to wait at the release")
            create = pool.submit(call, api, "POST", "/jobs/", json=body)
            wait_until(lambda: create.done() or blocked_by(watch, {stopped}), "the create to wait for the finish")
        holder.rollback()
        assert create.result().status_code == 201, create.result().text
        assert finish.result().status_code == 200, finish.result().text
    child = create.result().json()[0]["id"]
    assert states(api, [parent, sibling, child]) == {parent: "JOB_FINISHED", sibling: "STAGED_IN", child: "READY"}
    assert in_states(api, [child]) == {"pending"}
