"""A job's ``data`` comes back with its keys in the order they were sent, on SQLite and PostgreSQL:
through a create (one job and a bulk create, COPY on PostgreSQL), updates (a bulk PATCH giving
jobs their own data, the same data, or data differing only in key order, which were grouped into
one UPDATE with the first one's order; a PUT of one job; a PUT by filter) and every listing
(objects, columns, one job). PostgreSQL stored ``jobs.data`` as ``jsonb``, which sorts an object's
keys (``{"objective": 1, "from": "x"}`` came back as ``{"from": "x", "objective": 1}``); Balsam 0.7
and SQLite kept the text. Migration 0021 makes the column ``json``: tested from revision 0020 with a
job in the database (its data keeps the order jsonb had given it; new data keeps its own)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from balsam.server.db import create_db_engine
from balsam.server.jobs_logic import COLUMNS_MEDIA_TYPE
from balsam.server.migrate import alembic_config, head_revision, upgrade
from scratch_db import scratch_database
from server_testlib import create_site_and_app, logged_in_test_client

SECRET = "job-data-key-order-secret-0123456789-abcdefghij"
BEFORE = "0020_sqlite_autoincrement"

#: Keys in an order jsonb would change (it sorts shorter keys first, then bytewise), nested too.
DATA = {"objective": 0.25, "from": "x", "zeta": {"y": 1, "b": [{"q": 1, "a": 2}]}, "a": None}
OTHER = {"worker": 3, "id": "w-3", "objective": -1.5}


def _keys(value: Any) -> Any:
    """The keys of every object in ``value``, nested, in their order (what equality ignores)."""
    if isinstance(value, dict):
        return [(k, _keys(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_keys(v) for v in value]
    return None


def _same(got: Any, want: Any) -> None:
    assert got == want
    assert _keys(got) == _keys(want), json.dumps(got)


@pytest.fixture
def api(database_url: str) -> Iterator[dict[str, Any]]:
    with logged_in_test_client(database_url, SECRET) as (client, app):
        _, app_id = create_site_and_app(client)
        yield {"client": client, "app_id": app_id}


def _listed(client: Any, ids: list[int]) -> dict[str, dict[int, Any]]:
    """Each job's data as every listing writes it: objects, columns and the job's own GET."""
    params = {"id": ids, "limit": len(ids)}
    objects = client.get("/jobs/", params=params)
    assert objects.status_code == 200, objects.text
    columns = client.get("/jobs/", params=params, headers={"Accept": COLUMNS_MEDIA_TYPE})
    assert columns.status_code == 200 and columns.headers["content-type"].startswith(COLUMNS_MEDIA_TYPE), columns.text
    page = columns.json()
    # The response text parsed as it comes (json keeps the order of an object's keys).
    values = {name: json.loads(text) for name, text in zip(page["fields"], page["columns"])}
    return {
        "objects": {job["id"]: job["data"] for job in json.loads(objects.text)["results"]},
        "columns": dict(zip(values["id"], values["data"])),
        "one": {job_id: json.loads(client.get(f"/jobs/{job_id}").text)["data"] for job_id in ids},
    }


def _check(client: Any, want: dict[int, Any]) -> None:
    for form, got in _listed(client, sorted(want)).items():
        assert sorted(got) == sorted(want), form
        for job_id, data in want.items():
            _same(got[job_id], data)


def test_create_keeps_the_key_order(api: dict) -> None:
    client, app_id = api["client"], api["app_id"]
    one = client.post("/jobs/", json=[{"workdir": "one", "app_id": app_id, "data": DATA}])
    assert one.status_code == 201, one.text
    _same(json.loads(one.text)[0]["data"], DATA)
    # A bulk create of jobs each with its own data (COPY on PostgreSQL), a few with the same.
    sent = [{"workdir": f"bulk/{i}", "app_id": app_id, "data": dict(OTHER, worker=i) if i % 3 else DATA}
            for i in range(300)]
    bulk = client.post("/jobs/", json=sent)
    assert bulk.status_code == 201, bulk.text
    created = json.loads(bulk.text)
    for job, spec in zip(created, sent):
        _same(job["data"], spec["data"])
    want = {json.loads(one.text)[0]["id"]: DATA, **{job["id"]: spec["data"] for job, spec in zip(created, sent)}}
    _check(client, want)


def test_updates_keep_the_key_order(api: dict) -> None:
    client, app_id = api["client"], api["app_id"]
    created = client.post("/jobs/", json=[{"workdir": f"u/{i}", "app_id": app_id} for i in range(6)])
    assert created.status_code == 201, created.text
    ids = [job["id"] for job in created.json()]
    reversed_data = dict(reversed(list(DATA.items())))  # equal to DATA, its keys the other way round
    # Bulk PATCH: one job alone, two with the same data, and two whose data differ only in key order.
    patch = client.patch("/jobs/", json=[{"id": ids[0], "data": OTHER}, {"id": ids[1], "data": DATA},
                                         {"id": ids[2], "data": DATA}, {"id": ids[3], "data": reversed_data}])
    assert patch.status_code == 200, patch.text
    put = client.put(f"/jobs/{ids[4]}", json={"data": DATA})
    assert put.status_code == 200, put.text
    many = client.put("/jobs/", params={"id": [ids[5]]}, json={"data": OTHER})  # an update by filter
    assert many.status_code == 200, many.text
    _check(client, {ids[0]: OTHER, ids[1]: DATA, ids[2]: DATA, ids[3]: reversed_data, ids[4]: DATA, ids[5]: OTHER})


def _seed_job(conn: sa.Connection) -> int:
    """A user, site, app and a job with ``DATA`` at revision 0020, written as the server wrote it."""
    user = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES ('m', '2026-12-01') RETURNING id")).scalar()
    site = conn.execute(sa.text(
        "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
        "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
        "(:u, 's', '/s', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01') RETURNING id"), {"u": user}).scalar()
    app = conn.execute(sa.text(
        "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
        "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site}).scalar()
    return conn.execute(sa.text(
        "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
        "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
        "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
        "VALUES (:s, :a, 'w', '{}', '', :d, 1, 1, 1, 1, '{}', 0, 1, 0, '[]', 'STAGED_IN', true, '', '', "
        "'2026-12-01 00:00:00') RETURNING id"), {"s": site, "a": app, "d": json.dumps(DATA)}).scalar()


def _stored(conn: sa.Connection, job: int) -> Any:
    return conn.execute(sa.text("SELECT data FROM jobs WHERE id = :j").columns(data=sa.JSON), {"j": job}).scalar()


def _data_column(conn: sa.Connection) -> "tuple[str, str] | None":
    if conn.dialect.name != "postgresql":
        return None
    return tuple(conn.execute(sa.text("SELECT data_type, column_default FROM information_schema.columns "
                                      "WHERE table_schema = current_schema() AND table_name = 'jobs' "
                                      "AND column_name = 'data'")).one())


def test_migration_0021_makes_job_data_json(database_url: str, tmp_path) -> None:
    with scratch_database(database_url, tmp_path, "jobdata") as url:
        assert upgrade(url, BEFORE) == BEFORE
        engine = create_db_engine(url)
        try:
            with engine.begin() as conn:
                job = _seed_job(conn)
                at_0020 = _data_column(conn)
                stored = _stored(conn, job)
            assert upgrade(url) == head_revision()
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    assert at_0020 == ("jsonb", "'{}'::jsonb")
                    assert _data_column(conn) == ("json", "'{}'::json")
                # The row keeps its data (on PostgreSQL in the order jsonb gave it at 0020).
                _same(_stored(conn, job), stored)
                conn.execute(sa.text("UPDATE jobs SET data = :d WHERE id = :j"), {"d": json.dumps(DATA), "j": job})
                _same(_stored(conn, job), DATA)
                # The column's default (PostgreSQL, migration 0009) still fills a job written without data.
                if conn.dialect.name == "postgresql":
                    other = conn.execute(sa.text(
                        "INSERT INTO jobs (site_id, app_id, workdir, state, last_update) SELECT site_id, app_id, 'w2', "
                        "state, last_update FROM jobs WHERE id = :j RETURNING id"), {"j": job}).scalar()
                    assert _stored(conn, other) == {}
            # Down and up again: the column goes back to jsonb (and its default), then json.
            command.downgrade(alembic_config(url), BEFORE)
            with engine.begin() as conn:
                assert _data_column(conn) == at_0020
                assert _stored(conn, job) == DATA
            assert upgrade(url) == head_revision()
            with engine.begin() as conn:
                assert _data_column(conn) == (("json", "'{}'::json") if conn.dialect.name == "postgresql" else None)
        finally:
            engine.dispose()
