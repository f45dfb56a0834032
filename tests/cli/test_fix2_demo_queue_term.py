"""`balsam demo` replaced a BatchJob that `balsam queue term` ended when it did not happen to read it
while ``pending_deletion`` (it reads a BatchJob only while jobs of its mode wait, every 2 s, and the
state lasts one or two scheduler sync periods, 1 s each in the demo): the killed launcher's job came
back RESTART_READY, the BatchJob read ``finished``, and a new one was submitted. A finished
BatchJob whose scheduler job was deleted says so for good (status_info ``scheduler_state``
``CANCELLED``, the local scheduler's; ``scheduler_message`` ``deleted`` where the scheduler keeps
no record): the demo now reads that (tests/site/test_fix2_deleted_batch_job_record.py checks that a
real agent writes it).

demo.sh's first-run note named ``.venv/bootstrap.log`` relative to the repository while it runs in
the caller's directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_demo_replaces_idled_batch_job import World, run_demo  # noqa: F401  (run_demo: a fixture)

REPO = Path(__file__).resolve().parents[2]


class WorldWithRecords(World):
    """World whose BatchJob reads carry status_info (``infos``: id -> status_info)."""

    def __init__(self, *args, infos: dict[int, dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.infos = infos

    def get(self, path, params=None):
        answer = super().get(path, params)
        if path.startswith("/batch-jobs/"):
            answer["status_info"] = self.infos.get(answer["id"], {})
        return answer


def _launcher_killed_at_second_poll(world: World) -> None:
    if world.polls == 2:
        world.jobs[3] = ("mpi", "RESTART_READY")


@pytest.mark.parametrize("info", [{"scheduler_state": "CANCELLED", "scheduler_message": "deleted"},
                                  {"scheduler_message": "deleted"}])
def test_a_batch_job_queue_term_ended_unseen_is_not_replaced(run_demo, info):
    # mpi job 3 RUNNING under BatchJob 8 when the user runs `balsam queue term --id 8`: no mpi job
    # waits while BatchJob 8 is pending_deletion, so the demo first reads it finished.
    world = WorldWithRecords({1: ("serial", "JOB_FINISHED"), 2: ("serial", "JOB_FINISHED"), 3: ("mpi", "RUNNING")},
                             {7: ["finished"], 8: ["finished"]}, infos={8: info})
    world.on_poll = _launcher_killed_at_second_poll
    result = run_demo(world, "--timeout", "3")
    assert world.submitted == [("serial", "mpi")], (world.submitted, result.output)
    assert result.exit_code == 1 and "some jobs did not finish" in result.output, result.output


def test_a_batch_job_whose_launcher_idled_out_is_still_replaced(run_demo):
    world = WorldWithRecords({1: ("serial", "JOB_FINISHED"), 2: ("serial", "JOB_FINISHED"), 3: ("mpi", "PREPROCESSED")},
                             {7: ["finished"], 8: ["finished"]},
                             infos={8: {"scheduler_state": "COMPLETED", "scheduler_message": "exit status 0"}})
    result = run_demo(world, "--timeout", "20")
    assert result.exit_code == 0, result.output
    assert world.submitted == [("serial", "mpi"), ("mpi",)], world.submitted


def test_demo_sh_names_the_bootstrap_log_by_its_full_path(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "demo.sh", repo / "scripts" / "demo.sh")
    # A first run: no .venv/bin/balsam yet; the bootstrap installs a `balsam` that does nothing.
    (repo / "scripts" / "bootstrap.sh").write_text(
        'mkdir -p "$(dirname "$0")/../.venv/bin"\nprintf "#!/bin/sh\\n" > "$(dirname "$0")/../.venv/bin/balsam"\n'
        'chmod +x "$(dirname "$0")/../.venv/bin/balsam"\n')
    caller = tmp_path / "work"
    caller.mkdir()
    proc = subprocess.run(["bash", str(repo / "scripts" / "demo.sh")], cwd=caller, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PWD": str(caller)})
    assert proc.returncode == 0, proc.stderr
    assert (f"demo: first run: installing into .venv takes a few minutes (pip's output: {repo}/.venv/bootstrap.log)"
            in proc.stdout), proc.stdout
