"""PostgreSQL: ``jobs.data`` is ``json`` (the text as the client sent it), no longer ``jsonb``, so a
job's data keeps the order of its keys.

``jsonb`` stores an object with its keys sorted (shorter keys first, then bytewise) and no
duplicates: ``{"objective": 1, "from": "x"}`` came back as ``{"from": "x", "objective": 1}``.
SQLite keeps the text, and Balsam 0.7 stored ``jobs.data`` as a ``json`` column, so a workflow that
prints or serializes ``job.data`` (DeepHyper's results) wrote different text on PostgreSQL. Nothing
queries ``jobs.data`` with ``jsonb`` operators (no filter, index or trigger reads it: the data
filter is on events, ``log_events.data``), so the column changes alone; ``tags`` and the other
JSON columns stay ``jsonb`` (the tag filters' containment and GIN index).

The rows stored before keep the key order ``jsonb`` gave them (it did not keep the one they were
sent with); those written after keep theirs. ``ALTER COLUMN ... TYPE json`` rewrites the table
under an exclusive lock (stop the server; 200,000 jobs with small data: 1.6 s, the downgrade 1.8 s,
on a loaded 2-CPU VM, PostgreSQL 15, 5 December 2026).
The default (``{}``, migration 0009) is set again as ``json``. SQLite: nothing to do (its JSON
columns are text). The downgrade makes the column ``jsonb`` again (the keys sorted again).

Revision ID: 0021_job_data_json
Revises: 0020_sqlite_autoincrement
Create Date: 2026-12-05
"""

from alembic import op

revision = '0021_job_data_json'
down_revision = '0020_sqlite_autoincrement'
branch_labels = None
depends_on = None


def _set_type(kind: str) -> None:
    # The default is dropped around the change: '{}'::jsonb is not converted to json implicitly.
    op.execute(f"ALTER TABLE jobs ALTER COLUMN data DROP DEFAULT, ALTER COLUMN data TYPE {kind} USING data::{kind}, "
               f"ALTER COLUMN data SET DEFAULT '{{}}'::{kind}")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _set_type("json")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _set_type("jsonb")
