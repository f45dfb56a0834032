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
4. Review of 1. and 2.: a closed output while the demo used a running server named that server ("may be
   starting"); a --stop-agent run without a timeout printed its summary only after the wait and never
   named BatchJobs still live after it; the wait read each BatchJob with its own GET every second.
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
    # All finished while the demo waited: it says so, and still exits 1 (not within --timeout).
    all_finished = _summary_counts(out)["JOB_FINISHED"] == 20
    assert ("    all 20 jobs finished after the timeout, during the --stop-agent wait" in after) == all_finished, after


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


def test_a_closed_output_while_the_demo_uses_a_running_server_names_no_server(balsam_env, demo_site):
    # `balsam demo 2>&1 | head -1` with the server already running (the session's): the demo
    # started nothing, and its note said "the Balsam server may be starting (`balsam server stop`)".
    proc = subprocess.Popen([*DEMO, "--num-jobs", "20", "--site-path", str(demo_site)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = proc.stdout.readline()
    proc.stdout.close()
    code = proc.wait(timeout=120)
    assert first.startswith(b"==> Starting the Balsam API server"), first
    assert code == 141, code
    # The note goes to $BALSAM_HOME/demo.log (stderr is closed too; no site log directory yet).
    note = (balsam_env.home / "demo.log").read_text()
    assert "balsam demo: output closed (broken pipe), demo stopped: the demo started nothing that runs on" in note, note
    assert "server" not in note, note
    # No second server: a closed output while using the found one once started `balsam server start`.
    assert not (balsam_env.home / "server").exists(), list((balsam_env.home / "server").iterdir())


@pytest.mark.slow
def test_stop_agent_prints_the_summary_first_and_names_batch_jobs_live_after_its_wait(demo_site):
    # A wait of 0 s stands for BatchJobs that outlive the 60 s wait (the launchers idle out 5 s
    # after the campaign's last job).
    program = "import balsam.demo as d; d.STOP_AGENT_WAIT_SEC = 0; from balsam.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", program, "demo", "--num-jobs", "20", "--stop-agent",
                           "--site-path", str(demo_site)], capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    run_id = re.search(r"tag demo_run=(run-[0-9-]+)\)", out).group(1)
    # The campaign is done: its summary comes before the wait for the BatchJobs.
    summary_at = out.index("==> Summary")
    waiting = re.search(r"waiting up to 0 s for BatchJobs ([0-9, ]+) to end before stopping the site agent", out)
    assert waiting and waiting.start() > summary_at, out
    after = out[waiting.end():]
    assert "site agent stopped" in after and "the site agent [pid" not in after, after
    line = (f"    still running: BatchJobs {waiting.group(1)} go on running the jobs tagged demo_run={run_id} "
            f"(`balsam job ls --tag demo_run={run_id} --by-state`; `balsam queue term --id ID` ends one)")
    assert line in after, after


def test_live_batch_jobs_is_one_listing(balsam_env, tmp_path):
    from balsam.api import BatchJob, Site
    from balsam.client import load_client
    from balsam.demo import _live_batch_jobs

    site = Site.objects.create(name="live-bj", path=str(tmp_path / "live-bj"))
    made = [BatchJob(site_id=site.id, num_nodes=1, wall_time_min=5, queue="local", project="local", job_mode="serial")
            for _ in range(4)]
    for batch_job in made:
        batch_job.save()
    made[1].state = "queued"
    made[1].scheduler_id = 11
    made[1].save()
    made[2].state = "submit_failed"
    made[2].save()
    made[3].state = "finished"
    made[3].save()
    client = load_client()
    gets = []
    real_get = client.get
    client.get = lambda path, *args, **kwargs: gets.append(path) or real_get(path, *args, **kwargs)
    ids = [b.id for b in made]
    assert _live_batch_jobs(client, ids) == ids[:2]
    assert gets == ["/batch-jobs/"], gets


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
