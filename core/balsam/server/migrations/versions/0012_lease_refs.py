"""Bulk creates and acquires (issue 14): a job's references to its session and its BatchJob
(``jobs.session_id -> sessions``, ``jobs.batch_job_id -> batch_jobs``, both ``ON DELETE SET NULL``)
checked once per statement instead of once per row, as migration 0007 did for the others
(PostgreSQL; SQLite keeps its foreign keys).

PostgreSQL queues a check of each foreign key for every inserted row, even where the key is NULL
(as in every new job): ~4 ms of the ~40 ms its ``COPY`` of 5,000 new jobs took. An acquire sets
both keys on every job it leases, and each row's check is a query: an ``UPDATE`` leasing 1,000
jobs took 22.8 and 25.1 ms with the foreign keys, 16.4 and 18.7 ms with these triggers (same
transaction, median of 9, paired; 2 December 2026).

The same guarantees, by triggers (``tests/server/test_fk_triggers.py``):

- insert: ``AFTER INSERT ... FOR EACH STATEMENT``, one pass over the statement's rows collecting
  the distinct non-NULL keys of both columns; the referenced rows are locked ``FOR KEY SHARE`` (as
  PostgreSQL's own check does) and a missing one fails with ``foreign_key_violation``;
- update: ``AFTER UPDATE ... FOR EACH STATEMENT`` with the old and new rows: only keys that a row
  changed to a non-NULL value are checked (an update that leaves them alone, such as a launcher's
  state changes, locks nothing, as PostgreSQL's check skips an unchanged key). PostgreSQL allows no
  column list on a trigger with transition tables, so it runs for every update of jobs: its one
  join of the statement's old and new rows costs a 1,000-job state update ~0.3 ms (16.4 -> 16.7
  and 18.0 -> 18.3 ms, paired as above);
- delete of a session or a BatchJob: ``SET NULL`` as one ``UPDATE jobs ... WHERE col IN (deleted
  ids)`` per statement;
- update of a referenced id (never done): refused while referenced, as ``NO ACTION`` did.

Why no race: the argument of migration 0007. The check's ``FOR KEY SHARE`` lock makes a
concurrent delete of the session wait until the acquire commits, and that delete's ``SET NULL``
(a later statement, with a new snapshot) then sees and clears the new leases; a delete that came
first makes the lock wait, find the row gone, and the acquire fail, as the foreign key did.

Revision ID: 0012_lease_refs
Revises: 0011_new_job_events
Create Date: 2026-12-02
"""

from alembic import op

from balsam.server.migrate import load_migration

revision = '0012_lease_refs'
down_revision = '0011_new_job_events'
branch_labels = None
depends_on = None

#: (constraint, referencing table, column, referenced table) replaced by triggers on PostgreSQL.
LEASE_FKS = [
    ("fk_jobs_session_id_sessions", "jobs", "session_id", "sessions"),
    ("fk_jobs_batch_job_id_batch_jobs", "jobs", "batch_job_id", "batch_jobs"),
]
#: The triggers this migration makes: (name, table).
TRIGGERS = [
    ("balsam_fk_jobs_leases_insert", "jobs"),
    ("balsam_fk_jobs_leases_update", "jobs"),
    *[(f"balsam_fk_{table}_{column}_set_null", parent) for _, table, column, parent in LEASE_FKS],
    *[(f"balsam_fk_{table}_{column}_key_update", parent) for _, table, column, parent in LEASE_FKS],
]


def _migration_0007():
    return load_migration("0007_statement_fk_checks.py")


def _raise(name: str, table: str, column: str, parent: str, key: str) -> str:
    return _migration_0007()._raise(name, table, column, parent, key)


def _lock_and_check() -> str:
    """PL/pgSQL: lock the rows of ``wanted_<column>`` in their tables; fail on the first missing."""
    parts = []
    for name, table, column, parent in LEASE_FKS:
        parts.append(f"""
            IF wanted_{column} IS NOT NULL THEN
                SELECT count(*) INTO locked FROM (
                    SELECT 1 FROM {parent} WHERE id = ANY(wanted_{column}) FOR KEY SHARE OF {parent}
                ) AS referenced;
                IF locked < cardinality(wanted_{column}) THEN
                    SELECT k INTO missing FROM unnest(wanted_{column}) AS k
                    WHERE NOT EXISTS (SELECT 1 FROM {parent} WHERE {parent}.id = k) LIMIT 1;
                    {_raise(name, table, column, parent, "missing")}
                END IF;
            END IF;""")
    return "".join(parts)


_DECLARE = "DECLARE wanted_session_id bigint[]; wanted_batch_job_id bigint[]; locked bigint; missing bigint;"


def _pg_statements() -> list[str]:
    statements = [
        f"""CREATE OR REPLACE FUNCTION balsam_fk_jobs_leases_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        {_DECLARE}
        BEGIN
            SELECT array_agg(DISTINCT session_id) FILTER (WHERE session_id IS NOT NULL),
                   array_agg(DISTINCT batch_job_id) FILTER (WHERE batch_job_id IS NOT NULL)
            INTO wanted_session_id, wanted_batch_job_id FROM new_rows;
            {_lock_and_check()}
            RETURN NULL;
        END $$""",
        # A row whose id changed has no old row of the same id: its keys are checked.
        f"""CREATE OR REPLACE FUNCTION balsam_fk_jobs_leases_update() RETURNS trigger LANGUAGE plpgsql AS $$
        {_DECLARE}
        BEGIN
            SELECT array_agg(DISTINCT n.session_id)
                       FILTER (WHERE n.session_id IS NOT NULL AND n.session_id IS DISTINCT FROM o.session_id),
                   array_agg(DISTINCT n.batch_job_id)
                       FILTER (WHERE n.batch_job_id IS NOT NULL AND n.batch_job_id IS DISTINCT FROM o.batch_job_id)
            INTO wanted_session_id, wanted_batch_job_id
            FROM new_rows AS n LEFT JOIN old_rows AS o ON o.id = n.id;
            {_lock_and_check()}
            RETURN NULL;
        END $$""",
    ]
    for name, table, column, parent in LEASE_FKS:
        base = f"balsam_fk_{table}_{column}"
        statements += [
            f"""CREATE OR REPLACE FUNCTION {base}_set_null() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE {table} SET {column} = NULL WHERE {column} IN (SELECT id FROM old_rows);
                RETURN NULL;
            END $$""",
            _migration_0007()._key_update_function(name, table, column, parent),
            f"ALTER TABLE {table} DROP CONSTRAINT {name}",
            f"CREATE TRIGGER {base}_set_null AFTER DELETE ON {parent} REFERENCING OLD TABLE AS old_rows "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {base}_set_null()",
            f"CREATE TRIGGER {base}_key_update BEFORE UPDATE OF id ON {parent} FOR EACH ROW "
            f"WHEN (new.id IS DISTINCT FROM old.id) EXECUTE FUNCTION {base}_key_update()",
        ]
    statements += [
        "CREATE TRIGGER balsam_fk_jobs_leases_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION balsam_fk_jobs_leases_insert()",
        "CREATE TRIGGER balsam_fk_jobs_leases_update AFTER UPDATE ON jobs "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION balsam_fk_jobs_leases_update()",
    ]
    return statements


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in _pg_statements():
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for trigger, on in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {on}")
        op.execute(f"DROP FUNCTION IF EXISTS {trigger}()")
    for name, table, column, parent in LEASE_FKS:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}) REFERENCES {parent} (id) "
                   "ON DELETE SET NULL")
