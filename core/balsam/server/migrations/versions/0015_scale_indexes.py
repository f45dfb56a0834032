"""Per-cycle queries at scale (audit of 10^6 jobs): two indexes.

- ``ix_jobs_cleanup``: the site agent's file cleaner lists, every cycle, the finished jobs whose
  files it has yet to delete (``state=JOB_FINISHED & pending_file_cleanup=true``). No index served
  ``pending_file_cleanup``: the listing read every finished job of the site (10^6 jobs: 130 ms to
  count and 199 ms for a page on PostgreSQL, 190 ms on SQLite). Partial: only jobs waiting for the
  cleaner are in it (the state is in the predicate because every new job is created with
  ``pending_file_cleanup`` set), so it costs other jobs' writes nothing. The listing repeats the
  predicate word for word (``balsam.server.tables.CLEANUP_PREDICATES``): SQLite uses a partial
  index only then, and there the state is written ``+state`` (a term of no other index).
- ``ix_log_events_to_state_timestamp``: events of one state in the listings' order (timestamp, id)
  (``balsam analytics`` filters by ``to_state``); without it such a listing read every event
  (3*10^6 events: 140 ms for a page, 101 ms to count).

Revision ID: 0015_scale_indexes
Revises: 0014_idempotent_updates
Create Date: 2026-12-04
"""

from alembic import op
import sqlalchemy as sa

revision = '0015_scale_indexes'
down_revision = '0014_idempotent_updates'
branch_labels = None
depends_on = None

# Spelled out rather than imported from balsam.server.tables: a migration keeps the schema of its day.
CLEANUP_PREDICATES = {
    "postgresql": "state = 'JOB_FINISHED' AND pending_file_cleanup",
    "sqlite": "+state = 'JOB_FINISHED' AND pending_file_cleanup",
}


def upgrade() -> None:
    op.create_index('ix_jobs_cleanup', 'jobs', ['site_id', 'id'], unique=False,
                    sqlite_where=sa.text(CLEANUP_PREDICATES["sqlite"]),
                    postgresql_where=sa.text(CLEANUP_PREDICATES["postgresql"]))
    op.create_index('ix_log_events_to_state_timestamp', 'log_events', ['to_state', 'timestamp', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_log_events_to_state_timestamp', table_name='log_events')
    op.drop_index('ix_jobs_cleanup', table_name='jobs')
