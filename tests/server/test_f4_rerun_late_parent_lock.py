"""Two re-runs of the same child while its finished parent is re-run in between, on PostgreSQL.
R2 (the child and another job) read the parent finished, so locked no parent first, and held the
child. R1 re-ran the parent and committed. R3 re-ran the child: the parent unfinished now, it
locked the parent first and waited for the child. R2 then found the parent unfinished and locked
it late, after the child (FOR SHARE), held by R3: a cycle, one of them ended by PostgreSQL (40P01,
answered 503). R2 now reads the parents again once its jobs are locked, and on a new one lets its
locks go (ROLLBACK TO SAVEPOINT) and takes them again, parent first. Real server (2 workers), real
PostgreSQL; the interleaving is made with a row lock held by a side connection, never with timing."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
from server_testlib import Api
from test_pg_races import call, side, wait_until, waiting

pytestmark = pytest.mark.postgres


def test_two_reruns_of_a_child_and_a_rerun_of_its_parent_between_them_both_apply(race_api: Api,
                                                                                 race_server: Any) -> None:
    site = race_api.site()
    app = race_api.app(site["id"], "A")
    parent = race_api.jobs(app["id"], 1)[0]["id"]
    child = race_api.jobs(app["id"], 1, parent_ids=[parent])[0]["id"]
    last = race_api.jobs(app["id"], 1)[0]["id"]  # the highest id of R2: where it is stopped
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        race_api.patch_states([parent], state)
    assert race_api.job(parent)["state"] == "JOB_FINISHED"
    race_api.patch_states([child, last], "FAILED")
    with side(race_server) as (holder, watch), concurrent.futures.ThreadPoolExecutor(2) as pool:
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (last,))
        r2 = pool.submit(call, race_api, "PATCH", "/jobs/",
                         json=[{"id": child, "state": "RESTART_READY"}, {"id": last, "state": "RESTART_READY"}])
        wait_until(lambda: len(waiting(watch)) == 1, "R2 to hold the child and wait for the other job")
        r1 = call(race_api, "PATCH", "/jobs/", json=[{"id": parent, "state": "RESTART_READY"}])
        assert r1.status_code == 200, r1.text
        r3 = pool.submit(call, race_api, "PATCH", "/jobs/",
                         json=[{"id": child, "tags": {"again": "1"}, "state": "RESTART_READY"}])
        wait_until(lambda: len(waiting(watch)) == 2, "R3 to lock the parent and wait for the child")
        holder.rollback()
        answers = [r2.result(), r3.result()]
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert race_api.job(child)["tags"] == {"again": "1"}
    assert race_api.job(last)["state"] == "RESTART_READY"
    assert race_api.job(parent)["state"] == "RESTART_READY"
