"""A BatchJob partition of 0 or fewer nodes is refused (422 naming it), as the BatchJob's own
``num_nodes`` is: it was stored, passed the site agent's check when the sizes still added up (2 and
-1 of a 1-node BatchJob), waited in the queue, and its launcher refused it at the start ("needs at
least 1 node"), the allocation lost. Create, PUT and bulk PATCH alike; nothing is stored."""

from __future__ import annotations

from server_testlib import Api

BJ = {"project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 10, "job_mode": "mpi"}
BAD = [{"job_mode": "mpi", "num_nodes": 2}, {"job_mode": "serial", "num_nodes": -1}]
ZERO = [{"job_mode": "mpi", "num_nodes": 0}, {"job_mode": "serial", "num_nodes": 1}]


def _refused(resp, loc: list) -> None:
    assert resp.status_code == 422, resp.text
    (item,) = resp.json()["detail"]
    assert item["loc"] == loc and "positive integer" in item["msg"], item


def test_partitions_of_no_nodes_are_refused(api: Api) -> None:
    site = api.site()
    _refused(api.http.post("/batch-jobs/", json={"site_id": site["id"], **BJ, "partitions": BAD}),
             ["body", "partitions", 1, "num_nodes"])
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], **BJ})
    _refused(api.http.put(f"/batch-jobs/{bj['id']}", json={"partitions": ZERO}), ["body", "partitions", 0, "num_nodes"])
    _refused(api.http.patch("/batch-jobs/", json=[{"id": bj["id"], "partitions": ZERO}]),
             ["body", 0, "partitions", 0, "num_nodes"])
    assert [b["partitions"] for b in api.ok("GET", "/batch-jobs/", params={"site_id": site["id"]})["results"]] == [None]
    # Sizes of at least 1 node each are stored as before.
    good = [{"job_mode": "mpi", "num_nodes": 1, "filter_tags": {}}]
    assert api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"partitions": good})["partitions"] == good
