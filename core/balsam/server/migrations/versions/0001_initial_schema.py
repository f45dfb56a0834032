"""Initial schema: users, sites, apps, batch_jobs, sessions, jobs, job_parents, log_events, transfer_items.

Revision ID: 0001_initial
Revises: 
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

import balsam.server.tables

revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=256), nullable=False),
    sa.Column('hashed_password', sa.String(length=512), nullable=True),
    sa.Column('date_joined', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username')),
    sqlite_autoincrement=True
    )
    op.create_table('sites',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('globus_endpoint_id', sa.Text(), nullable=True),
    sa.Column('backfill_windows', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('queued_jobs', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('optional_batch_job_params', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('allowed_projects', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('allowed_queues', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('transfer_locations', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('last_refresh', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('creation_date', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_sites_owner_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sites')),
    sa.UniqueConstraint('owner_id', 'name', name='uq_sites_owner_id_name'),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sites_owner_id'), ['owner_id'], unique=False)

    op.create_table('apps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('serialized_class', sa.Text(), nullable=False),
    sa.Column('source_code', sa.Text(), nullable=False),
    sa.Column('parameters', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('transfers', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_apps_site_id_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_apps')),
    sa.UniqueConstraint('site_id', 'name', name='uq_apps_site_id_name'),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('apps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_apps_site_id'), ['site_id'], unique=False)

    op.create_table('batch_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('scheduler_id', sa.Integer(), nullable=True),
    sa.Column('project', sa.Text(), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('optional_params', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('num_nodes', sa.Integer(), nullable=False),
    sa.Column('wall_time_min', sa.Integer(), nullable=False),
    sa.Column('job_mode', sa.String(length=16), nullable=False),
    sa.Column('partitions', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('filter_tags', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('status_info', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('start_time', balsam.server.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('end_time', balsam.server.tables.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_batch_jobs_site_id_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_jobs')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('batch_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_jobs_scheduler_id'), ['scheduler_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_jobs_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_jobs_state'), ['state'], unique=False)

    op.create_table('sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('batch_job_id', sa.Integer(), nullable=True),
    sa.Column('heartbeat', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_job_id'], ['batch_jobs.id'], name=op.f('fk_sessions_batch_job_id_batch_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_sessions_site_id_sites'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sessions')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sessions_batch_job_id'), ['batch_job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_sessions_heartbeat'), ['heartbeat'], unique=False)
        batch_op.create_index(batch_op.f('ix_sessions_site_id'), ['site_id'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('session_id', sa.Integer(), nullable=True),
    sa.Column('batch_job_id', sa.Integer(), nullable=True),
    sa.Column('workdir', sa.Text(), nullable=False),
    sa.Column('tags', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('serialized_parameters', sa.Text(), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('return_code', sa.Integer(), nullable=True),
    sa.Column('num_nodes', sa.Integer(), nullable=False),
    sa.Column('ranks_per_node', sa.Integer(), nullable=False),
    sa.Column('threads_per_rank', sa.Integer(), nullable=False),
    sa.Column('threads_per_core', sa.Integer(), nullable=False),
    sa.Column('launch_params', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('gpus_per_rank', sa.Float(), nullable=False),
    sa.Column('node_packing_count', sa.Integer(), nullable=False),
    sa.Column('wall_time_min', sa.Integer(), nullable=False),
    sa.Column('parent_ids', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('pending_file_cleanup', sa.Boolean(), nullable=False),
    sa.Column('serialized_return_value', sa.Text(), nullable=False),
    sa.Column('serialized_exception', sa.Text(), nullable=False),
    sa.Column('last_update', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], name=op.f('fk_jobs_app_id_apps'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['batch_job_id'], ['batch_jobs.id'], name=op.f('fk_jobs_batch_job_id_batch_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['session_id'], ['sessions.id'], name=op.f('fk_jobs_session_id_sessions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_app_id'), ['app_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_batch_job_id'), ['batch_job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_session_id'), ['session_id'], unique=False)
        batch_op.create_index('ix_jobs_site_id_state', ['site_id', 'state'], unique=False)

    if op.get_bind().dialect.name == "postgresql":
        # GIN index for JSONB containment (tag filters, session acquisition by filter_tags).
        op.create_index('ix_jobs_tags_gin', 'jobs', ['tags'], unique=False, postgresql_using='gin',
                        postgresql_ops={'tags': 'jsonb_path_ops'})

    op.create_table('job_parents',
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['child_id'], ['jobs.id'], name=op.f('fk_job_parents_child_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['jobs.id'], name=op.f('fk_job_parents_parent_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('child_id', 'parent_id', name=op.f('pk_job_parents'))
    )
    with op.batch_alter_table('job_parents', schema=None) as batch_op:
        batch_op.create_index('ix_job_parents_parent_id', ['parent_id'], unique=False)

    op.create_table('log_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('timestamp', balsam.server.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('from_state', sa.String(length=32), nullable=False),
    sa.Column('to_state', sa.String(length=32), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_log_events_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_log_events')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('log_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_log_events_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_log_events_timestamp'), ['timestamp'], unique=False)

    op.create_table('transfer_items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=False),
    sa.Column('local_path', sa.Text(), nullable=False),
    sa.Column('remote_path', sa.Text(), nullable=False),
    sa.Column('location_alias', sa.Text(), nullable=False),
    sa.Column('recursive', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('task_id', sa.Text(), nullable=False),
    sa.Column('transfer_info', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_transfer_items_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transfer_items')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('transfer_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_transfer_items_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_transfer_items_state'), ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('transfer_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_transfer_items_state'))
        batch_op.drop_index(batch_op.f('ix_transfer_items_job_id'))

    op.drop_table('transfer_items')
    with op.batch_alter_table('log_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_log_events_timestamp'))
        batch_op.drop_index(batch_op.f('ix_log_events_job_id'))

    op.drop_table('log_events')
    with op.batch_alter_table('job_parents', schema=None) as batch_op:
        batch_op.drop_index('ix_job_parents_parent_id')

    op.drop_table('job_parents')
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index('ix_jobs_tags_gin', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_site_id_state')
        batch_op.drop_index(batch_op.f('ix_jobs_session_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_batch_job_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_app_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sessions_site_id'))
        batch_op.drop_index(batch_op.f('ix_sessions_heartbeat'))
        batch_op.drop_index(batch_op.f('ix_sessions_batch_job_id'))

    op.drop_table('sessions')
    with op.batch_alter_table('batch_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_batch_jobs_site_id'))
        batch_op.drop_index(batch_op.f('ix_batch_jobs_scheduler_id'))

    op.drop_table('batch_jobs')
    with op.batch_alter_table('apps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_apps_site_id'))

    op.drop_table('apps')
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sites_owner_id'))

    op.drop_table('sites')
    op.drop_table('users')
