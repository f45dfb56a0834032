"""The credential scope of an idempotency record (``idempotency_keys.scope``): ``all`` for the
user's own credential (every site of theirs), ``site:<id>`` for a launcher credential limited to
one site. A key is replayed only to a credential whose scope holds the record's: a launcher of site
1 sending a key its user had used for site 2 got site 2's records back. The scope was hashed into
the request's fingerprint instead, so a launcher's keyed request recorded by the server before it
and retried after the upgrade was refused (422, "key already used for a different request"): the
client dropped a pending acquire (its jobs stayed held) and a status update's retry.

A nullable column added on both databases (PostgreSQL: no table rewrite; SQLite: ``ADD COLUMN``).
Records written before keep NULL there: replayed to the user's own credential as before, and to a
launcher credential only when what they made or changed lies within its site
(``idempotency.IdempotentRequest._legacy_within_scope``).

Revision ID: 0024_idempotency_key_scope
Revises: 0023_hold_waiting_stage_ins
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa

revision = '0024_idempotency_key_scope'
down_revision = '0023_hold_waiting_stage_ins'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_column('scope')
