"""A site directory copied while its agent runs, and the site record's path claimed at an agent's
start, against a real server and real agents.

``cp -a``/``rsync -a`` copy the pid file, which names the original's live agent (same pid, host
and start time): the copy was taken for a directory whose agent runs (`site status` said running,
`site stop COPY` stopped the original's agent, `site start COPY` said "already running", `site sync
COPY` moved the site into the copy). The pid file now names the directory its agent serves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
from click.testing import CliRunner

from balsam.site.agent import pid_file_path, read_pid_file
from balsam.site.site_ops import stop_agent
from balsam.util import same_process

NO_MODULES = {"scheduler": None, "file_cleaner": None, "processing": None}


def _cli(*args: str) -> Any:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args))


def test_a_copy_made_while_the_agent_runs_does_not_act_on_the_original_agent(make_site, client, agent_daemon) -> None:
    site = make_site(overrides=NO_MODULES)
    original = Path(site.site_path)
    copy = original.with_name(original.name + "-copy")
    pid = agent_daemon(site)
    started = psutil.Process(pid).create_time()
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    assert pid_file_path(copy).is_file()

    try:
        refused = _cli("site", "start", str(copy))
        error = refused.output.strip().splitlines()[-1]
        assert refused.exit_code == 1, refused.output
        assert f"site {site.site_id} is also in {original}, where its agent runs on" in error, error
        status = _cli("site", "status", str(copy))
        assert status.exit_code == 1 and "not running" in status.output, status.output
        stopped = _cli("site", "stop", str(copy))
        assert same_process(pid, started), stopped.output  # the original's agent was SIGTERMed
        synced = _cli("site", "sync", str(copy))  # refused: the record is the original agent's (test_site_copy_commands)
        assert synced.exit_code == 1 and same_process(pid, started), synced.output
        assert client.get(f"/sites/{site.site_id}")["path"] == str(original)
        assert read_pid_file(original)[1] == pid and read_pid_file(copy) is None
    finally:
        stop_agent(copy, timeout=30, force=True)


def test_a_start_refused_by_the_pid_file_leaves_the_site_record_path(make_site, client) -> None:
    """Login nodes that mount one site directory at different paths: the agent runs on login1; one
    started on login2 is refused by the pid file, and used to rewrite the site record's path first."""
    site = make_site(overrides=NO_MODULES)
    here = Path(site.site_path)
    client.put(f"/sites/{site.site_id}", json={"path": "/login1-view/home/u/site"})
    pid_file_path(here).write_text("login1\n4242\n1700000000.000\n")  # the site was refreshed just now
    done = subprocess.run([sys.executable, "-m", "balsam.site", str(here)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "names a site agent on login1 [pid 4242]" in done.stderr, done.stderr
    assert client.get(f"/sites/{site.site_id}")["path"] == "/login1-view/home/u/site"
    assert pid_file_path(here).read_text().split()[:2] == ["login1", "4242"]


def test_a_copy_whose_original_holds_a_dead_hosts_pid_file_starts_with_force(make_site, client, tmp_path,
                                                                               monkeypatch) -> None:
    """The site record's directory holds the pid file of a login node gone long ago: judged by the
    site's last refresh, as every command judges such a file; --force reaches the agent's claim."""
    site = make_site(overrides=NO_MODULES)
    original = Path(site.site_path)
    copy = original.with_name(original.name + "-copy")
    shutil.copytree(original, copy)
    pid_file_path(original).write_text("dead-login-node-1\n4242\n1700000000.000\n")
    # Any age of the site record counts as silent for too long, in this process and in the agent.
    patch = tmp_path / "silent_site"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import balsam.site.site_ops as ops\nops.STALE_MIN_SEC = 0.0\nops.STALE_REFRESH_PERIODS = 0\n")
    monkeypatch.setenv("PYTHONPATH", f"{patch}:{os.environ.get('PYTHONPATH', '')}")
    try:
        refused = _cli("site", "start", str(copy))
        error = refused.output.strip().splitlines()[-1]
        assert refused.exit_code == 1 and "dead-login-node-1 [pid 4242]" in error and "looks dead" in error, error
        assert f"`balsam site start --force {copy}`" in error
        assert client.get(f"/sites/{site.site_id}")["path"] == str(original)
        forced = _cli("site", "start", "--force", str(copy))
        assert forced.exit_code == 0, forced.output
        assert client.get(f"/sites/{site.site_id}")["path"] == str(copy)
    finally:
        stop_agent(copy, timeout=30, force=True)
