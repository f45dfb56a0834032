"""``balsam site init`` writes the ``min_nodes`` a PBS server reports (``resources_min.nodect`` of
``qstat -Q -f -F json``) into settings.yml, only for queues whose minimum is above 1; a platform's
documented minimum and the server's are merged at the stricter (larger) one; a value the user gives
wins over both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from balsam.site.site_ops import init_site, stricter_queue_limits

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "pbs" / "qstat_Qf_json.txt"


def _fake_qstat(tmp_path: Path) -> Path:
    """The recorded Polaris ``qstat -Q -f -F json`` where prod states ``resources_min.nodect`` 10
    (as Polaris' prod, 10 to 496 nodes) and debug-scaling 2 (a minimum no platform states); debug
    keeps its minimum wall time only."""
    doc = json.loads(QSTAT_Q.read_text())
    doc["Queue"]["prod"]["resources_min"] = {"nodect": 10, "walltime": "00:05:00"}
    doc["Queue"]["debug-scaling"]["resources_min"] = {"nodect": 2}
    recorded = tmp_path / "qstat_Q.json"
    recorded.write_text(json.dumps(doc, indent=4))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    qstat = fake_bin / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec cat {recorded}\n")
    qstat.chmod(0o755)
    return fake_bin


def _site_init(tmp_path: Path, fake_bin: Path, name: str, *args: str) -> dict:
    path = tmp_path / name
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "init", *args,
                           "-n", name, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_queues"]


def test_discovered_min_nodes_are_written_only_above_one(balsam_env, client, tmp_path: Path) -> None:
    queues = _site_init(tmp_path, _fake_qstat(tmp_path), "pbs-generic", "--platform", "default", "--scheduler", "pbs")
    assert queues["prod"] == {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10}
    assert queues["debug-scaling"] == {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 1, "min_nodes": 2}
    assert queues["debug"] == {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}


def test_polaris_site_gets_the_servers_minimum_beside_the_platforms(balsam_env, client, tmp_path: Path) -> None:
    queues = _site_init(tmp_path, _fake_qstat(tmp_path), "polaris-min", "--platform", "polaris")
    assert queues["prod"]["min_nodes"] == 10
    assert queues["debug-scaling"]["min_nodes"] == 2  # stated by the server only
    assert "min_nodes" not in queues["debug"]


def test_min_nodes_merge_takes_the_larger_unless_no_size_is_left() -> None:
    platform = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10},
                "tiny": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5, "min_nodes": 2},
                "small": {"max_nodes": 24, "max_walltime": 60, "max_queued_jobs": 5}}
    discovered = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 16},
                  "tiny": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 5, "min_nodes": 6},
                  "small": {"max_nodes": 24, "max_walltime": 60, "max_queued_jobs": 5, "min_nodes": 10}}
    merged = stricter_queue_limits(discovered, platform)
    assert merged["prod"]["min_nodes"] == 16
    assert merged["tiny"] == {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5, "min_nodes": 2}
    assert "min_nodes" not in merged["small"]  # the discovered one comes in with the merge of the two
    platform["prod"]["min_nodes"] = 32
    assert stricter_queue_limits(discovered, platform)["prod"]["min_nodes"] == 32


def test_the_users_min_nodes_wins_over_the_discovered_one(balsam_env, client, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{_fake_qstat(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "pbs-user"
    init_site(path, "pbs-user", "default", client, scheduler_name="pbs",
              settings_overrides={"scheduler": {"allowed_queues": {"prod": {"min_nodes": 1},
                                                                    "debug-scaling": {"min_nodes": 4}}}})
    queues = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_queues"]
    # The user's 1 is written as 1 always is: left out (the server said 10).
    assert "min_nodes" not in queues["prod"] and queues["debug-scaling"]["min_nodes"] == 4
