"""A re-run request that also holds an AWAITING_PARENTS child of an unfinished parent (a sibling
re-run straight out of the wait, or only its tags changed, or ``balsam job modify -f FAILED -f
AWAITING_PARENTS -s RESTART_READY``) and that parent's finish, at the same time, on PostgreSQL.
The re-run locked its own jobs, then the parent (FOR SHARE); the finish locks the parent, then
its AWAITING_PARENTS children: a cycle, one of the two ended by PostgreSQL (40P01, answered 503).
The re-run now locks the unfinished parents first, with its jobs, in id order: one waits for the
other. Real server (2 workers), real PostgreSQL; the interleaving is made with a row lock held
by a side connection, never with timing."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from server_testlib import Api
from test_pg_races import call, side, wait_until, waiting

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("sibling_patch", [{"state": "RESTART_READY"}, {"tags": {"checked": "yes"}}],
                         ids=["sibling-rerun-out-of-the-wait", "sibling-tags-only"])
def test_a_rerun_holding_a_waiting_sibling_and_the_parent_finish_both_apply(
        race_api: Api, race_server: Any, sibling_patch: dict[str, Any]) -> None:
    site = race_api.site()
    app = race_api.app(site["id"], "A")
    parent = race_api.jobs(app["id"], 1)[0]["id"]
    failed, sibling = (j["id"] for j in race_api.jobs(app["id"], 2, parent_ids=[parent]))
    last = race_api.jobs(app["id"], 1)[0]["id"]  # the highest id of the request: where it is stopped
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE"):
        race_api.patch_states([parent], state)
    race_api.patch_states([failed], "FAILED")  # e.g. its stage-in failed while it waited
    race_api.patch_states([last], "FAILED")
    assert race_api.job(sibling)["state"] == "AWAITING_PARENTS"
    rerun_body = [{"id": failed, "state": "RESTART_READY"}, {"id": sibling, **sibling_patch},
                  {"id": last, "state": "RESTART_READY"}]
    with side(race_server) as (holder, watch), concurrent.futures.ThreadPoolExecutor(2) as pool:
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (last,))
        rerun = pool.submit(call, race_api, "PATCH", "/jobs/", json=rerun_body)
        wait_until(lambda: len(waiting(watch)) == 1, "the re-run to wait for the side connection's lock")
        finish = pool.submit(call, race_api, "PATCH", "/jobs/", json=[{"id": parent, "state": "POSTPROCESSED"}])
        wait_until(lambda: len(waiting(watch)) == 2, "the finish to wait for the re-run")
        holder.rollback()  # the re-run goes on
        answers = [rerun.result(), finish.result()]
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    # The re-run held the parent first: the failed child waited for it again, and the finish that
    # came after released it (and the sibling, unless re-run out of the wait: that one goes on).
    released = {"READY", "STAGED_IN"}
    assert race_api.job(parent)["state"] == "JOB_FINISHED"
    assert race_api.job(failed)["state"] in released
    assert race_api.job(sibling)["state"] in ({"RESTART_READY"} if "state" in sibling_patch else released)
