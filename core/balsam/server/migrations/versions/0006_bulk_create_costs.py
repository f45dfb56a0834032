"""Bulk creates (issue 14): what a 5,000-job insert costs the database besides the rows.

- The per-tag counters' statement triggers (migration 0005) expanded the tags of every changed row
  (``jsonb_each_text`` 5,000 times for a bulk create, whose jobs mostly share one tag set); they now
  group the rows by (site, app, tags, state) first and expand each distinct tag set once. The deltas
  they write are the same.
- ``jobs.session_id`` and ``jobs.batch_job_id`` are NULL for every job not leased or not bound to a
  BatchJob (all new jobs): their indexes become partial (``IS NOT NULL``), which still serve every
  lookup by a session or a BatchJob and cost a new job nothing.

Revision ID: 0006_bulk_create_costs
Revises: 0005_perf_tag_counts
Create Date: 2026-12-01
"""

import importlib.util
from pathlib import Path

from alembic import op
import sqlalchemy as sa

revision = '0006_bulk_create_costs'
down_revision = '0005_perf_tag_counts'
branch_labels = None
depends_on = None

# (site, app, tag key, tag value, state, signed count) of the rows of a transition table, each
# distinct tag set expanded once.
_EXPANDED = """SELECT g.site_id, g.app_id, t.key, t.value, g.state, g.n FROM (
            SELECT site_id, app_id, tags, state, {sign}count(*) AS n FROM {rows}
            WHERE tags <> '{{}}'::jsonb GROUP BY site_id, app_id, tags, state
        ) AS g, jsonb_each_text(g.tags) AS t"""
PG_FUNCTIONS = [
    f"""CREATE OR REPLACE FUNCTION balsam_job_tag_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_tag_count_deltas (site_id, app_id, tag_key, tag_value, state, delta)
        SELECT site_id, app_id, key, value, state, sum(n) FROM ({_EXPANDED.format(sign="", rows="new_rows")}) AS e
        GROUP BY site_id, app_id, key, value, state;
        RETURN NULL;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION balsam_job_tag_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_tag_count_deltas (site_id, app_id, tag_key, tag_value, state, delta)
        SELECT site_id, app_id, key, value, state, sum(n) FROM (
            {_EXPANDED.format(sign="-", rows="old_rows")}
            UNION ALL
            {_EXPANDED.format(sign="", rows="new_rows")}
        ) AS changes GROUP BY site_id, app_id, key, value, state HAVING sum(n) <> 0;
        RETURN NULL;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION balsam_job_tag_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_tag_count_deltas (site_id, app_id, tag_key, tag_value, state, delta)
        SELECT site_id, app_id, key, value, state, sum(n) FROM ({_EXPANDED.format(sign="-", rows="old_rows")}) AS e
        GROUP BY site_id, app_id, key, value, state;
        RETURN NULL;
    END $$""",
]
PARTIAL_INDEXES = (("ix_jobs_session_id", "session_id"), ("ix_jobs_batch_job_id", "batch_job_id"))


def _previous_functions() -> list[str]:
    path = Path(__file__).with_name("0005_perf_tag_counts.py")
    spec = importlib.util.spec_from_file_location("balsam_migration_0005", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PG_FUNCTIONS


def upgrade() -> None:
    for name, column in PARTIAL_INDEXES:
        op.drop_index(name, table_name='jobs')
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(name, 'jobs', [column], unique=False, postgresql_where=where, sqlite_where=where)
    if op.get_bind().dialect.name == "postgresql":
        for statement in PG_FUNCTIONS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _previous_functions():
            op.execute(statement)
    for name, column in PARTIAL_INDEXES:
        op.drop_index(name, table_name='jobs')
        op.create_index(name, 'jobs', [column], unique=False)
