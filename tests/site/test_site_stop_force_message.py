"""`balsam site stop --force` said "shutdown OK" after it had to kill a hung agent (SIGKILL: no
clean shutdown); it now says the agent was killed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner

from balsam.cli import site_commands


def _fake_stop_agent(killed: bool) -> Any:
    def stop_agent(path: Path, *, timeout: float, force: bool, progress: Any, echo: Any) -> int:
        # What balsam.site.site_ops.stop_agent reports while it waits, then at the timeout (with
        # --force it kills the agent right after reporting a wait past the timeout).
        progress(1.0, timeout)
        if killed:
            progress(timeout + 0.1, timeout)
        return 4242

    return stop_agent


def _stop_output(monkeypatch: Any, tmp_path: Path, killed: bool) -> str:
    import balsam.site.site_ops as site_ops

    monkeypatch.setattr(site_commands, "_site_path", lambda _path: tmp_path)
    monkeypatch.setattr(site_ops, "stop_agent", _fake_stop_agent(killed))
    result = CliRunner().invoke(site_commands.stop, ["--force", "-t", "2"])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_killed_agent_is_reported_as_killed(monkeypatch, tmp_path):
    output = _stop_output(monkeypatch, tmp_path, killed=True)
    assert "Site agent [pid 4242] did not stop within 2 s: killed" in output
    assert "shutdown OK" not in output


def test_a_clean_stop_with_force_is_still_shutdown_ok(monkeypatch, tmp_path):
    assert "Site agent [pid 4242] shutdown OK" in _stop_output(monkeypatch, tmp_path, killed=False)
