"""Jobs remember the session a user's move took them from (``jobs.released_from_session_id``).

A user may fail a RUNNING job and re-queue it (``FAILED``, then ``RESTART_READY``), or re-queue a
job a launcher has leased and perhaps started. The move ends the lease at once, but the launcher
ends its run only when its next heartbeat is answered (the job is gone). Another launcher leased
the job meanwhile and ran it in the same workdir while the old run went on (16.8 s of two runs at
once with the default 60 s heartbeat). The job now keeps the id of the session it was taken from,
and no acquire leases it until that session's heartbeats no longer list it (the old run has
exited), or the session is deleted or expires (see balsam.server.sessions_logic, "Re-queued while
running"). ``released_tick_seen``: a heartbeat of that session has come since the release.

- ``ix_jobs_released_from_session_id`` holds only the jobs with a mark (a few at any time): the
  heartbeat and the end of a session look their marks up by session; an insert costs it nothing.
- The acquires' partial indexes (migration 0010) are built again with ``released_from_session_id
  IS NULL`` in their predicates: a marked job leaves them as a leased one does, so an acquire reads
  no more index entries or rows than before (a test of the column on each row read would have
  read the table's rows where SQLite read only the index: mpi mode's packing order).

The columns are added in place (``ALTER TABLE ... ADD COLUMN``, on SQLite too: a batch operation
would copy the jobs table and lose its triggers); PostgreSQL does not rewrite the table for them.
Building the four indexes reads the jobs table once each (seconds at 10^6 jobs): run it with the
server stopped. The downgrade drops the columns the same way (SQLite 3.35 or later).

Revision ID: 0018_released_from_session
Revises: 0017_bigint_job_ids
Create Date: 2026-12-06
"""

from alembic import op
import sqlalchemy as sa

revision = '0018_released_from_session'
down_revision = '0017_bigint_job_ids'
branch_labels = None
depends_on = None

MARKED = "released_from_session_id IS NOT NULL"
# Spelled out rather than imported from balsam.server.tables: a migration keeps the schema of its
# day, whatever the tables module says later. (0010's predicates, and these.)
RUNNABLE_STATES = "state IN ('PREPROCESSED', 'RESTART_READY')"
PROCESSABLE_STATES = "state IN ('RUN_DONE', 'RUN_ERROR', 'RUN_TIMEOUT', 'STAGED_IN')"
BEFORE = "session_id IS NULL AND "
AFTER = "session_id IS NULL AND released_from_session_id IS NULL AND "
ACQUIRE_INDEXES = {
    "ix_jobs_runnable_by_id": (RUNNABLE_STATES, ["site_id", "id"]),
    "ix_jobs_runnable_small_first": (RUNNABLE_STATES, ["site_id", "num_nodes ASC", "node_packing_count DESC",
                                                       "wall_time_min DESC", "id ASC"]),
    "ix_jobs_runnable_long_large_first": (RUNNABLE_STATES, ["site_id", "wall_time_min DESC", "num_nodes DESC",
                                                            "node_packing_count DESC", "id ASC"]),
    "ix_jobs_processable_by_id": (PROCESSABLE_STATES, ["site_id", "id"]),
}


def _acquire_indexes(leasable: str) -> None:
    for name, (states, columns) in ACQUIRE_INDEXES.items():
        op.drop_index(name, table_name='jobs')
        predicate = sa.text(leasable + states)
        op.create_index(name, 'jobs', [sa.text(c) for c in columns], unique=False,
                        sqlite_where=predicate, postgresql_where=predicate)


def upgrade() -> None:
    op.add_column('jobs', sa.Column('released_from_session_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                                    nullable=True))
    op.add_column('jobs', sa.Column('released_tick_seen', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index('ix_jobs_released_from_session_id', 'jobs', ['released_from_session_id'], unique=False,
                    sqlite_where=sa.text(MARKED), postgresql_where=sa.text(MARKED))
    _acquire_indexes(AFTER)


def downgrade() -> None:
    _acquire_indexes(BEFORE)
    op.drop_index('ix_jobs_released_from_session_id', table_name='jobs')
    op.drop_column('jobs', 'released_tick_seen')
    op.drop_column('jobs', 'released_from_session_id')
