"""A new Perlmutter site accepts ``-x exclusive=no`` out of the box: the Slurm driver asks for whole
nodes (``--exclusive``) by default, which the shared QOS refuses or charges as whole nodes, and a
BatchJob's optional param not listed in ``optional_batch_job_params`` is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.batch_job_rules import check_batch_job
from balsam.scheduler import SubmitRequest
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from balsam_scheduler_slurm.scheduler import SlurmScheduler


@pytest.mark.parametrize("platform_class", [PerlmutterGPUPlatform, PerlmutterCPUPlatform])
def test_perlmutter_defaults_accept_exclusive_no(platform_class, tmp_path: Path) -> None:
    scheduler = platform_class().settings_defaults()["scheduler"]
    params = scheduler["optional_batch_job_params"]
    request = {"queue": "regular", "project": "m1234", "num_nodes": 1, "wall_time_min": 10,
               "optional_params": {"exclusive": "no"}}
    check_batch_job(request, scheduler["allowed_queues"], [], params)  # not refused as an unknown param
    # The default value adds nothing: the driver's own --exclusive stays for every other BatchJob.
    slurm = SlurmScheduler(user="me", options=scheduler["options"])
    script = tmp_path / "qlaunch00001.sh"

    def sbatch(optional_params: dict[str, str]) -> list[str]:
        return list(slurm.render_submit(SubmitRequest(script_path=script, project="m1234", queue="shared", num_nodes=1,
                                                      wall_time_min=10, optional_params=optional_params)).args)

    assert "--exclusive" in sbatch(dict(params))
    assert "--exclusive" not in sbatch({**params, "exclusive": "no"})
