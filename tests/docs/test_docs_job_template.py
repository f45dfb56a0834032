"""The templates shown in docs/job-template.md render for a sample BatchJob into scripts bash accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from balsam.site.job_template import build_context, render_job_script

PAGE = Path(__file__).resolve().parents[2] / "docs" / "job-template.md"
TEMPLATES = [body for body in re.findall(r"```bash\n(.*?)\n```", PAGE.read_text(), re.DOTALL) if body.startswith("#!")]


def test_the_page_shows_whole_templates():
    assert len(TEMPLATES) == 2


@pytest.mark.parametrize("template", TEMPLATES, ids=["slurm", "pbs"])
def test_documented_template_renders(template, tmp_path):
    batch_job = {"id": 12, "project": "m1234", "queue": "regular", "num_nodes": 2, "wall_time_min": 90,
                 "job_mode": "mpi", "filter_tags": {"wf": "a"}, "optional_params": {"gpus_per_node": "2"}}
    script = render_job_script(template + "\n", build_context(batch_job, tmp_path, call_hook=False))
    assert "-j mpi -t 88 --tag wf=a" in script and "export BALSAM_BATCH_JOB_ID=12" in script
    assert "#SBATCH --gpus-per-node=2" in script or "#PBS -l walltime=1:30:00" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
