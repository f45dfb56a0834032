"""Bulk creates and deletes (issue 14): the foreign keys ``jobs.app_id -> apps`` and those to
``jobs`` (``log_events``, ``job_parents``, ``transfer_items``) checked and cascaded once per
statement instead of once per row (PostgreSQL; SQLite keeps its foreign keys, which it checks in C
at little cost).

PostgreSQL checks a foreign key with one query per inserted row: a 5,000-job create ran 10,000 of
them (each job's app, each created event's job), about a third of the insert. The same guarantees
are kept by triggers that work on a statement's rows at once:

- insert: an ``AFTER INSERT ... FOR EACH STATEMENT`` trigger locks the referenced rows ``FOR KEY
  SHARE`` (as PostgreSQL's own check does, row by row) and fails with ``foreign_key_violation`` if
  any is missing. The app check locks each distinct app once (a bulk create has one);
- update of the referencing column (never done by balsam, kept for the guarantee): a row trigger
  guarded by ``WHEN (new.col IS DISTINCT FROM old.col)``, so other updates never call it;
- delete of the referenced row: ``ON DELETE CASCADE`` as one ``DELETE ... WHERE col IN (deleted
  ids)`` per statement (deleting 10,000 jobs was 40,000 single-row deletes: events, parent links
  both ways, transfer items);
- update of the referenced id (never done): refused while referenced, as ``NO ACTION`` did.

Why no race: READ COMMITTED, every statement of a trigger sees what committed before it started.
An insert's lock (``FOR KEY SHARE``) makes a concurrent delete of the referenced row wait until the
insert commits, and that delete's cascade, a later statement, then sees and deletes the new rows.
If the delete came first, the lock waits for it, finds the row gone (its locking read skips rows
deleted by a committed transaction) and the insert fails. A job inserted by the same statement as
its events (the created events) is locked by its own transaction at no wait.

Revision ID: 0007_statement_fk_checks
Revises: 0006_bulk_create_costs
Create Date: 2026-12-01
"""

from alembic import op

revision = '0007_statement_fk_checks'
down_revision = '0006_bulk_create_costs'
branch_labels = None
depends_on = None

#: (constraint, referencing table, column, referenced table) replaced by triggers on PostgreSQL.
STATEMENT_CHECKED_FKS = [
    ("fk_jobs_app_id_apps", "jobs", "app_id", "apps"),
    ("fk_log_events_job_id_jobs", "log_events", "job_id", "jobs"),
    # Inserted only with parents or transfers, but every job delete cascaded to them row by row.
    ("fk_job_parents_child_id_jobs", "job_parents", "child_id", "jobs"),
    ("fk_job_parents_parent_id_jobs", "job_parents", "parent_id", "jobs"),
    ("fk_transfer_items_job_id_jobs", "transfer_items", "job_id", "jobs"),
]


def _raise(name: str, table: str, column: str, parent: str, key: str) -> str:
    # The words of PostgreSQL's own error (the server answers 409 with its first line).
    return (f"""RAISE EXCEPTION 'insert or update on table "{table}" violates foreign key constraint "{name}"'
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = '{name}', TABLE = '{table}',
                      DETAIL = format('Key ({column})=(%s) is not present in table "{parent}".', {key});""")


def _key_update_function(name: str, table: str, column: str, parent: str) -> str:
    """The function refusing a change of a referenced row's id (as ``NO ACTION`` did)."""
    base = f"balsam_fk_{table}_{column}"
    return f"""CREATE OR REPLACE FUNCTION {base}_key_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM {table} WHERE {column} = old.id) THEN
                RAISE EXCEPTION 'update or delete on table "{parent}" violates foreign key constraint "{name}" on table "{table}"'
                    USING ERRCODE = 'foreign_key_violation', CONSTRAINT = '{name}', TABLE = '{parent}',
                          DETAIL = format('Key (id)=(%s) is still referenced from table "{table}".', old.id);
            END IF;
            RETURN new;
        END $$"""


def _pg_statements(name: str, table: str, column: str, parent: str) -> list[str]:
    base = f"balsam_fk_{table}_{column}"
    return [
        f"""CREATE OR REPLACE FUNCTION {base}_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE wanted bigint; locked bigint; missing bigint;
        BEGIN
            SELECT count(DISTINCT {column}) INTO wanted FROM new_rows;
            SELECT count(*) INTO locked FROM (
                SELECT 1 FROM {parent} WHERE id IN (SELECT {column} FROM new_rows) FOR KEY SHARE OF {parent}
            ) AS referenced;
            IF locked < wanted THEN
                SELECT {column} INTO missing FROM new_rows
                WHERE NOT EXISTS (SELECT 1 FROM {parent} WHERE {parent}.id = new_rows.{column}) LIMIT 1;
                {_raise(name, table, column, parent, "missing")}
            END IF;
            RETURN NULL;
        END $$""",
        f"""CREATE OR REPLACE FUNCTION {base}_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM 1 FROM {parent} WHERE id = new.{column} FOR KEY SHARE;
            IF NOT FOUND THEN
                {_raise(name, table, column, parent, f"new.{column}")}
            END IF;
            RETURN NULL;
        END $$""",
        f"""CREATE OR REPLACE FUNCTION {base}_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM {table} WHERE {column} IN (SELECT id FROM old_rows);
            RETURN NULL;
        END $$""",
        _key_update_function(name, table, column, parent),
        f"ALTER TABLE {table} DROP CONSTRAINT {name}",
        f"CREATE TRIGGER {base}_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {base}_insert()",
        f"CREATE TRIGGER {base}_update AFTER UPDATE OF {column} ON {table} FOR EACH ROW "
        f"WHEN (new.{column} IS DISTINCT FROM old.{column}) EXECUTE FUNCTION {base}_update()",
        f"CREATE TRIGGER {base}_cascade AFTER DELETE ON {parent} REFERENCING OLD TABLE AS old_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {base}_cascade()",
        f"CREATE TRIGGER {base}_key_update BEFORE UPDATE OF id ON {parent} FOR EACH ROW "
        f"WHEN (new.id IS DISTINCT FROM old.id) EXECUTE FUNCTION {base}_key_update()",
    ]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for fk in STATEMENT_CHECKED_FKS:
        for statement in _pg_statements(*fk):
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table, column, parent in STATEMENT_CHECKED_FKS:
        base = f"balsam_fk_{table}_{column}"
        for trigger, on in (("insert", table), ("update", table), ("cascade", parent), ("key_update", parent)):
            op.execute(f"DROP TRIGGER IF EXISTS {base}_{trigger} ON {on}")
            op.execute(f"DROP FUNCTION IF EXISTS {base}_{trigger}()")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}) REFERENCES {parent} (id) "
                   "ON DELETE CASCADE")
