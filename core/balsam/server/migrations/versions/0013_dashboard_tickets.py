"""One-time dashboard login links: the nonces of the tickets already used, so that a link logs in
once across all the server's worker processes (before, each use within its two minutes gave a new
session).

Revision ID: 0013_dashboard_tickets
Revises: 0012_lease_refs
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa

import balsam.server.tables

revision = '0013_dashboard_tickets'
down_revision = '0012_lease_refs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dashboard_tickets',
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('expires', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('nonce', name=op.f('pk_dashboard_tickets'))
    )
    with op.batch_alter_table('dashboard_tickets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dashboard_tickets_expires'), ['expires'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('dashboard_tickets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dashboard_tickets_expires'))
    op.drop_table('dashboard_tickets')
