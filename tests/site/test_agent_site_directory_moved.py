"""A site directory moved (plain ``mv``) or removed while its agent runs.

Every path the agent and its modules use is absolute under the directory it started in: the agent
ran on, the processing module made the old path's directories again for each job it preprocessed
(workdirs that no launcher of the moved site reads) and the transfers module logged a
``FileNotFoundError`` traceback for the missing ``.balsam-site`` every cycle. Now the agent stops
within about a second, with one ERROR line saying what happened and what to run."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from site_test_utils import wait_for


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_an_agent_whose_site_directory_is_moved_stops_saying_so(make_site, client, agent_daemon) -> None:
    site = make_site(overrides={"scheduler": None, "file_cleaner": None})
    old = Path(site.site_path)
    logs = old / "log"
    pid = agent_daemon(site)
    wait_for(lambda: any("modules processing" in p.read_text() for p in logs.glob("agent_*.log")),
             timeout=60, what="the agent's start")
    new = old.with_name(old.name + "-moved")
    os.rename(old, new)
    site.site_path = new  # the fixture's teardown stops what runs there
    os.environ["BALSAM_SITE_PATH"] = str(new)
    wait_for(lambda: _gone(pid), timeout=30, what="the agent's stop")
    text = "".join(p.read_text() for p in (new / "log").glob("agent_*.log"))
    line = next((l for l in text.splitlines() if "| ERROR |" in l and "site directory" in l), "")
    assert f"the site directory {old} was moved or removed while the agent ran: stopping" in line, text[-3000:]
    assert "balsam site mv" in line and "balsam site start PATH" in line
    assert "stopping (site-moved)" in text and "agent stopped" in text
    assert not old.exists(), "the agent made the old site path again"
