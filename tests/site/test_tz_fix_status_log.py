"""`balsam site status` names the running agent's log by the start time in its pid file.

An idle agent writes its log rarely (the alive line every 10 minutes, lines buffered 30 s): an old
``agent_*.log`` touched meanwhile (an editor's save, `touch`, logrotate's copytruncate) was named
instead when the log was picked by when it was last written. A real Agent (this process) holds the
pid file, which records this process's start.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from types import SimpleNamespace

import psutil

from balsam.config import SITE_MARKER
from balsam.site.agent import Agent
from site_test_utils import StatusOnceModule


def _log(site: Path, when: float, last_written: float) -> Path:
    """A log named as balsam.site.agent.setup_logging names it (local time ``when``)."""
    log = site / "log" / f"agent_{dt.datetime.fromtimestamp(when):%Y-%m-%d_%H%M%S}.log"
    log.write_text("...\n")
    os.utime(log, (last_written, last_written))
    return log


def _status_output(tmp_path: Path, logs) -> tuple[str, Path]:
    site = tmp_path / "site"
    (site / "log").mkdir(parents=True)
    (site / SITE_MARKER).write_text("")
    (site / "settings.yml").write_text("logging:\n  level: INFO\n")
    started = psutil.Process().create_time()
    logs(site, started)
    ref: list = []
    module = StatusOnceModule(site, ref)
    agent = Agent(SimpleNamespace(site_path=str(site), site_id=1), client=object(), modules=[module])
    ref.append(agent)
    assert agent.run() == 0
    assert "Site agent running on" in module.output, module.output
    return module.output, site


def test_site_status_names_the_running_agents_log_not_an_old_log_touched_since(tmp_path: Path) -> None:
    found: dict = {}

    def logs(site: Path, started: float) -> None:
        # Yesterday's agent's log, touched after the running agent last wrote its own.
        found["old"] = _log(site, started - 86400, started + 2)
        found["running"] = _log(site, started + 1, started + 1)

    output, _site = _status_output(tmp_path, logs)
    assert f"; log {found['running']}\n" in output, output


def test_site_status_names_the_running_agents_log_not_one_a_refused_start_left(tmp_path: Path) -> None:
    found: dict = {}

    def logs(site: Path, started: float) -> None:
        found["old"] = _log(site, started - 86400, started - 86000)
        found["running"] = _log(site, started + 1, started + 1)
        # A `balsam site start` refused (this agent runs) sets up its log first: a later name, written last.
        found["refused"] = _log(site, started + 3, started + 4)

    output, _site = _status_output(tmp_path, logs)
    assert f"; log {found['running']}\n" in output, output

