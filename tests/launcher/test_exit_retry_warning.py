"""The launcher's one WARNING for a server that does not answer (``_RetryNotice``) names the retry
budget of the call that failed. It read the client's setting (10 retries, "about 5 min") for every
call: the multi-rank note a serial launcher lists as it ends (waited for 5 s at most) and a
session's close (3 retries) said "5 min" too. The client now puts the call's own retry count on its
log record; the exit's note, best effort, does not retry at all (no WARNING, the launcher ends)."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from balsam.cli.launcher import _RetryNotice
from balsam.client import RESTClient, rest
from balsam.launcher.modes.serial import MULTI_RANK_NOTE_WAIT_SEC, SerialMode


def _closed_port() -> int:
    """A port nobody listens on: what a stopped server leaves."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stopped_server_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The launcher's login names a server that has stopped, with the client's default retries."""
    from balsam._api.model import reset_default_client

    api_root = f"http://127.0.0.1:{_closed_port()}"
    client = tmp_path / "client.yml"
    client.write_text(yaml.safe_dump({"api_root": api_root, "token": "t", "username": "u"}))
    client.chmod(0o600)
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(client))
    reset_default_client()
    yield api_root
    reset_default_client()


@pytest.fixture
def notice():
    notice = _RetryNotice()
    rest.logger.addFilter(notice)
    yield notice
    rest.logger.removeFilter(notice)


def ended_serial_mode() -> SerialMode:
    """A serial mode whose run ended normally, idle with time left: what ``run`` then does is the
    exit's listing (the workers' part, ``_run``, is not what this test is about)."""
    mode = SerialMode.__new__(SerialMode)
    mode.context = SimpleNamespace(site_id=7, filter_tags={}, batch_job_id=None)
    mode.stop = SimpleNamespace(requested=False)
    mode.countdown = SimpleNamespace(remaining_sec=lambda: 10 * MULTI_RANK_NOTE_WAIT_SEC)
    mode._run = lambda: 0
    return mode


def test_the_exit_note_against_a_stopped_server_prints_no_retry_budget(stopped_server_login, notice, caplog) -> None:
    caplog.set_level(logging.INFO, logger=rest.logger.name)
    assert ended_serial_mode().run() == 0
    retries = [r.getMessage() for r in caplog.records if r.name == rest.logger.name and "retrying" in r.getMessage()]
    assert retries == []


def test_the_warning_names_the_calls_own_retries(stopped_server_login, notice, caplog) -> None:
    """A call with a retry count of its own (a session's close: 3) names that budget, in seconds
    when it is short; the others the client's."""
    client = RESTClient(stopped_server_login, "t", retry_count=10, backoff_base=0.01, backoff_max=0.01)
    caplog.set_level(logging.INFO, logger=rest.logger.name)
    with pytest.raises(Exception):
        client.get("/jobs/", retry_count=3)
    with pytest.raises(Exception):
        client.get("/jobs/", retry_count=1)
    warnings = [r.getMessage() for r in caplog.records if r.name == rest.logger.name and r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert re.search(r"retrying up to 3 times over up to about \d+ s before", warnings[0]), warnings[0]
    assert re.search(r"retrying up to 1 time over up to about \d+ s before", warnings[1]), warnings[1]


def test_a_long_budget_is_said_in_minutes(notice) -> None:
    record = logging.LogRecord(rest.logger.name, logging.WARNING, __file__, 1, "%s %s: %s; retrying in %.1f s",
                               ("GET", "/jobs/", "ConnectError", 0.5), None)
    record.attempt, record.retries = 1, 10
    assert notice.filter(record)
    assert "retrying up to 10 times over up to about 5 min" in record.getMessage(), record.getMessage()
