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
    if (tmp_path / "home" / "server" / "server.pid").exists():  # else `stop` finds nothing to stop
        run(["server", "stop"], env)


def _client(home: Path):
    from balsam.client import ClientSettings, RESTClient

    path = home / "client.yml"
    return RESTClient.from_settings(ClientSettings.load(path), settings_path=path)


def test_start_status_login_stop(home_env, tmp_path):
    port = free_port()
    result = run(["server", "start", "--port", str(port)], home_env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "ready" in result.stdout and "Logged in as" in result.stdout
    home = Path(home_env["BALSAM_HOME"])
    client_file = home / "client.yml"
    assert stat.S_IMODE(client_file.stat().st_mode) == 0o600
    # $BALSAM_HOME was created 0755 (mkdir's mode went to server/ only): its local scheduler's and
    # demo site's files were readable by everyone on a shared login node.
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "server" / "secret.key").stat().st_mode) == 0o600
    login = yaml.safe_load(client_file.read_text())
    # Clients reach the embedded server through a socket in a private directory.
    socket_path = home / "server" / "run" / "balsam.sock"
    assert login["api_root"] == f"unix://{socket_path}"
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700 and stat.S_ISSOCK(socket_path.stat().st_mode)
    assert {"client_class", "token", "token_expiry", "username", "connect_timeout", "read_timeout", "retry_count",
            "refresh_token", "refresh_expiry"} <= set(login)
    client = _client(home)
    assert client.whoami()["username"] == login["username"]
    assert client.post("/sites/", json={"name": "laptop", "path": str(tmp_path)})["name"] == "laptop"
    client.close()
    # The TCP port serves browsers and 0.7 clients; registration is closed there.
    assert httpx.get(f"http://127.0.0.1:{port}/auth/how").status_code == 200
    resp = httpx.post(f"http://127.0.0.1:{port}/auth/password/register", json={"username": "x", "password": "y" * 20})
    assert resp.status_code == 403
    assert (home / "server" / "balsam.db").exists() and (home / "server" / "server.pid").exists()

    # Browsers reach the dashboard on the TCP port (the socket is for the local user's clients).
    link = run(["dashboard"], home_env)
    assert link.returncode == 0 and f"http://127.0.0.1:{port}/dashboard/ticket?t=" in link.stdout, link.stderr
    ticket_url = link.stdout.split()[link.stdout.split().index("session):") + 1]
    assert httpx.get(ticket_url, follow_redirects=True).status_code == 200

    status = run(["server", "status"], home_env)
    assert status.returncode == 0 and "running, answering" in status.stdout
    assert f"127.0.0.1:{port}" in status.stdout and str(socket_path) in status.stdout and "sites: 1" in status.stdout

    again = run(["server", "start", "--port", str(port)], home_env)
    assert again.returncode == 0 and "already running" in again.stdout and "already stored" in again.stdout
    assert yaml.safe_load(client_file.read_text())["refresh_token"] == login["refresh_token"]

    # A login for another server is kept; `balsam server login` replaces it on request.
    client_file.write_text(yaml.safe_dump({**login, "api_root": "https://balsam.example.org"}))
    kept = run(["server", "start", "--port", str(port)], home_env)
    assert "Kept the existing login" in kept.stdout
    assert yaml.safe_load(client_file.read_text())["api_root"] == "https://balsam.example.org"
    relogin = run(["server", "login"], home_env)
    assert relogin.returncode == 0 and yaml.safe_load(client_file.read_text())["api_root"] == login["api_root"]
    creds = run(["server", "credentials"], home_env)
    assert creds.returncode == 0 and "refresh" in creds.stdout

    # Password login works for the local user once a password is set (12 characters at least).
    short = subprocess.run(BALSAM + ["server", "set-password", "--password-stdin"], env=home_env, input="hunter22\n",
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    setpw = subprocess.run(BALSAM + ["server", "set-password", "--password-stdin"], env=home_env,
                           input="hunter22 hunter22\n", capture_output=True, text=True, timeout=60)
    assert setpw.returncode == 0, setpw.stderr
    # The local login (and so the site agents') stays: only --end-sessions revokes logins.
    assert "Existing logins stay valid" in setpw.stdout and "--end-sessions" in setpw.stdout
    resp = httpx.post(f"http://127.0.0.1:{port}/auth/password/login",
                      data={"username": login["username"], "password": "hunter22 hunter22"})
    assert resp.status_code == 200 and resp.json()["access_token"]
    nobody = subprocess.run(BALSAM + ["server", "set-password", "--username", "nobody-here", "--password-stdin"],
                            env=home_env, input="long enough password\n", capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 1 and "no user" in nobody.stderr

    stop = run(["server", "stop"], home_env)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not (home / "server" / "server.pid").exists() and not socket_path.exists()
    status = run(["server", "status"], home_env)
    assert "not running" in status.stdout and "sites: 1" in status.stdout
    # Data survives a restart, and the stored login keeps working (refresh credential).
    port2 = free_port()
    assert run(["server", "start", "--port", str(port2)], home_env).returncode == 0
    client = _client(home)
    assert [s["name"] for s in client.get("/sites/")["results"]] == ["laptop"]
    client.close()


def test_a_squatter_on_the_port_gets_no_token(home_env):
    """Before: with the embedded server down, whatever listened on 127.0.0.1:8765 received the
    client's bearer token. Now the client only talks to the socket in its private directory."""
    import threading

    from balsam.client import ServerUnavailable, TransportRefused

    port = free_port()
    assert run(["server", "start", "--port", str(port)], home_env).returncode == 0
    home = Path(home_env["BALSAM_HOME"])
    assert run(["server", "stop"], home_env).returncode == 0
    received: list[bytes] = []
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    squatter.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = squatter.accept()
            except OSError:
                continue
            received.append(conn.recv(65536))
            conn.close()

    stop = threading.Event()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = _client(home)
        client.retry_count = 0
        with pytest.raises(ServerUnavailable):
            client.get("/sites/")
        # A socket directory others could write to is refused before connecting.
        run_dir = home / "server" / "run"
        run_dir.chmod(0o755)
        client = _client(home)
        with pytest.raises(TransportRefused, match="mode 0700"):
            client.get("/sites/")
        run_dir.chmod(0o700)
    finally:
        stop.set()
        thread.join(5)
        squatter.close()
    assert received == []


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
