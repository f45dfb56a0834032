"""Dashboard at 10^6 jobs: job counts per (app, state) kept by triggers on jobs (see
balsam.server.job_counts), and the index (site_id, id) for a site's jobs newest first.

Revision ID: 0003_job_counts
Revises: 0002_idempotency_keys
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa

revision = '0003_job_counts'
down_revision = '0002_idempotency_keys'
branch_labels = None
depends_on = None

# SQLite: one row trigger per change, updating the (app, state) counter in place.
SQLITE_TRIGGERS = [
    """CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (app_id, state, site_id, n) VALUES (new.app_id, new.state, new.site_id, 1)
            ON CONFLICT (app_id, state) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER job_counts_update AFTER UPDATE OF state, app_id, site_id ON jobs
    WHEN old.state IS NOT new.state OR old.app_id IS NOT new.app_id OR old.site_id IS NOT new.site_id BEGIN
        INSERT INTO job_counts (app_id, state, site_id, n) VALUES (old.app_id, old.state, old.site_id, -1)
            ON CONFLICT (app_id, state) DO UPDATE SET n = n - 1;
        INSERT INTO job_counts (app_id, state, site_id, n) VALUES (new.app_id, new.state, new.site_id, 1)
            ON CONFLICT (app_id, state) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        INSERT INTO job_counts (app_id, state, site_id, n) VALUES (old.app_id, old.state, old.site_id, -1)
            ON CONFLICT (app_id, state) DO UPDATE SET n = n - 1;
    END""",
]

# PostgreSQL: one statement trigger per INSERT/UPDATE/DELETE, appending the statement's net changes
# per (app, state) to job_count_deltas (append-only: concurrent writers never wait on each other).
PG_FUNCTIONS = [
    """CREATE OR REPLACE FUNCTION balsam_job_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_count_deltas (site_id, app_id, state, delta)
        SELECT site_id, app_id, state, count(*) FROM new_rows GROUP BY site_id, app_id, state;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION balsam_job_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_count_deltas (site_id, app_id, state, delta)
        SELECT site_id, app_id, state, sum(d) FROM (
            SELECT site_id, app_id, state, -1 AS d FROM old_rows
            UNION ALL SELECT site_id, app_id, state, 1 AS d FROM new_rows
        ) AS changes GROUP BY site_id, app_id, state HAVING sum(d) <> 0;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION balsam_job_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_count_deltas (site_id, app_id, state, delta)
        SELECT site_id, app_id, state, -count(*) FROM old_rows GROUP BY site_id, app_id, state;
        RETURN NULL;
    END $$""",
]
PG_TRIGGERS = [
    "CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_counts_insert()",
    "CREATE TRIGGER job_counts_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_counts_update()",
    "CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_counts_delete()",
]


def upgrade() -> None:
    op.create_table('job_counts',
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('app_id', 'state', name=op.f('pk_job_counts'))
    )
    op.create_index(op.f('ix_job_counts_site_id'), 'job_counts', ['site_id'], unique=False)
    op.create_table('job_count_deltas',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('app_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('delta', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_count_deltas'))
    )
    op.create_index(op.f('ix_jobs_site_id_id'), 'jobs', ['site_id', 'id'], unique=False)
    # The jobs that exist already, counted once (the table is locked by the migration's transaction).
    op.execute("INSERT INTO job_counts (app_id, state, site_id, n) "
               "SELECT app_id, state, min(site_id), count(*) FROM jobs GROUP BY app_id, state")
    if op.get_bind().dialect.name == "postgresql":
        for statement in PG_FUNCTIONS + PG_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    for name in ("job_counts_insert", "job_counts_update", "job_counts_delete"):
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON jobs")
            op.execute(f"DROP FUNCTION IF EXISTS balsam_{name}()")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index(op.f('ix_jobs_site_id_id'), table_name='jobs')
    op.drop_table('job_count_deltas')
    op.drop_index(op.f('ix_job_counts_site_id'), table_name='job_counts')
    op.drop_table('job_counts')
