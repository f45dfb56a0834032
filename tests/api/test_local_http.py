"""The client's connection pool for servers on this machine (balsam.client.local_http): the same
URLs as httpx, idle connections the server closed replaced without an error, timeouts and refused
connections reported as retryable transport errors, many threads on one pool, and a client process
of a local server that never imports httpx."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qsl

import httpx
import pytest

from balsam.client import RESTClient, ServerUnavailable
from balsam.client.local_http import LocalHTTPPool, LocalTransportError, encode_query
from balsam.client.transport import local_pool_args


@pytest.mark.parametrize("params", [
    {"tags": ["a:1", "b:x y"], "limit": 5000, "offset": 0},
    {"state": ("RUN_DONE", "FAILED"), "flag": True, "off": False, "none": None},
    {"name": "ünïcode/&=?#+%", "id": [1, 2, 3]},
    {"empty": []},
])
def test_query_strings_carry_what_httpx_sends(params):
    ours = parse_qsl(encode_query(params), keep_blank_values=True)
    theirs = parse_qsl(str(httpx.QueryParams({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})),
                       keep_blank_values=True)
    assert ours == theirs


def test_local_addresses_take_the_pool_and_remote_ones_do_not(tmp_path):
    assert local_pool_args("http://127.0.0.1:8000") == {"host": "127.0.0.1", "port": 8000, "base_path": ""}
    assert local_pool_args("http://localhost:9/prefix")["base_path"] == "/prefix"
    assert local_pool_args("http://[::1]:7")["host"] == "::1"
    assert local_pool_args("https://127.0.0.1:8000") is None  # TLS: httpx
    assert local_pool_args("http://balsam.example.org:8000") is None  # not this machine: httpx
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    assert local_pool_args(f"unix://{private}/balsam.sock")["unix_path"] == f"{private}/balsam.sock"


class KeepAliveServer:
    """A real socket server speaking just enough HTTP/1.1: answers each request on a connection
    with ``{"n": <request number>}``, keeps the connection open, and closes it ``close_after`` s
    after an answer (as uvicorn closes idle keep-alive connections). ``hang`` answers nothing."""

    def __init__(self, close_after: float = 30.0, hang: bool = False) -> None:
        self.close_after = close_after
        self.hang = hang
        self.count = 0
        self.connections = 0
        self.closed = 0  # connections this server has closed
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        finally:
            with self._lock:
                self.closed += 1

    def _answer(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(self.close_after)
        with conn:
            while True:
                try:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                except OSError:  # idle for close_after: close, as a server does
                    return
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                if self.hang:
                    time.sleep(5)
                    return
                with self._lock:
                    self.count += 1
                    body = b'{"n": %d}' % self.count
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))

    def close(self) -> None:
        self.sock.close()


def test_an_idle_connection_the_server_closed_is_replaced_without_an_error():
    server = KeepAliveServer(close_after=0.2)
    try:
        pool = LocalHTTPPool(host="127.0.0.1", port=server.port)
        assert pool.request("GET", "/a").json() == {"n": 1}
        # The server closes the idle connection after 0.2 s: waited for (a fixed 1 s sleep stood
        # in, and on a loaded host the server's thread could close it later, or as the request left).
        deadline = time.monotonic() + 60
        while server.closed < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.closed == 1
        assert pool.request("GET", "/b").json() == {"n": 2}  # no error: a new connection
        assert server.connections == 2
        pool.close()
    finally:
        server.close()


def test_no_answer_within_the_read_timeout_is_a_retryable_timeout():
    server = KeepAliveServer(hang=True)
    try:
        pool = LocalHTTPPool(host="127.0.0.1", port=server.port, read_timeout=0.3)
        with pytest.raises(LocalTransportError) as err:
            pool.request("POST", "/jobs/", content=b"[]")
        assert err.value.timed_out and not err.value.connect_failed
        assert isinstance(err.value, ConnectionError)
    finally:
        server.close()


def test_a_refused_connection_says_nothing_was_sent_and_the_client_hints_at_the_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(LocalTransportError) as err:
        LocalHTTPPool(host="127.0.0.1", port=port).request("GET", "/sites/")
    assert err.value.connect_failed
    client = RESTClient(f"http://127.0.0.1:{port}", "token", retry_count=1, backoff_base=0.01)
    with pytest.raises(ServerUnavailable, match=r"after 2 attempts.*is it running\?"):
        client.get("/sites/")


def test_many_threads_share_one_pool():
    server = KeepAliveServer()
    try:
        pool = LocalHTTPPool(host="127.0.0.1", port=server.port)
        seen: list[int] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(40):
                    seen.append(pool.request("PATCH", "/jobs/", content=b"[]").json()["n"])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert sorted(seen) == list(range(1, 321))  # every request answered once
        assert server.connections <= 8  # connections reused, not one per request
        pool.close()
    finally:
        server.close()


def test_a_client_of_a_local_server_never_imports_httpx(balsam_env):
    """The launcher's and the CLI's process: the whole API against the live (loopback) server."""
    code = (
        "import sys, balsam.api, balsam.launcher.entry\n"
        "from balsam.api import Site\n"
        "Site.objects.create(name='no-httpx', path='/tmp/no-httpx')\n"
        "assert [s.name for s in Site.objects.filter(name='no-httpx')] == ['no-httpx']\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'httpcore', 'h11', 'anyio')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_importing_the_api_leaves_the_http_tls_and_yaml_stacks_to_first_use(tmp_path):
    """A Python run() job imports balsam.api with the user's module and may never call the server:
    http.client (with ssl and email), hashlib and yaml are imported when a connection is opened,
    a certificate checked or client.yml read, not with the API (~20 ms of each job's start-up).
    Then the same process reaches a server through a client.yml, which imports them."""
    code = (
        "import sys\n"
        "import balsam.api\n"
        "from balsam._api import python_runner\n"
        "lazy = ('http.client', 'ssl', 'email.parser', 'hashlib', 'yaml', 'httpx')\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
        "import balsam.client, balsam.client.transport\n"
        "assert len(balsam.client.transport.normalize_fingerprint('ab' * 32)) == 95\n"
        "balsam.client.ClientSettings(api_root='http://127.0.0.1:9', token='t', retry_count=0).save(sys.argv[1])\n"
        "client = balsam.client.load_client(sys.argv[1])\n"
        "try:\n"
        "    client.get('/sites/')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "print(sorted(m for m in ('http.client', 'yaml') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "client.yml")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.split()
    assert first == "[]"
    assert rest[-2:] == ["['http.client',", "'yaml']"]

def test_a_loopback_server_is_reached_directly_whatever_the_proxy_variables_say(balsam_env, monkeypatch):
    """HPC nodes often set http_proxy; a request to this machine must not go to the proxy (httpx,
    the client before, sent loopback requests there unless no_proxy listed them)."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = RESTClient(balsam_env.url, balsam_env.token, retry_count=0)
    assert client.get("/sites/")["count"] == 0
