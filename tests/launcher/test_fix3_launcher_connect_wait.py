"""`balsam launcher` / `python -m balsam.launcher` with a bad $BALSAM_CLIENT_CONNECT_WAIT_SEC (or a
login without api_root) printed a traceback: the client's ClientSettingsError escaped the command,
which mapped only its own and the server's errors to one line. With the variable set, the launcher
says at its start that an outage longer than the wait ends it (its retry budget said ~5 min)."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

import balsam.launcher.entry as entry
from balsam.cli.launcher import launcher_command
from balsam.client import RESTClient
from balsam.client.settings import ClientSettings

ENV = "BALSAM_CLIENT_CONNECT_WAIT_SEC"


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("BALSAM_CLI_TRACEBACK", raising=False)


def _makes_a_client(*args, **kwargs) -> int:
    RESTClient("unix:///nowhere/balsam.sock", "token")  # what the launcher's lease does first
    return 0


def test_a_bad_connect_wait_ends_the_launcher_with_one_error_line(monkeypatch):
    monkeypatch.setattr(entry, "run_launcher", _makes_a_client)
    monkeypatch.setenv(ENV, "soon")
    result = CliRunner().invoke(launcher_command, ["-j", "mpi", "-t", "1"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: environment variable {ENV}='soon' is not a number from 0 (digits with an optional decimal "
                     "point, e.g. 30 or 0.5, or inf for the client's retries alone): how long an API call retries a "
                     "server it cannot connect to"], result.output


def test_a_login_without_api_root_ends_the_launcher_with_one_error_line(monkeypatch, tmp_path):
    path = tmp_path / "client.yml"
    path.write_text("token: abc\n")
    monkeypatch.setattr(entry, "run_launcher", lambda *a, **k: ClientSettings.load(path) and 0)
    result = CliRunner().invoke(launcher_command, ["-j", "mpi", "-t", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: {path}: the stored login has no api_root; run `balsam login` again"


def test_the_launcher_says_at_its_start_that_the_variable_ends_it_on_a_longer_outage(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="balsam.launcher")
    monkeypatch.setattr(entry, "run_launcher", lambda *a, **k: 0)
    monkeypatch.setenv(ENV, "120")
    result = CliRunner().invoke(launcher_command, ["-j", "mpi", "-t", "1"])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if r.name == "balsam.launcher"]
    assert said == [f"${ENV}=120: server outages longer than 2 min end this launcher (unset it in the batch "
                    "job's environment to ride them out)"], said
    caplog.clear()
    monkeypatch.delenv(ENV)
    assert CliRunner().invoke(launcher_command, ["-j", "mpi", "-t", "1"]).exit_code == 0
    assert not [r for r in caplog.records if r.name == "balsam.launcher"]
