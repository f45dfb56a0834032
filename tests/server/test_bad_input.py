"""Garbage in never gives a 500: every route answers 4xx naming the problem."""

from __future__ import annotations

import pytest

BIG = 2**70
JUNK_VALUES = [None, True, "text", -1, 0, BIG, -BIG, 1.5, [], {}, [1, "x"], {"k": {"nested": [1]}}]


@pytest.fixture
def world(api):
    site = api.site(transfer_locations={"a": "globus://x"})
    app = api.app(site["id"], transfers={"in": {"required": False, "direction": "in", "local_path": "f"}})
    job = api.jobs(app["id"], transfers={"in": "a:/x"})[0]
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    item = api.ok("GET", "/transfers/")["results"][0]
    return {"site": site, "app": app, "job": job, "bj": bj, "session": session, "item": item}


def assert_client_error(resp, what):
    assert 400 <= resp.status_code < 500, f"{what} -> {resp.status_code}: {resp.text[:300]}"
    body = resp.json()
    assert "detail" in body and body["detail"], what


def test_junk_fields_in_bodies(api, world):
    targets = [
        ("POST", "/sites/", {"name": "n", "path": "/p"}, ["name", "path", "allowed_queues", "backfill_windows", "queued_jobs", "transfer_locations", "allowed_projects"]),
        ("PUT", f"/sites/{world['site']['id']}", {}, ["name", "path", "optional_batch_job_params", "globus_endpoint_id"]),
        ("POST", "/apps/", {"site_id": world["site"]["id"], "name": "Z", "serialized_class": "", "source_code": ""}, ["site_id", "name", "parameters", "transfers"]),
        ("PUT", f"/apps/{world['app']['id']}", {}, ["name", "parameters", "transfers", "site_id"]),
        ("PUT", f"/jobs/{world['job']['id']}", {}, ["state", "tags", "num_nodes", "batch_job_id", "workdir", "return_code", "state_timestamp", "launch_params"]),
        ("POST", "/batch-jobs/", {"site_id": world["site"]["id"], "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 5, "job_mode": "mpi"},
         ["site_id", "num_nodes", "partitions", "filter_tags", "job_mode", "optional_params"]),
        ("PUT", f"/batch-jobs/{world['bj']['id']}", {}, ["state", "scheduler_id", "status_info", "start_time", "num_nodes"]),
        ("POST", "/sessions/", {"site_id": world["site"]["id"]}, ["site_id", "batch_job_id"]),
        ("POST", f"/sessions/{world['session']['id']}", {"max_num_jobs": 1, "filter_tags": {}}, ["max_num_jobs", "filter_tags", "states", "app_ids", "max_aggregate_nodes", "sort_by"]),
        ("PUT", f"/transfers/{world['item']['id']}", {}, ["state", "task_id", "transfer_info"]),
    ]
    for method, path, base, fields in targets:
        for field in fields:
            for value in JUNK_VALUES:
                body = {**base, field: value}
                resp = api.http.request(method, path, json=body)
                assert resp.status_code < 500, f"{method} {path} {field}={value!r} -> {resp.status_code}: {resp.text[:300]}"
    for method, path in (("POST", "/jobs/"), ("PATCH", "/jobs/"), ("PATCH", "/batch-jobs/"), ("PATCH", "/transfers/")):
        for value in JUNK_VALUES:
            for body in (value, [value], [{"id": value}], [{"id": world["job"]["id"], "app_id": value, "workdir": value}]):
                resp = api.http.request(method, path, json=body)
                assert resp.status_code < 500, f"{method} {path} {body!r} -> {resp.status_code}: {resp.text[:300]}"
                if resp.status_code >= 400:
                    assert_client_error(resp, f"{method} {path} {body!r}")


def test_integers_too_long_for_64_bits_inside_structured_fields_are_refused(api, world):
    """A long integer literal reaches the server's JSON parser as a float (2**80 -> 1.2e24), which
    the models used to turn into an integer no column or JSON document can store (a 500, found by
    the schemathesis fuzzing); a long digit string likewise."""
    site = f"/sites/{world['site']['id']}"
    for number in (-(2**81), 2**80, "-" + "9" * 30, 1e300):
        resp = api.http.put(site, json={"backfill_windows": {"q": [{"num_nodes": number, "wall_time_min": 5}]}})
        assert resp.status_code == 422, f"{number!r} -> {resp.status_code}: {resp.text[:300]}"
        (error,) = resp.json()["detail"]
        assert error["loc"] == ["body", "backfill_windows", "q", 0, "num_nodes"]
        assert "64 bits" in error["msg"]
    resp = api.http.put(site, json={"backfill_windows": {"q": [{"num_nodes": 2**62, "wall_time_min": 5.0}]}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["backfill_windows"] == {"q": [{"num_nodes": 2**62, "wall_time_min": 5}]}


def test_junk_query_and_path_parameters(api, world):
    for path, names in (("/jobs/", ["id", "parent_id", "app_id", "site_id", "batch_job_id", "state", "tags", "ordering", "limit", "offset"]),
                        ("/batch-jobs/", ["id", "scheduler_id", "state", "start_time_before", "filter_tags"]),
                        ("/events/", ["job_id", "timestamp_after", "data", "from_state"]),
                        ("/transfers/", ["job_id", "state", "direction", "site_id"]),
                        ("/sites/", ["id", "last_refresh_after"]), ("/apps/", ["site_id", "id"]), ("/sessions/", ["id"])):
        for name in names:
            for value in ("", "x", str(BIG), "-1", "1.5", "%00", "a:b:c", "🙂"):
                resp = api.http.get(path, params={name: value})
                assert resp.status_code < 500, f"GET {path}?{name}={value!r} -> {resp.status_code}: {resp.text[:300]}"
    for path in ("/jobs/", "/sites/", "/apps/", "/batch-jobs/", "/transfers/"):
        for value in (str(BIG), "-5", "abc", "0"):
            resp = api.http.get(f"{path}{value}")
            assert resp.status_code in (404, 422), (path, value, resp.status_code)


def test_a_one_value_filter_given_twice_is_refused_not_cut_to_its_last_value(api, world):
    """app_id=1&app_id=2 answered for app 2 only: a listing of part of what was asked, silently."""
    app_id = world["app"]["id"]
    for path, query in (("/jobs/", f"app_id={app_id}&app_id={app_id + 1}"), ("/jobs/", "state__ne=READY&state__ne=STAGED_IN"),
                        ("/events/", "to_state=READY&to_state=RUNNING"), ("/jobs/", "limit=5&limit=10")):
        resp = api.http.get(f"{path}?{query}")
        assert resp.status_code == 422 and "takes one value, got 2" in resp.text, (path, query, resp.text[:300])
    # List filters still take several values.
    assert api.http.get(f"/jobs/?id={world['job']['id']}&id=999999").status_code == 200


def test_a_tag_key_given_two_values_is_refused_not_cut_to_its_last_value(api, world):
    """tags=a:1&tags=a:2 answered for a:2 only (the last value won): a listing, count, update or
    delete of part of what was asked, silently. A tag has one value: 422 naming the key."""
    site_id, app_id = world["site"]["id"], world["app"]["id"]
    job_ids = [j["id"] for j in api.jobs(app_id, 2, tags={"exp": "2"})]
    two = "tags=exp:1&tags=exp:2"
    cases = [("GET", "/jobs/", two), ("PUT", "/jobs/", two), ("DELETE", "/jobs/", two), ("GET", "/events/", two),
             ("GET", "/events/", "data=k:1&data=k:2"), ("GET", "/transfers/", two),
             ("GET", "/batch-jobs/", "filter_tags=exp:1&filter_tags=exp:2"),
             ("GET", f"/sites/{site_id}/backlog", two)]
    for method, path, query in cases:
        body = {"state": "FAILED"} if method == "PUT" else None
        resp = api.http.request(method, f"{path}?{query}", json=body)
        assert resp.status_code == 422, (method, path, query, resp.status_code, resp.text[:300])
        text = resp.text
        assert "exp" in text or "'k'" in text, text
        assert "given twice with different values" in text, text
    detail = api.http.get(f"/jobs/?{two}").json()["detail"][0]
    assert detail["loc"] == ["query", "tags"], detail
    assert detail["msg"] == "key 'exp' given twice with different values (exp:1 and exp:2); give each key once", detail
    # Nothing was updated or deleted by the refused requests.
    jobs = api.ok("GET", "/jobs/", params=[("id", i) for i in job_ids])["results"]
    assert sorted(j["id"] for j in jobs) == sorted(job_ids) and all(j["state"] != "FAILED" for j in jobs)
    # The same pair twice is harmless; different keys still all must match.
    same = api.ok("GET", "/jobs/?tags=exp:2&tags=exp:2")
    assert sorted(j["id"] for j in same["results"]) == sorted(job_ids)
    assert api.ok("GET", "/jobs/?tags=exp:2&tags=other:1")["count"] == 0


def test_the_dashboard_filter_box_refuses_a_tag_key_given_two_values(api, world):
    """It showed "exp:1 exp:2" in its filter box but listed the exp:2 jobs."""
    import html
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))
    from dashboard_helpers import logged_in_client, text_of

    api.jobs(world["app"]["id"], 2, tags={"exp": "2"})
    client = logged_in_client(api.url, api.username, api.password)
    page = client.get("/dashboard/jobs", params={"tags": "exp:1 exp:2"})
    text = html.unescape(text_of(page.text))
    assert page.status_code == 422, text[:500]
    assert "key 'exp' given twice with different values (exp:1 and exp:2)" in text, text[:500]
    assert client.get("/dashboard/jobs", params={"tags": "exp:2 exp:2"}).status_code == 200
    plots = client.get("/dashboard/plots", params={"tags": "exp:1, exp:2"})
    assert plots.status_code == 422 and "given twice" in html.unescape(plots.text)


def test_nul_characters_are_refused_everywhere(api, world):
    """PostgreSQL text cannot hold NUL; both backends refuse it the same way, naming the field."""
    cases = [
        ("POST", "/sites/", {"name": "a\u0000b", "path": "/p"}, ["body", "name"]),
        ("POST", "/jobs/", [{"workdir": "w\u0000", "app_id": world["app"]["id"]}], ["body", 0, "workdir"]),
        ("PATCH", "/jobs/", [{"id": world["job"]["id"], "tags": {"k": "v\u0000"}}], ["body", 0, "tags", "k"]),
        ("PUT", f"/jobs/{world['job']['id']}", {"data": {"k\u0000": 1}}, ["body", "data", "k\u0000"]),
    ]
    for method, path, body, loc in cases:
        resp = api.http.request(method, path, json=body)
        assert resp.status_code == 422, (method, path, resp.text)
        assert resp.json()["detail"][0]["loc"] == loc
    resp = api.http.get("/jobs/", params={"tags": "k:\u0000"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "tags"]
    resp = api.http.post("/auth/password/login", data={"username": "x\u0000", "password": "y"})
    assert resp.status_code == 422
    # Escaped backslashes are ordinary text.
    assert api.ok("PUT", f"/jobs/{world['job']['id']}", json={"data": {"path": "C:\\u0000"}}) == 1


def test_path_limits_apply_to_the_fields_not_to_keys_of_free_form_json(api, world):
    """The 4,096-character limit of ``workdir``, site ``path`` and transfer paths applied to any key of
    that name, also inside ``data`` and the other free-form JSON values: ``data: {"path": <5000>}`` was
    refused (422) while ``data: {"notes": <5000>}`` was stored. There, every string has the 1 MiB limit."""
    long, app_id, job_id = "x" * 5000, world["app"]["id"], world["job"]["id"]
    free = {"path": long, "workdir": long, "local_path": long, "remote_path": long, "serialized_class": "c" * 300_000,
            "tags": {"k": long}, "nested": [{"path": long}], "source": {"workdir": long}}
    accepted = [
        ("POST", "/jobs/", [{"workdir": "free/1", "app_id": app_id, "data": free}]),
        ("POST", "/jobs/", [{"workdir": "free/2", "app_id": app_id, "data": {"path": long}, "tags": {"x": "y"},
                             "launch_params": {"path": long}}, {"workdir": "free/3", "app_id": app_id}]),
        ("PUT", f"/jobs/{job_id}", {"data": free, "launch_params": {"workdir": long}}),
        ("PATCH", "/jobs/", [{"id": job_id, "state": "STAGED_IN", "state_data": free}]),
        ("PUT", f"/sites/{world['site']['id']}", {"optional_batch_job_params": {"path": long}}),
        ("PUT", f"/batch-jobs/{world['bj']['id']}", {"status_info": {"path": long}}),
        ("PUT", f"/transfers/{world['item']['id']}", {"transfer_info": free}),
        ("POST", "/apps/", {"site_id": world["site"]["id"], "name": "Free", "serialized_class": "", "source_code": "",
                            "parameters": {"path": {"required": False, "default": long, "help": long}}}),
    ]
    for method, path, body in accepted:
        resp = api.http.request(method, path, json=body)
        assert resp.status_code < 300, f"{method} {path} -> {resp.status_code}: {resp.text[:300]}"
    assert api.job(job_id)["data"] == free
    # The fields themselves keep their limits, in every form of body.
    refused = [
        ("POST", "/jobs/", [{"workdir": "w/" + long, "app_id": app_id}], ["body", 0, "workdir"]),
        ("PUT", f"/jobs/{job_id}", {"workdir": "w/" + long}, ["body", "workdir"]),
        ("PUT", f"/sites/{world['site']['id']}", {"path": "/" + long}, ["body", "path"]),
        ("PUT", f"/apps/{world['app']['id']}", {"transfers": {"in": {"required": False, "direction": "in",
                                                                   "local_path": long}}},
         ["body", "transfers", "in", "local_path"]),
        ("POST", "/jobs/", [{"workdir": "t/1", "app_id": app_id, "transfers": {"in": {"location_alias": "a", "path": "/" + long}}}],
         ["body", 0, "transfers", "in", "path"]),
        ("PUT", f"/jobs/{job_id}", {"tags": {"k": "v" * 1025}}, ["body", "tags", "k"]),
    ]
    for method, path, body, loc in refused:
        resp = api.http.request(method, path, json=body)
        assert resp.status_code == 422, f"{method} {path} -> {resp.status_code}: {resp.text[:300]}"
        assert resp.json()["detail"][0]["loc"] == loc and "longer than" in resp.json()["detail"][0]["msg"], resp.text[:300]
