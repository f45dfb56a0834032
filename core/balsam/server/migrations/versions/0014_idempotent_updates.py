"""Exactly-once updates and deletes: an idempotency key's record keeps the answer of the PUT,
PATCH or DELETE that claimed it (replayed as it was; a retried DELETE answered 404 and a retried
state change 409, for a change that had been applied).

Revision ID: 0014_idempotent_updates
Revises: 0013_dashboard_tickets
Create Date: 2026-12-04
"""

from alembic import op
import sqlalchemy as sa

revision = '0014_idempotent_updates'
down_revision = '0013_dashboard_tickets'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('answer', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('answer_type', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_column('answer_type')
        batch_op.drop_column('answer')
