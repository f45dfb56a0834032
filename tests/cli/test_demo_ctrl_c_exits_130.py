"""`balsam demo` stopped by Ctrl-C exits 130 with one line saying what goes on running (it turned
the interrupt into a failure: "Error: interrupted: ...", exit 1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import balsam.demo as demo


@pytest.fixture
def campaign(monkeypatch, tmp_path):
    """The demo's steps without a server: the agent "starts" as pid 4242, Ctrl-C comes while it watches."""
    import balsam.site.agent
    import balsam.site.site_ops

    monkeypatch.setattr(demo, "ensure_server", lambda *a, **k: SimpleNamespace(api_root="unix:///x"))
    monkeypatch.setattr(demo, "ensure_site", lambda *a, **k: 1)
    monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: None)
    monkeypatch.setattr(balsam.site.site_ops, "start_agent", lambda path, **k: 4242)
    monkeypatch.setattr(demo, "register_apps", lambda site_id: {})
    monkeypatch.setattr(demo, "create_jobs", lambda apps, run_id, total: {"shell": 1, "python": 1, "mpi": 1, "dag": 6})
    monkeypatch.setattr(demo, "submit_batch_jobs", lambda site_id, run_id, wall_time_min: [
        SimpleNamespace(id=7, job_mode="serial"), SimpleNamespace(id=8, job_mode="mpi")])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "watch", interrupted)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path))
    return tmp_path / "site"


def _check(result, site):
    assert result.exit_code == 130, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Interrupted: still running: BatchJobs 7, 8 go on running the jobs tagged demo_run=run-"), line
    assert f"the site agent [pid 4242] (started by the demo; `balsam site stop {site}` stops it)" in line, line
    assert "Error" not in result.output


def test_balsam_demo_ctrl_c_exits_130_and_says_what_runs_on(campaign, monkeypatch):
    from balsam.cli import main

    monkeypatch.setenv("BALSAM_SITE_PATH", "")  # the demo sets it; monkeypatch restores it
    _check(CliRunner().invoke(main, ["demo", "--site-path", str(campaign)]), campaign)


def test_python_m_balsam_demo_ctrl_c_exits_130_too(campaign, monkeypatch):
    monkeypatch.setenv("BALSAM_SITE_PATH", "")
    _check(CliRunner().invoke(demo.demo, ["--site-path", str(campaign)]), campaign)


def test_ctrl_c_before_anything_started_says_so():
    assert demo.interrupted_line(demo._Left()) == "Interrupted: the demo started nothing that runs on"
