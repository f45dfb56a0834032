"""A Polaris job waiting for a file system that is down is not one that can never run.

ALCF marks a file system that is down by setting its PBS server resource (``eagle_fs``,
``grand_fs``, ``home_fs``) False; a queued job that asked for it (``-l filesystems=home:eagle``,
which the Polaris settings add to every BatchJob) is then commented "Can Never Run: Insufficient
amount of server resource: eagle_fs (True != False)" and runs once the file system is back (ALCF's
job-scheduling guide, "Specifying Filesystems"; the comment is quoted from it). The PBS driver read
every "Can Never Run" comment as a verdict: during an outage the elastic queue counted every queued
BatchJob as never starting, requested none as large again and told the user to delete them
(``balsam queue term``). Recorded: tests/schedulers/data/polaris_pbs/qstat_f_json_filesystem_down.txt.
"""

from __future__ import annotations

from balsam.states import BatchJobState
from balsam_scheduler_pbs import PBSScheduler

from sched_helpers import recorded, result, utc

NOW = utc(2023, 11, 21, 21, 0, 0)


def _statuses():
    pbs = PBSScheduler(user="alice")
    return pbs, pbs.parse_status(result(stdout=recorded("polaris_pbs", "qstat_f_json_filesystem_down.txt")), NOW)


def test_a_job_waiting_for_a_file_system_that_is_down_may_still_start():
    pbs, statuses = _statuses()
    eagle, grand, too_large = statuses[1196280], statuses[1196281], statuses[1196282]
    assert eagle.state is grand.state is BatchJobState.queued
    # The reason users see is PBS's own comment.
    assert eagle.message == "Can Never Run: Insufficient amount of server resource: eagle_fs (True != False)"
    assert grand.queue == "small" and grand.project == "datascience"
    assert not pbs.never_starts(eagle) and not pbs.never_starts(grand)
    # A request larger than its queue still can never run.
    assert pbs.never_starts(too_large)


def test_a_job_waiting_for_a_file_system_does_not_claim_free_nodes():
    pbs, statuses = _statuses()
    # It waits for the file system, not for nodes: nodes that come free now are not its.
    assert pbs.waits_for_other_than_nodes(statuses[1196280]) and pbs.waits_for_other_than_nodes(statuses[1196281])
    assert not pbs.waits_for_other_than_nodes(statuses[1196282])


def test_the_elastic_queue_neither_counts_it_out_nor_asks_to_delete_it(balsam_env, tmp_path, caplog):
    """What the user saw: with eagle down, the elastic queue's log said each queued BatchJob "can
    never start ... then remove it: balsam queue term --id N" and requested no BatchJob as large."""
    import logging
    import uuid

    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site
    from balsam.testing import ReplayRunner
    from balsam_elastic import ElasticQueueOptions
    from balsam_elastic.module import ElasticQueueModule

    client = load_client()
    path = tmp_path / "polaris-elastic"
    init_site(path, "polaris-elastic", "default", client, scheduler_name="pbs", settings_overrides={"scheduler": {
        "allowed_queues": {"debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 10}},
        "allowed_projects": ["datascience"]}})
    site = SiteConfig(path)
    app = type(f"App{uuid.uuid4().hex[:6]}", (ApplicationDefinition,),
               {"site": site.site_id, "command_template": "echo {{ i }}", "__module__": __name__})
    app.sync()
    jobs = Job.objects.bulk_create([app.submit(workdir=f"w/{i}", i=i, save=False) for i in range(4)])
    client.patch("/jobs/", json=[{"id": j.id, "state": "PREPROCESSED"} for j in jobs])
    waiting = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "datascience", "queue": "debug",
                                                "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": waiting["id"], "state": "queued", "scheduler_id": 1196280}])
    qstat = result(stdout=recorded("polaris_pbs", "qstat_f_json_filesystem_down.txt"))
    options = ElasticQueueOptions(submit_queue="debug", submit_project="datascience", use_backfill=False,
                                  max_num_nodes=1, max_wall_time_min=30, min_wall_time_min=10)
    module = ElasticQueueModule(site, options, client, scheduler=PBSScheduler(ReplayRunner({"qstat": qstat}), user="alice"))
    caplog.set_level(logging.INFO, logger="balsam.site.modules.elastic_queue")
    for _ in range(2):
        module.run_cycle()
    (mine,) = [b for b in module.snapshot().batch_jobs if b.id == waiting["id"]]
    assert mine.never_starts == ""
    assert not [r for r in caplog.records if "can never start" in r.getMessage()], caplog.text
    assert "balsam queue term" not in caplog.text


def test_only_a_boolean_server_resource_is_taken_for_switched_off():
    """A string-valued server resource that differs is a request no setting will meet: it still
    never starts (the elastic queue warns), as a count does."""
    from balsam_scheduler_pbs.scheduler import SWITCHED_OFF_SERVER_RESOURCE

    assert SWITCHED_OFF_SERVER_RESOURCE.search("Can Never Run: Insufficient amount of server resource: eagle_fs (True != False)")
    assert SWITCHED_OFF_SERVER_RESOURCE.search("can never run: insufficient amount of server resource: home_fs (false != true)")
    for comment in ("Can Never Run: Insufficient amount of server resource: software (abaqus != ansys)",
                    "Can Never Run: Insufficient amount of server resource: ncpus (R: 15 A: 10 T: 10)",
                    "Can Never Run: Insufficient amount of queue resource: debug (True != False)"):
        assert not SWITCHED_OFF_SERVER_RESOURCE.search(comment), comment
