"""Findings of the elastic queue's audit on a faked Polaris/PBS site: requests queued for a backlog
that drained are cancelled, regular-queue ones included (F1); no new BatchJob every cycle while the
scheduler is unreachable (F3); nothing more submitted to a queue holding one back at its per-user
limit (F4); an empty backlog is said to be so before max_queued_jobs (L1)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import attrs
import pytest

from balsam.models import BackfillWindow
from balsam.states import BatchJobState
from balsam_elastic import BackfillStrategy, Backlog, BatchJobView, ElasticQueueOptions, Snapshot
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

Q, R, P = BatchJobState.queued, BatchJobState.running, BatchJobState.pending_submission
W = BackfillWindow
PROD = {"prod": {"max_nodes": 8, "max_walltime": 120, "max_queued_jobs": 10}}
HELD = "waiting: queue 'prod' is at a scheduler limit: qsub: would exceed queue prod's per-user limit"
DOWN = "submit failed: qsub: cannot connect to server pbs (errno=15010)"


def bj(id: int, state=P, nodes: int = 1, *, regular: bool = False, owned: bool = True, queued: int | None = None,
       held: str = "", project: str = "p") -> BatchJobView:
    return BatchJobView(id=id, state=state, num_nodes=nodes, wall_time_min=55, regular_queue=regular, owned=owned,
                        queued_time_min=queued, polled_state=Q if queued is not None else None, held=held, age_min=0,
                        project=project)


def backlog(runnable: int = 0, footprint: float = 0.0, running: float = 0.0) -> Backlog:
    return Backlog(runnable_count=runnable, runnable_footprint=footprint, min_runnable_nodes=1 if runnable else 0,
                   max_runnable_nodes=1 if runnable else 0, running_footprint=running)


# -- F1: its requests that have not started, once the backlog no longer needs them ----------------------

F1_CASES = [
    ("drained: a regular-queue one queued per the poll is cancelled",
     Snapshot(batch_jobs=(bj(4, Q, regular=True, queued=30),)), (4,)),
    ("drained: queued per the poll, window-fitted and regular, and pending ones (held or not), newest first",
     Snapshot(batch_jobs=(bj(1, Q, queued=2), bj(2, Q, regular=True, queued=2), bj(3), bj(4, held=HELD))), (4, 3, 2, 1)),
    ("drained: one queued per the API but not per the poll (it may run), running ones and others' are kept",
     Snapshot(batch_jobs=(bj(1, Q, regular=True), bj(2, R), bj(3, Q, owned=False, queued=2), bj(4, owned=False))), ()),
    ("running nodes cover the backlog: the newest the others can spare, regular-queue ones included",
     Snapshot(backlog=backlog(2, 2.0, running=1.0), batch_jobs=(bj(1, R, nodes=2), bj(2, Q, regular=True, queued=5),
                                                                  bj(3, Q, regular=True, queued=5))), (3,)),
    ("the backlog needs them: none cancelled",
     Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(1, Q, regular=True, queued=5),)), ()),
]


@pytest.mark.parametrize("case, snapshot, cancels", F1_CASES, ids=[c[0] for c in F1_CASES])
def test_backfill_cancels_its_requests_not_started_that_nothing_needs(case, snapshot, cancels) -> None:
    settings = ElasticQueueOptions(submit_queue="prod", use_backfill=False, max_num_nodes=4, max_wall_time_min=60)
    decision = BackfillStrategy(settings).decide(attrs.evolve(snapshot, project="p"))
    assert decision.cancel == cancels, decision


class Polled:
    """A PBS-like driver for the elastic module alone: the given scheduler ids queued for 20 min."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def get_statuses(self) -> dict:
        return {sid: SimpleNamespace(state=BatchJobState.queued, queued_time_min=20, message="") for sid in self.ids}

    def never_starts(self, status) -> bool:
        return False

    def get_backfill_windows(self) -> dict:
        return {}


def test_a_regular_queue_request_queued_for_a_drained_backlog_is_cancelled(make_site, client) -> None:
    """Audit: "BJ 4 kind=regular_queue ran=16.0s jobs=0": queued for a backlog that drained, it was
    kept, started later and ran nothing. Now it is cancelled once the poll shows it still queued; a
    BatchJob made by hand in the same queue is left alone."""
    site = make_site(overrides={"scheduler": {"allowed_queues": PROD, "allowed_projects": ["proj"]}})
    scheduler = Polled()
    module = ElasticQueueModule(site, {"submit_queue": "prod", "submit_project": "proj", "use_backfill": False,
                                       "max_num_nodes": 2, "max_wall_time_min": 60}, client, scheduler=scheduler)
    runnable_jobs(client, site, 2)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    assert made["status_info"]["elastic_request"] == "regular_queue"
    mine = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "proj", "queue": "prod", "num_nodes": 1,
                                             "wall_time_min": 30, "job_mode": "mpi", "filter_tags": {}})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 4242},
                                       {"id": mine["id"], "state": "queued", "scheduler_id": 4343}])
    scheduler.ids = [4242, 4343]
    client.delete("/jobs/", params={"site_id": site.site_id})  # the backlog drained (done elsewhere)
    module.run_cycle()
    assert module.last_decision.cancel == (made["id"],) and module.last_cancelled == (made["id"],), module.last_decision
    # withdrawn only while still queued: marked, deleted by the scheduler module's own fresh poll
    rows = {b["id"]: b for b in batch_jobs_of(client, site)}
    assert {i: b["state"] for i, b in rows.items()} == {made["id"]: "queued", mine["id"]: "queued"}
    assert "withdraw_if_queued" in rows[made["id"]]["status_info"]
    assert "withdraw_if_queued" not in rows[mine["id"]]["status_info"]
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "pending_deletion"}])


# -- F3: backoff while submissions fail without a refusal (the scheduler unreachable) --------------------

def _failed(client, site, when: dt.datetime, *, mine: bool = True, for_good: bool = False) -> int:
    info = {"elastic_request": "regular_queue"} if mine else {}
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "proj", "queue": "prod", "num_nodes": 2,
                                             "wall_time_min": 55, "job_mode": "mpi", "status_info": info})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "submit_failed", "status_info": {
        **info, "error": DOWN, "error_time": when.isoformat(), **({"refused_for_good": "true"} if for_good else {})}}])
    return made["id"]


def _module(site, client, period: int = 60) -> ElasticQueueModule:
    return ElasticQueueModule(site, {"submit_queue": "prod", "submit_project": "proj", "use_backfill": False,
                                     "max_num_nodes": 2, "max_wall_time_min": 60, "service_period": period},
                              client, scheduler=Polled())


def _pending(client, site) -> list[dict]:
    return [b for b in batch_jobs_of(client, site) if b["state"] == "pending_submission"]


def test_submissions_back_off_while_the_scheduler_is_unreachable(make_site, client) -> None:
    """Audit: with qsub failing (errno=15010) a new submit_failed BatchJob every cycle, ~60 an hour.
    Now: after such a failure of its own, nothing is submitted for service_period, doubling with each
    failure in a row (30 min at most), and the cycle line says until when."""
    site = make_site(overrides={"scheduler": {"allowed_queues": PROD, "allowed_projects": ["proj"]}})
    module = _module(site, client)
    runnable_jobs(client, site, 2)
    now = dt.datetime.now(dt.timezone.utc)
    first = _failed(client, site, now - dt.timedelta(seconds=30))
    module.run_cycle()
    assert module.last_decision.submit == () and _pending(client, site) == [], module.last_decision
    assert (f"backing off after 1 failed submission(s) in a row (BatchJob {first}: {DOWN}): nothing submitted until "
            in module.last_decision.reason), module.last_decision.reason
    # Two in a row, the newest 90 s ago: the wait is 120 s.
    second = _failed(client, site, now - dt.timedelta(seconds=90))
    module.run_cycle()
    assert module.last_decision.submit == () and f"after 2 failed submission(s) in a row (BatchJob {second}" in \
        module.last_decision.reason, module.last_decision
    # A refusal for good, or one not its own, is not an outage: it does not back off (refusals have their rule).
    client.patch("/batch-jobs/", json=[{"id": i, "state": "pending_deletion"} for i in (first, second)])


def test_the_backoff_ends_after_its_wait_and_at_a_successful_submission(make_site, client) -> None:
    site = make_site(overrides={"scheduler": {"allowed_queues": PROD, "allowed_projects": ["proj"]}})
    module = _module(site, client)
    runnable_jobs(client, site, 2)
    now = dt.datetime.now(dt.timezone.utc)
    # 3 in a row: 240 s; the newest 300 s ago: over.
    for ago in (900, 600, 300):
        _failed(client, site, now - dt.timedelta(seconds=ago))
    module.run_cycle()
    assert [(s.num_nodes, s.wall_time_min) for s in module.last_decision.submit] == [(2, 55)], module.last_decision
    [made] = _pending(client, site)
    # It reached the queue, then another failed just now: a run of 1 (60 s), not of 4.
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 77}])
    module.scheduler.ids = [77]
    module.run_cycle()
    newest = _failed(client, site, dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=10))
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "pending_deletion"}])
    module.run_cycle()
    assert f"after 1 failed submission(s) in a row (BatchJob {newest}" in module.last_decision.reason, module.last_decision
    # Failures made by hand, or refused for good, start no backoff.
    client.patch("/batch-jobs/", json=[{"id": newest, "status_info": {"elastic_request": "regular_queue", "error": DOWN,
                                                                       "error_time": now.isoformat(),
                                                                       "refused_for_good": "true"}}])
    _failed(client, site, now, mine=False)
    module.run_cycle()
    assert "backing off" not in module.last_decision.reason, module.last_decision


# -- F4: a queue holding one of its project's BatchJobs back ---------------------------------------------

@pytest.mark.parametrize("project, submits", [("proj", False), ("other", True)])
def test_nothing_more_is_submitted_to_a_queue_that_holds_one_back(make_site, client, project, submits) -> None:
    """Audit: a BatchJob held at PBS's per-user limit ("would exceed queue prod's per-user limit")
    counted only against max_queued_jobs: the module made another in that queue, held in turn."""
    site = make_site(overrides={"scheduler": {"allowed_queues": PROD, "allowed_projects": ["proj", "other"]}})
    module = _module(site, client)
    held = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": project, "queue": "prod", "num_nodes": 1,
                                             "wall_time_min": 55, "job_mode": "mpi", "filter_tags": {},
                                             "status_info": {"waiting": HELD}})
    runnable_jobs(client, site, 6)
    module.run_cycle()
    assert bool(module.last_decision.submit) is submits, module.last_decision
    if not submits:
        assert (f"BatchJob {held['id']} of queue 'prod' (project 'proj') is held back ({HELD}): nothing more is "
                f"submitted to the queue until it is") in module.last_decision.reason
    client.patch("/batch-jobs/", json=[{"id": b["id"], "state": "pending_deletion"} for b in _pending(client, site)])


# -- L1 --------------------------------------------------------------------------------------------------

def test_an_empty_backlog_is_said_so_before_max_queued_jobs() -> None:
    settings = ElasticQueueOptions(submit_queue="prod", max_queued_jobs=1, use_backfill=False)
    decision = BackfillStrategy(settings).decide(Snapshot(batch_jobs=(bj(1, R),)))
    assert decision.reason == "no runnable jobs", decision


# -- F2 (elastic side): a queue's minimum size ------------------------------------------------------------

def _refused(id: int, nodes: int) -> BatchJobView:
    return BatchJobView(id=id, state=BatchJobState.submit_failed, num_nodes=nodes, wall_time_min=55, project="p",
                        never_starts="qsub: Job violates queue and/or server resource limits")


@pytest.mark.parametrize("min_nodes, refused, request_nodes, blocked", [
    (1, 1, 4, True),     # no minimum known: a refusal holds back every request as large (unchanged)
    (10, 1, 4, False),   # below Polaris prod's minimum: the 1-node refusal says nothing of 10 nodes
    (10, 1, 12, False),
    (10, 10, 4, True),   # at the minimum: the request (raised to 10) is as large
    (10, 12, 10, False),  # a larger refusal: smaller requests still go
])
def test_a_refusal_below_the_queues_min_nodes_holds_back_only_its_size(min_nodes, refused, request_nodes, blocked) -> None:
    """Polaris prod refuses fewer than 10 nodes ("Job violates queue and/or server resource limits"):
    a refused 1-node request held back every larger request for 24 h."""
    snapshot = Snapshot(project="p", refused=(_refused(3, refused),), min_nodes=min_nodes)
    assert (snapshot.never_starting_as_large(request_nodes, 55) is not None) is blocked


def test_requests_are_raised_to_the_queues_min_nodes() -> None:
    reported: list[str] = []
    limits = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 10, "min_nodes": 10}}
    fake = SimpleNamespace(site_config=SimpleNamespace(settings=SimpleNamespace(scheduler=SimpleNamespace(
        allowed_queues=limits, allowed_projects=["p"], optional_batch_job_params={}))),
        _report_once=lambda message, error=False: reported.append(message))
    body = {"queue": "prod", "project": "p", "num_nodes": 1, "wall_time_min": 60, "job_mode": "mpi"}
    assert ElasticQueueModule.fit_to_site_rules(fake, body) is None and body["num_nodes"] == 10
    assert reported == ["num_nodes 1 raised to the min_nodes 10 of queue 'prod' (settings.yml scheduler.allowed_queues)"]


def test_the_site_rules_refuse_a_request_below_the_queues_min_nodes() -> None:
    from balsam.batch_job_rules import BatchJobRefused, check_batch_job

    queues = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 10, "min_nodes": 10}}
    request = {"queue": "prod", "project": "p", "num_nodes": 1, "wall_time_min": 60}
    with pytest.raises(BatchJobRefused, match=r"^num_nodes 1 is outside 10\.\.496 allowed in queue 'prod'$"):
        check_batch_job(request, queues, [], {})
    check_batch_job({**request, "num_nodes": 10}, queues, [], {})
    check_batch_job(request, {"prod": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 1}}, [], {})  # no minimum
