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
        os.symlink(outside, workdir / "link.tmp")  # a match that resolves outside data/: left alone
    (data / "messy" / "neighbour.txt").write_text("a file next to the workdirs")
    finish_jobs(client, site_id, [j.id for j in finished])

    module = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=2, service_period=1), client)
    assert module.run_cycle() == 0.0  # a full batch: more may be waiting
    module.run_cycle()
    module.run_cycle()
    for job in finished[:3]:
        workdir = data / job.workdir
        assert sorted(p.name for p in workdir.rglob("*")) == ["keep.txt", "link.tmp", "scratch"]
    assert outside.read_text() == "not ours"
    assert (data / "messy" / "neighbour.txt").exists()  # "../*" never reaches outside the workdir
    assert (data / "tidy/0/a.tmp").exists()  # no cleanup_files: nothing deleted
    assert (data / "messy/not-done/a.tmp").exists()  # not finished yet
    rows = {r["id"]: r for r in job_rows(client, site_id=site_id)}
    assert all(rows[j.id]["pending_file_cleanup"] is False for j in finished)
    assert rows[running[0].id]["pending_file_cleanup"] is True
