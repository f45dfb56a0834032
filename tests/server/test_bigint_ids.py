"""64-bit ids of jobs, events, parent links, transfer items and sessions (PostgreSQL, migration
0017): their sequences are shared by every user, and one user's reservations (500,000 job ids a
request) used up the 32-bit ``jobs_id_seq`` in ~4,300 requests, after which every user's job create
failed. Ids past 2**31 now go through every route; SQLite's INTEGER PRIMARY KEY is 64-bit already."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from server_testlib import Api

#: Where the sequences are moved: past the 32-bit range.
BEYOND = 2**31 + 1000
#: (table, column) that are bigint on PostgreSQL after the migration.
WIDENED = [("jobs", "id"), ("jobs", "session_id"), ("sessions", "id"), ("job_parents", "child_id"),
           ("job_parents", "parent_id"), ("log_events", "id"), ("log_events", "job_id"), ("transfer_items", "id"),
           ("transfer_items", "job_id")]
SEQUENCES = ["jobs_id_seq", "log_events_id_seq", "transfer_items_id_seq", "sessions_id_seq"]


def _types(conn: sa.Connection) -> dict[tuple[str, str], str]:
    rows = conn.execute(sa.text("SELECT table_name, column_name, data_type FROM information_schema.columns "
                                "WHERE table_schema = current_schema()"))
    return {(table, column): kind for table, column, kind in rows if (table, column) in WIDENED}


def _sequence_types(conn: sa.Connection) -> dict[str, str]:
    return dict(conn.execute(sa.text("SELECT sequencename, data_type::text FROM pg_sequences")).all())


def _trigger_defs(conn: sa.Connection) -> dict[str, str]:
    return dict(conn.exec_driver_sql(
        "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal").all())


def test_the_migration_makes_job_event_and_session_ids_bigint_and_keeps_rows_and_triggers(database_url: str) -> None:
    if not database_url.startswith("postgres"):
        pytest.skip("SQLite's INTEGER PRIMARY KEY is a 64-bit rowid already: the migration changes nothing there")
    from alembic import command

    from balsam.server.db import create_db_engine
    from balsam.server.migrate import alembic_config, head_revision, upgrade

    command.downgrade(alembic_config(database_url), "0016_session_clock_restarted")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            assert set(_types(conn).values()) == {"integer"}
            assert {_sequence_types(conn)[name] for name in SEQUENCES} == {"integer"}
            triggers_before = _trigger_defs(conn)
            user = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES ('m', now()) RETURNING id")).scalar()
            site = conn.execute(sa.text(
                "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
                "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
                "(:u, 's', '/s', '{}', '{}', '{}', '[]', '{}', '{}', now(), now()) RETURNING id"), {"u": user}).scalar()
            app = conn.execute(sa.text(
                "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
                "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site}).scalar()
            job = conn.execute(sa.text(
                "INSERT INTO jobs (site_id, app_id, workdir, state, last_update) VALUES (:s, :a, 'w', 'STAGED_IN', now()) "
                "RETURNING id"), {"s": site, "a": app}).scalar()
            conn.execute(sa.text("INSERT INTO log_events (job_id, timestamp, from_state, to_state) "
                                 "VALUES (:j, now(), 'CREATED', 'STAGED_IN')"), {"j": job})
        assert upgrade(database_url) == head_revision()
        with engine.begin() as conn:
            assert _types(conn) == {pair: "bigint" for pair in WIDENED}
            assert {name: _sequence_types(conn)[name] for name in SEQUENCES} == {name: "bigint" for name in SEQUENCES}
            # The triggers that name an id column were dropped and made again, the same (their
            # whole definitions: table, timing, events, columns, condition, function).
            assert _trigger_defs(conn) == triggers_before
            assert conn.execute(sa.text("SELECT count(*) FROM log_events WHERE job_id = :j"), {"j": job}).scalar() == 1
            # Past 2**31 and still checked by the triggers (a missing job is refused).
            conn.execute(sa.text(f"SELECT setval('jobs_id_seq', {BEYOND})"))
            new = conn.execute(sa.text(
                "INSERT INTO jobs (site_id, app_id, workdir, state, last_update) VALUES (:s, :a, 'w2', 'STAGED_IN', now()) "
                "RETURNING id"), {"s": site, "a": app}).scalar()
            assert new == BEYOND + 1
            conn.execute(sa.text("INSERT INTO job_parents (child_id, parent_id) VALUES (:c, :p)"), {"c": new, "p": job})
            with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
                conn.execute(sa.text("INSERT INTO log_events (job_id, timestamp, from_state, to_state) "
                                     "VALUES (:j, now(), 'CREATED', 'STAGED_IN')"), {"j": new + 5})
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def big_ids_server(live_server_factory: Any) -> Iterator[Any]:
    """A PostgreSQL server of its own whose id sequences are past 2**31 (other tests' servers keep theirs)."""
    from balsam.server.db import create_db_engine

    server = live_server_factory("postgresql")
    engine = create_db_engine(server.database_url)
    try:
        with engine.begin() as conn:
            for name in SEQUENCES:
                conn.execute(sa.text(f"SELECT setval('{name}', {BEYOND})"))
    finally:
        engine.dispose()
    yield server


@pytest.mark.postgres
def test_ids_past_2_31_round_trip_through_every_route(big_ids_server: Any, register: Any) -> None:
    api = Api(big_ids_server.url, register)
    try:
        site = api.site(transfer_locations={"loc": "globus://ep"})
        app = api.app(site["id"], transfers={"inp": {"required": False, "direction": "in", "local_path": "in.txt",
                                                     "description": "", "recursive": False}})
        parent, plain = api.jobs(app["id"], 2, prefix="p")
        assert parent["id"] > 2**31 and plain["id"] == parent["id"] + 1
        (child,) = api.ok("POST", "/jobs/", 201, json=[{"workdir": "c/0", "app_id": app["id"], "parent_ids": [parent["id"]],
                                                         "transfers": {"inp": "loc:/remote/in.txt"}}])
        assert child["parent_ids"] == [parent["id"]] and child["state"] == "AWAITING_PARENTS"
        # list, by id and by parent, and read one
        listed = api.ok("GET", "/jobs/", params={"id": [parent["id"], child["id"]]})["results"]
        assert sorted(job["id"] for job in listed) == [parent["id"], child["id"]]
        assert [job["id"] for job in api.ok("GET", "/jobs/", params={"parent_id": parent["id"]})["results"]] == [child["id"]]
        assert api.job(child["id"])["parent_ids"] == [parent["id"]]
        # bulk PATCH by id, then a session (its id past 2**31 too) acquires the jobs and reports under its lease
        assert api.patch_states([parent["id"], plain["id"]], "PREPROCESSED") == 2
        session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
        assert session["id"] > 2**31
        assert api.ok("GET", "/sessions/", params={"id": session["id"]})["results"][0]["id"] == session["id"]
        acquired = api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 10, "filter_tags": {}})
        assert sorted(job["id"] for job in acquired) == [parent["id"], plain["id"]]
        api.ok("PUT", f"/sessions/{session['id']}", json={"job_ids": [parent["id"], plain["id"]]})
        lease = {"session_id": session["id"]}
        for state in ("RUNNING", "RUN_DONE"):
            assert api.ok("PATCH", "/jobs/", json=[{"id": parent["id"], "state": state, **lease}]) == 1
        assert api.ok("PUT", f"/jobs/{parent['id']}", json={"state": "POSTPROCESSED"}) == 1
        assert api.job(parent["id"])["state"] == "JOB_FINISHED"
        # The finished parent released its child, whose stage-in (a transfer item past 2**31) is pending.
        assert api.job(child["id"])["state"] == "READY"
        (item,) = api.ok("GET", "/transfers/", params={"job_id": child["id"]})["results"]
        assert item["id"] > 2**31
        assert api.ok("GET", "/transfers/", params={"id": item["id"]})["results"] == [item]
        (done,) = api.ok("PATCH", "/transfers/", json=[{"id": item["id"], "state": "done"}])
        assert done["state"] == "done" and api.job(child["id"])["state"] == "STAGED_IN"
        # events, by job and by id
        events = api.events(job_id=parent["id"], ordering="timestamp")
        assert [e["to_state"] for e in events] == ["STAGED_IN", "PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED",
                                                   "JOB_FINISHED"]
        assert all(e["id"] > 2**31 and e["job_id"] == parent["id"] for e in events)
        assert [e["id"] for e in api.events(id=events[0]["id"])] == [events[0]["id"]]
        # delete by query and by id
        api.ok("DELETE", f"/sessions/{session['id']}", 204)
        assert api.ok("DELETE", "/jobs/", params={"id": [plain["id"], child["id"]]}) == 2
        api.ok("DELETE", f"/jobs/{parent['id']}", 204)
        assert api.ok("GET", "/jobs/", params={"app_id": app["id"]})["count"] == 0
        # ids beyond 64 bits are refused, naming the parameter
        resp = api.http.get("/jobs/", params={"id": 2**63})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "id"]
    finally:
        api.close()


def test_ids_past_2_31_are_accepted_where_they_name_jobs_events_transfers_and_sessions(api: Api) -> None:
    """Both backends: an id past 2**31 in a filter or a body is an id like another (nothing found),
    not a 422 (before, only 32-bit values were accepted)."""
    big = 2**31 + 7
    for path, name in (("/jobs/", "id"), ("/jobs/", "parent_id"), ("/events/", "job_id"), ("/events/", "id"),
                       ("/transfers/", "job_id"), ("/transfers/", "id"), ("/sessions/", "id")):
        assert api.ok("GET", path, params={name: big})["count"] == 0, (path, name)
    resp = api.http.patch("/jobs/", json=[{"id": big, "state": "RUNNING"}])
    assert resp.status_code == 404 and resp.json()["refused_ids"] == [big]
    resp = api.http.patch("/transfers/", json=[{"id": big, "state": "done"}])
    assert resp.status_code == 404, resp.text
    site = api.site()
    app = api.app(site["id"])
    resp = api.http.post("/jobs/", json=[{"workdir": f"x/{uuid.uuid4().hex[:6]}", "app_id": app["id"], "parent_ids": [big]}])
    assert resp.status_code == 404 and "Parent job not found" in resp.text


def test_a_parent_id_out_of_range_is_named_at_its_position_in_the_request(api: Api) -> None:
    """The error's location is the index in the body's own list (not in the sorted set of ids)."""
    site = api.site()
    app = api.app(site["id"])
    too_big = 2**63
    resp = api.http.post("/jobs/", json=[{"workdir": "x/p", "app_id": app["id"], "parent_ids": [9, too_big, 3]}])
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", 0, "parent_ids", 1] and "out of" in error["msg"], error
