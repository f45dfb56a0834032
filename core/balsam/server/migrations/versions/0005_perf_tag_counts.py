"""Scale (issue 14): job counts per (app, tag, state) kept by triggers on jobs, so that the count of
a page filtered by one tag (and state, site, app) costs a few rows at any number of jobs, as the
counts per (app, state) of migration 0003 do (see balsam.server.job_counts); and the index
(site_id, state) becomes (site_id, state, id), so that a page of one state (with a tag filter, say)
is read in id order instead of intersecting two large bitmaps and sorting (PostgreSQL, 10^6 jobs:
2 ms instead of 130 ms).

Revision ID: 0005_perf_tag_counts
Revises: 0004_credentials
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa

revision = '0005_perf_tag_counts'
down_revision = '0004_credentials'
branch_labels = None
depends_on = None

# SQLite: row triggers updating the (app, tag key, tag value, state) counters in place; untagged
# jobs (most) skip them.
_UP = ("INSERT INTO job_tag_counts (app_id, tag_key, tag_value, state, site_id, n) "
       "SELECT {row}.app_id, key, value, {row}.state, {row}.site_id, {sign}1 FROM json_each({row}.tags) WHERE true "
       "ON CONFLICT (app_id, tag_key, tag_value, state) DO UPDATE SET n = n {sign} 1;")
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER job_tag_counts_insert AFTER INSERT ON jobs WHEN new.tags <> '{{}}' BEGIN
        {_UP.format(row="new", sign="+")}
    END""",
    f"""CREATE TRIGGER job_tag_counts_update AFTER UPDATE OF state, tags, app_id, site_id ON jobs
    WHEN (old.tags <> '{{}}' OR new.tags <> '{{}}') AND (old.state IS NOT new.state OR old.tags IS NOT new.tags
          OR old.app_id IS NOT new.app_id OR old.site_id IS NOT new.site_id) BEGIN
        {_UP.format(row="old", sign="-")}
        {_UP.format(row="new", sign="+")}
    END""",
    f"""CREATE TRIGGER job_tag_counts_delete AFTER DELETE ON jobs WHEN old.tags <> '{{}}' BEGIN
        {_UP.format(row="old", sign="-")}
    END""",
]

# PostgreSQL: statement triggers appending each statement's net change per (app, tag, state) to
# job_tag_count_deltas (append-only, like job_count_deltas: concurrent writers never wait).
PG_FUNCTIONS = [
    """CREATE OR REPLACE FUNCTION balsam_job_tag_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_tag_count_deltas (site_id, app_id, tag_key, tag_value, state, delta)
        SELECT r.site_id, r.app_id, t.key, t.value, r.state, count(*)
        FROM new_rows AS r, jsonb_each_text(r.tags) AS t GROUP BY r.site_id, r.app_id, t.key, t.value, r.state;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION balsam_job_tag_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_tag_count_deltas (site_id, app_id, tag_key, tag_value, state, delta)
        SELECT site_id, app_id, key, value, state, sum(d) FROM (
            SELECT r.site_id, r.app_id, t.key, t.value, r.state, -1 AS d FROM old_rows AS r, jsonb_each_text(r.tags) AS t
            UNION ALL
            SELECT r.site_id, r.app_id, t.key, t.value, r.state, 1 AS d FROM new_rows AS r, jsonb_each_text(r.tags) AS t
        ) AS changes GROUP BY site_id, app_id, key, value, state HAVING sum(d) <> 0;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION balsam_job_tag_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_tag_count_deltas (site_id, app_id, tag_key, tag_value, state, delta)
        SELECT r.site_id, r.app_id, t.key, t.value, r.state, -count(*)
        FROM old_rows AS r, jsonb_each_text(r.tags) AS t GROUP BY r.site_id, r.app_id, t.key, t.value, r.state;
        RETURN NULL;
    END $$""",
]
PG_TRIGGERS = [
    "CREATE TRIGGER job_tag_counts_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_tag_counts_insert()",
    "CREATE TRIGGER job_tag_counts_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_tag_counts_update()",
    "CREATE TRIGGER job_tag_counts_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_tag_counts_delete()",
]


def upgrade() -> None:
    op.create_table('job_tag_counts',
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('tag_key', sa.Text(), nullable=False),
    sa.Column('tag_value', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('app_id', 'tag_key', 'tag_value', 'state', name=op.f('pk_job_tag_counts'))
    )
    op.create_index(op.f('ix_job_tag_counts_tag_key'), 'job_tag_counts', ['tag_key', 'tag_value'], unique=False)
    op.create_table('job_tag_count_deltas',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('tag_key', sa.Text(), nullable=False),
    sa.Column('tag_value', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('delta', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_tag_count_deltas'))
    )
    op.create_index(op.f('ix_jobs_site_id_state_id'), 'jobs', ['site_id', 'state', 'id'], unique=False)
    op.drop_index(op.f('ix_jobs_site_id_state'), table_name='jobs')
    pg = op.get_bind().dialect.name == "postgresql"
    # The jobs that exist already, counted once (the table is locked by the migration's transaction).
    each = "jsonb_each_text(jobs.tags)" if pg else "json_each(jobs.tags)"
    op.execute("INSERT INTO job_tag_counts (app_id, tag_key, tag_value, state, site_id, n) "
               f"SELECT app_id, t.key, t.value, state, min(site_id), count(*) FROM jobs, {each} AS t "
               "GROUP BY app_id, t.key, t.value, state")
    for statement in (PG_FUNCTIONS + PG_TRIGGERS) if pg else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    for name in ("job_tag_counts_insert", "job_tag_counts_update", "job_tag_counts_delete"):
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON jobs")
            op.execute(f"DROP FUNCTION IF EXISTS balsam_{name}()")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.create_index(op.f('ix_jobs_site_id_state'), 'jobs', ['site_id', 'state'], unique=False)
    op.drop_index(op.f('ix_jobs_site_id_state_id'), table_name='jobs')
    op.drop_table('job_tag_count_deltas')
    op.drop_index(op.f('ix_job_tag_counts_tag_key'), table_name='job_tag_counts')
    op.drop_table('job_tag_counts')
