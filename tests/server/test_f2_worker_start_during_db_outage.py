"""A server worker that starts while PostgreSQL is briefly unreachable (restarting, failing over,
out of connection slots) waits for it instead of exiting with uvicorn's startup failure (status 3):
with ``--workers N`` that status made the supervisor stop the whole service for good when a worker
restarted (OOM kill, crash) during the outage. A database that no waiting mends still stops it in
one line, status 3; an SQL error of ours at start keeps its traceback. Real PostgreSQL, SQLite,
real ``python -m balsam.server`` (uvicorn and its supervisor)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import sqlalchemy as sa

from balsam.server.db import create_db_engine, normalize_database_url
from balsam.server.migrate import upgrade
from scratch_db import scratch_database

SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"  # tests/conftest.py SERVER_SECRET
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py
STARTUP_FAILURE = 3  # uvicorn's
REFUSAL = "balsam server: cannot use the database "
WAITING = "balsam server: cannot reach the database "
STARTED = "Application startup complete."
#: Bounds a test's wait for the server's next line; the outcome is never decided by it.
LINE_TIMEOUT_SEC = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update(BALSAM_AUTH_SECRET_KEY=SECRET, BALSAM_HOME=str(tmp_path / "home"))
    return env


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with scratch_database(os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL), tmp_path, "f2outage") as url:
        yield url.replace("postgresql+psycopg2://", "postgresql://", 1)


def _set_outage(url: str, down: bool) -> None:
    """This test's own database refuses connections (and its open ones end), as during a restart."""
    parsed = sa.engine.make_url(normalize_database_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS {"false" if down else "true"}')
            if down:
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": parsed.database})
    finally:
        admin.dispose()


class Served:
    """``python -m balsam.server`` in its own process group, its stderr read line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, containing: str) -> bool:
        """Reads up to the next line containing ``containing``: False if the server ended first."""
        while True:
            try:
                line = self._queue.get(timeout=LINE_TIMEOUT_SEC)
            except queue.Empty:
                raise AssertionError(f"no line with {containing!r} in {LINE_TIMEOUT_SEC} s:\n" + self.tail()) from None
            if line is None:
                return False
            self.lines.append(line)
            if containing in line:
                return True

    def workers(self) -> list[psutil.Process]:
        return [child for child in psutil.Process(self.proc.pid).children()
                if "multiprocessing.spawn" in " ".join(child.cmdline())]

    def tail(self) -> str:
        return "\n".join(self.lines[-30:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _serve(database_url: str, tmp_path: Path, *extra: str, wait_sec: "float | None" = None) -> Served:
    args = ["--port", str(_free_port()), "--database-url", database_url, *extra]
    if wait_sec is None:
        command = ["-m", "balsam.server", *args]
    else:  # one process: the bound on the wait, shortened in that process
        command = ["-c", f"import balsam.server.app as app; app.DATABASE_WAIT_SEC = {wait_sec}\n"
                         f"from balsam.server.__main__ import main; main({args!r})"]
    return Served([sys.executable, *command], _env(tmp_path))


@pytest.mark.postgres
def test_a_worker_restarted_during_a_database_outage_waits_and_the_service_stays_up(pg_url: str,
                                                                                    tmp_path: Path) -> None:
    upgrade(pg_url)
    server = _serve(pg_url, tmp_path, "--workers", "2", "--log-level", "info")
    try:
        assert server.next_line(STARTED) and server.next_line(STARTED), server.tail()
        (victim, _) = server.workers()
        _set_outage(pg_url, down=True)
        try:
            victim.kill()  # a worker dies meanwhile (the OOM killer, a crash): the supervisor starts another
            # Its replacement cannot reach the database: it waits. It exited with status 3, and the
            # supervisor stopped the service: "Child process [...] failed to start, stopping the parent process".
            assert server.next_line(WAITING), "the service stopped:\n" + server.tail()
        finally:
            _set_outage(pg_url, down=False)
        assert server.next_line(STARTED), "the restarted worker never started:\n" + server.tail()
        assert server.proc.poll() is None, server.tail()
        assert len(server.workers()) == 2
    finally:
        server.stop()
    assert not any(line.startswith(REFUSAL) for line in server.lines), server.tail()


def test_a_single_server_gives_up_on_an_unreachable_database_in_one_line_not_startup_failure(tmp_path: Path) -> None:
    """``python -m balsam.server`` alone still ends, with a line saying for how long it tried; its
    status is not 3, so that a supervisor (uvicorn's, systemd's) starts it again."""
    url = f"postgresql://balsam:hunter2-secret@127.0.0.1:{_free_port()}/balsam"
    server = _serve(url, tmp_path, "--log-level", "warning", wait_sec=3)
    try:
        while server.next_line("balsam server: "):
            pass
        status = server.proc.wait()
    finally:
        server.stop()
    assert status not in (0, STARTUP_FAILURE), server.tail()
    assert "Traceback" not in server.tail() and "hunter2-secret" not in server.tail(), server.tail()
    waits = [line for line in server.lines if line.startswith(WAITING) and "trying again in" in line]
    assert waits and all("Connection refused" in line for line in waits), server.tail()
    assert server.lines[-1].startswith(f"{WAITING}postgresql://balsam:***@127.0.0.1:"), server.tail()
    assert " for 3 s: " in server.lines[-1] and "Connection refused" in server.lines[-1]


@pytest.mark.postgres
def test_workers_stop_on_a_database_that_does_not_exist(pg_url: str, tmp_path: Path) -> None:
    """No waiting mends it: one line, uvicorn's startup failure, the supervisor stops."""
    missing = str(sa.engine.make_url(pg_url).set(database="f2_no_such_database").render_as_string(hide_password=False))
    server = _serve(missing, tmp_path, "--workers", "2", "--log-level", "warning")
    try:
        while server.next_line(""):
            pass
        server.proc.wait()  # the supervisor stopped (before, with some exit status, it went on)
    finally:
        server.stop()
    refusals = [line for line in server.lines if line.startswith(REFUSAL)]
    assert 1 <= len(refusals) <= 2, server.tail()
    assert all('database "f2_no_such_database" does not exist' in line for line in refusals), server.tail()
    assert "Traceback" not in server.tail() and not any(line.startswith(WAITING) for line in server.lines)


def test_a_failing_embedded_migration_keeps_its_traceback(tmp_path: Path) -> None:
    """An SQL error of ours at start (here the embedded SQLite migration meets a table named like the
    index it creates) is not "cannot use the database" alone: its traceback is the evidence."""
    path = tmp_path / "balsam.db"
    url = f"sqlite:///{path}"
    upgrade(url, "0016_session_clock_restarted")
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE ix_jobs_released_from_session_id (x INTEGER)"))
    finally:
        engine.dispose()
    server = _serve(url, tmp_path, "--log-level", "warning")
    try:
        while server.next_line(""):
            pass
        status = server.proc.wait()
    finally:
        server.stop()
    assert status == STARTUP_FAILURE, server.tail()
    assert "Traceback (most recent call last):" in server.lines, server.tail()
    assert server.lines[-1].startswith(f"{REFUSAL}{url}: ") and "ix_jobs_released_from_session_id" in server.lines[-1]
