"""Acquires at scale (issue 14): a site's leasable jobs indexed in the order each acquire takes them.

- mpi mode's acquire (``max_aggregate_nodes``) packs jobs first-fit in size order (``num_nodes``,
  then ``node_packing_count`` and ``wall_time_min`` descending; or long and large first with
  ``sort_by``). Without an index in that order the database read and sorted every runnable job of
  the site on every acquire: on SQLite 7 ms at 10^4 jobs and 78-80 ms at 10^6, on PostgreSQL 18-24
  and 107-138 ms.
- Serial mode's acquire and the processing module's take jobs in id order among a few states. With
  the index on (site, state, id) the database either merged and sorted every job of those states
  or, as SQLite chose, read the table in id order past every job of other states. With a
  campaign's new jobs after its finished ones, at 10^6 jobs, serial mode's acquire took 283 ms on
  SQLite and 426 ms on PostgreSQL, the processing module's 376 and 470 ms.

Each index is partial: it holds only the jobs the acquire may lease (not leased, in its states),
so a job enters when it reaches one of those states (a new job, STAGED_IN, enters the processing
module's) and leaves when it is leased, and the other state changes cost it nothing. The acquire repeats the predicate word for word
(``balsam.server.tables.LEASABLE_PREDICATES``): SQLite uses a partial index only then.

Revision ID: 0010_acquire_indexes
Revises: 0009_job_create_defaults
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0010_acquire_indexes'
down_revision = '0009_job_create_defaults'
branch_labels = None
depends_on = None

# Spelled out rather than imported from balsam.server.tables: a migration keeps the schema of its
# day, whatever the tables module says later.
RUNNABLE = "session_id IS NULL AND state IN ('PREPROCESSED', 'RESTART_READY')"
PROCESSABLE = "session_id IS NULL AND state IN ('RUN_DONE', 'RUN_ERROR', 'RUN_TIMEOUT', 'STAGED_IN')"
INDEXES = {
    "ix_jobs_runnable_by_id": (RUNNABLE, ["site_id", "id"]),
    "ix_jobs_runnable_small_first": (RUNNABLE, ["site_id", "num_nodes ASC", "node_packing_count DESC",
                                                "wall_time_min DESC", "id ASC"]),
    "ix_jobs_runnable_long_large_first": (RUNNABLE, ["site_id", "wall_time_min DESC", "num_nodes DESC",
                                                     "node_packing_count DESC", "id ASC"]),
    "ix_jobs_processable_by_id": (PROCESSABLE, ["site_id", "id"]),
}


def upgrade() -> None:
    for name, (predicate, columns) in INDEXES.items():
        op.create_index(name, 'jobs', [sa.text(c) for c in columns], unique=False,
                        sqlite_where=sa.text(predicate), postgresql_where=sa.text(predicate))


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name='jobs')
