"""``balsam server start|stop|status|login|set-password|migrate``: the embedded (or shared) REST service.

``start`` runs uvicorn in the background on 127.0.0.1 with SQLite under ``$BALSAM_HOME/server``
(nothing to install or configure), creates the local user and stores a 30-day login in the client
file. Shared deployments point ``BALSAM_DATABASE_URL`` at PostgreSQL and run ``migrate`` once.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click

LOCAL_TOKEN_TTL_SEC = 30 * 24 * 3600
DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"


def _server_dir() -> Path:
    from balsam.server.settings import server_dir

    return server_dir()


def _paths() -> dict[str, Path]:
    base = _server_dir()
    return {"dir": base, "pid": base / "server.pid", "log": base / "server.log", "info": base / "server.json",
            "db": base / "balsam.db"}


def _database_url() -> str:
    from balsam.server.settings import default_database_url

    return os.environ.get("BALSAM_DATABASE_URL") or default_database_url()


def _client_path() -> Path:
    env = os.environ.get("BALSAM_CLIENT_PATH")
    if env:
        return Path(env).expanduser()
    from balsam.server.settings import balsam_home

    return balsam_home() / "client.yml"


def _running_pid() -> Optional[int]:
    """The pid in server.pid if that process is alive and is a balsam server."""
    import psutil

    pid_file = _paths()["pid"]
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if proc.status() == psutil.STATUS_ZOMBIE or "balsam.server" not in cmdline:
        return None
    return pid


def _info() -> dict[str, Any]:
    try:
        return json.loads(_paths()["info"].read_text())
    except (OSError, ValueError):
        return {}


def _log_tail(lines: int = 25) -> str:
    try:
        text = _paths()["log"].read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "\n".join(text[-lines:])


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/auth/how", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ensure_local_user(database_url: str, username: str) -> int:
    import sqlalchemy as sa

    from balsam.server.db import create_db_engine, write_tx
    from balsam.server.jobs_logic import utcnow
    from balsam.server.tables import users

    engine = create_db_engine(database_url)
    try:
        with write_tx(engine) as conn:
            row = conn.execute(sa.select(users.c.id).where(users.c.username == username)).first()
            if row is not None:
                return row.id
            return conn.execute(
                sa.insert(users).values(username=username, hashed_password=None, date_joined=utcnow()).returning(users.c.id)
            ).scalar_one()
    finally:
        engine.dispose()


def _write_login(url: str, username: str, token: str, expiry: dt.datetime, *, force: bool,
                 replaceable: "set[str] | None" = None) -> str:
    """Store the login unless the client file holds a login for another server (then explain).
    ``replaceable``: earlier addresses of this same local server (e.g. before a port change)."""
    import yaml

    path = _client_path()
    if path.exists() and not force:
        try:
            existing = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            existing = {}
        other = str(existing.get("api_root", "")).rstrip("/")
        if other and other != url.rstrip("/") and other not in {u.rstrip("/") for u in (replaceable or set())}:
            return (f"Kept the existing login for {other} in {path}. To use the local server instead run "
                    f"`balsam server login` (or `balsam login` with api root {url}).")
    data = {
        "api_root": url,
        "client_class": "balsam.client.RESTClient",
        "token": token,
        "token_expiry": expiry.isoformat(),
        "username": username,
        "connect_timeout": 6.2,
        "read_timeout": 120.0,
        "retry_count": 10,
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return f"Logged in as {username} at {url} (token valid until {expiry:%Y-%m-%d}; stored in {path})"


def _issue_local_login(url: str, database_url: str, *, force: bool, replaceable: "set[str] | None" = None) -> str:
    from balsam.server.auth import create_token
    from balsam.server.settings import ServerSettings

    username = getpass.getuser()
    user_id = _ensure_local_user(database_url, username)
    settings = ServerSettings.from_env(database_url)
    token, expiry = create_token(user_id, username, settings.secret_key, LOCAL_TOKEN_TTL_SEC)
    return _write_login(url, username, token, expiry, force=force, replaceable=replaceable)


@click.group("server")
def server_group() -> None:
    """Run the Balsam REST service (embedded SQLite by default)."""


@server_group.command("start")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port to bind.")
@click.option("--timeout", default=60.0, show_default=True, type=float, help="Seconds to wait for the server.")
def start(host: str, port: int, timeout: float) -> None:
    """Start the server in the background and log in the local user."""
    paths = _paths()
    database_url = _database_url()
    running = _running_pid()
    if running is not None:
        info = _info()
        url = info.get("url", f"http://{host}:{port}")
        click.echo(f"Balsam server already running (pid {running}) at {url}")
        click.echo(_issue_local_login(url, info.get("database_url", database_url), force=False))
        return
    paths["dir"].mkdir(parents=True, exist_ok=True, mode=0o700)
    previous_url = _info().get("url")
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{connect_host}:{port}"
    if _answers(url):
        raise click.ClickException(f"something else already answers at {url}; choose another --port")

    # Create/upgrade the schema before the server starts, so migration errors show here.
    from balsam.server.db import create_db_engine
    from balsam.server.migrate import upgrade_engine
    from balsam.server.settings import ServerSettings

    ServerSettings.from_env(database_url)  # creates the signing key (0600) on first start
    engine = create_db_engine(database_url)
    try:
        upgrade_engine(engine)
    finally:
        engine.dispose()

    env = dict(os.environ, BALSAM_DATABASE_URL=database_url, BALSAM_SERVER_CREATE_TABLES="0")
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env",
           "--host", host, "--port", str(port), "--log-level", "info"]
    with open(paths["log"], "ab") as log:
        log.write(f"\n--- balsam server start {dt.datetime.now().isoformat()} ---\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=paths["dir"])
    paths["pid"].write_text(f"{proc.pid}\n")
    paths["info"].write_text(json.dumps({"pid": proc.pid, "url": url, "database_url": database_url,
                                         "started": dt.datetime.now(dt.timezone.utc).isoformat()}))
    click.echo(f"Starting Balsam server at {url} (pid {proc.pid}, log {paths['log']}) ", nl=False)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            paths["pid"].unlink(missing_ok=True)
            click.echo("")
            raise click.ClickException(
                f"the server exited with code {proc.returncode}. Last lines of {paths['log']}:\n{_log_tail()}"
            )
        if _answers(url):
            break
        if time.monotonic() > deadline:
            proc.terminate()
            paths["pid"].unlink(missing_ok=True)
            click.echo("")
            raise click.ClickException(
                f"the server did not answer within {timeout:.0f}s. Last lines of {paths['log']}:\n{_log_tail()}"
            )
        click.echo(".", nl=False)
        time.sleep(0.5)
    click.echo(" ready")
    click.echo(_issue_local_login(url, database_url, force=False, replaceable={previous_url} if previous_url else None))


@server_group.command("login")
def login_local() -> None:
    """Store a fresh 30-day login for the local user on the running local server."""
    if _running_pid() is None:
        raise click.ClickException("no local Balsam server is running; start it with `balsam server start`")
    info = _info()
    click.echo(_issue_local_login(info["url"], info.get("database_url", _database_url()), force=True))


@server_group.command("set-password")
@click.option("--username", default=None, help="Default: the local user ($USER).")
@click.password_option("--password", help="Prompted for (twice) when not given.")
def set_password(username: Optional[str], password: str) -> None:
    """Set a password so that USERNAME can also log in with `balsam login` (e.g. from another machine)."""
    import sqlalchemy as sa

    from balsam.server.auth import hash_password
    from balsam.server.db import create_db_engine, write_tx
    from balsam.server.tables import users

    username = username or getpass.getuser()
    database_url = _info().get("database_url") or _database_url()
    if not password:
        raise click.ClickException("the password must not be empty")
    engine = create_db_engine(database_url)
    try:
        with write_tx(engine) as conn:
            exists = conn.execute(sa.select(users.c.id).where(users.c.username == username)).first()
            if exists is None:
                raise click.ClickException(f"no user {username!r} in {database_url} (start the server first)")
            conn.execute(sa.update(users).where(users.c.id == exists.id).values(hashed_password=hash_password(password)))
    finally:
        engine.dispose()
    click.echo(f"Password set for {username}")


@server_group.command("stop")
@click.option("--timeout", default=30.0, show_default=True, type=float, help="Seconds to wait before SIGKILL.")
def stop(timeout: float) -> None:
    """Stop the background server (SIGTERM, then SIGKILL after --timeout)."""
    import psutil

    pid = _running_pid()
    paths = _paths()
    if pid is None:
        paths["pid"].unlink(missing_ok=True)
        click.echo("No Balsam server is running.")
        return
    click.echo(f"Stopping Balsam server (pid {pid}) ", nl=False)
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGTERM)
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


@server_group.command("status")
def status() -> None:
    """Show whether the server runs: url, pid, database, uptime and record counts."""
    import psutil
    import sqlalchemy as sa

    from balsam.server.db import create_db_engine
    from balsam.server.tables import jobs, sites, users

    pid = _running_pid()
    info = _info()
    database_url = info.get("database_url") or _database_url()
    if pid is None:
        click.echo("Balsam server: not running")
    else:
        started = dt.datetime.fromtimestamp(psutil.Process(pid).create_time())
        uptime = dt.datetime.now() - started
        answering = "answering" if _answers(info.get("url", "")) else "NOT answering"
        click.echo(f"Balsam server: running, {answering}")
        click.echo(f"  url:      {info.get('url')}")
        click.echo(f"  pid:      {pid}")
        click.echo(f"  uptime:   {str(uptime).split('.')[0]}")
        click.echo(f"  log:      {_paths()['log']}")
    safe_url = sa.engine.make_url(database_url).render_as_string(hide_password=True)
    click.echo(f"  database: {safe_url}")
    if database_url.startswith("sqlite") and not Path(database_url.split("///", 1)[-1]).exists():
        click.echo("  (no database yet)")
        return
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            n_users = conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one()
            n_sites = conn.execute(sa.select(sa.func.count()).select_from(sites)).scalar_one()
            by_state = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
    except sa.exc.SQLAlchemyError as exc:
        click.echo(f"  counts:   unavailable ({str(exc).splitlines()[0]})")
        return
    finally:
        engine.dispose()
    total = sum(n for _, n in by_state)
    click.echo(f"  users: {n_users}  sites: {n_sites}  jobs: {total}")
    for state, n in sorted(by_state):
        click.echo(f"    {state:<17} {n}")


@server_group.command("migrate")
@click.option("--database-url", default=None, help="Default: $BALSAM_DATABASE_URL, else the embedded SQLite.")
def migrate(database_url: Optional[str]) -> None:
    """Upgrade the database schema to the latest version (alembic upgrade head)."""
    import sqlalchemy as sa

    from balsam.server.migrate import head_revision, upgrade

    url = database_url or _database_url()
    safe_url = sa.engine.make_url(url).render_as_string(hide_password=True)
    click.echo(f"Migrating {safe_url} to {head_revision()} ...")
    try:
        revision = upgrade(url)
    except sa.exc.OperationalError as exc:
        raise click.ClickException(f"cannot migrate {safe_url}: {str(exc.orig).strip().splitlines()[0]}") from None
    click.echo(f"Database schema at revision {revision}")


commands = [server_group]
