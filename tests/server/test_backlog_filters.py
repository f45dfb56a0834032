"""``GET /sites/{id}/backlog`` filters: ``max_nodes_per_job``, ``serial_only`` and
``max_wall_time_min`` count exactly the jobs an acquire with the same limits leases, and
``batch_job_id`` (repeated or comma-separated) only the jobs of those BatchJobs; bad values are
422 naming the parameter. On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from server_testlib import runnable

RUNNABLE = ["PREPROCESSED", "RESTART_READY"]


def _backlog(api, site_id: int, **params) -> dict:
    return api.ok("GET", f"/sites/{site_id}/backlog", params=params)["states"]


def _leased(api, site_id: int, **spec) -> list[int]:
    """The ids an acquire with ``spec`` leases (the session is then deleted: the jobs are free again)."""
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site_id})["id"]
    got = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 100, **spec})
    api.ok("DELETE", f"/sessions/{session}", 204)
    return sorted(j["id"] for j in (got if isinstance(got, list) else got["results"]))


@pytest.fixture
def shaped(api, site_app) -> tuple[int, dict[str, list[int]]]:
    """Runnable jobs of several shapes on one site: ``(site_id, {shape: ids})``."""
    site, app = site_app
    shapes = {
        "serial": dict(num_nodes=1, ranks_per_node=1, wall_time_min=0),
        "serial_30": dict(num_nodes=1, ranks_per_node=1, wall_time_min=30),
        "ranks4_60": dict(num_nodes=1, ranks_per_node=4, wall_time_min=60, node_packing_count=2),
        "nodes2_61": dict(num_nodes=2, ranks_per_node=1, wall_time_min=61),
        "nodes4_0": dict(num_nodes=4, ranks_per_node=2, wall_time_min=0),
    }
    return site["id"], {name: runnable(api, app["id"], 2, **fields) for name, fields in shapes.items()}


@pytest.mark.parametrize("params, spec, expected", [
    ({}, {}, ["serial", "serial_30", "ranks4_60", "nodes2_61", "nodes4_0"]),
    ({"max_nodes_per_job": 1}, {"max_nodes_per_job": 1}, ["serial", "serial_30", "ranks4_60"]),
    ({"max_nodes_per_job": 2}, {"max_nodes_per_job": 2}, ["serial", "serial_30", "ranks4_60", "nodes2_61"]),
    ({"serial_only": "true"}, {"serial_only": True}, ["serial", "serial_30"]),
    ({"serial_only": "false"}, {"serial_only": False}, ["serial", "serial_30", "ranks4_60", "nodes2_61", "nodes4_0"]),
    # wall_time_min 0 (the default) fits any limit, 0 included, as in the acquire
    ({"max_wall_time_min": 0}, {"max_wall_time_min": 0}, ["serial", "nodes4_0"]),
    ({"max_wall_time_min": 60}, {"max_wall_time_min": 60}, ["serial", "serial_30", "ranks4_60", "nodes4_0"]),
    ({"max_wall_time_min": 60, "max_nodes_per_job": 2}, {"max_wall_time_min": 60, "max_nodes_per_job": 2},
     ["serial", "serial_30", "ranks4_60"]),
    ({"serial_only": "1", "max_wall_time_min": 29}, {"serial_only": True, "max_wall_time_min": 29}, ["serial"]),
])
def test_lease_filters_count_what_the_acquire_leases(api, shaped, params, spec, expected) -> None:
    site_id, ids = shaped
    want = sorted(i for name in expected for i in ids[name])
    assert _leased(api, site_id, **spec) == want  # the acquire agrees with the shapes above
    states = _backlog(api, site_id, state=RUNNABLE, **params)
    assert list(states) == ["PREPROCESSED"]
    row = states["PREPROCESSED"]
    sizes = {"serial": (1, 1), "serial_30": (1, 1), "ranks4_60": (1, 2), "nodes2_61": (2, 1), "nodes4_0": (4, 1)}
    walls = {"serial": 0, "serial_30": 30, "ranks4_60": 60, "nodes2_61": 61, "nodes4_0": 0}
    assert row["count"] == len(want)
    assert row["footprint"] == pytest.approx(sum(2 * sizes[n][0] / sizes[n][1] for n in expected))
    assert (row["min_num_nodes"], row["max_num_nodes"]) == (min(sizes[n][0] for n in expected),
                                                            max(sizes[n][0] for n in expected))
    assert row["max_wall_time_min"] == max(walls[n] for n in expected)


def test_nothing_within_the_limits_is_no_state(api, shaped) -> None:
    site_id, _ = shaped
    assert _backlog(api, site_id, state=RUNNABLE, max_nodes_per_job=1, serial_only="true", max_wall_time_min=0,
                    tags="no:such") == {}
    assert _backlog(api, site_id, max_nodes_per_job=8, max_wall_time_min=10_000)["PREPROCESSED"]["count"] == 10


def test_batch_job_id_keeps_the_jobs_of_those_batch_jobs(api, site_app) -> None:
    site, app = site_app
    body = {"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 4, "wall_time_min": 30, "job_mode": "mpi"}
    first, second, idle = (api.ok("POST", "/batch-jobs/", 201, json=body)["id"] for _ in range(3))
    jobs = runnable(api, app["id"], 7, num_nodes=2, node_packing_count=4)
    api.ok("PATCH", "/jobs/", json=[{"id": i, "batch_job_id": first, "state": "RUNNING"} for i in jobs[:2]]
           + [{"id": i, "batch_job_id": second, "state": "RUNNING"} for i in jobs[2:5]]
           + [{"id": jobs[5], "state": "RUNNING"}])  # running in no BatchJob; jobs[6] stays runnable

    def running(**params) -> tuple[int, float]:
        row = _backlog(api, site["id"], state="RUNNING", **params).get("RUNNING")
        return (row["count"], row["footprint"]) if row else (0, 0.0)

    assert running() == (6, 3.0)
    assert running(batch_job_id=first) == (2, 1.0)
    assert running(batch_job_id=[first, second]) == (5, 2.5)
    assert running(batch_job_id=f"{first},{second},{idle}") == (5, 2.5)  # comma-separated, as other id filters
    assert running(batch_job_id=idle) == (0, 0.0)
    assert running(batch_job_id=2_000_000_000) == (0, 0.0)
    # with other states and the lease filters, in the same query
    states = _backlog(api, site["id"], batch_job_id=[first, second], max_nodes_per_job=2)
    assert {s: r["count"] for s, r in states.items()} == {"RUNNING": 5}
    assert _backlog(api, site["id"], batch_job_id=[first, second], max_nodes_per_job=1) == {}


@pytest.mark.parametrize("query, name, words", [
    ("max_nodes_per_job=0", "max_nodes_per_job", "must be >= 1"),
    ("max_nodes_per_job=-3", "max_nodes_per_job", "must be >= 1"),
    ("max_nodes_per_job=two", "max_nodes_per_job", "expected an integer"),
    ("max_nodes_per_job=99999999999", "max_nodes_per_job", "out of range"),
    ("max_nodes_per_job=1&max_nodes_per_job=2", "max_nodes_per_job", "takes one value, got 2"),
    ("serial_only=maybe", "serial_only", "expected true or false"),
    ("serial_only=true&serial_only=true", "serial_only", "takes one value, got 2"),
    ("max_wall_time_min=-1", "max_wall_time_min", "must be >= 0"),
    ("max_wall_time_min=1.5", "max_wall_time_min", "expected an integer"),
    ("max_wall_time_min=5&max_wall_time_min=6", "max_wall_time_min", "takes one value, got 2"),
    ("batch_job_id=x", "batch_job_id", "expected an integer"),
    ("batch_job_id=1&batch_job_id=99999999999", "batch_job_id", "out of range"),
    ("max_node_per_job=1", "max_node_per_job", "unknown filter parameter"),
])
def test_bad_values_are_422_naming_the_parameter(api, site_app, query, name, words) -> None:
    site, _ = site_app
    resp = api.http.get(f"/sites/{site['id']}/backlog?{query}")
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["query", name] and words in error["msg"], error
