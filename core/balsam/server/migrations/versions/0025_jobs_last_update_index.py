"""Jobs by ``last_update`` (audit of the other paths at 10^5-10^6 jobs): ``ix_jobs_last_update_id``.

``Job.objects.filter(last_update_after=t)`` (a workflow polling for the jobs changed since its last
look, as with Balsam 0.7) and ``order_by("-last_update")`` (the jobs changed last) had no index:
each read and sorted every job of the user's sites (10^5 jobs: 29 ms on PostgreSQL, 30 ms on SQLite
for a page; ten times that at 10^6, and every poll paid it). With the index a page reads its rows
from the index's end (0.2 ms) and a poll only the jobs changed since. ``id`` last: the listings
break ties by id, so the index gives their whole order (SQLite's indexes end with the rowid anyway).

The cost is one more index entry per job write: every write sets ``last_update``.

Revision ID: 0025_jobs_last_update_index
Revises: 0024_idempotency_key_scope
Create Date: 2026-12-07
"""

from alembic import op

revision = '0025_jobs_last_update_index'
down_revision = '0024_idempotency_key_scope'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_last_update_id', 'jobs', ['last_update', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_last_update_id', table_name='jobs')
