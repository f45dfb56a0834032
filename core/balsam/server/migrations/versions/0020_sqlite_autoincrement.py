"""SQLite: ``batch_jobs`` and ``sessions`` get back their ``AUTOINCREMENT``, so that a deleted
BatchJob's or Session's id is never given to a new one (as PostgreSQL's sequences never do).

Migration 0001 made every table with an id ``AUTOINCREMENT`` on SQLite. Migrations 0002 (the 64-bit
``batch_jobs.scheduler_id``) and 0016 (``sessions.clock_restarted``) changed these two tables with
``batch_alter_table``, which on SQLite copies the table into a new one built from what it reads
back of the old, and that has no ``AUTOINCREMENT``: a database migrated to 0019, and a new one
(which runs every migration), gave a new row ``max(id) + 1``. Deleting the newest BatchJob gave its
id to the next one, and the site agent took the old one's submit marker
(``qlaunchNNNNN.sh.scheduler_id``) for the new one's and finished it with the old Slurm job's state;
deleting the newest Session gave its id to the next one, and a launcher still heartbeating the
deleted session kept another launcher's session alive (a session is found by id and user only).
The other tables with an id (users, sites, apps, jobs, log_events, transfer_items, credentials)
kept theirs (``tests/server/test_migration_autoincrement.py`` checks every one).

Each table is built again with ``AUTOINCREMENT``, with the same columns, constraints and indexes
(the indexes, and any trigger on the table, are read from ``sqlite_master`` and created again as
they were). Not with ``batch_alter_table``: its copy drops the old table, and SQLite's
``DROP TABLE`` deletes the rows first, which runs the ``ON DELETE`` actions of the tables that refer
to it (``PRAGMA foreign_keys`` is ON on the server's connections, and cannot be turned off inside
the migration's transaction). That is how 0016 emptied ``jobs.session_id`` (every leased job lost
its lease) and 0002 ``jobs.batch_job_id`` and ``sessions.batch_job_id`` on a database that had
rows. Here, with ``PRAGMA defer_foreign_keys`` (until the transaction ends), the rows are copied
aside, the old table's ids are negated (an ``ON UPDATE`` of these keys is NO ACTION: nothing is
changed, the referring rows only count as dangling), the old table is dropped (its rows' negated
ids match no referring row: no ``ON DELETE`` action runs), and the rows are inserted into the new
table with their ids (each referring row counts as resolved again). A reference left dangling would
fail the commit: the migration is one transaction, and fails whole. The tables hold a row per batch
job and per launcher run: 20,000 of each, with 200,000 jobs referring to them, took 0.5 s.

The table's ``sqlite_sequence`` entry (the highest id it has given) is set to the highest id any
table still records: its own ids, the references to it (``jobs``, ``sessions``, ``credentials``),
``jobs.released_from_session_id`` (no foreign key), and the ids that creates with an
``Idempotency-Key`` recorded (kept after the row is deleted, until the key expires), and never lower
than an entry ``sqlite_sequence`` may still hold for it. An id deleted before this migration, above
all of these, may still be given once more (at most the ids up to the highest one deleted); no id
deleted after it.

PostgreSQL: nothing to do (serial ids come from sequences, never reused). The downgrade leaves the
tables as they are: revision 0019's code reads and writes them the same, and building them again
without ``AUTOINCREMENT`` would only bring back the reuse of ids.

Revision ID: 0020_sqlite_autoincrement
Revises: 0019_lease_check_full_join
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

import balsam.server.tables

revision = '0020_sqlite_autoincrement'
down_revision = '0019_lease_check_full_join'
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
_DATETIME = balsam.server.tables.UTCDateTime(timezone=True)


def _batch_jobs_columns() -> list:
    """``batch_jobs`` at revision 0019 (spelled out: a migration keeps the schema of its day)."""
    return [
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('scheduler_id', sa.BigInteger(), nullable=True),
        sa.Column('project', sa.Text(), nullable=False),
        sa.Column('queue', sa.Text(), nullable=False),
        sa.Column('optional_params', _JSON, nullable=False),
        sa.Column('num_nodes', sa.Integer(), nullable=False),
        sa.Column('wall_time_min', sa.Integer(), nullable=False),
        sa.Column('job_mode', sa.String(length=16), nullable=False),
        sa.Column('partitions', _JSON, nullable=True),
        sa.Column('filter_tags', _JSON, nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('status_info', _JSON, nullable=False),
        sa.Column('start_time', _DATETIME, nullable=True),
        sa.Column('end_time', _DATETIME, nullable=True),
        sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name='fk_batch_jobs_site_id_sites', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_batch_jobs'),
    ]


def _sessions_columns() -> list:
    """``sessions`` at revision 0019."""
    return [
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('batch_job_id', sa.Integer(), nullable=True),
        sa.Column('heartbeat', _DATETIME, nullable=False),
        sa.Column('clock_restarted', sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name='fk_sessions_site_id_sites', ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['batch_job_id'], ['batch_jobs.id'], name='fk_sessions_batch_job_id_batch_jobs',
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name='pk_sessions'),
    ]


#: table -> (its definition, the other records of its ids: SQL expressions, each one value).
REBUILT = {
    'batch_jobs': (_batch_jobs_columns, [
        "SELECT max(batch_job_id) FROM jobs",
        "SELECT max(batch_job_id) FROM sessions",
        "SELECT max(batch_job_id) FROM credentials",
        "SELECT max(j.value) FROM idempotency_keys AS k, json_each(k.resource_ids) AS j "
        "WHERE k.resource IN ('BatchJob', 'batch_job')",
    ]),
    'sessions': (_sessions_columns, [
        "SELECT max(session_id) FROM jobs",
        "SELECT max(released_from_session_id) FROM jobs WHERE released_from_session_id IS NOT NULL",
        "SELECT max(j.value) FROM idempotency_keys AS k, json_each(k.resource_ids) AS j "
        "WHERE k.resource IN ('Session', 'session')",
    ]),
}
HOLD_PREFIX = '_balsam_0020_hold_'


def is_autoincrement(conn: sa.Connection, table: str) -> bool:
    """Whether SQLite ``table`` was created ``AUTOINCREMENT``."""
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).scalar()
    return sql is not None and 'AUTOINCREMENT' in sql.upper()


def _highest_id(conn: sa.Connection, table: str, records: list[str]) -> int:
    """The highest id ``table`` has given that anything still records (see the docstring)."""
    values = [conn.exec_driver_sql(f'SELECT max(id) FROM "{table}"').scalar(),
              conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).scalar()]
    values += [conn.exec_driver_sql(sql).scalar() for sql in records]
    return max([int(v) for v in values if v is not None], default=0)


def _rebuild(conn: sa.Connection, table: str, columns, records: list[str]) -> None:
    present = [row[1] for row in conn.exec_driver_sql(f'PRAGMA table_info("{table}")')]
    names = [c.name for c in columns() if isinstance(c, sa.Column)]
    if sorted(present) != sorted(names):
        # Altered outside balsam's migrations: copying the known columns would lose the others.
        raise RuntimeError(f"table {table} has columns {present}, migration 0020 expects {names}: not rebuilt")
    # What dropping the table drops with it, to be created again as it was (the indexes of its
    # constraints, sqlite_autoindex_*, have no SQL: the new table's constraints make them).
    again = [sql for (sql,) in conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND tbl_name = ? AND sql IS NOT NULL "
        "ORDER BY type, name", (table,))]
    highest = _highest_id(conn, table, records)
    count = conn.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
    column_list = ", ".join(f'"{name}"' for name in names)
    hold = HOLD_PREFIX + table

    op.create_table(hold, *columns())
    conn.exec_driver_sql(f'INSERT INTO "{hold}" ({column_list}) SELECT {column_list} FROM "{table}"')
    # Negated ids: the referring rows dangle (deferred) rather than lose their reference on the drop.
    conn.exec_driver_sql(f'UPDATE "{table}" SET id = -id')
    op.drop_table(table)
    op.create_table(table, *columns(), sqlite_autoincrement=True)
    conn.exec_driver_sql(f'INSERT INTO "{table}" ({column_list}) SELECT {column_list} FROM "{hold}" ORDER BY id')
    op.drop_table(hold)
    for sql in again:
        conn.exec_driver_sql(sql)
    copied = conn.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
    if copied != count:
        raise RuntimeError(f"table {table}: {count} rows before the rebuild, {copied} after")
    conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
    conn.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, highest))


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    todo = [table for table in REBUILT if not is_autoincrement(conn, table)]
    if not todo:
        return
    # Until the transaction ends (SQLite turns it off at COMMIT or ROLLBACK): the foreign keys are
    # checked at the commit, when every reference has its row again.
    conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
    for table in todo:  # batch_jobs before sessions, which refers to it
        columns, records = REBUILT[table]
        _rebuild(conn, table, columns, records)


def downgrade() -> None:
    pass
