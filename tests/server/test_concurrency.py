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
