"""Concurrent acquisition: 8 processes, 2,000 jobs, every job handed out exactly once."""

from __future__ import annotations

import multiprocessing as mp

import httpx
import pytest
from server_testlib import Api

N_JOBS = 2000
N_PROCS = 8


def _acquire_all(url: str, token: str, site_id: int, batch: int, queue: "mp.Queue", barrier: "mp.Barrier") -> None:
    try:
        got: list[int] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            resp = http.post("/sessions/", json={"site_id": site_id})
            resp.raise_for_status()
            session = resp.json()["id"]
            barrier.wait(timeout=120)  # everyone starts acquiring at the same moment
            empty = 0
            while empty < 2:
                resp = http.post(f"/sessions/{session}", json={"max_num_jobs": batch, "filter_tags": {}})
                resp.raise_for_status()
                jobs = resp.json()
                if not jobs:
                    empty += 1
                    continue
                ids = [j["id"] for j in jobs]
                got.extend(ids)
                # Write contention as a launcher would cause it: report the jobs RUNNING in bulk.
                http.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids]).raise_for_status()
        queue.put(("ok", got))
    except Exception as exc:  # reported to the parent, which fails the test with the reason
        queue.put(("error", repr(exc)))


def test_concurrent_acquire_hands_out_each_job_once(api, site_app):
    site, app = site_app
    check_exactly_once(api, site, app)


@pytest.mark.postgres
def test_exactly_once_with_several_uvicorn_workers(live_server_factory, register):
    """The shared deployment: PostgreSQL behind 2 uvicorn worker processes."""
    server = live_server_factory("postgresql", workers=2)
    api = Api(server.url, register)
    site = api.site()
    check_exactly_once(api, site, api.app(site["id"]))
    api.close()


def check_exactly_once(api, site, app):
    jobs = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"c/{i}", "app_id": app["id"]} for i in range(N_JOBS)])
    all_ids = sorted(j["id"] for j in jobs)
    assert api.ok("PUT", "/jobs/", params={"app_id": app["id"]}, json={"state": "PREPROCESSED"}) == N_JOBS

    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(N_PROCS)
    procs = [ctx.Process(target=_acquire_all, args=(api.url, api.token, site["id"], 17 + 13 * i, queue, barrier))
             for i in range(N_PROCS)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    errors = [r[1] for r in results if r[0] == "error"]
    assert not errors, errors
    handed_out = [i for _status, ids in results for i in ids]
    assert len(handed_out) == len(set(handed_out)), "a job was handed to two sessions"
    assert sorted(handed_out) == all_ids
    assert sum(1 for _s, ids in results if ids) >= 2, "the acquisitions did not overlap"
    assert api.ok("GET", "/jobs/", params={"app_id": app["id"], "state": "RUNNING", "limit": 0})["count"] == N_JOBS


def _finish(url: str, token: str, ids: list[int], queue: "mp.Queue", barrier: "mp.Barrier") -> None:
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            barrier.wait(timeout=120)
            # Two overlapping bulk transactions, each finishing one parent of every child
            # (POSTPROCESSED without stage-out becomes JOB_FINISHED).
            http.patch("/jobs/", json=[{"id": i, "state": "POSTPROCESSED"} for i in ids]).raise_for_status()
        queue.put(("ok", None))
    except Exception as exc:
        queue.put(("error", repr(exc)))


def test_children_released_when_parents_finish_concurrently(api, site_app):
    """Each child has two parents finished at the same moment by two processes; none may be stranded."""
    _site, app = site_app
    n = 400
    left = [j["id"] for j in api.jobs(app["id"], n, prefix="left")]
    right = [j["id"] for j in api.jobs(app["id"], n, prefix="right")]
    children = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"child/{i}", "app_id": app["id"], "parent_ids": [a, b]}
                                                   for i, (a, b) in enumerate(zip(left, right))])
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE"):
        api.ok("PUT", "/jobs/", params={"id": left + right}, json={"state": state})
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_finish, args=(api.url, api.token, ids, queue, barrier)) for ids in (left, right)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert all(status == "ok" for status, _ in results), results
    states = {j["state"] for j in api.ok("GET", "/jobs/", params={"id": [c["id"] for c in children]})["results"]}
    assert states == {"STAGED_IN"}


def _mark_done(url: str, token: str, item_ids: list[int], queue: "mp.Queue", barrier: "mp.Barrier") -> None:
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            barrier.wait(timeout=120)
            http.patch("/transfers/", json=[{"id": i, "state": "done"} for i in item_ids]).raise_for_status()
        queue.put(("ok", None))
    except Exception as exc:
        queue.put(("error", repr(exc)))


def test_stage_ins_finishing_concurrently_release_every_job(api):
    """Each job has two stage-in items marked done at the same moment by two processes."""
    site = api.site(transfer_locations={"dtn": "globus://endpoint"})
    app = api.app(site["id"], transfers={"a": {"required": True, "direction": "in", "local_path": "a"},
                                         "b": {"required": True, "direction": "in", "local_path": "b"}})
    jobs = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"x/{i}", "app_id": app["id"],
                                                "transfers": {"a": "dtn:/a", "b": "dtn:/b"}} for i in range(300)])
    items = api.ok("GET", "/transfers/", params={"job_id": [j["id"] for j in jobs]})["results"]
    halves = [[i["id"] for i in items if i["local_path"] == slot] for slot in ("a", "b")]
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_mark_done, args=(api.url, api.token, ids, queue, barrier)) for ids in halves]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert all(status == "ok" for status, _ in results), results
    states = {j["state"] for j in api.ok("GET", "/jobs/", params={"id": [j["id"] for j in jobs]})["results"]}
    assert states == {"STAGED_IN"}
