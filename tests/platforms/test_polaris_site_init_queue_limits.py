"""``balsam site init --platform polaris`` on a login node whose PBS server reports queue limits
(``qstat -Q -f -F json``, the recorded Polaris output): for a queue both name, the stricter limit
wins over the platform's hard-coded one; queues only the platform names stay."""

from __future__ import annotations

from pathlib import Path

import yaml

from platform_harness import polaris_site_init

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "pbs" / "qstat_Qf_json.txt"


def test_live_queue_limits_win_when_stricter(balsam_env, client, tmp_path: Path) -> None:
    proc, path = polaris_site_init(tmp_path, QSTAT_Q)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    queues = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_queues"]
    # The server's "max_queued":"[u:PBS_GENERIC=1]" beats the platform's 100.
    assert queues["debug"] == {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}
    assert queues["debug-scaling"] == {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 1}
    # Not reported with a node limit by the server: the platform's values stay.
    assert queues["preemptable"] == {"max_nodes": 10, "max_walltime": 4320, "max_queued_jobs": 20}
    assert queues["prod"]["max_nodes"] == 496
