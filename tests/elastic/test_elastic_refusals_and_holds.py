"""The elastic queue and the scheduler's answers to its requests: a request the scheduler refused
for good is not made again (it was, every cycle), requests held back at a queue limit are cancelled
once nothing needs them or once they are past max_queue_wait_time_min, and jobs wider than its
widest request are said to be so (they inflated the requests)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import attrs
import pytest

from balsam.models import BackfillWindow
from balsam.states import BatchJobState
from balsam_elastic import BackfillStrategy, Backlog, BatchJobView, ElasticQueueOptions, SimpleStrategy, Snapshot
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import Windows, batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
SLURM = Path(__file__).parent.parent / "schedulers" / "data" / "slurm"
DEBUG = {"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}}
Q, R, P, F = (BatchJobState.queued, BatchJobState.running, BatchJobState.pending_submission,
              BatchJobState.submit_failed)
W = BackfillWindow
HELD = "waiting: queue 'debug' is at a scheduler limit: qsub: would exceed queue debug's per-user limit"


def _logged(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# -- 2. a request the scheduler refuses for good ----------------------------------------------------

def test_a_request_the_scheduler_refused_for_good_is_not_made_again(make_site, client, caplog) -> None:
    """QOSMaxNodePerJobLimit (recorded on a real Slurm): the scheduler module marks the BatchJob
    submit_failed, and the elastic queue, seeing no capacity, created another every cycle (5
    BatchJobs and 5 sbatch calls in 5 cycles, not a word). Now: one BatchJob, one sbatch, one ERROR
    naming it; a smaller request still goes; another project is not held back."""
    from balsam.scheduler import CommandResult
    from balsam.site.modules.scheduler import SchedulerModule
    from balsam.testing.replay import ReplayRunner, load_recorded
    from balsam_scheduler_slurm import SlurmScheduler

    runner = ReplayRunner({"sbatch": load_recorded(SLURM, "sbatch_qos_node_limit"),
                           "squeue": CommandResult(("squeue",), 0, "", ""), "sinfo": CommandResult(("sinfo",), 0, "", "")})
    slurm = SlurmScheduler(runner, user="root")
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["root", "other"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    scheduler = SchedulerModule(site, site.settings.scheduler, client, scheduler=slurm)
    settings = {"submit_queue": "debug", "submit_project": "root", "use_backfill": False, "max_num_nodes": 2,
                "max_wall_time_min": 60}
    elastic = ElasticQueueModule(site, settings, client, scheduler=slurm)
    jobs = runnable_jobs(client, site, 2)
    caplog.set_level(logging.INFO)
    for _ in range(8):
        elastic.run_cycle()
        scheduler.run_cycle()
    rows = batch_jobs_of(client, site)
    assert [(b["num_nodes"], b["wall_time_min"], b["state"]) for b in rows] == [(2, 55, "submit_failed")], rows
    assert [c.args[0] for c in runner.calls].count("sbatch") == 1
    refused = rows[0]["id"]
    assert elastic.last_decision.reason.startswith(f"BatchJob {refused} (2 nodes x 55 min) was refused by the scheduler "
                                                   f"(submit failed: sbatch refused the job: QOSMaxNodePerJobLimit")
    errors = _logged(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"BatchJob {refused} (2 nodes x 55 min in queue 'debug', project 'root') was refused by "
                                f"the scheduler: submit failed: sbatch refused the job: QOSMaxNodePerJobLimit"), errors

    # A smaller request (one job left: 1 node) may start under a size limit: it is made, once.
    client.delete(f"/jobs/{jobs[0].id}")
    for _ in range(4):
        elastic.run_cycle()
        scheduler.run_cycle()
    assert [(b["num_nodes"], b["state"]) for b in batch_jobs_of(client, site)] == [(2, "submit_failed"), (1, "submit_failed")]
    assert [c.args[0] for c in runner.calls].count("sbatch") == 2 and len(_logged(caplog, logging.ERROR)) == 2

    # Another project (settings.yml changed, the agent restarted) is not held back by these.
    other = ElasticQueueModule(site, {**settings, "submit_project": "other"}, client, scheduler=slurm)
    other.run_cycle()
    assert [(b["project"], b["state"]) for b in batch_jobs_of(client, site)][-1] == ("other", "pending_submission")


def _failed(client, site, *, error_time: str, mine: bool = True, scheduler_id=None, nodes: int = 2,
            project: str = "root", for_good: bool = True) -> int:
    """A BatchJob as the scheduler module leaves one it could not submit (submit_failed, its error;
    marked refused_for_good when the scheduler refused the request itself, not when a command kept
    failing through the module's retries)."""
    info = {"elastic_request": "backfill"} if mine else {}
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": project, "queue": "debug",
                                             "num_nodes": nodes, "wall_time_min": 55, "job_mode": "mpi",
                                             "status_info": info})
    update = {"id": made["id"], "state": "submit_failed",
              "status_info": {**info, "error": "submit failed: QOSMaxNodePerJobLimit", "error_time": error_time,
                              **({"refused_for_good": "true"} if for_good else {})}}
    if scheduler_id is not None:
        client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": scheduler_id}])
    client.patch("/batch-jobs/", json=[update])
    return made["id"]


def test_only_its_own_recent_refusals_hold_requests_back(make_site, client) -> None:
    """What counts as refused: its own BatchJobs (the elastic_request stamp), never submitted (no
    scheduler id: a job that reached the queue and failed there later is another matter), refused
    since the module started and within a day, of its project; at least as large as the request."""
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["root", "other"]}})
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "root", "use_backfill": False,
                                       "max_num_nodes": 2, "max_wall_time_min": 60}, client, scheduler=Windows())
    now = dt.datetime.now(dt.timezone.utc)
    _failed(client, site, error_time=(now - dt.timedelta(days=2)).isoformat())  # before the module started
    _failed(client, site, error_time=now.isoformat(), mine=False)  # made by hand
    _failed(client, site, error_time=now.isoformat(), scheduler_id=4242)  # reached the queue
    _failed(client, site, error_time=now.isoformat(), project="other")  # another project
    _failed(client, site, error_time=now.isoformat(), nodes=3)  # larger than the request
    # The scheduler was down: not refused (an hour ago: its submission backoff is over).
    _failed(client, site, error_time=(now - dt.timedelta(hours=1)).isoformat(), for_good=False)
    runnable_jobs(client, site, 2)
    module.run_cycle()
    assert [(s.num_nodes, s.wall_time_min) for s in module.last_decision.submit] == [(2, 55)], module.last_decision
    counted = _failed(client, site, error_time=dt.datetime.now(dt.timezone.utc).isoformat())
    client.patch("/batch-jobs/", json=[{"id": b["id"], "state": "pending_deletion"} for b in batch_jobs_of(client, site)
                                       if b["state"] == "pending_submission"])
    module.run_cycle()
    assert module.last_decision.submit == () and f"BatchJob {counted} (2 nodes x 55 min) was refused" in \
        module.last_decision.reason, module.last_decision
    # Older than a day, even since the module started: forgotten.
    module.started_at -= dt.timedelta(days=3)
    client.patch("/batch-jobs/", json=[{"id": counted, "status_info": {
        "elastic_request": "backfill", "error": "submit failed: QOSMaxNodePerJobLimit", "refused_for_good": "true",
        "error_time": (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=25)).isoformat()}}])
    module.run_cycle()
    assert [(s.num_nodes, s.wall_time_min) for s in module.last_decision.submit] == [(2, 55)], module.last_decision


def refused(id: int, nodes: int, wall: int, project: str = "p") -> BatchJobView:
    return BatchJobView(id=id, state=F, num_nodes=nodes, wall_time_min=wall, never_starts="QOSMaxNodePerJobLimit",
                        project=project)


@pytest.mark.parametrize("strategy, refusals, submits", [
    ("backfill", [(3, 4, 55)], ()),
    ("backfill", [(3, 8, 55)], ((4, 55),)),  # a larger one refused: a smaller request may start
    ("backfill", [(3, 4, 55, "q")], ((4, 55),)),  # another project's refusal
    ("simple", [(3, 2, 60)], ()),
    ("simple", [(3, 2, 90)], ((2, 60), (2, 60))),
])
def test_strategies_request_nothing_as_large_as_a_refused_batch_job(strategy, refusals, submits) -> None:
    settings = ElasticQueueOptions(strategy=strategy, submit_queue="debug", max_num_nodes=4, use_backfill=False,
                                   max_wall_time_min=60, strategy_options={"nodes_per_block": 2} if strategy == "simple" else {})
    cls = BackfillStrategy if strategy == "backfill" else SimpleStrategy
    decision = cls(settings, settings.strategy_options).decide(Snapshot(
        backlog=Backlog(runnable_count=4, runnable_footprint=4.0, min_runnable_nodes=1, max_runnable_nodes=1),
        refused=tuple(refused(*r) for r in refusals), project="p"))
    assert [(s.num_nodes, s.wall_time_min) for s in decision.submit] == list(submits), decision
    if not submits:
        assert "was refused by the scheduler (QOSMaxNodePerJobLimit): no BatchJob as large" in decision.reason


# -- 4. backfill's requests held back at a queue limit -------------------------------------------------

def bj(id: int, state=P, nodes: int = 1, wall: int = 55, held: str = "", age: int | None = 0, regular: bool = False,
       owned: bool = True, queued: int | None = None) -> BatchJobView:
    return BatchJobView(id=id, state=state, num_nodes=nodes, wall_time_min=wall, held=held, age_min=age,
                        regular_queue=regular, owned=owned, queued_time_min=queued,
                        polled_state=Q if queued is not None else None)


def backlog(runnable: int = 0, footprint: float = 0.0) -> Backlog:
    return Backlog(runnable_count=runnable, runnable_footprint=footprint, min_runnable_nodes=1 if runnable else 0,
                   max_runnable_nodes=1 if runnable else 0)


WINDOW = (W(num_nodes=8, wall_time_min=60),)
# (case, snapshot (built in the test), expected submissions, expected cancels, words in the reason)
HELD_CASES = [
    ("the backlog is gone: its requests held back are cancelled",
     lambda: Snapshot(batch_jobs=(bj(1, held=HELD), bj(2, held=HELD)), windows=WINDOW), (), (2, 1),
     "2 BatchJob(s) not started yet that no runnable job needs; no runnable jobs"),
    ("the backlog is gone: one waiting for its submission without a hold is cancelled too (read again before "
     "the PATCH, as simple's blocks)",
     lambda: Snapshot(batch_jobs=(bj(1, held=HELD), bj(2)), windows=WINDOW), (), (2, 1),
     "2 BatchJob(s) not started yet that no runnable job needs; no runnable jobs"),
    ("the backlog is gone: none held, all not started cancelled",
     lambda: Snapshot(batch_jobs=(bj(1), bj(2, age=30)), windows=WINDOW), (), (2, 1), "no runnable jobs"),
    ("a regular-queue one is cancelled, one it did not create is kept",
     lambda: Snapshot(batch_jobs=(bj(1, held=HELD, regular=True), bj(2, owned=False, age=None)), windows=WINDOW), (), (1,),
     "1 BatchJob(s) not started yet that no runnable job needs; no runnable jobs"),
    ("queued per the poll: cancelled; running: kept",
     lambda: Snapshot(batch_jobs=(bj(1, Q, queued=3), bj(2, R)), windows=WINDOW), (), (1,), "no runnable jobs"),
    ("jobs that fit none of its BatchJobs need none of them",
     lambda: Snapshot(backlog=Backlog(unfit_count=2, unfit_reason="too wide"), batch_jobs=(bj(1, held=HELD),), windows=WINDOW),
     (), (1,), "no runnable job fits its BatchJobs"),
    ("idle nodes cover the backlog: the newest requests the others can spare are cancelled",
     lambda: Snapshot(backlog=attrs.evolve(backlog(3, 3.0), running_footprint=2.0),
              batch_jobs=(bj(1, R, nodes=4), bj(2, nodes=2, held=HELD), bj(3, nodes=1, held=HELD)),
              windows=WINDOW), (), (3,), "1 BatchJob(s) not started yet that no runnable job needs; idle nodes cover"),
    ("idle nodes cover the backlog: the newest, held back or not",
     lambda: Snapshot(backlog=attrs.evolve(backlog(3, 3.0), running_footprint=2.0),
              batch_jobs=(bj(1, R, nodes=4), bj(2, nodes=1, held=HELD), bj(3, nodes=1)),
              windows=WINDOW), (), (3,), "1 BatchJob(s) not started yet that no runnable job needs; idle nodes cover"),
    ("the backlog needs them all: none cancelled",
     lambda: Snapshot(backlog=backlog(3, 3.0), batch_jobs=(bj(2, nodes=2, held=HELD), bj(3, nodes=1)), windows=WINDOW),
     (), (), "idle nodes cover the backlog (3 idle >= 3 needed)"),
    ("held past max_queue_wait_time_min from its creation: stale, and its window is requested anew",
     lambda: Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(1, nodes=2, held=HELD, age=11),), windows=(W(num_nodes=2, wall_time_min=60),)),
     ((2, 55),), (1,), "1 stale BatchJob(s) cancelled"),
    ("held exactly max_queue_wait_time_min: not stale",
     lambda: Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(1, nodes=2, held=HELD, age=10),), windows=WINDOW), (), (),
     "idle nodes cover"),
    ("as old but not held (the scheduler module has not looked at it yet): not stale",
     lambda: Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(1, nodes=2, age=30),), windows=WINDOW), (), (), "idle nodes cover"),
    ("a held regular-queue one is never stale",
     lambda: Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(1, nodes=2, held=HELD, age=30, regular=True),), windows=WINDOW),
     (), (), "idle nodes cover"),
    ("held past the wait with nothing to run: cancelled",
     lambda: Snapshot(batch_jobs=(bj(1, held=HELD, age=30),), windows=WINDOW), (), (1,),
     "1 BatchJob(s) held in pending_submission past max_queue_wait_time_min; no runnable jobs"),
    ("its held requests claim their window, and the reason says they are held",
     lambda: Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(1, nodes=2, held=HELD),), windows=(W(num_nodes=2, wall_time_min=60),)),
     (), (), "2 nodes of them already requested by its BatchJobs not started yet (1 of them held back, BatchJob 1: "
             "waiting: queue 'debug' is at a scheduler limit"),
]


@pytest.mark.parametrize("case, snapshot, submits, cancels, words", HELD_CASES, ids=[c[0] for c in HELD_CASES])
def test_backfill_cancels_the_held_requests_nothing_needs(case, snapshot, submits, cancels, words) -> None:
    settings = ElasticQueueOptions(submit_queue="debug", max_queue_wait_time_min=10)
    decision = BackfillStrategy(settings).decide(snapshot())
    assert [(s.num_nodes, s.wall_time_min) for s in decision.submit] == list(submits), decision
    assert decision.cancel == cancels, decision
    assert words in decision.reason, decision.reason


def test_a_held_request_is_cancelled_once_its_backlog_is_gone(make_site, client, caplog) -> None:
    """Fake PBS at its per-user limit (FAKE_BATCH_MAX_QUEUED=1, audit): the scheduler module held the
    backfill request in pending_submission, the backlog went away, and the request was submitted
    once the limit lifted, for nothing. The hold is what the scheduler module writes
    (status_info.waiting); the module now cancels the request, and its INFO line says it is held."""
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["proj"]}})
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "proj", "max_num_nodes": 1,
                                       "max_wall_time_min": 60, "min_wall_time_min": 35}, client,
                                scheduler=Windows(W(num_nodes=1, wall_time_min=60)))
    caplog.set_level(logging.INFO, logger=LOGGER)
    runnable_jobs(client, site, 2)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    client.patch("/batch-jobs/", json=[{"id": made["id"], "status_info": {**made["status_info"], "waiting": HELD}}])
    module.run_cycle()
    assert module.last_decision.submit == () and module.last_decision.cancel == (), module.last_decision
    assert _logged(caplog, logging.INFO)[-1].endswith(f" | held=1 (BatchJob {made['id']}: {HELD})")

    client.delete("/jobs/", params={"site_id": site.site_id})  # the backlog is gone (done elsewhere)
    module.run_cycle()
    assert module.last_decision.cancel == (made["id"],), module.last_decision
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["pending_deletion"]
    assert made["status_info"]["elastic_request"] == "backfill" and made["status_info"]["elastic_created"]


class SubmittedMeanwhile(Windows):
    """Windows, and while the module asks for them (after it read its BatchJobs, before its PATCH)
    the scheduler module submits BatchJob ``moved`` (its hold lifted): queued, then running."""

    def __init__(self, client, *windows: BackfillWindow, to: tuple[str, ...] = ("queued",)) -> None:
        super().__init__(*windows)
        self.client, self.to, self.moved = client, to, None

    def get_backfill_windows(self) -> dict:
        if self.moved is not None:
            for state in self.to:
                update = {"id": self.moved, "state": state}
                if state == "queued":
                    update["scheduler_id"] = 4242
                self.client.patch("/batch-jobs/", json=[update])
            self.moved = None
        return super().get_backfill_windows()


@pytest.mark.parametrize("to", [("queued",), ("queued", "running")], ids=["queued", "running"])
def test_a_request_submitted_after_the_snapshot_is_not_cancelled(make_site, client, caplog, to) -> None:
    """The snapshot reads the BatchJobs, then asks the scheduler (seconds); a held request whose hold
    lifted meanwhile was queued (or running) when the PATCH marked it pending_deletion, and the
    scheduler module deleted the allocation. It is read again just before the PATCH and kept."""
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["proj"]}})
    scheduler = SubmittedMeanwhile(client, W(num_nodes=1, wall_time_min=60), to=to)
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "proj", "max_num_nodes": 1,
                                       "max_wall_time_min": 60, "min_wall_time_min": 35}, client, scheduler=scheduler)
    caplog.set_level(logging.INFO, logger=LOGGER)
    runnable_jobs(client, site, 1)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    client.patch("/batch-jobs/", json=[{"id": made["id"], "status_info": {**made["status_info"], "waiting": HELD}}])
    client.delete("/jobs/", params={"site_id": site.site_id})  # the backlog is gone
    scheduler.moved = made["id"]
    module.run_cycle()
    assert module.last_decision.cancel == (made["id"],), module.last_decision  # the snapshot's decision
    assert [b["state"] for b in batch_jobs_of(client, site)] == [to[-1]]
    assert module.last_cancelled == ()
    assert any(f"BatchJob {made['id']} not cancelled: it was pending_submission when this cycle read it, "
               f"and is {to[-1]} now" in m for m in _logged(caplog, logging.INFO))
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "pending_deletion"}])


def test_a_stale_held_request_submitted_after_the_snapshot_is_not_cancelled(make_site, client) -> None:
    """The same re-read protects a request held past max_queue_wait_time_min (stale) whose hold
    lifted while the module asked the scheduler; the cycle's new request is still made."""
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["proj"]}})
    scheduler = SubmittedMeanwhile(client, W(num_nodes=1, wall_time_min=60))
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "proj", "max_num_nodes": 1,
                                       "max_wall_time_min": 60, "min_wall_time_min": 35,
                                       "max_queue_wait_time_min": 10}, client, scheduler=scheduler)
    runnable_jobs(client, site, 1)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    created = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=30)
    client.patch("/batch-jobs/", json=[{"id": made["id"], "status_info": {
        **made["status_info"], "waiting": HELD, "elastic_created": created.isoformat()}}])
    scheduler.moved = made["id"]
    module.run_cycle()
    assert module.last_decision.cancel == (made["id"],), module.last_decision
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["queued", "pending_submission"]
    assert module.last_cancelled == ()
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "pending_deletion"}])


def test_a_pending_request_without_a_hold_is_cancelled_once_nothing_needs_it(make_site, client) -> None:
    """Not held back, a request waiting for its submission is cancelled once the backlog is gone (it
    was kept, and started later for nothing); the module reads it again just before the PATCH and
    keeps it if the scheduler module submitted it meanwhile (see the test above)."""
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["proj"]}})
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "proj", "max_num_nodes": 1,
                                       "max_wall_time_min": 60, "min_wall_time_min": 35}, client,
                                scheduler=Windows(W(num_nodes=1, wall_time_min=60)))
    runnable_jobs(client, site, 1)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    client.delete("/jobs/", params={"site_id": site.site_id})
    module.run_cycle()
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["pending_deletion"]
    assert module.last_decision.cancel == (made["id"],) and module.last_cancelled == (made["id"],), module.last_decision


def test_a_request_held_past_max_queue_wait_time_min_is_stale(make_site, client) -> None:
    """Timed from its creation (the elastic_created stamp): held longer than the wait, the window
    it was fitted to is long gone; it is cancelled and the current window requested."""
    site = make_site(overrides={"scheduler": {"allowed_queues": DEBUG, "allowed_projects": ["proj"]}})
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "proj", "max_num_nodes": 1,
                                       "max_wall_time_min": 60, "min_wall_time_min": 35,
                                       "max_queue_wait_time_min": 10}, client,
                                scheduler=Windows(W(num_nodes=1, wall_time_min=60)))
    runnable_jobs(client, site, 1)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    created = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=30)
    client.patch("/batch-jobs/", json=[{"id": made["id"], "status_info": {
        **made["status_info"], "waiting": HELD, "elastic_created": created.isoformat()}}])
    module.run_cycle()
    assert module.last_decision.cancel == (made["id"],), module.last_decision
    assert [(s.num_nodes, s.wall_time_min) for s in module.last_decision.submit] == [(1, 55)], module.last_decision
    assert [b["state"] for b in batch_jobs_of(client, site)] == ["pending_deletion", "pending_submission"]


# -- 5. jobs wider than its widest request ----------------------------------------------------------

@pytest.mark.parametrize("settings, key", [
    ({"use_backfill": False, "max_num_nodes": 4, "max_wall_time_min": 60}, "max_num_nodes 4"),
    ({"strategy": "simple", "strategy_options": {"nodes_per_block": 4, "max_blocks": 8}}, "strategy_options.nodes_per_block 4"),
])
def test_jobs_wider_than_its_widest_request_are_reported_not_counted(make_site, client, caplog, settings, key) -> None:
    """Queue max_nodes 16, max_num_nodes 4, a 12-node and a 1-node job: 4+4+4+1 = 13 nodes in 4
    BatchJobs, of which 1 node of work could run, and no warning. Now: the 12-node job does not
    count, and one warning (an ERROR once it is the only runnable job) names the limit."""
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600,
                                                                           "max_queued_jobs": 20}}}})
    module = ElasticQueueModule(site, settings, client, scheduler=Windows())
    caplog.set_level(logging.INFO, logger=LOGGER)
    runnable_jobs(client, site, 1, num_nodes=12)
    runnable_jobs(client, site, 1)
    for _ in range(5):
        module.run_cycle()
    assert sum(b["num_nodes"] for b in batch_jobs_of(client, site)) <= 4, batch_jobs_of(client, site)
    message = (f"runnable jobs its BatchJobs can never run: more nodes than elastic_queue.{key}, the most nodes its "
               f"BatchJobs have (settings.yml)")
    assert _logged(caplog, logging.WARNING) == [message]
    assert dict(module.last_decision.numbers)["runnable"] == 1, module.last_decision

    # The wide job alone: nothing requested for it, and the same words at ERROR, once.
    only = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600,
                                                                           "max_queued_jobs": 20}}}})
    module = ElasticQueueModule(only, settings, client, scheduler=Windows())
    runnable_jobs(client, only, 1, num_nodes=12)
    for _ in range(3):
        module.run_cycle()
    assert batch_jobs_of(client, only) == [] and _logged(caplog, logging.ERROR) == [message]
    assert module.last_decision.reason.startswith("no runnable job fits its BatchJobs (1 runnable: more nodes than "
                                                  f"elastic_queue.{key}"), module.last_decision
