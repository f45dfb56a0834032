"""A bulk create stores the model's default for every field its jobs leave out, whatever subset
of fields the request gives (SQLite reads from each job only the fields some job of the request
has, PostgreSQL COPYs only those columns: the others are written as constants or column defaults)."""

from __future__ import annotations

import uuid

from balsam.server.jobs_logic import CREATE_DEFAULTS

#: Each a request's only field besides workdir and app_id, with a value that is not its default.
SOLE_FIELDS = {"tags": {"k": "v"}, "data": {"x": [1]}, "num_nodes": 3, "gpus_per_rank": 0.5, "parent_ids": None,
               "pending_file_cleanup": False, "return_code": 7, "serialized_parameters": "p", "launch_params": {"a": "b"},
               "wall_time_min": 9}


def _defaults_but(stored: dict, given: dict) -> None:
    for name, default in CREATE_DEFAULTS.items():
        if name in ("workdir", "app_id"):  # required: no default
            continue
        expected = given.get(name, default)
        if expected is None:
            expected = default
        assert stored[name] == expected, (name, stored[name], expected)
        assert type(stored[name]) is type(expected), name


def test_bare_jobs_store_every_default(api, site_app):
    _site, app = site_app
    prefix = uuid.uuid4().hex[:6]
    created = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"{prefix}/{i}", "app_id": app["id"]} for i in range(20)])
    for job in created:
        stored = api.job(job["id"])
        assert stored == job
        _defaults_but(stored, {})


def test_one_field_given_by_some_jobs_only(api, site_app):
    _site, app = site_app
    for name, value in SOLE_FIELDS.items():
        prefix = uuid.uuid4().hex[:6]
        # Given by the first, absent from the others (null in the second where null is its default).
        body = [{"workdir": f"{prefix}/0", "app_id": app["id"], name: value},
                {"workdir": f"{prefix}/1", "app_id": app["id"]},
                {"workdir": f"{prefix}/2", "app_id": app["id"]}]
        if CREATE_DEFAULTS[name] is None:
            body[1][name] = None
        if name == "parent_ids":
            body[0][name] = [api.jobs(app["id"])[0]["id"]]
        created = api.ok("POST", "/jobs/", 201, json=body)
        for item, job in zip(body, created):
            stored = api.job(job["id"])
            assert stored == job, name
            _defaults_but(stored, {k: v for k, v in item.items() if k not in ("workdir", "app_id")})


def test_jobs_of_two_sites_and_states_with_few_fields(api):
    apps = [api.app(api.site()["id"])["id"] for _ in range(2)]
    parent = api.jobs(apps[0])[0]
    prefix = uuid.uuid4().hex[:6]
    body = [{"workdir": f"{prefix}/{i}", "app_id": apps[i % 2]} for i in range(6)]
    body[4]["parent_ids"] = [parent["id"]]
    created = api.ok("POST", "/jobs/", 201, json=body)
    assert [job["state"] for job in created] == ["STAGED_IN"] * 4 + ["AWAITING_PARENTS", "STAGED_IN"]
    for item, job in zip(body, created):
        stored = api.job(job["id"])
        assert stored == job and stored["app_id"] == item["app_id"]
        site_id = api.ok("GET", f"/apps/{item['app_id']}")["site_id"]
        listed = api.ok("GET", "/jobs/", params={"site_id": site_id, "workdir__contains": prefix})["results"]
        assert job["id"] in [j["id"] for j in listed]
        _defaults_but(stored, {k: v for k, v in item.items() if k not in ("workdir", "app_id")})
