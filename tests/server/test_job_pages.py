"""A page of jobs is the same whichever way it is written: the Python dicts of ``job_dicts``, the
JSON the database writes for the object form (PostgreSQL: one ``json_agg`` value), and the columns
form (one aggregate per field, checked against the rows' positions); for every ordering, offset and
filter, with values of every kind (unicode and escapes in tags, fractional GPUs, return codes,
parents, naive UTC datetimes)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator

import orjson
import pytest
from starlette.datastructures import QueryParams as StarletteQueryParams

from balsam.server import jobs_logic as logic
from balsam.server.http import QueryParams, dumps
from server_testlib import create_site_and_app, logged_in_test_client


SECRET = "job-pages-test-secret-0123456789-abcdefghijklmnop"
QUERIES = ["limit=7&offset=3&tags=kind:odd", "ordering=-last_update&limit=5", "ordering=state&limit=6&offset=2",
           "ordering=-workdir&limit=4", "ordering=-id&limit=3&offset=1", "limit=100", "tags=kind:none", "limit=0",
           "state=FAILED&limit=10", "workdir__contains=%25&limit=10"]


@pytest.fixture
def api(database_url: str) -> Iterator[dict[str, Any]]:
    with logged_in_test_client(database_url, SECRET) as (client, app):
        _, app_id = create_site_and_app(client)
        first = client.post("/jobs/", json=[{"workdir": "p/0", "app_id": app_id}]).json()
        jobs = [{"workdir": f"w/{i}{'%' if i == 3 else ''}", "app_id": app_id,
                 "tags": {"kind": "odd" if i % 2 else "even", "text": "é \"q\" \\ \n\t\u2603"},
                 "data": {"x": [1, 2.5, None, {"y": "z"}]}, "gpus_per_rank": 0.5 * (i % 3), "num_nodes": 1 + i % 2,
                 "launch_params": {"a": "b"}, "return_code": i - 5 if i % 4 == 0 else None,
                 "parent_ids": [first[0]["id"]] if i % 5 == 0 else [], "pending_file_cleanup": i % 2 == 0,
                 "serialized_return_value": "r" * i} for i in range(30)]
        created = client.post("/jobs/", json=jobs)
        assert created.status_code == 201, created.text
        ids = [job["id"] for job in created.json()]
        patch = client.patch("/jobs/", json=[{"id": i, "state": "FAILED"} for i in ids[3:20:3]]
                             + [{"id": ids[1], "state": "FAILED", "state_timestamp": "2031-05-06T07:08:09.100000"}])
        assert patch.status_code == 200, patch.text
        yield {"client": client, "engine": app.state.engine, "user_id": 1}


def _normal(job: dict[str, Any]) -> dict[str, Any]:
    # The database writes the microseconds without trailing zeros (both parse to the same time).
    return dict(job, last_update=dt.datetime.fromisoformat(job["last_update"]))


@pytest.mark.parametrize("query", QUERIES)
def test_the_database_written_page_equals_the_python_page(api: dict, query: str) -> None:
    q = QueryParams(StarletteQueryParams(query))
    params = StarletteQueryParams(query)
    limit, offset = int(params.get("limit", 100)), int(params.get("offset", 0))
    with api["engine"].connect() as conn:
        count, expected = logic.list_jobs(conn, api["user_id"], q, limit, offset)
        expected = orjson.loads(dumps(expected))
        json_count, text = logic.list_jobs_json(conn, api["user_id"], q, limit, offset)
        columns_count, column_texts = logic.list_job_columns(conn, api["user_id"], q, limit, offset)
    as_objects = orjson.loads(text)
    columns = [orjson.loads(column) for column in column_texts]
    assert len(columns) == len(logic.JOB_OUT_FIELDS)
    as_rows = [dict(zip(logic.JOB_OUT_FIELDS, row)) for row in zip(*columns)]
    assert count == json_count == columns_count
    assert [_normal(j) for j in as_objects] == [_normal(j) for j in expected]
    assert [_normal(j) for j in as_rows] == [_normal(j) for j in expected]
    if limit:
        assert expected or "none" in query  # the queries select something
    # And through HTTP: the object form a 0.7 client reads (the columns form: tests/server/test_jobs.py).
    body = api["client"].get(f"/jobs/?{query}").json()
    assert body["count"] == count
    assert [_normal(j) for j in body["results"]] == [_normal(j) for j in expected]
    for job in body["results"]:
        assert "T" in job["last_update"] and "+" not in job["last_update"]  # naive UTC, as 0.7 sent it


@pytest.mark.parametrize(("ordering", "check", "checked"), [
    ("ordering=-workdir&", "_positions_in_order", ([3, 4, 5, 6, 7, 8], 2)),
    ("", "_ids_in_order", None), ("ordering=-id&", "_ids_in_order", None)])
def test_columns_aggregated_out_of_order_are_rebuilt_in_order(api: dict, monkeypatch: pytest.MonkeyPatch,
                                                              ordering: str, check: str, checked: Any) -> None:
    """Neither database promises to aggregate in the subquery's order: a page whose ids (ordered by
    id) or positions (other orderings) come back out of order is built from the listing's rows
    instead (the same page)."""
    q = QueryParams(StarletteQueryParams(f"{ordering}limit=6&offset=2"))
    seen = []

    def out_of_order(text: str, *args: Any, **kwargs: Any) -> bool:
        seen.append(orjson.loads(text))
        return False

    with api["engine"].connect() as conn:
        _, expected = logic.list_job_columns(conn, api["user_id"], q, 6, 2)
        monkeypatch.setattr(logic, check, out_of_order)
        count, text = logic.list_job_columns(conn, api["user_id"], q, 6, 2)
    columns, want = [orjson.loads(c) for c in text], [orjson.loads(c) for c in expected]
    assert count == 31 and len(seen) == 1
    assert seen[0] == (checked[0] if checked else want[0])  # the positions, or the ids
    assert len(columns) == len(want) == len(logic.JOB_OUT_FIELDS)
    assert [_normal(dict(zip(logic.JOB_OUT_FIELDS, row))) for row in zip(*columns)] == \
        [_normal(dict(zip(logic.JOB_OUT_FIELDS, row))) for row in zip(*want)]


def test_order_checks() -> None:
    assert logic._ids_in_order("[1, 5, 9]", descending=False) and not logic._ids_in_order("[1, 9, 5]", descending=False)
    assert logic._ids_in_order("[9,5,1]", descending=True) and not logic._ids_in_order("[9,9]", descending=True)
    assert logic._ids_in_order("[]", descending=False) and logic._ids_in_order("[4]", descending=True)
    assert logic._positions_in_order("[3, 4, 5]", 2) and not logic._positions_in_order("[3, 5, 4]", 2)
    assert not logic._positions_in_order("[1, 2]", 2)


@pytest.mark.parametrize("offset", [31, 40])
def test_a_page_past_the_end_is_empty_with_the_count(api: dict, offset: int) -> None:
    q = QueryParams(StarletteQueryParams(f"limit=10&offset={offset}"))
    with api["engine"].connect() as conn:
        assert logic.list_jobs(conn, api["user_id"], q, 10, offset) == (31, [])
        assert logic.list_jobs_json(conn, api["user_id"], q, 10, offset) == (31, "[]")
        count, text = logic.list_job_columns(conn, api["user_id"], q, 10, offset)
    assert count == 31 and text == ["[]"] * len(logic.JOB_OUT_FIELDS)
