"""`logging.level: DEBUG` in settings.yml: the agent log shows each module's per-cycle decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_test_utils import wait_for

DEBUG_SETTINGS = {
    "logging": {"level": "DEBUG"},
    "queue_maintainer": {"submit_period": 1, "num_queued_jobs": 0},
    "processing": {"num_workers": 1},
}
#: One line of each module's per-cycle report (see the modules' run_cycle).
EXPECTED = {
    "scheduler": "balsam.site.modules.scheduler:",
    "processing": "balsam.site.modules.processing:",
    "queue_maintainer": "nothing to submit",
    "file_cleaner": "no finished job waits for cleanup",
    "agent": "cycle 2 done; next in",
}


def _log(site_path: Path) -> str:
    return "\n".join(p.read_text() for p in (site_path / "log").glob("agent_*.log"))


@pytest.mark.slow
def test_debug_level_logs_each_modules_cycle(make_site, agent_daemon) -> None:
    from balsam.site.site_ops import stop_agent

    site = make_site(overrides=DEBUG_SETTINGS)
    path = Path(site.site_path)
    agent_daemon(site)
    wait_for(lambda: all(text in _log(path) for text in EXPECTED.values()), timeout=60,
             what="a DEBUG line of every module in the agent log")
    stop_agent(path, timeout=30)
    log = _log(path)
    debug_lines = [line for line in log.splitlines() if "| DEBUG |" in line]
    assert any("cycle:" in line and "active BatchJobs" in line for line in debug_lines)
    assert any("cycle: harvested" in line for line in debug_lines)
