"""Every shipped job template tells the launcher when the allocation started.

The launcher counts its wall time from ``BALSAM_LAUNCHER_START_TIME`` (else from its own start):
without it, the minutes a batch script spends before the launcher (prologue, module loads, a
conda environment on a parallel file system, Theta's image-cache warm-up) were not counted, and
jobs were timed out after the scheduler had already killed the allocation.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from balsam.site.job_template import DEFAULT_JOB_TEMPLATE, build_context, render_job_script
from balsam_platform_aurora import AuroraPlatform, SunspotPlatform
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from balsam_platform_polaris import PolarisPlatform
from balsam_platform_theta import ThetaGPUPlatform, ThetaKNLPlatform
from balsam_scheduler_cobalt.scheduler import CobaltScheduler
from balsam_scheduler_pbs.scheduler import PBSScheduler
from balsam_scheduler_slurm.scheduler import SlurmScheduler

EXPORT = "export BALSAM_LAUNCHER_START_TIME=$(date +%s)"
DIRECTIVE = re.compile(r"^#(SBATCH|PBS|COBALT)\b")

TEMPLATES = {
    "default": DEFAULT_JOB_TEMPLATE,
    "slurm": SlurmScheduler.default_job_template,
    "pbs": PBSScheduler.default_job_template,
    "cobalt": CobaltScheduler.default_job_template,
    **{cls.name: cls().job_template() for cls in (AuroraPlatform, SunspotPlatform, PolarisPlatform, PerlmutterGPUPlatform,
                                                   PerlmutterCPUPlatform, ThetaKNLPlatform, ThetaGPUPlatform)},
}


@pytest.mark.parametrize("optional_params", [{}, {"singularity_prime_cache": "yes", "mig_count": "2"}])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_start_time_is_exported_first_after_the_directives(name: str, optional_params: dict, tmp_path: Path) -> None:
    batch_job = {"id": 7, "project": "p", "queue": "q", "num_nodes": 2, "wall_time_min": 30, "job_mode": "mpi",
                 "filter_tags": {}, "optional_params": optional_params, "partitions": []}
    script = render_job_script(TEMPLATES[name], build_context(batch_job, tmp_path, call_hook=False))
    lines = script.splitlines()
    assert EXPORT in lines, name
    at = lines.index(EXPORT)
    # Before any command (the set-up it must count) and after every directive (the scheduler stops
    # reading directives at the first command).
    commands_before = [line for line in lines[1:at] if line.strip() and not line.lstrip().startswith("#")]
    assert commands_before == [], (name, commands_before)
    assert not any(DIRECTIVE.match(line) for line in lines[at:]), name
    assert any("balsam.launcher" in line for line in lines[at:]), name
    # What the line sets is what the launcher reads: a number of seconds since the epoch.
    out = subprocess.run(["bash", "-c", f"{EXPORT}; echo $BALSAM_LAUNCHER_START_TIME"], capture_output=True, text=True)
    assert float(out.stdout) > 1.7e9
