"""A real Balsam deployment for launcher tests and the launcher benchmark.

``LocalDeployment`` starts a uvicorn server on SQLite in a temp directory (with a short session
expiry so lease loss can be tested), registers a user, writes its login file, and creates sites
(directory + ``.balsam-site`` + ``settings.yml`` + API record). ``start_launcher`` runs
``python -m balsam.launcher`` exactly as the job template does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import yaml

PYTHON = sys.executable
VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDeployment:
    def __init__(self, root: Path, *, session_expire_sec: int = 300, session_sweep_sec: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        env = dict(os.environ)
        env.update(
            BALSAM_DATABASE_URL=f"sqlite:///{self.root / 'balsam.db'}",
            BALSAM_AUTH_SECRET_KEY=secrets.token_hex(16),
            BALSAM_SESSION_EXPIRE_SEC=str(session_expire_sec),
            BALSAM_SESSION_SWEEP_SEC=str(session_sweep_sec),
            BALSAM_HOME=str(self.home),
            BALSAM_AUTH_REGISTRATION="open",
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        self.username = f"launcher_{secrets.token_hex(3)}"
        self.password = secrets.token_urlsafe(12)
        httpx.post(f"{self.url}/auth/password/register", json={"username": self.username, "password": self.password}).raise_for_status()
        resp = httpx.post(f"{self.url}/auth/password/login", data={"username": self.username, "password": self.password})
        resp.raise_for_status()
        body = resp.json()
        self.token = body["access_token"]
        self.client_path = self.home / "client.yml"
        self.client_path.write_text(yaml.safe_dump({
            "api_root": self.url, "client_class": "balsam.client.RESTClient", "token": self.token,
            "token_expiry": str(body.get("expiration") or (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()),
            "username": self.username, "connect_timeout": 6.2, "read_timeout": 120.0, "retry_count": 3,
        }))
        os.chmod(self.client_path, 0o600)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/auth/how", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def env(self) -> dict[str, str]:
        """Environment that makes balsam.api, the CLI and child processes act as this user."""
        return {"BALSAM_HOME": str(self.home), "BALSAM_CLIENT_PATH": str(self.client_path)}

    def activate(self) -> None:
        os.environ.update(self.env())
        from balsam._api.model import reset_default_client

        reset_default_client()

    def make_site(self, name: str, launcher: Optional[dict[str, Any]] = None, **sections: Any) -> Path:
        return make_site(self.root / name, name, launcher, **sections)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def make_site(path: Path, name: str, launcher: Optional[dict[str, Any]] = None, **sections: Any) -> Path:
    """A site directory registered with the API (as the current user); ``launcher`` overrides
    settings.launcher keys. Agent-module sections are left out (disabled): only launchers run.

    The launcher's own default postprocess is off here (``default_postprocess_in_launcher``, on in
    a real site): these sites' tests look at what the launcher reports of a run, RUN_DONE. The tests
    of that postprocess turn it on (the launcher e2e test named after it, the eight-launcher drill),
    and the site agent's end-to-end tests run real sites, with it on."""
    from balsam.api import Site

    path = Path(path)
    for sub in ("data", "log", "qsubmit"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"launcher": {"idle_ttl_sec": 3, "delay_sec": 1, "default_postprocess_in_launcher": False,
                                             **(launcher or {})}}
    settings.update(sections)
    (path / "settings.yml").write_text(yaml.safe_dump(settings))
    site = Site.objects.create(name=name, path=str(path))
    (path / ".balsam-site").write_text(f"{site.id}\n")
    return path


def finish(proc: subprocess.Popen, timeout: float = 60) -> int:
    """The launcher's exit status; killed (its group) with its console in the error after ``timeout``."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"launcher did not exit in {timeout} s:\n{Path(proc.console_path).read_text()[-3000:]}")


def start_launcher(site_path: Path, job_mode: str, wall_time_min: float, *args: str, env: Optional[dict[str, str]] = None,
                   tick_sec: float = 1.0, output: Optional[Path] = None) -> subprocess.Popen:
    """``python -m balsam.launcher -j MODE -t MIN ...`` as the job template starts it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["BALSAM_SITE_PATH"] = str(site_path)
    full_env["BALSAM_LAUNCHER_TICK_SEC"] = str(tick_sec)
    full_env["PATH"] = VENV_BIN + os.pathsep + full_env.get("PATH", "")
    out = open(output or site_path / "log" / f"launcher-{time.time_ns()}.console", "wb")
    proc = subprocess.Popen([PYTHON, "-m", "balsam.launcher", "-j", job_mode, "-t", str(wall_time_min), *args],
                            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.console_path = out.name  # type: ignore[attr-defined]
    out.close()
    return proc


@contextlib.contextmanager
def serial_launcher_on_cpus(site_path: Path, cpu_ids: list[int], wall_time_min: float) -> Iterator[subprocess.Popen]:
    """Runs a serial launcher on one node of this host with CPUs ``cpu_ids`` for the ``with`` block;
    kills its process group if it is still running after."""
    nodes = [{"node_id": "0", "hostname": socket.gethostname(), "cpu_ids": cpu_ids, "gpu_ids": []}]
    proc = start_launcher(site_path, "serial", wall_time_min, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def end_allocation(proc: subprocess.Popen, timeout: float = 90) -> int:
    """Sends SIGTERM to the launcher's process group, as an allocation's end does; returns its exit status."""
    os.killpg(proc.pid, signal.SIGTERM)
    return finish(proc, timeout=timeout)
