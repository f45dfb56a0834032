"""What a new user met typing the README and docs/ as written (the "walk" audit of 7 December).

- ``balsam queue ls --submitted-by -`` (docs/cli.md: "only those no program marked (e.g. your
  own)") answered an empty selection with ``No active batch jobs submitted by -.``, as if "-" were a
  program's name; it now says what "-" selects."""

from __future__ import annotations

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


@pytest.fixture
def site(balsam_env, tmp_path):
    from balsam.api import Site

    path = tmp_path / "wsite"
    (path / "data").mkdir(parents=True)
    site = Site.objects.create(name="wsite", path=str(path), allowed_projects=["proj"],
                               allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}})
    (path / ".balsam-site").write_text(f"{site.id}\n")
    return site


def test_an_empty_submitted_by_dash_listing_says_what_dash_selects(site):
    from balsam.api import BatchJob

    BatchJob(site_id=site.id, num_nodes=1, wall_time_min=30, queue="debug", project="proj", job_mode="mpi",
             status_info={"submitted_by": "elastic_queue"}).save()  # marked: "-" does not select it
    out = balsam("queue", "ls", "--site", "all", "--submitted-by", "-")
    assert out.exit_code == 0 and out.output == "No active batch jobs that no program marked (`--submitted-by -`).\n", \
        out.output
    out = balsam("queue", "ls", "--site", "all", "--history", "--submitted-by", "queue_maintainer",
                 "--submitted-by", "-")
    assert out.exit_code == 0, out.output
    assert out.output == ("No batch jobs submitted by queue_maintainer, nor any that no program marked "
                          "(`--submitted-by -`).\n"), out.output
    out = balsam("queue", "ls", "--site", "all", "--submitted-by", "nobody")  # a name alone: as before
    assert out.exit_code == 0 and out.output == "No active batch jobs submitted by nobody.\n", out.output
