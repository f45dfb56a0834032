"""Credentials: every token (password login, refresh credential, launcher credential, invitation)
has a row, so that it can be listed and revoked.

Revision ID: 0004_credentials
Revises: 0003_job_counts
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

import balsam.server.tables

revision = '0004_credentials'
down_revision = '0003_job_counts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('credentials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=True),
    sa.Column('batch_job_id', sa.Integer(), nullable=True),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=True),
    sa.Column('created', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_used', balsam.server.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked', balsam.server.tables.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_job_id'], ['batch_jobs.id'], name=op.f('fk_credentials_batch_job_id_batch_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_credentials_site_id_sites'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_credentials_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credentials')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('credentials', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_credentials_batch_job_id'), ['batch_job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_credentials_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_credentials_user_id'), ['user_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('credentials', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_credentials_user_id'))
        batch_op.drop_index(batch_op.f('ix_credentials_site_id'))
        batch_op.drop_index(batch_op.f('ix_credentials_batch_job_id'))
    op.drop_table('credentials')
