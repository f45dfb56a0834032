"""`balsam site status`: whether the site's agent runs, since when, where its log is, and whether
settings.yml was changed since it started; a user running an agent for weeks had only `site ls`
(the server's last refresh, up to 2 minutes stale) or ps to ask."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil
from click.testing import CliRunner

from balsam.cli import main
from balsam.site.agent import pid_file_path


def _site(tmp_path: Path) -> Path:
    (tmp_path / ".balsam-site").write_text("7\n")
    (tmp_path / "settings.yml").write_text("logging:\n  level: INFO\n")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "agent_2026-01-01_000000.log").write_text("")
    (tmp_path / "log" / "agent_2026-02-01_000000.log").write_text("")
    return tmp_path


def _status(site: Path) -> Any:
    return CliRunner().invoke(main, ["site", "status", str(site)])


def test_status_of_a_site_without_an_agent(tmp_path: Path) -> None:
    result = _status(_site(tmp_path))
    assert result.exit_code == 1
    assert result.output.strip() == "The site agent is not running."


def test_status_of_a_running_agent_names_its_pid_and_newest_log(tmp_path: Path) -> None:
    site = _site(tmp_path)
    # This process stands for the agent: the pid file dates it as an agent's does.
    started = psutil.Process().create_time()
    os.utime(site / "settings.yml", (started - 60, started - 60))  # written before the agent started
    pid_file_path(site).write_text(f"{socket.gethostname()}\n{os.getpid()}\n{started:.3f}\n")
    result = _status(site)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"Site agent running on {socket.gethostname()} [pid {os.getpid()}] since ")
    assert lines[0].endswith(f"log {site / 'log' / 'agent_2026-02-01_000000.log'}")
    assert len(lines) == 1
    os.utime(site / "settings.yml")  # edited now, after the agent started
    result = _status(site)
    assert "settings.yml was changed since the agent started" in result.output


def test_status_with_the_pid_file_of_a_dead_agent(tmp_path: Path) -> None:
    site = _site(tmp_path)
    dead = subprocess.Popen(["true"])
    started = psutil.Process(dead.pid).create_time() if psutil.pid_exists(dead.pid) else 1.0
    dead.wait()
    pid_file_path(site).write_text(f"{socket.gethostname()}\n{dead.pid}\n{started:.3f}\n")
    result = _status(site)
    assert result.exit_code == 1
    assert "not running" in result.output and f"pid {dead.pid}" in result.output


def test_status_with_the_pid_file_of_another_host(tmp_path: Path) -> None:
    site = _site(tmp_path)
    pid_file_path(site).write_text("retired-login-node-7\n4242\n1700000000.000\n")
    result = _status(site)
    assert result.exit_code == 2
    assert "retired-login-node-7 [pid 4242]" in result.output and "balsam site ls" in result.output
