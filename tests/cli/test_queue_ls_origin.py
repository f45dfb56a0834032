"""``balsam queue ls`` tells the BatchJobs a program created (an agent module: the elastic queue)
from the user's own: a ``submitted_by`` column from the BatchJob's ``status_info["submitted_by"]``
(a documented key, not any module's own stamp: the CLI knows no particular plugin), after the 0.7
columns and only when one is marked, and ``--submitted-by NAME`` (``-`` for the unmarked) to filter.
Before, nothing in the table told them apart and ``--submitted-by`` did not exist."""

from __future__ import annotations

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)

#: Balsam 0.7's ``queue ls`` columns (shared/reference/balsam-0.7-inventory.md, 1.6), in 0.7's order.
COLUMNS_07 = ["id", "site", "scheduler_id", "state", "filter_tags", "project", "queue", "num_nodes",
              "wall_time_min", "job_mode"]


@pytest.fixture
def site(balsam_env, tmp_path):
    from balsam.api import Site

    path = tmp_path / "qsite"
    (path / "data").mkdir(parents=True)
    site = Site.objects.create(name="qsite", path=str(path), allowed_projects=["proj"],
                               allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}})
    (path / ".balsam-site").write_text(f"{site.id}\n")
    return site


def batch_job(site, **status_info: str):
    from balsam.api import BatchJob

    bj = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=30, queue="debug", project="proj", job_mode="mpi",
                  status_info=dict(status_info))
    bj.save()
    return bj


def table(*args: str) -> tuple[list[str], dict[int, list[str]]]:
    out = balsam("queue", "ls", "--site", "all", *args)
    assert out.exit_code == 0, out.output
    header, *lines = out.output.splitlines()
    rows = {int(line.split()[0]): line.split() for line in lines}
    return header.split(), rows


def test_marked_batch_jobs_get_a_submitted_by_column_after_the_07_columns(site):
    mine = batch_job(site)
    agent = batch_job(site, submitted_by="elastic_queue", elastic_request="backfill")
    headers, rows = table()
    assert headers == COLUMNS_07 + ["submitted_by"]
    # pending_submission: no scheduler id, an empty cell (as before); the mark is the last column.
    assert rows[agent.id][-1] == "elastic_queue"
    assert rows[mine.id][-1] == "-"


def test_no_marked_batch_job_leaves_the_07_table_as_it_was(site):
    batch_job(site)
    batch_job(site, elastic_request="backfill")  # a module's own stamp is not the documented mark
    headers, _ = table()
    assert headers == COLUMNS_07


def test_submitted_by_comes_before_the_reason(site):
    batch_job(site, submitted_by="elastic queue", waiting="waiting: queue debug is at a scheduler limit")
    out = balsam("queue", "ls", "--site", "all")
    header = out.output.splitlines()[0].split()
    assert header == COLUMNS_07 + ["submitted_by", "reason"]
    # One word per cell: whitespace in the mark would shift a whitespace-split parse.
    assert "elastic_queue  waiting: queue debug" in out.output


def test_filter_by_submitter(site):
    mine = batch_job(site)
    agent = batch_job(site, submitted_by="elastic_queue")
    other = batch_job(site, submitted_by="queue_maintainer")
    assert set(table("--submitted-by", "elastic_queue")[1]) == {agent.id}
    assert set(table("--submitted-by", "-")[1]) == {mine.id}
    assert set(table("--submitted-by", "-", "--submitted-by", "queue_maintainer")[1]) == {mine.id, other.id}
    # -n counts what the filter kept.
    assert set(table("--submitted-by", "elastic_queue", "-n", "1")[1]) == {agent.id}
    out = balsam("queue", "ls", "--site", "all", "--submitted-by", "nobody")
    assert out.exit_code == 0 and out.output == "No active batch jobs submitted by nobody.\n", out.output
