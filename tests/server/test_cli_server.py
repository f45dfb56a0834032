"""``balsam server start|status|login|stop|migrate`` as a user runs them (real processes)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

BALSAM = [str(Path(sys.executable).with_name("balsam"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args, env, timeout=90):
    return subprocess.run(BALSAM + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home_env(tmp_path):
    env = dict(os.environ, BALSAM_HOME=str(tmp_path / "home"))
    for key in ("BALSAM_CLIENT_PATH", "BALSAM_DATABASE_URL", "BALSAM_AUTH_SECRET_KEY"):
        env.pop(key, None)
    yield env
    run(["server", "stop"], env)


def test_start_status_login_stop(home_env, tmp_path):
    port = free_port()
    result = run(["server", "start", "--port", str(port)], home_env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "ready" in result.stdout and "Logged in as" in result.stdout
    home = Path(home_env["BALSAM_HOME"])
    client = home / "client.yml"
    assert stat.S_IMODE(client.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "server" / "secret.key").stat().st_mode) == 0o600
    login = yaml.safe_load(client.read_text())
    assert login["api_root"] == f"http://127.0.0.1:{port}"
    assert {"client_class", "token", "token_expiry", "username", "connect_timeout", "read_timeout", "retry_count"} <= set(login)
    me = httpx.get(f"{login['api_root']}/auth/password/me", headers={"Authorization": f"Bearer {login['token']}"})
    assert me.status_code == 200 and me.json()["username"] == login["username"]
    # The token works for real requests.
    resp = httpx.post(f"{login['api_root']}/sites/", json={"name": "laptop", "path": str(tmp_path)},
                      headers={"Authorization": f"Bearer {login['token']}"})
    assert resp.status_code == 201
    assert (home / "server" / "balsam.db").exists() and (home / "server" / "server.pid").exists()

    status = run(["server", "status"], home_env)
    assert status.returncode == 0 and "running, answering" in status.stdout
    assert f"127.0.0.1:{port}" in status.stdout and "sites: 1" in status.stdout

    again = run(["server", "start", "--port", str(port)], home_env)
    assert again.returncode == 0 and "already running" in again.stdout

    # A login for another server is kept; `balsam server login` replaces it on request.
    client.write_text(yaml.safe_dump({**login, "api_root": "https://balsam.example.org"}))
    kept = run(["server", "start", "--port", str(port)], home_env)
    assert "Kept the existing login" in kept.stdout
    assert yaml.safe_load(client.read_text())["api_root"] == "https://balsam.example.org"
    relogin = run(["server", "login"], home_env)
    assert relogin.returncode == 0 and yaml.safe_load(client.read_text())["api_root"] == login["api_root"]

    # Password login works for the local user once a password is set.
    setpw = run(["server", "set-password", "--password", "hunter22"], home_env)
    assert setpw.returncode == 0, setpw.stderr
    resp = httpx.post(f"{login['api_root']}/auth/password/login", data={"username": login["username"], "password": "hunter22"})
    assert resp.status_code == 200 and resp.json()["access_token"]
    assert run(["server", "set-password", "--username", "nobody-here", "--password", "x"], home_env).returncode == 1

    stop = run(["server", "stop"], home_env)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not (home / "server" / "server.pid").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{login['api_root']}/auth/how", timeout=2)
    status = run(["server", "status"], home_env)
    assert "not running" in status.stdout and "sites: 1" in status.stdout
    # Data survives a restart.
    port2 = free_port()
    assert run(["server", "start", "--port", str(port2)], home_env).returncode == 0
    login = yaml.safe_load(client.read_text())
    sites = httpx.get(f"{login['api_root']}/sites/", headers={"Authorization": f"Bearer {login['token']}"}).json()
    assert [s["name"] for s in sites["results"]] == ["laptop"]


def test_start_reports_a_busy_port(home_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(["server", "start", "--port", str(port), "--timeout", "20"], home_env)
    assert result.returncode == 1
    assert "Error:" in result.stderr
    assert "exited" in result.stderr or "did not answer" in result.stderr or "already answers" in result.stderr


def test_stop_and_login_without_server(home_env):
    assert "No Balsam server is running" in run(["server", "stop"], home_env).stdout
    result = run(["server", "login"], home_env)
    assert result.returncode == 1 and "no local Balsam server is running" in result.stderr


def test_migrate(home_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    result = run(["server", "migrate", "--database-url", url], home_env)
    assert result.returncode == 0, result.stderr
    assert "Database schema at revision" in result.stdout
    result = run(["server", "migrate", "--database-url", "postgresql://postgres@127.0.0.1:1/nowhere"], home_env)
    assert result.returncode == 1 and "cannot migrate" in result.stderr
