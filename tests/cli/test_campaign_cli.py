"""Seeing a campaign from the CLI against a real uvicorn server: `balsam job show`, `job ls --watch`,
`balsam analytics throughput|utilization [--plot]`, `--site NAME`, and the 0.x command lines."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture
def campaign(balsam_env: Any) -> dict[str, Any]:
    return make_campaign(balsam_env.url, balsam_env.token, n_jobs=4, finished=True)


def test_job_show_tells_why_a_job_failed(campaign: dict) -> None:
    out = balsam("job", "show", str(campaign["failed"]), str(campaign["finished"]))
    assert out.exit_code == 0, out.output
    text = out.output
    site = campaign["site"]
    first, second = text.split(f"Job {campaign['finished']}")
    assert f"Job {campaign['failed']}" in first and "FAILED" in first
    assert f"/tmp/{site['name']}/data/run/0/job.out" in first
    history = first.split("State history:")[1]
    for move in ("CREATED -> STAGED_IN", "STAGED_IN -> PREPROCESSED", "PREPROCESSED -> RUNNING", "RUNNING -> RUN_ERROR",
                 "RUN_ERROR -> FAILED"):
        assert move in history
    assert "returncode=3" in history and "message=the run failed" in history
    assert "Error (RUN_ERROR at" in first and "| ValueError: bad mesh 42" in first
    assert "POSTPROCESSED -> JOB_FINISHED" in second and "Error" not in second
    missing = balsam("job", "show", "999999999")
    assert missing.exit_code == 1 and "no job with id 999999999" in missing.output


def test_job_ls_watch_redraws(campaign: dict) -> None:
    out = balsam("job", "ls", "--site", campaign["site"]["name"], "--by-state", "--watch", "--interval", "0.1",
                 "--rounds", "2")
    assert out.exit_code == 0, out.output
    assert out.output.count("balsam job ls  (every 0.1 s") == 2
    assert out.output.count("STAGED_IN") == 2 and "Total: 4" in out.output


def test_site_name_is_a_site_selector(campaign: dict, balsam_env: Any) -> None:
    name = campaign["site"]["name"]
    out = balsam("job", "ls", "--site", name)
    assert out.exit_code == 0, out.output
    assert "run/0" in out.output and name in out.output
    out = balsam("job", "ls", "--site", "no-such-site")
    assert out.exit_code == 2 and "no site is named 'no-such-site' and no site path contains it" in out.output
    out = balsam("queue", "ls", "--site", name, "--history")
    assert out.exit_code == 0, out.output


def test_analytics_tables_and_figures(campaign: dict, tmp_path: Path) -> None:
    name = campaign["site"]["name"]
    out = balsam("analytics", "throughput", "--site", name, "--plot", str(tmp_path / "thr.png"))
    assert out.exit_code == 0, out.output
    assert "Until" in out.output and "1 jobs reached JOB_FINISHED" in out.output
    out = balsam("analytics", "utilization", "--site", name, "--rows", "3", "--plot", str(tmp_path / "util.png"))
    assert out.exit_code == 0, out.output
    assert "Busy nodes (mean)" in out.output and "Peak: 1 nodes busy" in out.output
    for png in ("thr.png", "util.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    out = balsam("analytics", "throughput", "--site", name, "--to-state", "restart_ready")  # any case, as job ls -s
    assert out.exit_code == 0 and "No job reached RESTART_READY yet" in out.output, out.output


def test_analytics_table_edges_end_at_the_last_event_and_short_spans_show_milliseconds() -> None:
    """The division of the span rounded to microseconds: the last edge fell 1 us short and the jobs
    of the last bulk update (one timestamp) were missing from the cumulative table."""
    import datetime as dt

    from balsam.cli.analytics import _edges, _fmt

    start = dt.datetime(2026, 12, 4, 0, 31, 42, 123457)
    end = start + dt.timedelta(microseconds=747273)
    for rows in (2, 3, 4, 7):
        edges = _edges(start, end, rows)
        assert len(edges) == rows + 1 and edges[0] == start and edges[-1] == end and edges == sorted(edges)
    assert _fmt(end, end - start) == "2026-12-04 00:31:42.870" and _fmt(end) == "2026-12-04 00:31:42"


def test_analytics_wrong_state_is_a_usage_error() -> None:
    # It reached the server and exited 1 with its HTTP 422 text.
    out = balsam("analytics", "throughput", "--to-state", "BOGUS")
    assert out.exit_code == 2 and "Invalid value for '--to-state': 'BOGUS' is not one of" in out.output, out.output
    assert "422" not in out.output


@pytest.mark.parametrize("argv, expected", [
    (["ls", "--state", "FAILED", "--wf", "test"], "balsam job ls -s FAILED -t workflow=test"),
    (["ls", "--history"], "balsam job show ID"),
    (["submit-launch", "-A", "Project", "-q", "Queue", "-t", "5", "-n", "2", "--job-mode=serial"],
     "balsam queue submit -A Project -q Queue -t 5 -n 2 -j serial"),
    (["job", "--name", "hi1", "--workflow", "test", "--application", "SayHello", "--args", "world 1"],
     "balsam job create -w hi1 --tag workflow=test -a SayHello"),
    (["app", "--name", "SayHello", "--executable", "echo hello,"], "class SayHello(ApplicationDefinition):"),
    # the user's own path, which a placeholder (`balsam site init PATH -n NAME`) pasted as printed was not
    (["init", "~/myWorkflow"], f"  balsam site init {shlex.quote(str(Path.home() / 'myWorkflow'))}\nNote: then "
                               f"`cd {shlex.quote(str(Path.home() / 'myWorkflow'))} && balsam site start`"),
    (["service"], "balsam site start"),
    (["modify", "--id", "3", "--attr", "state", "--value", "RESTART_READY"], "balsam job modify --id 3 -s RESTART_READY"),
])
def test_balsam_0x_command_lines_get_the_new_command(argv: list[str], expected: str) -> None:
    out = balsam(*argv)
    assert out.exit_code == 2
    assert "is a Balsam 0.x command line" in out.output and expected in out.output


def test_current_commands_are_not_mistaken_for_0x() -> None:
    assert balsam("job", "--help").exit_code == 0
    out = balsam("job", "--bogus")
    assert out.exit_code == 2 and "0.x" not in out.output and "No such option" in out.output
