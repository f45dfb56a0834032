"""RESTClient and the stored login: retries, 4xx handling, 401 re-login, fork safety, client.yml."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import yaml

from balsam.client import (
    APIError,
    AuthenticationError,
    ClientSettings,
    NotLoggedIn,
    RESTClient,
    ServerUnavailable,
    client_path,
    load_client,
)


class ScriptedServer:
    """A real HTTP server answering from a script of (status, body, headers); counts requests.

    It stands in for a failing Balsam server (5xx, 429, 4xx) - the client is what is tested.
    """

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, str, str]] = []
        self.keys: list["str | None"] = []  # the Idempotency-Key of each request
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
                outer.keys.append(self.headers.get("Idempotency-Key"))
                status, body, headers = outer.script.pop(0) if outer.script else (200, {"count": 0, "results": []}, {})
                headers = dict(headers)
                time.sleep(float(headers.pop("X-Test-Delay", 0)))
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # noqa: ANN001
                pass  # a client that gave up waiting (timeout tests) closes its end: not an error here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(script: list) -> ScriptedServer:
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def fast_client(url: str, **kw) -> RESTClient:
    return RESTClient(url, "tok", backoff_base=0.01, backoff_max=0.05, **kw)


def test_4xx_raises_at_once_with_status_and_detail(scripted):
    server = scripted([(404, {"detail": "Job 5 not found"}, {})])
    client = fast_client(server.url, retry_count=10)
    start = time.monotonic()
    with pytest.raises(APIError) as info:
        client.get("/jobs/5")
    assert time.monotonic() - start < 2
    assert len(server.requests) == 1
    assert info.value.status_code == 404 and info.value.detail == "Job 5 not found"
    assert "HTTP 404: Job 5 not found" in str(info.value)


def test_validation_detail_list_is_readable(scripted):
    detail = [{"loc": ["body", 0, "num_nodes"], "msg": "expected an integer"}]
    server = scripted([(422, {"detail": detail}, {})])
    with pytest.raises(APIError, match=r"0\.num_nodes: expected an integer"):
        fast_client(server.url).post("/jobs/", json=[{}])


def test_long_validation_detail_list_is_cut_in_the_message(scripted):
    # A bulk create of 1,000 bad jobs must not make a 60 kB error line; .detail keeps everything.
    detail = [{"loc": ["body", i, "transfers", "inp"], "msg": "required transfer slot is missing"} for i in range(1000)]
    server = scripted([(422, {"detail": detail}, {})])
    with pytest.raises(APIError) as info:
        fast_client(server.url).post("/jobs/", json=[{}])
    message = str(info.value)
    assert "0.transfers.inp: required transfer slot is missing" in message
    assert "9.transfers.inp" in message and "10.transfers.inp" not in message
    assert message.endswith("(+990 more)") and len(message) < 1000
    assert info.value.detail == detail


def test_5xx_and_429_are_retried_then_succeed(scripted):
    server = scripted([(503, {"detail": "busy"}, {}), (500, "oops", {}), (429, {}, {"Retry-After": "0"}),
                       (200, {"ok": True}, {})])
    assert fast_client(server.url, retry_count=5).get("/sites/") == {"ok": True}
    assert len(server.requests) == 4


def test_5xx_gives_up_after_retry_count(scripted):
    server = scripted([(502, {"detail": "bad gateway"}, {})] * 5)
    with pytest.raises(APIError) as info:
        fast_client(server.url, retry_count=2).get("/sites/")
    assert info.value.status_code == 502 and len(server.requests) == 3


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = fast_client(f"http://127.0.0.1:{port}", retry_count=3)
    with pytest.raises(ServerUnavailable, match="unreachable after 4 attempts"):
        client.get("/sites/")
    assert client.request_counts["GET /sites/"] == 4


def test_401_rereads_the_stored_login_once(scripted, tmp_path, monkeypatch):
    path = tmp_path / "client.yml"
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(path))
    server = scripted([(401, {"detail": "token expired"}, {}), (200, {"count": 0, "results": []}, {}),
                       (401, {"detail": "token expired"}, {})])
    ClientSettings(api_root=server.url, token="old").save()
    client = load_client()
    ClientSettings(api_root=server.url, token="new").save()  # e.g. `balsam login` in another shell
    assert client.get("/sites/") == {"count": 0, "results": []}
    assert [r[2] for r in server.requests] == ["Bearer old", "Bearer new"]
    with pytest.raises(AuthenticationError, match="run `balsam login`"):
        client.get("/sites/")  # same token on disk: no second retry
    assert len(server.requests) == 3


def test_delete_204_and_keep_alive(scripted):
    server = scripted([(204, None, {}), (200, {"id": 1}, {})])
    client = fast_client(server.url)
    assert client.delete("/jobs/1") is None
    assert client.get("/jobs/1") == {"id": 1}


def _child_request(client: RESTClient, queue: "multiprocessing.Queue") -> None:
    try:
        queue.put(client.get("/sites/"))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


def test_fresh_connection_pool_after_fork(balsam_env):
    from balsam.api import Site

    client = Site._get_client()
    assert client.get("/sites/")["count"] == 0
    parent_pool = client._http()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_request, args=(client, queue))
    proc.start()
    result = queue.get(timeout=60)
    proc.join(timeout=30)
    assert result == {"count": 0, "results": []}
    assert client._http() is parent_pool  # the parent keeps its own pool
    assert client.get("/sites/")["count"] == 0


def test_client_file_location_and_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("BALSAM_CLIENT_PATH", raising=False)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    assert client_path() == tmp_path / "home" / "client.yml"
    expiry = dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.timezone.utc)
    saved = ClientSettings(api_root="http://x:1", token="t", token_expiry=expiry, username="u").save()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    data = yaml.safe_load(saved.read_text())
    assert set(data) == {"api_root", "client_class", "token", "token_expiry", "username", "connect_timeout",
                         "read_timeout", "retry_count"}
    loaded = ClientSettings.load()
    assert loaded.token_expiry == expiry and loaded.retry_count == 10
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(tmp_path / "other.yml"))
    assert client_path() == tmp_path / "other.yml"
    with pytest.raises(NotLoggedIn, match=r"^Not logged in: run `balsam login` \(or `balsam server start`"):
        load_client()
    (tmp_path / "other.yml").write_text("api_root: [unclosed")
    with pytest.raises(Exception, match="other.yml: cannot read the stored login"):
        load_client()


def test_importing_balsam_api_needs_no_login(tmp_path):
    env = {**os.environ, "BALSAM_HOME": str(tmp_path / "nohome"), "BALSAM_CLIENT_PATH": str(tmp_path / "none.yml")}
    code = ("import balsam.api as api\n"
            "from balsam.api import Job\n"
            "try:\n    Job.objects.count()\nexcept Exception as e:\n    print(type(e).__name__ + ': ' + str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("NotLoggedIn: Not logged in: run `balsam login`")
    assert out.stderr == ""


def test_bound_models_use_their_own_client(balsam_env, live_server, tmp_path):
    from balsam.api import Site

    other = RESTClient(live_server)
    user = other.register("second-user-" + os.urandom(4).hex(), "pw-1234-long-enough")
    assert user["username"].startswith("second-user-")
    other.password_login(user["username"], "pw-1234-long-enough")
    assert other.whoami()["username"] == user["username"]
    other.Site.objects.create(name="theirs", path=str(tmp_path / "theirs"))
    assert [s.name for s in other.Site.objects.all()] == ["theirs"]
    assert Site.objects.count() == 0  # the default client is another user
    assert isinstance(other.Site.objects.first(), Site)
    assert other.Job.objects.count() == 0 and other.App is other.App


def test_a_post_that_timed_out_is_resent_with_the_same_idempotency_key(scripted):
    slow = (201, [{"id": 1}], {"X-Test-Delay": "1.0"})
    server = scripted([slow, (201, [{"id": 1}], {}), (201, [{"id": 2}], {}), (200, {"ok": 1}, {"X-Test-Delay": "1.0"}),
                       (200, {"ok": 2}, {})])
    client = fast_client(server.url, retry_count=3, read_timeout=0.3)
    # The server may have applied the first attempt: the resend carries the same key, so the server
    # answers it from its record instead of creating the jobs twice.
    assert client.post("/jobs/", json=[{}]) == [{"id": 1}]
    assert [r[0] for r in server.requests] == ["POST", "POST"]
    assert server.keys[0] and server.keys[0] == server.keys[1]
    assert client.post("/jobs/", json=[{}]) == [{"id": 2}]
    assert server.keys[2] not in (None, server.keys[0])  # a new call is a new request
    assert client.get("/sites/") == {"ok": 2}  # an idempotent GET is simply retried
    assert server.keys[3:] == [None, None]  # a GET carries no key


def test_updates_and_deletes_are_resent_with_the_same_idempotency_key(scripted):
    # A state change or a delete the server applied before its answer was lost is answered from its
    # record on the resend (no 409 "cannot change from JOB_FINISHED", no 404).
    server = scripted([(502, "bad gateway", {}), (200, 1, {}), (503, {}, {}), (200, 2, {}), (500, "x", {}),
                       (204, None, {})])
    client = fast_client(server.url, retry_count=3)
    assert client.put("/jobs/1", json={"state": "POSTPROCESSED"}) == 1
    assert client.patch("/jobs/", json=[{"id": 1, "state": "RUNNING"}]) == 2
    client.delete("/jobs/1")
    assert [r[0] for r in server.requests] == ["PUT", "PUT", "PATCH", "PATCH", "DELETE", "DELETE"]
    keys = server.keys
    assert all(keys) and keys[0] == keys[1] and keys[2] == keys[3] and keys[4] == keys[5]
    assert len({keys[0], keys[2], keys[4]}) == 3  # one key per call
