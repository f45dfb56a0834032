"""A bulk create stores exactly what was sent (PostgreSQL writes the rows with COPY's text format:
every character that format treats specially must survive), answers what it stored, and writes
one created event per job, whatever mix of fields, apps and sites one request carries."""

from __future__ import annotations

#: Text that COPY's text format would misread unescaped: separators, backslash sequences, its NULL.
AWKWARD = "tab\there\nnewline\r\\N back\\slash \\. é 🚀 'quote\" ,;"


def test_awkward_values_round_trip(api, site_app):
    _site, app = site_app
    body = [
        {"workdir": "copy/tab\there", "app_id": app["id"], "serialized_parameters": AWKWARD,
         "tags": {"k\t1": AWKWARD, "\\N": "\\N"}, "data": {"nested": [AWKWARD, {"x": None, "y": 1.5, "z": [True, False]}],
                                                         "\\": "\\\\", "u": "\u2028\u00e9"},
         "launch_params": {"env": "A=1\tB=2"}, "serialized_return_value": AWKWARD, "serialized_exception": "\\N",
         "return_code": -(2**31), "gpus_per_rank": 0.125, "wall_time_min": 2**31 - 1, "pending_file_cleanup": False,
         "num_nodes": 3, "ranks_per_node": 2, "threads_per_rank": 4, "threads_per_core": 2, "node_packing_count": 5},
        {"workdir": "copy/plain", "app_id": app["id"]},  # every other field: its default
        {"workdir": "copy/nulls", "app_id": app["id"], "return_code": None, "batch_job_id": None, "gpus_per_rank": 2},
    ]
    created = api.ok("POST", "/jobs/", 201, json=body)
    for sent, answered in zip(body, created):
        stored = api.job(answered["id"])
        assert stored == answered
        for name, value in sent.items():
            assert stored[name] == value, name
    defaults = created[1]
    assert (defaults["tags"], defaults["data"], defaults["launch_params"], defaults["parent_ids"]) == ({}, {}, {}, [])
    assert (defaults["serialized_parameters"], defaults["return_code"], defaults["batch_job_id"]) == ("", None, None)
    assert (defaults["num_nodes"], defaults["gpus_per_rank"], defaults["pending_file_cleanup"]) == (1, 0.0, True)
    assert created[2]["gpus_per_rank"] == 2.0 and isinstance(created[2]["gpus_per_rank"], float)
    listed = api.ok("GET", "/jobs/", params={"tags": f"k\t1:{AWKWARD}"})
    assert [job["id"] for job in listed["results"]] == [created[0]["id"]]


def test_jobs_of_several_sites_in_one_request(api):
    apps = [api.app(api.site()["id"])["id"] for _ in range(2)]
    parent = api.jobs(apps[0])[0]
    body = [{"workdir": f"multi/{i}", "app_id": apps[i % 2], "parent_ids": [parent["id"]] if i == 2 else []}
            for i in range(4)]
    created = api.ok("POST", "/jobs/", 201, json=body)
    ids = [job["id"] for job in created]
    assert ids == sorted(ids) and [job["app_id"] for job in created] == [apps[0], apps[1], apps[0], apps[1]]
    assert [job["state"] for job in created] == ["STAGED_IN", "STAGED_IN", "AWAITING_PARENTS", "STAGED_IN"]
    for app_id in apps:
        site_id = api.ok("GET", f"/apps/{app_id}")["site_id"]
        listed = api.ok("GET", "/jobs/", params={"site_id": site_id, "workdir__contains": "multi/"})["results"]
        assert [job["id"] for job in listed] == [job["id"] for job in created if job["app_id"] == app_id]
    for job in created:
        events = api.events(job_id=job["id"])
        assert [(e["from_state"], e["to_state"], e["data"]) for e in events] == [("CREATED", job["state"], {})]
        assert events[0]["timestamp"] == job["last_update"]
