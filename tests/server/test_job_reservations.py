"""``POST /jobs/reservations``: keys with job ids reserved for the chunks of one bulk create, so
that the chunks can be stored side by side and keep the ids in the order of the client's list."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from server_testlib import Api, create_jobs_at_once

KEY = "Idempotency-Key"


def reserve(api: Api, sizes: list[int]) -> dict[str, Any]:
    return api.ok("POST", "/jobs/reservations", json={"sizes": sizes})


def jobs_body(app: dict, prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"workdir": f"{prefix}/{i}", "app_id": app["id"]} for i in range(n)]


def test_chunks_stored_in_any_order_get_the_ids_reserved_for_them(db_kind: str, api: Api,
                                                                  site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    answer = reserve(api, [3, 2])
    if db_kind == "sqlite":  # one writer at a time: nothing to gain, nothing reserved
        assert answer == {"parallel": 1, "reservations": []}
        return
    assert answer["parallel"] == 2
    first, second = answer["reservations"]
    assert (first["size"], second["size"]) == (3, 2)
    assert first["first_id"] < first["last_id"] < second["first_id"] <= second["last_id"]
    # The second chunk is stored first; the ids still follow the list.
    later = api.ok("POST", "/jobs/", 201, json=jobs_body(app, "b", 2), headers={KEY: second["idempotency_key"]})
    earlier = api.ok("POST", "/jobs/", 201, json=jobs_body(app, "a", 3), headers={KEY: first["idempotency_key"]})
    ids = [job["id"] for job in earlier + later]
    assert ids == sorted(ids) and ids[0] == first["first_id"] and ids[-1] == second["last_id"]
    assert [job["workdir"] for job in earlier] == ["a/0", "a/1", "a/2"]
    # A retry is answered with the same jobs; nothing is stored twice, created events included.
    again = api.ok("POST", "/jobs/", 201, json=jobs_body(app, "a", 3), headers={KEY: first["idempotency_key"]})
    assert [job["id"] for job in again] == ids[:3]
    assert api.ok("GET", "/jobs/", params={"app_id": app["id"], "limit": 0})["count"] == 5
    assert len(api.events(job_id=ids, from_state="CREATED")) == 5


def test_a_reserved_key_is_refused_for_another_size_or_another_route(db_kind: str, api: Api,
                                                                     site_app: tuple[dict, dict]) -> None:
    if db_kind == "sqlite":
        return  # nothing is reserved there (above)
    _site, app = site_app
    (block,) = reserve(api, [4])["reservations"]
    key = block["idempotency_key"]
    resp = api.http.post("/jobs/", json=jobs_body(app, "c", 3), headers={KEY: key})
    assert resp.status_code == 422 and "reserved for 4 jobs; the request has 3" in resp.text
    resp = api.http.post("/sites/", json={"name": f"s-{uuid.uuid4().hex[:6]}", "path": "/s"}, headers={KEY: key})
    assert resp.status_code == 422 and "already used for a different request" in resp.text
    # The refusals left the reservation as it was.
    made = api.ok("POST", "/jobs/", 201, json=jobs_body(app, "c", 4), headers={KEY: key})
    assert [job["id"] for job in made] == list(range(block["first_id"], block["last_id"] + 1))


def test_a_reserved_key_belongs_to_its_user(db_kind: str, api: Api, other_api: Api,
                                            site_app: tuple[dict, dict]) -> None:
    if db_kind == "sqlite":
        return
    _site, app = site_app
    (block,) = reserve(api, [2])["reservations"]
    other_site = other_api.site()
    other_app = other_api.app(other_site["id"])
    theirs = other_api.ok("POST", "/jobs/", 201, json=jobs_body(other_app, "o", 2),
                          headers={KEY: block["idempotency_key"]})
    assert not {job["id"] for job in theirs} & set(range(block["first_id"], block["last_id"] + 1))
    mine = api.ok("POST", "/jobs/", 201, json=jobs_body(app, "m", 2), headers={KEY: block["idempotency_key"]})
    assert [job["id"] for job in mine] == [block["first_id"], block["last_id"]]


def test_concurrent_sends_of_one_reserved_chunk_store_it_once(db_kind: str, api: Api,
                                                              site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    blocks = reserve(api, [300])["reservations"]
    if db_kind == "sqlite":
        assert blocks == []
        return
    key = blocks[0]["idempotency_key"]

    answers = create_jobs_at_once(api, jobs_body(app, "race", 300), key)
    assert all(answer == answers[0] for answer in answers)
    assert answers[0] == list(range(blocks[0]["first_id"], blocks[0]["last_id"] + 1))
    assert api.ok("GET", "/jobs/", params={"app_id": app["id"], "limit": 0})["count"] == 300


def test_bad_reservation_requests_are_refused_with_what_is_wrong(api: Api) -> None:
    for body, where in [({}, "sizes"), ({"sizes": []}, "sizes"), ({"sizes": [0]}, "sizes"),
                        ({"sizes": [5001]}, "sizes"), ({"sizes": [1] * 101}, "sizes"), ({"sizes": ["3"]}, "sizes"),
                        ({"sizes": [True]}, "sizes"), ([3], "sizes"), ({"sizes": [3], "x": 1}, "x")]:
        resp = api.http.post("/jobs/reservations", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["detail"][0]["loc"] == ["body", where], (body, resp.text)


def test_the_reservation_budget_refuses_more_while_other_users_still_create(db_kind: str, api: Api, other_api: Api,
                                                                            site_app: tuple[dict, dict]) -> None:
    """Before: any user could reserve 500,000 ids a request without end and use up the job id
    sequence that every user shares (then every create failed). Reserved ids not used yet now have
    a budget per user: two full reservations."""
    _site, app = site_app
    full = [5000] * 100  # the most one reservation takes
    if db_kind == "sqlite":
        for _ in range(3):
            assert reserve(api, full) == {"parallel": 1, "reservations": []}
        return  # SQLite reserves nothing, so nothing counts against a budget: never refused (above)
    first = reserve(api, full)["reservations"]
    reserve(api, full)
    resp = api.http.post("/jobs/reservations", json={"sizes": [1]})
    assert resp.status_code == 429, resp.text
    detail = resp.json()["detail"]
    assert "\n" not in detail and "per-user budget of 1,000,000 ids in 200 keys" in detail, detail
    assert "(1,000,000 ids in 200 keys)" in detail  # what is outstanding now
    assert int(resp.headers["Retry-After"]) > 3600  # the reservations expire with the keys (24 h)
    # Another user is not affected: they create jobs and reserve as before.
    other_site = other_api.site()
    other_app = other_api.app(other_site["id"])
    assert len(other_api.ok("POST", "/jobs/", 201, json=jobs_body(other_app, "o", 3))) == 3
    assert len(reserve(other_api, [5000] * 10)["reservations"]) == 10
    # Nor is this user's own plain create; and a reservation taken frees its share of the budget.
    api.ok("POST", "/jobs/", 201, json=jobs_body(app, "plain", 2))
    made = api.ok("POST", "/jobs/", 201, json=jobs_body(app, "k", 5000), headers={KEY: first[0]["idempotency_key"]})
    assert made[0]["id"] == first[0]["first_id"]
    assert len(reserve(api, [5000])["reservations"]) == 1
    assert api.http.post("/jobs/reservations", json={"sizes": [1]}).status_code == 429


def test_the_key_budget_counts_small_chunks_too(db_kind: str, api: Api) -> None:
    if db_kind == "sqlite":
        pytest.skip("SQLite reserves nothing, so nothing counts against a budget")
    reserve(api, [1] * 100)
    reserve(api, [1] * 100)
    resp = api.http.post("/jobs/reservations", json={"sizes": [1]})
    assert resp.status_code == 429 and "(200 ids in 200 keys)" in resp.text, resp.text


def test_bulk_create_sends_the_chunks_one_by_one_when_the_budget_refuses(balsam_env_pg: Any, tmp_path: Any,
                                                                         monkeypatch: Any, requests_in_flight: dict) -> None:
    """A user at the budget is never broken: bulk_create falls back to one chunk after the other,
    and asks again next time (a refusal is not remembered as "this server reserves nothing")."""
    import httpx

    from balsam._api import models
    from balsam.api import ApplicationDefinition, Job, Site

    http = httpx.Client(base_url=balsam_env_pg.url, headers=balsam_env_pg.headers(), timeout=120)
    for _ in range(2):
        assert http.post("/jobs/reservations", json={"sizes": [5000] * 100}).status_code == 200
    assert http.post("/jobs/reservations", json={"sizes": [5]}).status_code == 429
    site = Site.objects.create(name=f"budget-{uuid.uuid4().hex[:8]}", path=str(tmp_path / "site"))
    app = type("Budget", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ i }}"})
    app.sync()
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 5)
    state = requests_in_flight  # the requests before this point went one at a time
    client = Job._get_client()
    for round_ in range(2):
        jobs = [Job(workdir=f"b{round_}/{i}", app_id=app.__app_id__, parameters={"i": i}) for i in range(12)]
        created = Job.objects.bulk_create(jobs)
        assert [str(job.workdir) for job in created] == [f"b{round_}/{i}" for i in range(12)]
        ids = [job.id for job in created]
        assert ids == sorted(ids) and len(set(ids)) == 12
    assert client.request_counts["POST /jobs/reservations"] == 2  # refused at once (no retries), asked each time
    assert client.request_counts["POST /jobs/"] == 6 and state["most"] == 1  # one chunk at a time
    http.close()


def test_bulk_create_takes_a_refused_reservation_as_one_chunk_at_a_time(balsam_env: Any, tmp_path: Any,
                                                                         monkeypatch: Any) -> None:
    """The client alone (the refusal made up, any backend): a 429 of ``POST /jobs/reservations`` is
    no error of the bulk create (before: BulkCreateError, nothing created)."""
    from balsam._api import models
    from balsam.api import ApplicationDefinition, Job, Site
    from balsam.client import APIError, RESTClient

    site = Site.objects.create(name=f"refused-{uuid.uuid4().hex[:8]}", path=str(tmp_path / "site"))
    app = type("Refused", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ i }}"})
    app.sync()
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 4)
    real_post = RESTClient.post
    asked: list[str] = []

    def budget_refused(self: Any, path: str, json: Any = None, **kwargs: Any) -> Any:
        if path.endswith("/reservations"):
            asked.append(path)
            raise APIError("POST", path, 429, "Reservation refused: ... per-user budget ...")
        return real_post(self, path, json, **kwargs)

    monkeypatch.setattr(RESTClient, "post", budget_refused)
    for round_ in range(2):
        created = Job.objects.bulk_create([Job(workdir=f"r{round_}/{i}", app_id=app.__app_id__, parameters={"i": i})
                                           for i in range(10)])
        assert [str(job.workdir) for job in created] == [f"r{round_}/{i}" for i in range(10)]
        assert [job.id for job in created] == sorted(job.id for job in created)
    assert asked == ["/jobs/reservations"] * 2  # asked again by the next bulk create
