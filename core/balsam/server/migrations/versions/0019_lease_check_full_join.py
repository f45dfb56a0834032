"""Bulk updates of jobs (PostgreSQL): the lease-reference check of migration 0012 can no longer be
planned as a nested loop, which made every large update of jobs quadratic.

``balsam_fk_jobs_leases_update`` (the ``AFTER UPDATE ... FOR EACH STATEMENT`` trigger on jobs, run
for every update of jobs) joins the statement's old and new rows by id to find the keys an update
changed. PL/pgSQL plans a query once per connection, at its first call, and keeps the plan; the
transition tables have no statistics, so a first call with a few rows (what a pooled connection
meets first) planned a nested loop, and every later call on that connection read ``old_rows`` once
per new row. Releasing the 10,000 children of one finished parent (one ``UPDATE`` of 10,000 jobs)
spent ~5 s in this trigger; 2,500 / 5,000 / 10,000 children took 0.68 / 1.6 / 5.5 s, and a
5,000-job ``PATCH`` 1.5 s (docs/performance.md).

The join is now a ``FULL JOIN``, which PostgreSQL executes only as a hash or a merge join (a nested
loop cannot do a full join; no condition above it lets the planner reduce it to a left join: the
rows only the old side has are dropped by the aggregates' ``FILTER``, whose test of the new row's
key is NULL for them). Each side first keeps only the rows with a key (a row whose keys are both
NULL joins as no row at all would: its keys compare as the missing row's NULLs do), so an update of
jobs without leases (a release, most user updates) joins nothing. Trigger time, 10,000 rows, on a
connection whose first call updated one row (median of 9; 5 December 2026):

==============================  =========  =================  ===============
function                        keys NULL  session unchanged  leased NULL->S
==============================  =========  =================  ===============
0012 (left join)                5,121 ms   5,317 ms           5,033 ms
0012 with enable_nestloop off   3.1 ms     3.2 ms             4.4 ms
EXCEPT, one per column          1.4 ms     8.8 ms             7.4 ms
full join of all rows           3.4 ms     3.4 ms             4.6 ms
this (full join of keyed rows)  0.9 ms     3.8 ms             2.7 ms
==============================  =========  =================  ===============

Exactly the same keys are checked, and locked ``FOR KEY SHARE``, as before: a new row's key when
it is not NULL and differs (``IS DISTINCT FROM``) from the key of the old row of the same id, or
has no old row of its id (its id changed); per column, so a row whose ``batch_job_id`` changed does
not lock its unchanged session (an update that leaves a key alone locks nothing: sessions_logic,
"Lock order"). Only the plan changes. ``tests/server/test_lease_check_plan.py`` checks the plan.

A database made by the server (``BALSAM_SERVER_CREATE_TABLES``, ``balsam server migrate``) runs
every migration, so a new one and a migrated one end with this function. The downgrade restores
migration 0012's.

Revision ID: 0019_lease_check_full_join
Revises: 0018_released_from_session
Create Date: 2026-12-05
"""

from alembic import op

from balsam.server.migrate import load_migration

revision = '0019_lease_check_full_join'
down_revision = '0018_released_from_session'
branch_labels = None
depends_on = None

_KEYED = "SELECT id, session_id, batch_job_id FROM {rows} WHERE session_id IS NOT NULL OR batch_job_id IS NOT NULL"


def _migration_0012():
    return load_migration("0012_lease_refs.py")


def update_function() -> str:
    """The ``CREATE OR REPLACE FUNCTION balsam_fk_jobs_leases_update()`` of this revision."""
    previous = _migration_0012()
    return f"""CREATE OR REPLACE FUNCTION balsam_fk_jobs_leases_update() RETURNS trigger LANGUAGE plpgsql AS $$
        {previous._DECLARE}
        BEGIN
            SELECT array_agg(DISTINCT n.session_id)
                       FILTER (WHERE n.session_id IS NOT NULL AND n.session_id IS DISTINCT FROM o.session_id),
                   array_agg(DISTINCT n.batch_job_id)
                       FILTER (WHERE n.batch_job_id IS NOT NULL AND n.batch_job_id IS DISTINCT FROM o.batch_job_id)
            INTO wanted_session_id, wanted_batch_job_id
            FROM ({_KEYED.format(rows="new_rows")}) AS n
            FULL JOIN ({_KEYED.format(rows="old_rows")}) AS o ON o.id = n.id;
            {previous._lock_and_check()}
            RETURN NULL;
        END $$"""


def previous_update_function() -> str:
    """Migration 0012's ``CREATE OR REPLACE FUNCTION balsam_fk_jobs_leases_update()``."""
    (statement,) = [s for s in _migration_0012()._pg_statements()
                    if s.startswith("CREATE OR REPLACE FUNCTION balsam_fk_jobs_leases_update()")]
    return statement


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(update_function())


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(previous_update_function())
