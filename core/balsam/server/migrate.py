"""Schema migrations with alembic (scripts ship inside the package: balsam/server/migrations)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .db import create_db_engine, normalize_database_url

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: The PostgreSQL advisory lock the embedded migration takes (any constant of balsam's own).
MIGRATION_LOCK_KEY = 0x62616C73616D  # "balsam"


def load_migration(file_name: str) -> ModuleType:
    """A migration script as a module (a later migration reuses an earlier one's SQL builders;
    the scripts are files, not an importable package)."""
    path = MIGRATIONS_DIR / "versions" / file_name
    spec = importlib.util.spec_from_file_location(f"balsam_migration_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_database_url(database_url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: sa.Engine) -> "str | None":
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class SchemaMismatch(RuntimeError):
    """The database's schema is not the one this balsam's code reads and writes."""


def schema_mismatch(engine: sa.Engine) -> "str | None":
    """Why this balsam must not serve ``engine``'s database (one line), or None when its schema is
    at head. A server on an older schema starts and answers until a route reads a column it lacks
    (500s, also from the background sweep), so the server checks at startup rather than later."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return None
    where = f"database {engine.url.render_as_string(hide_password=True)}"
    if current is None:
        return f"{where} has no balsam schema, this balsam needs {head}: run `balsam server migrate`"
    if not _known_revision(current):
        return (f"{where} is at revision {current}, which this balsam (schema {head}) does not know: "
                "a newer balsam wrote it; run that version (or upgrade balsam here)")
    return f"{where} is at revision {current}, this balsam needs {head}: run `balsam server migrate`"


def check_schema(engine: sa.Engine) -> None:
    """Raise SchemaMismatch unless ``engine``'s database is at this balsam's head revision."""
    problem = schema_mismatch(engine)
    if problem is not None:
        raise SchemaMismatch(problem)


def _known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(revision) is not None
    except CommandError:  # alembic's "Can't locate revision identified by ..."
        return False


def upgrade(database_url: str, revision: str = "head") -> str:
    """Upgrade the schema to ``revision``; returns the revision now stored."""
    command.upgrade(alembic_config(database_url), revision)
    engine = create_db_engine(database_url)
    try:
        return current_revision(engine) or ""
    finally:
        engine.dispose()


def upgrade_engine(engine: sa.Engine) -> None:
    """Bring an engine's database to head inside one write transaction (embedded servers).
    Refuses (SchemaMismatch) a database a newer balsam wrote: it cannot be brought to this head."""
    current = current_revision(engine)
    if current is not None and not _known_revision(current):
        raise SchemaMismatch(schema_mismatch(engine) or f"unknown schema revision {current}")
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect().execution_options(balsam_write=True) as conn:
        if conn.dialect.name == "postgresql":
            # Several workers of one server start at once (uvicorn --workers N): without a lock
            # they all create alembic_version and the tables, and all but one die of a
            # UniqueViolation. The lock is the transaction's: the others wait, then find head.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
