"""The queue_maintainer and file_cleaner agent modules against a real API server."""

from __future__ import annotations

import os
from pathlib import Path

from balsam.site.modules.file_cleaner import FileCleanerSettings
from balsam.site.modules.queue_maintainer import QueueMaintainerSettings
from balsam.site.modules.file_cleaner import FileCleanerModule
from balsam.site.modules.queue_maintainer import QueueMaintainerModule
from site_test_utils import finish_jobs, job_rows


def test_queue_maintainer_keeps_the_queue_filled_one_per_cycle(make_site, client) -> None:
    site = make_site(overrides={"filter_tags": {"workflow": "w1"}})
    config = QueueMaintainerSettings(submit_period=1, submit_project="local", submit_queue="local", job_mode="serial",
                                     num_queued_jobs=2, num_nodes=1, wall_time_min=7)
    module = QueueMaintainerModule(site, config, client)
    assert module.period == 1

    def batch_jobs() -> list[dict]:
        return client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]

    module.run_cycle()
    assert len(batch_jobs()) == 1  # at most one per cycle
    module.run_cycle()
    module.run_cycle()
    made = batch_jobs()
    assert len(made) == 2
    assert all(b["job_mode"] == "serial" and b["wall_time_min"] == 7 and b["filter_tags"] == {"workflow": "w1"}
               and b["queue"] == "local" and b["project"] == "local" for b in made)
    # one of them ends: the next cycle replaces it
    client.put(f"/batch-jobs/{made[0]['id']}", json={"state": "pending_deletion"})
    client.put(f"/batch-jobs/{made[0]['id']}", json={"state": "finished"})
    module.run_cycle()
    assert len([b for b in batch_jobs() if b["state"] != "finished"]) == 2


def test_file_cleaner_deletes_cleanup_files_of_finished_jobs(make_site, client, tmp_path) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    site_id = site.site_id

    class Messy(ApplicationDefinition):
        site = site_id
        command_template = "echo messy"
        cleanup_files = ["*.tmp", "scratch/*", "../*"]

    class Tidy(ApplicationDefinition):
        site = site_id
        command_template = "echo tidy"

    finished = Job.objects.bulk_create([Job(f"messy/{i}", Messy) for i in range(3)] + [Job("tidy/0", Tidy)])
    running = Job.objects.bulk_create([Job("messy/not-done", Messy)])
    data = Path(site.data_path)
    outside = tmp_path / "outside.tmp"
    outside.write_text("not ours")
    for job in finished + running:
        workdir = data / job.workdir
        (workdir / "scratch").mkdir(parents=True)
        for name in ("a.tmp", "b.tmp", "keep.txt", "scratch/x.dat"):
            (workdir / name).write_text(name)
        os.symlink(outside, workdir / "link.tmp")  # a matching symlink: the link goes, its target stays
    (data / "messy" / "neighbour.txt").write_text("a file next to the workdirs")
    finish_jobs(client, site_id, [j.id for j in finished])

    module = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=2, service_period=1), client)
    assert module.run_cycle() == 0.0  # a full batch: more may be waiting
    module.run_cycle()
    module.run_cycle()
    for job in finished[:3]:
        workdir = data / job.workdir
        assert sorted(p.name for p in workdir.rglob("*")) == ["keep.txt", "scratch"]
    assert outside.read_text() == "not ours"
    assert (data / "messy" / "neighbour.txt").exists()  # "../*" never reaches outside the workdir
    assert (data / "tidy/0/a.tmp").exists()  # no cleanup_files: nothing deleted
    assert (data / "messy/not-done/a.tmp").exists()  # not finished yet
    rows = {r["id"]: r for r in job_rows(client, site_id=site_id)}
    assert all(rows[j.id]["pending_file_cleanup"] is False for j in finished)
    assert rows[running[0].id]["pending_file_cleanup"] is True


def test_file_cleaner_leaves_jobs_pending_during_an_api_outage(make_site, client, monkeypatch) -> None:
    import pytest
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    site_id = site.site_id

    class Messy(ApplicationDefinition):
        site = site_id
        command_template = "echo messy"
        cleanup_files = ["*.tmp"]

    (job,) = Job.objects.bulk_create([Job("outage/0", Messy)])
    workdir = Path(site.data_path) / job.workdir
    workdir.mkdir(parents=True)
    (workdir / "a.tmp").write_text("a")
    finish_jobs(client, site_id, [job.id])
    module = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=10, service_period=1), client)

    def outage(app_ids):
        raise ConnectionError("the API is down")

    with monkeypatch.context() as patch:
        patch.setattr(module.apps, "prefetch", outage)
        with pytest.raises(ConnectionError):  # the agent loop backs off on it
            module.run_cycle()
    assert job_rows(client, id=[job.id])[0]["pending_file_cleanup"] is True
    assert (workdir / "a.tmp").exists()
    module.run_cycle()  # the API is back: the files go, as they should have
    assert not (workdir / "a.tmp").exists()
    assert job_rows(client, id=[job.id])[0]["pending_file_cleanup"] is False


def test_file_cleaner_skips_an_invalid_pattern_naming_the_app(make_site, client, caplog) -> None:
    import logging

    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    site_id = site.site_id

    class BadGlob(ApplicationDefinition):
        site = site_id
        command_template = "echo bad"
        cleanup_files = ["**x", "*.tmp"]

    class Fine(ApplicationDefinition):
        site = site_id
        command_template = "echo fine"
        cleanup_files = ["*.tmp"]

    jobs = Job.objects.bulk_create([Job("badglob/0", BadGlob), Job("fine/0", Fine)])
    data = Path(site.data_path)
    for job in jobs:
        (data / job.workdir).mkdir(parents=True)
        (data / job.workdir / "a.tmp").write_text("a")
    finish_jobs(client, site_id, [j.id for j in jobs])
    module = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=10, service_period=1), client)
    with caplog.at_level(logging.ERROR):
        module.run_cycle()
    # The other app, and the app's valid pattern, are cleaned as usual.
    assert not (data / "fine/0/a.tmp").exists() and not (data / "badglob/0/a.tmp").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"app {jobs[0].app_id}" in errors[0] and "'**x'" in errors[0]
    # Marked clean all the same: jobs left pending would fill every batch and starve other apps.
    assert all(r["pending_file_cleanup"] is False for r in job_rows(client, id=[j.id for j in jobs]))

    (later,) = Job.objects.bulk_create([Job("badglob/1", BadGlob)])
    (data / later.workdir).mkdir(parents=True)
    finish_jobs(client, site_id, [later.id])
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        module.run_cycle()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # reported once per app and pattern
