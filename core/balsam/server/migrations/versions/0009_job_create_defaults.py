"""Bulk creates (issue 14): on PostgreSQL the job columns a create may leave out default to the
Job model's defaults, and a log event's data to ``{}``.

The bulk create writes its rows with COPY (balsam.server.pg_copy): a column the request leaves out
for every job (most of them: a typical create gives a workdir, an app, tags and parameters) is then
left out of the COPY and takes its default, instead of being sent and parsed 5,000 times (about a
tenth of the insert). The defaults are those of ``balsam.models.Job`` (tests/server/test_job_create_values.py
checks that they stay equal to ``balsam.server.jobs_logic.CREATE_DEFAULTS``); columns defaulting to
NULL (``return_code``, ``batch_job_id``) need none. Every other writer still gives every column.

Revision ID: 0009_job_create_defaults
Revises: 0008_fk_check_one_pass
Create Date: 2026-12-01
"""

from alembic import op

revision = '0009_job_create_defaults'
down_revision = '0008_fk_check_one_pass'
branch_labels = None
depends_on = None

#: (table, column, SQL of its default)
DEFAULTS = [
    ("jobs", "tags", "'{}'::jsonb"),
    ("jobs", "serialized_parameters", "''"),
    ("jobs", "data", "'{}'::jsonb"),
    ("jobs", "num_nodes", "1"),
    ("jobs", "ranks_per_node", "1"),
    ("jobs", "threads_per_rank", "1"),
    ("jobs", "threads_per_core", "1"),
    ("jobs", "launch_params", "'{}'::jsonb"),
    ("jobs", "gpus_per_rank", "0.0"),
    ("jobs", "node_packing_count", "1"),
    ("jobs", "wall_time_min", "0"),
    ("jobs", "parent_ids", "'[]'::jsonb"),
    ("jobs", "pending_file_cleanup", "true"),
    ("jobs", "serialized_return_value", "''"),
    ("jobs", "serialized_exception", "''"),
    ("log_events", "data", "'{}'::jsonb"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in ("jobs", "log_events"):
        changes = ", ".join(f"ALTER COLUMN {column} SET DEFAULT {sql}" for t, column, sql in DEFAULTS if t == table)
        op.execute(f"ALTER TABLE {table} {changes}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in ("jobs", "log_events"):
        changes = ", ".join(f"ALTER COLUMN {column} DROP DEFAULT" for t, column, _ in DEFAULTS if t == table)
        op.execute(f"ALTER TABLE {table} {changes}")
