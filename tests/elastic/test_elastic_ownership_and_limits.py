"""The elastic_queue module against a real API server: it cancels only the BatchJobs it created, counts
only the jobs its BatchJobs could lease and the jobs running in them, and says why when nothing fits."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from balsam.states import BatchJobState
from balsam_elastic import ElasticQueueOptions
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, needs_module_sections, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"


def _acquire(client, site, **spec) -> list:
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 100, **spec})
    return got if isinstance(got, list) else got["results"]


class QueuedFor:
    """A scheduler driver whose status poll reports every BatchJob given as queued for ``minutes``."""

    def __init__(self, minutes: int) -> None:
        self.minutes, self.ids = minutes, []

    def get_statuses(self) -> dict:
        return {sid: SimpleNamespace(state=BatchJobState.queued, queued_time_min=self.minutes) for sid in self.ids}

    def get_backfill_windows(self) -> dict:
        return {}


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_without_backfill_requests_wait_in_the_regular_queue_and_are_not_cancelled_as_stale(make_site, client) -> None:
    """use_backfill: false: the request is not fitted to a window, so waiting past
    max_queue_wait_time_min is no reason to cancel it (it was cancelled and resubmitted every cycle)."""
    site = make_site()
    scheduler = QueuedFor(11)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_queue_wait_time_min=10), client,
                                scheduler=scheduler)
    runnable_jobs(client, site, 1)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    assert made["status_info"].keys() == {"elastic_request", "elastic_created", "submitted_by"}  # the stamp, when, and who (queue ls)
    assert made["status_info"]["submitted_by"] == "elastic_queue"
    assert made["status_info"]["elastic_request"] == "regular_queue"
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 4242}])
    scheduler.ids = [4242]
    module.run_cycle()
    assert module.last_decision.cancel == () and module.last_decision.submit == (), module.last_decision
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["queued"]


def test_simple_never_cancels_a_batch_job_it_did_not_create(make_site, client) -> None:
    """The user's own `balsam queue submit -q local` BatchJob (same queue, site filter_tags {}) was
    set pending_deletion in the first cycle; the module's own surplus block still is."""
    site = make_site()
    scheduler = QueuedFor(0)
    mine = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "local",
                                             "num_nodes": 1, "wall_time_min": 60, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 999999}])
    scheduler.ids = [999999]
    module = ElasticQueueModule(site, {"strategy": "simple"}, client, scheduler=scheduler)
    module.run_cycle()
    assert client.get(f"/batch-jobs/{mine['id']}")["state"] == "queued", module.last_decision
    assert module.last_decision.cancel == ()

    module = ElasticQueueModule(site, {"strategy": "simple", "strategy_options": {"max_blocks": 2}}, client,
                                scheduler=scheduler)
    runnable_jobs(client, site, 1)
    module.run_cycle()  # the hand-made BatchJob covers a demand of 1
    assert len(batch_jobs_of(client, site)) == 1, module.last_decision
    runnable_jobs(client, site, 1)
    module.run_cycle()  # a demand of 2: one block of its own
    own = [b for b in batch_jobs_of(client, site) if b["id"] != mine["id"]]
    assert [b["status_info"]["elastic_request"] for b in own] == ["simple"]
    client.delete("/jobs/", params={"site_id": site.site_id})  # no demand: it cancels its own block only
    module.run_cycle()
    states = {b["id"]: b["state"] for b in batch_jobs_of(client, site)}
    assert states == {mine["id"]: "queued", own[0]["id"]: "pending_deletion"}, module.last_decision


def test_simple_and_queue_maintainer_on_one_queue_no_longer_fight(make_site, client, caplog) -> None:
    """queue_maintainer keeps 1 BatchJob in `local`, simple wants none: simple cancelled it every
    cycle and the maintainer made another, forever. Now it stays, and a warning says so at load."""
    from balsam.site.modules.queue_maintainer import QueueMaintainerModule, QueueMaintainerSettings

    site = make_site(overrides={"queue_maintainer": {"num_queued_jobs": 1}})
    caplog.set_level(logging.INFO, logger=LOGGER)
    qm = QueueMaintainerModule(site, QueueMaintainerSettings(num_queued_jobs=1), client)
    el = ElasticQueueModule(site, {"strategy": "simple"}, client, scheduler=QueuedFor(0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("queue_maintainer also submits to queue 'local'") for w in warnings), warnings
    for _ in range(3):
        qm.run_cycle()
        el.run_cycle()
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["pending_submission"]


def test_a_job_wider_than_the_queue_gets_no_batch_job_and_one_error(make_site, client, caplog) -> None:
    """Queue `local` allows 1 node, the runnable job needs 2: the request was clamped to 1 node and
    1-node BatchJobs that run nothing were made each cycle, with no word why."""
    site = make_site()
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False), client)
    runnable_jobs(client, site, 1, num_nodes=2)
    for _ in range(3):
        module.run_cycle()
    assert batch_jobs_of(client, site) == []
    assert module.last_decision.reason.startswith("no runnable job fits its BatchJobs (1 runnable: more nodes than "
                                                  "queue 'local''s max_nodes 1"), module.last_decision.reason
    assert _errors(caplog) == ["runnable jobs its BatchJobs can never run: more nodes than queue 'local''s max_nodes 1 "
                               "(settings.yml scheduler.allowed_queues)"]  # once, not every cycle

    runnable_jobs(client, site, 1)  # a 1-node job also: one BatchJob, for it alone
    module.run_cycle()
    assert [(b["num_nodes"], b["wall_time_min"]) for b in batch_jobs_of(client, site)] == [(1, 355)]
    assert dict(module.last_decision.numbers)["runnable"] == 1


def test_job_mode_serial_counts_only_single_node_single_rank_jobs(make_site, client, caplog) -> None:
    """A serial launcher leases only num_nodes == 1 and ranks_per_node == 1 jobs: 4-rank jobs got
    serial BatchJobs that could run nothing."""
    site = make_site()
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, job_mode="serial"), client)
    runnable_jobs(client, site, 2, ranks_per_node=4)
    module.run_cycle()
    module.run_cycle()
    assert batch_jobs_of(client, site) == [] and _acquire(client, site, max_nodes_per_job=1, serial_only=True) == []
    assert _errors(caplog) == ["runnable jobs its BatchJobs can never run: more than 1 node or 1 rank per node "
                               "(job_mode serial leases only single-node single-rank jobs)"]
    runnable_jobs(client, site, 3)
    module.run_cycle()
    assert [b["job_mode"] for b in batch_jobs_of(client, site)] == ["serial"]
    assert dict(module.last_decision.numbers)["runnable"] == 3, module.last_decision


def test_jobs_longer_than_any_batch_job_are_not_counted(make_site, client, caplog) -> None:
    """Runnable jobs of wall_time_min 600 against requests of 355 min (max_wall_time_min less the
    pad): a launcher leases only jobs that fit its time left, so the BatchJobs ran nothing."""
    site = make_site()
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False), client)
    runnable_jobs(client, site, 1, wall_time_min=600)
    # Shorter than the BatchJob, but not than its launcher's offer (its batch script's -t 353 less
    # the launcher's 2-minute safety margin, in whole minutes below: 350): never leased either.
    runnable_jobs(client, site, 1, wall_time_min=351)
    module.run_cycle()
    assert batch_jobs_of(client, site) == [] and _acquire(client, site, max_wall_time_min=350) == []
    assert _errors(caplog) == ["runnable jobs its BatchJobs can never run: wall_time_min of more than 350, and its "
                               "BatchJobs last at most 355 min (a launcher leases only jobs that end before its "
                               "safety margin: 350 min in a 355-min BatchJob)"]
    runnable_jobs(client, site, 2, wall_time_min=300)
    module.run_cycle()
    assert [b["wall_time_min"] for b in batch_jobs_of(client, site)] == [355]
    assert dict(module.last_decision.numbers)["runnable"] == 2, module.last_decision


def test_serial_single_node_jobs_too_long_or_multi_rank_get_the_right_reasons(make_site, client, caplog) -> None:
    """job_mode serial, every runnable job on 1 node, some too long: whether some also have several
    ranks the aggregate cannot tell, so one more backlog request (serial_only without the wall
    limit) settles which reasons to give."""
    site = make_site()
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, job_mode="serial"), client)
    runnable_jobs(client, site, 2, wall_time_min=600)
    runnable_jobs(client, site, 1)
    module.run_cycle()
    assert _errors(caplog) == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "runnable jobs its BatchJobs can never run: wall_time_min of more than 350, and its BatchJobs last at most "
        "355 min (a launcher leases only jobs that end before its safety margin: 350 min in a 355-min BatchJob)"]
    assert dict(module.last_decision.numbers)["runnable"] == 1, module.last_decision
    runnable_jobs(client, site, 1, ranks_per_node=2, wall_time_min=600)
    runnable_jobs(client, site, 1, ranks_per_node=2)
    module.run_cycle()
    assert dict(module.last_decision.numbers)["runnable"] == 1, module.last_decision
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1] == (
        "runnable jobs its BatchJobs can never run: more than 1 node or 1 rank per node (job_mode serial leases "
        "only single-node single-rank jobs); wall_time_min of more than 350, and its BatchJobs last at most 355 min "
        "(a launcher leases only jobs that end before its safety margin: 350 min in a 355-min BatchJob)")


class CountingClient:
    """The API client, recording each request's method and path."""

    def __init__(self, client) -> None:
        self._client, self.calls = client, []

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name not in ("get", "post", "put", "patch", "delete"):
            return attr

        def call(path, *args, **kwargs):
            self.calls.append((name.upper(), path))
            return attr(path, *args, **kwargs)

        return call


@pytest.mark.parametrize("job_mode, unfit", [("mpi", {"num_nodes": 2}), ("serial", {"ranks_per_node": 4})])
def test_a_cycle_reads_with_the_same_requests_whatever_the_backlog_size(make_site, client, monkeypatch,
                                                                         job_mode, unfit) -> None:
    """Runnable jobs within and beyond the limits, and jobs running in its own BatchJob: the
    cycle's reads are a fixed set of aggregate requests, for 10 jobs as for 300 (the module used to
    list the runnable jobs page by page, and GET the running jobs of each BatchJob)."""
    import balsam.site.service_client as service_client

    monkeypatch.setattr(service_client, "MAX_PAGE_SIZE", 100)  # listing 300 jobs would take pages
    reads = {}
    for n in (10, 300):
        site = make_site()
        counting = CountingClient(client)
        module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, job_mode=job_mode), counting)
        fit = runnable_jobs(client, site, n)
        runnable_jobs(client, site, n, **unfit)
        module.run_cycle()  # its BatchJob: running, with 3 jobs in it
        [made] = batch_jobs_of(client, site)
        client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "running", "scheduler_id": 4000 + n}])
        client.patch("/jobs/", json=[{"id": j.id, "batch_job_id": made["id"], "state": "RUNNING"} for j in fit[:3]])
        counting.calls.clear()
        module.run_cycle()
        numbers = dict(module.last_decision.numbers)
        assert (numbers["runnable"], numbers["running_footprint"]) == (n - 3, 3), module.last_decision
        assert module.last_decision.submit, module.last_decision
        reads[n] = [(m, p.replace(f"/sites/{site.site_id}/", "/sites/{id}/")) for m, p in counting.calls if m == "GET"]
    assert reads[10] == reads[300]
    # its BatchJobs; all runnable jobs; those that fit; those running in its BatchJobs; and, as this
    # cycle submits, its BatchJobs the scheduler refused lately (one page, newest first)
    assert reads[10] == [("GET", "/batch-jobs/")] + [("GET", "/sites/{id}/backlog")] * 3 + [("GET", "/batch-jobs/")], \
        reads[10]


def test_only_jobs_running_in_its_batch_jobs_are_its_running_footprint(make_site, client) -> None:
    """4 jobs run in a BatchJob of another queue: they hold none of this queue's nodes, yet they
    counted as running footprint (simple provisioned 4 idle blocks; backfill saw its own BatchJob busy)."""
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 1440,
                                                                           "max_queued_jobs": 10},
                                                                 "other": {"max_nodes": 4, "max_walltime": 1440,
                                                                           "max_queued_jobs": 10}}}})
    foreign = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "other",
                                                "num_nodes": 4, "wall_time_min": 60, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": foreign["id"], "state": "running", "scheduler_id": 77}])
    busy = runnable_jobs(client, site, 4)
    client.patch("/jobs/", json=[{"id": j.id, "batch_job_id": foreign["id"], "state": "RUNNING"} for j in busy])
    simple = ElasticQueueModule(site, {"strategy": "simple", "strategy_options": {"max_blocks": 8}}, client,
                                scheduler=QueuedFor(0))
    simple.run_cycle()
    assert simple.last_decision.submit == () and dict(simple.last_decision.numbers)["demand_footprint"] == 0

    backfill = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_num_nodes=4), client,
                                  scheduler=QueuedFor(1))
    runnable_jobs(client, site, 4)
    backfill.run_cycle()  # one 4-node BatchJob for the 4 runnable jobs ...
    backfill.run_cycle()  # ... which covers them: the 4 jobs running elsewhere do not make it look busy
    made = [b for b in batch_jobs_of(client, site) if b["id"] != foreign["id"]]
    assert [b["num_nodes"] for b in made] == [4], backfill.last_decision
    assert dict(backfill.last_decision.numbers)["running_footprint"] == 0
    assert backfill.last_decision.reason.startswith("idle nodes cover the backlog"), backfill.last_decision

    client.patch("/batch-jobs/", json=[{"id": made[0]["id"], "state": "running", "scheduler_id": 78}])
    client.patch("/jobs/", json=[{"id": j.id, "batch_job_id": made[0]["id"]} for j in busy[:2]])
    backfill.run_cycle()  # 2 jobs now run in its own BatchJob: they are its running footprint
    assert dict(backfill.last_decision.numbers)["running_footprint"] == 2, backfill.last_decision


def test_max_queued_jobs_is_capped_by_the_queue(make_site, client, caplog) -> None:
    """More BatchJobs than the queue's max_queued_jobs would wait in pending_submission, reserving
    nodes that are not coming."""
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 1, "max_walltime": 1440,
                                                                           "max_queued_jobs": 2}}}})
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_queued_jobs=20), client)
    assert "max_queued_jobs 20 capped to the max_queued_jobs 2 of queue 'local' (settings.yml scheduler.allowed_queues)" in caplog.text
    runnable_jobs(client, site, 5)
    for _ in range(4):
        module.run_cycle()
    assert len(batch_jobs_of(client, site)) == 2
    assert module.last_decision.reason.startswith("max_queued_jobs reached (2 of 2"), module.last_decision


@needs_module_sections
@pytest.mark.parametrize("section,line,message", [
    ("elastic_queue:\n  strategy: simple\n  strategy_options:\n    nodes_per_block: 2\n    parallelism: 0\n",
     5, "elastic_queue.strategy_options.parallelism: must be greater than 0"),
    ("elastic_queue:\n  strategy: simple\n  strategy_options: {min_blocks: 3, max_blocks: 2}\n",
     3, "elastic_queue.strategy_options.min_blocks: must be between 0 and max_blocks (2)"),
    ("elastic_queue:\n  service_period: 30\n  max_queue_wait_time_min: -5\n",
     3, "elastic_queue.max_queue_wait_time_min: must not be negative"),
    # Cross-key errors on the line of the key the file sets (max_num_nodes: 0 named min_num_nodes,
    # which the file does not set, on the section's line).
    ("elastic_queue:\n  submit_queue: local\n  max_num_nodes: 0\n", 3, "elastic_queue.max_num_nodes: must be at least 1"),
    ("elastic_queue:\n  min_num_nodes: 4\n  max_num_nodes: 2\n", 3,
     "elastic_queue.max_num_nodes: must be at least min_num_nodes (4)"),
    ("elastic_queue:\n  min_num_nodes: 200\n", 2, "elastic_queue.min_num_nodes: must not exceed max_num_nodes (127)"),
])
def test_settings_errors_name_the_key_on_its_line(tmp_path, section, line, message) -> None:
    from balsam.config.settings import SettingsError, load_settings

    path = tmp_path / "settings.yml"
    path.write_text(section)
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert f"settings.yml:{line} {message}" in str(caught.value), str(caught.value)
    assert "strategy_options: elastic_queue." not in str(caught.value)


@pytest.mark.parametrize("text, line, message", [
    ("scheduler: {}\nelastic_queue:\n  submit_queue: debug\n", 3,
     "elastic_queue.submit_queue: queue 'debug' is not in the scheduler section's allowed_queues (local)"),
    ("scheduler:\n  allowed_projects: [m1]\nelastic_queue:\n  submit_project: m2\n", 4,
     "elastic_queue.submit_project: project 'm2' is not in the scheduler section's allowed_projects (m1)"),
    # simple counted full blocks, then each was clamped to the queue (8-node blocks became 2-node ones).
    ("scheduler:\n  allowed_queues: {local: {max_nodes: 2, max_walltime: 600, max_queued_jobs: 10}}\n"
     "elastic_queue:\n  strategy: simple\n  strategy_options:\n    nodes_per_block: 8\n", 5,
     "elastic_queue.strategy_options: nodes_per_block 8 exceeds queue 'local''s max_nodes 2 (scheduler.allowed_queues)"),
    ("scheduler:\n  allowed_queues: {local: {max_nodes: 2, max_walltime: 30, max_queued_jobs: 10}}\n"
     "elastic_queue:\n  strategy: simple\n  strategy_options:\n    nodes_per_block: 2\n", 5,
     "elastic_queue.strategy_options: wall_time_min 60 exceeds queue 'local''s max_walltime 30 (scheduler.allowed_queues)"),
])
def test_a_queue_or_project_the_scheduler_section_refuses_is_a_settings_error(tmp_path, text, line, message) -> None:
    """It was found by the agent at run time only: every BatchJob of the module failed."""
    from balsam.config.settings import SettingsError, load_settings

    path = tmp_path / "settings.yml"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert f"settings.yml:{line} {message}" in str(caught.value), str(caught.value)
    path.write_text("scheduler: {}\nelastic_queue: {}\n")  # the defaults fit the default scheduler section
    assert load_settings(path).sections["elastic_queue"].submit_queue == "local"


def test_jobs_a_running_launcher_holds_are_not_runnable_backlog(make_site, client) -> None:
    """A launcher prefetches jobs (its session holds them) before it starts them: they run in its
    BatchJob, yet they counted as runnable, and each cycle submitted a BatchJob that found nothing."""
    site = make_site(overrides={"filter_tags": {"c": "h"}})
    jobs = runnable_jobs(client, site, 10, tags={"c": "h"})
    module = ElasticQueueModule(site, ElasticQueueOptions(job_mode="serial", use_backfill=False, max_num_nodes=1,
                                                          max_queued_jobs=5, min_wall_time_min=10,
                                                          wall_time_pad_min=1, max_wall_time_min=10), client)
    module.run_cycle()
    (mine,) = batch_jobs_of(client, site)
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 1}])
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "running"}])
    session = client.post("/sessions/", json={"site_id": site.site_id, "batch_job_id": mine["id"]})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 64, "max_nodes_per_job": 1, "serial_only": True,
                                                    "filter_tags": {"c": "h"}})
    held = [j["id"] for j in (got if isinstance(got, list) else got["results"])]
    assert sorted(held) == sorted(j.id for j in jobs)
    client.patch("/jobs/", json=[{"id": held[0], "state": "RUNNING", "batch_job_id": mine["id"]}])
    for _ in range(3):
        module.run_cycle()
    assert [b["id"] for b in batch_jobs_of(client, site)] == [mine["id"]], module.last_decision
    numbers = dict(module.last_decision.numbers)
    assert (numbers["runnable"], numbers["running_footprint"]) == (0, 1), module.last_decision
    assert module.last_decision.reason == "no runnable jobs"


@pytest.mark.parametrize("job_mode, tags, filter_tags, partitions, counts", [
    ("serial", {}, {}, None, False),  # a serial launcher leases none of the 2-node jobs
    ("mpi", {"kind": "a"}, {"kind": "b"}, None, False),  # leases only jobs tagged kind b: none here
    ("mpi", {}, {}, [{"job_mode": "serial", "num_nodes": 8, "filter_tags": {}}], False),
    ("mpi", {}, {}, None, True),  # the same launcher as its own: reserved capacity, never cancelled
])
def test_a_batch_job_it_did_not_create_counts_only_if_it_can_run_the_backlog(make_site, client, job_mode, tags,
                                                                                filter_tags, partitions, counts) -> None:
    """A hand-made BatchJob in submit_queue that could run none of the backlog counted as reserved
    capacity: the backlog waited for it and got no BatchJob."""
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600,
                                                                           "max_queued_jobs": 10}}}})
    runnable_jobs(client, site, 4, num_nodes=2, tags=tags)
    body = {"site_id": site.site_id, "project": "local", "queue": "local", "num_nodes": 8, "wall_time_min": 60,
            "job_mode": job_mode, "filter_tags": filter_tags}
    if partitions:
        body["partitions"] = partitions
    foreign = client.post("/batch-jobs/", json=body)
    module = ElasticQueueModule(site, ElasticQueueOptions(job_mode="mpi", use_backfill=False, max_num_nodes=16,
                                                          max_queued_jobs=5, min_wall_time_min=10, wall_time_pad_min=1,
                                                          max_wall_time_min=60), client)
    module.run_cycle()
    numbers = dict(module.last_decision.numbers)
    if counts:
        assert module.last_decision.submit == () and numbers["reserved"] == 8, module.last_decision
    else:
        assert [s.num_nodes for s in module.last_decision.submit] == [8], module.last_decision
        assert numbers["reserved"] == 0 and numbers["batch_jobs"] == "0/5", module.last_decision
    assert client.get(f"/batch-jobs/{foreign['id']}")["state"] == "pending_submission"


@pytest.mark.parametrize("packing, job_mode, nodes", [(False, "mpi", 8), (None, "mpi", 2), (True, "mpi", 2),
                                                      (False, "serial", 2)])
def test_without_node_packing_each_mpi_job_holds_whole_nodes(make_site, client, packing, job_mode, nodes) -> None:
    """launcher.mpirun_allows_node_packing: false (Theta's default): an mpi-mode launcher runs one job
    per node, yet the footprint divided by node_packing_count (8 such jobs asked for 2 nodes, and
    the 6 left waiting looked covered by 1.5 idle nodes). The serial launcher packs them anyway."""
    site = make_site(overrides={"launcher": {"mpirun_allows_node_packing": packing},
                                "scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600,
                                                                           "max_queued_jobs": 10}}}})
    runnable_jobs(client, site, 8, node_packing_count=4)
    module = ElasticQueueModule(site, ElasticQueueOptions(job_mode=job_mode, use_backfill=False, max_num_nodes=16,
                                                          min_wall_time_min=10, wall_time_pad_min=1,
                                                          max_wall_time_min=60), client)
    module.run_cycle()
    assert [s.num_nodes for s in module.last_decision.submit] == [nodes], module.last_decision
    (mine,) = batch_jobs_of(client, site)
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "running", "scheduler_id": 7}])
    taken = [j["id"] for j in _acquire(client, site, max_num_jobs=2)]
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING", "batch_job_id": mine["id"]} for i in taken])
    module.run_cycle()
    numbers = dict(module.last_decision.numbers)
    assert (numbers["runnable_footprint"], numbers["running_footprint"]) == (6 * nodes / 8, 2 * nodes / 8)
    assert module.last_decision.submit == (), module.last_decision  # its BatchJob holds the rest
