"""``job ls``, ``app ls`` and ``queue ls`` print a header line, then one line per row, as Balsam 0.7
did: the 0.7 idiom ``balsam job ls ... | awk 'NR>1{print $1}'`` reads the ids (an underline of
dashes under the header read as the id "--")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    path = tmp_path / "site-tab"
    (path / "data").mkdir(parents=True)
    return Site.objects.create(name="site-tab", path=str(path), allowed_projects=["proj"],
                               allowed_queues={"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 5}})


def _first_words_after_header(output: str) -> list[str]:
    """What ``awk 'NR>1{print $1}'`` prints."""
    return [line.split()[0] for line in output.splitlines()[1:] if line.split()]


def test_job_app_and_queue_ls_rows_follow_the_header(site: Any) -> None:
    from balsam.api import ApplicationDefinition, BatchJob, Job

    class Tab(ApplicationDefinition):
        site = "site-tab"
        command_template = "echo hi"

    Tab.sync()
    jobs = Job.objects.bulk_create([Job(workdir=f"t/{i}", app_id=Tab) for i in range(3)])
    batch = BatchJob.objects.create(site_id=site.id, project="proj", queue="debug", num_nodes=1, wall_time_min=5,
                                    job_mode="mpi")

    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0].split()[0] == "ID"
    assert _first_words_after_header(out.output) == [str(j.id) for j in sorted(jobs, key=lambda j: j.id)]

    out = balsam("app", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    assert _first_words_after_header(out.output) == [str(Tab.__app_id__)]

    out = balsam("queue", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    assert _first_words_after_header(out.output) == [str(batch.id)]
