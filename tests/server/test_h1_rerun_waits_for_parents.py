"""A re-run (RESTART_READY) of a job waits for its parents again when one of them has not finished.

Only the finish of a parent releases a waiting child, so a child re-run while a parent was not
finished ran before it (its inputs missing or half written). Two ways there: re-running every
FAILED job after a stage-in failed while the child waited (the server fails such a child), and
re-running a parent and its child at once (the parent's output being made again). Now the child
goes back to AWAITING_PARENTS (an event names the parents) and the finish of its last parent
releases it; a re-run straight out of AWAITING_PARENTS (the documented way past the wait), or with
every remaining parent finished (a deleted one does not block), still goes to RESTART_READY."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from server_testlib import Api
from test_pg_races import blocked_by, call, pid, side, states, wait_until

WAIT_MESSAGE = "Waiting for its parents again before the re-run: "


def finish(api: Api, ids: list[int]) -> None:
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states(ids, state)


def run_to(api: Api, ids: list[int], last: str) -> None:
    for state in ("PREPROCESSED", "RUNNING", last):
        api.patch_states(ids, state)


def moves(api: Api, job_id: int) -> list[tuple[str, str, Any]]:
    events = sorted(api.events(job_id=job_id), key=lambda e: (e["timestamp"], e["id"]))
    return [(e["from_state"], e["to_state"], (e.get("data") or {}).get("message")) for e in events]


@pytest.fixture
def transfer_app(api: Api) -> dict:
    site = api.site(transfer_locations={"aps": "globus://aps-endpoint"})
    return api.app(site["id"], "Xfer", transfers={"input": {"required": True, "direction": "in", "local_path": "in.dat"}})


def test_a_child_failed_by_its_stage_in_while_waiting_waits_again_when_re_run(api: Api, transfer_app: dict) -> None:
    parent = api.jobs(transfer_app["id"], transfers={"input": "aps:/p"})[0]["id"]
    child = api.jobs(transfer_app["id"], parent_ids=[parent], transfers={"input": "aps:/c"})[0]["id"]
    item = api.ok("GET", "/transfers/", params={"job_id": [child]})["results"][0]["id"]
    # A waiting job's stage-in is held (awaiting_job) and no agent may move it: the user's move to
    # READY starts it (`balsam job modify -s READY`), and then it can give up.
    api.patch_states([child], "READY")
    api.ok("PATCH", "/transfers/", json=[{"id": item, "state": "error", "transfer_info": {"error": "endpoint down"}}])
    assert api.job(child)["state"] == "FAILED"  # the server fails a job whose stage-in gave up

    api.patch_states([child], "RESTART_READY")  # `balsam job modify -f FAILED -s RESTART_READY`
    assert states(api, [parent, child]) == {parent: "READY", child: "AWAITING_PARENTS"}  # was READY: ran first
    assert moves(api, child)[-2:] == [("FAILED", "RESTART_READY", None),
                                      ("RESTART_READY", "AWAITING_PARENTS", f"{WAIT_MESSAGE}{parent} (READY)")]
    # its failed stage-in is held again (awaiting_job, fresh tries) until its parent finishes
    assert api.ok("GET", f"/transfers/{item}")["state"] == "awaiting_job"

    parent_item = api.ok("GET", "/transfers/", params={"job_id": [parent]})["results"][0]["id"]
    api.ok("PATCH", "/transfers/", json=[{"id": parent_item, "state": "done"}])
    finish(api, [parent])
    assert states(api, [parent, child]) == {parent: "JOB_FINISHED", child: "READY"}
    assert moves(api, child)[-1] == ("AWAITING_PARENTS", "READY", "All parents finished")
    assert api.ok("GET", f"/transfers/{item}")["state"] == "pending"
    api.ok("PATCH", "/transfers/", json=[{"id": item, "state": "done"}])
    assert api.job(child)["state"] == "STAGED_IN"


def test_a_parent_and_its_child_re_run_at_once_run_in_order(api: Api, site_app: tuple) -> None:
    _site, app = site_app
    a, b = (j["id"] for j in api.jobs(app["id"], 2))
    finish(api, [a, b])
    child = api.jobs(app["id"], parent_ids=[a, b])[0]["id"]
    run_to(api, [child], "RUN_ERROR")
    api.patch_states([child], "FAILED")  # its parent's output was wrong: both are run again

    assert api.patch_states([b, child], "RESTART_READY") == 2
    assert states(api, [a, b, child]) == {a: "JOB_FINISHED", b: "RESTART_READY", child: "AWAITING_PARENTS"}
    assert moves(api, child)[-1] == ("RESTART_READY", "AWAITING_PARENTS", f"{WAIT_MESSAGE}{b} (RESTART_READY)")
    # a launcher cannot lease the waiting child, only the parent
    session = api.ok("POST", "/sessions/", 201, json={"site_id": _site["id"]})["id"]
    leased = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    assert [j["id"] for j in leased] == [b]
    api.ok("PATCH", "/jobs/", json=[{"id": b, "state": s, "session_id": session} for s in ("RUNNING", "RUN_DONE")])
    api.patch_states([b], "POSTPROCESSED")
    assert states(api, [b, child]) == {b: "JOB_FINISHED", child: "STAGED_IN"}


def test_a_re_run_whose_parents_are_done_or_deleted_or_that_leaves_the_wait_is_not_held(api: Api, site_app: tuple) -> None:
    _site, app = site_app
    done, gone, failed = (j["id"] for j in api.jobs(app["id"], 3))
    finish(api, [done])
    run_to(api, [failed], "RUN_ERROR")
    api.patch_states([failed], "FAILED")
    # all parents finished, or the unfinished one deleted: the re-run goes on (a timed-out run's retry)
    c1 = api.jobs(app["id"], parent_ids=[done])[0]["id"]
    c2 = api.jobs(app["id"], parent_ids=[done, gone])[0]["id"]
    assert states(api, [c1, c2]) == {c1: "STAGED_IN", c2: "AWAITING_PARENTS"}
    run_to(api, [c1], "RUN_TIMEOUT")
    api.ok("DELETE", f"/jobs/{gone}", 204)
    run_to(api, [c2], "RUN_ERROR")
    api.patch_states([c1, c2], "RESTART_READY")
    assert states(api, [c1, c2]) == {c1: "RESTART_READY", c2: "RESTART_READY"}
    # out of AWAITING_PARENTS (`balsam job modify --id C -s RESTART_READY`): the user's way past a
    # FAILED parent, as before
    c3 = api.jobs(app["id"], parent_ids=[done, failed])[0]["id"]
    assert api.job(c3)["state"] == "AWAITING_PARENTS"
    api.patch_states([c3], "RESTART_READY")
    assert api.job(c3)["state"] == "RESTART_READY"


def test_many_re_runs_behind_many_parents_in_one_request(api: Api, site_app: tuple) -> None:
    """A fan-in child behind 2,000 finished parents and 2,000 children behind one parent, re-run in
    one bulk update: the held ones name their unfinished parents (the first ten)."""
    _site, app = site_app
    parents = [j["id"] for j in api.jobs(app["id"], 2000)]
    finish(api, parents)
    fan_in = api.jobs(app["id"], parent_ids=parents)[0]["id"]
    hub = api.jobs(app["id"])[0]["id"]
    finish(api, [hub])
    fan_out = [j["id"] for j in api.jobs(app["id"], 2000, parent_ids=[hub])]
    run_to(api, [fan_in, *fan_out], "RUN_ERROR")
    api.patch_states([fan_in, *fan_out], "FAILED")
    api.patch_states([*parents[:12], hub], "RESTART_READY")
    api.patch_states([fan_in, *fan_out], "RESTART_READY")
    counts = api.ok("GET", "/jobs/", params={"id": [fan_in, *fan_out], "state": "AWAITING_PARENTS", "limit": 1})["count"]
    assert counts == 2001
    shown = ", ".join(f"{p} (RESTART_READY)" for p in parents[:10])
    assert moves(api, fan_in)[-1] == ("RESTART_READY", "AWAITING_PARENTS", f"{WAIT_MESSAGE}{shown} (+2 more)")
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):  # the re-run of the parents
        api.patch_states([*parents[:12], hub], state)
    assert api.ok("GET", "/jobs/", params={"id": [fan_in, *fan_out], "state": "STAGED_IN", "limit": 1})["count"] == 2001


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a re-run while its last unfinished parent finishes
# ---------------------------------------------------------------------------------------------

@pytest.mark.postgres
def test_a_re_run_while_its_parent_finishes_is_never_left_waiting(race_api: Api, race_server: Any) -> None:
    """The finish of p stops with p written, not committed (a side connection holds p's other,
    waiting child w, which the finish locks to release it); the re-run of c then reads p unfinished.
    Unlocked, it moved c to AWAITING_PARENTS and committed, while the finish's search for children
    had seen c FAILED: c waited for ever. Read FOR SHARE, p is read again once the finish commits:
    JOB_FINISHED, so c goes to RESTART_READY."""
    api = race_api
    site = api.site()
    app = api.app(site["id"])
    p = api.jobs(app["id"])[0]["id"]
    w, c = (j["id"] for j in api.jobs(app["id"], 2, parent_ids=[p]))
    run_to(api, [p], "RUN_DONE")
    api.patch_states([c], "FAILED")  # forced by its user while it waited
    with side(race_server) as (holder, watch), concurrent.futures.ThreadPoolExecutor(2) as pool:
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (w,))
        finishing = pool.submit(call, api, "PATCH", "/jobs/", json=[{"id": p, "state": "POSTPROCESSED"}])
        finisher = wait_until(lambda: blocked_by(watch, {pid(holder)}), "the finish to wait for w's lock")
        rerun = pool.submit(call, api, "PATCH", "/jobs/", json=[{"id": c, "state": "RESTART_READY"}])
        wait_until(lambda: rerun.done() or blocked_by(watch, {finisher}), "the re-run to end or wait for the finish")
        holder.rollback()
        assert finishing.result().status_code == 200, finishing.result().text
        assert rerun.result().status_code == 200, rerun.result().text
    assert states(api, [p, w, c]) == {p: "JOB_FINISHED", w: "STAGED_IN", c: "RESTART_READY"}
