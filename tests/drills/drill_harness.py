"""Pieces of the reliability drills: a restartable server, a private PostgreSQL cluster, a user.

- :class:`DrillServer`: uvicorn serving balsam on a fixed loopback port, which can be SIGKILLed and
  started again on the same port and database (clients keep their URL).
- :class:`PrivatePostgres`: ``initdb`` in a temp dir, a free port, run as the ``postgres`` OS user
  when we are root; ``restart()`` and ``stop()``. The machine's shared PostgreSQL is never touched.
- :func:`login_user`: registers a user and writes its ``client.yml``; returns the env that makes
  the Python API, launchers and agents act as that user.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "site"))
from site_test_utils import wait_for  # noqa: E402

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DrillServer:
    def __init__(self, root: Path, database_url: str, env: Optional[dict[str, str]] = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self.env = {
            **os.environ,
            "BALSAM_DATABASE_URL": database_url,
            "BALSAM_AUTH_SECRET_KEY": "drill-" + secrets.token_hex(16),
            "BALSAM_HOME": str(self.root / "server-home"),
            "BALSAM_SERVER_CREATE_TABLES": "1",
            "BALSAM_AUTH_REGISTRATION": "open",  # the drills register their own users
            **(env or {}),
        }
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
        )
        log.close()

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"server exited:\n{self.log_tail()}"
            # Our process must hold the port: uvicorn fails to bind a moment after it starts, and
            # another server on the port (the restart drills reuse it) would answer in its place.
            if not self.listening():
                return False
            try:
                return httpx.get(f"{self.url}/auth/how", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=timeout, what="the server to answer", interval=0.2)

    def listening(self) -> bool:
        """Whether the server process itself listens on :attr:`port`."""
        assert self.proc is not None
        try:
            connections = psutil.Process(self.proc.pid).net_connections(kind="inet")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in connections)

    def kill(self) -> None:
        """kill -9: no shutdown at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def login_user(url: str, home: Path, retry_count: int = 10) -> dict[str, str]:
    """A new user on ``url`` with its client.yml in ``home``; returns the environment to act as it."""
    username, password = f"drill-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    httpx.post(f"{url}/auth/password/register", json={"username": username, "password": password}, timeout=30).raise_for_status()
    resp = httpx.post(f"{url}/auth/password/login", data={"username": username, "password": password}, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    home.mkdir(parents=True, exist_ok=True)
    client_path = home / "client.yml"
    client_path.write_text(yaml.safe_dump({
        "api_root": url, "token": body["access_token"], "username": username, "retry_count": retry_count,
        "token_expiry": str(body.get("expiration") or (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()),
    }))
    os.chmod(client_path, 0o600)
    return {"BALSAM_HOME": str(home), "BALSAM_CLIENT_PATH": str(client_path)}


def _pg_bin(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster of our own (never the machine's shared one)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        # Directly under /tmp: the postgres user must be able to reach it (pytest's tmp dirs are 0700).
        self.root = Path(tempfile.mkdtemp(prefix="balsam-drill-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.user: Optional[str] = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                       "fsync = off\nmax_connections = 200\n")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=check, cwd="/")

    def start(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start"])

    def restart(self) -> None:
        """What an administrator's restart does to the server: connections cut, service back."""
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-t", "60", "-m", "fast",
                   "restart"])

    def stop(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-m", "immediate", "stop"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)
