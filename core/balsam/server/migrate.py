"""Schema migrations with alembic (scripts ship inside the package: balsam/server/migrations)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .db import create_db_engine, display_url, normalize_database_url

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


def _drop_indexes(*names: str) -> Callable[[sa.Connection], None]:
    def repair(conn: sa.Connection) -> None:
        for name in names:
            conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))

    return repair


#: Revisions that development builds wrote and no release has, each with the revision its branch
#: left this history at and what undoes its changes. A database at one of them is repaired, stamped
#: with that revision, then upgraded as usual (by `balsam server migrate`, and by the servers that
#: migrate their own database); without this, such a database could only be thrown away.
RETIRED_REVISIONS: dict[str, tuple[str, Callable[[sa.Connection], None]]] = {
    # 04dc147's two partial indexes of runnable jobs; 3d0f55d's 0010_acquire_indexes replaced that
    # migration and creates indexes of the same names (and more) after 0009.
    "0010_runnable_order_indexes": (
        "0009_job_create_defaults", _drop_indexes("ix_jobs_runnable_small_first", "ix_jobs_runnable_long_large_first")),
}


def unknown_revision_problem(revision: str, head: str) -> str:
    """The end of the one line about a database at a revision this balsam has no migration for."""
    return (f"at revision {revision}, unknown to this balsam (written by a newer balsam, or a development revision "
            f"no release has; this balsam's schema is {head}): run the balsam that wrote it, or upgrade balsam here")


def schema_problem(engine: sa.Engine) -> "str | None":
    """What keeps this balsam from serving ``engine``'s database, without naming the database
    (``has no balsam schema ...``, ``is at revision ...``), or None when its schema is at head."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return None
    if current is None:
        return f"has no balsam schema, this balsam needs {head}: run `balsam server migrate`"
    if current in RETIRED_REVISIONS:
        return (f"is at revision {current}, a development revision no release has, this balsam needs {head}: "
                "run `balsam server migrate` (it repairs it)")
    if not _known_revision(current):
        return "is " + unknown_revision_problem(current, head)
    if _migration_under_way(engine):
        # Said apart: "run `balsam server migrate`" to whoever just started it (a deployment that
        # starts the servers while the migration runs) sent them to run a second one.
        return (f"is at revision {current} and being migrated now (`balsam server migrate`, or a server "
                f"migrating it), this balsam needs {head}: start it once the migration has ended")
    return f"is at revision {current}, this balsam needs {head}: run `balsam server migrate`"


def _migration_under_way(engine: sa.Engine) -> bool:
    """True if another session holds the migration lock of this PostgreSQL database (:func:`lock_migrations`)."""
    if engine.dialect.name != "postgresql":
        return False
    # pg_locks shows an advisory lock on a bigint key as classid (its high 32 bits) and objid (its low ones).
    with engine.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = :high "
            "AND objid = :low AND objsubid = 1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"high": MIGRATION_LOCK_KEY >> 32, "low": MIGRATION_LOCK_KEY & 0xFFFFFFFF}).scalar_one())


def schema_mismatch(engine: sa.Engine) -> "str | None":
    """Why this balsam must not serve ``engine``'s database (one line), or None when its schema is
    at head. A server on an older schema starts and answers until a route reads a column it lacks
    (500s, also from the background sweep), so the server checks at startup rather than later."""
    problem = schema_problem(engine)
    return None if problem is None else f"database {display_url(engine)} {problem}"


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


def repair_retired_revision(conn: sa.Connection) -> "str | None":
    """Bring a database at a retired development revision (RETIRED_REVISIONS) back onto this
    balsam's history, in ``conn``'s transaction; returns the retired revision, or None if it was not at one."""
    current = MigrationContext.configure(conn).get_current_revision()
    if current not in RETIRED_REVISIONS:
        return None
    base, repair = RETIRED_REVISIONS[current]
    repair(conn)
    conn.execute(sa.text("UPDATE alembic_version SET version_num = :base WHERE version_num = :current"),
                 {"base": base, "current": current})
    return current


def lock_migrations(conn: sa.Connection, on_wait: "Callable[[], None] | None" = None) -> None:
    """On PostgreSQL, take the migration lock for ``conn``'s transaction (waiting for whoever holds it).

    Several workers of one server start at once (uvicorn --workers N), or two operators run
    `balsam server migrate`: without a lock they all read the same revision and run the same DDL,
    and all but one die of an error about the schema (``duplicate key value violates unique
    constraint "pg_type_typname_nsp_index"``, ``trigger ... does not exist``). The lock is the
    transaction's: the others wait, then find head. SQLite needs none: the migration's transaction
    is a writer's (BEGIN IMMEDIATE), and writers take turns. ``on_wait`` is called before waiting,
    if another holds the lock (to say why nothing happens)."""
    if conn.dialect.name != "postgresql":
        return
    params = {"key": MIGRATION_LOCK_KEY}
    if on_wait is not None and conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:key)"), params).scalar_one():
        return
    if on_wait is not None:
        on_wait()
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), params)


def upgrade(database_url: str, revision: str = "head", on_wait: "Callable[[], None] | None" = None) -> str:
    """Upgrade the schema to ``revision`` (repairing a retired development revision first), under
    the migration lock (:func:`lock_migrations`, ``on_wait`` as there); returns the revision now stored."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect().execution_options(balsam_write=True) as conn:
            lock_migrations(conn, on_wait)
            # Its own transaction, committed: if the upgrade then fails, the database is at a
            # revision of this history, which a later upgrade continues from.
            if repair_retired_revision(conn) is not None:
                conn.commit()
                lock_migrations(conn, on_wait)  # the upgrade's transaction
            cfg = alembic_config(database_url)
            cfg.attributes["connection"] = conn  # migrations/env.py runs them in conn's transaction
            command.upgrade(cfg, revision)
            conn.commit()
        return current_revision(engine) or ""
    finally:
        engine.dispose()


def upgrade_engine(engine: sa.Engine) -> None:
    """Bring an engine's database to head inside one write transaction (embedded servers), a
    retired development revision repaired first. Refuses (SchemaMismatch) a database at a revision
    it does not know (a newer balsam wrote it, or a development build): it cannot be brought to this head."""
    current = current_revision(engine)
    if current is not None and current not in RETIRED_REVISIONS and not _known_revision(current):
        raise SchemaMismatch(schema_mismatch(engine) or f"unknown schema revision {current}")
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect().execution_options(balsam_write=True) as conn:
        lock_migrations(conn)
        repair_retired_revision(conn)  # under the lock: the first worker repairs, the others find head
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
