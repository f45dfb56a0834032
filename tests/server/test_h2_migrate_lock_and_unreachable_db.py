"""Operating a server's database: ``balsam server migrate`` run twice at once on PostgreSQL (two
operators, a deployment script beside a hand-run one) takes turns instead of running the same DDL
twice; a server whose database it cannot use at start (no waiting mends: an unknown user, a file
that is no database) says so in one line and exits with uvicorn's startup failure (one that cannot
be reached is waited for: test_f2_worker_start_during_db_outage.py). Real PostgreSQL and SQLite,
real ``python -m balsam.server``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

from balsam.server.db import create_db_engine
from balsam.server.migrate import MIGRATION_LOCK_KEY, current_revision, head_revision, upgrade
from scratch_db import scratch_database

SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"  # tests/conftest.py SERVER_SECRET
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py
OLD_REVISION = "0016_session_clock_restarted"  # before 0017's rewrite of jobs on PostgreSQL
#: The one line of a server refusing to start (app._refuse_to_start) and its exit status.
REFUSAL = "balsam server: cannot use the database "
STARTUP_FAILURE = 3


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with scratch_database(os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL), tmp_path, "h2lock") as url:
        yield url.replace("postgresql+psycopg2://", "postgresql://", 1)


def _revision(url: str) -> "str | None":
    engine = create_db_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def _waits_for_lock(conn: sa.Connection, done: threading.Event) -> bool:
    """True once another backend waits for the migration lock that ``conn`` holds; False if the
    upgrade finished without ever waiting (it did not take the lock)."""
    # pg_locks shows an advisory lock on a bigint key as classid (high 32 bits), objid (low 32 bits).
    high, low = MIGRATION_LOCK_KEY >> 32, MIGRATION_LOCK_KEY & 0xFFFFFFFF
    query = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND classid = :high AND objid = :low")
    while not done.is_set():
        if conn.execute(query, {"high": high, "low": low}).scalar_one():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.postgres
def test_migrate_waits_for_a_migration_under_way(pg_url: str) -> None:
    """`balsam server migrate` takes the lock the servers that migrate their own database take
    (a second one ran the same DDL at once and died of `duplicate key value violates unique
    constraint "pg_type_typname_nsp_index"`, or from an older revision `trigger ... does not exist`)."""
    upgrade(pg_url, OLD_REVISION)
    holder = create_db_engine(pg_url)
    done = threading.Event()
    outcome: dict[str, object] = {}

    def migrate() -> None:
        try:
            outcome["revision"] = upgrade(pg_url)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc
        finally:
            done.set()

    try:
        with holder.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
            thread = threading.Thread(target=migrate)
            thread.start()
            try:
                waited = _waits_for_lock(conn, done)
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                conn.commit()
                thread.join()
    finally:
        holder.dispose()
    assert "error" not in outcome, outcome.get("error")
    assert waited, "the upgrade ran without waiting for the migration under way"
    assert outcome["revision"] == head_revision() == _revision(pg_url)


@pytest.mark.postgres
def test_three_migrates_at_once_from_an_older_revision_all_succeed(pg_url: str, tmp_path: Path) -> None:
    upgrade(pg_url, OLD_REVISION)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env["BALSAM_HOME"] = str(tmp_path / "home")
    procs = [subprocess.Popen([sys.executable, "-c", "from balsam.cli import main; main()", "server", "migrate",
                               "--database-url", pg_url],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    results = [(proc.returncode, output) for proc, output in zip(procs, outputs)]
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert _revision(pg_url) == head_revision()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _serve(database_url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update(BALSAM_AUTH_SECRET_KEY=SECRET, BALSAM_HOME=str(tmp_path / "home"))
    # Its own process group: a supervisor that goes on restarting workers is stopped with them.
    proc = subprocess.Popen([sys.executable, "-m", "balsam.server", "--port", str(_closed_port()),
                             "--database-url", database_url, "--log-level", "warning", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the server neither started nor exited in 120 s:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _refusals(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(REFUSAL)]


def _unknown_role_url(password: str = "") -> str:
    """The test PostgreSQL server, as a user it does not know (a fault no waiting mends). An
    unreachable one (a closed port) is waited for instead: tests/server/test_f2_worker_start_during_db_outage.py."""
    url = sa.engine.make_url(os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL))
    return url.set(username="balsam_h2_nobody", password=password or None).render_as_string(hide_password=False)


@pytest.mark.postgres
def test_an_unusable_postgresql_database_is_one_line_and_startup_failure(tmp_path: Path) -> None:
    result = _serve(_unknown_role_url("hunter2-secret"), tmp_path)
    assert result.returncode == STARTUP_FAILURE, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = _refusals(result)
    assert "://balsam_h2_nobody:***@" in line and "hunter2-secret" not in result.stderr
    # 'role "balsam_h2_nobody" does not exist', or with password authentication configured
    # 'password authentication failed for user "balsam_h2_nobody"'.
    assert '"balsam_h2_nobody"' in line.partition(": ")[2], line


def test_an_sqlite_file_that_is_no_database_is_one_line_and_startup_failure(tmp_path: Path) -> None:
    path = tmp_path / "balsam.db"
    path.write_text("not a database\n" * 200)
    result = _serve(f"sqlite:///{path}", tmp_path)
    assert result.returncode == STARTUP_FAILURE, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert _refusals(result) == [f"{REFUSAL}sqlite:///{path}: file is not a database"]


@pytest.mark.postgres
def test_workers_stop_on_an_unusable_database(tmp_path: Path) -> None:
    """uvicorn's supervisor stops on a worker's startup failure; on another exit status it started
    the workers again and again (a traceback each)."""
    result = _serve(_unknown_role_url(), tmp_path, "--workers", "2")
    assert "Traceback" not in result.stderr, result.stderr
    assert 1 <= len(_refusals(result)) <= 2, result.stderr


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    like = "sqlite://" if request.param == "sqlite" else os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    with scratch_database(like, tmp_path, "h2fail") as url:
        yield url


def test_an_upgrade_that_fails_leaves_the_database_where_it_was(any_url: str) -> None:
    """One transaction on both databases: on SQLite the revisions before the failing one were
    committed one by one, and the database was left at 0017 of an upgrade from 0016."""
    upgrade(any_url, OLD_REVISION)
    engine = create_db_engine(any_url)
    try:
        with engine.begin() as conn:  # what 0018 creates, taken already: its CREATE INDEX fails
            conn.execute(sa.text("CREATE TABLE ix_jobs_released_from_session_id (x INTEGER)"))
        with pytest.raises(sa.exc.DBAPIError, match="ix_jobs_released_from_session_id"):
            upgrade(any_url)
        assert current_revision(engine) == OLD_REVISION
        assert "released_from_session_id" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def _migrate_cli(url: str, tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env["BALSAM_HOME"] = str(tmp_path / "home")
    return subprocess.Popen([sys.executable, "-c", "from balsam.cli import main; main()", "server", "migrate",
                             "--database-url", url], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_migrate_names_each_revision_as_it_starts(any_url: str, tmp_path: Path) -> None:
    """A revision that rewrites a large table takes minutes: the command said nothing meanwhile."""
    upgrade(any_url, OLD_REVISION)
    proc = _migrate_cli(any_url, tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    steps = [line.split()[1:4] for line in output.splitlines() if line.startswith("  ") and " -> " in line]
    assert steps[0] == [OLD_REVISION, "->", "0017_bigint_job_ids"]
    assert steps[-1][2] == head_revision()
    assert all(earlier[2] == later[0] for earlier, later in zip(steps, steps[1:])), output


@pytest.mark.postgres
def test_migrate_says_it_waits_for_a_migration_under_way(pg_url: str, tmp_path: Path) -> None:
    holder = create_db_engine(pg_url)
    try:
        with holder.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
            proc = _migrate_cli(pg_url, tmp_path)
            try:
                waiting = proc.stdout.readline() and proc.stdout.readline()  # "Migrating ...", then the wait
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                conn.commit()
            rest = proc.communicate(timeout=300)[0]
    finally:
        holder.dispose()
    assert proc.returncode == 0, waiting + rest
    assert waiting.startswith("  waiting for another migration of this database to end"), waiting + rest
    assert f"Database schema at revision {head_revision()}" in rest


@pytest.mark.postgres
def test_a_server_started_during_a_migration_says_it_is_under_way(pg_url: str, tmp_path: Path) -> None:
    """It said `run balsam server migrate` to whoever had just started it."""
    upgrade(pg_url, OLD_REVISION)
    holder = create_db_engine(pg_url)
    try:
        with holder.connect() as conn:  # the lock `balsam server migrate` holds while it runs
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
            result = _serve(pg_url, tmp_path)
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
    finally:
        holder.dispose()
    assert result.returncode == STARTUP_FAILURE, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("balsam server: database ")]
    assert f"is at revision {OLD_REVISION} and being migrated now" in line
    assert "start it once the migration has ended" in line and "run `balsam server migrate`" not in line
