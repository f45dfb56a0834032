"""On SQLite, ``GET /jobs/`` answers with the bytes the page's dicts (``list_jobs``: ``job_dicts``,
``wire_datetime``) give through ``dumps``, though it now writes ``last_update`` from the database's
text (``_sqlite_object_page``): for every ordering, offset and filter, with times on the second,
one microsecond after it and just before the next, and values of every kind."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams

from balsam.server import jobs_logic as logic
from balsam.server.http import QueryParams, dumps
from balsam.server.tables import jobs
from server_testlib import create_site_and_app, logged_in_test_client

SECRET = "rawhttp-page-bytes-secret-0123456789-abcdefghijk"
QUERIES = ["", "limit=7&offset=3&tags=kind:odd", "ordering=-last_update&limit=5", "ordering=last_update",
           "ordering=state&limit=6&offset=2", "ordering=-workdir&limit=4", "ordering=-id&limit=3&offset=1",
           "limit=100", "tags=kind:none", "limit=0", "offset=40", "state=FAILED&limit=10",
           "workdir__contains=%25&limit=10", "last_update_before=2031-01-01T00:00:00"]
#: Stored times: on the second (written without a fraction), the smallest and largest fractions.
TIMES = [dt.datetime(2030, 1, 2, 3, 4, 5), dt.datetime(2030, 1, 2, 3, 4, 5, 1), dt.datetime(2030, 1, 2, 3, 4, 5, 999999),
         dt.datetime(2031, 12, 31, 23, 59, 59, 100000, tzinfo=dt.timezone(dt.timedelta(hours=-5)))]


@pytest.fixture
def api(tmp_path: Any) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'pages.db'}"
    with logged_in_test_client(url, SECRET) as (client, app):
        _, app_id = create_site_and_app(client)
        first = client.post("/jobs/", json=[{"workdir": "p/0", "app_id": app_id}]).json()
        created = client.post("/jobs/", json=[
            {"workdir": f"w/{i}{'%' if i == 3 else ''}", "app_id": app_id,
             "tags": {"kind": "odd" if i % 2 else "even", "text": "é \"q\" \\ \n\t\u2603"},
             "data": {"x": [1, 2.5, None, {"y": "z"}]}, "gpus_per_rank": 0.5 * (i % 3), "num_nodes": 1 + i % 2,
             "launch_params": {"a": "b"}, "return_code": i - 5 if i % 4 == 0 else None,
             "parent_ids": [first[0]["id"]] if i % 5 == 0 else [], "pending_file_cleanup": i % 2 == 0,
             "serialized_return_value": "r" * i} for i in range(30)])
        assert created.status_code == 201, created.text
        ids = [job["id"] for job in created.json()]
        patch = client.patch("/jobs/", json=[{"id": i, "state": "FAILED"} for i in ids[3:20:3]])
        assert patch.status_code == 200, patch.text
        engine = app.state.engine
        with engine.begin() as conn:  # through the column's type, as every write of the server stores them
            for i, when in enumerate(TIMES):
                conn.execute(sa.update(jobs).where(jobs.c.id == ids[i]).values(last_update=when))
        yield {"client": client, "engine": engine, "user_id": 1, "ids": ids}


@pytest.mark.parametrize("query", QUERIES)
def test_listing_bytes_equal_the_dicts_page(api: dict, query: str) -> None:
    params = StarletteQueryParams(query)
    limit, offset = int(params.get("limit", 5000)), int(params.get("offset", 0))
    with api["engine"].connect() as conn:
        count, dicts = logic.list_jobs(conn, api["user_id"], QueryParams(params), limit, offset)
        json_count, text = logic.list_jobs_json(conn, api["user_id"], QueryParams(params), limit, offset)
    assert (json_count, text) == (count, dumps(dicts).decode())
    answer = api["client"].get(f"/jobs/?{query}")
    assert answer.status_code == 200, answer.text
    assert answer.content == dumps({"count": count, "results": dicts})


def test_the_stored_times_are_written_as_before(api: dict) -> None:
    """The times above come out as orjson writes naive UTC datetimes: no fraction on the second."""
    answer = api["client"].get("/jobs/", params={"id": api["ids"][:4]})
    by_id = {job["id"]: job["last_update"] for job in answer.json()["results"]}
    assert [by_id[i] for i in api["ids"][:4]] == ["2030-01-02T03:04:05", "2030-01-02T03:04:05.000001",
                                                    "2030-01-02T03:04:05.999999", "2032-01-01T04:59:59.100000"]
