"""Bulk creates (issue 14): the statement triggers of migration 0007 that check an insert's
references read the statement's rows once instead of twice.

The check counted the distinct referenced ids (one pass over the transition table), then locked the
referenced rows with ``id IN (SELECT col FROM new_rows)`` (a second pass, and a hash of the rows,
whole, to make the semi-join). It now collects the distinct ids into an array in one pass and
locks ``id = ANY(array)``: the same rows locked the same way (``FOR KEY SHARE``), the same error
when one is missing, a quarter less time for the 5,000 created events of a bulk create (and for the
events of every bulk state update).

Revision ID: 0008_fk_check_one_pass
Revises: 0007_statement_fk_checks
Create Date: 2026-12-01
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = '0008_fk_check_one_pass'
down_revision = '0007_statement_fk_checks'
branch_labels = None
depends_on = None


def _migration_0007():
    path = Path(__file__).with_name("0007_statement_fk_checks.py")
    spec = importlib.util.spec_from_file_location("balsam_migration_0007", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _insert_check(name: str, table: str, column: str, parent: str, first: str = "") -> str:
    """The check's function; ``first``: PL/pgSQL run before it (migration 0011's guard)."""
    raise_missing = _migration_0007()._raise(name, table, column, parent, "missing")
    return f"""CREATE OR REPLACE FUNCTION balsam_fk_{table}_{column}_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE wanted bigint[]; locked bigint; missing bigint;
        BEGIN{first}
            wanted := ARRAY(SELECT DISTINCT {column} FROM new_rows WHERE {column} IS NOT NULL);
            SELECT count(*) INTO locked FROM (
                SELECT 1 FROM {parent} WHERE id = ANY(wanted) FOR KEY SHARE OF {parent}
            ) AS referenced;
            IF locked < cardinality(wanted) THEN
                SELECT {column} INTO missing FROM new_rows
                WHERE NOT EXISTS (SELECT 1 FROM {parent} WHERE {parent}.id = new_rows.{column}) LIMIT 1;
                {raise_missing}
            END IF;
            RETURN NULL;
        END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for fk in _migration_0007().STATEMENT_CHECKED_FKS:
        op.execute(_insert_check(*fk))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    previous = _migration_0007()
    for fk in previous.STATEMENT_CHECKED_FKS:
        op.execute(previous._pg_statements(*fk)[0])  # its CREATE OR REPLACE FUNCTION ..._insert()
