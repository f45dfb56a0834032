"""`balsam demo` when a launcher idles out before its mode's jobs are runnable.

The demo's launchers exit after 5 idle seconds. With `--num-jobs 3000` the mpi-mode launcher started
before the agent had preprocessed the 20 MPI jobs (created after ~2,900 shell jobs), idled out, and
the demo waited its whole --timeout (300 s) with "PREPROCESSED 20", then failed. Without a terminal
(`demo.sh | tee demo.log`) it also printed nothing at all during that wait.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import balsam.demo as demo


class World:
    """The server as the demo sees it: job rows (by tag) and BatchJob states."""

    def __init__(self, job_states: dict[int, tuple[str, str]], batch_states: dict[int, list[str]]):
        self.jobs = dict(job_states)  # id -> (mode, state)
        self.batch = batch_states  # id -> states it shows, one per read (the last one stays)
        self.submitted: list[tuple[str, ...]] = []
        self.polls = 0
        self.on_poll = None

    def get(self, path, params=None):
        params = dict(params or {})
        if path == "/jobs/":
            self.polls += 1
            if self.on_poll:
                self.on_poll(self)
            rows = [{"id": i, "state": st, "tags": {"demo_run": "r", "mode": mode}}
                    for i, (mode, st) in sorted(self.jobs.items()) if i > int(params.get("id__gt", 0))]
            return {"count": len(rows), "results": rows}
        batch_job_id = int(path.rstrip("/").rsplit("/", 1)[1])
        states = self.batch[batch_job_id]
        return {"id": batch_job_id, "state": states.pop(0) if len(states) > 1 else states[0]}

    def submit(self, site_id, run_id, wall_time_min, modes=("serial", "mpi")):
        self.submitted.append(tuple(modes))
        if len(self.submitted) == 1:  # the demo's first two, 7 and 8, whose states the test sets
            return [SimpleNamespace(id=7, job_mode="serial"), SimpleNamespace(id=8, job_mode="mpi")]
        made = []
        for mode in modes:
            new_id = max(self.batch) + 1
            self.batch[new_id] = ["queued"]
            made.append(SimpleNamespace(id=new_id, job_mode=mode))
            # Its launcher runs the jobs of its mode that wait.
            for job_id, (job_mode, state) in self.jobs.items():
                if job_mode == mode and state in ("PREPROCESSED", "RESTART_READY"):
                    self.jobs[job_id] = (job_mode, "JOB_FINISHED")
        return made


@pytest.fixture
def run_demo(monkeypatch, tmp_path):
    import balsam.site.agent
    import balsam.site.site_ops

    def run(world: World, *args: str):
        monkeypatch.setattr(demo, "ensure_server", lambda *a, **k: world)
        monkeypatch.setattr(demo, "ensure_site", lambda *a, **k: 1)
        monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: None)
        monkeypatch.setattr(balsam.site.site_ops, "start_agent", lambda path, **k: 4242)
        monkeypatch.setattr(demo, "register_apps", lambda site_id: {})
        monkeypatch.setattr(demo, "create_jobs",
                            lambda apps, run_id, total: {"shell": 2, "python": 0, "mpi": 1, "dag": 0})
        monkeypatch.setattr(demo, "submit_batch_jobs", world.submit)
        monkeypatch.setattr(demo, "summary", lambda client, path, run_id, states, elapsed, apps:
                            0 if states["JOB_FINISHED"] == sum(states.values()) else 1)
        monkeypatch.setenv("BALSAM_HOME", str(tmp_path))
        monkeypatch.setenv("BALSAM_SITE_PATH", "")  # the demo sets it; monkeypatch restores it
        return CliRunner().invoke(demo.demo, ["--site-path", str(tmp_path / "site"), *args])

    return run


def test_a_mode_whose_launcher_idled_out_gets_a_new_batch_job(run_demo):
    world = World({1: ("serial", "JOB_FINISHED"), 2: ("serial", "JOB_FINISHED"), 3: ("mpi", "PREPROCESSED")},
                  {7: ["finished"], 8: ["finished"]})
    result = run_demo(world, "--timeout", "20")
    assert result.exit_code == 0, result.output
    assert world.submitted == [("serial", "mpi"), ("mpi",)], world.submitted
    assert "BatchJob 8 (mpi) is finished with 1 mpi job(s) still to run: submitted BatchJob 9" in result.output


def test_a_batch_job_ended_by_queue_term_is_not_replaced(run_demo):
    world = World({1: ("serial", "JOB_FINISHED"), 2: ("serial", "JOB_FINISHED"), 3: ("mpi", "PREPROCESSED")},
                  {7: ["finished"], 8: ["pending_deletion", "finished"]})
    result = run_demo(world, "--timeout", "5")
    assert result.exit_code == 1, result.output
    assert world.submitted == [("serial", "mpi")], world.submitted
    assert "some jobs did not finish" in result.output


def test_without_a_terminal_the_wait_prints_plain_progress_lines(run_demo):
    world = World({1: ("serial", "RUNNING"), 2: ("serial", "JOB_FINISHED"), 3: ("mpi", "JOB_FINISHED")},
                  {7: ["running"], 8: ["running"]})

    def finish_on_second_poll(w):
        if w.polls == 2:
            w.jobs[1] = ("serial", "JOB_FINISHED")

    world.on_poll = finish_on_second_poll
    result = run_demo(world, "--timeout", "20")
    assert result.exit_code == 0, result.output
    assert "    jobs done 2/3  0:00:00  RUNNING 1" in result.output, result.output
    assert "jobs done 3/3" in result.output and "all done" in result.output, result.output
