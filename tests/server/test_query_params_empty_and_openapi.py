"""Query parameters: one rule for empty values, one reader of state lists, and a served OpenAPI
document that says what each listing takes (real servers, SQLite and PostgreSQL).

- An empty value (``?app_id=``, ``?state=``, ``?id=``, ``?id=,``) was read three ways: ``id=``
  matched nothing, ``app_id=``, ``limit=`` and ``ordering=`` were ignored, ``state=``, ``tags=`` and
  ``direction=`` were 422s, and ``DELETE /jobs/?app_id=`` (an unset shell variable) deleted every
  job. Now every typed parameter refuses it (422 naming it), as Balsam 0.7's FastAPI did; a text
  filter given empty is no filter in a listing, as in 0.7, and refused in an update or delete.
- The dashboard's Jobs page takes ``state=A,B`` as the API does (it answered 422).
- /openapi.json: the batch-jobs' ``id`` orderings, the events' ``site_id`` and list ``batch_job_id``,
  and the comma form of the list parameters were missing."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import httpx
from server_testlib import Api

sys.path.insert(0, str(Path(__file__).parents[1] / "dashboard"))

from dashboard_helpers import logged_in_client  # noqa: E402

TEXT = {"name", "path", "site_path", "site_name", "queue", "workdir__contains"}


def _one_line_422(resp: httpx.Response, name: str) -> str:
    assert resp.status_code == 422, (resp.request.url, resp.status_code, resp.text[:300])
    [item] = resp.json()["detail"]
    assert item["loc"] == ["query", name] and "\n" not in item["msg"], item
    return item["msg"]


def _listings(doc: dict, site_id: int) -> list[tuple[str, dict[str, dict]]]:
    """(path, {query parameter: schema}) of every GET the document gives query parameters."""
    out = []
    for path, ops in doc["paths"].items():
        params = {p["name"]: p["schema"] for p in ops.get("get", {}).get("parameters", []) if p["in"] == "query"}
        if params:
            out.append((path.replace("{site_id}", str(site_id)), params))
    return out


def _resolve(doc: dict, schema: dict) -> dict:
    if "$ref" in schema:
        return doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _value(doc: dict, schema: dict, n: int = 0) -> str:
    """A value of ``schema`` the server takes (the n-th enum value)."""
    schema = _resolve(doc, schema)
    if "enum" in schema:
        return schema["enum"][n % len(schema["enum"])]
    if schema.get("type") == "integer":
        return str(1 + n)
    if schema.get("type") == "boolean":
        return "true"
    if schema.get("format") == "date-time":
        return dt.datetime(2024, 1, 1 + n, tzinfo=dt.timezone.utc).isoformat()
    if schema.get("pattern", "").startswith("^(?:[0-9]"):
        return str(n)  # the backlog's max_gpus_per_node
    if ":" in schema.get("pattern", ""):
        return f"k{n}:v"  # KEY:VALUE
    return f"text{n}"


def _key_value(schema: dict) -> bool:
    return schema.get("type") == "array" and ":" in schema["items"].get("pattern", "")  # KEY:VALUE, never split


def test_every_typed_parameter_refuses_an_empty_value_naming_it(api: Api) -> None:
    """Before: ``id=`` answered no record, ``app_id=``, ``limit=``, ``ordering=`` and the datetimes
    every record (200), ``state=`` 'expected one of ...; got '''. Now one 422 naming the parameter,
    on every listing, whether anything matches or not."""
    doc = api.ok("GET", "/openapi.json")
    site = api.site()
    api.jobs(api.app(site["id"])["id"], 2)
    for path, params in _listings(doc, site["id"]):
        for name, schema in params.items():
            if name in TEXT:
                continue
            for empty in ("", " "):
                msg = _one_line_422(api.http.get(path, params={name: empty}), name)
                assert msg == "empty value: leave the parameter out for no filter", (path, name, msg)
            if schema.get("type") == "array" and not _key_value(schema):
                msg = _one_line_422(api.http.get(path, params={name: " , "}), name)
                assert msg == "no value in ' , ': leave the parameter out for no filter", (path, name, msg)
    # What is not empty still reads as before: blanks around the commas are dropped.
    [state] = {job["state"] for job in api.ok("GET", "/jobs/")["results"]}
    assert api.ok("GET", "/jobs/", params={"state": f"{state},", "limit": 0})["count"] == 2
    assert api.ok("GET", "/jobs/", params={"site_id": f" {site['id']} ,", "limit": 0})["count"] == 2


def test_an_empty_text_filter_is_no_filter_in_a_listing_as_in_07(api: Api) -> None:
    """Balsam 0.7 skipped a text filter given ``''`` (``if self.name:``), and the Python API sends
    ``filter(name="")`` as ``name=``: the listing answers as without it."""
    site = api.site()
    app = api.app(site["id"])
    api.jobs(app["id"], 2)
    assert api.ok("GET", "/jobs/", params={"workdir__contains": ""})["count"] == 2
    assert [s["id"] for s in api.ok("GET", "/sites/", params={"name": "", "path": ""})["results"]] == [site["id"]]
    assert [a["id"] for a in api.ok("GET", "/apps/", params={"name": "", "site_path": "", "site_name": ""})["results"]] \
        == [app["id"]]
    assert api.ok("GET", "/batch-jobs/", params={"queue": ""})["count"] == 0


def test_an_update_or_delete_by_filter_with_an_empty_value_never_widens(api: Api) -> None:
    """Before: ``DELETE /jobs/?app_id=`` and ``?workdir__contains=`` deleted every job of the user
    (``PUT`` likewise changed every one), ``?id=`` none. Now every filter of both, given empty, is
    a 422 naming it before anything changes."""
    doc = api.ok("GET", "/openapi.json")
    app = api.app(api.site()["id"])
    ids = {job["id"] for job in api.jobs(app["id"], 3)}
    writes = [("DELETE", p["name"]) for p in doc["paths"]["/jobs/"]["delete"]["parameters"] if p["in"] == "query"]
    writes += [("PUT", p["name"]) for p in doc["paths"]["/jobs/"]["put"]["parameters"] if p["in"] == "query"]
    assert ("DELETE", "app_id") in writes and ("PUT", "leased") in writes and ("DELETE", "workdir__contains") in writes
    for method, name in writes:
        for empty in ("", " "):
            resp = api.http.request(method, "/jobs/", params={name: empty},
                                    json={"data": {"x": 1}} if method == "PUT" else None)
            msg = _one_line_422(resp, name)
            assert msg.startswith("empty value"), (method, name, msg)
        # Beside a filter that narrows, too.
        _one_line_422(api.http.request(method, "/jobs/", params=[("app_id", str(app["id"])), (name, "")],
                                       json={"data": {"x": 1}} if method == "PUT" else None), name)
    rows = api.ok("GET", "/jobs/")["results"]
    assert {r["id"] for r in rows} == ids and all(r["data"] == {} for r in rows)
    # The same deletes with the value given reach what they name only.
    assert api.ok("DELETE", "/jobs/", params={"workdir__contains": "nomatch"}) == 0
    assert api.ok("GET", "/jobs/", params={"limit": 0})["count"] == 3


def test_the_dashboard_jobs_page_takes_the_comma_form_of_states(api: Api) -> None:
    """Before: the page read ``state`` with the old reader: ``state=A,B`` was 'expected one of ...'
    (422) on the page while the API's listing took it."""
    app = api.app(api.site()["id"])
    jobs = api.jobs(app["id"], 2)
    [state] = {job["state"] for job in jobs}
    client = logged_in_client(api.url, api.username, api.password)
    try:
        for params in ({"state": f"{state},RUN_DONE"}, [("state", state), ("state", "RUN_DONE")]):
            page = client.get("/dashboard/jobs", params=params)
            assert page.status_code == 200, page.text[-500:]
            for job in jobs:
                assert f'/dashboard/jobs/{job["id"]}"' in page.text, (params, job["id"])
            assert f'class="state-{state} selected"' in page.text, params  # the counts table marks it
        # The filter applies (no job is in these states), and an unknown state is refused naming it.
        page = client.get("/dashboard/jobs", params={"state": "RUN_DONE,RUN_ERROR"})
        assert page.status_code == 200 and f'/dashboard/jobs/{jobs[0]["id"]}"' not in page.text
        bad = client.get("/dashboard/jobs", params={"state": f"{state},BOGUS"})
        assert bad.status_code == 422 and "BOGUS" in bad.text
        # The BatchJobs page filters through the API's reader: the comma form there too.
        assert client.get("/dashboard/batch-jobs", params={"state": "queued,finished"}).status_code == 200
    finally:
        client.close()


def test_the_served_document_lists_what_each_listing_takes(api: Api) -> None:
    """Each listing's query parameters in /openapi.json are those the route takes (its own list,
    from the 422 of an unknown one); a list parameter there takes the repeated and the comma form
    and says so, a one-value parameter refuses two; every ordering the route takes is in the
    document and every one in the document is taken. Before: batch-jobs ``ordering`` lacked
    ``[-]id``, the events lacked ``site_id`` and took ``batch_job_id`` as one integer, and no
    list parameter mentioned the comma form."""
    doc = api.ok("GET", "/openapi.json")
    site = api.site()
    for path, params in _listings(doc, site["id"]):
        msg = _one_line_422(api.http.get(path, params={"bogus_filter": "1"}), "bogus_filter")
        taken = set(msg.split("(valid: ", 1)[1].rstrip(")").split(", "))
        assert set(params) == taken, (path, sorted(set(params) ^ taken))
        for name, schema in params.items():
            if schema.get("type") == "array":
                two = [_value(doc, schema["items"], 0), _value(doc, schema["items"], 1)]
                resp = api.http.get(path, params=[(name, v) for v in two])
                assert resp.status_code == 200, (path, name, resp.text[:300])
                if not _key_value(schema):
                    assert "comma-separated" in schema.get("description", ""), (path, name)
                    resp = api.http.get(path, params={name: ",".join(two)})
                    assert resp.status_code == 200, (path, name, resp.text[:300])
            else:
                value = _value(doc, schema)
                assert api.http.get(path, params={name: value}).status_code == 200, (path, name, value)
                assert _one_line_422(api.http.get(path, params=[(name, value), (name, value)]), name) == \
                    "takes one value, got 2"
        # Orderings: the document's enum is exactly what the route sorts by.
        record = _resolve(doc, doc["paths"][path.replace(str(site["id"]), "{site_id}")]["get"]["responses"]["200"]
                          ["content"]["application/json"]["schema"])
        items = record.get("properties", {}).get("results", {}).get("items")
        if items is None:
            continue
        fields = set(_resolve(doc, items)["properties"])
        documented = set(_resolve(doc, params["ordering"])["enum"]) if "ordering" in params else set()
        for field in sorted(fields):
            for candidate in (field, "-" + field):
                taken = api.http.get(path, params={"ordering": candidate}).status_code == 200
                assert taken == (candidate in documented), (path, candidate, taken)
        assert documented <= {f for field in fields for f in (field, "-" + field)}, (path, documented)
    batch_orderings = {p["name"]: p["schema"] for p in doc["paths"]["/batch-jobs/"]["get"]["parameters"]}["ordering"]
    assert set(batch_orderings["enum"]) == {"start_time", "-start_time", "id", "-id"}
