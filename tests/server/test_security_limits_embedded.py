"""The embedded server (``python -m balsam.server.embedded``, as ``balsam server start`` runs it):
its loopback TCP port answers only requests for localhost or a loopback address (DNS rebinding), its
Unix socket whatever the Host; its access log leaves out the dashboard's one-time login tickets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest


class Embedded:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen) -> None:
        self.root, self.port, self.proc = root, port, proc
        self.url = f"http://127.0.0.1:{port}"
        self.socket = root / "run" / "balsam.sock"
        self.log = root / "server.log"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def embedded() -> Iterator[Embedded]:
    root = Path(tempfile.mkdtemp(prefix="bsec-"))  # short: a Unix socket path holds 108 bytes
    port = _free_port()
    env = {**os.environ, "BALSAM_DATABASE_URL": f"sqlite:///{root / 'balsam.db'}",
           "BALSAM_AUTH_SECRET_KEY": "k" * 48, "BALSAM_HOME": str(root / "home"),
           "BALSAM_SERVER_CREATE_TABLES": "1", "BALSAM_AUTH_REGISTRATION": "open"}
    env.pop("BALSAM_AUTH_ONLY_USER", None)
    out = open(root / "server.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "balsam.server.embedded", "--socket", str(root / "run" / "balsam.sock"),
                             "--port", str(port), "--log-file", str(root / "server.log"), "--log-level", "info"],
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Embedded(root, port, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "server.out").read_text()
            try:
                if httpx.get(f"{server.url}/auth/how", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the embedded server did not answer within 60 s"
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        out.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "LOCALHOST.evil",
                                  "0.0.0.0:{port}", "[::2]:{port}", "localhost..:{port}", "localhost.localdomain.evil"])
def test_the_loopback_port_refuses_another_host(embedded, host):
    host = host.format(port=embedded.port)
    for method, path, kwargs in [("GET", "/", {}), ("POST", "/auth/password/login", {"data": {"username": "u",
                                                                                              "password": "p"}})]:
        resp = httpx.request(method, embedded.url + path, headers={"Host": host}, timeout=10, **kwargs)
        assert resp.status_code == 421, (host, resp.status_code, resp.text)
        detail = resp.json()["detail"]
        assert repr(host) in detail and "localhost or a loopback address" in detail and "\n" not in detail


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost", "[::1]:{port}",
                                  "127.0.0.1", "localhost:9999", "127.0.0.2:{port}",
                                  # The client's loopback names too, and a fully qualified name's dot.
                                  "localhost.:{port}", "localhost.", "localhost.localdomain:{port}",
                                  "ip6-localhost:{port}", "LOCALHOST.LOCALDOMAIN."])
def test_the_loopback_port_answers_its_own_names_with_any_port(embedded, host):
    host = host.format(port=embedded.port)
    resp = httpx.get(embedded.url + "/", headers={"Host": host}, timeout=10)
    assert resp.status_code == 200, (host, resp.text)


def test_the_unix_socket_answers_whatever_the_host(embedded):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(embedded.socket)), base_url="http://evil.example",
                      timeout=10) as client:
        assert client.get("/").status_code == 200
        assert client.get("/auth/how").status_code == 200


def test_a_plain_uvicorn_server_is_not_concerned(live_server):
    """uvicorn run by hand (behind a proxy that passes the public Host on) keeps answering."""
    assert httpx.get(live_server + "/", headers={"Host": "balsam.example.org"}, timeout=10).status_code == 200


def test_the_access_log_leaves_out_the_login_ticket(embedded):
    username, password = "ticket-user", "a long enough password"
    assert httpx.post(embedded.url + "/auth/password/register", json={"username": username, "password": password},
                      timeout=30).status_code == 201
    token = httpx.post(embedded.url + "/auth/password/login", data={"username": username, "password": password},
                       timeout=30).json()["access_token"]
    link = httpx.post(embedded.url + "/dashboard/login-link", headers={"Authorization": f"Bearer {token}"},
                      timeout=30).json()
    ticket = link["ticket"]
    resp = httpx.get(embedded.url + link["path"], timeout=30)
    assert resp.status_code == 303, resp.text  # logged in (the session cookie set)
    # The same ticket sent on a path encoded otherwise, or after another parameter, is not logged either.
    httpx.get(f"{embedded.url}/dashboard/%74icket?x=1&t={ticket}", timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and embedded.log.read_text().count("icket?") < 2:
        time.sleep(0.1)
    log = embedded.log.read_text()
    lines = [line for line in log.splitlines() if "icket?" in line]
    assert len(lines) == 2, log[-3000:]
    assert ticket not in log
    assert ticket.split(".")[-1] not in log  # not even its signature
    assert '"GET /dashboard/ticket?t=[redacted] HTTP/1.1" 303' in lines[0], lines
    assert "/dashboard/%74icket?x=[redacted]&t=[redacted]" in lines[1], lines


def test_other_request_targets_are_logged_as_they_were(embedded):
    target = "/jobs/?id=1&id=2&tags=a:b&t=keep"
    httpx.get(embedded.url + target, timeout=30)  # 401: logged all the same
    httpx.get(embedded.url + "/dashboard/tickets?t=1", timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "/dashboard/tickets?t=1 " not in embedded.log.read_text():
        time.sleep(0.1)
    log = embedded.log.read_text()
    assert f'"GET {target} HTTP/1.1" 401' in log and '"GET /dashboard/tickets?t=1 HTTP/1.1" 404' in log, log[-3000:]
