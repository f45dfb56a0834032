"""The elastic_queue agent module against a real API server: the backlog route it reads, one cycle
at a time, and a whole agent on the local scheduler (burst -> BatchJobs -> jobs done -> drained)."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest

from balsam.models import BackfillWindow
from balsam.testing import ReplayRunner, load_recorded, result
from balsam_elastic import ElasticQueueOptions
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import idle_after_the_drain, needs_module_sections
from site_test_utils import wait_for


def _app(site_id: int, name: str = "Hello"):
    from balsam.api import ApplicationDefinition

    return type(name, (ApplicationDefinition,), {"site": site_id, "command_template": "echo hello {{ i }}",
                                                  "__module__": __name__})


@pytest.mark.parametrize("env", ["balsam_env", pytest.param("balsam_env_pg", marks=pytest.mark.postgres)])
def test_backlog_route_sums_footprints_in_one_query(env, request, tmp_path) -> None:
    from balsam._api.model import reset_default_client
    from balsam.api import Job
    from balsam.client import load_client

    request.getfixturevalue(env)
    reset_default_client()
    client = load_client()
    site_id = client.post("/sites/", json={"name": f"backlog-{env}", "path": str(tmp_path / "s")})["id"]
    App = _app(site_id)
    App.sync()
    wide = Job.objects.bulk_create([App.submit(workdir=f"w/{i}", i=i, num_nodes=2, tags={"w": "a"}, save=False) for i in range(3)])
    packed = Job.objects.bulk_create([App.submit(workdir=f"p/{i}", i=i, node_packing_count=4, tags={"w": "a"}, save=False)
                                      for i in range(4)])
    other = Job.objects.bulk_create([App.submit(workdir=f"o/{i}", i=i, num_nodes=8, tags={"w": "b"}, save=False) for i in range(2)])
    client.patch("/jobs/", json=[{"id": j.id, "state": "PREPROCESSED"} for j in wide + packed + other])

    mine = client.get(f"/sites/{site_id}/backlog", params={"tags": ["w:a"]})
    oldest = mine["states"]["PREPROCESSED"].pop("oldest_last_update")
    assert mine == {"site_id": site_id, "states": {"PREPROCESSED": {
        "count": 7, "footprint": 7.0, "unpacked_footprint": 10, "min_num_nodes": 1, "max_num_nodes": 2, "min_wall_time_min": 0,
        "max_wall_time_min": 0}}}
    rows = client.get("/jobs/", params={"tags": "w:a", "state": "PREPROCESSED", "ordering": "last_update", "limit": 1})
    # The same instant; the text may differ (PostgreSQL writes the page's JSON and drops a
    # trailing zero of the microseconds, orjson writes six digits).
    assert dt.datetime.fromisoformat(oldest) == dt.datetime.fromisoformat(rows["results"][0]["last_update"])
    everything = client.get(f"/sites/{site_id}/backlog")["states"]["PREPROCESSED"]
    assert (everything["count"], everything["footprint"], everything["max_num_nodes"]) == (9, 23.0, 8)
    # a launcher takes the packed ones: they count as running, the rest stays runnable
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 4, "max_nodes_per_job": 1, "filter_tags": {"w": "a"}})
    taken = [j["id"] for j in (got if isinstance(got, list) else got["results"])]
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in taken])
    states = client.get(f"/sites/{site_id}/backlog", params={"tags": "w:a"})["states"]
    assert states["RUNNING"]["count"] == len(taken) and states["RUNNING"]["footprint"] == pytest.approx(len(taken) / 4)
    assert states["PREPROCESSED"]["footprint"] == pytest.approx(7.0 - len(taken) / 4)
    assert client.get(f"/sites/{site_id}/backlog", params={"state": "JOB_FINISHED"})["states"] == {}
    with pytest.raises(Exception, match="404|not found"):
        client.get(f"/sites/{site_id + 10_000}/backlog")
    with pytest.raises(Exception, match="KEY:VALUE"):
        client.get(f"/sites/{site_id}/backlog", params={"tags": "no-colon"})


def test_cycles_create_batch_jobs_with_filter_tags_and_log_one_line_each(make_site, client, caplog) -> None:
    from balsam.api import Job

    site = make_site(overrides={"filter_tags": {"campaign": "c1"}})
    options = ElasticQueueOptions(service_period=1, submit_queue="local", submit_project="local", job_mode="serial",
                                  use_backfill=True, min_wall_time_min=10, wall_time_pad_min=2, max_num_nodes=1,
                                  max_queued_jobs=2)
    module = ElasticQueueModule(site, options, client)
    assert module.period == 1 and "strategy backfill" in module.describe()
    caplog.set_level(logging.INFO, logger="balsam.site.modules.elastic_queue")

    module.run_cycle()
    assert module.last_decision.reason == "no runnable jobs"
    App = _app(site.site_id)
    App.sync()
    jobs = Job.objects.bulk_create([App.submit(workdir=f"j/{i}", i=i, tags={"campaign": "c1"}, save=False) for i in range(3)])
    Job.objects.bulk_create([App.submit(workdir="x/0", i=0, tags={"campaign": "other"}, save=False)])
    client.patch("/jobs/", json=[{"id": j.id, "state": "PREPROCESSED"} for j in jobs])

    module.run_cycle()  # the local scheduler reports no backfill windows: it says so and waits
    assert module.last_decision.reason == "no backfill window in queue 'local'", module.last_decision
    module = ElasticQueueModule(site, attrs.evolve(options, use_backfill=False), client)
    module.run_cycle()
    made = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert [(b["num_nodes"], b["wall_time_min"], b["filter_tags"], b["job_mode"], b["queue"]) for b in made] == [
        (1, 358, {"campaign": "c1"}, "serial", "local")]
    module.run_cycle()  # 3 runnable, 1 node reserved: a second one
    module.run_cycle()  # max_queued_jobs (2) reached
    assert len(client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]) == 2
    assert module.last_decision.reason.startswith("max_queued_jobs reached (2 of 2")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[backfill]")]
    assert len(lines) == 5, lines
    assert lines[0].startswith("[backfill] nothing: no runnable jobs | runnable=0 ")
    assert "runnable=3 runnable_footprint=3 running_footprint=0 reserved=0 idle=0 batch_jobs=0/2 window=1x360min shortfall=3" in lines[2]


LOCAL_ELASTIC = {"service_period": 1, "submit_queue": "local", "submit_project": "local", "job_mode": "serial",
                 "max_queued_jobs": 1}
STRATEGY_SETTINGS = {
    "backfill": {"use_backfill": False, "max_num_nodes": 1, "min_wall_time_min": 10, "wall_time_pad_min": 1,
                 "max_wall_time_min": 10},
    "simple": {"strategy": "simple", "strategy_options": {"nodes_per_block": 1, "wall_time_min": 10, "max_blocks": 1}},
}
NEEDS_MODULE_SECTIONS = {"simple"}

#: max_wall_time_min less wall_time_pad_min (backfill), the block's wall time (simple)
SUBMITTED_WALL = {"backfill": 9, "simple": 10}


def _agent_log(site) -> str:
    return "\n".join(p.read_text() for p in sorted((site.site_path / "log").glob("agent_*.log")))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [pytest.param(name, marks=needs_module_sections if name in NEEDS_MODULE_SECTIONS else ())
                                      for name in sorted(STRATEGY_SETTINGS)])
def test_agent_on_the_local_scheduler_runs_a_burst_then_drains(strategy, make_site, client, agent_daemon) -> None:
    from balsam.api import Job

    # The launcher drains 1 s after its last job, not FAST_SETTINGS' 3 s: the test waits for it
    # (every BatchJob finished) and it is no less a drain.
    site = make_site(overrides={"filter_tags": {"campaign": "burst"}, "launcher": {"idle_ttl_sec": 1},
                                "elastic_queue": {**LOCAL_ELASTIC, **STRATEGY_SETTINGS[strategy]}})
    App = _app(site.site_id, "Burst")
    App.sync()
    jobs = Job.objects.bulk_create([App.submit(workdir=f"b/{i}", i=i, tags={"campaign": "burst"}, save=False) for i in range(6)])
    agent_daemon(site)

    def done() -> bool:
        rows = client.get("/jobs/", params={"site_id": site.site_id})["results"]
        return all(r["state"] == "JOB_FINISHED" for r in rows) and len(rows) == len(jobs)

    wait_for(done, timeout=120, what="the burst to finish")
    made = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert made and all(b["filter_tags"] == {"campaign": "burst"} and b["num_nodes"] == 1 for b in made), made
    assert f"[{strategy}] submit 1 nodes x {SUBMITTED_WALL[strategy]} min" in _agent_log(site)
    # empty backlog: the launcher leaves after idle_ttl_sec and nothing new is submitted
    wait_for(lambda: all(b["state"] == "finished" for b in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]),
             timeout=60, what="the launchers to drain")
    wait_for(lambda: idle_after_the_drain(_agent_log(site), strategy), timeout=30, what="an idle decision after the drain")
    assert len(client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]) == len(made), _agent_log(site)[-3000:]


DATA = Path(__file__).resolve().parents[1] / "schedulers" / "data"


def _runnable_jobs(client, site, count: int, tags: dict) -> list:
    from balsam.api import Job

    App = _app(site.site_id, f"App{uuid.uuid4().hex[:6]}")
    App.sync()
    jobs = Job.objects.bulk_create([App.submit(workdir=f"r/{i}", i=i, tags=tags, save=False) for i in range(count)])
    client.patch("/jobs/", json=[{"id": j.id, "state": "PREPROCESSED"} for j in jobs])
    return jobs


#: A site whose scheduler module accepts the BatchJobs these tests expect in queue `debug`
#: (the elastic module creates none the scheduler module would refuse).
DEBUG_QUEUE = {"scheduler": {"allowed_queues": {"debug": {"max_nodes": 8, "max_walltime": 120, "max_queued_jobs": 10}}}}


def test_pbs_windows_of_no_queue_count_for_the_submit_queue(make_site, client) -> None:
    """Polaris-style pbsnodes (recorded): 1 free node tied to `debug`, 2 tied to no queue (`*`).
    Balsam 0.7 read only the submit queue's windows (and its PBS driver had none)."""
    from balsam_scheduler_pbs import PBSScheduler

    site = make_site(overrides=DEBUG_QUEUE)
    runner = ReplayRunner({"pbsnodes": load_recorded(DATA / "pbs", "pbsnodes_a_json"),
                           "qstat": load_recorded(DATA / "pbs", "qstat_f_json_no_jobs")})
    options = ElasticQueueOptions(submit_queue="debug", min_wall_time_min=30, wall_time_pad_min=5, max_wall_time_min=60)
    module = ElasticQueueModule(site, options, client, scheduler=PBSScheduler(runner, user="u"))
    _runnable_jobs(client, site, 5, {})
    module.run_cycle()
    assert module.last_decision.submit and module.last_decision.submit[0].num_nodes == 2, module.last_decision
    assert dict(module.last_decision.numbers)["window"] == BackfillWindow(num_nodes=2, wall_time_min=60)
    made = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert [(b["num_nodes"], b["wall_time_min"], b["queue"]) for b in made] == [(2, 55, "debug")]


def test_slurm_qos_queues_get_the_partitions_windows(make_site, client) -> None:
    """Perlmutter (queue_flag --qos, submit_queue a QOS): sinfo's windows were keyed by partition,
    which no QOS name matches, so the elastic queue never submitted."""
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides={"scheduler": {"name": "slurm", "options": {"queue_flag": "--qos"}, "allowed_queues": {
        "regular": {"max_nodes": 1536, "max_walltime": 720, "max_queued_jobs": 5000}}}})
    runner = ReplayRunner({"sinfo": result(stdout="regular_milan_ss11|up|idle|40|2-00:00:00\n"
                                                  "gpu_ss11|up|idle|12|2-00:00:00\n"),
                           "squeue": result(stdout="")})
    module = ElasticQueueModule(site, ElasticQueueOptions(submit_queue="regular", max_wall_time_min=120), client,
                                scheduler=SlurmScheduler(runner, user="u", options={"queue_flag": "--qos"}))
    _runnable_jobs(client, site, 5, {})
    module.run_cycle()
    assert [(s.num_nodes, s.wall_time_min) for s in module.last_decision.submit] == [(5, 120)], module.last_decision
    assert dict(module.last_decision.numbers)["window"] == BackfillWindow(num_nodes=40, wall_time_min=2880)


def test_a_window_is_requested_once_while_its_batch_job_waits_to_start(make_site, client) -> None:
    """sinfo keeps showing a window's nodes idle until the BatchJob sized to it starts: each cycle
    until then asked for the same window again."""
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides={"scheduler": {"name": "slurm", "allowed_queues": {
        "debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}})
    _runnable_jobs(client, site, 20, {})
    submitted = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    # squeue lists job 501 once it is submitted (below): listed before the BatchJob that owns it
    # exists, it is another's job waiting for the window (another site's request), which claims it.
    squeue = {"out": ""}
    runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|4|2:00:00\ndebug|up|allocated|60|2:00:00\n"),
                           "squeue": lambda command: result(stdout=squeue["out"])})
    module = ElasticQueueModule(site, ElasticQueueOptions(submit_queue="debug", max_wall_time_min=120), client,
                                scheduler=SlurmScheduler(runner, user="u"))
    module.run_cycle()  # one 4-node BatchJob for the 4-node window, waiting for submission ...
    module.run_cycle()
    (mine,) = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 501}])
    squeue["out"] = f"501|PENDING|debug|4|1:55:00|local|1:55:00|{submitted}|N/A|N/A|Priority\n"
    for _ in range(2):  # ... then queued 1 minute: the window is still its own
        module.run_cycle()
    assert [b["id"] for b in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]] == [mine["id"]]
    assert "4 nodes of them already requested by its BatchJobs not started yet" in module.last_decision.reason


def test_regular_queue_fallback_is_marked_and_never_cancelled_as_stale(make_site, client) -> None:
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides=DEBUG_QUEUE)
    busy = result(stdout="debug|up|allocated|4|infinite\n")  # no idle node: no window
    # squeue: job 5 pending since 2026-11-22, days past max_queue_wait_time_min
    runner = ReplayRunner({"sinfo": busy, "squeue": load_recorded(DATA / "slurm", "squeue_all")})
    options = ElasticQueueOptions(submit_queue="debug", regular_queue_after_min=1, max_queue_wait_time_min=0,
                                  max_num_nodes=4, max_wall_time_min=60)
    module = ElasticQueueModule(site, options, client, scheduler=SlurmScheduler(runner, user="root"))
    jobs = _runnable_jobs(client, site, 2, {})
    module.run_cycle()
    assert module.last_decision.reason == "no backfill window in queue 'debug'"  # not waited a minute yet
    # the jobs became runnable two minutes ago
    module.read_backlog = lambda: attrs.evolve(ElasticQueueModule.read_backlog(module), oldest_runnable_wait_min=2.0)
    module.run_cycle()
    made = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert [(b["num_nodes"], b["wall_time_min"], b["status_info"]["elastic_request"]) for b in made] == [
        (2, 60, "regular_queue")], module.last_decision
    assert "submit 2 nodes x 60 min (regular queue)" in module.last_decision.log_line("backfill")
    client.patch("/batch-jobs/", json=[{"id": made[0]["id"], "state": "queued", "scheduler_id": 5}])
    jobs += _runnable_jobs(client, site, 2, {})  # more work than it reserves
    module.run_cycle()  # queued "forever" in the regular queue: not stale, and no second one
    assert module.last_decision.cancel == () and module.last_decision.submit == (), module.last_decision
    assert module.last_decision.reason.endswith("a regular-queue BatchJob already waits")
    assert len(client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]) == 1 and len(jobs) == 4


def test_scheduler_failures_are_reasons_not_crashes(make_site, client, caplog) -> None:
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site()
    down = result(stderr="slurm_load_partitions: Unable to contact slurm controller (connect failure)", returncode=1)
    runner = ReplayRunner({"sinfo": down, "squeue": load_recorded(DATA / "slurm", "synthetic_squeue_controller_down")})
    module = ElasticQueueModule(site, ElasticQueueOptions(submit_queue="debug", max_queue_wait_time_min=0), client,
                                scheduler=SlurmScheduler(runner, user="root"))
    _runnable_jobs(client, site, 2, {})
    queued = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "p", "queue": "debug", "num_nodes": 1,
                                               "wall_time_min": 30, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": queued["id"], "state": "queued", "scheduler_id": 4242}])
    caplog.set_level(logging.INFO, logger="balsam.site.modules.elastic_queue")
    module.run_cycle()
    decision = module.last_decision
    assert decision.cancel == () and decision.submit == (), decision  # no poll: nothing cancelled on a guess
    assert decision.reason.startswith("backfill windows unavailable (sinfo failed: "), decision.reason
    assert "Unable to contact slurm controller" in decision.reason
    assert any("scheduler status poll failed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert client.get(f"/batch-jobs/{queued['id']}")["state"] == "queued"


def test_a_bad_section_is_one_line_naming_the_key(make_site, client) -> None:
    site = make_site()
    with pytest.raises(ValueError, match=r"^elastic_queue.wall_time_pad_min: must be less than min_wall_time_min \(5\)$"):
        ElasticQueueModule(site, {"min_wall_time_min": 5}, client)
    with pytest.raises(ValueError, match=r"^elastic_queue.strategy_optionz: unknown option"):
        ElasticQueueModule(site, {"strategy_optionz": {}}, client)
    module = ElasticQueueModule(site, {"strategy": "simple", "strategy_options": {"max_blocks": 2}}, client)
    assert module.strategy.options.max_blocks == 2 and "strategy simple" in module.describe()


def test_requests_beyond_the_queue_limits_are_clamped_and_refused_ones_not_created(make_site, client, caplog) -> None:
    """Defaults max_num_nodes 127 x max_wall_time_min 360 against the `local` queue (1 node, 60 min
    here): clamped to the queue's limits, not created to be refused by the scheduler module forever."""
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 1, "max_walltime": 60,
                                                                           "max_queued_jobs": 10}}}})
    caplog.set_level(logging.INFO, logger="balsam.site.modules.elastic_queue")
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_queued_jobs=1), client)
    _runnable_jobs(client, site, 3, {})
    module.run_cycle()
    made = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert [(b["num_nodes"], b["wall_time_min"], b["queue"]) for b in made] == [(1, 60, "local")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "num_nodes 3 clamped to the max_nodes 1 of queue 'local' (settings.yml scheduler.allowed_queues)" in warnings

    caplog.clear()
    other = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, submit_queue="prod"), client)
    for _ in range(3):
        other.run_cycle()  # asks for a BatchJob in a queue the site does not allow, every cycle
    assert [b["queue"] for b in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]] == ["local"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["no BatchJob created: queue 'prod' is not in the site's allowed_queues (local) "
                      "(settings.yml scheduler: / elastic_queue:)"]  # once, not every cycle


@pytest.mark.parametrize("squeue", ["not_listed_yet", "poll_failed", "running"])
def test_a_queued_batch_job_keeps_its_window_until_a_poll_shows_it_running(make_site, client, squeue) -> None:
    """squeue lists a job a moment after sbatch, and a poll may fail: a queued BatchJob the poll
    said nothing of gave its window up, and the same window was requested again each such cycle
    (up to max_queued_jobs). Only a poll showing it running releases it (its nodes left the window)."""
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides={"scheduler": {"name": "slurm", "allowed_queues": {
        "debug": {"max_nodes": 64, "max_walltime": 120, "max_queued_jobs": 10}}}})
    _runnable_jobs(client, site, 20, {})
    started = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    poll = {"not_listed_yet": result(stdout=""),
            "poll_failed": result(stderr="squeue: error: Socket timed out on send/recv operation", returncode=1),
            "running": result(stdout=f"501|RUNNING|debug|4|1:55:00|local|1:54:00|{started}|{started}|N/A|None\n")}[squeue]
    runner = ReplayRunner({"sinfo": result(stdout="debug|up|idle|4|2:00:00\ndebug|up|allocated|60|2:00:00\n"),
                           "squeue": poll})
    module = ElasticQueueModule(site, ElasticQueueOptions(submit_queue="debug", max_wall_time_min=120), client,
                                scheduler=SlurmScheduler(runner, user="u"))
    module.run_cycle()  # a 4 x 115 BatchJob for the 4 x 120 window ...
    (mine,) = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert (mine["num_nodes"], mine["wall_time_min"]) == (4, 115)
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "queued", "scheduler_id": 501}])  # sbatch said 501
    for _ in range(2):
        module.run_cycle()
    made = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    if squeue == "running":  # its nodes are taken: the next window is another's
        assert len(made) == 2, made
    else:
        assert [b["id"] for b in made] == [mine["id"]], made
        assert "4 nodes of them already requested by its BatchJobs not started yet" in module.last_decision.reason


def test_batch_jobs_that_can_never_start_are_no_capacity_and_warned_once_each(make_site, client, caplog) -> None:
    """allowed_queues max_nodes 8 on a 4-node partition: Slurm keeps the 8-node BatchJobs pending
    with PartitionConfig for ever. Counted as capacity they covered the backlog for ever ("16 idle
    >= 16 needed"); now they count as none, each is named once, and none as large is requested again."""
    from balsam.api import Job
    from balsam_scheduler_slurm import SlurmScheduler

    site = make_site(overrides={"scheduler": {"name": "slurm", "allowed_queues": {
        "debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 10}}}})
    App = _app(site.site_id, f"App{uuid.uuid4().hex[:6]}")
    App.sync()
    jobs = Job.objects.bulk_create([App.submit(workdir=f"w/{i}", i=i, num_nodes=8, save=False) for i in range(2)])
    client.patch("/jobs/", json=[{"id": j.id, "state": "PREPROCESSED"} for j in jobs])
    options = ElasticQueueOptions(submit_queue="debug", use_backfill=False, max_num_nodes=8, max_wall_time_min=30,
                                  min_wall_time_min=10)
    submitted = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%S")

    def squeue(reason: str) -> Any:
        return result(stdout="".join(f"{sid}|PENDING|debug|8|25:00|local|25:00|{submitted}|N/A|N/A|{reason}\n"
                                     for sid in (601, 602)))

    runner = ReplayRunner({"squeue": squeue("Priority")})  # not evaluated yet: it may start
    module = ElasticQueueModule(site, options, client, scheduler=SlurmScheduler(runner, user="u"))
    caplog.set_level(logging.INFO, logger="balsam.site.modules.elastic_queue")
    for sid in (601, 602):  # two cycles, two 8 x 25 BatchJobs, which sbatch numbered 601 and 602
        module.run_cycle()
        newest = max(client.get("/batch-jobs/", params={"site_id": site.site_id})["results"], key=lambda b: b["id"])
        client.patch("/batch-jobs/", json=[{"id": newest["id"], "state": "queued", "scheduler_id": sid}])
    mine = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert sorted((b["num_nodes"], b["wall_time_min"]) for b in mine) == [(8, 25), (8, 25)]
    runner.answers["squeue"] = squeue("PartitionConfig")  # Slurm's verdict: wider than the partition
    for _ in range(3):
        module.run_cycle()
    assert len(client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]) == 2  # none more
    numbers = dict(module.last_decision.numbers)
    assert (numbers["reserved"], numbers["idle"], numbers["never_starts"]) == (0, 0.0, 2), numbers
    low = min(b["id"] for b in mine)
    assert module.last_decision.reason == (f"BatchJob {low} (8 nodes x 25 min) can never start as submitted "
                                           f"(scheduler: PartitionConfig): no BatchJob as large is requested again")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "can never start" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per BatchJob, not one per cycle
    for b in mine:
        (line,) = [w for w in warnings if w.startswith(f"BatchJob {b['id']} ")]
        assert "the scheduler says 'PartitionConfig'" in line and "allowed_queues.debug.max_nodes" in line, line
    assert all(b["state"] == "queued" for b in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"])
    snapshot = module.snapshot()  # the project its requests charge, and each BatchJob's: they hold back only their own
    assert snapshot.project == options.submit_project and {b.project for b in snapshot.batch_jobs} == {options.submit_project}
