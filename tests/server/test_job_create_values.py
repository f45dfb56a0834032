"""A bulk create stores exactly what was sent (PostgreSQL writes the rows with COPY's text format:
every character that format treats specially must survive), answers what it stored, and writes
one created event per job, whatever mix of fields, apps and sites one request carries."""

from __future__ import annotations

from balsam.serialization import parse_datetime

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
        assert parse_datetime(events[0]["timestamp"]) == parse_datetime(job["last_update"])


#: Values of each create field, good and bad, for the randomized comparison below.
FIELD_VALUES = {
    "workdir": ["a", "a/b", "a b/c", "./a", "a/", "a//b", "a/./b", "/abs", "..", "a/../b", "a..b", ".", "", " ", "\t",
                "x" * 4097, "é/ü", "a\x00b", 5, None],
    "app_id": [1, 0, -1, 2**31 - 1, 2**31, -(2**31) - 1, True, 1.0, "1", None],
    "tags": [{}, {"k": "v"}, {"k": "v" * 1025}, {"k" * 257: "v"}, {"k": 1}, {"a": "b", "c": ""}, [], None],
    "launch_params": [{}, {"cpu_affinity": "depth"}, {"workdir": "p" * 4097}, {"x": "y" * 5000}, {"k": None}, "s"],
    "data": [{}, {"x": [1, {"y": None}]}, {"big": 2**63}, {"t": "t" * 1_048_577}, [], None],
    "serialized_parameters": ["", "abc", "p" * 600_000, 3, None],
    "serialized_return_value": ["", "r"], "serialized_exception": ["", None],
    "return_code": [None, 0, -1, 2**31, "0", 1.5], "batch_job_id": [None, 3, -(2**31) - 1, False],
    "num_nodes": [1, 2, 0, -1, 2**31, 1.0, True, "2"], "ranks_per_node": [1, 64],
    "threads_per_rank": [1, 0], "threads_per_core": [1, 2], "node_packing_count": [1, 8, 0],
    "wall_time_min": [0, 30, -1, 2**31], "gpus_per_rank": [0.0, 0.5, 0, 1, -0.5, -1, True, "1", None],
    "pending_file_cleanup": [True, False, 0, None], "parent_ids": [[], [1, 2], [2, 1], [1, 1], [1, "2"], [2**31], {}, None],
    "id": [None, 0, 5], "state": [None, "", "RUNNING"], "last_update": [None], "state_timestamp": [None, ""],
    "state_data": [{}, {"a": 1}], "transfers": [{}, {"in": "g:/x"}], "unknown_field": [1],
}


def _random_item(rng: "random.Random", base: dict) -> dict:
    item = dict(base)
    for name in rng.sample(sorted(FIELD_VALUES), rng.randint(0, 4)):
        item[name] = rng.choice(FIELD_VALUES[name])
    for name in ("workdir", "app_id"):
        if rng.random() < 0.05:
            item.pop(name, None)
    return item


def test_column_checks_agree_with_the_item_checks():
    """``_fast_columns`` accepts a payload only when ``_fast_spec`` takes every item as it is, and
    accepts the payloads launchers, our client and the 0.7 client send."""
    import random

    from balsam.server.jobs_logic import _fast_columns, _fast_spec, parse_job_creates

    rng = random.Random(14)
    bases = [
        {"workdir": "w", "app_id": 1},
        {"workdir": "w", "app_id": 1, "tags": {"raw": "t"}, "serialized_parameters": "", "data": {}, "parent_ids": [],
         "transfers": {}},
        {"workdir": "w", "app_id": 1, "tags": {}, "serialized_parameters": "", "data": {}, "return_code": None,
         "num_nodes": 1, "ranks_per_node": 1, "threads_per_rank": 1, "threads_per_core": 1, "launch_params": {},
         "gpus_per_rank": 0.0, "node_packing_count": 1, "wall_time_min": 0, "parent_ids": [], "transfers": {}},
    ]
    accepted = unchanged = 0
    for round_ in range(3000):
        base = bases[round_ % len(bases)]
        n = rng.randint(1, 4)
        good = [dict(base, workdir=f"w/{round_}/{i}") for i in range(n)]
        payload = [_random_item(rng, item) if rng.random() < 0.5 else item for item in good]
        columns = _fast_columns(payload)
        items = [_fast_spec(item) for item in payload]
        unchanged += all(spec is item for spec, item in zip(items, payload))
        if columns is not None:
            accepted += 1
            assert all(spec is item for spec, item in zip(items, payload)), payload
            assert columns == payload
        if columns is not None or all(spec is not None for spec in items):
            assert parse_job_creates(payload) == [spec for spec in items]
    # It may leave a payload to the item checks (a '..' in a workdir, a long launch parameter), rarely.
    assert accepted >= 0.95 * unchanged > 1000
    for base in bases:
        payload = [dict(base, workdir=f"b/{i}", tags={"k": str(i)}) for i in range(100)]
        assert _fast_columns(payload) == payload


def test_postgres_column_defaults_are_the_models(database_url):
    """A PostgreSQL bulk create leaves out the fields no job of the request gives: their column
    defaults (migration 0009) must be what the model says (a job left out of nothing else stores them)."""
    import pytest
    import sqlalchemy as sa

    from balsam.server.db import create_db_engine
    from balsam.server.jobs_logic import _COPY_FIELDS, CREATE_DEFAULTS

    if not database_url.startswith("postgres"):
        pytest.skip("SQLite creates give every column (no COPY)")
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            # Each default as its column stores it (a bare 0.0 would read as numeric).
            found = dict(conn.execute(sa.text(
                "SELECT table_name || '.' || column_name, 'CAST(' || column_default || ' AS ' || data_type || ')' "
                "FROM information_schema.columns "
                "WHERE table_name IN ('jobs', 'log_events') AND column_default IS NOT NULL")).all())
            for name in _COPY_FIELDS:  # the fields a create may leave out
                default = CREATE_DEFAULTS[name]
                if default is None:
                    assert f"jobs.{name}" not in found, name
                    continue
                value = conn.execute(sa.text(f"SELECT {found[f'jobs.{name}']}")).scalar_one()
                assert value == default and type(value) is type(default), name
            assert conn.execute(sa.text(f"SELECT {found['log_events.data']}")).scalar_one() == {}
    finally:
        engine.dispose()


def test_copy_errors_are_sqlalchemy_errors(database_url):
    """A COPY the database refuses raises SQLAlchemy's exception for it (the server answers an
    IntegrityError 409, as for its other statements), and the transaction stays usable to roll back."""
    import pytest
    import sqlalchemy as sa

    from balsam.server.db import create_db_engine
    from balsam.server.pg_copy import copy_rows

    if not database_url.startswith("postgres"):
        pytest.skip("COPY is PostgreSQL's")
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            with pytest.raises(sa.exc.IntegrityError, match="log_events"):
                with conn.begin():
                    with conn.connection.dbapi_connection.cursor() as cur:
                        copy_rows(conn, cur, "log_events", ["job_id", "timestamp", "from_state", "to_state"],
                                  "987654\t2026-12-01T00:00:00+00:00\tCREATED\tSTAGED_IN\n")
            assert conn.execute(sa.text("SELECT count(*) FROM log_events")).scalar_one() == 0
    finally:
        engine.dispose()


def test_an_instant_that_utc_puts_past_year_1_or_9999_is_held_at_the_edge():
    """Valid ISO-8601 that a datetime cannot hold in UTC (found by the schema fuzzing: a PATCH with
    this state_timestamp was refused with 422): the nearest instant it can hold, not an error."""
    import datetime as dt

    utc = dt.timezone.utc
    assert parse_datetime("0001-01-01T00:00:00+00:01") == dt.datetime.min.replace(tzinfo=utc)
    assert parse_datetime("9999-12-31T23:59:59.999999-00:01") == dt.datetime.max.replace(tzinfo=utc)
    assert parse_datetime("0001-01-01T00:01:00+00:01") == dt.datetime(1, 1, 1, tzinfo=utc)  # inside: exact
