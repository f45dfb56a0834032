"""64-bit ids for jobs, their events, parent links and transfer items, and sessions (PostgreSQL),
and an index of the reserved keys not taken yet (the budget of ``POST /jobs/reservations``).

The ids of these tables come from sequences that every user draws from: one user could use up the
32-bit ``jobs_id_seq`` for everyone (a reservation of job ids takes 500,000 at once: ~4,300 calls,
23 minutes of one client, reached 2**31 - 1, after which every user's job create failed with
``SequenceGeneratorLimitExceeded``), and a long-lived shared server passes 2**31 events on its own
(three or more per job). The columns become ``bigint`` and their sequences ``AS bigint``:

- ``jobs.id`` and what refers to a job: ``job_parents.child_id`` / ``parent_id``,
  ``log_events.job_id``, ``transfer_items.job_id``;
- ``log_events.id`` and ``transfer_items.id`` (one or more per job);
- ``sessions.id`` and ``jobs.session_id`` (any user may create and delete sessions at will).

The triggers that name one of these columns (migrations 0007 and 0012: ``UPDATE OF id`` /
``WHEN (new.id IS DISTINCT FROM old.id)``) are dropped and created again around the change, as
they were (PostgreSQL refuses to change the type of a column a trigger's definition uses). Each
table is rewritten once (one ``ALTER TABLE`` per table, all its columns at once) under an exclusive
lock: run it with the server stopped; it takes about as long as a dump of those tables.

SQLite: nothing to change. An ``INTEGER PRIMARY KEY`` there is the table's rowid, already a 64-bit
integer (as is every INTEGER value); the columns stay declared INTEGER (an AUTOINCREMENT key must
be), which is what ``balsam.server.tables.BigId`` says for SQLite.

Revision ID: 0017_bigint_job_ids
Revises: 0016_session_clock_restarted
Create Date: 2026-12-05
"""

from alembic import op
import sqlalchemy as sa

revision = '0017_bigint_job_ids'
down_revision = '0016_session_clock_restarted'
branch_labels = None
depends_on = None

#: table -> its columns that become bigint (spelled out: a migration keeps the schema of its day).
WIDENED = {
    "jobs": ["id", "session_id"],
    "sessions": ["id"],
    "job_parents": ["child_id", "parent_id"],
    "log_events": ["id", "job_id"],
    "transfer_items": ["id", "job_id"],
}
#: The tables whose ``id`` sequence becomes bigint.
SEQUENCES = ["jobs", "sessions", "log_events", "transfer_items"]
RESERVED_PREDICATE = "request_hash = ''"


def _dependent_triggers(conn: sa.Connection) -> list[tuple[str, str, str]]:
    """(name, table, definition) of the user triggers whose definition names a widened column."""
    pairs = [(table, column) for table, columns in WIDENED.items() for column in columns]
    values = ", ".join(f"('{table}', '{column}')" for table, column in pairs)
    rows = conn.exec_driver_sql(f"""
        SELECT DISTINCT t.tgname, t.tgrelid::regclass::text, pg_get_triggerdef(t.oid)
        FROM pg_trigger AS t
        JOIN pg_depend AS d ON d.classid = 'pg_trigger'::regclass AND d.objid = t.oid
                           AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
        JOIN pg_class AS c ON c.oid = d.refobjid
        JOIN pg_attribute AS a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE NOT t.tgisinternal AND (c.relname::text, a.attname::text) IN ({values})
        ORDER BY 1, 2""").all()
    return [(name, table, definition) for name, table, definition in rows]


def _retype(sql_type: str) -> None:
    conn = op.get_bind()
    triggers = _dependent_triggers(conn)
    for name, table, _definition in triggers:
        op.execute(f'DROP TRIGGER "{name}" ON {table}')
    for table, columns in WIDENED.items():
        changes = ", ".join(f"ALTER COLUMN {column} TYPE {sql_type}" for column in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
    for table in SEQUENCES:
        sequence = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one()
        op.execute(f"ALTER SEQUENCE {sequence} AS {sql_type}")
    for _name, _table, definition in triggers:
        op.execute(definition)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _retype("bigint")
    op.create_index('ix_idempotency_keys_reserved', 'idempotency_keys', ['user_id', 'expires'], unique=False,
                    sqlite_where=sa.text(RESERVED_PREDICATE), postgresql_where=sa.text(RESERVED_PREDICATE))


def downgrade() -> None:
    op.drop_index('ix_idempotency_keys_reserved', table_name='idempotency_keys')
    if op.get_bind().dialect.name == "postgresql":
        # Fails (and changes nothing) once an id or a sequence has passed 2**31 - 1.
        _retype("integer")
