"""A 422 that lists its first ``MAX_REPORTED_ERRORS`` problems counts the others in a last item.

- That item's ``loc`` was ``["body"]`` whatever the problems were of, which a client reads as a
  refusal of the whole call: a bulk PATCH with one item of 150 unknown fields was split in halves
  (about 2 log2(n) calls) to find the item. Its loc is now the part of the request all the
  problems share, ``["body", 3]`` for item 3's, and the client refuses that item and sends the
  others again at once (2 calls).
- The Python client's error text counted the items of the answer ("(+91 more)" of 40,000).
- The size limits (strings, keys, 64-bit integers), NUL characters and a session heartbeat's or
  release's job ids listed the first 20 problems and no count of the others. They list the first
  100 and say there are more, not how many: their walks stop at the first problem past those
  listed (walking on to count them cost a 64 MiB body up to 18 times a valid one's walk, and a
  body of NUL strings 3 times what it cost before they were counted), and a bulk create's yes/no
  checks of a job's ``data`` stop at its first problem (a bad ``data`` was walked whole 3 times)."""

from __future__ import annotations

import pytest
from server_testlib import Api

from balsam.client.rest import APIError
from balsam.client.status_updater import isolate_refused

#: balsam.server.errors.MAX_REPORTED_ERRORS (spelled out: the test reads the answer, not the code)
MAX_REPORTED_ERRORS = 100


def _counted(detail: list) -> int:
    """The problems an answer lists and counts (its last item: "and N more problems ...")."""
    words = detail[-1]["msg"].split()
    assert words[0] == "and" and words[2:4] == ["more", "problems"], detail[-1]
    return len(detail) - 1 + int(words[1])


#: The last item of an answer whose walk stopped after the problems it lists.
NOT_CHECKED = f"and more problems (the first {MAX_REPORTED_ERRORS} are listed; the rest were not checked)"


def test_a_bulk_patch_refuses_the_one_item_with_many_problems_in_2_calls(api: Api) -> None:
    site = api.site()
    ids = [job["id"] for job in api.jobs(api.app(site["id"])["id"], 8)]
    items = [{"id": job_id, "tags": {"seen": "yes"}} for job_id in ids]
    items[3] = {"id": ids[3], **{f"unknown_{i}": 1 for i in range(150)}}
    calls: list[int] = []

    def send(chunk: list) -> None:
        calls.append(len(chunk))
        resp = api.http.patch("/jobs/", json=chunk)
        if resp.status_code >= 400:
            raise APIError("PATCH", "/jobs/", resp.status_code, resp.json()["detail"])

    refused = isolate_refused(send, items)
    assert calls == [8, 7], calls  # before: [8, 4, 2, 2, 1, 1, 4]: the call split in halves
    ((item, error),) = refused
    assert item is items[3]
    assert isinstance(error, APIError) and error.detail[-1]["loc"] == ["body", 0], error.detail[-1]
    assert all(api.job(job_id)["tags"] == {"seen": "yes"} for job_id in ids if job_id != ids[3])

    detail = api.http.patch("/jobs/", json=items).json()["detail"]
    assert len(detail) == MAX_REPORTED_ERRORS + 1 and detail[-1]["loc"] == ["body", 3], detail[-1]
    assert _counted(detail) == 150


def test_the_clients_error_text_counts_every_problem(api: Api) -> None:
    site = api.site()
    resp = api.http.put(f"/sites/{site['id']}", json={"queued_jobs": {f"q{i}": {} for i in range(5000)}})
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    total = _counted(detail)
    assert total >= 5000
    text = str(APIError("PUT", f"/sites/{site['id']}", 422, detail))
    assert text.endswith(f"(+{total - 10:,} more)"), text[-80:]  # before: "(+91 more)"
    assert text.count("queued_jobs.q") == 10


@pytest.mark.parametrize("problem", ["int64", "nul"])
def test_size_and_nul_problems_are_listed_and_the_rest_not_walked(api: Api, problem: str) -> None:
    site = api.site()
    (job,) = api.jobs(api.app(site["id"])["id"], 1)
    value = 2**64 - 1 if problem == "int64" else "a\u0000b"
    resp = api.http.put(f"/jobs/{job['id']}", json={"data": {f"k{i}": value for i in range(150)}})
    assert resp.status_code == 422, resp.text[:300]
    detail = resp.json()["detail"]
    assert len(detail) == MAX_REPORTED_ERRORS + 1, len(detail)  # at first: 20, no count
    assert detail[0]["loc"] == ["body", "data", "k0"], detail[0]
    # Where the walk stopped, "data" is the body's last field: all the rest is in it.
    assert detail[-1] == {"loc": ["body", "data"], "msg": NOT_CHECKED, "type": "value_error"}, detail[-1]
    assert api.job(job["id"])["data"] == job["data"]  # nothing stored
    # With a field after "data", what was not walked may be anywhere in the body.
    resp = api.http.put(f"/jobs/{job['id']}", json={"data": {f"k{i}": value for i in range(150)}, "tags": {}})
    assert resp.json()["detail"][-1] == {"loc": ["body"], "msg": NOT_CHECKED, "type": "value_error"}
    # Exactly one past those listed, and nothing after it: counted.
    resp = api.http.put(f"/jobs/{job['id']}", json={"data": {f"k{i}": value for i in range(101)}})
    detail = resp.json()["detail"]
    assert detail[-1]["loc"] == ["body", "data"] and _counted(detail) == 101, detail[-1]


@pytest.mark.parametrize("how", ["heartbeat", "release"])
def test_a_sessions_bad_job_ids_are_listed_up_to_the_cap(api: Api, how: str) -> None:
    site = api.site()
    session = api.ok("POST", "/sessions/", status=201, json={"site_id": site["id"]})["id"]
    path = f"/sessions/{session}" + ("/release" if how == "release" else "")
    method = "PUT" if how == "heartbeat" else "POST"
    resp = api.http.request(method, path, json={"job_ids": ["x"] * 150})
    assert resp.status_code == 422, resp.text[:300]
    detail = resp.json()["detail"]
    assert len(detail) == MAX_REPORTED_ERRORS + 1, len(detail)  # at first: 20, no count
    assert detail[-1] == {"loc": ["body", "job_ids"], "msg": NOT_CHECKED, "type": "value_error"}, detail[-1]


def test_a_count_of_the_whole_body_still_refuses_only_the_items_listed() -> None:
    """A count at ``["body"]`` (problems of several items, or a server of af4047a, which put every
    count there): the items listed are refused and the others sent again, not the call halved."""
    from balsam.client.status_updater import _refused_positions

    listed = [{"loc": ["body", 2, f"f{i}"], "msg": "unknown field", "type": "value_error"} for i in range(100)]
    count = {"loc": ["body"], "msg": "and 50 more problems (the first 100 are listed)", "type": "value_error"}
    assert _refused_positions(APIError("PATCH", "/jobs/", 422, listed + [count]), 8) == {2}
    # Anything else at ["body"] is a refusal of the call as a whole, as before.
    whole = {"loc": ["body"], "msg": "expected a JSON list of jobs", "type": "value_error"}
    assert _refused_positions(APIError("PATCH", "/jobs/", 422, listed + [whole]), 8) == set()
    assert _refused_positions(APIError("PATCH", "/jobs/", 422, [count]), 8) == set()
    # The count of a walk that stopped (no number) is read the same way.
    stopped = {"loc": ["body"], "msg": NOT_CHECKED, "type": "value_error"}
    assert _refused_positions(APIError("PATCH", "/jobs/", 422, listed + [stopped]), 8) == {2}
    text = str(APIError("PATCH", "/jobs/", 422, listed + [stopped]))
    assert text.endswith("; 2.f9: unknown field; (+90 more, and others not checked)"), text[-80:]


def test_a_bad_body_is_walked_only_up_to_the_problems_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk create whose job's ``data`` holds a problem in each of its 1,000 values: its yes/no
    checks (jobs_logic's fast path) stop at the first problem, the walk that collects them at the
    first past those listed. Before: the whole value was walked three times (3,000 visits)."""
    from balsam.server import jobs_logic, limits
    from balsam.server.errors import APIError as ServerError

    visits = []
    walk = limits._walk_json

    def counted(value, loc, errors):  # type: ignore[no-untyped-def]
        visits.append(1)
        walk(value, loc, errors)

    monkeypatch.setattr(limits, "_walk_json", counted)  # (it recurses through the module's name)
    payload = [{"app_id": 1, "workdir": "w", "data": {f"k{i}": {"v": 2**64} for i in range(1000)}}]
    with pytest.raises(ServerError) as raised:
        jobs_logic.parse_job_creates(payload)
    detail = raised.value.body()["detail"]
    assert detail[-1] == {"loc": ["body", 0, "data"], "msg": NOT_CHECKED, "type": "value_error"}, detail[-1]
    assert len(visits) < 150, len(visits)  # 101 values walked to collect, 2 to say no
