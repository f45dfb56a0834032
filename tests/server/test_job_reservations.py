"""``POST /jobs/reservations``: keys with job ids reserved for the chunks of one bulk create, so
that the chunks can be stored side by side and keep the ids in the order of the client's list."""

from __future__ import annotations

import uuid
from typing import Any

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
