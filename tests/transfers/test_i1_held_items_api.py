"""The server's side of a stage-in held again (``awaiting_job``) while the site agent works on it,
on the real server (SQLite and PostgreSQL), through the REST API as the agent sends it.

A stage-in item ``awaiting_job`` is started by the server only (its job's release): an update of it
is refused (409, ``refused_ids`` naming it, nothing of the request written). Before, the agent's PATCH to ``active`` / ``done`` of an item it had read before its job
was sent back to wait was applied, and the job was released on a copy made before its parent's new
run. A re-run sent back to wait holds its in-flight stage-in too (it was left to end, then recorded
``done``: the same stale copy)."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from transfer_test_utils import init_transfer_site, step_app

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def make_dag(tmp_path: Path) -> tuple[Any, dict[str, int]]:
    """A site with a ``shared`` location; a parent (stage-out, not given: none), its child staging in
    from ``shared``, and a job of its own staging in (READY, its item pending). Returns the client
    and {name: id} of the jobs and of the items ``child_in``, ``lone_in``, ``parent_out``."""
    from balsam.api import Job

    client, site = init_transfer_site(tmp_path, "i1-api-site")
    Step = step_app(site.site_id, command="true")
    parent = Job("dag/parent", Step, transfers={"result": "shared:/tmp/i1-out.txt"})
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": "shared:/tmp/i1-in.txt"})
    child.save()
    lone = Job("lone", Step, transfers={"input": "shared:/tmp/i1-in.txt"})
    lone.save()
    ids = {"parent": parent.id, "child": child.id, "lone": lone.id}
    for name, job, direction in (("child_in", child, "in"), ("lone_in", lone, "in"), ("parent_out", parent, "out")):
        (row,) = client.get("/transfers/", params={"job_id": job.id, "direction": direction})["results"]
        ids[name] = row["id"]
    return client, ids


def refusal(call: Any) -> Any:
    from balsam.client.rest import APIError

    with pytest.raises(APIError) as info:
        call()
    return info.value


def item(client: Any, item_id: int) -> dict:
    return client.get(f"/transfers/{item_id}")


def test_updates_of_a_held_item_are_refused_whole(env: Any, tmp_path: Path) -> None:
    client, ids = make_dag(tmp_path)
    assert (item(client, ids["child_in"])["state"], item(client, ids["lone_in"])["state"]) == ("awaiting_job", "pending")

    # The agent's submission of both, the child's read before it was (re-)held: all or nothing.
    exc = refusal(lambda: client.patch("/transfers/", json=[
        {"id": ids["lone_in"], "state": "active", "task_id": "local:t1"},
        {"id": ids["child_in"], "state": "active", "task_id": "local:t1"}]))
    assert exc.status_code == 409 and exc.refused_ids == frozenset({ids["child_in"]})
    assert f"TransferItem {ids['child_in']}: stage-in held (awaiting_job)" in str(exc.detail)
    assert (item(client, ids["lone_in"])["state"], item(client, ids["child_in"])["state"]) == ("pending", "awaiting_job")
    # Each other way in: a report (PUT), a failure (would fail the waiting job), a retry back to
    # pending, a reason only.
    for call in (lambda: client.put(f"/transfers/{ids['child_in']}", json={"state": "done"}),
                 lambda: client.patch("/transfers/", json=[{"id": ids["child_in"], "state": "error",
                                                            "transfer_info": {"error": "no such file"}}]),
                 lambda: client.patch("/transfers/", json=[{"id": ids["child_in"], "state": "pending"}]),
                 lambda: client.patch("/transfers/", json=[{"id": ids["child_in"], "transfer_info": {"reason": "x"}}])):
        assert refusal(call).status_code == 409
    held = item(client, ids["child_in"])
    assert (held["state"], held["task_id"], held["transfer_info"]) == ("awaiting_job", "", {})
    assert client.get(f"/jobs/{ids['child']}")["state"] == "AWAITING_PARENTS"
    # The others go through once sent without it (what the agent's bulk PATCH does on a refusal).
    client.patch("/transfers/", json=[{"id": ids["lone_in"], "state": "active", "task_id": "local:t1"}])
    assert item(client, ids["lone_in"])["state"] == "active"


def test_a_re_run_sent_back_to_wait_holds_its_stage_in_in_flight(env: Any, tmp_path: Path) -> None:
    """The child's stage-in is ``active`` (a task copies the parent's first output) when the parent
    and the child are re-run: it is held with the others, its task id and the task's clock and
    progress gone (its other info kept); the agent's report of the task is refused; the parent's
    finish starts it again (``pending``)."""
    client, ids = make_dag(tmp_path)
    parent, child, child_in = ids["parent"], ids["child"], ids["child_in"]
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": parent, "state": state}])
    client.patch("/transfers/", json=[{"id": ids["parent_out"], "state": "done", "task_id": "local:t0"}])
    assert (client.get(f"/jobs/{parent}")["state"], client.get(f"/jobs/{child}")["state"]) == ("JOB_FINISHED", "READY")
    running = {"bytes": 5, "dest": "/x/input.txt", "submitted": "2026-01-01T00:00:00+00:00",
               "started": "2026-01-01T00:00:01+00:00", "queued": "2026-01-01T00:00:00+00:00",
               "task": {"bytes_transferred": 3}, "attempts": 1}
    client.patch("/transfers/", json=[{"id": child_in, "state": "active", "task_id": "local:t1", "transfer_info": running}])

    client.patch("/jobs/", json=[{"id": parent, "state": "RESTART_READY"}, {"id": child, "state": "RESTART_READY"}])
    assert client.get(f"/jobs/{child}")["state"] == "AWAITING_PARENTS"
    held = item(client, child_in)
    # ``holds``: held once while in flight (a restarted agent's journal line of its task is stale).
    assert (held["state"], held["task_id"], held["transfer_info"]) == ("awaiting_job", "", {"bytes": 5, "holds": 1})
    exc = refusal(lambda: client.patch("/transfers/", json=[{"id": child_in, "state": "done"}]))
    assert exc.status_code == 409 and exc.refused_ids == frozenset({child_in})
    assert str(exc.detail) == (f"TransferItem {child_in}: stage-in held (awaiting_job): the server starts it when its "
                               "job goes to READY (release or re-run). Nothing was updated")
    assert client.get(f"/jobs/{child}")["state"] == "AWAITING_PARENTS"

    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": parent, "state": state}])
    client.patch("/transfers/", json=[{"id": ids["parent_out"], "state": "done", "task_id": "local:t2"}])
    assert client.get(f"/jobs/{child}")["state"] == "READY"
    assert (item(client, child_in)["state"], item(client, child_in)["task_id"]) == ("pending", "")


@pytest.mark.postgres
def test_an_update_waiting_for_the_jobs_lock_sees_the_hold(balsam_env_pg: Any, _live_server_pg_obj: Any,
                                                           tmp_path: Path) -> None:
    """PostgreSQL: the agent's PATCH to ``active`` waits for the child's row lock, which the hold's
    transaction holds (a side connection here, holding the lock as the re-run's update does and
    writing what it writes); it commits; the PATCH then finds the item held and is refused. (Read in
    the statement that takes the lock, the item was seen as before the hold: PostgreSQL re-reads
    only the locked rows of a statement that waited, and the PATCH was applied.)"""
    import psycopg2
    from sqlalchemy.engine import make_url

    from balsam.server.db import normalize_database_url

    client, ids = make_dag(tmp_path)
    child, child_in = ids["child"], ids["child_in"]
    client.patch("/jobs/", json=[{"id": child, "state": "READY"}])  # the user's move out of the wait
    assert item(client, child_in)["state"] == "pending"

    url = make_url(normalize_database_url(_live_server_pg_obj.database_url))
    connect = dict(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database)
    side, watch = psycopg2.connect(**connect), psycopg2.connect(**connect)
    watch.autocommit = True
    try:
        with side.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (side_pid,) = cur.fetchone()
            cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (child,))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            patch = pool.submit(lambda: httpx.patch(
                f"{balsam_env_pg.url}/transfers/", headers={"Authorization": f"Bearer {balsam_env_pg.token}"},
                json=[{"id": child_in, "state": "active", "task_id": "local:t1"}], timeout=120))
            for _ in range(1500):  # until the PATCH waits for the side's lock (a count, not a clock)
                with watch.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (side_pid,))
                    if cur.fetchone()[0]:
                        break
                time.sleep(0.02)
            else:
                raise AssertionError("the PATCH never waited for the job's lock")
            with side.cursor() as cur:
                cur.execute("UPDATE jobs SET state = 'AWAITING_PARENTS' WHERE id = %s", (child,))
                cur.execute("UPDATE transfer_items SET state = 'awaiting_job', task_id = '' WHERE id = %s", (child_in,))
            side.commit()
            response = patch.result()
    finally:
        side.close()
        watch.close()
    assert response.status_code == 409, response.text
    assert response.json()["refused_ids"] == [child_in]
    assert (item(client, child_in)["state"], item(client, child_in)["task_id"]) == ("awaiting_job", "")
