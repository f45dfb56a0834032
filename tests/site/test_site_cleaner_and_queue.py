"""file_cleaner and symlinks, re-runs; queue_maintainer and the site's rules and filter_tags;
the scheduler module's note on a BatchJob it does not submit; ``balsam queue submit``'s warning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from click.testing import CliRunner

from balsam.cli import main
from balsam.site.modules.file_cleaner import FileCleanerModule, FileCleanerSettings
from balsam.site.modules.queue_maintainer import QueueMaintainerModule, QueueMaintainerSettings
from balsam.site.modules.scheduler import SchedulerModule
from site_test_utils import finish_jobs, job_rows
from test_site_scheduler_module import ScriptedScheduler


def _apps(sid: int, patterns: list[str]):
    from balsam.api import ApplicationDefinition

    class Consumer(ApplicationDefinition):
        site = sid
        command_template = "echo c"
        cleanup_files = patterns

    class Producer(ApplicationDefinition):
        site = sid
        command_template = "echo p"

    return Consumer, Producer


def _cleaner(site, client) -> FileCleanerModule:
    return FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=10, service_period=1), client)


def test_file_cleaner_removes_a_symlink_never_its_target(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    Consumer, Producer = _apps(site.site_id, ["*.h5", "*"])
    Job.objects.bulk_create([Job("prod/0", Producer)])
    cons = Job.objects.bulk_create([Job("cons/0", Consumer)])[0]
    data = Path(site.data_path)
    (data / "prod/0").mkdir(parents=True)
    (data / "cons/0/sub").mkdir(parents=True)
    (data / "prod/0/result.h5").write_text("the producer's output")
    (data / "cons/0/sub/keep.txt").write_text("in a real subdirectory")
    os.symlink(data / "prod/0/result.h5", data / "cons/0/input.h5")  # the consumer links its parent's output
    os.symlink(data / "prod/0", data / "cons/0/parent_dir")  # and its parent's directory
    (data / "cons/0/own.h5").write_text("own")
    finish_jobs(client, site.site_id, [cons.id])
    _cleaner(site, client).run_cycle()
    assert (data / "prod/0/result.h5").read_text() == "the producer's output"
    assert not os.path.lexists(data / "cons/0/input.h5")  # the link itself is gone
    assert not os.path.lexists(data / "cons/0/parent_dir")  # "*" matched the dir link: unlinked, not followed
    assert (data / "prod/0").is_dir() and not (data / "cons/0/own.h5").exists()
    assert (data / "cons/0/sub/keep.txt").exists()  # "*" matched a real directory: left alone


def test_file_cleaner_does_not_reach_through_a_directory_symlink(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    Consumer, Producer = _apps(site.site_id, ["*/*.tmp", "**/*.log"])
    Job.objects.bulk_create([Job("prod/0", Producer)])
    cons = Job.objects.bulk_create([Job("cons/0", Consumer)])[0]
    data = Path(site.data_path)
    (data / "prod/0").mkdir(parents=True)
    (data / "cons/0/run").mkdir(parents=True)
    (data / "prod/0/checkpoint.tmp").write_text("the producer's")
    (data / "prod/0/out.log").write_text("the producer's")
    (data / "cons/0/run/own.tmp").write_text("own")
    (data / "cons/0/run/own.log").write_text("own")
    os.symlink(data / "prod/0", data / "cons/0/parent")
    finish_jobs(client, site.site_id, [cons.id])
    _cleaner(site, client).run_cycle()
    assert (data / "prod/0/checkpoint.tmp").exists() and (data / "prod/0/out.log").exists()
    assert not (data / "cons/0/run/own.tmp").exists() and not (data / "cons/0/run/own.log").exists()
    assert os.path.islink(data / "cons/0/parent")  # not matched by either pattern: kept


def test_file_cleaner_cleans_a_rerun_of_a_finished_job(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    Consumer, _ = _apps(site.site_id, ["*.tmp"])
    job = Job.objects.bulk_create([Job("m/0", Consumer)])[0]
    wd = Path(site.data_path) / "m/0"
    wd.mkdir(parents=True)
    (wd / "a.tmp").write_text("1")
    finish_jobs(client, site.site_id, [job.id])
    cleaner = _cleaner(site, client)
    cleaner.run_cycle()
    assert not (wd / "a.tmp").exists()
    assert job_rows(client, site_id=site.site_id)[0]["pending_file_cleanup"] is False
    client.patch("/jobs/", json=[{"id": job.id, "state": "RESTART_READY"}])  # the user's re-run
    assert job_rows(client, site_id=site.site_id)[0]["pending_file_cleanup"] is True
    (wd / "b.tmp").write_text("2")
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 5, "filter_tags": {}})
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": job.id, "state": state}])
    client.delete(f"/sessions/{session}")
    assert job_rows(client, site_id=site.site_id)[0]["state"] == "JOB_FINISHED"
    cleaner.run_cycle()
    assert not (wd / "b.tmp").exists()


def _site_with_queue(make_site, **overrides):
    return make_site(overrides={
        "scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 2}},
                      "allowed_projects": ["local"]},
        **overrides,
    })


def test_queue_maintainer_posts_nothing_the_site_refuses(make_site, client, caplog) -> None:
    site = _site_with_queue(make_site)
    refused = {
        "queue": dict(submit_queue="debug"),
        "wall_time_min": dict(wall_time_min=120),
        "num_nodes": dict(num_nodes=8),
        "project": dict(submit_project="other"),
    }
    for word, fields in refused.items():
        config = QueueMaintainerSettings(**{"submit_period": 1, "num_queued_jobs": 1, "wall_time_min": 5, **fields})
        module = QueueMaintainerModule(site, config, client)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            for _ in range(4):
                module.run_cycle()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and word in errors[0], (word, errors)  # once, naming the reason
    assert client.get("/batch-jobs/", params={"site_id": site.site_id})["count"] == 0
    # A config the site accepts is posted as before.
    QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=1, num_queued_jobs=1, wall_time_min=5),
                          client).run_cycle()
    assert client.get("/batch-jobs/", params={"site_id": site.site_id})["count"] == 1


def test_batch_job_without_the_site_filter_tags_is_noted_and_not_counted(make_site, client, caplog) -> None:
    site = _site_with_queue(make_site, filter_tags={"workflow": "w1"})
    foreign = client.post("/batch-jobs/", json={
        "site_id": site.site_id, "project": "local", "queue": "local", "num_nodes": 1, "wall_time_min": 5,
        "job_mode": "mpi", "filter_tags": {"workflow": "w2"}})
    fake = ScriptedScheduler()
    scheduler = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    scheduler.run_cycle()
    row = client.get(f"/batch-jobs/{foreign['id']}")
    waiting = row["status_info"]["waiting"]
    assert row["state"] == "pending_submission" and not fake.submitted
    assert "{workflow: w2}" in waiting and "{workflow: w1}" in waiting and "\n" not in waiting
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=scheduler.logger.name):
        scheduler.run_cycle()
    cycle = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle:")]
    assert cycle and cycle[-1].endswith("updates none")  # the note is written once, not every cycle
    # queue_maintainer does not count it: it posts one of its own, which the scheduler submits.
    qm = QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=1, num_queued_jobs=1, wall_time_min=5), client)
    qm.run_cycle()
    scheduler.run_cycle()
    qm.run_cycle()  # its own now counts: nothing more
    rows = {b["id"]: b for b in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]}
    assert len(rows) == 2 and rows[foreign["id"]]["state"] == "pending_submission"
    own = [b for i, b in rows.items() if i != foreign["id"]][0]
    assert own["filter_tags"] == {"workflow": "w1"} and own["state"] == "queued" and len(fake.submitted) == 1
    # Marked as the module's (queue ls's submitted_by column), the mark kept through the submission.
    assert own["status_info"]["submitted_by"] == "queue_maintainer"


def test_queue_submit_warns_when_filter_tags_lack_the_site_ones(make_site, client) -> None:
    site = _site_with_queue(make_site, filter_tags={"workflow": "w1"})
    base = ["queue", "submit", "--site", str(site.site_id), "-q", "local", "-A", "local", "-t", "5", "-j", "mpi", "-n", "1"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "filter_tags" in line and line.startswith("Warning")]
    assert len(warnings) == 1 and "{workflow: w1}" in warnings[0] and "--tag workflow=w1" in warnings[0]
    result = CliRunner().invoke(main, base + ["--tag", "workflow=w1", "--tag", "extra=x"])
    assert result.exit_code == 0, result.output
    assert not [line for line in result.output.splitlines() if "filter_tags" in line and line.startswith("Warning")]
