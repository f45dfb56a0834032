"""`balsam site status` names the running agent's log across daylight saving's fall-back.

The agent names its log after its local start time (``agent_2026-11-01_011000.log``). An agent
restarted in the hour the fall-back repeats (01:10 CST) names it earlier than the log of the agent
that ran before the change (01:40 CDT): `site status` took the last name in sorted order and named
the old agent's log. Without faketime, a POSIX TZ rule puts the fall-back just before this process's
start, the start time the agent's pid file records (`site status` picks the log by it).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from balsam.config import SITE_MARKER
from balsam.site.agent import Agent
from site_test_utils import StatusOnceModule

UTC = dt.timezone.utc


def _fall_back_at(when: dt.datetime) -> str:
    """UTC-6 standard, UTC-5 daylight time, daylight time ending at ``when`` (its local daylight time)."""
    local = when.astimezone(UTC) - dt.timedelta(hours=5)
    day = local.timetuple().tm_yday - 1
    return f"XST6XDT5,{(day + 180) % 365}/02:00:00,{day}/{local:%H:%M:%S}"


def test_site_status_names_the_running_agents_log_after_the_fall_back(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent here is this process: its pid file records this process's start.
    started = psutil.Process().create_time()
    monkeypatch.setenv("TZ", _fall_back_at(dt.datetime.fromtimestamp(started - 2, UTC)))
    time.tzset()
    try:
        site = tmp_path / "site"
        (site / "log").mkdir(parents=True)
        (site / SITE_MARKER).write_text("")
        (site / "settings.yml").write_text("logging:\n  level: INFO\n")
        # The agent before: started 10 minutes before the change (daylight time), its last line since
        # this one's start (an old log touched then: by when written, it was the one named).
        before = site / "log" / f"agent_{dt.datetime.fromtimestamp(started - 600):%Y-%m-%d_%H%M%S}.log"
        before.write_text("...\n")
        # This one, named as balsam.site.agent.setup_logging names it: its local time at its start
        # (standard time), last written before the old log was touched.
        running = site / "log" / f"agent_{dt.datetime.fromtimestamp(started + 1):%Y-%m-%d_%H%M%S}.log"
        running.write_text("...\n")
        os.utime(running, (started + 1, started + 1))
        os.utime(before, (started + 2, started + 2))
        assert running.name < before.name  # the repeated hour: the newer log sorts first by name

        ref: list = []
        module = StatusOnceModule(site, ref)
        agent = Agent(SimpleNamespace(site_path=str(site), site_id=1), client=object(), modules=[module])
        ref.append(agent)
        assert agent.run() == 0
        assert "Site agent running on" in module.output, module.output
        assert f"; log {running}\n" in module.output, module.output
        # The start with its zone (this process's start: before the change it read an hour ahead of now).
        assert re.search(r" since \S+ \S+ X[SD]T \(up ", module.output), module.output
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
