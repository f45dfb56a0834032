"""The site agent removes the server's secrets from its own environment as it starts: the
scheduler commands it runs (``sbatch`` exports the whole environment by default, ``qsub -V`` too),
so the batch job, its launcher and spawner, and the processing hooks, which run in the agent,
never hold them. Before, the shell that started ``balsam site start`` (the same login node, the
same ``.bashrc`` as ``balsam server start``) passed the token signing key and the database URL
with its password to all of them.

The agent's ``main`` runs in a child Python on a site directory, with its Agent replaced by one
that runs a scheduler command as the scheduler plugins do (``balsam.scheduler.subprocess_runner``,
``env`` in ``sbatch``'s place) and looks at its own environment: never in this pytest worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SECRETS = {"BALSAM_AUTH_SECRET_KEY": "signing-key-0123456789abcdef0123456789",
           "BALSAM_DATABASE_URL": "postgresql://balsam:hunter2@db/balsam", "BALSAM_INVITATION": "invite-abc"}

SCRIPT = """
import os, sys
from balsam.scheduler import Command, subprocess_runner
from balsam.site import agent

class Inspecting:
    def __init__(self, site_config, end_children=False):
        pass

    def run(self, before_start=None):
        seen = sorted(k for k in os.environ if k.startswith("BALSAM_") and k != "BALSAM_SITE_PATH")
        print("agent:", seen)
        # What a scheduler plugin runs sbatch/qsub with: os.environ plus the command's own variables.
        out = subprocess_runner(Command(["env"], env={"SBATCH_EXPORT_TEST": "1"})).stdout
        print("sbatch:", sorted(l.split("=")[0] for l in out.splitlines() if l.startswith("BALSAM_")
                                and not l.startswith("BALSAM_SITE_PATH=")))
        return 0

agent.Agent = Inspecting
sys.exit(agent.main([sys.argv[1]]))
"""


def test_the_agent_and_the_batch_jobs_it_submits_never_hold_the_server_secrets(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for sub in ("data", "log", "qsubmit"):
        (site / sub).mkdir(parents=True)
    (site / "settings.yml").write_text("launcher:\n  idle_ttl_sec: 3\n")
    (site / ".balsam-site").write_text("1\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}, **SECRETS,
           "BALSAM_HOME": str(tmp_path / "home"), "BALSAM_KEEP_ME": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(site)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith(("agent:", "sbatch:"))]
    assert lines == ["agent: ['BALSAM_HOME', 'BALSAM_KEEP_ME']", "sbatch: ['BALSAM_HOME', 'BALSAM_KEEP_ME']"], \
        run.stdout + run.stderr
    # The secrets' names are logged (never their values).
    log = "".join(p.read_text() for p in (site / "log").glob("*"))
    assert "BALSAM_AUTH_SECRET_KEY, BALSAM_DATABASE_URL, BALSAM_INVITATION are not kept" in log, log
    assert not any(value in log + run.stdout + run.stderr for value in SECRETS.values())
