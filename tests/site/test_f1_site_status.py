"""`balsam site status`: exit status 0 running, 1 not running, 2 unknown (documented in docs/site.md).

A path that is no site, and a pid file that cannot be read, exited 1 ("not running": a watchdog
script then started a second agent, or one in the wrong place); the "settings.yml was changed"
line compared mtimes, so a `touch` (or an edit undone) gave it while the agent itself, comparing
the file's text with what it started with, rightly said nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from click.testing import CliRunner

from balsam.cli.site_commands import status
from balsam.config import SITE_MARKER
from balsam.site.agent import PID_FILE_NAME, Agent
from balsam.site.module import AgentModule


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / SITE_MARKER).write_text("")
    (site / "settings.yml").write_text("logging:\n  level: INFO\n")
    return site


def test_a_path_that_is_no_site_is_unknown_not_stopped(tmp_path: Path) -> None:
    result = CliRunner().invoke(status, [str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path} is not a Balsam site" in result.output


def test_a_pid_file_that_cannot_be_read_is_unknown_not_stopped(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert CliRunner().invoke(status, [str(site)]).exit_code == 1  # no pid file: not running
    (site / PID_FILE_NAME).mkdir()  # unreadable (a mode 000 file would not be to root)
    result = CliRunner().invoke(status, [str(site)])
    assert result.exit_code == 2, result.output
    assert f"Cannot read the pid file {site / PID_FILE_NAME}" in result.output
    assert "unknown" in result.output
    (site / PID_FILE_NAME).rmdir()
    (site / PID_FILE_NAME).write_text("\x00\x00garbage")  # no agent writes that: it writes the file whole
    result = CliRunner().invoke(status, [str(site)])
    assert result.exit_code == 2, result.output
    assert "is not one a site agent wrote" in result.output


class _StatusWhileRunning(AgentModule):
    """Runs `balsam site status` while the agent runs: as it started, after a `touch` of
    settings.yml, after an edit undone, and after a real edit; then stops the agent."""

    section = "status_while_running"

    def __init__(self, site: Path, ref: list) -> None:
        super().__init__(None, None, None)
        self.site = site
        self.ref = ref
        self.outputs: list[tuple[int, str]] = []
        self.agent_saw: list[Any] = []

    def _status(self) -> None:
        result = CliRunner().invoke(status, [str(self.site)])
        self.outputs.append((result.exit_code, result.output))
        self.agent_saw.append(self.ref[0].check_settings_file())

    def run_cycle(self) -> float:
        settings = self.site / "settings.yml"
        text = settings.read_text()
        later = time.time() + 100  # an mtime well after the agent's start, whatever the clock's grain
        self._status()
        os.utime(settings, (later, later))  # `touch`
        self._status()
        settings.write_text(text.replace("INFO", "DEBUG"))
        settings.write_text(text)  # the edit undone
        os.utime(settings, (later + 1, later + 1))
        self._status()
        settings.write_text(text.replace("INFO", "DEBUG"))
        os.utime(settings, (later + 2, later + 2))
        self._status()
        self.ref[0].request_stop("test")
        return 0.01


def test_the_settings_changed_line_agrees_with_the_agent(tmp_path: Path) -> None:
    site = _site(tmp_path)
    ref: list = []
    module = _StatusWhileRunning(site, ref)
    agent = Agent(SimpleNamespace(site_path=str(site), site_id=1), client=object(), modules=[module])
    ref.append(agent)
    assert agent.run() == 0
    codes = [code for code, _ in module.outputs]
    changed = ["settings.yml was changed since the agent started" in out for _, out in module.outputs]
    assert codes == [0, 0, 0, 0], module.outputs
    assert all("Site agent running on" in out for _, out in module.outputs)
    # as started, touched, edit undone: unchanged for both; then a real edit: changed for both
    assert changed == [False, False, False, True], module.outputs
    assert [saw is not None for saw in module.agent_saw] == changed
