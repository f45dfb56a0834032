"""Review findings on the Python API's retry lines and connect wait (8ce37fb): a connect timeout is
a failed connect (it was "did not answer", unbounded by the wait); a failed TLS handshake is not
(it got network advice and was cut by the wait); no password of the server URL in a message; the
wait's source is the one recorded when the client was made; IPython running a script is no prompt;
launchers' and agents' clients keep the retries alone.

Waits are scaled down with the client's own parameters; nothing here asserts a duration."""

from __future__ import annotations

import logging
import math
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

import balsam.client.rest as rest
from balsam.cli.launcher import _RetryNotice
from balsam.client import ClientSettingsError, RESTClient, ServerUnavailable

REST_LOGGER = "balsam.client.rest"
ENV = "BALSAM_CLIENT_CONNECT_WAIT_SEC"


@pytest.fixture(autouse=True)
def _no_connect_wait_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def _retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == REST_LOGGER and "retrying in" in r.getMessage()]


@pytest.fixture
def full_listen_queue():
    """A TCP port whose listen queue (backlog 0) is full: the kernel drops further SYNs, as a
    firewall or a host off the VPN does, and a connect times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(sock)
    yield port
    for sock in fillers:
        sock.close()
    server.close()


@pytest.mark.parametrize("scheme", ["https", "http"])  # httpx's ConnectTimeout; the local pool's
def test_a_connect_timeout_is_a_failed_connect_bounded_by_the_connect_wait(full_listen_queue, scheme, caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    url = f"{scheme}://127.0.0.1:{full_listen_queue}"
    client = RESTClient(url, "token", connect_timeout=0.05, retry_count=1000, backoff_base=0.001,
                        backoff_max=0.004, connect_wait=0.3, allow_insecure_http=True)
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    assert client.request_counts["GET /sites/"] < 1001  # the connect wait ended it, not the retries
    first = _retry_lines(caplog)[0]
    assert f"the Balsam server at {url} cannot be reached: connect timed out" in first, first
    message = str(err.value)
    assert "(the client's connect_wait of 0.3 s)" in message and "connect timed out" in message, message
    assert message.endswith(("check that it is up)", "another server: `balsam login -u URL`)")), message


@pytest.fixture
def plain_http_server():
    """A TCP server answering plain HTTP: an https URL to it fails in the TLS handshake."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
    server.close()
    thread.join(timeout=5)


def test_a_failed_tls_handshake_is_not_cut_by_the_connect_wait_and_has_its_own_hint(plain_http_server, caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    port, accepted = plain_http_server
    url = f"https://127.0.0.1:{port}"
    client = RESTClient(url, "token", retry_count=2, backoff_base=0.001, backoff_max=0.004, connect_wait=0)
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    assert client.request_counts["GET /sites/"] == 3 and len(accepted) == 3  # the host answered each time
    first = _retry_lines(caplog)[0]
    assert f"the Balsam server at {url} TLS handshake failed" in first, first
    for said in (first, str(err.value)):
        assert "(TLS handshake failed: check the server's certificate" in said and "DNS" not in said, said


def test_no_password_or_query_of_the_server_url_in_a_retry_line_or_the_error(caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    client = RESTClient("https://alice:S3cretPW@balsam.invalid/api?token=T0ken", "token", retry_count=1,
                        backoff_base=0.001, backoff_max=0.004, connect_timeout=2.0)
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    said = _retry_lines(caplog) + [str(err.value), repr(client)]
    assert "the Balsam server at https://balsam.invalid/api cannot be reached" in said[0], said
    for line in said:
        assert "S3cretPW" not in line and "alice" not in line and "T0ken" not in line, line
    assert rest.shown_address("http://u:p@[::1]:8765/x?a=1") == "http://[::1]:8765/x"
    assert rest.shown_address("unix:///run/balsam.sock") == "unix:///run/balsam.sock"


def _stopped_socket(tmp_path: Path) -> str:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return f"unix://{run / 'balsam.sock'}"


def test_the_connect_wait_is_blamed_on_its_source_when_the_client_was_made(tmp_path, monkeypatch):
    url = _stopped_socket(tmp_path)
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    prompt = RESTClient(url, "token", retry_count=1000, backoff_base=0.001, backoff_max=0.004)
    prompt.connect_wait = 0.05  # stands for the 30 s the client took (the source stays recorded)
    prompt._connect_wait_origin = ("interactive", 0.05)
    monkeypatch.setenv(ENV, "300")  # set after the client was made: it changes nothing
    with pytest.raises(ServerUnavailable) as err:
        prompt.get("/sites/")
    assert "the connect wait of an interactive session, 0.05 s" in str(err.value), err.value
    assert "set before the first call" in str(err.value), err.value
    monkeypatch.setenv(ENV, "0.05")
    from_env = RESTClient(url, "token", retry_count=1000, backoff_base=0.001, backoff_max=0.004)
    monkeypatch.delenv(ENV)  # unset since: the wait still came from it
    with pytest.raises(ServerUnavailable, match=r"\(the connect wait of 0.05 s set by \$BALSAM_CLIENT_CONNECT_WAIT"):
        from_env.get("/sites/")
    from_env.connect_wait = 0  # assigned: the client's own
    with pytest.raises(ServerUnavailable, match=r"server unreachable after 1 attempt"):
        from_env.get("/sites/")


def _ipython(monkeypatch, shell) -> None:
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", module)
    monkeypatch.setattr(sys, "ps1", "In : ", raising=False)  # IPython sets it for scripts too


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_script_that_ipython_runs_is_no_interactive_session(monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Tty(True))
    _ipython(monkeypatch, types.SimpleNamespace(parent=types.SimpleNamespace(interact=False)))  # ipython x.py
    assert not rest.interactive_session()
    assert RESTClient("unix:///nowhere/balsam.sock").connect_wait == math.inf
    _ipython(monkeypatch, types.SimpleNamespace(parent=types.SimpleNamespace(interact=True)))  # the prompt
    assert rest.interactive_session()
    monkeypatch.setattr(sys, "stdin", _Tty(False))  # its input a pipe or a file: not a person
    assert not rest.interactive_session()
    _ipython(monkeypatch, types.SimpleNamespace(kernel=object()))  # a Jupyter kernel: no tty, a person
    assert rest.interactive_session()


def test_launchers_and_agents_make_their_clients_without_the_interactive_wait(monkeypatch):
    from balsam.client.default import set_default_client
    from balsam.launcher import service_calls
    from balsam.site.service_client import load_site_client

    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # a launcher taken for a prompt (IPython)
    made = RESTClient("unix:///nowhere/balsam.sock")
    assert made.connect_wait == rest.INTERACTIVE_SESSION_CONNECT_WAIT_S
    set_default_client(made)
    try:
        assert service_calls.default_client() is made and made.connect_wait == math.inf
    finally:
        set_default_client(None)
    site = types.SimpleNamespace(client=lambda: RESTClient("unix:///nowhere/balsam.sock"))
    assert load_site_client(site).connect_wait == math.inf
    monkeypatch.setenv(ENV, "45")  # asked for: kept
    assert load_site_client(site).connect_wait == 45
    assert load_site_client(types.SimpleNamespace(client=RESTClient("unix:///x/b.sock", connect_wait=5))).connect_wait == 5


def test_a_bad_connect_wait_is_logged_by_the_agent(monkeypatch, caplog):
    from balsam.site.service_client import load_site_client

    caplog.set_level(logging.ERROR, logger="balsam.site.agent")
    monkeypatch.setattr("balsam.client.load_client", lambda: RESTClient("unix:///x/b.sock"))
    monkeypatch.setenv(ENV, "soon")
    with pytest.raises(ClientSettingsError):
        load_site_client(None)
    [record] = [r for r in caplog.records if r.name == "balsam.site.agent"]
    assert f"environment variable {ENV}='soon' is not a number from 0" in record.getMessage()


def test_the_launchers_first_warning_promises_the_connect_wait_when_it_is_shorter(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    client = RESTClient(_stopped_socket(tmp_path), "token", retry_count=1000, backoff_base=0.001,
                        backoff_max=0.004, connect_wait=0.05)
    with pytest.raises(ServerUnavailable):
        client.get("/sites/")
    first = next(r for r in caplog.records if r.name == REST_LOGGER and "retrying in" in r.getMessage())
    assert _RetryNotice().filter(first)
    said = first.getMessage()
    assert "retrying for up to 1 s before giving up ($BALSAM_CLIENT_CONNECT_WAIT_SEC" in said, said
    assert "1000 times" not in said, said


def test_nits_the_time_left_rounds_up_and_a_bool_is_no_connect_wait():
    assert rest._span(0.2) == "1 s" and rest._span(0) == "0 s" and rest._span(100) == "1.7 min"
    for bad in (True, False):
        with pytest.raises(ClientSettingsError, match=r"^connect_wait=(True|False) is not a number from 0 "):
            RESTClient("unix:///x/b.sock", connect_wait=bad)


def test_a_huge_retry_count_neither_overflows_nor_loops_over_every_retry() -> None:
    """2**attempt as a float overflowed past ~1,024 tries (OverflowError in the backoff), and the
    time left summed every remaining try (a million-iteration loop per retry line)."""
    from balsam.client.rest import RESTClient, _span

    client = RESTClient("http://127.0.0.1:9", "token", backoff_base=0.5, backoff_max=30.0)
    assert client._backoff_step(5000) == 30.0
    assert 30.0 <= client._backoff(5000) <= 37.5
    # Every step after attempt 2,000 is at backoff_max, with the mean jitter (an eighth).
    huge = 30.0 + 1.125 * 30.0 * (1_000_000 - 2001)
    assert client._retry_progress(2000, 1_000_000, 30.0, None) == (
        f" (attempt 2001 of up to 1000001, giving up in about {_span(huge)})")
    # A small count sums its steps one by one, as before.
    small = 2.0 + 1.125 * sum(min(30.0, 0.5 * 2 ** k) for k in range(3, 10))
    assert client._retry_progress(2, 10, 2.0, None) == f" (attempt 3 of up to 11, giving up in about {_span(small)})"
