"""The partial indexes the migrations leave are those of balsam.server.tables, predicates included.

``compare_metadata`` (tests/server/test_migrations.py) ignores ``postgresql_where`` /
``sqlite_where``: a migration whose predicate drifted from the tables module (the acquires' partial
indexes of migrations 0010 and 0018, the cleanup index, the reserved keys) would go unnoticed, and
a query written for the tables module's predicate would not use the index. Here each partial
index's definition, as the database stores it, is compared with that of a database made by
``create_all``: PostgreSQL's ``pg_indexes.indexdef``, SQLite's ``sqlite_master.sql`` (whitespace
normalised). On SQLite and PostgreSQL."""

from __future__ import annotations

import re
from typing import Iterator

import pytest
import sqlalchemy as sa

from balsam.server.db import create_db_engine
from balsam.server.migrate import head_revision, upgrade
from balsam.server.tables import metadata
from scratch_db import scratch_database


def _normalised(sql: str) -> str:
    sql = re.sub(r"\s+", " ", sql.strip())
    return re.sub(r"\s*([(),])\s*", r"\1", sql)


def _partial_indexes(url: str) -> dict[str, str]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes "
                                            "WHERE schemaname = current_schema()")).all()
            else:
                rows = conn.execute(sa.text("SELECT name, sql FROM sqlite_master "
                                            "WHERE type = 'index' AND sql IS NOT NULL")).all()
    finally:
        engine.dispose()
    return {name: _normalised(sql) for name, sql in rows if re.search(r"\sWHERE\s", sql, re.IGNORECASE)}


@pytest.fixture
def created_url(database_url: str, tmp_path) -> Iterator[str]:
    """A second, empty database of the same kind, for ``create_all``."""
    with scratch_database(database_url, tmp_path, "create_all") as url:
        yield url


def test_partial_indexes_after_upgrade_are_those_of_create_all(database_url: str, created_url: str) -> None:
    assert upgrade(database_url) == head_revision()
    engine = create_db_engine(created_url)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    migrated, created = _partial_indexes(database_url), _partial_indexes(created_url)
    # The acquires' leasable indexes and the jobs' nullable-column indexes are partial on both.
    assert "ix_jobs_released_from_session_id" in created and len(created) >= 5, created
    assert migrated.keys() == created.keys()
    for name in created:
        assert migrated[name] == created[name], name
