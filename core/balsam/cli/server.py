"""``balsam server start|stop|status|login|set-password|user|credentials|revoke|set-start-time|migrate``.

``start`` runs the embedded server in the background with SQLite under ``$BALSAM_HOME/server``
(nothing to install or configure). Clients reach it through a Unix socket in a private directory
(``server/run/balsam.sock``, see :mod:`balsam.server.embedded`), so they never hand a token to
another process posing as the server; a TCP port on 127.0.0.1 serves browsers and 0.7 clients.
Registration is closed and only the local user is served; ``start`` stores a login with a
refresh credential in the client file. Shared deployments point ``BALSAM_DATABASE_URL`` at
PostgreSQL, run ``migrate`` once, and manage accounts with ``user`` / ``credentials`` / ``revoke``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click

from balsam.netnames import url_host

from . import BATCH_JOB_ID
from ._site_selector import escape_cell

DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"


def _server_dir() -> Path:
    from balsam.server.settings import server_dir

    return server_dir()


def _paths() -> dict[str, Path]:
    from balsam.server.embedded import socket_path_for

    base = _server_dir()
    return {"dir": base, "pid": base / "server.pid", "log": base / "server.log", "out": base / "server.out",
            "info": base / "server.json", "lock": base / "server.lock",
            "db": base / "balsam.db", "socket": socket_path_for(base)}


def _database_url() -> str:
    from balsam.server.settings import default_database_url

    return os.environ.get("BALSAM_DATABASE_URL") or default_database_url()


def _safe_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _admin_database_url(announce: bool = True) -> str:
    """``$BALSAM_DATABASE_URL``, else the running embedded server's database, else the embedded one.

    An explicit URL wins: server.json outlived stopped servers, and the admin commands acted on the
    embedded SQLite instead of the shared database named. With ``announce``, says which (stderr)."""
    url = os.environ.get("BALSAM_DATABASE_URL") or (
        _info().get("database_url") if _running_pid() is not None else None) or _database_url()
    if announce:
        click.echo(f"Database: {_safe_url(url)}", err=True)
    return url


def _client_path() -> Path:
    from balsam.client.settings import client_path

    return client_path()


#: The embedded server's module (``python -m ...``), what its command line names.
EMBEDDED_MODULE = "balsam.server.embedded"


def _running_pid() -> Optional[int]:
    """The pid in server.pid if that process runs (not a zombie) and is the embedded server started
    then: its command line names the embedded module and it is the process server.json dates,
    :func:`balsam.util.same_process` with the start time recorded there (``create_time``). A pid
    reused by another process (even ``uvicorn balsam.server.app:app``, or another embedded server)
    is not ours to stop.

    A server.json written before start times were recorded (an older balsam) has ``started``, when
    ``start`` wrote it, just after the server started: the process must have started by then, not
    later (a pid given again after a reboot). Without either for this pid (server.json missing,
    unreadable, or naming another pid: a ``start`` killed between writing it and server.pid) the
    process cannot be told apart from one that got the pid since: None."""
    import psutil

    from balsam.util import START_TIME_TOLERANCE_SEC, process_start_time, same_process

    try:
        pid = int(_paths()["pid"].read_text().strip())
    except (OSError, ValueError):
        return None
    info = _info()
    if info.get("pid") != pid:
        return None
    recorded = info.get("create_time")
    if not isinstance(recorded, (int, float)):
        try:
            written = dt.datetime.fromisoformat(info["started"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return None
        recorded = process_start_time(pid, running=True)
        if recorded is None or recorded > written + START_TIME_TOLERANCE_SEC:
            return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    if EMBEDDED_MODULE not in cmdline:
        return None
    # Last: the process whose command line was read is still the one dated (not a later one).
    return pid if same_process(pid, recorded) else None


def _undated_server() -> Optional[tuple[int, str]]:
    """``(pid, why)`` when :func:`_running_pid` says None only for want of a date: server.pid names a
    running embedded server (its command line names the module) that server.json cannot date
    (missing, unreadable, naming another pid, or with no start time): a ``start`` killed between
    writing the two files, or files edited by hand. Such a process may well be the server started
    here, or one that got the pid since: ``stop`` and ``status`` say so and leave it running (and
    server.pid in place) rather than signal it, or forget it while it runs. None otherwise."""
    import psutil

    paths = _paths()
    try:
        pid = int(paths["pid"].read_text().strip())
    except (OSError, ValueError):
        return None
    info = _info()
    if not paths["info"].exists():
        why = "server.json is missing"
    elif not info:
        why = "server.json cannot be read"
    elif info.get("pid") != pid:
        why = f"server.json names pid {info.get('pid')}"
    elif not isinstance(info.get("create_time"), (int, float)) and not isinstance(info.get("started"), str):
        why = "server.json records no start time"
    else:
        return None  # dated: another process than the one server.json dates is not ours
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or EMBEDDED_MODULE not in proc.cmdline():
            return None
    except psutil.Error:
        return None
    return pid, why


def _undated_message(pid: int, why: str) -> str:
    return (f"server.pid names pid {pid}, a running embedded Balsam server, but {why}: it cannot be told from "
            f"a process that got the pid since, so it is left running. Check it (ps -o pid,lstart,args -p {pid}), "
            f"then stop it with `balsam server stop --force` (or kill {pid})")


def _info() -> dict[str, Any]:
    try:
        return json.loads(_paths()["info"].read_text())
    except (OSError, ValueError):
        return {}


def _file_sizes() -> dict[str, int]:
    """Sizes of server.log and server.out now: where this run's lines will begin."""
    sizes = {}
    for key in ("log", "out"):
        try:
            sizes[key] = _paths()[key].stat().st_size
        except OSError:
            sizes[key] = 0
    return sizes


def _run_lines(key: str, since: dict[str, int]) -> list[str]:
    """This run's lines of server.log or server.out (those past the sizes at start; all of a file
    rotated meanwhile)."""
    try:
        with open(_paths()[key], "rb") as f:
            data = f.read()
    except OSError:
        return []
    start = since.get(key, 0)
    return data[start if len(data) >= start else 0:].decode(errors="replace").splitlines()


def _start_failure(since: dict[str, int]) -> Optional[str]:
    """The one-line reason the server gave for not starting this time (see embedded.start_error)."""
    from balsam.server.embedded import START_ERROR_PREFIX

    reasons = [line[len(START_ERROR_PREFIX):] for line in _run_lines("out", since) if line.startswith(START_ERROR_PREFIX)]
    return reasons[-1] if reasons else None


def _log_tail(since: dict[str, int], lines: int = 25) -> str:
    """The last lines this run wrote to the server's log, then to its stdout/stderr (where a crash
    at start lands); earlier runs' lines only confused the reader."""
    parts = []
    for key in ("log", "out"):
        text = [line for line in _run_lines(key, since) if line.strip() and not line.startswith("--- balsam server start")]
        if text:
            parts.append(f"[{_paths()[key].name}]\n" + "\n".join(text[-lines:]))
    return "\n".join(parts) or "(nothing in the server's log)"


def _answers(api_root: str) -> bool:
    """True if a Balsam server answers at this address (``unix://`` socket or http URL), reached
    the way the client reaches it (:mod:`balsam.client.transport`)."""
    from balsam.client.local_http import LocalHTTPPool, LocalTransportError
    from balsam.client.transport import TransportRefused, local_pool_args

    try:
        local = local_pool_args(api_root)
    except TransportRefused:  # no socket directory (nothing started), or one the client refuses
        return False
    if local is not None:
        pool = LocalHTTPPool(**local, connect_timeout=2, read_timeout=2)
        try:
            return pool.request("GET", "/auth/how").status_code == 200
        except LocalTransportError:
            return False
        finally:
            pool.close()
    import httpx  # a server on another host (``--host`` other than loopback)

    try:
        return httpx.get(f"{api_root}/auth/how", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stored_login() -> Any:
    from balsam.client import ClientSettings

    try:
        return ClientSettings.load(_client_path())
    except Exception:  # noqa: BLE001 - no or unreadable login
        return None


def _issue_local_login(api_root: str, database_url: str, *, force: bool, replaceable: "set[str] | None" = None) -> str:
    """Store a login (refresh credential + access token) for the local user, unless the client
    file holds a login for another server (then explain), or already one for this server that the
    server still accepts."""
    from balsam.client import ClientSettings
    from balsam.server.admin import Admin
    from balsam.server.settings import ServerSettings

    path = _client_path()
    stored = _stored_login()
    replaced = ""
    if stored is not None and not force:
        other = stored.api_root.rstrip("/")
        if other == api_root and stored.refresh_token:
            # An expired, revoked or unknown one is as good as none: kept, it made every command
            # answer "HTTP 401 ... log in again", and `balsam login` refuses the local server.
            problem = _refresh_problem(database_url, stored.refresh_token)
            if problem is None:
                return f"Login for {api_root} already stored in {path}"
            replaced = f" (replaces the stored login: {problem})"
        if other != api_root and other not in {u.rstrip("/") for u in (replaceable or set()) if u}:
            return (f"Kept the existing login for {other} in {path}. To use the local server instead run "
                    f"`balsam server login`.")
    username = getpass.getuser()
    settings = ServerSettings.from_env(database_url)
    with Admin(database_url) as admin:
        if stored is not None and stored.refresh_token and stored.api_root.rstrip("/") == api_root:
            try:  # the login being replaced: its refresh credential is of no use any more
                admin.revoke(ids=[int(stored.refresh_token.split(".")[1])])
            except (ValueError, IndexError, RuntimeError):
                pass
        login = admin.local_login(username, settings.refresh_ttl_sec, settings.access_ttl_sec, settings.secret_key,
                                  f"balsam server start on {socket.gethostname()}")
    new = ClientSettings(
        api_root=api_root, token=login["access_token"], token_expiry=login["expiration"], username=username,
        refresh_token=login["refresh_token"], refresh_expiry=login["refresh_expiration"],
        connect_timeout=stored.connect_timeout if stored else 6.2,
        read_timeout=stored.read_timeout if stored else 120.0,
        retry_count=stored.retry_count if stored else 10,
    )
    new.save(path)
    return (f"Logged in as {username} at {api_root} (refresh credential {login['credential_id']}; stored in {path})"
            + replaced)


def _refresh_problem(database_url: str, refresh_token: str) -> Optional[str]:
    """Why the server would refuse this refresh credential (expired, revoked, unknown), or None."""
    from balsam.server.auth import redeem_code
    from balsam.server.db import create_db_engine, read_tx
    from balsam.server.errors import Unauthorized

    engine = create_db_engine(database_url)
    try:
        with read_tx(engine) as conn:
            redeem_code(conn, refresh_token, "refresh")
    except Unauthorized as exc:
        text = str(exc.detail).partition(":")[0]  # "This refresh credential expired"
        return text[:1].lower() + text[1:]
    finally:
        engine.dispose()
    return None


@click.group("server")
def server_group() -> None:
    """Run the Balsam REST service (embedded SQLite by default) and administer its users."""


@server_group.command("start")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address of the TCP listener (browsers, 0.7 clients).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="TCP port; 0: the Unix socket only.")
@click.option("--timeout", default=60.0, show_default=True, type=float, help="Seconds to wait for the server.")
def start(host: str, port: int, timeout: float) -> None:
    """Start the server in the background and log in the local user."""
    from balsam.client.transport import UNIX_SCHEME
    from balsam.server.embedded import START_ERROR_PREFIX, lock_server_dir, make_private_dir

    paths = _paths()
    database_url = _database_url()
    api_root = f"{UNIX_SCHEME}{paths['socket']}"
    # balsam.db (password and credential hashes), server.json/.pid and the logs are the user's only,
    # whatever the umask; the server process inherits it.
    os.umask(0o077)
    # mkdir's mode applies to the last component only: $BALSAM_HOME (client.yml, the local scheduler's
    # and the demo site's files) would get the umask's 0755.
    paths["dir"].parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # mkdir leaves an existing directory's mode alone: a server/ made 0755 beforehand is tightened
        make_private_dir(paths["dir"])
    except SystemExit as exc:
        raise click.ClickException(str(exc.code).removeprefix(START_ERROR_PREFIX)) from None
    lock_fd = lock_server_dir(paths["lock"])
    if lock_fd is None:  # a server runs (it holds the lock for its life), or another start is under way
        running = _running_pid()
        info = _info()
        root = info.get("api_root", api_root)
        if running is None or not _answers(root):
            raise click.ClickException(
                f"another `balsam server start` is in progress for {paths['dir']} "
                + (f"(its server, pid {running}, does not answer at {root} yet)" if running is not None else
                   f"(or a server runs whose server.pid is gone: {paths['lock']} is held)")
                + ": wait for it, then run `balsam server status`")
        _report_running(running, info, api_root, database_url)
        return
    try:
        running = _running_pid()  # one started by an earlier balsam, which took no lock
        if running is not None:
            _report_running(running, _info(), api_root, database_url)
            return
        _start_locked(paths, host, port, timeout, database_url, api_root, lock_fd)
    finally:
        os.close(lock_fd)  # the server holds the lock through the descriptor it inherited


def _report_running(pid: int, info: dict[str, Any], api_root: str, database_url: str) -> None:
    click.echo(f"Balsam server already running (pid {pid}) at {info.get('api_root', api_root)}"
               + (f" and {info['url']}" if info.get("url") else ""))
    click.echo(_issue_local_login(info.get("api_root", api_root), info.get("database_url", database_url), force=False))


def _start_locked(paths: dict[str, Path], host: str, port: int, timeout: float, database_url: str, api_root: str,
                  lock_fd: int) -> None:
    """``start`` under the server directory's lock (no server runs)."""
    import sqlalchemy as sa
    from alembic.util import CommandError

    from balsam.util import process_start_time

    previous = _info().get("api_root")
    tcp_url = None
    if port:
        # A wildcard address is reached on its family's loopback; an IPv6 literal is bracketed
        # (http://::1:8765 is no URL: httpx.InvalidURL escaped as a traceback).
        connect_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        tcp_url = f"http://{url_host(connect_host)}:{port}"
        if _answers(tcp_url):
            raise click.ClickException(f"something else already answers at {tcp_url}; choose another --port (or --port 0)")

    # Create/upgrade the schema before the server starts, so migration errors show here.
    from balsam.server.db import create_db_engine
    from balsam.server.migrate import upgrade_engine
    from balsam.server.settings import ServerSettings

    try:
        # Creates the signing key (0600) on first start, beside an SQLite database: in its directory.
        ServerSettings.from_env(database_url)
        engine = create_db_engine(database_url)
        try:
            upgrade_engine(engine)
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, CommandError, OSError) as exc:
        raise click.ClickException(_database_problem(database_url, exc)) from None

    env = dict(os.environ, BALSAM_DATABASE_URL=database_url, BALSAM_SERVER_CREATE_TABLES="0",
               BALSAM_AUTH_REGISTRATION="closed", BALSAM_AUTH_ONLY_USER=getpass.getuser())
    # The server logs to server.log itself (rotated, lines capped); its stdout/stderr (a crash before
    # logging starts, warnings) go to server.out.
    cmd = [sys.executable, "-m", EMBEDDED_MODULE, "--socket", str(paths["socket"]), "--host", host,
           "--port", str(port), "--log-level", "info", "--log-file", str(paths["log"]), "--lock-fd", str(lock_fd)]
    since = _file_sizes()
    with open(paths["out"], "ab") as out:
        out.write(f"\n--- balsam server start {dt.datetime.now().isoformat()} ---\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=paths["dir"], pass_fds=(lock_fd,))
    create_time = process_start_time(proc.pid)  # None: exited already (reported below)
    # server.json before server.pid: whoever finds the pid finds the start time to check it with.
    paths["info"].write_text(json.dumps({"pid": proc.pid, "api_root": api_root, "url": tcp_url,
                                         "database_url": database_url, "create_time": create_time,
                                         "started": dt.datetime.now(dt.timezone.utc).isoformat()}))
    paths["pid"].write_text(f"{proc.pid}\n")
    try:
        click.echo(f"Starting Balsam server at {api_root}" + (f" and {tcp_url}" if tcp_url else "")
                   + f" (pid {proc.pid}, log {paths['log']}) ", nl=False)
        _wait_until_up(proc, paths, since, api_root, timeout)
    except KeyboardInterrupt:
        # The server runs in its own session (Ctrl-C does not reach it) and goes on starting: say
        # so, with what to do (it was left without a word, and without the local login).
        from . import Interrupted

        raise Interrupted(f"Interrupted: the server (pid {proc.pid}) goes on starting in the background; "
                          "`balsam server status` shows whether it answers, `balsam server start` then logs you in, "
                          "`balsam server stop` stops it.") from None
    click.echo(" ready")
    # Logins for this server's earlier addresses (another socket, or its TCP url before sockets) are replaced.
    replaceable = ({previous} if previous else set()) | _local_tcp_roots()
    click.echo(_issue_local_login(api_root, database_url, force=False, replaceable=replaceable))


def _wait_until_up(proc: Any, paths: dict[str, Path], since: dict[str, int], api_root: str, timeout: float) -> None:
    """Wait (a dot per half second) until the server started as ``proc`` answers at ``api_root``;
    a ClickException if it exits or does not answer within ``timeout`` seconds (then stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            paths["pid"].unlink(missing_ok=True)
            paths["info"].unlink(missing_ok=True)
            click.echo("")
            reason = _start_failure(since)
            if reason:
                raise click.ClickException(f"{reason} (the server exited)")
            raise click.ClickException(f"the server exited with code {proc.returncode}. This start's lines of "
                                       f"{paths['log'].name} and {paths['out'].name} in {paths['dir']}:\n{_log_tail(since)}")
        if _answers(api_root):
            break
        if time.monotonic() > deadline:
            proc.terminate()
            paths["pid"].unlink(missing_ok=True)
            paths["info"].unlink(missing_ok=True)
            click.echo("")
            raise click.ClickException(f"the server did not answer within {timeout:.0f}s. This start's lines of "
                                       f"{paths['log'].name} and {paths['out'].name} in {paths['dir']}:\n{_log_tail(since)}")
        click.echo(".", nl=False)
        time.sleep(0.5)


#: SQLite's words for what stops an upgrade, as the user would say them.
SQLITE_CAUSES = {
    "database or disk is full": "the disk is full",
    "unable to open database file": "cannot open it (is it a directory, or its directory not writable?)",
    "attempt to write a readonly database": "it is read-only (no permission to write it or its directory)",
    "file is not a database": "it is not an SQLite database",
}


def _database_problem(url: str, exc: BaseException, verb: str = "upgrade") -> str:
    """One line: which database (its file for SQLite, the URL without password otherwise) and why
    it could not be brought to this balsam's schema."""
    import sqlalchemy as sa
    from alembic.util import CommandError

    from balsam.server.migrate import head_revision, unknown_revision_problem

    parsed = sa.engine.make_url(url)
    where = parsed.database if parsed.get_backend_name() == "sqlite" and parsed.database else _safe_url(url)
    if isinstance(exc, CommandError):
        unknown = _unknown_revision(url)
        if unknown is not None:
            return f"cannot {verb} {where}: it is {unknown_revision_problem(unknown, head_revision())}"
        cause = str(exc)
    elif isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        cause = str(exc.orig)
    elif isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        cause = f"{exc.filename} is not a directory"  # in the database's path (mkdir's EEXIST)
    elif isinstance(exc, OSError):
        cause = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    else:
        cause = str(exc)
    cause = (cause.strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot {verb} {where}: {SQLITE_CAUSES.get(cause.lower(), cause)}"


def _unknown_revision(url: str) -> Optional[str]:
    """The schema revision stored in the database if this balsam has no migration of that name."""
    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    from balsam.server.db import create_db_engine
    from balsam.server.migrate import alembic_config, current_revision

    engine = create_db_engine(url)
    try:
        stored = current_revision(engine)
    except sa.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()}
    return stored if stored and stored not in known else None


def _local_tcp_roots() -> "set[str]":
    """Addresses of this machine's embedded server in client files written before it used a socket."""
    stored = _stored_login()
    if stored is None or not stored.api_root.startswith("http://"):
        return set()
    from urllib.parse import urlparse

    from balsam.client.transport import is_loopback_host

    host = urlparse(stored.api_root).hostname or ""
    return {stored.api_root.rstrip("/")} if is_loopback_host(host) and not stored.refresh_token else set()


@server_group.command("login")
def login_local() -> None:
    """Store a fresh login for the local user on the running local server (revokes the old one)."""
    if _running_pid() is None:
        raise click.ClickException("no local Balsam server is running; start it with `balsam server start`")
    info = _info()
    click.echo(_issue_local_login(info["api_root"], info.get("database_url", _database_url()), force=True))


def _read_new_password(password_stdin: bool) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise click.UsageError("--password-stdin: no password on standard input")
        return line.rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _min_password_length() -> int:
    from balsam.server.settings import ServerSettings

    return ServerSettings.from_env(_admin_database_url(announce=False), secret_key="unused").min_password_length


@server_group.command("set-password")
@click.option("--username", default=None, help="Default: the local user ($USER).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--end-sessions", is_flag=True,
              help="Also revoke the user's logins and refresh credentials (a leaked password): everything "
                   "logged in with the old one, their site agents included, must log in again.")
def set_password(username: Optional[str], password_stdin: bool, end_sessions: bool) -> None:
    """Set a password so that USERNAME can also log in with `balsam login` (e.g. from another machine)."""
    from balsam.server.admin import Admin, AdminError

    username = username or getpass.getuser()
    password = _read_new_password(password_stdin)
    with Admin(_admin_database_url()) as admin:
        try:
            revoked = admin.set_password(username, password, _min_password_length(), end_sessions=end_sessions)
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"Password set for {username}; {revoked.get('dashboard', 0)} dashboard session(s) ended")
    if end_sessions:
        click.echo(f"Revoked {revoked.get('login', 0)} login(s) and {revoked.get('refresh', 0)} refresh credential(s): "
                   f"{username} logs in again (balsam login; the embedded server's own user: balsam server login). "
                   f"{revoked.get('launcher_kept', 0)} launcher credential(s) of BatchJobs kept "
                   f"(balsam server revoke --user {username} --kind launcher ends them).")
    else:
        click.echo("Existing logins stay valid. If the old password leaked, run this again with --end-sessions "
                   f"(or balsam server revoke --user {username} --kind login / --kind refresh).")


@server_group.group("user")
def user_group() -> None:
    """Accounts of a shared server (registration is closed unless BALSAM_AUTH_REGISTRATION says otherwise)."""


@user_group.command("add")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--no-password", is_flag=True, help="Create the user without a password (invite them later).")
def user_add(username: str, password_stdin: bool, no_password: bool) -> None:
    """Create USERNAME with a password (prompted twice unless --password-stdin)."""
    from balsam.server.admin import Admin, AdminError

    password = None if no_password else _read_new_password(password_stdin)
    with Admin(_admin_database_url()) as admin:
        try:
            user_id = admin.add_user(username, password, _min_password_length())
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"Created user {username} (id {user_id})")


@user_group.command("invite")
@click.argument("username")
@click.option("--valid-hours", default=72.0, show_default=True, type=float, help="How long the invitation works.")
def user_invite(username: str, valid_hours: float) -> None:
    """Create USERNAME without a password and print a one-time invitation code to set it with."""
    from balsam.server.admin import Admin, AdminError

    with Admin(_admin_database_url()) as admin:
        try:
            code, expires = admin.invite(username, int(valid_hours * 3600))
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None
    # The code goes to the user apart from the command: on a command line (--invitation) every user
    # of the machine could read it while the command waits for a password, and register first.
    click.echo(f"Invitation for {username} (valid until {expires:%Y-%m-%d %H:%M} UTC); give them this code privately:")
    click.echo(f"  {code}")
    click.echo("They run the command below and paste the code at its hidden 'Invitation code' prompt "
               "(scripts: --invitation-stdin or $BALSAM_INVITATION, never --invitation):")
    click.echo(f"  balsam register -a <server address> -u {username}")


@user_group.command("ls")
def user_ls() -> None:
    """List the users."""
    from balsam.server.admin import Admin

    with Admin(_admin_database_url()) as admin:
        rows = admin.users()
    click.echo(f"{'ID':>5}  {'USERNAME':<30} {'PASSWORD':<8}  JOINED")
    for row in rows:
        click.echo(f"{row.id:>5}  {row.username:<30} {'yes' if row.has_password else 'no':<8}  {row.date_joined:%Y-%m-%d}")


def _format_credential(row: Any) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    status = "revoked" if row.revoked else ("expired" if row.expires <= now else "active")
    scope = f"site {row.site_id}" if row.site_id else "all sites"
    if row.batch_job_id:
        scope += f", BatchJob {row.batch_job_id}"
    return (f"{row.id:>5}  {row.username:<16} {row.kind:<10} {status:<8} {row.expires:%Y-%m-%d %H:%M}  "
            f"{scope:<24} {escape_cell(row.label or '')}")  # labels stored before 0.8's escaping


@server_group.command("credentials")
@click.option("--user", "username", default=None, help="Only this user's.")
@click.option("--all", "show_all", is_flag=True, help="Include revoked and expired ones.")
def credentials_ls(username: Optional[str], show_all: bool) -> None:
    """List credentials (logins, refresh credentials, launcher credentials, invitations)."""
    from balsam.server.admin import Admin

    with Admin(_admin_database_url()) as admin:
        rows = list(admin.credentials(username, active_only=not show_all))
    click.echo(f"{'ID':>5}  {'USER':<16} {'KIND':<10} {'STATUS':<8} {'EXPIRES (UTC)':<16}  {'SCOPE':<24} LABEL")
    for row in rows:
        click.echo(_format_credential(row))


@server_group.command("revoke")
@click.option("--user", "username", default=None, help="Revoke this user's credentials (all, or of --kind).")
@click.option("--id", "ids", multiple=True, type=int, help="Credential id (repeat for several).")
@click.option("--kind", "kinds", multiple=True,
              # balsam.server.auth.CREDENTIAL_KINDS (not imported: the server's modules load on use).
              type=click.Choice(["login", "refresh", "launcher", "invitation", "dashboard"]),
              help="Only credentials of this kind (dashboard: the dashboard's browser sessions).")
def revoke(username: Optional[str], ids: tuple[int, ...], kinds: tuple[str, ...]) -> None:
    """Revoke credentials: their tokens stop working (within BALSAM_AUTH_REVOCATION_CACHE_SEC on a
    running server); a revoked launcher credential also ends its BatchJob's sessions."""
    from balsam.server.admin import Admin, AdminError

    with Admin(_admin_database_url()) as admin:
        try:
            revoked = admin.revoke(username=username, ids=list(ids), kinds=list(kinds))
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"Revoked {len(revoked)} credential(s)" + (f": {', '.join(map(str, revoked))}" if revoked else ""))


def _utc_text(when: "dt.datetime | None") -> str:
    return "none" if when is None else f"{when.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


@server_group.command("set-start-time")
@click.argument("batch_job_id", type=BATCH_JOB_ID)
@click.argument("when", required=False, default=None)
@click.option("--clear", is_flag=True, help="Clear it instead: only while the BatchJob has not started "
                                            "(pending_submission, queued, submit_failed), whose start is then "
                                            "recorded as at first; give WHEN for one that ran.")
def set_start_time(batch_job_id: int, when: Optional[str], clear: bool) -> None:
    """Replace a BatchJob's start_time with WHEN (ISO 8601; without a zone, UTC), or --clear it.

    The API only moves a recorded start_time earlier (a later or null one sent is not stored), so
    a wrong one, such as a typo's early date, is corrected here, on the server's database. WHEN may
    not be later than now or the BatchJob's end_time, nor earlier than 2000-01-01."""
    from balsam.serialization import parse_datetime
    from balsam.server.admin import Admin, AdminError

    if clear == (when is not None):
        raise click.UsageError("give either WHEN or --clear")
    start = None
    if when is not None:
        try:
            start = parse_datetime(when)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="WHEN") from None
    with Admin(_admin_database_url()) as admin:
        try:
            done = admin.set_batch_job_start(batch_job_id, start)
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"BatchJob {done['id']} (site {done['site_id']}, {done['state']}): start_time "
               f"{_utc_text(done['old'])} -> {_utc_text(done['new'])}")


@server_group.command("stop")
@click.option("--timeout", default=30.0, show_default=True, type=float, help="Seconds to wait before SIGKILL.")
@click.option("--force", is_flag=True,
              help="Also stop an embedded server that server.pid names but server.json cannot date (check it first).")
def stop(timeout: float, force: bool) -> None:
    """Stop the background server (SIGTERM, then SIGKILL after --timeout)."""
    import psutil

    pid = _running_pid()
    paths = _paths()
    if pid is None:
        undated = _undated_server()
        if undated is not None and not force:
            raise click.ClickException(_undated_message(*undated))  # server.pid kept: it may be ours
        pid = undated[0] if undated is not None else None
    if pid is None:
        paths["pid"].unlink(missing_ok=True)
        paths["info"].unlink(missing_ok=True)
        click.echo("No Balsam server is running.")
        return
    try:
        proc = psutil.Process(pid)
        if EMBEDDED_MODULE not in proc.cmdline():  # (--force: checked again on the process signalled)
            raise psutil.NoSuchProcess(pid)
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:  # exited since _running_pid
        paths["pid"].unlink(missing_ok=True)
        paths["info"].unlink(missing_ok=True)
        click.echo("No Balsam server is running.")
        return
    click.echo(f"Stopping Balsam server (pid {pid}) ", nl=False)
    deadline = time.monotonic() + timeout
    while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            proc.kill()
            click.echo(" killed (did not stop within the timeout)")
            break
        click.echo(".", nl=False)
        try:
            proc.wait(timeout=0.5)
        except psutil.TimeoutExpired:
            continue
    else:
        click.echo(" stopped")
    paths["pid"].unlink(missing_ok=True)
    # server.json names the running server's database: left behind, admin commands took it for one
    # that runs (and `status` showed its database).
    paths["info"].unlink(missing_ok=True)


#: ``server status``'s exit status when the server is not running or not answering (as
#: ``systemctl status`` and LSB init scripts: 3 "not running"); 0 when it runs and answers.
STATUS_NOT_RUNNING = 3


@server_group.command("status")
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show whether the server runs: url, pid, database, uptime and record counts.

    Exit status 0 when it runs and answers, 3 when it is not running or not answering."""
    healthy = _status()
    if not healthy:
        ctx.exit(STATUS_NOT_RUNNING)


def _status() -> bool:
    """Print ``server status``; True when the server runs and answers."""
    import sqlalchemy as sa

    from balsam.server.db import create_db_engine
    from balsam.server.migrate import schema_problem
    from balsam.server.tables import jobs, sites, users
    from balsam.util import process_start_time

    pid = _running_pid()
    info = _info()
    database_url = info.get("database_url") or _database_url()
    healthy = False
    started = process_start_time(pid) if pid is not None else None
    undated = _undated_server() if pid is None else None
    if undated is not None:
        click.echo(f"Balsam server: unknown: {_undated_message(*undated)}")
    elif pid is None or started is None:  # (or it exited since _running_pid)
        click.echo("Balsam server: not running")
    else:
        # From timestamps: naive local times differ by an hour more or less across a daylight
        # saving change (a server started before the fall-back read "-1 day, 23:20:00").
        uptime = dt.timedelta(seconds=int(max(0.0, time.time() - started)))
        healthy = _answers(info.get("api_root", ""))
        answering = "answering" if healthy else "NOT answering"
        click.echo(f"Balsam server: running, {answering}")
        click.echo(f"  socket:   {info.get('api_root')}")
        click.echo(f"  url:      {info.get('url') or '(no TCP listener)'}")
        click.echo(f"  pid:      {pid}")
        click.echo(f"  uptime:   {str(uptime).split('.')[0]}")
        click.echo(f"  log:      {_paths()['log']}")
    safe_url = sa.engine.make_url(database_url).render_as_string(hide_password=True)
    click.echo(f"  database: {safe_url}")
    if database_url.startswith("sqlite") and not Path(database_url.split("///", 1)[-1]).exists():
        click.echo("  (no database yet)")
        return healthy
    engine = create_db_engine(database_url)
    try:
        # A server refuses a database at another revision (its start says why, once): say it here too,
        # or the counts below look like a database it could serve.
        problem = schema_problem(engine)
    except sa.exc.SQLAlchemyError:
        problem = None  # the counts below say why the database cannot be read
    if problem is not None:
        click.echo(f"  schema:   the database {problem}")
    try:
        with engine.connect() as conn:
            n_users = conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one()
            n_sites = conn.execute(sa.select(sa.func.count()).select_from(sites)).scalar_one()
            by_state = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
    except sa.exc.SQLAlchemyError as exc:
        click.echo(f"  counts:   unavailable ({str(exc).splitlines()[0]})")
        return healthy
    finally:
        engine.dispose()
    total = sum(n for _, n in by_state)
    click.echo(f"  users: {n_users}  sites: {n_sites}  jobs: {total}")
    for state, n in sorted(by_state):
        click.echo(f"    {state:<17} {n}")
    return healthy


@server_group.command("migrate")
@click.option("--database-url", default=None, help="Default: $BALSAM_DATABASE_URL, else the embedded SQLite.")
def migrate(database_url: Optional[str]) -> None:
    """Upgrade the database schema to the latest version (alembic upgrade head)."""
    import sqlalchemy as sa

    from balsam.server.migrate import head_revision, upgrade

    from alembic.util import CommandError

    url = database_url or _database_url()
    safe_url = sa.engine.make_url(url).render_as_string(hide_password=True)
    click.echo(f"Migrating {safe_url} to {head_revision()} ...")
    # A line as each revision starts: a revision that rewrites a large table takes minutes, in
    # which the command said nothing (nor which revision it was at, if it was stopped).
    steps = logging.getLogger("alembic.runtime.migration")
    progress = _MigrationProgress()
    level = steps.level
    steps.addHandler(progress)
    steps.setLevel(logging.INFO)
    try:
        revision = upgrade(url, on_wait=lambda: click.echo(
            "  waiting for another migration of this database to end (another `balsam server migrate`, "
            "or a server migrating it) ..."))
    except (sa.exc.SQLAlchemyError, CommandError, OSError) as exc:
        raise click.ClickException(_database_problem(url, exc, verb="migrate")) from None
    finally:
        steps.removeHandler(progress)
        steps.setLevel(level)
    click.echo(f"Database schema at revision {revision}")


class _MigrationProgress(logging.Handler):
    """Echoes alembic's ``Running upgrade A -> B, <message>`` as ``  HH:MM:SS A -> B ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Running upgrade "):
            step = message.removeprefix("Running upgrade ").partition(",")[0]
            click.echo(f"  {dt.datetime.now():%H:%M:%S} {step} ...")


commands = [server_group]
