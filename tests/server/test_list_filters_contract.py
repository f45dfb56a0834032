"""The query parameters of every listing route (GET /jobs/, /batch-jobs/, /sites/, /apps/, /events/,
/transfers/, /sessions/) against Balsam 0.7's contract and against each other, on a real server
(SQLite and PostgreSQL):

- every filter narrows the listing to exactly the records it names (a filter accepted and
  ignored answered every record), in the repeated form 0.7's clients send (``state=a&state=b``);
- a list filter takes the comma form (``state=a,b``) wherever ``id=1,2`` is taken: ``state=`` of
  /jobs/, /batch-jobs/ and /transfers/ was refused (422) where every id list took it;
- bad values, unknown names and out-of-range pages are one-line 422s naming the parameter, whether
  anything matches or not (``ordering=nope`` answered 200 to a user without jobs, and a query
  delete with it deleted every match), on the jobs' PUT and DELETE by filter as on the listing;
- substring filters match case-sensitively on SQLite too (its LIKE folds ASCII case);
- every ordering sorts; the Python API's filter keywords are the routes' filters."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest
from server_testlib import Api

LISTINGS = ["/jobs/", "/batch-jobs/", "/sites/", "/apps/", "/events/", "/transfers/", "/sessions/"]


def _ids(api: Api, path: str, params: Any) -> set[int]:
    body = api.ok("GET", path, params=params)
    ids = {record["id"] for record in body["results"]}
    assert body["count"] == len(ids), (path, params, body["count"], ids)
    return ids


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _instant() -> str:
    """A moment strictly between what came before and what comes after (the databases keep
    microseconds; a few milliseconds either side)."""
    time.sleep(0.02)
    mark = _now()
    time.sleep(0.02)
    return mark


@pytest.fixture
def world(api: Api) -> dict[str, Any]:
    """Two sites, three apps, jobs differing in every filtered field, BatchJobs, transfer items,
    events and sessions of one user: the ids of each, by name."""
    u = uuid.uuid4().hex[:8]
    w: dict[str, Any] = {"u": u}
    a = api.site(f"alpha-{u}", transfer_locations={"loc": "globus://ep"})
    w["t_sites"] = _instant()
    b = api.site(f"beta-{u}", transfer_locations={"loc": "globus://ep"})
    w["site_a"], w["site_b"] = a["id"], b["id"]
    slots = {"inp": {"required": False, "direction": "in", "local_path": "in.txt", "description": "", "recursive": False},
             "outp": {"required": False, "direction": "out", "local_path": "out.txt", "description": "", "recursive": False}}
    w["app_a1"] = api.app(a["id"], "Hello", transfers=slots)["id"]
    w["app_a2"] = api.app(a["id"], "World")["id"]
    w["app_b1"] = api.app(b["id"], "Hello")["id"]
    w["bj_a"] = api.ok("POST", "/batch-jobs/", 201, json={
        "site_id": a["id"], "project": "p", "queue": "debug", "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi",
        "filter_tags": {"x": "1"}})["id"]
    w["bj_b"] = api.ok("POST", "/batch-jobs/", 201, json={
        "site_id": b["id"], "project": "p", "queue": "prod", "num_nodes": 2, "wall_time_min": 30, "job_mode": "mpi"})["id"]
    w["bj_c"] = api.ok("POST", "/batch-jobs/", 201, json={
        "site_id": a["id"], "project": "p", "queue": "prod", "num_nodes": 2, "wall_time_min": 30, "job_mode": "serial"})["id"]
    api.ok("PATCH", "/batch-jobs/", json=[{"id": w["bj_a"], "state": "queued", "scheduler_id": 111}])
    w["t_bj0"] = _instant()
    api.ok("PATCH", "/batch-jobs/", json=[{"id": w["bj_b"], "state": "running", "scheduler_id": 222, "start_time": _now()}])
    w["t_bj1"] = _instant()
    api.ok("PATCH", "/batch-jobs/", json=[{"id": w["bj_c"], "state": "running", "start_time": _now()}])
    api.ok("PATCH", "/batch-jobs/", json=[{"id": w["bj_c"], "state": "finished", "end_time": _now()}])
    w["t_bj2"] = _instant()
    api.ok("PATCH", "/batch-jobs/", json=[{"id": w["bj_b"], "state": "finished", "end_time": _now()}])
    # Jobs: j1, j2 of app a1 (j2 with transfer items), j3 child of j1 (app a2), j4 on site b.
    j1, j2 = api.ok("POST", "/jobs/", 201, json=[
        {"workdir": f"wa-{u}/one", "app_id": w["app_a1"], "tags": {"k": "a", "n": "1"}, "batch_job_id": w["bj_a"]},
        {"workdir": f"wa-{u}/two", "app_id": w["app_a1"], "tags": {"k": "b"}, "pending_file_cleanup": False,
         "transfers": {"inp": "loc:/remote/in.txt", "outp": "loc:/remote/out.txt"}}])
    (j3,) = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"wa-{u}/three", "app_id": w["app_a2"], "tags": {"k": "a"},
                                                 "parent_ids": [j1["id"]]}])
    (j4,) = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"wb-{u}/four", "app_id": w["app_b1"], "tags": {"k": "c"},
                                                 "batch_job_id": w["bj_b"]}])
    w.update(j1=j1["id"], j2=j2["id"], j3=j3["id"], j4=j4["id"])
    assert [j["state"] for j in (j1, j2, j3, j4)] == ["STAGED_IN", "READY", "AWAITING_PARENTS", "STAGED_IN"]
    w["t_jobs"] = _instant()
    api.ok("PATCH", "/jobs/", json=[{"id": j1["id"], "state": "PREPROCESSED", "state_data": {"why": "test"}},
                                    {"id": j4["id"], "state": "PREPROCESSED"}])
    w["transfers"] = {item["direction"]: item["id"] for item in api.ok("GET", "/transfers/")["results"]}
    assert set(w["transfers"]) == {"in", "out"}
    w["sess_a"] = api.ok("POST", "/sessions/", 201, json={"site_id": a["id"]})["id"]
    w["sess_b"] = api.ok("POST", "/sessions/", 201, json={"site_id": b["id"], "batch_job_id": w["bj_b"]})["id"]
    return w


def _cases(w: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]], set[int]]]:
    """(route, parameters, the ids they must answer exactly). Events are named by job and state:
    their ids are looked up."""
    j1, j2, j3, j4 = w["j1"], w["j2"], w["j3"], w["j4"]
    t_in, t_out = w["transfers"]["in"], w["transfers"]["out"]
    return [
        ("/jobs/", [("id", j1), ("id", j3)], {j1, j3}),
        ("/jobs/", [("parent_id", j1)], {j3}),
        ("/jobs/", [("app_id", w["app_a1"])], {j1, j2}),
        ("/jobs/", [("site_id", w["site_b"])], {j4}),
        ("/jobs/", [("site_id", w["site_a"]), ("site_id", w["site_b"])], {j1, j2, j3, j4}),
        ("/jobs/", [("batch_job_id", w["bj_a"])], {j1}),
        ("/jobs/", [("last_update_after", w["t_jobs"])], {j1, j4}),
        ("/jobs/", [("last_update_before", w["t_jobs"])], {j2, j3}),
        ("/jobs/", [("workdir__contains", "/t")], {j2, j3}),
        # Case-sensitive on both databases, as PostgreSQL's LIKE and 0.7: SQLite's LIKE folds ASCII case
        # (before: "/T" matched j2 and j3 there, and a DELETE /jobs/?workdir__contains=/T deleted them).
        ("/jobs/", [("workdir__contains", "/T")], set()),
        ("/jobs/", [("workdir__contains", "/Th")], set()),
        ("/jobs/", [("state__ne", "READY")], {j1, j3, j4}),
        ("/jobs/", [("state", "READY")], {j2}),
        ("/jobs/", [("state", "READY"), ("state", "AWAITING_PARENTS")], {j2, j3}),
        ("/jobs/", [("tags", "k:a")], {j1, j3}),
        ("/jobs/", [("tags", "k:a"), ("tags", "n:1")], {j1}),
        ("/jobs/", [("pending_file_cleanup", "false")], {j2}),
        ("/jobs/", [("id__gt", j2)], {j3, j4}),
        ("/batch-jobs/", [("id", w["bj_a"]), ("id", w["bj_b"])], {w["bj_a"], w["bj_b"]}),
        ("/batch-jobs/", [("site_id", w["site_b"])], {w["bj_b"]}),
        ("/batch-jobs/", [("state", "queued")], {w["bj_a"]}),
        ("/batch-jobs/", [("state", "queued"), ("state", "finished")], {w["bj_a"], w["bj_b"], w["bj_c"]}),
        ("/batch-jobs/", [("scheduler_id", 222)], {w["bj_b"]}),
        ("/batch-jobs/", [("queue", "prod")], {w["bj_b"], w["bj_c"]}),
        ("/batch-jobs/", [("start_time_after", w["t_bj1"])], {w["bj_c"]}),
        ("/batch-jobs/", [("start_time_before", w["t_bj1"])], {w["bj_b"]}),
        ("/batch-jobs/", [("end_time_after", w["t_bj2"])], {w["bj_b"]}),
        ("/batch-jobs/", [("end_time_before", w["t_bj2"])], {w["bj_c"]}),
        ("/batch-jobs/", [("filter_tags", "x:1")], {w["bj_a"]}),
        ("/batch-jobs/", [("id__gt", w["bj_a"])], {w["bj_b"], w["bj_c"]}),
        ("/sites/", [("name", f"beta-{w['u']}")], {w["site_b"]}),
        ("/sites/", [("path", f"alpha-{w['u']}")], {w["site_a"]}),
        ("/sites/", [("path", f"ALPHA-{w['u']}")], set()),
        ("/sites/", [("id", w["site_a"])], {w["site_a"]}),
        ("/sites/", [("last_refresh_after", w["t_sites"])], {w["site_b"]}),
        ("/apps/", [("site_id", w["site_a"])], {w["app_a1"], w["app_a2"]}),
        ("/apps/", [("id", w["app_a2"]), ("id", w["app_b1"])], {w["app_a2"], w["app_b1"]}),
        ("/apps/", [("name", "Hello")], {w["app_a1"], w["app_b1"]}),
        ("/apps/", [("site_path", f"beta-{w['u']}")], {w["app_b1"]}),
        ("/apps/", [("site_path", f"Beta-{w['u']}")], set()),
        ("/apps/", [("site_name", f"alpha-{w['u']}")], {w["app_a1"], w["app_a2"]}),
        ("/transfers/", [("id", t_in)], {t_in}),
        ("/transfers/", [("site_id", w["site_a"])], {t_in, t_out}),
        ("/transfers/", [("site_id", w["site_b"])], set()),
        ("/transfers/", [("job_id", j2)], {t_in, t_out}),
        ("/transfers/", [("job_id", j1)], set()),
        ("/transfers/", [("state", "awaiting_job")], {t_out}),
        ("/transfers/", [("state", "pending"), ("state", "awaiting_job")], {t_in, t_out}),
        ("/transfers/", [("direction", "in")], {t_in}),
        ("/transfers/", [("job_state", "READY")], {t_in, t_out}),
        ("/transfers/", [("job_state", "RUNNING")], set()),
        ("/transfers/", [("tags", "k:b")], {t_in, t_out}),
        ("/transfers/", [("tags", "k:a")], set()),
        ("/transfers/", [("id__gt", t_in)], {t_out} if t_out > t_in else set()),
        ("/sessions/", [("id", w["sess_b"])], {w["sess_b"]}),
    ]


def _event_ids(events: list[dict], **match: Any) -> set[int]:
    return {e["id"] for e in events if all(e[k] == v for k, v in match.items())}


def test_every_filter_narrows_the_listing_to_what_it_names(api: Api, world: dict[str, Any]) -> None:
    w = world
    narrowed: dict[tuple[str, str], bool] = {}
    for path, params, expected in _cases(w):
        everything = _ids(api, path, {})
        got = _ids(api, path, params)
        assert got == expected, (path, params, sorted(got), sorted(expected))
        key = (path, params[0][0])
        narrowed[key] = narrowed.get(key, False) or got < everything
    # Each filter narrowed the listing in some case (else the test's data would not show it ignored).
    assert [key for key, yes in narrowed.items() if not yes] == []
    # A filter that must narrow each: every job's events against each filter of /events/.
    events = api.ok("GET", "/events/")["results"]
    every = _event_ids(events)
    j1, j4 = w["j1"], w["j4"]
    event_cases = [
        ([("job_id", j1)], _event_ids(events, job_id=j1)),
        ([("job_id", j1), ("job_id", j4)], _event_ids(events, job_id=j1) | _event_ids(events, job_id=j4)),
        ([("site_id", w["site_b"])], _event_ids(events, job_id=j4)),
        ([("batch_job_id", w["bj_b"])], _event_ids(events, job_id=j4)),
        ([("scheduler_id", 111)], _event_ids(events, job_id=j1)),
        ([("tags", "k:c")], _event_ids(events, job_id=j4)),
        ([("data", "why:test")], _event_ids(events, job_id=j1, to_state="PREPROCESSED")),
        ([("from_state", "STAGED_IN")], _event_ids(events, from_state="STAGED_IN")),
        ([("to_state", "PREPROCESSED")], _event_ids(events, to_state="PREPROCESSED")),
        ([("timestamp_after", w["t_jobs"])], _event_ids(events, to_state="PREPROCESSED")),
        ([("timestamp_before", w["t_jobs"])], every - _event_ids(events, to_state="PREPROCESSED")),
    ]
    some = sorted(every)[:2]
    event_cases.append(([("id", some[0]), ("id", some[1])], set(some)))
    event_cases.append(([("id__gt", some[0])], every - {some[0]}))
    for params, expected in event_cases:
        assert expected and expected < every, (params, expected, every)
        assert _ids(api, "/events/", params) == expected, params


#: Every list filter of every listing, and a value list for it of the world (see _comma_values).
LIST_FILTERS = [("/jobs/", "id"), ("/jobs/", "parent_id"), ("/jobs/", "site_id"), ("/jobs/", "state"),
                ("/batch-jobs/", "id"), ("/batch-jobs/", "site_id"), ("/batch-jobs/", "state"),
                ("/sites/", "id"), ("/apps/", "id"), ("/apps/", "site_id"),
                ("/events/", "id"), ("/events/", "job_id"), ("/events/", "site_id"), ("/events/", "batch_job_id"),
                ("/transfers/", "id"), ("/transfers/", "job_id"), ("/transfers/", "site_id"), ("/transfers/", "state"),
                ("/sessions/", "id")]


def _comma_values(w: dict[str, Any], path: str, name: str) -> list[Any]:
    if name == "state":
        return {"/jobs/": ["READY", "AWAITING_PARENTS"], "/batch-jobs/": ["queued", "finished"],
                "/transfers/": ["pending", "awaiting_job"]}[path]
    if name == "site_id":
        return [w["site_a"], w["site_b"]]
    if name == "parent_id":
        return [w["j1"], w["j2"]]
    if name == "job_id":
        return [w["j1"], w["j2"], w["j4"]]
    if name == "batch_job_id":
        return [w["bj_a"], w["bj_b"]]
    ids = {"/jobs/": [w["j1"], w["j3"]], "/batch-jobs/": [w["bj_a"], w["bj_c"]], "/sites/": [w["site_a"], w["site_b"]],
           "/apps/": [w["app_a1"], w["app_b1"]], "/transfers/": sorted(w["transfers"].values()),
           "/sessions/": [w["sess_a"], w["sess_b"]]}
    if path == "/events/":
        return [-1]  # filled in by the test (the events' ids)
    return ids[path]


def test_list_filters_take_the_repeated_and_the_comma_form_alike(api: Api, world: dict[str, Any]) -> None:
    """Before: ``state=READY,AWAITING_PARENTS`` (and the batch-jobs' and transfers' state) answered
    422 "expected one of ...; got 'READY,AWAITING_PARENTS'" where ``id=1,2`` answered 200."""
    w = world
    event_ids = sorted(e["id"] for e in api.ok("GET", "/events/")["results"])
    for path, name in LIST_FILTERS:
        values = event_ids[:2] if (path, name) == ("/events/", "id") else _comma_values(w, path, name)
        repeated = _ids(api, path, [(name, v) for v in values])
        assert repeated, (path, name)
        comma = api.http.get(path, params={name: ",".join(str(v) for v in values)})
        assert comma.status_code == 200, (path, name, comma.status_code, comma.text[:300])
        assert {r["id"] for r in comma.json()["results"]} == repeated, (path, name)
        # Both forms together, with blanks around the commas: the union.
        mixed = _ids(api, path, [(name, f"{values[0]} , "), (name, ",".join(str(v) for v in values[1:]))])
        assert mixed == repeated, (path, name)
    # The site's backlog takes the same state lists.
    backlog = f"/sites/{w['site_a']}/backlog"
    repeated = api.ok("GET", backlog, params=[("state", "READY"), ("state", "AWAITING_PARENTS")])["states"]
    assert set(repeated) == {"READY", "AWAITING_PARENTS"}
    assert api.ok("GET", backlog, params={"state": "READY,AWAITING_PARENTS"})["states"] == repeated
    # With a time range (a few jobs in a recent range are read by their own path, which reads the
    # states itself: reverted to the repeated form only, it answered 422 on SQLite).
    ranged = [("last_update_after", w["t_jobs"])]
    repeated = _ids(api, "/jobs/", ranged + [("state", "PREPROCESSED"), ("state", "READY")])
    assert repeated and _ids(api, "/jobs/", ranged + [("state", "PREPROCESSED,READY")]) == repeated
    # The jobs' counts (the counters answer state and site filters) and the query update read it too.
    assert api.ok("GET", "/jobs/", params={"state": "READY,AWAITING_PARENTS", "limit": 0})["count"] == 2
    assert api.ok("GET", "/jobs/", params={"state": "READY,AWAITING_PARENTS", "site_id": w["site_a"]})["count"] == 2
    assert api.ok("PUT", "/jobs/", params={"state": "READY,AWAITING_PARENTS", "tags": "k:a"}, json={"data": {"s": 1}}) == 1
    assert api.job(w["j3"])["data"] == {"s": 1}


def _one_line_422(resp: Any, name: str) -> str:
    assert resp.status_code == 422, (resp.status_code, resp.text[:300])
    [item] = resp.json()["detail"]
    assert item["loc"] == ["query", name] and "\n" not in item["msg"], item
    return item["msg"]


BAD_VALUES = [
    ("/jobs/", "id", "x"), ("/jobs/", "id", "1,x"), ("/jobs/", "parent_id", "1.5"), ("/jobs/", "app_id", "a"),
    ("/jobs/", "site_id", "s"), ("/jobs/", "batch_job_id", "b"), ("/jobs/", "last_update_after", "yesterday"),
    ("/jobs/", "last_update_before", "2024-13-01"), ("/jobs/", "state__ne", "BOGUS"), ("/jobs/", "state", "BOGUS"),
    ("/jobs/", "state", "READY,BOGUS"), ("/jobs/", "tags", "k"), ("/jobs/", "tags", ":v"),
    ("/jobs/", "pending_file_cleanup", "maybe"), ("/jobs/", "ordering", "nope"),
    ("/batch-jobs/", "id", "x"), ("/batch-jobs/", "site_id", "x"), ("/batch-jobs/", "state", "bogus"),
    ("/batch-jobs/", "state", "queued,bogus"), ("/batch-jobs/", "scheduler_id", "x"),
    ("/batch-jobs/", "start_time_before", "x"), ("/batch-jobs/", "start_time_after", "x"),
    ("/batch-jobs/", "end_time_before", "x"), ("/batch-jobs/", "end_time_after", "x"),
    ("/batch-jobs/", "filter_tags", "k"), ("/batch-jobs/", "ordering", "nope"),
    ("/sites/", "id", "x"), ("/sites/", "last_refresh_after", "x"),
    ("/apps/", "id", "x"), ("/apps/", "site_id", "x"),
    ("/events/", "id", "x"), ("/events/", "job_id", "x"), ("/events/", "site_id", "x"), ("/events/", "batch_job_id", "x"),
    ("/events/", "scheduler_id", "x"), ("/events/", "tags", "k"), ("/events/", "data", "k"),
    ("/events/", "timestamp_before", "x"), ("/events/", "timestamp_after", "x"), ("/events/", "from_state", "BOGUS"),
    ("/events/", "to_state", "BOGUS"), ("/events/", "ordering", "nope"),
    ("/transfers/", "id", "x"), ("/transfers/", "site_id", "x"), ("/transfers/", "job_id", "x"),
    ("/transfers/", "state", "bogus"), ("/transfers/", "state", "done,bogus"), ("/transfers/", "direction", "sideways"),
    ("/transfers/", "job_state", "BOGUS"), ("/transfers/", "tags", "k"), ("/transfers/", "ordering", "nope"),
    ("/sessions/", "id", "x"),
] + [(path, name, value) for path in LISTINGS for name, value in
     (("limit", "-1"), ("limit", "100001"), ("offset", "-1"), ("limit", "x"))]


def test_bad_values_are_one_line_422s_naming_the_parameter_and_value(api: Api) -> None:
    for path, name, value in BAD_VALUES:
        msg = _one_line_422(api.http.get(path, params={name: value}), name)
        bad = value.split(",")[-1] if name in ("id", "state") else value
        assert repr(bad) in msg or bad in msg, (path, name, value, msg)
    # The query update and delete read the listing's filters (not its paging): refused alike, before
    # anything changes. Before, ``ordering=nope`` was never read there: the delete deleted every job.
    app = api.app(api.site()["id"])
    job_ids = {job["id"] for job in api.jobs(app["id"], 2)}
    for path, name, value in BAD_VALUES:
        if path == "/jobs/" and name not in ("limit", "offset"):
            _one_line_422(api.http.delete(path, params={name: value}), name)
            _one_line_422(api.http.put(path, params={name: value}, json={"data": {"x": 1}}), name)
    assert _ids(api, "/jobs/", {}) == job_ids
    assert all(job["data"] == {} for job in api.ok("GET", "/jobs/")["results"])


def test_one_value_parameters_given_a_list_are_refused_naming_it(api: Api) -> None:
    """A filter of one value (0.7's too) given a list, repeated or with commas: refused, not
    answered for one of them."""
    for path, name, values in [("/jobs/", "app_id", ["1", "2"]), ("/jobs/", "state__ne", ["READY", "RUNNING"]),
                               ("/events/", "to_state", ["READY", "RUNNING"]), ("/transfers/", "direction", ["in", "out"]),
                               ("/batch-jobs/", "scheduler_id", ["1", "2"]), ("/sites/", "name", ["a", "b"])]:
        assert _one_line_422(api.http.get(path, params=[(name, v) for v in values]), name) == "takes one value, got 2"
        if name == "name":
            continue  # text filters take a comma as text: a site may be named "a,b"
        msg = _one_line_422(api.http.get(path, params={name: ",".join(values)}), name)
        assert ",".join(values) in msg, (path, name, msg)


def test_unknown_parameter_names_are_refused_naming_them(api: Api) -> None:
    """Unlike Balsam 0.7 (FastAPI ignored them): a misspelt filter (``states=``, ``site=``) answered
    every record, and a query delete or update by filter would have applied to all of them."""
    for path in LISTINGS:
        msg = _one_line_422(api.http.get(path, params={"bogus_filter": "1"}), "bogus_filter")
        assert msg.startswith("unknown filter parameter (valid: ") and "limit" in msg and "offset" in msg, (path, msg)
    # No ordering where 0.7 had none.
    for path in ("/sites/", "/apps/", "/sessions/"):
        _one_line_422(api.http.get(path, params={"ordering": "id"}), "ordering")


def test_limit_and_offset_page_every_listing(api: Api, world: dict[str, Any]) -> None:
    for path in LISTINGS:
        everything = api.ok("GET", path)
        ids = [r["id"] for r in everything["results"]]
        assert len(ids) >= 2, path
        assert api.ok("GET", path, params={"limit": 0}) == {"count": len(ids), "results": []}, path
        page = api.ok("GET", path, params={"limit": 1, "offset": 1})
        assert page["count"] == len(ids) and [r["id"] for r in page["results"]] == ids[1:2], path
        assert api.ok("GET", path, params={"offset": len(ids)})["results"] == [], path
        assert len(api.ok("GET", path, params={"limit": 100000})["results"]) == len(ids), path


def test_the_python_apis_filters_are_the_routes(api: Api) -> None:
    """``Model.objects.filter(...)`` takes the filters its route takes, no more (a keyword the route
    refuses) and no fewer (a route filter unreachable from Python); paging and ordering are the
    Query's own (``order_by``, pages by ``id__gt``)."""
    from balsam._api import models

    own = {"limit", "offset", "ordering", "id__gt"}
    for model in (models.Site, models.App, models.Job, models.BatchJob, models.Session, models.TransferItem,
                  models.EventLog):
        msg = _one_line_422(api.http.get(model._path, params={"bogus_filter": "1"}), "bogus_filter")
        valid = set(msg.split("(valid: ", 1)[1].rstrip(")").split(", "))
        assert set(model._filters) == valid - own, (model.__name__, sorted(set(model._filters) ^ (valid - own)))


def test_substring_filters_are_case_sensitive_and_literal_on_both_databases(api: Api, world: dict[str, Any]) -> None:
    """Before, on SQLite only (LIKE folds ASCII case), ``workdir__contains=/TWO`` matched ``.../two``:
    the delete and the update by filter reached jobs the same query spared on PostgreSQL."""
    w = world
    assert api.ok("DELETE", "/jobs/", params={"workdir__contains": "/TWO"}) == 0
    assert api.ok("PUT", "/jobs/", params={"workdir__contains": "/ONE"}, json={"data": {"x": 1}}) == 0
    assert api.job(w["j2"])["data"] == {} and api.job(w["j1"])["data"] == {}
    # Literal: % and _ are text, not wildcards.
    assert _ids(api, "/jobs/", {"workdir__contains": "wa%"}) == set()
    assert _ids(api, "/jobs/", {"workdir__contains": "w_-"}) == set()
    assert _ids(api, "/jobs/", {"workdir__contains": "/two"}) == {w["j2"]}
    assert api.ok("DELETE", "/jobs/", params={"workdir__contains": "/two"}) == 1


def _key(value: Any) -> Any:
    """A field's value as it sorts: datetimes by instant, missing ones apart (see the callers)."""
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=None)
    return value


def test_every_ordering_orders(api: Api, world: dict[str, Any]) -> None:
    """Each ordering a listing takes sorts by its field (ties by id: descending with ``-`` but for
    the batch-jobs' and transfers', as documented), not only passes validation."""
    for path, fields, desc_ties_desc in [("/jobs/", ["last_update", "id", "state", "workdir"], True),
                                         ("/transfers/", ["id", "state"], False),
                                         ("/events/", ["timestamp"], True),
                                         ("/batch-jobs/", ["id"], False)]:
        for field in fields:
            for sign in ("", "-"):
                rows = api.ok("GET", path, params={"ordering": sign + field})["results"]
                assert len(rows) >= 2, path
                got = [r["id"] for r in rows]
                ranked = sorted(rows, key=lambda r: r["id"], reverse=bool(sign) and desc_ties_desc)
                ranked = sorted(ranked, key=lambda r: _key(r[field]), reverse=bool(sign))
                assert got == [r["id"] for r in ranked], (path, sign + field, [(r["id"], r[field]) for r in rows])
    # start_time: the never-started BatchJob last ascending, first descending; ties by id.
    started = [world["bj_b"], world["bj_c"]]  # bj_b started before bj_c
    assert [r["id"] for r in api.ok("GET", "/batch-jobs/", params={"ordering": "start_time"})["results"]] == \
        started + [world["bj_a"]]
    assert [r["id"] for r in api.ok("GET", "/batch-jobs/", params={"ordering": "-start_time"})["results"]] == \
        [world["bj_a"]] + started[::-1]
