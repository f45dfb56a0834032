"""The server's secrets in the environment a launcher is started with (the shell on the login node
that also runs ``balsam server``; ``sbatch --export=ALL`` passed it on) reach no process the
launcher starts: not only each job's environment, but the job's shell itself (its
``/proc/<pid>/environ``, the environment it was exec'd with, which a job's own tools and anyone
inspecting the process read), and not the spawner nor partition launchers. Before, the job's bash
was started with the launcher's whole environment and only ``unset`` them: its /proc environ held
the token signing key. Real server, real ``python -m balsam.launcher`` (serial mode), real bash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states

SECRETS = {"BALSAM_AUTH_SECRET_KEY": "signing-key-0123456789abcdef0123456789",
           "BALSAM_DATABASE_URL": "postgresql://balsam:hunter2@db/balsam", "BALSAM_INVITATION": "invite-abc"}
#: Counts the lines of a process's exec-time environment naming a secret.
_COUNT = "tr '\\0' '\\n' < /proc/{pid}/environ | grep -c -E '^BALSAM_(AUTH_SECRET_KEY|DATABASE_URL|INVITATION)='"


@pytest.mark.parametrize("mode,spawner", [("serial", True), ("serial", False),
                                          pytest.param("mpi", True, marks=pytest.mark.mpi)])
def test_a_launchers_jobs_shells_never_hold_the_server_secrets(mode: str, spawner: bool, new_site,
                                                                tmp_path: Path) -> None:
    """With the spawner (the default), the job's shell is its child: the spawner, started by the
    launcher, holds none either. Without (``BALSAM_LAUNCHER_SPAWNER=0``) the launcher starts the
    shell itself: its own /proc environ is what it was started with, which no removal changes."""
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = new_site(idle_ttl_sec=2)

    class Inspect(ApplicationDefinition):
        site = name
        # The app: its own environment (exec'd by bash or not, it inherits bash's).
        command_template = "sh -c \"echo app: $(" + _COUNT.format(pid="$$") + ")\""

        def shell_preamble(self):
            return (f"echo shell: $({_COUNT.format(pid='$$')}); echo parent: $({_COUNT.format(pid='$PPID')}); "
                    "trap 'echo bye' EXIT")

    Inspect.sync()
    ids = make_runnable([Inspect.submit(workdir="inspect", save=False)])
    if mode == "mpi":
        batch_job = BatchJob.objects.create(site_id=Inspect.resolve_site_id(), project="local", queue="local",
                                            num_nodes=1, wall_time_min=1, job_mode=mode, scheduler_id=4244)
        env = {"BALSAM_BATCH_JOB_ID": str(batch_job.id)}
    else:
        env = {"BALSAM_LOCAL_JOB_ID": "4244"}
    if not spawner:
        env["BALSAM_LAUNCHER_SPAWNER"] = "0"
    proc = start_launcher(path, mode, 1, env={**env, **SECRETS})
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR", "JOB_FINISHED", "FAILED"}, timeout=90)
    assert finish(proc) == 0
    out = (path / "data" / "inspect" / "job.out").read_text()
    assert str(jobs[ids[0]].state) in ("RUN_DONE", "JOB_FINISHED"), out
    # grep -c prints 0 (and exits 1, which $(...) ignores) when no line names one.
    lines = out.splitlines()
    assert lines[0] == "shell: 0" and lines[2:] == ["app: 0", "bye"], out
    assert lines[1] == ("parent: 0" if spawner else "parent: 3"), out


def test_drop_server_secrets_removes_them_from_the_process_and_its_children() -> None:
    """In a child Python (never this pytest worker's environment)."""
    from balsam.launcher import server_secrets

    script = ("import os, subprocess, sys\n"
              "from balsam.launcher.server_secrets import drop_server_secrets\n"
              "print(sorted(drop_server_secrets()))\n"
              "print(sorted(k for k in os.environ if k.startswith('BALSAM_')))\n"
              "subprocess.run(['sh', '-c', 'env | grep ^BALSAM_ | cut -d= -f1 | sort'], check=False)\n"
              "print(drop_server_secrets())\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}, **SECRETS, "BALSAM_OTHER": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(sorted(SECRETS)), "['BALSAM_OTHER']", "BALSAM_OTHER", "[]"], run.stdout
    # A mapping of one's own is left as given but for them.
    mine = {**SECRETS, "KEEP": "1"}
    assert sorted(server_secrets.drop_server_secrets(mine)) == sorted(SECRETS) and mine == {"KEEP": "1"}
