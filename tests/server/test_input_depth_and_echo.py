"""Deeply nested bodies and huge bad values: a one-line 422 naming where, nothing stored.

A body nested deeper than ``MAX_JSON_DEPTH`` used to give 500s (orjson.dumps fails near 250
levels, the recursive size walks near 1000), after the job was committed on PostgreSQL; a 422
echoed a 60 MB bad value back whole.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from balsam.server import limits

#: The documented limit (docs/rest-api.md); the fallback lets this file run against the code before it.
LIMIT = getattr(limits, "MAX_JSON_DEPTH", 64)
SLOT = "@@NESTED@@"


def _depth_of_slot(value: Any, depth: int = 1) -> "tuple[int, list[Any]] | None":
    """Depth of the container holding the slot, and the loc of the slot (from "body")."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in items:
        if item == SLOT:
            return depth, [key]
        found = _depth_of_slot(item, depth + 1)
        if found is not None:
            return found[0], [key] + found[1]
    return None


def nested_body(template: Any, total_depth: int) -> tuple[str, list[Any]]:
    """``template`` with its slot replaced by nested lists making the whole body ``total_depth``
    levels deep; and the loc of the slot."""
    base, loc = _depth_of_slot(template)
    levels = total_depth - base
    text = json.dumps(template).replace(json.dumps(SLOT), "[" * levels + "]" * levels)
    return text, ["body"] + loc


@pytest.fixture
def world(api):
    site = api.site()
    app = api.app(site["id"], parameters={"p": {"required": False, "default": "1"}})
    job = api.jobs(app["id"], data={"orig": 1})[0]
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    return {"site": site, "app": app, "job": job, "bj": bj}


def _cases(w: dict) -> list[tuple[str, str, Any, str]]:
    """(method, path, body with the slot, path of the record to compare before and after)."""
    s, a, j, b = w["site"]["id"], w["app"]["id"], w["job"]["id"], w["bj"]["id"]
    bj = {"site_id": s, "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 5, "job_mode": "mpi"}
    return [
        ("POST", "/jobs/", [{"workdir": "deep/d", "app_id": a, "data": {"x": SLOT}}], "/jobs/"),
        ("POST", "/jobs/", [{"workdir": "deep/t", "app_id": a, "tags": {"k": SLOT}}], "/jobs/"),
        ("POST", "/jobs/", [{"workdir": "deep/p", "app_id": a, "parameters": {"k": SLOT}}], "/jobs/"),
        ("PATCH", "/jobs/", [{"id": j, "state": "RESTART_READY", "state_data": {"k": SLOT}}], f"/jobs/{j}"),
        ("PATCH", "/jobs/", [{"id": j, "data": {"k": SLOT}}], f"/jobs/{j}"),
        ("PUT", f"/jobs/{j}", {"data": {"k": SLOT}}, f"/jobs/{j}"),
        ("PUT", f"/jobs/?id={j}", {"data": {"k": SLOT}}, f"/jobs/{j}"),
        ("POST", "/sites/", {"name": "deep", "path": "/d", "transfer_locations": {"k": SLOT}}, "/sites/"),
        ("PUT", f"/sites/{s}", {"optional_batch_job_params": {"k": SLOT}}, f"/sites/{s}"),
        ("POST", "/apps/", {"site_id": s, "name": "Deep", "serialized_class": "", "source_code": "",
                            "parameters": {"k": SLOT}}, "/apps/"),
        ("PUT", f"/apps/{a}", {"parameters": {"k": SLOT}}, f"/apps/{a}"),
        ("POST", "/batch-jobs/", {**bj, "optional_params": {"x": SLOT}}, "/batch-jobs/"),
        ("PUT", f"/batch-jobs/{b}", {"status_info": {"x": SLOT}}, f"/batch-jobs/{b}"),
        ("PATCH", "/batch-jobs/", [{"id": b, "status_info": {"x": SLOT}}], f"/batch-jobs/{b}"),
    ]


@pytest.mark.parametrize("depth", [LIMIT + 1, 253, 1000])
def test_too_deep_bodies_refused_naming_where_nothing_stored(api, world, depth):
    for method, path, template, check in _cases(world):
        before = api.ok("GET", check)
        body, slot_loc = nested_body(template, depth)
        resp = api.http.request(method, path, content=body, headers={"Content-Type": "application/json"})
        what = f"{method} {path} depth {depth}"
        assert resp.status_code == 422, f"{what} -> {resp.status_code}: {resp.text[:300]}"
        (error,) = resp.json()["detail"]
        # The first point past the limit: the slot's own path, then list indices down to it.
        assert error["loc"][:len(slot_loc)] == slot_loc, what
        assert len(error["loc"]) == LIMIT + 1, what
        assert str(LIMIT) in error["msg"], what
        assert api.ok("GET", check) == before, f"{what}: something was stored"


def test_depth_at_the_limit_accepted(api, world):
    body, _ = nested_body([{"workdir": "deep/ok", "app_id": world["app"]["id"], "data": {"x": SLOT}}], LIMIT)
    created = api.ok("POST", "/jobs/", 201, content=body, headers={"Content-Type": "application/json"})
    assert api.job(created[0]["id"])["data"] == json.loads(body)[0]["data"]


def test_deep_create_stores_nothing_and_a_retry_does_not_double(api, world):
    """Depth 253: orjson.loads accepts it, orjson.dumps of the answer fails (PostgreSQL committed
    the job before building the 201)."""
    body, _ = nested_body([{"workdir": "deep/half", "app_id": world["app"]["id"], "data": {"x": SLOT}}], 253)
    for _ in range(2):
        resp = api.http.post("/jobs/", content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, resp.text[:300]
    assert api.ok("GET", "/jobs/", params={"workdir__contains": "deep/half"})["count"] == 0


def test_huge_bad_value_not_echoed(api, world):
    resp = api.http.post("/jobs/", json=[{"workdir": "w/big", "app_id": world["app"]["id"],
                                          "tags": {"k": ["x" * 1_000_000] * 60}}])
    assert resp.status_code == 422
    assert len(resp.content) < 4096, len(resp.content)
    assert any(e["loc"] == ["body", 0, "tags", "k"] for e in resp.json()["detail"]), resp.text
    assert api.ok("GET", "/jobs/", params={"workdir__contains": "w/big"})["count"] == 0


def test_million_digit_integer_text_named_briefly(api, world):
    resp = api.http.post("/jobs/", json=[{"workdir": "w/nn", "app_id": world["app"]["id"], "num_nodes": "9" * 1_000_000}])
    assert resp.status_code == 422
    assert len(resp.content) < 4096, len(resp.content)
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", 0, "num_nodes"], error
    assert "digits" not in error["msg"] or "64 bits" in error["msg"], error


@pytest.mark.parametrize("stamp", [1e20, -1e20, 2**62])
def test_out_of_range_state_timestamp_names_the_field(api, world, stamp):
    job_id = world["job"]["id"]
    resp = api.http.patch("/jobs/", json=[{"id": job_id, "state": "RESTART_READY", "state_timestamp": stamp}])
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", 0, "state_timestamp"], error
    assert "9999" in error["msg"], error
    assert api.job(job_id)["state"] == world["job"]["state"]
