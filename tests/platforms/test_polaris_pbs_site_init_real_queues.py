"""``balsam site init --platform polaris`` against what the real Polaris PBS server prints for
``qstat -Q -f -F json`` (tests/schedulers/data/polaris_pbs/qstat_Qf_json_polaris.txt, ALCF's own
recording): ``debug`` states its per-user limit of waiting jobs as ``queued_jobs_threshold``, not
``max_queued``. settings.yml said ``max_queued_jobs: 100`` for it, and qsub refused every second
waiting debug BatchJob."""

from __future__ import annotations

from pathlib import Path

import yaml

from platform_harness import polaris_site_init

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "polaris_pbs" / "qstat_Qf_json_polaris.txt"


def test_site_init_writes_the_debug_queues_limit_of_waiting_jobs(balsam_env, client, tmp_path: Path) -> None:
    proc, path = polaris_site_init(tmp_path, QSTAT_Q, "-A", "PROJ")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scheduler = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]
    queues = scheduler["allowed_queues"]
    assert queues["debug"] == {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 2}
    # prod's limit is per project ("[p:PBS_GENERIC=100]"): the platform's value stays, with the server's minimum
    assert queues["prod"] == {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10}
    assert scheduler["allowed_projects"] == ["PROJ"]
    assert scheduler["optional_batch_job_params"]["filesystems"] == "home:eagle"
