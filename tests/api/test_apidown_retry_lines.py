"""The Python API against a server that is down (`Site.objects.get(...)` in a notebook or a script,
the embedded server stopped): its retry lines said only "GET /sites/: LocalTransportError; retrying
in 35.9 s", eleven times over 167 s, naming neither the server's address nor what to check. The
first retry line of a call now says both, the later ones the attempt and the time left; a call gives
up on a server it cannot connect to after ``connect_wait`` seconds (30 s by default in an
interactive session only: launchers, agents and scripts keep the retries that ride out a restart).

Waits are scaled down with the client's own backoff parameters; nothing here asserts a duration."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import balsam.client.rest as rest
from balsam.cli.launcher import _RetryNotice
from balsam.client import ClientSettingsError, RESTClient, ServerUnavailable

REST_LOGGER = "balsam.client.rest"
ENV = "BALSAM_CLIENT_CONNECT_WAIT_SEC"


@pytest.fixture(params=["removed", "left"])
def stopped_socket(request, tmp_path: Path) -> str:
    """The embedded server's address after `balsam server stop`: a Unix socket path in a private
    directory that nothing listens on, its file removed (what `balsam server stop` leaves: "No such
    file or directory") or left behind (a server killed: "Connection refused")."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    path = run / "balsam.sock"
    if request.param == "left":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    return f"unix://{path}"


@pytest.fixture(autouse=True)
def _no_connect_wait_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def _fast(api_root: str, **kw) -> RESTClient:
    """A client whose backoff is a few ms (its own parameters), the rest as a user's."""
    return RESTClient(api_root, "token", backoff_base=0.001, backoff_max=0.004, **kw)


def _retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == REST_LOGGER and "retrying in" in r.getMessage()]


def test_the_first_retry_line_names_the_server_and_what_to_check_later_ones_count_down(stopped_socket, caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    client = _fast(stopped_socket, retry_count=3)
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    lines = _retry_lines(caplog)
    assert len(lines) == 3, lines
    first, *later = lines
    assert first.startswith("GET /sites/: LocalTransportError; retrying in "), first
    assert f"the Balsam server at {stopped_socket} cannot be reached" in first, first
    assert ("Connection refused" if os.path.exists(stopped_socket[len("unix://"):]) else "No such file") in first, first
    assert "`balsam server status`" in first and "`balsam server start`" in first, first
    assert "attempt 1 of up to 4" in first and "giving up in about" in first, first
    for number, line in enumerate(later, 2):  # brief: no wall of repeated addresses and advice
        assert f"(attempt {number} of up to 4, giving up in about " in line, line
        assert stopped_socket not in line and "balsam server" not in line, line
    # The final error: one line with the address and the command to check.
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"GET {stopped_socket}/sites/: server unreachable after 4 attempts"), message
    assert message.endswith("(is it running? `balsam server status`)"), message


def test_a_remote_servers_first_retry_line_names_its_url_and_the_network_not_the_embedded_server(caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    url = "https://balsam.invalid"  # a name no DNS resolves (RFC 6761)
    with pytest.raises(ServerUnavailable):
        _fast(url, retry_count=1, connect_timeout=2.0).get("/sites/")
    [first] = _retry_lines(caplog)
    assert f"the Balsam server at {url} cannot be reached" in first, first
    assert "DNS, proxy, VPN" in first and "balsam server status" not in first, first


def test_the_retry_records_keep_what_the_launchers_log_filter_reads(stopped_socket, caplog):
    """balsam.cli.launcher rewrites a call's first retry line for its log from the record's four
    arguments and the text before "; retrying in": it must still find them (and no local-server
    advice, which misleads on a compute node, in what it keeps)."""
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    with pytest.raises(ServerUnavailable):
        _fast(stopped_socket, retry_count=2).get("/sites/")
    records = [r for r in caplog.records if r.name == REST_LOGGER and "retrying in" in r.getMessage()]
    assert [r.attempt for r in records] == [1, 2]
    assert all(len(r.args) == 4 and r.args[:3] == ("GET", "/sites/", "LocalTransportError") for r in records)
    first = records[0]
    assert _RetryNotice().filter(first)
    said = first.getMessage()
    assert said.startswith("GET /sites/: LocalTransportError from the Balsam server at "), said
    assert "balsam server start" not in said, said
    assert _RetryNotice().filter(records[1]) and records[1].levelno == logging.INFO


def test_connect_wait_ends_a_call_to_a_server_it_cannot_connect_to(stopped_socket):
    client = _fast(stopped_socket, retry_count=1000, connect_wait=0.05)
    with pytest.raises(ServerUnavailable) as err:
        client.get("/sites/")
    assert client.request_counts["GET /sites/"] < 1001
    assert "(the client's connect_wait of 0.05 s)" in str(err.value), err.value
    assert str(err.value).endswith("(is it running? `balsam server status`)"), err.value


def test_connect_wait_0_gives_up_at_the_first_failed_connection(stopped_socket, caplog):
    caplog.set_level(logging.WARNING, logger=REST_LOGGER)
    client = _fast(stopped_socket, retry_count=10, connect_wait=0)
    with pytest.raises(ServerUnavailable, match="server unreachable after 1 attempt"):
        client.get("/sites/")
    assert client.request_counts["GET /sites/"] == 1 and _retry_lines(caplog) == []


def test_the_env_var_sets_the_connect_wait_and_a_bad_value_is_refused_in_one_line(stopped_socket, monkeypatch):
    monkeypatch.setenv(ENV, "0")
    client = _fast(stopped_socket, retry_count=10)
    assert client.connect_wait == 0
    with pytest.raises(ServerUnavailable):
        client.get("/sites/")
    assert client.request_counts["GET /sites/"] == 1
    monkeypatch.setenv(ENV, "inf")
    assert _fast(stopped_socket).connect_wait == math.inf
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ClientSettingsError) as err:
            RESTClient(stopped_socket, "token")
        message = str(err.value)
        assert message.startswith(f"environment variable {ENV}={bad!r} is not a number from 0") and "\n" not in message
    with pytest.raises(ClientSettingsError, match=r"^connect_wait=-2 is not a number from 0 "):
        RESTClient(stopped_socket, "token", connect_wait=-2)


def test_only_an_interactive_session_gets_the_short_connect_wait(monkeypatch):
    """A launcher's and an agent's client come from the stored login (get_default_client ->
    load_client; the agent's load_site_client -> load_client) in processes with no prompt: they keep
    the retries alone. A Python prompt gets 30 s."""
    monkeypatch.delattr(sys, "ps1", raising=False)
    assert not rest.interactive_session()
    assert RESTClient("unix:///nowhere/balsam.sock").connect_wait == math.inf
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert rest.interactive_session()
    assert RESTClient("unix:///nowhere/balsam.sock").connect_wait == rest.INTERACTIVE_SESSION_CONNECT_WAIT_S
    monkeypatch.setenv(ENV, "600")
    assert RESTClient("unix:///nowhere/balsam.sock").connect_wait == 600


def test_a_real_python_prompt_and_a_script_get_their_own_defaults(tmp_path):
    code = "import balsam.client as c; print('wait', c.RESTClient('unix:///nowhere/balsam.sock').connect_wait)\n"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    prompt = subprocess.run([sys.executable, "-q", "-i"], input=code, capture_output=True, text=True, env=env,
                            timeout=120)
    script = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "wait 30.0" in prompt.stdout, (prompt.stdout, prompt.stderr)
    assert "wait inf" in script.stdout, (script.stdout, script.stderr)
