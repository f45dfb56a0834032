"""Bulk creates (issue 14): the created events of a bulk create skip the statement trigger that
checks their jobs exist, because the server has just written those jobs in the same transaction.

Of the ~24 ms PostgreSQL spends writing the 5,000 created events of a bulk-create chunk, the
reference check of migrations 0007/0008 took ~7 ms: it collects the 5,000 job ids, looks each one
up in the jobs' primary key and locks it ``FOR KEY SHARE``. The check cannot fail there: the
events' ids are those of the jobs the same transaction's previous statement wrote (no other
transaction can see, let alone delete, those rows before the commit).

The server says so for that one statement only: it sets the transaction-local setting
``balsam.events_of_new_jobs`` to ``on`` just before the events' ``COPY`` and back to ``off`` just
after (``set_config(..., true)``: it also ends with the transaction, commit or rollback). The check
runs as before for every other insert of events (state changes, other clients, SQL by hand).

Revision ID: 0011_new_job_events
Revises: 0010_acquire_indexes
Create Date: 2026-12-02
"""

from alembic import op

from balsam.server.migrate import load_migration

revision = '0011_new_job_events'
down_revision = '0010_acquire_indexes'
branch_labels = None
depends_on = None

#: The setting the server turns on around the COPY of a bulk create's created events
#: (balsam.server.jobs_logic.EVENTS_OF_NEW_JOBS_SETTING names the same).
SETTING = "balsam.events_of_new_jobs"
FK = ("fk_log_events_job_id_jobs", "log_events", "job_id", "jobs")


def _guarded_insert_check() -> str:
    """Migration 0008's check, behind the guard."""
    guard = f"""
            IF current_setting('{SETTING}', true) = 'on' THEN
                RETURN NULL;  -- the server's created events of jobs this transaction has just written
            END IF;"""
    return load_migration("0008_fk_check_one_pass.py")._insert_check(*FK, first=guard)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_guarded_insert_check())


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(load_migration("0008_fk_check_one_pass.py")._insert_check(*FK))
