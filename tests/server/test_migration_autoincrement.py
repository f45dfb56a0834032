"""Ids are never reused: on SQLite every table with an id is ``AUTOINCREMENT`` after the migrations
(migrations 0002 and 0016 had lost it on ``batch_jobs`` and ``sessions``; migration 0020 builds them
again), on a new database and on one migrated with rows in it; PostgreSQL's ids come from sequences.

The rebuild of a populated database keeps every row, reference (``jobs.session_id`` and
``batch_job_id``, ``sessions.batch_job_id``, ``credentials.batch_job_id``: a plain table copy emptied
them through their ``ON DELETE`` actions), column, foreign key, index and trigger, and sets each
table's ``sqlite_sequence`` to the highest id anything recorded."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from balsam.server.db import create_db_engine
from balsam.server.migrate import alembic_config, head_revision, load_migration, upgrade, upgrade_engine
from balsam.server.tables import metadata

BEFORE = "0019_lease_check_full_join"

#: The tables whose ids PostgreSQL draws from a sequence (an integer primary key ``id``).
ID_TABLES = sorted(t.name for t in metadata.sorted_tables
                   if [c.name for c in t.primary_key.columns] == ["id"] and t.c.id.autoincrement in (True, "auto"))
#: Those an API user creates and deletes (ids seen outside the server); the others are internal.
USER_TABLES = {"users", "sites", "apps", "batch_jobs", "sessions", "jobs", "log_events", "transfer_items", "credentials"}
#: Append-only counters' deltas, written on PostgreSQL only (SQLite keeps the counts in place).
INTERNAL = {"job_count_deltas", "job_tag_count_deltas"}


def test_id_tables_are_the_expected_ones():
    assert set(ID_TABLES) == USER_TABLES | INTERNAL


def _table_sql(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as c:
        return dict(c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))


def _sqlite_path(url: str) -> Path:
    return Path(url.split("///", 1)[1])


@pytest.mark.parametrize("path", ["alembic upgrade", "embedded server"])
def test_new_sqlite_database_autoincrements_every_id_table(tmp_path, path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    if path == "alembic upgrade":
        assert upgrade(url) == head_revision()
    else:  # what the server does with BALSAM_SERVER_CREATE_TABLES (balsam.server.app)
        engine = create_db_engine(url)
        try:
            upgrade_engine(engine)
        finally:
            engine.dispose()
    sql = _table_sql(_sqlite_path(url))
    missing = [t for t in sorted(USER_TABLES) if "AUTOINCREMENT" not in sql[t].upper()]
    assert missing == []
    with sqlite3.connect(_sqlite_path(url)) as c:
        indexes = {name for (name,) in c.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('batch_jobs', 'sessions')")}
        triggers = {name for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert not [t for (t,) in c.execute("SELECT name FROM sqlite_master WHERE name LIKE '_balsam_0020_%'")]
    assert indexes == {"ix_batch_jobs_scheduler_id", "ix_batch_jobs_site_id", "ix_batch_jobs_state",
                       "ix_sessions_batch_job_id", "ix_sessions_heartbeat", "ix_sessions_site_id"}
    assert {"job_counts_insert", "job_counts_update", "job_counts_delete", "job_tag_counts_insert",
            "job_tag_counts_update", "job_tag_counts_delete"} <= triggers


# -- a database at revision 0019 with rows in it -------------------------------------------------

_JOB_COLUMNS = ("site_id, app_id, session_id, batch_job_id, workdir, tags, serialized_parameters, data, num_nodes, "
                "ranks_per_node, threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, "
                "wall_time_min, parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, "
                "last_update, released_from_session_id")


def _seed_0019(path: Path) -> None:
    """Batch jobs 1-4 (4 deleted: the highest, whose id 0019 would give again), sessions 1-3 (3
    deleted), jobs leased by session 1 of batch job 2, a launcher credential of batch job 3, and
    idempotency keys that recorded the creates of batch job 7 and session 9 (both since deleted)."""
    c = sqlite3.connect(path)
    c.isolation_level = None
    c.execute("PRAGMA foreign_keys = ON")
    c.execute("INSERT INTO users (username, date_joined) VALUES ('u', '2026-12-01 00:00:00')")
    c.execute("INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
              "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) "
              "VALUES (1, 's', '/p', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01')")
    c.execute("INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
              "VALUES (1, 'a', '', '', '', '{}', '{}')")
    for n in range(1, 5):
        c.execute("INSERT INTO batch_jobs (site_id, scheduler_id, project, queue, optional_params, num_nodes, "
                  "wall_time_min, job_mode, partitions, filter_tags, state, status_info, start_time) "
                  f"VALUES (1, {1000 + n}, 'p', 'q', '{{}}', {n}, 30, 'mpi', NULL, '{{\"n\": \"{n}\"}}', "
                  f"'running', '{{}}', '2026-12-0{n} 10:00:00')")
    for bj in (2, None, 4):
        c.execute("INSERT INTO sessions (site_id, batch_job_id, heartbeat) VALUES (1, ?, '2026-12-06 00:00:00')", (bj,))
    for session, bj, released in ((1, 2, None), (1, 2, None), (None, 2, 2), (None, None, None)):
        c.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (1, 1, ?, ?, 'w', '{{\"k\": \"v\"}}', '', '{{}}', 1, 1, 1, "
                  "1, '{}', 0, 1, 1, '[]', 'RUNNING', 0, '', '', '2026-12-06 00:00:00', ?)", (session, bj, released))
    c.execute("INSERT INTO credentials (user_id, kind, site_id, batch_job_id, label, created, expires) "
              "VALUES (1, 'launcher', 1, 3, 'l', '2026-12-01', '2030-01-01')")
    for key, resource, ids in (("k1", "BatchJob", [7]), ("k2", "Session", [9]), ("k3", "jobs", [[1, 4]])):
        c.execute("INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, resource, resource_ids, "
                  "created, expires) VALUES (1, ?, 'h', 201, ?, ?, '2026-12-06', '2030-01-01')",
                  (key, resource, json.dumps(ids)))
    c.execute("DELETE FROM batch_jobs WHERE id = 4")
    c.execute("DELETE FROM sessions WHERE id = 3")
    c.close()


#: Indexes the migrations after 0019 add (not what 0020's rebuild of the tables must keep as they
#: were): checked to be there, then left out of the comparison.
ADDED_SINCE_0019 = {"ix_jobs_last_update_id"}  # 0025


def _snapshot(path: Path) -> dict:
    with sqlite3.connect(path) as c:
        snap = {"rows": {t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                         for t in ("batch_jobs", "sessions", "jobs", "credentials", "job_counts", "job_tag_counts")}}
        for t in ("batch_jobs", "sessions"):
            snap[f"{t} columns"] = c.execute(f"PRAGMA table_xinfo({t})").fetchall()
            # (id, seq, table, from, to, on_update, on_delete, match) and (seq, name, unique, origin,
            # partial): the order of the constraints and indexes may change, not what they are.
            snap[f"{t} foreign keys"] = sorted(r[2:] for r in c.execute(f"PRAGMA foreign_key_list({t})"))
            snap[f"{t} indexes"] = sorted(r[1:] for r in c.execute(f"PRAGMA index_list({t})"))
        snap["indexes and triggers"] = sorted(c.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type IN ('index', 'trigger')").fetchall())
        snap["referring foreign keys"] = {t: sorted(r[2:] for r in c.execute(f"PRAGMA foreign_key_list({t})"))
                                          for t in ("jobs", "credentials")}
        return snap


def _insert_batch_job(c: sqlite3.Connection) -> int:
    return c.execute("INSERT INTO batch_jobs (site_id, project, queue, optional_params, num_nodes, wall_time_min, "
                     "job_mode, filter_tags, state, status_info) VALUES (1, 'p', 'q', '{}', 1, 1, 'mpi', '{}', "
                     "'pending_submission', '{}') RETURNING id").fetchone()[0]


def _insert_session(c: sqlite3.Connection) -> int:
    return c.execute("INSERT INTO sessions (site_id, heartbeat) VALUES (1, '2026-12-07') RETURNING id").fetchone()[0]


def test_revision_0019_reuses_the_deleted_ids(tmp_path):
    """What migration 0020 repairs: at 0019 the newest deleted BatchJob's and Session's ids come back."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, BEFORE)
    path = _sqlite_path(url)
    _seed_0019(path)
    sql = _table_sql(path)
    assert "AUTOINCREMENT" not in sql["batch_jobs"].upper() and "AUTOINCREMENT" not in sql["sessions"].upper()
    with sqlite3.connect(path) as c:
        assert _insert_batch_job(c) == 4
        assert _insert_session(c) == 3


def test_upgrade_of_a_populated_0019_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, BEFORE)
    path = _sqlite_path(url)
    _seed_0019(path)
    before = _snapshot(path)

    assert upgrade(url) == head_revision()

    after = _snapshot(path)
    added = [r for r in after["indexes and triggers"] if r[1] in ADDED_SINCE_0019]
    assert [r[1] for r in added] == sorted(ADDED_SINCE_0019)
    after["indexes and triggers"] = [r for r in after["indexes and triggers"] if r not in added]
    assert after == before  # rows (references included), columns, foreign keys, indexes, triggers
    assert [r[3:5] for r in after["rows"]["jobs"]] == [(1, 2), (1, 2), (None, 2), (None, None)]
    sql = _table_sql(path)
    assert [t for t in sorted(USER_TABLES) if "AUTOINCREMENT" not in sql[t].upper()] == []
    assert not [t for t in sql if t.startswith("_balsam_0020")]
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA foreign_keys = ON")
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        seq = dict(c.execute("SELECT name, seq FROM sqlite_sequence WHERE name IN ('batch_jobs', 'sessions')"))
        # The highest ids recorded: batch job 7 and session 9 by their creates' idempotency keys.
        assert seq == {"batch_jobs": 7, "sessions": 9}
        assert _insert_batch_job(c) == 8
        assert _insert_session(c) == 10
        c.execute("DELETE FROM batch_jobs WHERE id = 8")
        c.execute("DELETE FROM sessions WHERE id = 10")
        assert _insert_batch_job(c) == 9
        assert _insert_session(c) == 11
        # The ON DELETE actions still run, on the new tables.
        c.execute("DELETE FROM sessions WHERE id = 1")
        assert c.execute("SELECT count(*) FROM jobs WHERE session_id IS NOT NULL").fetchone() == (0,)
        c.execute("DELETE FROM batch_jobs WHERE id = 3")
        assert c.execute("SELECT count(*) FROM credentials").fetchone() == (0,)


def test_sequence_is_at_least_the_highest_id(tmp_path):
    """Without other records, the sequence starts from the highest id in the table."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, BEFORE)
    path = _sqlite_path(url)
    _seed_0019(path)
    with sqlite3.connect(path) as c:
        c.execute("DELETE FROM idempotency_keys")
        c.execute("UPDATE jobs SET released_from_session_id = NULL")
    upgrade(url)
    with sqlite3.connect(path) as c:
        assert dict(c.execute("SELECT name, seq FROM sqlite_sequence WHERE name IN ('batch_jobs', 'sessions')")) == {
            "batch_jobs": 3, "sessions": 2}
        assert _insert_batch_job(c) == 4  # deleted before the migration, above every record: given once more
        assert _insert_session(c) == 3


def test_downgrade_keeps_autoincrement_and_upgrade_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.db'}"
    upgrade(url, BEFORE)
    _seed_0019(_sqlite_path(url))
    upgrade(url)
    with sqlite3.connect(_sqlite_path(url)) as c:
        assert _insert_batch_job(c) == 8
        c.execute("DELETE FROM batch_jobs WHERE id = 8")
    command.downgrade(alembic_config(url), BEFORE)
    assert "AUTOINCREMENT" in _table_sql(_sqlite_path(url))["batch_jobs"].upper()
    assert upgrade(url) == head_revision()
    with sqlite3.connect(_sqlite_path(url)) as c:
        assert _insert_batch_job(c) == 9


def test_unknown_column_refuses_the_rebuild(tmp_path):
    """A table altered outside the migrations is not copied without the columns it does not know."""
    url = f"sqlite:///{tmp_path / 'db.db'}"
    upgrade(url, BEFORE)
    with sqlite3.connect(_sqlite_path(url)) as c:
        c.execute("ALTER TABLE sessions ADD COLUMN note TEXT")
    with pytest.raises(RuntimeError, match="table sessions has columns"):
        upgrade(url)
    engine = create_db_engine(url)
    try:  # one transaction: nothing of 0020 stays (batch_jobs was rebuilt first, and rolled back)
        with engine.connect() as conn:
            assert not load_migration("0020_sqlite_autoincrement.py").is_autoincrement(conn, "batch_jobs")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_ids_come_from_sequences(tmp_path):
    """PostgreSQL: every id table draws from a sequence (never reused); migration 0020 changes nothing."""
    import os

    from scratch_db import scratch_database

    like = os.environ.get("BALSAM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/balsam_test")
    with scratch_database(like, tmp_path, "autoinc") as url:
        upgrade(url, BEFORE)
        engine = create_db_engine(url)
        try:
            def schema() -> list:
                with engine.connect() as conn:
                    return conn.exec_driver_sql(
                        "SELECT table_name, column_name, data_type, column_default, is_nullable "
                        "FROM information_schema.columns WHERE table_schema = current_schema() ORDER BY 1, 2").all()

            at_0019 = schema()
            # To 0020 itself: a later revision may change a column (0021: jobs.data becomes json).
            assert upgrade(url, "0020_sqlite_autoincrement") == "0020_sqlite_autoincrement"
            assert schema() == at_0019
            assert upgrade(url) == head_revision()
            with engine.connect() as conn:
                for table in ID_TABLES:
                    assert conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar(), table
        finally:
            engine.dispose()
