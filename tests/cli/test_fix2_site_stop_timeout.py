"""`balsam site stop` (without -t) and `balsam site sync` wait as long as the agent's stop may take:
the stop wait it recorded in its pid file at its start ($BALSAM_AGENT_STOP_WAIT_SEC, 0-3600 s),
its stopping hook's limit (20 s) and its modules' close (10 s), at least 45 s. A fixed 45 s gave up
on an agent with a longer stop wait: `sync` exited 1 and left the agent stopping, never restarted.
An explicit `stop -t` still wins; `sync` restarts the agent with the stop wait it had."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import balsam.cli.site_commands as site_commands

PID = 4242


def _pid_file(site: Path, stop_wait: str | None) -> None:
    """An agent's pid file as it writes it: host, pid, start time, settings digest, stop wait."""
    lines = [socket.gethostname(), str(PID), "1700000000.000", "sha256:" + "0" * 64]
    if stop_wait is not None:
        lines.append(f"stop_wait_sec={stop_wait}")
    (site / "balsam-service.pid").write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Run `balsam site stop`/`sync` on ``tmp_path`` against an agent that the pid file names and that
    stops at once; returns (result, the timeouts stop_agent got, the starts' stop_wait_sec)."""
    import balsam.site.agent
    import balsam.site.site_ops

    monkeypatch.delenv("BALSAM_AGENT_STOP_WAIT_SEC", raising=False)
    timeouts: list = []
    starts: list = []

    def stop_agent(path, *, timeout, force, progress=None, echo=None, **_kw):
        timeouts.append(timeout)
        return PID

    def start_agent(path, **kw):
        starts.append(kw.get("stop_wait_sec"))
        return PID + 1

    config = SimpleNamespace(settings=object(), site_path=tmp_path, site_id=3, settings_path=tmp_path / "settings.yml")
    monkeypatch.setattr(site_commands, "_site_path", lambda _path: tmp_path)
    monkeypatch.setattr(site_commands, "_site_config", lambda _path: config)
    monkeypatch.setattr(site_commands, "_client", lambda: object())
    monkeypatch.setattr(site_commands, "_await_terminations", lambda path, until, **kw: None)
    # A clock that stands still: `-t` is the whole command's, its stop gets what the wait left.
    monkeypatch.setattr(site_commands, "time", SimpleNamespace(monotonic=lambda: 1000.0, sleep=lambda s: None))
    monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: (socket.gethostname(), PID))
    monkeypatch.setattr(balsam.site.site_ops, "stop_agent", stop_agent)
    monkeypatch.setattr(balsam.site.site_ops, "start_agent", start_agent)
    monkeypatch.setattr(balsam.site.site_ops, "push_site_settings", lambda client, config: None)

    def run(*args: str):
        result = CliRunner().invoke(getattr(site_commands, args[0]), list(args[1:]))
        return result, timeouts, starts

    return run


@pytest.mark.parametrize("command", ["stop", "sync"])
def test_the_timeout_covers_a_recorded_stop_wait_over_45_s(cli, tmp_path, command):
    _pid_file(tmp_path, "50.0")
    result, timeouts, _ = cli(command)
    assert result.exit_code == 0, result.output
    assert timeouts == [80.0]  # 50 s wait + 20 s stopping hook + 10 s close


@pytest.mark.parametrize("recorded", [None, "0.0", "15.0"])
def test_at_least_45_s(cli, tmp_path, recorded):
    _pid_file(tmp_path, recorded)
    result, timeouts, _ = cli("stop")
    assert result.exit_code == 0, result.output
    assert timeouts == [45.0]


def test_an_explicit_timeout_wins(cli, tmp_path):
    _pid_file(tmp_path, "600.0")
    result, timeouts, _ = cli("stop", "-t", "7")
    assert result.exit_code == 0, result.output
    assert timeouts == [7.0]


def test_sync_restarts_the_agent_with_the_stop_wait_it_had(cli, tmp_path):
    _pid_file(tmp_path, "50.0")
    result, _, starts = cli("sync")
    assert result.exit_code == 0, result.output
    assert starts == [50.0]


def test_sync_refuses_a_stop_wait_the_new_agent_would_refuse_before_stopping_anything(cli, tmp_path, monkeypatch):
    _pid_file(tmp_path, "50.0")
    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", "soon")
    result, timeouts, starts = cli("sync")
    assert result.exit_code == 1
    assert ("Error: environment variable BALSAM_AGENT_STOP_WAIT_SEC='soon' is not a number from 0 to 3600 (digits with "
            "an optional decimal point, e.g. 30 or 0.5) (nothing was pushed; "
            f"the running site agent [pid {PID}] keeps its current settings)") in result.output
    assert timeouts == [] and starts == []
    assert os.environ["BALSAM_AGENT_STOP_WAIT_SEC"] == "soon"
