"""Values a user controls in a BatchJob, rendered into its batch script and run with bash.

The launcher is replaced by a stub that prints the arguments it got, one per ``[...]``. A newline in
a ``-x`` value or a project used to start a line of its own in the script (a command bash ran, or a
``#SBATCH`` directive the scheduler obeyed); a tag key with ``=``, a tag value with spaces at an end
(the launcher strips them) or a partition tag value with ``:`` made the launcher filter on other
tags than the BatchJob's. Such a BatchJob is now refused with one line naming it and the value; the
values that can be carried (spaces, quotes, ``$()`` inside a tag value, a site path with a space)
reach the launcher exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balsam.models import BatchJob, BatchJobPartition
from balsam.site.job_template import DEFAULT_JOB_TEMPLATE, JobTemplateError, build_context, render_job_script
from balsam.states import BatchJobMode

STUB = "#!/bin/bash\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done; echo; echo \"cwd=$PWD\"\n"


def make_batch_job(**fields) -> BatchJob:
    base = dict(id=7, site_id=1, project="proj", queue="debug", num_nodes=2, wall_time_min=30, job_mode=BatchJobMode.mpi)
    base.update(fields)
    return BatchJob(**base)


def run_script(tmp_path: Path, site: Path, batch_job: BatchJob) -> str:
    """Render the default template for ``batch_job`` and run it with bash, the launcher stubbed."""
    site.mkdir(parents=True, exist_ok=True)
    stub = tmp_path / "launcher-stub.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    context = build_context(batch_job, site, call_hook=False)
    context["launcher_cmd"] = f"{stub} -m balsam.launcher"
    script = tmp_path / "batch.sh"
    script.write_text(render_job_script(DEFAULT_JOB_TEMPLATE, context))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fields, named", [
    (dict(optional_params={"shout": "yes\ntouch {marker}"}), "optional param 'shout' value"),
    (dict(optional_params={"reservation": "r1\n#SBATCH --uid=0\ntouch {marker}"}), "optional param 'reservation' value"),
    (dict(project="proj\ntouch {marker}"), "project"),
    (dict(filter_tags={"k": "v\ntouch {marker}"}), "filter_tags 'k' value"),
    (dict(project="proj --uid=0"), "project"),
])
def test_a_value_that_would_inject_a_line_is_refused(tmp_path: Path, fields: dict, named: str) -> None:
    marker = tmp_path / "INJECTED"
    fields = {k: ({kk: vv.format(marker=marker) for kk, vv in v.items()} if isinstance(v, dict) else v.format(marker=marker))
              for k, v in fields.items()}
    with pytest.raises(JobTemplateError) as info:
        run_script(tmp_path, tmp_path / "site", make_batch_job(**fields))
    message = str(info.value)
    assert "\n" not in message and message.startswith("BatchJob 7: ") and named in message, message
    assert not marker.exists()


@pytest.mark.parametrize("fields, named", [
    (dict(filter_tags={"a=b": "c"}), "filter_tags key 'a=b'"),  # the launcher read a tag a=b=c as a -> b=c
    (dict(filter_tags={"k": " v "}), "filter_tags 'k' value"),  # ... and ' v ' as 'v'
    (dict(num_nodes=1, partitions=[BatchJobPartition(job_mode=BatchJobMode.mpi, num_nodes=1, filter_tags={"k": "a:b"})]),
     "partition 0 filter_tags 'k' value"),  # mpi:1:k=a:b -> a bad --part, the launcher exits
    (dict(num_nodes=1, partitions=[BatchJobPartition(job_mode=BatchJobMode.mpi, num_nodes=1, filter_tags={"x:y": "z"})]),
     "partition 0 filter_tags key"),
])
def test_a_tag_the_launcher_would_read_otherwise_is_refused(tmp_path: Path, fields: dict, named: str) -> None:
    with pytest.raises(JobTemplateError) as info:
        build_context(make_batch_job(**fields), tmp_path, call_hook=False)
    assert str(info.value).startswith("BatchJob 7: ") and named in str(info.value)


def test_spaces_quotes_and_substitutions_reach_the_launcher_exactly(tmp_path: Path) -> None:
    site = tmp_path / "my site's dir $(touch INJECTED)"
    batch_job = make_batch_job(
        num_nodes=2,
        filter_tags={"experiment": "run one's \"best\" $(touch INJECTED) `id`"},
        partitions=[BatchJobPartition(job_mode=BatchJobMode.serial, num_nodes=2, filter_tags={"role": "a b 'c' $HOME"})],
        optional_params={"note": "it's a \"test\" $(touch INJECTED)"},
    )
    out = run_script(tmp_path, site, batch_job)
    args, cwd = out.splitlines()
    assert args == ("[-m][balsam.launcher][-j][mpi][-t][28]"
                    "[--tag][experiment=run one's \"best\" $(touch INJECTED) `id`]"
                    "[--part][serial:2:role=a b 'c' $HOME]"), args
    assert cwd == f"cwd={site.resolve()}"
    assert not (tmp_path / "INJECTED").exists() and not (site / "INJECTED").exists()


def test_the_scheduler_module_marks_such_a_batch_job_submit_failed_and_submits_nothing(make_site, client) -> None:
    """Through the API (which takes such a value) and the agent's scheduler module."""
    from balsam.site.modules.scheduler import SchedulerModule
    from site_test_utils import create_batch_job
    from test_site_scheduler_module import ScriptedScheduler

    site = make_site(overrides={"scheduler": {
        "allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 10}},
        "optional_batch_job_params": {"reservation": ""},
    }})
    fake = ScriptedScheduler()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    bad = create_batch_job(client, site.site_id, optional_params={"reservation": "r1\n#SBATCH --uid=0"})
    good = create_batch_job(client, site.site_id, filter_tags={"k": "a b"})
    module.run_cycle()
    rows = {row["id"]: row for row in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]}
    assert rows[bad["id"]]["state"] == "submit_failed", rows[bad["id"]]
    info = str(rows[bad["id"]]["status_info"])
    assert f"BatchJob {bad['id']}" in info and "reservation" in info and "newline" in info, info
    assert rows[good["id"]]["state"] == "queued"
    assert len(fake.submitted) == 1
    scripts = list(Path(site.job_path).glob("*"))
    assert not any("--uid" in p.read_text() for p in scripts if p.is_file()), "a script with the directive was written"


def test_a_colon_in_a_plain_filter_tag_key_reaches_the_launcher_as_written(tmp_path: Path) -> None:
    """``--tag deephyper:search=1``: the launcher splits a plain --tag at its first '=' only, and
    reads the key 'deephyper:search' as written; only a --part tag splits at ':'. Such a key was
    refused in plain filter_tags too."""
    out = run_script(tmp_path, tmp_path / "site", make_batch_job(filter_tags={"deephyper:search": "1"}))
    assert out.splitlines()[0] == "[-m][balsam.launcher][-j][mpi][-t][28][--tag][deephyper:search=1]", out


def test_a_batch_job_the_template_check_refuses_is_refused_for_good(make_site, client) -> None:
    """A BatchJob refused by the template check was submit_failed without ``refused_for_good``:
    queue_maintainer read it as a failed try and went on posting the same doomed request (with
    backoff) for ever. Its own values are refused at every try: refused for good, as a scheduler's
    permanent refusal is."""
    from balsam.scheduler import REFUSED_FOR_GOOD
    from balsam.site.modules.scheduler import SchedulerModule
    from site_test_utils import create_batch_job
    from test_site_scheduler_module import ScriptedScheduler

    site = make_site(overrides={"scheduler": {
        "allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 10}},
    }})
    fake = ScriptedScheduler()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    bad = create_batch_job(client, site.site_id, filter_tags={"a=b": "c"})
    module.run_cycle()
    row = client.get(f"/batch-jobs/{bad['id']}")
    assert row["state"] == "submit_failed", row
    assert "filter_tags key 'a=b'" in row["status_info"].get("error", ""), row["status_info"]
    assert row["status_info"].get(REFUSED_FOR_GOOD) == "true", row["status_info"]
    assert fake.submitted == []


def test_a_bad_value_of_the_site_is_not_the_batch_jobs_refusal_for_good(tmp_path: Path) -> None:
    """A newline in a site default (settings.yml ``optional_batch_job_params``) or the site path is
    refused too, but as the site's (a plain JobTemplateError: fixed in settings.yml, the next try
    renders), not as the BatchJob's own value refused for good (queue_maintainer would then stop
    posting and point at its own keys)."""
    from balsam.site.job_template import ScriptValueRefused

    with pytest.raises(JobTemplateError) as caught:
        build_context(make_batch_job(), tmp_path, default_optional_params={"constraint": "cpu\n#SBATCH --x"},
                      call_hook=False)
    assert not isinstance(caught.value, ScriptValueRefused) and "optional param 'constraint'" in str(caught.value)
    with pytest.raises(ScriptValueRefused):  # the BatchJob's own value, whatever the site's default
        build_context(make_batch_job(optional_params={"constraint": "gpu\n#SBATCH --x"}), tmp_path,
                      default_optional_params={"constraint": "cpu"}, call_hook=False)
    with pytest.raises(JobTemplateError) as caught:
        build_context(make_batch_job(), tmp_path / "a\nb", call_hook=False)
    assert not isinstance(caught.value, ScriptValueRefused)
