"""An interactive client (the CLI's short commands) tells the user of a long wait and caps it; a
launcher's or agent's client stays silent. The hint of an unreachable server fits the server: the
embedded server's `balsam server status` only for its own addresses."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from balsam.client import RESTClient, ServerUnavailable
import balsam.client.rest as rest


class HungListener:
    """Accepts TCP connections and never answers (a hung or overloaded server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def hung():
    listener = HungListener()
    yield listener
    listener.close()


@pytest.fixture
def interactive(monkeypatch):
    """The CLI's interactive mode, with waits scaled down to a test's (reports from 0.2 s, 1.5 s in all)."""
    monkeypatch.setattr(rest, "WAIT_REPORT_FIRST_S", 0.2, raising=False)
    monkeypatch.setattr(rest, "INTERACTIVE_MAX_WAIT_S", 1.5, raising=False)
    rest.cap_retries_for_interactive_use(3)
    yield
    rest.cap_retries_for_interactive_use(None)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_interactive_call_to_a_hung_server_reports_its_wait_and_gives_up_in_time(hung, interactive, capsys):
    client = RESTClient(hung.url, "token", read_timeout=0.5, retry_count=3)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    took = time.monotonic() - started
    lines = capsys.readouterr().err.strip().splitlines()
    # Before: four silent read timeouts and their backoff (5.5 s here; 8 minutes at the defaults).
    # Now: the reports, and no retry once the call has waited 1.5 s (INTERACTIVE_MAX_WAIT_S).
    assert took < 3.0, (took, lines)
    waiting = [line for line in lines if line.startswith("still waiting for ")]
    assert waiting[0] == f"still waiting for {hung.url}/sites/ after 0.2 s (Ctrl-C to stop)", lines
    assert waiting[1] == f"still waiting for {hung.url}/sites/ after 0.4 s (Ctrl-C to stop)", lines  # growing intervals
    assert "gave up after 1.5 s" in str(err.value)
    assert "balsam server status" not in str(err.value)  # it answered the connection: not a "down" hint


def test_a_launcher_or_agent_client_says_nothing_on_stderr(hung, capsys):
    rest.cap_retries_for_interactive_use(None)  # as in a launcher or agent process
    client = RESTClient(hung.url, "token", read_timeout=0.6, retry_count=0)
    assert getattr(client, "report_waits_after", None) is None and getattr(client, "max_call_wait", None) is None
    with pytest.raises(ServerUnavailable):
        client.get("/sites/")
    assert capsys.readouterr().err == ""


def test_login_to_a_hung_server_says_it_is_waiting(hung, interactive, tmp_path, monkeypatch):
    """`balsam login -u <hung URL>` was silent for 6 minutes (2 retries of 120 s)."""
    from click.testing import CliRunner

    from balsam.cli import main

    monkeypatch.setenv("BALSAM_HOME", str(tmp_path))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(tmp_path / "client.yml"))
    # The user gives up after a while: the server's connections are dropped and it goes away.
    threading.Timer(1.0, hung.close).start()
    result = CliRunner().invoke(main, ["login", "-u", hung.url, "--username", "u", "--password-stdin"], input="pw\n")
    assert result.exit_code == 1, result.output
    assert f"still waiting for {hung.url}/auth/how after 0.2 s (Ctrl-C to stop)" in result.stderr


def test_a_remote_server_gets_no_embedded_server_hint():
    client = RESTClient("https://balsam.nonexistent.invalid", "token", retry_count=0)
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    message = str(err.value)
    assert "balsam server status" not in message, message
    assert message.endswith("(check the server URL and this machine's network: DNS, proxy, VPN; "
                            "another server: `balsam login -u URL`)"), message


def test_the_embedded_server_keeps_its_hint_and_another_local_port_gets_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path))
    embedded, other = _closed_port(), _closed_port()
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "server.json").write_text(json.dumps({"url": f"http://127.0.0.1:{embedded}"}))
    for url in (f"http://127.0.0.1:{embedded}", "http://127.0.0.1:8765"):
        with pytest.raises(ServerUnavailable) as err:
            RESTClient(url, "token", retry_count=0).get("/sites/")
        assert str(err.value).endswith("(is it running? `balsam server status`)"), str(err.value)
    with pytest.raises(ServerUnavailable) as err:
        RESTClient(f"http://127.0.0.1:{other}", "token", retry_count=0).get("/sites/")
    assert str(err.value).endswith(f"(is it running? `balsam server status` checks the embedded server; for an SSH "
                                   f"tunnel or another server at 127.0.0.1:{other}, check that it is up)"), str(err.value)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with pytest.raises(ServerUnavailable) as err:  # the embedded server's socket, not listening
        RESTClient(f"unix://{run / 'balsam.sock'}", "token", retry_count=0).get("/sites/")
    assert str(err.value).endswith("(is it running? `balsam server status`)"), str(err.value)


class SlowWriteServer:
    """An HTTP server whose first DELETE takes its time (a query delete of many jobs): it answers
    once ``release`` is set; later requests (a replay with the same Idempotency-Key) at once."""

    def __init__(self) -> None:
        import http.server

        self.release = threading.Event()
        self.keys: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:
                outer.keys.append(self.headers.get("Idempotency-Key"))
                if len(outer.keys) == 1:
                    outer.release.wait(30)
                body = b'{"deleted": 1000000}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_an_interactive_write_without_an_answer_says_the_server_may_still_carry_it_out(interactive):
    """A query delete the server needs longer than the interactive wait for: the CLI said "server
    unreachable" while the server went on and deleted the jobs. The request reached it: the
    message says so, and what to check before running the command again."""
    slow = SlowWriteServer()
    try:
        client = RESTClient(slow.url, "token", read_timeout=1.0, retry_count=3)
        with pytest.raises(ServerUnavailable) as err:
            client.delete("/jobs/", params={"tags": "exp:big"})
    finally:
        slow.close()
    message = str(err.value)
    assert "unreachable" not in message, message
    assert message.startswith(f"DELETE {slow.url}/jobs/: no answer within "), message
    assert "the request reached the server, which may still be carrying it out" in message, message
    assert "check with `balsam job ls` whether it took effect before running the command again" in message, message
    assert "balsam server status" not in message, message


def test_a_write_that_never_reached_the_server_is_still_unreachable(interactive):
    with pytest.raises(ServerUnavailable) as err:
        RESTClient(f"http://127.0.0.1:{_closed_port()}", "token", retry_count=0).delete("/jobs/", params={"tags": "x:y"})
    assert "server unreachable after 1 attempt" in str(err.value), str(err.value)
