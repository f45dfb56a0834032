"""``balsam site init --platform polaris`` against what the real Polaris PBS server prints for
``qstat -Q -f -F json`` (tests/schedulers/data/polaris_pbs/qstat_Qf_json_polaris.txt, ALCF's own
recording): ``debug`` states its per-user limit of waiting jobs as ``queued_jobs_threshold``, not
``max_queued``. settings.yml said ``max_queued_jobs: 100`` for it, and qsub refused every second
waiting debug BatchJob."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "polaris_pbs" / "qstat_Qf_json_polaris.txt"


def test_site_init_writes_the_debug_queues_limit_of_waiting_jobs(balsam_env, client, tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    qstat = fake_bin / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec cat {QSTAT_Q}\n")
    qstat.chmod(0o755)
    path = tmp_path / "polaris-site"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "init",
                           "--platform", "polaris", "-A", "PROJ", "-n", "polaris-site", str(path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scheduler = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]
    queues = scheduler["allowed_queues"]
    assert queues["debug"] == {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 2}
    # prod's limit is per project ("[p:PBS_GENERIC=100]"): the platform's value stays, with the server's minimum
    assert queues["prod"] == {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10}
    assert scheduler["allowed_projects"] == ["PROJ"]
    assert scheduler["optional_batch_job_params"]["filesystems"] == "home:eagle"
