"""An update's or delete's recorded answer keeps its headers (``idempotency_keys.answer_headers``):
a replayed query delete answered its count without ``Balsam-Skipped-Running``, so the client that
resent it (its first answer lost) no longer warned about the matching jobs it had left RUNNING.

A nullable column added on both databases (PostgreSQL: no table rewrite; SQLite: ``ADD COLUMN``).
The records written before keep NULL there and are replayed as before, without headers.

Revision ID: 0022_idempotent_answer_headers
Revises: 0021_job_data_json
Create Date: 2026-12-05
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0022_idempotent_answer_headers'
down_revision = '0021_job_data_json'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('answer_headers', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                                                               'postgresql'), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_column('answer_headers')
