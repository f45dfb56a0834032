"""The templates shown in docs/job-template.md render for a sample BatchJob into scripts bash accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from balsam.site.job_template import DEFAULT_JOB_TEMPLATE, build_context, render_job_script

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


@pytest.mark.parametrize("template", TEMPLATES, ids=["slurm", "pbs"])
def test_documented_template_exports_the_start_time_before_any_set_up(template):
    # Every template needs it right after the directives (the page says so): the launcher counts
    # its wall time from then, set-up commands included.
    lines = [line for line in template.splitlines()[1:] if line.strip()]
    first_command = next(i for i, line in enumerate(lines) if not line.startswith(("#", "{%")))
    assert lines[first_command] == "export BALSAM_LAUNCHER_START_TIME=$(date +%s)"


def test_the_minimal_block_keeps_the_start_time():
    block = re.search(r"## What a template must keep\n\n```bash\n(.*?)\n```", PAGE.read_text(), re.DOTALL)
    assert block and "export BALSAM_LAUNCHER_START_TIME=$(date +%s)" in block.group(1)


def test_generic_template_header_and_the_page_name_every_variable(tmp_path):
    batch_job = {"id": 3, "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 10, "job_mode": "serial"}
    variables = set(build_context(batch_job, tmp_path, call_hook=False))
    header = " ".join(line for line in DEFAULT_JOB_TEMPLATE.splitlines() if line.startswith("#"))
    assert "docs/job-template.md#variables" in header
    assert {v for v in variables if not re.search(rf"\b{v}\b", header)} == set()
    table = PAGE.read_text().split("## Variables", 1)[1].split("\n## ", 1)[0]
    assert {v for v in variables if f"`{v}`" not in table} == set()
