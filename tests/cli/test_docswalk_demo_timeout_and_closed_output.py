"""Findings of a docs walk through `balsam demo` (the README's main command), each on the real CLI:
a real server (the session's live uvicorn), site agent, local scheduler and launchers.

1. A campaign that timed out (`--timeout 2`) ended with the summary of the moment of the timeout and
   "wall time of the campaign (jobs created -> all done): 2.8 s", though nothing was done; with
   --stop-agent it then waited ~17 s for the BatchJobs (all 50 jobs finished meanwhile) and still
   showed the counts of the timeout; without it, nothing said that the BatchJobs and the agent run on.
2. `balsam demo 2>&1 | head -8` died silently after "Creating jobs" (click's status 1 for a broken
   pipe), leaving its jobs and the site agent it started without a word: it now ends as a Ctrl-C
   does, one line naming what runs on (on stderr, else in the site's log/demo.log), status 141.
3. `balsam site init --help` showed reST markup (``default``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "site"))

from site_test_utils import stop_agent_and_end_batch_jobs  # noqa: E402

DEMO = [sys.executable, "-c", "from balsam.cli import main; main()", "demo"]


@pytest.fixture
def demo_site(balsam_env, tmp_path):
    """The demo's site path; at teardown its agent is stopped and its BatchJobs ended, so that no
    agent or launcher outlives the test."""
    site_path = tmp_path / "demo-site"
    yield site_path
    if (site_path / ".balsam-site").exists():
        from balsam._api.model import reset_default_client
        from balsam.client import load_client
        from balsam.config import SiteConfig

        reset_default_client()
        stop_agent_and_end_batch_jobs(load_client(), SiteConfig(site_path))


def _summary_counts(out: str) -> Counter:
    counts: Counter = Counter()
    for line in out.split("==> Summary", 1)[1].splitlines():
        match = re.fullmatch(r"    ([A-Z_]+)\s+(\d+)", line)
        if match:
            counts[match.group(1)] = int(match.group(2))
    return counts


def _server_counts(run_id: str) -> Counter:
    from balsam._api.model import reset_default_client
    from balsam.client import load_client
    from balsam.demo import job_states

    reset_default_client()
    return job_states(load_client(), run_id)


@pytest.mark.slow
def test_a_timed_out_demo_says_so_and_what_runs_on(demo_site):
    proc = subprocess.run([*DEMO, "--num-jobs", "20", "--timeout", "0.5", "--site-path", str(demo_site)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "jobs created -> all done" not in out, out
    assert "the campaign did not finish within the timeout (--timeout 0.5 s)" in out, out
    assert "wall time of the campaign: none, it did not finish within the timeout" in out, out
    assert "some jobs did not finish within --timeout 0.5 s" in proc.stderr, proc.stderr
    # As a Ctrl-C says it: the BatchJobs (still live half a second in) and the agent the demo started.
    pid = re.search(r"started the site agent \[pid (\d+)\]", out).group(1)
    serial, mpi = re.search(r"BatchJobs (\d+) \(serial\), (\d+) \(mpi\)", out).groups()
    run_id = re.search(r"tag demo_run=(run-[0-9-]+)\)", out).group(1)
    after = out.split("==> Summary", 1)[1]
    assert (f"still running: BatchJobs {serial}, {mpi} go on running the jobs tagged demo_run={run_id} "
            f"(`balsam job ls --tag demo_run={run_id} --by-state`; `balsam queue term --id ID` ends one)") in after, after
    assert f"the site agent [pid {pid}] (started by the demo; `balsam site stop {demo_site}` stops it)" in after, after


@pytest.mark.slow
def test_a_timed_out_demo_with_stop_agent_counts_the_jobs_after_its_wait(demo_site):
    proc = subprocess.run([*DEMO, "--num-jobs", "20", "--timeout", "0.5", "--stop-agent",
                           "--site-path", str(demo_site)], capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    run_id = re.search(r"tag demo_run=(run-[0-9-]+)\)", out).group(1)
    # The agent is stopped and the BatchJobs ended (the demo waited for them): the jobs' states
    # are what the summary says, not those of the timeout (all PREPROCESSED or so).
    assert _summary_counts(out) == _server_counts(run_id), out
    assert "jobs created -> all done" not in out, out
    assert "to end before stopping the site agent" in out.split("==> Summary", 1)[0], out
    after = out.split("==> Summary", 1)[1]
    assert "site agent stopped" in after and "the site agent [pid" not in after, after
    assert "    nothing the demo started goes on running" in after, after


@pytest.mark.slow
@pytest.mark.parametrize("stderr", ["the same pipe", "its own pipe"])
def test_a_demo_whose_output_is_closed_says_what_runs_on(demo_site, stderr):
    # `balsam demo 2>&1 | head -N`: the reader closes the pipe after "Creating jobs".
    proc = subprocess.Popen([*DEMO, "--num-jobs", "20", "--timeout", "120", "--site-path", str(demo_site)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if stderr == "the same pipe" else subprocess.PIPE)
    seen = []
    for line in proc.stdout:
        seen.append(line.decode())
        if line.startswith(b"==> Creating jobs"):
            break
    proc.stdout.close()
    err = proc.stderr.read().decode() if proc.stderr else ""
    code = proc.wait(timeout=300)
    assert code == 141, (code, seen, err)
    pid = re.search(r"started the site agent \[pid (\d+)\]", "".join(seen)).group(1)
    agent = f"the site agent [pid {pid}] (started by the demo; `balsam site stop {demo_site}` stops it)"
    log = demo_site / "log" / "demo.log"
    if stderr == "the same pipe":
        note = log.read_text()
    else:
        assert not log.exists()
        note = err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert len(err.splitlines()) == 1, err
    assert "balsam demo: output closed (broken pipe), demo stopped: still running:" in note, note
    assert agent in note, note


def _commands(cmd: click.Command, path: list[str]):
    yield path
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            yield from _commands(cmd.get_command(ctx, name), [*path, name])


def test_no_help_text_shows_rest_markup():
    from balsam.cli import main

    runner = CliRunner()
    marked = []
    for path in _commands(main, []):
        result = runner.invoke(main, [*path, "--help"])
        marked += [f"balsam {' '.join(path)}: {line.strip()}" for line in result.output.splitlines() if "``" in line]
    assert not marked, "\n".join(marked)
