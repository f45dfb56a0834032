"""``balsam queue term``: the confirmation names the BatchJob's site, and ``--site`` restricts ``--id``
as it restricts ``SCHEDULER_ID`` (and as it restricts ``job ls/modify/rm --id``)."""

from __future__ import annotations

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


@pytest.fixture
def two_sites(balsam_env, tmp_path):
    """Sites proj_s1 and proj_s3 (neither active), each with a queued BatchJob of scheduler id 7."""
    from balsam.api import BatchJob, Site

    sites, batch_jobs = [], []
    for name in ("proj_s1", "proj_s3"):
        path = tmp_path / name
        (path / "data").mkdir(parents=True)
        site = Site.objects.create(name=name, path=str(path), allowed_projects=["proj"],
                                   allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}})
        (path / ".balsam-site").write_text(f"{site.id}\n")
        bj = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=30, queue="debug", project="proj", job_mode="mpi")
        bj.save()
        bj.state = "queued"
        bj.scheduler_id = 7
        bj.save()
        sites.append(site)
        batch_jobs.append(bj)
    return sites, batch_jobs


def state(batch_job_id: int) -> str:
    from balsam.api import BatchJob

    return BatchJob.objects.get(id=batch_job_id).state.value


def test_term_names_the_site_of_the_batch_job(two_sites):
    (s1, s3), (b1, b3) = two_sites
    out = balsam("queue", "term", "7", "--site", "proj_s3")
    assert out.exit_code == 0, out.output
    assert out.output == f"Marked BatchJob {b3.id} (scheduler id 7) of site proj_s3 for deletion\n"
    assert state(b3.id) == "pending_deletion" and state(b1.id) == "queued"
    out = balsam("queue", "term", "--id", str(b1.id))
    assert out.output == f"Marked BatchJob {b1.id} (scheduler id 7) of site proj_s1 for deletion\n"


def test_site_restricts_id(two_sites):
    """Before: ``--site`` was ignored with ``--id``: the BatchJob of another site was ended."""
    (s1, s3), (b1, b3) = two_sites
    out = balsam("queue", "term", "--id", str(b3.id), "--site", "proj_s1")
    assert out.exit_code == 1, out.output
    assert out.output == f"Error: BatchJob {b3.id} is at site proj_s3 (id {s3.id}), not at --site proj_s1\n"
    assert state(b3.id) == "queued"
    out = balsam("queue", "term", "--id", str(b3.id), "--site", f"{s1.id},{s3.id}")
    assert out.exit_code == 0 and state(b3.id) == "pending_deletion", out.output
    out = balsam("queue", "term", "--id", str(b1.id), "--site", "all")
    assert out.exit_code == 0 and state(b1.id) == "pending_deletion", out.output
