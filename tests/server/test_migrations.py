"""Alembic migrations create exactly the schema of balsam.server.tables, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from balsam.server.db import create_db_engine
from balsam.server.migrate import alembic_config, head_revision, load_migration, upgrade
from balsam.server.tables import metadata


STATEMENT_CHECKED_FKS = load_migration("0007_statement_fk_checks.py").STATEMENT_CHECKED_FKS
LEASE_REFS = load_migration("0012_lease_refs.py")


def test_upgrade_matches_tables_and_downgrades(database_url):
    engine = create_db_engine(database_url)
    try:
        if database_url.startswith("sqlite"):
            assert upgrade(database_url) == head_revision()
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn)
            assert ctx.get_current_revision() == head_revision()
            diff = compare_metadata(ctx, metadata)
            if engine.dialect.name == "sqlite":
                # The GIN index exists only on PostgreSQL (Index.ddl_if), which autogenerate ignores.
                diff = [d for d in diff if not (d[0] == "add_index" and d[1].name == "ix_jobs_tags_gin")]
            if engine.dialect.name == "postgresql":
                # Migrations 0007 and 0012 replace these foreign keys with statement triggers (tests/server/test_fk_triggers.py).
                replaced = {name for name, *_ in STATEMENT_CHECKED_FKS + LEASE_REFS.LEASE_FKS}
                diff = [d for d in diff if not (d[0] == "add_fk" and d[1].name in replaced)]
            assert diff == []
            if engine.dialect.name == "postgresql":
                indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("jobs")}
                assert "ix_jobs_tags_gin" in indexes
                triggers = set(conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").scalars())
                for _name, table, column, _parent in STATEMENT_CHECKED_FKS:
                    for kind in ("insert", "update", "cascade", "key_update"):
                        assert f"balsam_fk_{table}_{column}_{kind}" in triggers
                assert {name for name, _ in LEASE_REFS.TRIGGERS} <= triggers
                constraints = set(conn.exec_driver_sql("SELECT conname FROM pg_constraint").scalars())
                assert not constraints & {name for name, *_ in STATEMENT_CHECKED_FKS + LEASE_REFS.LEASE_FKS}
        from alembic import command

        command.downgrade(alembic_config(database_url), "base")
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        assert upgrade(database_url) == head_revision()
        assert {"users", "sites", "apps", "jobs", "job_parents", "batch_jobs", "sessions", "transfer_items",
                "log_events"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
