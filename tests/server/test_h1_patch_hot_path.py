"""The bulk job-state PATCH path after its CPU work (issue 14): the same answers as before.

- ``validate_transition`` (now a table built once) gives, for every pair of states, members or wire
  values, strict or forced, the state the rules give, or the same error;
- the size limits of a bulk PATCH (now walked only where an item's own checks do not bound it) fire
  at the same size with the same message and place, before any other error of the items, capped at
  20 in document order;
- the event rows (now converted for SQLite without SQLAlchemy's per-value processors) are stored as
  SQLAlchemy's own insert stores them, byte for byte;
- a bulk PATCH sends as many statements for 200 jobs as for 10 (no per-job query).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from balsam.server.db import bulk_insert, create_db_engine
from balsam.server.tables import JSONType, UTCDateTime
from balsam.states import InvalidTransition, JobState, allowed_targets, validate_transition
from server_testlib import logged_in_test_client, create_site_and_app

S = JobState
#: The limits of the API's contract (docs/rest-api.md), written out.
MAX_TEXT_CHARS = 1_048_576
MAX_KEY_CHARS = 256


# --- the transition table -----------------------------------------------------------------------

def _rules(from_state: Any, to_state: Any, forced: Any) -> JobState:
    """validate_transition as written before the table: derived from the rule sets each time."""
    from_state, to_state = JobState.parse(from_state), JobState.parse(to_state)
    if to_state == S.created:
        raise InvalidTransition(from_state, to_state, "CREATED is only the state before creation")
    if not (from_state == to_state or to_state in allowed_targets(from_state, forced=forced)):
        raise InvalidTransition(from_state, to_state)
    return S.finished if to_state == S.staged_out else to_state


def _outcome(fn: Any, a: Any, b: Any, forced: Any) -> tuple[Any, ...]:
    try:
        result = fn(a, b, forced=forced)
    except Exception as exc:  # noqa: BLE001 - the type and message are what is compared
        return type(exc).__name__, str(exc)
    assert type(result) is JobState
    return "ok", result


def test_the_transition_table_answers_as_the_rules_for_every_pair_of_states():
    values: list[Any] = []
    for state in JobState:
        values += [state, state.value]
    values += ["running", "BOGUS", "", None, 3, [1], {}]  # a member's name, unknown, unhashable
    checked = 0
    for a in values:
        for b in values:
            for forced in (False, True, 0, 1):
                assert _outcome(validate_transition, a, b, forced) == _outcome(_rules, a, b, forced), (a, b, forced)
                checked += 1
    assert checked == len(values) ** 2 * 4
    # A few answers spelled out (the table is not merely equal to a copy of itself).
    assert validate_transition(S.running, S.run_done, forced=False) is S.run_done
    assert validate_transition("POSTPROCESSED", "STAGED_OUT", forced=False) is S.finished
    assert validate_transition(S.running, S.running, forced=False) is S.running
    with pytest.raises(InvalidTransition, match=r"from RUNNING to RESTART_READY \(allowed: FAILED, RUN_DONE, RUN_ERROR, RUN_TIMEOUT\)"):
        validate_transition(S.running, S.restart_ready, forced=True)
    with pytest.raises(InvalidTransition, match="CREATED is only the state before creation"):
        validate_transition(S.created, S.created)


# --- the size limits of a bulk PATCH ----------------------------------------------------------------

def _patch(api: Any, body: Any) -> Any:
    return api.http.request("PATCH", "/jobs/", json=body)


def _launcher_update(job_id: int, **fields: Any) -> dict:
    return {"id": job_id, "state": "RUNNING", "state_timestamp": "2026-12-06T12:00:00+00:00", "session_id": 1, **fields}


@pytest.fixture
def job_ids(api: Any, site_app: Any) -> list[int]:
    _, app = site_app
    return [job["id"] for job in api.jobs(app["id"], 3)]


def test_a_launcher_shaped_update_s_state_data_is_held_to_the_limits(api, job_ids):
    resp = _patch(api, [_launcher_update(job_ids[0]),
                        _launcher_update(job_ids[1], state_data={"ok": 1, "message": "x" * (MAX_TEXT_CHARS + 1)})])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == [{"loc": ["body", 1, "state_data", "message"], "type": "value_error",
                                      "msg": f"longer than {MAX_TEXT_CHARS} characters ({MAX_TEXT_CHARS + 1})"}]
    # At the limit: accepted by the size check (then judged as an update: job 1 is not RUNNING-able
    # from CREATED, so nothing is written).
    resp = _patch(api, [_launcher_update(job_ids[1], state_data={"message": "x" * MAX_TEXT_CHARS})])
    assert resp.status_code == 409, resp.text
    # A key too long, an integer out of 64 bits, nested: each named where it is.
    resp = _patch(api, [_launcher_update(job_ids[0], state_data={"k" * (MAX_KEY_CHARS + 1): 1,
                                                                  "deep": [{"n": 2**63}]})])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == [
        {"loc": ["body", 0, "state_data", "k" * 40 + "..."], "type": "value_error",
         "msg": f"key longer than {MAX_KEY_CHARS} characters ({MAX_KEY_CHARS + 1})"},
        {"loc": ["body", 0, "state_data", "deep", 0, "n"], "type": "value_error", "msg": "integer out of the 64-bit range"},
    ]


def test_a_timestamp_padded_past_the_limit_is_refused_for_its_size(api, job_ids):
    # parse_datetime strips blanks: padded, the value parses, but the size limit holds it first.
    padded = " " * MAX_TEXT_CHARS + "2026-12-06T12:00:00+00:00"
    resp = _patch(api, [_launcher_update(job_ids[0], state_timestamp=padded)])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == [{"loc": ["body", 0, "state_timestamp"], "type": "value_error",
                                      "msg": f"longer than {MAX_TEXT_CHARS} characters ({len(padded)})"}]


def test_size_errors_come_before_the_items_other_errors_in_document_order(api, job_ids):
    long_key = "k" * (MAX_KEY_CHARS + 1)
    body: list[Any] = [{"id": job_ids[0], "state": "BOGUS"}]  # an error of its own, reported after the sizes
    body += [_launcher_update(job_ids[1], state_data={long_key: i}) if i % 2 else
             {"id": job_ids[2], "state": "RUNNING", "workdir": "w" * 5000, "tags": {"t": long_key}}  # general path
             for i in range(24)]
    resp = _patch(api, body)
    assert resp.status_code == 422, resp.text
    expected = []
    for i in range(24):
        if i % 2:
            expected.append(["body", 1 + i, "state_data", "k" * 40 + "..."])
        else:
            expected += [["body", 1 + i, "workdir"]]
    assert [e["loc"] for e in resp.json()["detail"]] == expected  # (all 24: at most 100 are listed)
    # Without the sizes, the item's own error.
    resp = _patch(api, [{"id": job_ids[0], "state": "BOGUS"}, _launcher_update(job_ids[1])])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"][:3] == ["body", 0, "state"]


def test_the_size_walk_stops_after_the_problems_listed(api, job_ids):
    """The walk of a bulk PATCH's values stops at its first problem past the 100 listed: the answer
    says there are more, not how many (counting them walked the whole body), at the loc where
    everything not walked lies: the last item's field, else the whole body."""
    not_checked = {"type": "value_error",
                   "msg": "and more problems (the first 100 are listed; the rest were not checked)"}
    many = {f"k{i}": 2**63 for i in range(150)}
    resp = _patch(api, [_launcher_update(job_ids[1]), _launcher_update(job_ids[0], state_data=many)])
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert len(detail) == 101 and detail[0]["loc"] == ["body", 1, "state_data", "k0"], detail[0]
    assert detail[-1] == {"loc": ["body", 1, "state_data"], **not_checked}, detail[-1]
    resp = _patch(api, [_launcher_update(job_ids[0], state_data=many), _launcher_update(job_ids[1])])
    assert resp.json()["detail"][-1] == {"loc": ["body"], **not_checked}


def test_a_body_that_is_no_list_or_too_long_is_held_to_the_limits_first(api, job_ids):
    resp = _patch(api, {"id": job_ids[0], "note": "x" * (MAX_TEXT_CHARS + 1)})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", "note"]
    resp = _patch(api, {"id": job_ids[0]})
    assert resp.status_code == 422 and "expected a JSON list of job updates" in resp.text, resp.text
    too_many = [_launcher_update(job_ids[0])] * 5001
    too_many[3] = _launcher_update(job_ids[0], state_data={"m": "x" * (MAX_TEXT_CHARS + 1)})
    resp = _patch(api, too_many)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", 3, "state_data", "m"]
    resp = _patch(api, [_launcher_update(job_ids[0])] * 5001)
    assert resp.status_code == 400 and "more than 5000" in resp.text, resp.text


# --- the event rows: stored as SQLAlchemy stores them ---------------------------------------------

metadata = sa.MetaData()
rows_table = sa.Table(
    "h1_bulk_rows", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(32), nullable=False),
    sa.Column("timestamp", UTCDateTime, nullable=True),
    sa.Column("data", JSONType, nullable=True),
)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_db_engine(database_url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    yield engine
    metadata.drop_all(engine)
    engine.dispose()


TIMES = [
    dt.datetime(2026, 12, 6, 12, 0, 0, 0, tzinfo=dt.timezone.utc),  # no microseconds
    dt.datetime(2026, 12, 6, 12, 0, 0, 1, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 12, 6, 12, 0, 0, 999999),  # naive: UTC
    dt.datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),  # year < 1000
    dt.datetime(2026, 3, 29, 1, 30, tzinfo=ZoneInfo("Europe/Paris")),  # a zone's own rules
    dt.datetime(2026, 12, 31, 23, 59, 59, 500000, tzinfo=dt.timezone(-dt.timedelta(hours=10))),  # next year in UTC
    dt.datetime(2026, 6, 1, tzinfo=dt.timezone(dt.timedelta(0))),  # UTC, another tzinfo object
]
DATA = [{}, {"message": "é \" ' \n \\ \u2028"}, {"num_nodes": 1 / 64, "n": [1, None, True]}, {"nested": {"a": {"b": []}}},
        ["a", "list"], "text", 3]


def _stored(conn: sa.Connection, label: str) -> list[tuple]:
    return [tuple(r) for r in conn.execute(sa.text(
        "SELECT CAST(timestamp AS TEXT), CAST(data AS TEXT) FROM h1_bulk_rows WHERE label = :label ORDER BY id"),
        {"label": label})]


def test_bulk_insert_stores_every_value_as_sqlalchemy_s_insert_does(engine):
    rows = [{"timestamp": TIMES[i % len(TIMES)], "data": DATA[i % len(DATA)]} for i in range(len(TIMES) * len(DATA))]
    with engine.begin() as conn:
        bulk_insert(conn, rows_table, [{"label": "bulk", **row} for row in rows])
        conn.execute(sa.insert(rows_table), [{"label": "sqlalchemy", **row} for row in rows])
        assert _stored(conn, "bulk") == _stored(conn, "sqlalchemy")
        # None is SQL NULL in bulk_insert's rows, a JSON column's too (SQLAlchemy's insert stores
        # JSON 'null' there): as it always was, on both backends.
        bulk_insert(conn, rows_table, [{"label": "none", "timestamp": None, "data": None}])
        assert _stored(conn, "none") == [(None, None)]
        back = conn.execute(sa.select(rows_table.c.timestamp).where(rows_table.c.label == "bulk").order_by(rows_table.c.id))
        assert [t for t in back.scalars()][:len(TIMES)] == [t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc) for t in TIMES]
        # One column only.
        bulk_insert(conn, rows_table, [{"label": "one"}] * 3)
        assert conn.execute(sa.select(sa.func.count()).where(rows_table.c.label == "one")).scalar_one() == 3


# --- bulk stays bulk --------------------------------------------------------------------------------

def test_a_bulk_patch_sends_as_many_statements_for_200_jobs_as_for_10(tmp_path):
    with logged_in_test_client(f"sqlite:///{tmp_path / 'b.db'}", uuid.uuid4().hex * 2) as (client, app):
        _, app_id = create_site_and_app(client)
        engine = app.state.engine
        counts = []
        for n in (10, 200):
            ids = [j["id"] for j in client.post("/jobs/", json=[{"workdir": f"w{n}/{i}", "app_id": app_id}
                                                                for i in range(n)]).json()]
            assert client.put("/jobs/", params={"workdir__contains": f"w{n}/"}, json={"state": "PREPROCESSED"}).status_code == 200
            now = dt.datetime.now(dt.timezone.utc)
            body = [{"id": i, "state": "RUNNING", "state_timestamp": (now + dt.timedelta(microseconds=k)).isoformat()}
                    for k, i in enumerate(ids)]
            body += [{"id": i, "state": "RUN_DONE", "return_code": 0, "state_data": {"k": k}} for k, i in enumerate(ids)]
            sent: list[str] = []
            record = lambda conn, cursor, statement, *rest: sent.append(statement)  # noqa: E731
            sa.event.listen(engine, "before_cursor_execute", record)
            try:
                resp = client.patch("/jobs/", json=body)
            finally:
                sa.event.remove(engine, "before_cursor_execute", record)
            assert resp.status_code == 200 and resp.json() == n, resp.text
            counts.append(len(sent))
            events = client.get("/events/", params={"to_state": "RUN_DONE", "limit": 1000}).json()["results"]
            assert sorted(e["job_id"] for e in events if e["job_id"] in set(ids)) == sorted(ids)
        assert counts[0] == counts[1], counts
