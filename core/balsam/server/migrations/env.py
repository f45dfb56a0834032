"""Alembic environment for the Balsam service (run through ``balsam server migrate``)."""

from __future__ import annotations

from alembic import context

from balsam.server.db import create_db_engine, normalize_database_url
from balsam.server.tables import metadata

config = context.config


def run_migrations_offline() -> None:
    context.configure(url=normalize_database_url(config.get_main_option("sqlalchemy.url")), target_metadata=metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_db_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect().execution_options(balsam_write=True) as conn:
            context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
