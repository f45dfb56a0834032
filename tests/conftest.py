"""Shared fixtures: real uvicorn servers, databases and per-test users.

- ``database_url``: parametrized over SQLite (tmp file) and PostgreSQL (``BALSAM_TEST_DATABASE_URL``,
  default ``postgresql://postgres@127.0.0.1:5432/balsam_test``; each pytest process uses its own
  databases ``balsam_test_<pid>_*``, created on demand, schema reset per test, dropped at the end).
- ``live_server`` (session): a real ``uvicorn`` subprocess on a free port with SQLite in a tmp dir;
  yields the base URL. ``live_server_pg``: the same on PostgreSQL.
- ``live_server_factory`` (session): ``start(database="sqlite"|"postgresql", env={...}, workers=1)``
  for servers with special settings (e.g. ``BALSAM_SESSION_EXPIRE_SEC``); returns a ``LiveServer``
  (``.url``, ``.log_path``, ``.log_tail()``).
- ``balsam_env``: a fresh user on ``live_server`` with a token and a client.yml in a tmp
  BALSAM_HOME; BALSAM_HOME and BALSAM_CLIENT_PATH are set in the environment for the test (so the
  Python API, CLI subprocesses and child processes act as that user). Attributes: ``url``,
  ``username``, ``password``, ``token``, ``token_expiry``, ``user_id``, ``home``, ``client_path``;
  ``headers()`` and ``http()`` (a logged-in httpx.Client). ``balsam_env_pg``: same on PostgreSQL.
- ``register``: ``register(url) -> (username, password, user_id, token, expiry)`` for more users.

The log tail of a live server is attached to the report of every failing test that used it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml



def _share_httpx_default_tls_context() -> None:
    """httpx builds a new TLS context for every Client, loading certifi's CA bundle: every
    ``httpx.get``/``httpx.post`` is a Client. That cost 20-40 ms on a quiet 2-core VM and ~230 ms at
    load 8, and register_user alone paid it twice per test (the tests talk plain http to 127.0.0.1
    and never use the context). The default-verification contexts are all alike and a context is
    meant to be shared between connections: one per test process and SSL_CERT_FILE/SSL_CERT_DIR
    (which httpx reads). Any other ``verify``/``cert``/``trust_env`` builds its own as before."""
    transport = sys.modules.get("httpx._transports.default")
    build = getattr(transport, "create_ssl_context", None)
    if build is None:  # another httpx layout: nothing to share
        return
    shared: dict = {}

    def create_ssl_context(verify=True, cert=None, trust_env=True):  # noqa: ANN001, ANN202
        if verify is True and cert is None and trust_env:
            key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
            if key not in shared:
                shared[key] = build(verify=verify, cert=cert, trust_env=trust_env)
            return shared[key]
        return build(verify=verify, cert=cert, trust_env=trust_env)

    transport.create_ssl_context = create_ssl_context


_share_httpx_default_tls_context()

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"
SERVER_SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"


def pg_base_url() -> str:
    return os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)


def pg_test_url(suffix: str = "") -> str:
    """A database private to this pytest process: ``<BALSAM_TEST_DATABASE_URL db>_<pid>[_suffix]``.

    Several engineers (and CI) run pytest at the same time on one PostgreSQL server; sharing one
    database would let one session's schema reset pull the tables from under another's server.
    """
    from sqlalchemy.engine import make_url

    from balsam.server.db import normalize_database_url

    url = make_url(normalize_database_url(pg_base_url()))
    name = f"{url.database}_{os.getpid()}" + (f"_{suffix}" if suffix else "")
    _CREATED_PG_DATABASES.add(name)
    return url.set(database=name).render_as_string(hide_password=False)


_CREATED_PG_DATABASES: set[str] = set()


def _pg_admin_engine():
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url

    url = sa.engine.make_url(normalize_database_url(pg_base_url()))
    return sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")


def drop_pg_databases(names: "set[str]") -> None:
    if not names:
        return
    admin = _pg_admin_engine()
    try:
        with admin.connect() as conn:
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:  # PostgreSQL unreachable: nothing was created there either
        pass
    finally:
        admin.dispose()


def pytest_sessionfinish(session, exitstatus):  # noqa: ANN001
    """Drop this process's private test databases (servers are stopped by their fixtures first).
    Under pytest-xdist each worker is such a process (its own pid, its own databases); the
    controller runs no tests and has none."""
    drop_pg_databases(set(_CREATED_PG_DATABASES))


# -- pytest-xdist (scripts/test.sh runs the suite with `-n 2 --dist loadgroup`) --------------------
#: Test files whose tests must not overlap one another: the tests of one group all go to one worker,
#: which runs them one after another, as a serial run does (the other worker meanwhile runs other
#: tests). ``slurm``: the real Slurm cluster of the CI host has 4 nodes, and its tests size their
#: allocations, and what they wait for, to a cluster nobody else in the run is using. Every test
#: marked ``slurm`` must be in one of the group's files (checked at collection).
XDIST_GROUPS: dict[str, tuple[str, ...]] = {
    "slurm": ("tests/schedulers/test_slurm_real.py", "tests/schedulers/test_e2e_slurm.py",
              "tests/elastic/test_elastic_e2e.py", "tests/schedulers/test_slurm_min_nodes_discovery.py",
              "tests/schedulers/test_tz_slurm_real.py"),
    # One private GRES cluster on fixed ports per run: its module-scoped fixture on one worker.
    "gres": ("tests/platforms/test_perlmutter_slurm_gres_real.py",),
}
_XDIST_GROUP_OF_FILE = {path: group for group, paths in XDIST_GROUPS.items() for path in paths}


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    """A test marked with a group's name (``slurm``) outside that group's files would overlap the
    group under xdist: refuse the run, whether or not it is distributed."""
    stray = [item.nodeid for item in items for group in XDIST_GROUPS
             if item.get_closest_marker(group) is not None
             and _XDIST_GROUP_OF_FILE.get(item.nodeid.split("::", 1)[0]) != group]
    if stray:
        raise pytest.UsageError(f"tests marked with an xdist group outside its files (add the file to "
                                f"XDIST_GROUPS in tests/conftest.py): {stray}")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):  # noqa: ANN001
    """``--dist loadgroup`` with XDIST_GROUPS: like xdist's own loadgroup (each test its own unit
    of work, sent to whichever worker is free; tests marked ``xdist_group(NAME)`` one unit), and each
    group of XDIST_GROUPS one unit. The groups go by file: the controller sees only test ids (and
    xdist 3.8's ``xdist_group`` renaming of ids does nothing on pytest 9.2, whose nodes keep their id
    elsewhere)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class BalsamGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = _XDIST_GROUP_OF_FILE.get(nodeid.split("::", 1)[0])
            return group or super()._split_scope(nodeid)

    return BalsamGroupScheduling(config, log)


def ensure_pg_database(url: str) -> None:
    """Create the test database if it does not exist (connects to the ``postgres`` db)."""
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url

    parsed = sa.engine.make_url(normalize_database_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        for attempt in range(PG_BUSY_RETRIES + 1):
            try:
                with admin.connect() as conn:
                    exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                          {"n": parsed.database}).first()
                    if not exists:
                        conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
                return
            except sa.exc.OperationalError as exc:
                # Both xdist workers' servers at their busiest can hold PostgreSQL's 100 connections
                # for a moment (seen once in a full run: a module's fixture then errored 3 tests).
                if "too many clients" not in str(exc) or attempt == PG_BUSY_RETRIES:
                    raise
                time.sleep(1.0)
    finally:
        admin.dispose()


#: Seconds (one try a second) ensure_pg_database waits out PostgreSQL's connection limit.
PG_BUSY_RETRIES = 60


def reset_pg_schema(url: str) -> None:
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url
    from balsam.server.migrate import upgrade
    from balsam.server.tables import metadata

    engine = sa.create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        metadata.drop_all(engine)
    finally:
        engine.dispose()
    upgrade(url)


def empty_pg_schema(url: str) -> None:
    """No tables at all: what a server's own migration (BALSAM_SERVER_CREATE_TABLES) starts from."""
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url

    engine = sa.create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve_in_process() -> Iterator:
    """``serve(app) -> base URL``: a real uvicorn serving ``app`` in a thread of this process, for
    tests that patch the server's code (a live_server subprocess would not see the patch). Every
    server started is stopped when the test ends."""
    import uvicorn

    started: list[tuple[object, threading.Thread]] = []

    def serve(app: object) -> str:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        while not server.started:  # a readiness wait, not a timed assertion
            assert thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{server.config.port}"

    yield serve
    for server, thread in started:
        server.should_exit = True
        thread.join()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'balsam-test.db'}"
    else:
        url = pg_test_url("db")
        ensure_pg_database(url)
        reset_pg_schema(url)
        yield url


class LiveServer:
    """A uvicorn subprocess serving balsam.server on a free port."""

    def __init__(self, database_url: str, workdir: Path, extra_env: "dict[str, str] | None" = None, workers: int = 1):
        self.database_url = database_url
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.extra_env = extra_env or {}
        self.workers = workers
        self.proc: "subprocess.Popen | None" = None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env.update({
            "BALSAM_DATABASE_URL": self.database_url,
            "BALSAM_AUTH_SECRET_KEY": SERVER_SECRET,
            "BALSAM_HOME": str(self.workdir / "server-home"),
            "BALSAM_SERVER_CREATE_TABLES": "1",
            # Test servers are open deployments: every test registers its own users.
            "BALSAM_AUTH_REGISTRATION": "open",
            # The factory's servers live until the session ends: each keeps at most 2 idle
            # PostgreSQL connections (bursts still open up to max_overflow more, closed after use);
            # at the default 10, some 25 servers held PostgreSQL's 100 by the end of a full run.
            "BALSAM_DB_POOL_SIZE": "2",
            # Every test registers and logs in its own user: two scrypt hashes each, ~57 ms apiece
            # at the default N=2**14, ~4 ms at the floor. tests/server/test_scrypt_work_factor.py
            # runs servers at the default (a blank value is an unset one).
            "BALSAM_AUTH_SCRYPT_N": "1024",
            **self.extra_env,
        })
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"test server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/auth/how", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"test server did not answer within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "log_file", None):
            self.log_file.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001
    """Attach the live server's log tail to failing tests that used it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name in ("live_server", "live_server_pg"):
            server = getattr(item, "_balsam_" + name, None)
            if server is not None:
                report.sections.append((f"{name} log ({server.log_path})", server.log_tail()))


def _start_server(tmp_path_factory: pytest.TempPathFactory, name: str, url: str) -> LiveServer:
    server = LiveServer(url, tmp_path_factory.mktemp(name))
    server.start()
    return server


@pytest.fixture(scope="session")
def _live_server_obj(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("live-server")
    server = LiveServer(f"sqlite:///{workdir / 'balsam.db'}", workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _live_server_pg_obj(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    url = pg_test_url("live")
    ensure_pg_database(url)
    reset_pg_schema(url)
    server = LiveServer(url, tmp_path_factory.mktemp("live-server-pg"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``start(database="sqlite"|"postgresql", env={...}, workers=1, migrated=True) -> LiveServer``
    for servers with special settings (e.g. a short session expiry); all are stopped at the end of
    the session. PostgreSQL servers get their own database ``balsam_test_<n>`` (created and
    migrated; with ``migrated=False`` empty, for the server's own migration)."""
    started: list[LiveServer] = []

    def start(database: str = "sqlite", env: "dict[str, str] | None" = None, workers: int = 1,
              migrated: bool = True) -> LiveServer:
        workdir = tmp_path_factory.mktemp(f"server-{database}")
        if database == "sqlite":
            url = f"sqlite:///{workdir / 'balsam.db'}"
        else:
            url = pg_test_url(str(len(started) + 1))
            ensure_pg_database(url)
            reset_pg_schema(url) if migrated else empty_pg_schema(url)
        server = LiveServer(url, workdir, extra_env=env, workers=workers)
        server.start()
        started.append(server)
        return server

    yield start
    # All told to stop first, then waited for: one after another, each stop's 0.3-1 s wait added up
    # to ~11 s at the end of a worker's session (charged to its last test's teardown).
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def register() -> "object":
    """``register(url, username=None, password=None) -> (username, password, user_id, token, expiry)``."""
    return register_user


@pytest.fixture
def live_server(_live_server_obj: LiveServer, request: pytest.FixtureRequest) -> str:
    """Base URL of a real uvicorn server on SQLite (shared by the whole test session)."""
    request.node._balsam_live_server = _live_server_obj
    return _live_server_obj.url


@pytest.fixture
def live_server_pg(_live_server_pg_obj: LiveServer, request: pytest.FixtureRequest) -> str:
    """Base URL of a real uvicorn server on PostgreSQL (BALSAM_TEST_DATABASE_URL)."""
    request.node._balsam_live_server_pg = _live_server_pg_obj
    return _live_server_pg_obj.url


@dataclass
class BalsamEnv:
    url: str
    username: str
    password: str
    token: str
    token_expiry: dt.datetime
    home: Path
    client_path: Path
    user_id: int

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http(self) -> httpx.Client:
        """An httpx client logged in as this user (for raw REST calls in tests)."""
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60)


def register_user(url: str, username: "str | None" = None, password: "str | None" = None) -> tuple[str, str, int, str, dt.datetime]:
    username = username or f"user-{uuid.uuid4().hex[:12]}"
    password = password or uuid.uuid4().hex
    resp = httpx.post(f"{url}/auth/password/register", json={"username": username, "password": password}, timeout=30)
    resp.raise_for_status()
    user_id = resp.json()["id"]
    resp = httpx.post(f"{url}/auth/password/login", data={"username": username, "password": password}, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    from balsam.serialization import parse_datetime

    return username, password, user_id, body["access_token"], parse_datetime(body["expiration"])


def make_balsam_env(url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> BalsamEnv:
    username, password, user_id, token, expiry = register_user(url)
    home.mkdir(parents=True, exist_ok=True)
    client_path = home / "client.yml"
    settings = {
        "api_root": url,
        "client_class": "balsam.client.RESTClient",
        "token": token,
        "token_expiry": expiry.isoformat(),
        "username": username,
        "connect_timeout": 6.2,
        "read_timeout": 120.0,
        "retry_count": 3,
    }
    fd = os.open(client_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(settings, fh, sort_keys=False)
    monkeypatch.setenv("BALSAM_HOME", str(home))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(client_path))
    return BalsamEnv(url=url, username=username, password=password, token=token, token_expiry=expiry, home=home,
                     client_path=client_path, user_id=user_id)


@pytest.fixture
def balsam_env(live_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BalsamEnv:
    """A fresh user on ``live_server``; the Python API, the CLI and child processes act as that user."""
    return make_balsam_env(live_server, tmp_path / "balsam-home", monkeypatch)


@pytest.fixture
def balsam_env_pg(live_server_pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BalsamEnv:
    """Like ``balsam_env`` but on the PostgreSQL live server."""
    return make_balsam_env(live_server_pg, tmp_path / "balsam-home", monkeypatch)


@pytest.fixture(autouse=True)
def _no_interactive_retry_cap_leak() -> Iterator[None]:
    """In-process CLI tests (CliRunner) cap the client retries for the whole process; undo that
    after each test so later tests see the retry budget of their client.yml."""
    yield
    from balsam.client.rest import cap_retries_for_interactive_use

    cap_retries_for_interactive_use(None)


@pytest.fixture(autouse=True)
def _logger_levels_restored() -> Iterator[None]:
    """Code under test sets logger levels for the whole process (the CLI's and the agent's logging
    set-up: ``balsam`` at WARNING, the root logger at the site's level); undo that after each test,
    so a later test's ``caplog.set_level(INFO)`` on the root logger still sees balsam's INFO lines
    (a full run lost two tests' INFO records to an earlier test's WARNING on ``balsam``).

    Their filters too: `balsam launcher` run in-process (CliRunner) adds its retry-notice filter to
    ``balsam.client.rest`` once per process and never removes it (a command's process ends), and
    it then swallowed the retry lines that 11 later tests in 3 files look for."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                                       if name == "balsam" or name.startswith("balsam.")]
    saved = [(logger, logger.level, logger.disabled, list(logger.filters)) for logger in loggers]
    yield
    for logger, level, disabled, filters in saved:
        logger.setLevel(level)
        logger.disabled = disabled
        if logger.filters != filters:
            logger.filters = filters
    for name in list(logging.Logger.manager.loggerDict):  # balsam loggers made during the test
        if name == "balsam" or name.startswith("balsam."):
            logger = logging.getLogger(name)
            if all(logger is not kept for kept, *_ in saved):
                logger.setLevel(logging.NOTSET)
                logger.filters = []


@pytest.fixture
def requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> dict:
    """How many requests the balsam client had in flight at once: ``["most"]`` (``["now"]``: at present),
    counted from this fixture's set-up (a test that asks for side-by-side chunks checks it)."""
    from balsam.client import RESTClient

    real = RESTClient.request_with_headers
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def counting(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            return real(self, method, path, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(RESTClient, "request_with_headers", counting)
    return state
