"""``balsam site init --platform polaris`` on a login node whose PBS server reports queue limits
(``qstat -Q -f -F json``, the recorded Polaris output): for a queue both name, the stricter limit
wins over the platform's hard-coded one; queues only the platform names stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "pbs" / "qstat_Qf_json.txt"


def test_live_queue_limits_win_when_stricter(balsam_env, client, tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    qstat = fake_bin / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec cat {QSTAT_Q}\n")
    qstat.chmod(0o755)
    path = tmp_path / "polaris-site"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "init",
                           "--platform", "polaris", "-n", "polaris-site", str(path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    queues = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_queues"]
    # The server's "max_queued":"[u:PBS_GENERIC=1]" beats the platform's 100.
    assert queues["debug"] == {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}
    assert queues["debug-scaling"] == {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 1}
    # Not reported with a node limit by the server: the platform's values stay.
    assert queues["preemptable"] == {"max_nodes": 10, "max_walltime": 4320, "max_queued_jobs": 20}
    assert queues["prod"]["max_nodes"] == 496
