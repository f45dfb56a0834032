"""The Starlette application.

``create_app(database_url=None, ...)`` builds an app for one database; ``create_app_from_env()``
(``uvicorn --factory balsam.server.app:create_app_from_env``) and the lazily built module
attribute ``app`` (``uvicorn balsam.server.app:app --workers N``) read the environment
(see :mod:`balsam.server.settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any, AsyncIterator, NoReturn

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

import balsam

from .access_guard import ACCESS_LOG_REDACTION
from .acquire_notify import WakeBridge, supports_notify
from .acquire_waits import AcquireWaits
from .auth import CREDENTIAL_SWEEP_MAX_BATCHES, CredentialCache, LoginThrottle, sweep_ended_credentials
from .db import create_db_engine, write_tx
from .errors import APIError, database_refusal, refusal_answer
from .http import JSONResponse, error_response
from .routes import apps, auth, batch_jobs, events, jobs, sessions, sites, transfers
from .routing import Ctx, route
from .idempotency import sweep_expired_keys
from .job_counts import fold_deltas
from .migrate import SchemaMismatch, check_schema, upgrade_engine
from .sessions_logic import note_outage, sweep_expired
from .settings import ServerSettings

logger = logging.getLogger("balsam.server")


def _all_routes() -> list:
    from .dashboard import dashboard_routes
    from .openapi import openapi_route

    return [
        *dashboard_routes(),
        *auth.routes, *sites.routes, *apps.routes, *jobs.routes, *batch_jobs.routes, *sessions.routes,
        *transfers.routes, *events.routes, openapi_route(),
        route("/", {"GET": lambda ctx: JSONResponse({"name": "balsam", "version": balsam.__version__})}, public=True),
    ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if request.url.path.startswith("/dashboard/") and exc.status_code in (404, 405):
        from .dashboard.views import not_found_page

        return not_found_page(request, exc.status_code)
    if exc.status_code == 404:
        detail = f"Not found: no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"Method {request.method} is not allowed on {request.url.path}"
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _integrity_error(request: Request, exc: Exception) -> Response:
    """A refusal of the database no route wrapped (errors.refusals_answered): answered as that
    would answer it, one line naming the record, never the DBAPI's text (which goes to the log)."""
    assert isinstance(exc, sa.exc.IntegrityError)
    refusal = database_refusal(exc)
    text = str(getattr(exc, "orig", None) or exc).strip()
    logger.warning("Integrity error on %s %s (%s): %s", request.method, request.url.path, refusal.kind,
                   text.splitlines()[0] if text else type(exc).__name__)
    return error_response(refusal_answer(refusal))


async def _data_error(request: Request, exc: Exception) -> Response:
    # Last line of defence for values the database cannot store (validation should catch them first).
    message = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    logger.warning("Data error on %s %s: %s", request.method, request.url.path, message)
    return error_response(APIError(f"A value cannot be stored: {message}", 422))


#: Seconds a client should wait before retrying while the database is unreachable.
DB_OUTAGE_RETRY_AFTER_SEC = 5
#: SQLite OperationalErrors that are not an outage but a fault of ours (answered 500): a retry fails
#: the same way, so a 503 "retry shortly" had clients retry it until their budget ran out (a create
#: naming more parents than SQLite's 32,766 bound parameters did).
_SQLITE_PERMANENT = ("no such table", "no such column", "syntax error", "has no column", "too many sql variables",
                     "too many terms", "too many columns", "expression tree is too large", "string or blob too big",
                     "too many arguments on function", "parser stack overflow", "pattern too complex")
#: PostgreSQL SQLSTATE classes of OperationalErrors that no retry cures (answered 500): 54, program
#: limit exceeded (more than 100 arguments to a function, a statement too complex, an index row too
#: large). psycopg2 raises the whole class as OperationalError, beside the real outages (08
#: connection, 57P admin shutdown, 53 insufficient resources), which it tells apart only by code.
_PG_PERMANENT_CLASSES = ("54",)


#: Seconds a client should wait before retrying a transaction that lost a lock conflict.
TX_CONFLICT_RETRY_AFTER_SEC = 1


def _is_tx_conflict(exc: Exception) -> bool:
    """PostgreSQL rolled the transaction back for a conflict with a concurrent one (SQLSTATE class
    40: deadlock detected, serialization failure, ...): the database is up, a retry will do."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "pgcode", None) or ""
    if code.startswith("40"):
        return True
    try:
        from psycopg2.extensions import TransactionRollbackError
    except ImportError:  # pragma: no cover - SQLite-only installations
        return False
    return isinstance(orig, TransactionRollbackError)


def _is_pool_timeout(exc: Exception) -> bool:
    """No pool connection became free in time: the server is busy, the database is up."""
    return isinstance(exc, sa.exc.TimeoutError)


#: PostgreSQL's refusals of a new connection when its connection limits are reached (SQLSTATE 53300;
#: libpq gives no code for a refused connection, only the text): ``max_connections`` (and the slots
#: kept for superusers, whose text PostgreSQL 16 changed), a role's or a database's CONNECTION LIMIT;
#: and PgBouncer's at its ``max_client_conn``. In English only: a PostgreSQL whose ``lc_messages``
#: is another language words them otherwise, and they are answered as an outage (docs/server.md).
_PG_CONNECTION_LIMITS = ("too many clients", "remaining connection slots are reserved", "too many connections for",
                         "no more connections allowed")


def _is_connection_limit(exc: Exception) -> bool:
    """PostgreSQL refused a new connection of the pool for its connection limit: it is up and serving
    the connections it has, the pool's among them (busy, as a pool timeout, not an outage)."""
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    message = str(getattr(exc, "orig", None) or exc).lower()
    return any(words in message for words in _PG_CONNECTION_LIMITS)


def _is_busy(exc: Exception) -> bool:
    """The database is up and this server has more requests than connections for them."""
    return _is_pool_timeout(exc) or _is_connection_limit(exc)


#: Requests that heartbeat a session (sessions_logic.heartbeat): a tick (PUT), an acquire (POST)
#: and a release (POST .../release), matched at the end of the path (a proxy may add a prefix).
_HEARTBEAT_PATH = re.compile(r"/sessions/\d+(/release)?/?$")


def _pool_holds_no_connection(engine: Any) -> bool:
    pool = getattr(engine, "pool", None)
    try:
        return pool.checkedin() + pool.checkedout() == 0  # type: ignore[union-attr]
    except AttributeError:  # a pool that does not count its connections (or no engine)
        return False


def _refusal_silences_heartbeats(exc: Exception, request: "Request | None", engine: Any) -> bool:
    """A connection-limit refusal that kept a launcher's heartbeat from being recorded: the refused
    request heartbeats a session, or the pool holds no open connection (then no heartbeat can be
    served until PostgreSQL accepts one again: its backends were terminated, a restart or an idle
    connection cut emptied the pool, and pool_pre_ping's reconnects are refused).

    Such a refusal is an outage to the sessions' expiry clocks (note_outage): counted as busy alone,
    a live launcher's session expired after ``expire_sec`` of refused heartbeats, and its RUNNING
    jobs went to RUN_TIMEOUT and ran again while their first run went on (reproduced with
    max_connections reached and the pool's backends terminated). The cost is bounded: a clock
    restart is done at most once per session between two of its heartbeats (sessions_logic, "Clock
    restarts"), so a dead launcher's session outlives its expiry by one ``expire_sec`` at most. A
    refusal of any other request while the pool still holds connections stays busy: the pool's
    connections serve the heartbeats meanwhile."""
    if not _is_connection_limit(exc):
        return False
    if request is not None and request.method in ("PUT", "POST") and _HEARTBEAT_PATH.search(request.url.path):
        return True
    return _pool_holds_no_connection(engine)


def _is_db_outage(exc: Exception) -> bool:
    """Connection lost, server restarting or shutting down, database locked."""
    if _is_tx_conflict(exc) or _is_busy(exc):
        # psycopg2 raises conflicts as OperationalError, but neither is an outage: counting one as
        # an outage (note_outage) made the next sweep restart the expiry clock of every session of
        # every user, so dead launchers' sessions outlived their expiry (under load, for pool
        # timeouts and PostgreSQL's "too many clients": the other requests, heartbeats among them,
        # were being served meanwhile on the connections the pool has).
        return False
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.OperationalError):
        if (getattr(exc.orig, "pgcode", None) or "")[:2] in _PG_PERMANENT_CLASSES:
            return False
        message = str(exc.orig).lower()
        return not any(word in message for word in _SQLITE_PERMANENT)
    return isinstance(exc, sa.exc.InterfaceError)


async def _database_error(request: Request, exc: Exception) -> Response:
    if _is_tx_conflict(exc):
        return _tx_conflict(request, exc)
    if _is_busy(exc):
        # Busy, not down: 503 so that the client retries, and no note_outage (see _is_db_outage),
        # unless heartbeats went unrecorded for it (see _refusal_silences_heartbeats).
        if _refusal_silences_heartbeats(exc, request, request.app.state.engine):
            note_outage(request.app.state.engine)
        if _is_pool_timeout(exc):
            logger.warning("No database connection free in time on %s %s (busy): %s", request.method,
                           request.url.path, exc)
        else:
            logger.warning("The database refused a new connection on %s %s (its connection limit; busy): %s",
                           request.method, request.url.path,
                           (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0])
        return JSONResponse({"detail": "The server is busy; retry shortly"}, status_code=503,
                            headers={"Retry-After": str(DB_OUTAGE_RETRY_AFTER_SEC)})
    if not _is_db_outage(exc):
        return await _unexpected(request, exc)
    message = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
    logger.warning("Database unavailable on %s %s: %s", request.method, request.url.path, message[0] if message else exc)
    note_outage(request.app.state.engine)  # heartbeats are failing too: no session may expire for it
    # 503 + Retry-After: clients retry it (the transaction was rolled back, or, if the commit itself
    # was cut, an Idempotency-Key makes the retry safe).
    return JSONResponse(
        {"detail": "The database is unavailable; retry shortly"},
        status_code=503,
        headers={"Retry-After": str(DB_OUTAGE_RETRY_AFTER_SEC)},
    )


def _tx_conflict(request: Request, exc: Exception) -> Response:
    """A deadlock or serialization failure: the whole transaction was rolled back, nothing of the
    request applied (a request whose first transaction committed before a later one failed has an
    Idempotency-Key, as every write of our clients does: its retry is answered from the record).
    Answered 503 with a short Retry-After, which the clients retry, and no note_outage. The request
    is not run again here: the routing layer's handlers are not all safe to re-run from the start
    (an acquire that waited, a commit made before the failed statement)."""
    message = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
    logger.warning("Transaction conflict on %s %s (rolled back, client to retry): %s", request.method,
                   request.url.path, message[0] if message else exc)
    return JSONResponse(
        {"detail": "The request conflicted with a concurrent one and was rolled back; retry it"},
        status_code=503,
        headers={"Retry-After": str(TX_CONFLICT_RETRY_AFTER_SEC)},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path)
    # Starlette raises the error again once this answer is sent, and uvicorn then closes the
    # connection: said here, so a client does not send its next request on a kept-alive connection
    # that is about to be reset (that request would fail for a reason that is not its own).
    return JSONResponse({"detail": f"Internal server error ({type(exc).__name__}); see the server log"}, status_code=500,
                        headers={"Connection": "close"})


def _sweep_once(app: Starlette) -> None:
    with write_tx(app.state.engine) as conn:
        expired = sweep_expired(conn, app.state.settings.session_expire_sec)
        sweep_expired_keys(conn)
    if expired:  # their RUNNING jobs are RUN_TIMEOUT now, and their other jobs leasable again
        app.state.acquire_waits.wake_all()
        if app.state.wake_bridge is not None:
            app.state.wake_bridge.publish(None)
    with write_tx(app.state.engine) as conn:
        fold_deltas(conn)
    # Ended credentials go by the day (BALSAM_AUTH_CREDENTIAL_RETENTION_SEC): swept at most every
    # CREDENTIAL_SWEEP_EVERY_SEC, not every sweep period (without an index on their end, each sweep
    # reads the table; with the retention it holds the live credentials and a month of ended ones).
    now = time.monotonic()
    if now >= app.state.next_credential_sweep:
        app.state.next_credential_sweep = now + CREDENTIAL_SWEEP_EVERY_SEC
        sweep_ended_credentials(app.state.engine, app.state.settings.credential_retention_sec,
                                max_batches=CREDENTIAL_SWEEP_MAX_BATCHES)


#: Seconds between two sweeps of ended credentials by one server process (the first one at its first sweep).
CREDENTIAL_SWEEP_EVERY_SEC = 600


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: ServerSettings = app.state.settings
    period = max(0.5, min(settings.session_sweep_sec, settings.session_expire_sec / 2))

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await run_in_threadpool(_sweep_once, app)
            except Exception as exc:  # keep sweeping: a failed sweep (e.g. DB restart) is retried next period
                if _is_tx_conflict(exc) or _is_busy(exc):  # a concurrent transaction, or busy: no outage
                    if _refusal_silences_heartbeats(exc, None, app.state.engine):
                        note_outage(app.state.engine)  # ... unless no heartbeat can be served either
                    logger.warning("Session sweep not done (%s); retried next period",
                                   (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0])
                    continue
                if _is_db_outage(exc):  # one line per period, as each request's 503 is logged (not ~70 of traceback)
                    logger.warning("Session sweep not done: the database is unavailable (%s); retried next period",
                                   (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0])
                else:
                    logger.exception("Session sweep failed")
                note_outage(app.state.engine)

    task = asyncio.create_task(sweeper())
    bridge: "WakeBridge | None" = app.state.wake_bridge
    if bridge is not None:
        bridge.start()
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if bridge is not None:
            await run_in_threadpool(bridge.stop)
        app.state.engine.dispose()


def create_app(database_url: "str | None" = None, *, settings: "ServerSettings | None" = None,
               create_tables_now: "bool | None" = None, **overrides: Any) -> Starlette:
    settings = settings or ServerSettings.from_env(database_url)
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown server setting {key!r}")
        setattr(settings, key, value)
    engine = create_db_engine(settings.database_url, pool_size=settings.pool_size, max_overflow=settings.max_overflow)
    try:
        if settings.create_tables if create_tables_now is None else create_tables_now:
            upgrade_engine(engine)
        else:
            # A shared server's schema is migrated by its administrator (`balsam server migrate`): on
            # an older one it would start and answer 500 wherever a newer column is read; refuse.
            check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    app = Starlette(
        routes=_all_routes(),
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            sa.exc.IntegrityError: _integrity_error,
            sa.exc.DataError: _data_error,
            sa.exc.OperationalError: _database_error,
            sa.exc.InterfaceError: _database_error,
            sa.exc.TimeoutError: _database_error,
            sa.exc.DBAPIError: _database_error,
            OverflowError: _data_error,
            Exception: _unexpected,
        },
        lifespan=_lifespan,
    )
    # uvicorn's access log (configured before the app is built) leaves out the secret of the
    # dashboard's one-time login links, whoever runs uvicorn; one filter however many apps.
    logging.getLogger("uvicorn.access").addFilter(ACCESS_LOG_REDACTION)
    app.state.settings = settings
    app.state.engine = engine
    app.state.credential_cache = CredentialCache(settings.revocation_cache_sec)
    app.state.next_credential_sweep = 0.0  # the first background sweep deletes ended credentials
    app.state.acquire_waits = AcquireWaits()
    # Several server processes on one PostgreSQL database wake each other's waiting acquires.
    app.state.wake_bridge = WakeBridge(engine, app.state.acquire_waits) if supports_notify(engine) else None
    app.state.login_throttle = LoginThrottle(settings.max_failures_per_user, settings.max_failures_per_address,
                                             settings.failure_window_sec)
    return app


#: uvicorn's exit status for an app that cannot start (uvicorn.config.STARTUP_FAILURE).
STARTUP_FAILURE = 3


def _refuse_to_start(exc: BaseException) -> "NoReturn":
    # One line, no traceback. Exit status 3 is uvicorn's STARTUP_FAILURE: with --workers N its
    # supervisor then stops instead of restarting workers that would fail the same way.
    print(f"balsam server: {exc}", file=sys.stderr, flush=True)
    sys.exit(STARTUP_FAILURE)


#: The exit status of a server that gave up waiting for an unreachable database: not uvicorn's
#: STARTUP_FAILURE, so that a --workers supervisor starts the worker again (and again) until the
#: database is back, as it would for a worker that died of anything else.
DATABASE_UNREACHABLE = 4
#: How long a starting server waits for an unreachable database (seconds), and its longest pause.
DATABASE_WAIT_SEC = 60.0
DATABASE_WAIT_MAX_PAUSE_SEC = 30.0
#: What a database says of a fault that no waiting mends (a wrong password, user or database
#: name, missing rights, a file that is no database): refused at once, exit status 3.
_PERMANENT_DATABASE_PROBLEMS = re.compile(
    r"authentication failed|no pg_hba\.conf entry|no password supplied|(role|database) \"[^\"]*\" does not exist"
    r"|permission denied|read-only|readonly|file is not a database|unable to open database file"
    r"|database disk image is malformed|must be owner", re.IGNORECASE)
#: SQLSTATE classes of a PostgreSQL that is there but cannot serve now: connection exception,
#: insufficient resources (too many clients), operator intervention (shutting down, starting up),
#: transaction rollback.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
#: libpq's words, while connecting (no SQLSTATE), for a PostgreSQL that is down, restarting, failing
#: over, out of connection slots or closed to connections for now, or a network that is: worth
#: waiting for. Any other connect failure (SSL required or a root certificate missing, an unknown
#: server option, a host name that does not exist) is a configuration that no waiting mends.
_TRANSIENT_CONNECT_PROBLEMS = re.compile(
    r"connection refused|timeout expired|timed out|connection reset|closed the connection unexpectedly"
    r"|connection has been closed unexpectedly|terminating connection"
    r"|could not (receive|send) data (from|to) server"
    r"|the database system is (starting up|shutting down|in recovery mode|not yet accepting connections"
    r"|not accepting connections)|is not currently accepting connections"
    r"|too many (clients|connections)|remaining connection slots|no more connections allowed"
    r"|no route to host|network is unreachable|temporary failure in name resolution"
    # A local server reached by its Unix socket, stopped or restarting: the socket file is gone
    # (anchored to the socket: a missing sslcert file says "no such file" too, and stays permanent).
    r'|socket "[^"]*" failed: no such file or directory|connections on unix domain socket', re.IGNORECASE)


def _database_problem(exc: BaseException) -> str:
    """``permanent``, ``transient`` (PostgreSQL down, restarting, failing over, out of connection
    slots: worth waiting for), or ``fault`` (an SQL error of ours, a failing migration)."""
    if isinstance(exc, OSError):  # SQLite: the file's directory cannot be made
        return "permanent"
    if _PERMANENT_DATABASE_PROBLEMS.search(str(exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc)):
        return "permanent"
    if isinstance(exc, sa.exc.OperationalError) and "sqlite" in type(exc.orig).__module__ \
            and "locked" in str(exc.orig):
        return "transient"  # another process writes (a migration, a long transaction) for longer than our busy timeout
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or "sqlite" in type(exc.orig).__module__:
        return "fault"
    code = getattr(exc.orig, "pgcode", None)
    if exc.connection_invalidated or (code and code[:2] in _TRANSIENT_SQLSTATE_CLASSES):
        return "transient"
    if not code:
        # libpq's errors while connecting carry no SQLSTATE: only the known words of an outage are
        # waited for. All of them were: a misconfiguration waited 60 s, exited 4, and a --workers
        # supervisor started the worker again for ever.
        return "transient" if _TRANSIENT_CONNECT_PROBLEMS.search(str(exc.orig)) else "permanent"
    return "fault"


class _Stopped(BaseException):
    """A SIGTERM or SIGINT came while a starting server waited for its database."""


class _HeedStopWhileWaiting:
    """While a starting server waits for its database, SIGTERM and SIGINT end the wait at once
    (:meth:`sleep` raises :class:`_Stopped`). uvicorn's own handlers (the factory runs under them)
    only note a signal for after the start: a stop or a Ctrl-C of a server whose database was down
    went unheeded until the wait ended (up to 60 s). The handlers are set before the first try; on
    exit the ones before are back and get the signals received, so that uvicorn still does what it does with them (ends the process by SIGTERM, takes
    a Ctrl-C as its own). A signal during a try (not a wait) is only noted: raised there, it would
    end SQLAlchemy's or a migration's work half done. Only in the main thread, where uvicorn calls
    the factory (a --workers worker too): no other thread may set handlers."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._asleep = False
        self._previous: dict[int, Any] = {}
        self._installed = False

    def _note(self, signum: int, _frame: "FrameType | None") -> None:
        self.received.append(signum)
        if self._asleep:
            self._asleep = False  # once: a second signal while the stop is reported is only noted
            raise _Stopped

    def listen(self) -> None:
        """Sets the handlers (once): before the wait is announced, so that a stop sent on seeing it is heeded."""
        if not self._installed and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # a signal ignored (nohup, `&`) stays so
                    self._previous[sig] = signal.signal(sig, self._note)
        self._installed = True

    def sleep(self, seconds: float) -> None:
        self.listen()
        if self.received:  # came during the try just failed
            raise _Stopped
        self._asleep = True
        try:
            time.sleep(seconds)
        finally:
            self._asleep = False

    def __enter__(self) -> "_HeedStopWhileWaiting":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._asleep = False
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in self.received:
            signal.raise_signal(signum)


def create_app_from_env() -> Starlette:
    try:
        # The settings are read here, apart: their ValueErrors (a BALSAM_AUTH_SECRET_KEY shorter
        # than 32 bytes, an environment number or choice that is not one) say what to fix; one
        # raised while the app is built is not the configuration's and keeps its traceback.
        settings = ServerSettings.from_env()
    except ValueError as exc:
        _refuse_to_start(exc)
    database = _masked_url(settings.database_url)
    with _HeedStopWhileWaiting() as heed:
        try:
            return _create_app_waiting(settings, database, heed)
        except _Stopped:
            print(f"balsam server: stopped ({signal.Signals(heed.received[0]).name}) while waiting for the "
                  f"database {database}", file=sys.stderr, flush=True)
            sys.exit(128 + heed.received[0])


def _create_app_waiting(settings: ServerSettings, database: str, heed: _HeedStopWhileWaiting) -> Starlette:
    """create_app_from_env's tries, and its waits between them (``heed``) for a database out of reach."""
    deadline = time.monotonic() + DATABASE_WAIT_SEC
    pause = 1.0
    # Before the first try: a stop during it is noted by us, not only by uvicorn (whose note would
    # be read after the start: the waits after a failed first try went on unheeded). A start that
    # succeeds gives the signal back to uvicorn's handler on exit.
    heed.listen()
    while True:
        try:
            return create_app(settings=settings)
        except SchemaMismatch as exc:
            _refuse_to_start(exc)
        except (sa.exc.DBAPIError, OSError) as exc:
            problem = _database_problem(exc)
            if problem == "permanent":
                # One line and uvicorn's startup failure: a --workers supervisor stops rather than
                # starting workers again and again that would fail the same way.
                _refuse_to_start(f"cannot use the database {database}: {_first_line(exc)}")
            if problem == "fault":
                # A failing embedded migration or an SQL error of ours: its traceback is the evidence.
                traceback.print_exc(file=sys.stderr)
                _refuse_to_start(f"cannot use the database {database}: {_first_line(exc)}")
            # PostgreSQL restarting, failing over or out of connection slots: a worker that starts
            # meanwhile (one restarted after an OOM kill or a crash) waits for it, as the running
            # workers do (they answer 503 with Retry-After). Exit status 3 here made uvicorn's
            # supervisor stop the whole service for good during a brief outage.
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"balsam server: cannot reach the database {database} for {DATABASE_WAIT_SEC:g} s: "
                      f"{_first_line(exc)}", file=sys.stderr, flush=True)
                sys.exit(DATABASE_UNREACHABLE)
            wait = min(pause, left)
            heed.listen()
            logger.warning("balsam server: cannot reach the database %s (%s); trying again in %g s",
                           database, _first_line(exc), round(wait, 1))
            heed.sleep(wait)
            pause = min(pause * 2, DATABASE_WAIT_MAX_PAUSE_SEC)


def _masked_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:  # not a URL: shown as given (it holds no password SQLAlchemy could find)
        return url


def _first_line(exc: BaseException) -> str:
    """The database's own words (the DBAPI error's first line, not SQLAlchemy's wrapping of it)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        text = str(exc.orig)
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def __getattr__(name: str) -> Any:
    if name == "app":
        global app
        app = create_app_from_env()
        return app
    raise AttributeError(name)


__all__ = ["create_app", "create_app_from_env", "Ctx"]
