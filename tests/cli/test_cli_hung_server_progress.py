"""`balsam job ls` against a server that accepts connections and never answers: progress on stderr
and an answer within the interactive wait (it was silent for 4 read timeouts: 8 minutes)."""

from __future__ import annotations

import socket
import time

import pytest
import yaml
from click.testing import CliRunner


def test_job_ls_against_a_hung_server_reports_the_wait_and_gives_up(tmp_path, monkeypatch):
    import balsam.client.rest as rest
    from balsam._api.model import reset_default_client
    from balsam.cli import main

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel accepts the connections; nobody ever answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    (tmp_path / "client.yml").write_text(yaml.safe_dump(
        {"api_root": url, "token": "t", "username": "u", "read_timeout": 0.5, "retry_count": 10}))
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(tmp_path / "client.yml"))
    monkeypatch.setattr(rest, "WAIT_REPORT_FIRST_S", 0.2, raising=False)  # 10 s in use
    monkeypatch.setattr(rest, "INTERACTIVE_MAX_WAIT_S", 1.5, raising=False)  # 120 s in use
    reset_default_client()
    try:
        started = time.monotonic()
        result = CliRunner().invoke(main, ["job", "ls"])
        took = time.monotonic() - started
    finally:
        listener.close()
        reset_default_client()
    assert result.exit_code == 1, result.output
    # Before: 4 silent read timeouts with backoff between them (5.5 s here).
    assert took < 3.0, (took, result.stderr)
    assert f"still waiting for {url}/sites/ after 0.2 s (Ctrl-C to stop)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: GET {url}/sites/: server unreachable after ") and "gave up after 1.5 s" in last, last
