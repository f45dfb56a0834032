"""Sessions remember that their expiry clock was restarted (``sessions.clock_restarted``).

After a server start or a database outage the sweep restarts the expiry clock of stale sessions
(the server could not hear their heartbeats). A server runs several worker processes, which a
process manager may recycle while the others serve, and each new one restarted every clock again:
a dead launcher's session (and its RUNNING jobs) could outlive its expiry forever. The flag makes it
once per session between two of its heartbeats (a heartbeat clears it).

Revision ID: 0016_session_clock_restarted
Revises: 0015_scale_indexes
Create Date: 2026-12-04
"""

from alembic import op
import sqlalchemy as sa

revision = '0016_session_clock_restarted'
down_revision = '0015_scale_indexes'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('clock_restarted', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('clock_restarted')
