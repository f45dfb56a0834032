"""A database at a retired development revision (04dc147's ``0010_runnable_order_indexes``, replaced
by ``0010_acquire_indexes`` in 3d0f55d) is repaired and upgraded by ``balsam server migrate`` and by
the servers that migrate their own database; any other unknown revision is named as such; ``server
status`` shows the schema problem; messages name a PostgreSQL database by the URL the user gave."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from balsam.server.db import create_db_engine
from balsam.server.migrate import current_revision, head_revision, upgrade
from scratch_db import scratch_database

RETIRED = "0010_runnable_order_indexes"
SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"  # tests/conftest.py SERVER_SECRET
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py
# What 04dc147's migration 0010_runnable_order_indexes created (`git show 04dc147`), after 0009.
RETIRED_DDL = [
    "CREATE INDEX ix_jobs_runnable_small_first ON jobs (site_id, num_nodes ASC, node_packing_count DESC, "
    "wall_time_min DESC, id ASC) WHERE session_id IS NULL AND state IN ('PREPROCESSED', 'RESTART_READY')",
    "CREATE INDEX ix_jobs_runnable_long_large_first ON jobs (site_id, wall_time_min DESC, num_nodes DESC, "
    "node_packing_count DESC, id ASC) WHERE session_id IS NULL AND state IN ('PREPROCESSED', 'RESTART_READY')",
]


def _user_url(url: str) -> str:
    """The URL as a user writes it (scratch_database gives SQLAlchemy's ``postgresql+psycopg2://``)."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def scratch_url(kind: str, tmp_path: Path) -> Iterator[str]:
    like = "sqlite://" if kind == "sqlite" else os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    with scratch_database(like, tmp_path, "retired") as url:
        yield _user_url(url)


@pytest.fixture
def fresh_url(kind: str, tmp_path: Path) -> Iterator[str]:
    like = "sqlite://" if kind == "sqlite" else os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    with scratch_database(like, tmp_path, "fresh") as url:
        upgrade(url)
        yield url


def _execute(url: str, *statements: str) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _make_retired(url: str) -> None:
    """A database as a development build of 04dc147 left it: at 0009, plus that 0010's indexes, stamped."""
    upgrade(url, "0009_job_create_defaults")
    _execute(url, *RETIRED_DDL, f"UPDATE alembic_version SET version_num = '{RETIRED}'")


def _job_indexes(url: str) -> dict[str, str]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                rows = conn.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                            "AND tbl_name = 'jobs' AND sql IS NOT NULL")).all()
            else:
                rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'jobs'")).all()
    finally:
        engine.dispose()
    return {name: " ".join(sql.split()) for name, sql in rows}


def _revision(url: str) -> "str | None":
    engine = create_db_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def balsam(*args: str):
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BALSAM_DATABASE_URL", raising=False)


def test_migrate_repairs_a_retired_development_revision(scratch_url: str, fresh_url: str) -> None:
    """Before: "cannot migrate ...: it was written by a newer balsam (revision 0010_runnable_order_indexes
    ...): upgrade balsam"; no balsam could ever serve it."""
    _make_retired(scratch_url)
    out = balsam("server", "migrate", "--database-url", scratch_url)
    assert out.exit_code == 0, out.output
    assert f"Database schema at revision {head_revision()}" in out.output
    assert _revision(scratch_url) == head_revision()
    # The same indexes, defined the same way, as a database that never saw the retired revision.
    assert _job_indexes(scratch_url) == _job_indexes(fresh_url)


def test_a_server_that_migrates_its_database_repairs_it_and_a_shared_one_says_how(scratch_url: str) -> None:
    from balsam.server.app import create_app
    from balsam.server.migrate import SchemaMismatch
    from balsam.server.settings import ServerSettings

    _make_retired(scratch_url)
    # A shared server (the schema is its administrator's) refuses, saying what repairs it.
    with pytest.raises(SchemaMismatch) as info:
        create_app(settings=ServerSettings(database_url=scratch_url, secret_key=SECRET), create_tables_now=False)
    assert str(info.value) == (f"database {sa.engine.make_url(scratch_url).render_as_string(hide_password=True)} is "
                               f"at revision {RETIRED}, a development revision no release has, this balsam needs "
                               f"{head_revision()}: run `balsam server migrate` (it repairs it)")
    # The embedded server (`balsam server start`) migrates its own database: it repairs it.
    app = create_app(settings=ServerSettings(database_url=scratch_url, secret_key=SECRET), create_tables_now=True)
    app.state.engine.dispose()
    assert _revision(scratch_url) == head_revision()


def test_another_unknown_revision_is_named_newer_or_development(scratch_url: str) -> None:
    upgrade(scratch_url)
    _execute(scratch_url, "UPDATE alembic_version SET version_num = '0010_someone_elses_branch'")
    out = balsam("server", "migrate", "--database-url", scratch_url)
    assert out.exit_code == 1, out.output
    assert ("it is at revision 0010_someone_elses_branch, unknown to this balsam (written by a newer balsam, or a "
            f"development revision no release has; this balsam's schema is {head_revision()}): run the balsam that "
            "wrote it, or upgrade balsam here") in out.output, out.output
    assert _revision(scratch_url) == "0010_someone_elses_branch"


def test_status_shows_the_schema_problem(scratch_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the counts, exit status 3, and nothing about why no server can serve it."""
    upgrade(scratch_url)
    _execute(scratch_url, "UPDATE alembic_version SET version_num = '9999_future'")
    monkeypatch.setenv("BALSAM_DATABASE_URL", scratch_url)
    out = balsam("server", "status")
    assert out.exit_code == 3, out.output
    assert ("  schema:   the database is at revision 9999_future, unknown to this balsam (written by a newer "
            "balsam, or a development revision no release has") in out.output, out.output
    assert "users: 0  sites: 0  jobs: 0" in out.output
    _execute(scratch_url, f"UPDATE alembic_version SET version_num = '{head_revision()}'")
    assert "schema:" not in balsam("server", "status").output


@pytest.mark.postgres
def test_messages_name_a_postgresql_database_by_the_users_url(tmp_path: Path) -> None:
    from balsam.server.db import display_url
    from balsam.server.migrate import schema_mismatch

    like = os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    with scratch_database(like, tmp_path, "named") as url:
        given = _user_url(url)
        engine = create_db_engine(given)
        try:
            problem = schema_mismatch(engine)
        finally:
            engine.dispose()
        assert problem is not None and problem.startswith(f"database {given} has no balsam schema"), problem
        assert "psycopg2" not in problem
    engine = create_db_engine("postgres://alice:s3cret@db.example.org:5432/balsam")
    try:
        assert display_url(engine) == "postgres://alice:***@db.example.org:5432/balsam"
    finally:
        engine.dispose()
