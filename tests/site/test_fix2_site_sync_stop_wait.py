"""`balsam site sync` and the agent's stop wait ($BALSAM_AGENT_STOP_WAIT_SEC), with real agents.

The agent records its stop wait in its pid file; `sync` restarts it with that wait, also from an
environment without the variable (it restarted it with sync's own environment: the wait set at
`site start` was lost). A stop that outlasts sync's timeout says that the agent was not restarted
and goes on stopping (it ended with stop's "did not stop ... (use --force to kill it)" behind the
progress line, and the site left with no agent). The timeout itself (the recorded wait + 30 s, at
least 45 s) is tested in tests/cli/test_fix2_site_stop_timeout.py."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import psutil
from click.testing import CliRunner

import balsam.cli.site_commands as site_commands
import balsam.site.agent
from balsam.cli.site_commands import sync
from balsam.site.agent import agent_running
from balsam.site.site_ops import start_agent, stop_agent
from site_test_utils import wait_for

BALSAM = str(Path(sys.executable).parent / "balsam")
PBS = {"scheduler": {"name": "pbs", "allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 60,
                                                                 "max_queued_jobs": 1}}}}


def _stop_wait_line(path: Path) -> list[str]:
    return [line for line in (path / "balsam-service.pid").read_text().split() if line.startswith("stop_wait_sec=")]


def _environ(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def test_sync_restarts_the_agent_with_the_stop_wait_it_was_started_with(make_site, monkeypatch):
    path = Path(make_site().site_path)
    env = {**os.environ, "BALSAM_AGENT_STOP_WAIT_SEC": "2.5"}
    try:
        started = subprocess.run([BALSAM, "site", "start", str(path)], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert started.returncode == 0, started.stderr
        first = agent_running(path)
        env.pop("BALSAM_AGENT_STOP_WAIT_SEC")
        synced = subprocess.run([BALSAM, "site", "sync", str(path)], env=env, capture_output=True, text=True,
                                timeout=120)
        assert synced.returncode == 0, synced.stderr
        second = agent_running(path)
        assert second is not None and second != first, synced.stdout
        assert _environ(second[1]).get("BALSAM_AGENT_STOP_WAIT_SEC") == "2.5"
        assert _stop_wait_line(path) == ["stop_wait_sec=2.5"]
    finally:
        stop_agent(path, timeout=30, force=True)


def test_sync_says_the_agent_was_not_restarted_when_its_stop_outlasts_the_timeout(make_site, tmp_path, monkeypatch):
    mark = f"{random.randint(100000, 999999)}.25"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qstat").write_text(f"#!/bin/sh\nexec sleep {mark}\n")  # a hung PBS server
    (bin_dir / "qstat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", "5")
    path = Path(make_site(overrides=PBS).site_path)
    try:
        pid = start_agent(path)
        wait_for(lambda: [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", mark]],
                 timeout=60, what="the hung qstat")
        # The agent's stop waits 5 s for the hung poll; sync's timeout made shorter than that.
        monkeypatch.setattr(balsam.site.agent, "stop_timeout", lambda stop_wait: 1.0)
        # stderr a terminal: the counter is redrawn in place (off a terminal: tests/cli/test_cli_output_forms.py)
        monkeypatch.setattr(site_commands, "_stderr_tty", lambda: True, raising=False)
        result = CliRunner().invoke(sync, [str(path)])
        assert result.exit_code == 1, result.output
        assert (f"Error: the site agent [pid {pid}] did not stop within 1 s and was not restarted: it goes on "
                "stopping (cycles in progress, hooks, its modules' close); once `balsam site status` says it is not "
                f"running, `balsam site start {path}` starts it with the new settings") in result.stderr
        assert "\rWaiting for the site agent to stop...  1/1 s\n" in result.stderr  # the line ended first
        wait_for(lambda: agent_running(path) is None, timeout=60, what="the agent to end its stop")
    finally:
        stop_agent(path, timeout=30, force=True)
        for process in psutil.process_iter(["cmdline"]):
            if process.info["cmdline"] == ["sleep", mark]:
                process.kill()
