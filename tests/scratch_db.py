"""An empty database of a test's own, of the same kind as a given one: a file next to the test's
for SQLite, a database created on the same PostgreSQL server (and dropped after, connections
closed first) for PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa

from balsam.server.db import normalize_database_url


@contextlib.contextmanager
def scratch_database(like_url: str, tmp_path: Path, label: str) -> Iterator[str]:
    """The URL of a new empty database like ``like_url`` (``label`` goes into its name)."""
    if like_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / f'{label}.db'}"
        return
    base = sa.engine.make_url(normalize_database_url(like_url))
    name = f"{base.database}_{label}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
