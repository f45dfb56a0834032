"""The job template: variables of inventory §7.4, rendering errors, and the template-context hook."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from balsam.models import BatchJob, BatchJobPartition
from balsam.site.job_template import (
    DEFAULT_JOB_TEMPLATE,
    JobTemplateError,
    build_context,
    default_template_for,
    launcher_command,
    render_job_script,
)
from balsam.states import BatchJobMode


def make_batch_job(**fields) -> BatchJob:
    base = dict(id=7, site_id=1, project="proj", queue="debug", num_nodes=2, wall_time_min=30, job_mode=BatchJobMode.mpi)
    base.update(fields)
    return BatchJob(**base)


def test_context_has_every_template_variable(tmp_path: Path) -> None:
    batch_job = make_batch_job(
        optional_params={"shout": "yes"},
        filter_tags={"workflow": "demo", "system": "h2o"},
        partitions=[
            BatchJobPartition(job_mode=BatchJobMode.mpi, num_nodes=1, filter_tags={"role": "leader"}),
            BatchJobPartition(job_mode=BatchJobMode.serial, num_nodes=1),
        ],
    )
    context = build_context(batch_job, tmp_path, default_optional_params={"shout": "no", "mig_count": "0"})
    for name in ("project", "queue", "num_nodes", "wall_time_min", "job_mode", "filter_tags", "partitions",
                 "optional_params", "balsam_site_path", "balsam_bin", "pg_bin", "launcher_cmd", "batch_job_id"):
        assert name in context, name
    assert context["project"] == "proj" and context["queue"] == "debug" and context["num_nodes"] == 2
    assert context["job_mode"] == "mpi"
    assert context["batch_job_id"] == 7
    # the BatchJob's -x values win over the site's defaults, which fill in the rest
    assert context["optional_params"] == {"shout": "yes", "mig_count": "0"}
    assert context["partitions"] == " --part mpi:1:role=leader --part serial:1"
    assert context["tags"] == " --tag system=h2o --tag workflow=demo"
    assert context["launcher_cmd"] == f"{shlex.quote(sys.executable)} -m balsam.launcher"
    assert context["balsam_site_path"] == str(tmp_path.resolve())
    assert context["launcher_wall_time_min"] == 28


def test_launcher_wall_time_leaves_a_margin(tmp_path: Path) -> None:
    assert build_context(make_batch_job(wall_time_min=1), tmp_path)["launcher_wall_time_min"] == 1
    assert build_context(make_batch_job(wall_time_min=5), tmp_path)["launcher_wall_time_min"] == 4
    assert build_context(make_batch_job(wall_time_min=60), tmp_path)["launcher_wall_time_min"] == 58


def test_default_template_exports_site_and_batch_job_and_runs_the_launcher(tmp_path: Path) -> None:
    context = build_context(make_batch_job(filter_tags={"k": "v"}), tmp_path / "my site")
    script = render_job_script(DEFAULT_JOB_TEMPLATE, context)
    assert f"export BALSAM_SITE_PATH={shlex.quote(str((tmp_path / 'my site').resolve()))}" in script
    assert "export BALSAM_BATCH_JOB_ID=7" in script
    assert f"{launcher_command()} -j mpi -t 28 --tag k=v" in script
    # the script is valid bash
    path = tmp_path / "script.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_launcher_command_is_understood_by_the_launcher() -> None:
    proc = subprocess.run([sys.executable, "-m", "balsam.launcher", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("-j", "-t", "--tag", "--part"):
        assert option in proc.stdout


def test_template_syntax_error_names_the_file_and_line() -> None:
    with pytest.raises(JobTemplateError) as info:
        render_job_script("#!/bin/bash\necho ok\n{% if %}\n", {}, source="/site/job-template.sh")
    assert str(info.value).startswith("/site/job-template.sh:3:")


def test_default_template_choice() -> None:
    class Platform:
        def __init__(self, text):
            self.text = text

        def job_template(self):
            return self.text

    class Scheduler:
        default_job_template = "#!/bin/bash\n# scheduler template\n"

    assert default_template_for(Platform("#!/bin/bash\n# platform\n"), Scheduler) == "#!/bin/bash\n# platform\n"
    assert default_template_for(Platform(None), Scheduler) == Scheduler.default_job_template
    assert default_template_for(Platform(None), object) == DEFAULT_JOB_TEMPLATE


def test_hook_balsam_job_template_context(tmp_path: Path) -> None:
    """A plugin adds a variable and changes one; the rendered script shows both."""
    from balsam.plugins.hookspecs import hookimpl
    from balsam.plugins.manager import get_plugin_manager

    seen = []

    class ProxyPlugin:
        @hookimpl
        def balsam_job_template_context(self, batch_job, context):
            seen.append(batch_job.id)
            context["http_proxy"] = "http://proxy.example:3128"
            context["optional_params"]["filesystems"] = "home:eagle"

    get_plugin_manager().add_plugin(ProxyPlugin(), name="test-proxy-plugin")
    template = DEFAULT_JOB_TEMPLATE + "export http_proxy={{ http_proxy }}\n"
    script = render_job_script(template, build_context(make_batch_job(), tmp_path))
    assert seen == [7]
    assert "export http_proxy=http://proxy.example:3128" in script
    assert "# optional param filesystems=home:eagle" in script
