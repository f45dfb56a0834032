"""``balsam site init`` where the scheduler does not report a queue's per-user queued-jobs limit
(a PBS queue without ``max_queued``, any Slurm partition: sinfo shows no QOS limits): the platform's
documented limit stays (it used to be cut to a placeholder 20), a limit the server does report still
wins when stricter, and the placeholder is written only where neither gives one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from balsam.site.site_ops import stricter_queue_limits

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "pbs" / "qstat_Qf_json.txt"


def test_merge_keeps_the_platform_limit_where_the_scheduler_reports_none() -> None:
    platform = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100},
                "debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 100}}
    discovered = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": None},
                  "debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}}
    merged = stricter_queue_limits(discovered, platform)
    assert merged["prod"]["max_queued_jobs"] == 100
    assert merged["debug"]["max_queued_jobs"] == 1


def _qstat_without_limits(tmp_path: Path) -> Path:
    """The recorded Polaris ``qstat -Q -f -F json`` with no max_queued on prod, plus a queue the
    platform does not name (also without max_queued)."""
    doc = json.loads(QSTAT_Q.read_text())
    doc["Queue"]["prod"].pop("max_queued")
    doc["Queue"]["site-extra"] = {"queue_type": "Execution", "resources_max": {"nodect": 4, "walltime": "02:00:00"},
                                  "enabled": "True", "started": "True"}
    recorded = tmp_path / "qstat_Q.json"
    recorded.write_text(json.dumps(doc))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    qstat = fake_bin / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec cat {recorded}\n")
    qstat.chmod(0o755)
    return fake_bin


def test_site_init_keeps_the_platform_limit_the_server_does_not_report(balsam_env, client, tmp_path: Path) -> None:
    fake_bin = _qstat_without_limits(tmp_path)
    path = tmp_path / "polaris-site"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "init",
                           "--platform", "polaris", "-n", "polaris-unreported", str(path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    queues = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_queues"]
    assert queues["prod"] == {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10}  # not 20
    assert queues["debug"]["max_queued_jobs"] == 1  # reported by the server and stricter
    # Named by neither with a limit: the placeholder, so that settings.yml loads.
    assert queues["site-extra"] == {"max_nodes": 4, "max_walltime": 120, "max_queued_jobs": 20}
