"""The bulk update path's helpers: ids sent as one parameter, rows inserted through the DBAPI's
executemany and rows updated with different values each (both backends, stored and read back as
SQLAlchemy's own inserts and updates store them), and the direct parser of launcher-shaped job
updates (the same result as the general one, or None)."""

from __future__ import annotations

import datetime as dt
from typing import Iterator

import pytest
import sqlalchemy as sa

from balsam.models import Job
from balsam.serialization import partial_from_dict
from balsam.server.db import bulk_insert, create_db_engine, id_in, update_rows_by_id
from balsam.server.jobs_logic import UPDATE_FIELDS, _fast_state_patch, parse_job_patch
from balsam.server.tables import JSONType, UTCDateTime

metadata = sa.MetaData()
items = sa.Table(
    "bulk_sql_items", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("timestamp", UTCDateTime, nullable=False),
    sa.Column("label", sa.String(32), nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("count", sa.Integer, nullable=True),
    sa.Column("extra", JSONType, nullable=True),
)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_db_engine(database_url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    yield engine
    metadata.drop_all(engine)
    engine.dispose()


STAMP = dt.datetime(2026, 12, 1, 4, 5, 6, 789012, tzinfo=dt.timezone.utc)


def test_id_in_matches_exactly_the_listed_ids(engine):
    with engine.begin() as conn:
        conn.execute(sa.insert(items), [{"id": i, "timestamp": STAMP, "label": "x", "data": {}} for i in range(1, 6)])
        dialect = conn.dialect.name
        assert sorted(conn.execute(sa.select(items.c.id).where(id_in(items.c.id, [1, 4, 10**9], dialect))).scalars()) == [1, 4]
        assert list(conn.execute(sa.select(items.c.id).where(id_in(items.c.id, [], dialect))).scalars()) == []
        # Two lists in one statement keep their own values.
        both = sa.select(items.c.id).where(id_in(items.c.id, [1, 2, 3], dialect), id_in(items.c.id, [3, 4, 5], dialect))
        assert list(conn.execute(both).scalars()) == [3]
        conn.execute(sa.update(items).where(id_in(items.c.id, [2, 3], dialect)).values(label="y"))
        assert list(conn.execute(sa.select(items.c.id).where(items.c.label == "y").order_by(items.c.id)).scalars()) == [2, 3]


def test_bulk_insert_stores_rows_as_sqlalchemy_does(engine):
    naive = dt.datetime(2026, 12, 1, 5, 0, 0)  # naive: taken as UTC
    with engine.begin() as conn:
        bulk_insert(conn, items, [
            {"timestamp": STAMP, "label": "a", "data": {"num_nodes": 1, "text": "é \" '"}},
            {"timestamp": naive, "label": "b", "data": {}},
        ])
        conn.execute(sa.insert(items), [{"timestamp": STAMP, "label": "c", "data": {"num_nodes": 1, "text": "é \" '"}}])
        rows = conn.execute(sa.select(items.c.timestamp, items.c.label, items.c.data).order_by(items.c.id)).all()
        assert [tuple(r) for r in rows] == [
            (STAMP, "a", {"num_nodes": 1, "text": "é \" '"}),
            (naive.replace(tzinfo=dt.timezone.utc), "b", {}),
            (STAMP, "c", {"num_nodes": 1, "text": "é \" '"}),
        ]
        # The stored text itself is the same (filters and orderings compare it).
        raw = [tuple(r) for r in conn.execute(sa.text("SELECT CAST(timestamp AS TEXT), CAST(data AS TEXT) FROM bulk_sql_items"
                                                      " WHERE label IN ('a', 'c')"))]
        assert raw[0] == raw[1]
        later = conn.execute(sa.select(items.c.label).where(items.c.timestamp > STAMP)).scalars()
        assert list(later) == ["b"]


def test_update_rows_by_id_stores_values_as_sqlalchemy_does(engine):
    naive = dt.datetime(2026, 12, 1, 5, 0, 0)  # naive: taken as UTC
    later = STAMP + dt.timedelta(hours=1)
    changes = [  # (row values for update_rows_by_id, the same as SQLAlchemy's own UPDATE)
        {"data": {"result": 1, "text": "é \" '\\"}, "note": "it's"},
        {"data": {"result": 2, "text": "é \" '\\"}, "note": None},  # same columns, other values: one statement
        {"timestamp": naive, "count": 7, "extra": None},  # JSON None: a JSON null, as SQLAlchemy stores it
        {"timestamp": later, "count": None, "extra": [1, {"a": None}], "label": "z"},
        {},  # nothing to change
    ]
    n = len(changes)
    with engine.begin() as conn:
        rows = [{"id": i, "timestamp": STAMP, "label": "x", "data": {}, "note": "n", "count": 1, "extra": {}}
                for i in range(1, 2 * n + 1)]
        conn.execute(sa.insert(items), rows)
        update_rows_by_id(conn, items, {i + 1: values for i, values in enumerate(changes)})
        for i, values in enumerate(changes):
            if values:
                conn.execute(sa.update(items).where(items.c.id == n + i + 1).values(**values))
        got = [tuple(r) for r in conn.execute(sa.select(items).order_by(items.c.id))]
        assert [r[1:] for r in got[:n]] == [r[1:] for r in got[n:]]
        assert got[2][1] == naive.replace(tzinfo=dt.timezone.utc) and got[3][1] == later
        assert got[0][3] == {"result": 1, "text": "é \" '\\"} and got[3][6] == [1, {"a": None}]
        # The stored text itself is the same (JSON null, not SQL NULL, in the first half too).
        text = sa.text("SELECT id, CAST(timestamp AS TEXT), CAST(data AS TEXT), note, count, CAST(extra AS TEXT),"
                       " extra IS NULL FROM bulk_sql_items ORDER BY id")
        raw = [tuple(r)[1:] for r in conn.execute(text)]
        assert raw[:n] == raw[n:]
        assert raw[2][4] == "null" and not raw[2][5]


@pytest.mark.parametrize("item", [
    {"id": 7, "state": "RUNNING", "state_timestamp": "2026-12-01T04:05:06.789012+00:00", "state_data": {"num_nodes": 1}},
    {"id": 7, "state": "RUN_DONE", "state_timestamp": "2026-12-01T04:05:06Z", "return_code": 0},
    {"id": 7, "state": "RUN_ERROR", "state_timestamp": "2026-12-01T04:05:06", "return_code": -9,
     "state_data": {"returncode": -9, "error": "tail"}},
    {"state": "POSTPROCESSED", "id": 2**31 - 1},
    {"state": "RUNNING", "id": 2**31 + 5},  # job ids are 64-bit
    {"id": 7, "return_code": 3},
])
def test_launcher_shaped_patches_parse_as_the_general_path_parses_them(item):
    fast = _fast_state_patch(item)
    general = partial_from_dict(Job, {k: v for k, v in item.items() if k != "id"}, allowed=UPDATE_FIELDS)
    general["id"] = item["id"]
    assert fast == general and list(fast) == list(general)
    assert parse_job_patch(item, ["body", 0], allow_id=True) == general


@pytest.mark.parametrize("item", [
    {"id": 7, "state": "running"}, {"id": 7, "state": None}, {"id": 7.0, "state": "RUNNING"}, {"id": True},
    {"id": 2**63, "state": "RUNNING"}, {"id": 7, "return_code": 2**31}, {"id": 7, "return_code": None},
    {"id": 7, "state_timestamp": "yesterday"}, {"id": 7, "state_timestamp": None}, {"id": 7, "state_data": None},
    {"id": 7, "state_data": []}, {"id": 7, "tags": {}}, {"state": "RUNNING"}, [],
])
def test_anything_else_goes_to_the_general_path(item):
    assert _fast_state_patch(item) is None


def test_id_in_takes_ids_beyond_the_32_bit_columns(engine):
    with engine.begin() as conn:
        conn.execute(sa.insert(items), [{"id": 1, "timestamp": STAMP, "label": "x", "data": {}}])
        found = conn.execute(sa.select(items.c.id).where(id_in(items.c.id, [1, 2**40], conn.dialect.name))).scalars()
        assert list(found) == [1]
