"""Shared by the benchmark scripts: run balsam.server under a real uvicorn subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx


def prepare_pg(url: str, revision: str = "head") -> None:
    """Drop and create the PostgreSQL database of ``url`` (a benchmark's own), then migrate it to
    ``revision``."""
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url
    from balsam.server.migrate import upgrade

    parsed = sa.engine.make_url(normalize_database_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
    admin.dispose()
    upgrade(url, revision)


def drop_pg(url: str) -> None:
    """Drop the PostgreSQL database of ``url`` (a benchmark's own, made by :func:`prepare_pg`) as the
    benchmark ends, so that none is left behind."""
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url

    parsed = sa.engine.make_url(normalize_database_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
    admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path, database_url: str, *, home: Path, workers: int = 1,
                 create_tables: bool = True) -> tuple[subprocess.Popen, str]:
    """Start uvicorn on a free port (log in ``workdir/server.log``); returns (process, base URL) once it answers.

    ``create_tables``: the server creates the schema itself (else the database must be migrated already).
    """
    port = free_port()
    env = {**os.environ, "BALSAM_DATABASE_URL": database_url, "BALSAM_AUTH_SECRET_KEY": uuid.uuid4().hex * 2,
           "BALSAM_HOME": str(home), "BALSAM_SERVER_CREATE_TABLES": "1" if create_tables else "0",
           "BALSAM_AUTH_REGISTRATION": "open"}  # the benchmarks register their own users
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    log_path = workdir / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/auth/how", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    raise SystemExit(f"the server did not start within 60 s; see {log_path}")


def open_user_site(url: str, name: str) -> tuple[httpx.Client, dict, dict, str, str]:
    """Register user ``name-<pid>`` on the server at ``url`` (open registration: :func:`start_server`),
    log in, and create a site and an app ``Sim`` for the benchmark's jobs: (client, site, app,
    username, password)."""
    username, password = f"{name}-{os.getpid()}", f"{name}-bench-password"
    httpx.post(f"{url}/auth/password/register", json={"username": username, "password": password}).raise_for_status()
    token = httpx.post(f"{url}/auth/password/login", data={"username": username, "password": password}).json()["access_token"]
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)
    site = api.post("/sites/", json={"name": name, "path": f"/sites/{name}"}).json()
    app = api.post("/apps/", json={"site_id": site["id"], "name": "Sim", "serialized_class": "", "source_code": "",
                                   "parameters": {}, "transfers": {}, "description": ""}).json()
    return api, site, app, username, password
