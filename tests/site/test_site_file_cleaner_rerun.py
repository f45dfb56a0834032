"""file_cleaner and a job its user re-runs while the cleaner works on it.

The cleaner lists JOB_FINISHED jobs pending cleanup, loads their apps, deletes their files and
clears their flag. A job re-run in between used to lose its files (the new run's, in the same
workdir) and its flag (its next run's files were never cleaned).
"""

from __future__ import annotations

from pathlib import Path

from balsam.site.modules.file_cleaner import FileCleanerModule, FileCleanerSettings
from site_test_utils import finish_jobs, job_rows


def test_file_cleaner_leaves_a_job_rerun_after_its_list_alone(make_site, client) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    sid = site.site_id

    class Scratch(ApplicationDefinition):
        site = sid
        command_template = "echo s"
        cleanup_files = ["*.tmp"]

    rerun, done = Job.objects.bulk_create([Job("r/0", Scratch), Job("r/1", Scratch)])
    data = Path(site.data_path)
    for job in (rerun, done):
        (data / job.workdir).mkdir(parents=True)
        (data / job.workdir / "a.tmp").write_text("scratch")
    finish_jobs(client, site.site_id, [rerun.id, done.id])
    cleaner = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=10, service_period=1), client)
    load_app = cleaner.apps.app_class

    def rerun_while_loading(app_id: int):
        # Between the cleaner's list and its deletes: the user re-runs the job, whose new run
        # writes its own files in the same workdir.
        client.patch("/jobs/", json=[{"id": rerun.id, "state": "RESTART_READY"}])
        (data / rerun.workdir / "a.tmp").write_text("the new run's")
        cleaner.apps.app_class = load_app
        return load_app(app_id)

    cleaner.apps.app_class = rerun_while_loading
    cleaner.run_cycle()
    rows = {row["id"]: row for row in job_rows(client, site_id=site.site_id)}
    assert (data / rerun.workdir / "a.tmp").read_text() == "the new run's", "the running job's files were deleted"
    assert rows[rerun.id]["state"] == "RESTART_READY" and rows[rerun.id]["pending_file_cleanup"] is True
    assert not (data / done.workdir / "a.tmp").exists() and rows[done.id]["pending_file_cleanup"] is False
    # The re-run finishes: its files are cleaned then.
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    assert [j["id"] for j in client.post(f"/sessions/{session}", json={"max_num_jobs": 5, "filter_tags": {}})] == [rerun.id]
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": rerun.id, "state": state}])
    client.delete(f"/sessions/{session}")
    cleaner.run_cycle()
    assert not (data / rerun.workdir / "a.tmp").exists()
    assert job_rows(client, site_id=site.site_id, id=rerun.id)[0]["pending_file_cleanup"] is False
