"""The elastic queue's decision functions, table-tested (pure: snapshot in, decision out)."""

from __future__ import annotations

import attrs
import pytest

from balsam.models import BackfillWindow
from balsam.states import BatchJobState
from balsam_elastic import (BackfillStrategy, Backlog, BatchJobView, Decision, ElasticQueueOptions, SimpleStrategy,
                            Snapshot, StrategyError, Submission, load_strategy)
from balsam_elastic.options import check_option_types

Q, R, P, D = BatchJobState.queued, BatchJobState.running, BatchJobState.pending_submission, BatchJobState.pending_deletion
W = BackfillWindow


def settings(**changes) -> ElasticQueueOptions:
    base = dict(min_wall_time_min=35, max_wall_time_min=360, wall_time_pad_min=5, min_num_nodes=1, max_num_nodes=127,
                max_queue_wait_time_min=10, max_queued_jobs=20, use_backfill=True, submit_queue="debug")
    return ElasticQueueOptions(**{**base, **changes})


def bj(id: int, state=Q, nodes: int = 1, queued: int | None = None, wall: int = 60, regular: bool = False,
       owned: bool = True, polled=None, never: str = "", project: str = "") -> BatchJobView:
    # A queued time comes from a poll that listed it queued.
    polled = polled if polled is not None or queued is None else Q
    return BatchJobView(id=id, state=state, num_nodes=nodes, wall_time_min=wall, queued_time_min=queued, regular_queue=regular,
                        owned=owned, polled_state=polled, never_starts=never, project=project)


def backlog(runnable: int = 0, footprint: float = 0.0, smallest: int = 1, running: int = 0, running_fp: float = 0.0,
            waited: float = 0.0) -> Backlog:
    return Backlog(runnable_count=runnable, runnable_footprint=footprint, min_runnable_nodes=smallest if runnable else 0,
                   max_runnable_nodes=smallest if runnable else 0, running_count=running, running_footprint=running_fp,
                   oldest_runnable_wait_min=waited)


# (case, settings changes, snapshot, expected submissions, expected cancels, words in the reason)
BACKFILL_CASES = [
    ("empty backlog", {}, Snapshot(windows=(W(num_nodes=8, wall_time_min=60),)), (), (), "no runnable jobs"),
    ("burst fits the widest window",
     {}, Snapshot(backlog=backlog(6, 6.0), windows=(W(num_nodes=4, wall_time_min=120), W(num_nodes=8, wall_time_min=60))),
     ((6, 55),), (), "6 runnable"),
    ("window caps the request",
     {}, Snapshot(backlog=backlog(20, 20.0), windows=(W(num_nodes=4, wall_time_min=60),)), ((4, 55),), (), ""),
    ("max_num_nodes caps the request",
     {"max_num_nodes": 3}, Snapshot(backlog=backlog(20, 20.0), windows=(W(num_nodes=10, wall_time_min=60),)), ((3, 55),), (), ""),
    ("float footprint rounds up (0.7 truncated 2.5 to 2)",
     {}, Snapshot(backlog=backlog(10, 2.5), windows=(W(num_nodes=8, wall_time_min=60),)), ((3, 55),), (), ""),
    ("a tiny footprint still gets a whole node",
     {}, Snapshot(backlog=backlog(1, 0.25), windows=(W(num_nodes=8, wall_time_min=60),)), ((1, 55),), (), ""),
    ("min_num_nodes floors the request",
     {"min_num_nodes": 4}, Snapshot(backlog=backlog(1, 1.0), windows=(W(num_nodes=8, wall_time_min=60),)), ((4, 55),), (), ""),
    ("request at least as wide as the smallest job",
     {}, Snapshot(backlog=backlog(1, 0.5, smallest=2), windows=(W(num_nodes=8, wall_time_min=60),)), ((2, 55),), (), ""),
    ("no window at all", {}, Snapshot(backlog=backlog(3, 3.0), windows=()), (), (), "no backfill window in queue 'debug'"),
    ("windows unavailable", {}, Snapshot(backlog=backlog(3, 3.0), windows=None, windows_error="sinfo failed: boom"),
     (), (), "sinfo failed: boom"),
    ("windows too short", {}, Snapshot(backlog=backlog(3, 3.0), windows=(W(num_nodes=8, wall_time_min=20),)),
     (), (), "no backfill window fits (need >= 1 nodes x >= 35 min; windows 8x20min)"),
    ("windows narrower than the smallest job",
     {}, Snapshot(backlog=backlog(3, 12.0, smallest=4), windows=(W(num_nodes=2, wall_time_min=60),)),
     (), (), "need >= 4 nodes"),
    ("smallest job wider than max_num_nodes", {"max_num_nodes": 2},
     Snapshot(backlog=backlog(1, 4.0, smallest=4), windows=(W(num_nodes=8, wall_time_min=60),)), (), (), "more than max_num_nodes"),
    ("max queued reached", {"max_queued_jobs": 2},
     Snapshot(backlog=backlog(9, 9.0), batch_jobs=(bj(1, Q, 1, 1), bj(2, R, 1)), windows=(W(num_nodes=8, wall_time_min=60),)),
     (), (), "max_queued_jobs reached (2 of 2"),
    ("idle nodes cover the backlog",
     {}, Snapshot(backlog=backlog(2, 2.0, running=1, running_fp=1.0), batch_jobs=(bj(1, R, 4),),
                  windows=(W(num_nodes=8, wall_time_min=60),)), (), (), "idle nodes cover the backlog (3 idle >= 2 needed)"),
    ("only the shortfall beyond idle is asked",
     {}, Snapshot(backlog=backlog(5, 5.0, running=1, running_fp=1.0), batch_jobs=(bj(1, R, 3), bj(2, P, 1)),
                  windows=(W(num_nodes=8, wall_time_min=60),)), ((2, 55),), (), ""),
    ("jobs running outside our BatchJobs do not inflate the request",
     {}, Snapshot(backlog=backlog(2, 2.0, running=10, running_fp=10.0), windows=(W(num_nodes=8, wall_time_min=60),)),
     ((2, 55),), (), ""),
    ("use_backfill false: max nodes x max wall time",
     {"use_backfill": False}, Snapshot(backlog=backlog(500, 500.0), windows=None), ((127, 355, True),), (), ""),
    # Balsam 0.7 cancelled these after max_queue_wait_time_min and submitted the same again, every cycle.
    ("use_backfill false: its requests wait in the regular queue, never stale",
     {"use_backfill": False}, Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(7, Q, 4, queued=11, wall=355, regular=True),)),
     (), (), "idle nodes cover the backlog (4 idle >= 4 needed)"),
    ("a stale BatchJob it did not create is never cancelled (0.7 did, after 10 min), but reserves",
     {}, Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(7, Q, 4, queued=11, owned=False),),
                  windows=(W(num_nodes=8, wall_time_min=60),)), (), (), "idle nodes cover the backlog"),
    ("no runnable job fits: says why",
     {}, Snapshot(backlog=Backlog(unfit_count=2, unfit_reason="wall_time_min of 360 or more"), windows=()), (), (),
     "no runnable job fits its BatchJobs (2 runnable: wall_time_min of 360 or more)"),
    ("wall time never past max_wall_time_min (Slurm's unlimited partition)",
     {"max_wall_time_min": 120}, Snapshot(backlog=backlog(2, 2.0), windows=(W(num_nodes=4, wall_time_min=1440),)),
     ((2, 120),), (), ""),
    ("largest window by nodes x minutes",
     {}, Snapshot(backlog=backlog(50, 50.0), windows=(W(num_nodes=10, wall_time_min=40), W(num_nodes=6, wall_time_min=100))),
     ((6, 95),), (), ""),
    ("stale queued BatchJob cancelled and replaced",
     {}, Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(7, Q, 4, queued=11), bj(8, Q, 1, queued=3)),
                  windows=(W(num_nodes=8, wall_time_min=60),)), ((3, 55),), (7,), "1 stale BatchJob(s) cancelled"),
    ("stale cancelled even with nothing to run",
     {}, Snapshot(batch_jobs=(bj(7, Q, 4, queued=30), bj(9, R, 2)), windows=()), (), (7,), "no runnable jobs"),
    ("queued exactly at the limit is not stale",
     {}, Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(7, Q, 4, queued=10),)), (), (), "idle nodes cover the backlog"),
    ("unknown queued time (poll failed) never cancels",
     {}, Snapshot(batch_jobs=(bj(7, Q, 4, queued=None),)), (), (), "no runnable jobs"),
    ("regular_queue_after_min off (0.7): no window, nothing however long",
     {}, Snapshot(backlog=backlog(3, 3.0, waited=500), windows=()), (), (), "no backfill window in queue"),
    ("regular_queue_after_min not due yet",
     {"regular_queue_after_min": 60}, Snapshot(backlog=backlog(3, 3.0, waited=59), windows=()), (), (), "no backfill window"),
    ("regular_queue_after_min due: one BatchJob in the regular queue",
     {"regular_queue_after_min": 60, "max_num_nodes": 8},
     Snapshot(backlog=backlog(3, 2.5, waited=61), windows=(W(num_nodes=1, wall_time_min=20),)),
     ((3, 360, True),), (), "and a runnable job has waited 61 min (regular_queue_after_min 60)"),
    ("one regular-queue BatchJob at a time",
     {"regular_queue_after_min": 60}, Snapshot(backlog=backlog(9, 9.0, waited=90), batch_jobs=(bj(4, Q, 3, queued=45, regular=True),),
                                              windows=()), (), (), "a regular-queue BatchJob already waits"),
    ("a regular-queue BatchJob is never stale; a running one does not block the next",
     {"regular_queue_after_min": 60}, Snapshot(backlog=backlog(9, 9.0, waited=90),
                                              batch_jobs=(bj(4, R, 3, regular=True), bj(5, Q, 1, queued=45, regular=True)),
                                              windows=()), (), (), "already waits"),
    ("pending_deletion BatchJobs reserve nothing",
     {}, Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(3, D, 8),), windows=(W(num_nodes=8, wall_time_min=60),)),
     ((2, 55),), (), ""),
    # The scheduler shows a window's nodes idle until the BatchJob sized to it starts: the same
    # window was requested again each cycle until then.
    ("a window its queued BatchJob waits to take is not requested again",
     {}, Snapshot(backlog=backlog(20, 20.0), batch_jobs=(bj(1, Q, 4, queued=1, wall=55),),
                  windows=(W(num_nodes=4, wall_time_min=60),)),
     (), (), "windows 4x60min, 4 nodes of them already requested by its BatchJobs not started yet"),
    ("nor one its BatchJob waiting for submission asked for",
     {}, Snapshot(backlog=backlog(20, 20.0), batch_jobs=(bj(1, P, 4, wall=55),), windows=(W(num_nodes=4, wall_time_min=60),)),
     (), (), "4 nodes of them already requested"),
    ("the rest of a window is still requested",
     {}, Snapshot(backlog=backlog(20, 20.0), batch_jobs=(bj(1, P, 3, wall=55),), windows=(W(num_nodes=8, wall_time_min=60),)),
     ((5, 55),), (), ""),
    ("a request is taken off the window that holds it",
     {}, Snapshot(backlog=backlog(20, 20.0), batch_jobs=(bj(1, Q, 4, queued=2, wall=115),),
                  windows=(W(num_nodes=6, wall_time_min=120), W(num_nodes=4, wall_time_min=60))),
     ((4, 55),), (), ""),
    ("the window it was fitted to: its length less the pad is the request's wall time",
     {}, Snapshot(backlog=backlog(20, 20.0), batch_jobs=(bj(1, Q, 4, queued=2, wall=55),),
                  windows=(W(num_nodes=6, wall_time_min=120), W(num_nodes=4, wall_time_min=60))),
     ((6, 115),), (), ""),
    # A launcher leases only jobs shorter than its BatchJob: a 55-minute request for 120-minute jobs
    # ran nothing, left after idle_ttl_sec, and was submitted again every cycle.
    ("windows shorter than every runnable job are skipped",
     {}, Snapshot(backlog=attrs.evolve(backlog(10, 10.0), min_runnable_wall_time_min=120),
                  windows=(W(num_nodes=8, wall_time_min=60),)),
     (), (), "need >= 1 nodes x >= 130 min; the shortest runnable job needs 120 min, which a BatchJob of 125 min or "
             "more leases (its launcher stops jobs a safety margin before its end), plus wall_time_pad_min 5; "
             "windows 8x60min"),
    ("a window long enough for the shortest job is used",
     {}, Snapshot(backlog=attrs.evolve(backlog(10, 10.0), min_runnable_wall_time_min=120),
                  windows=(W(num_nodes=8, wall_time_min=60), W(num_nodes=2, wall_time_min=130))),
     ((2, 125),), (), ""),
    # 121 minutes (the job's length plus one) was not enough: its launcher, started with -t 119
    # (launcher_wall_time), offers 116 minutes (less its 2-minute margin, Countdown): it leased
    # none of the 120-minute jobs.
    ("a window long enough for the job but not for the launcher's margin is skipped",
     {}, Snapshot(backlog=attrs.evolve(backlog(10, 10.0), min_runnable_wall_time_min=120),
                  windows=(W(num_nodes=2, wall_time_min=129),)),
     (), (), "need >= 1 nodes x >= 130 min"),
    ("a job without wall_time_min fits any window",
     {}, Snapshot(backlog=attrs.evolve(backlog(10, 10.0), min_runnable_wall_time_min=0),
                  windows=(W(num_nodes=8, wall_time_min=40),)),
     ((8, 35),), (), ""),
    ("a stale BatchJob, one the poll shows running, a regular-queue or foreign one claim no window",
     {}, Snapshot(backlog=backlog(40, 40.0), batch_jobs=(bj(1, Q, 4, queued=11, wall=55), bj(2, Q, 4, polled=R, wall=55),
                                                          bj(3, Q, 4, queued=1, regular=True), bj(4, P, 4, owned=False)),
                  windows=(W(num_nodes=4, wall_time_min=60),)),
     ((4, 55),), (1,), ""),
    # squeue lists a job a moment after sbatch, and a poll may fail ("Socket timed out"): a queued
    # BatchJob the poll said nothing of gave up its window, which was requested again every such cycle.
    ("a queued BatchJob the poll did not list (or a failed poll) keeps its window",
     {}, Snapshot(backlog=backlog(20, 20.0), batch_jobs=(bj(1, Q, 4, queued=None, wall=115),),
                  windows=(W(num_nodes=4, wall_time_min=120),)),
     (), (), "windows 4x120min, 4 nodes of them already requested by its BatchJobs not started yet"),
    ("but not one whose poll says it can never start",
     {}, Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(1, Q, 4, queued=3, wall=55, never="AccountNotAllowed"),),
                  windows=(W(num_nodes=4, wall_time_min=60),)),
     ((2, 55),), (), ""),
    # Slurm: allowed_queues max_nodes 8 on a 4-node partition. The two 8-node BatchJobs wait with
    # PartitionConfig for ever; counted as capacity they covered the backlog for ever.
    ("BatchJobs that can never start are no capacity, and none as large is requested again",
     {"use_backfill": False, "max_num_nodes": 8, "max_wall_time_min": 30, "min_wall_time_min": 10},
     Snapshot(backlog=backlog(2, 16.0, smallest=8), batch_jobs=(bj(1, Q, 8, queued=2, wall=25, never="PartitionConfig"),
                                                               bj(2, Q, 8, queued=1, wall=25, never="PartitionConfig"))),
     (), (), "BatchJob 1 (8 nodes x 25 min) can never start as submitted (scheduler: PartitionConfig)"),
    ("a smaller request than the one that never starts is still made",
     {"use_backfill": False, "max_num_nodes": 4, "max_wall_time_min": 30, "min_wall_time_min": 10},
     Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(1, Q, 8, queued=2, wall=25, never="PartitionConfig"),)),
     ((4, 25, True),), (), ""),
    # never_starts says whether, not why: a minimal one (1 node x the shortest request,
    # min_wall_time_min - wall_time_pad_min) that never starts holds back every request, whatever
    # the reason; one denied for access holds back only those at least as large (docs/elastic.md).
    ("a minimal BatchJob that never starts holds back every request",
     {}, Snapshot(backlog=backlog(6, 6.0), windows=(W(num_nodes=8, wall_time_min=60),),
                  batch_jobs=(bj(1, Q, 1, queued=2, wall=30, never="InvalidAccount"),)),
     (), (), "BatchJob 1 (1 nodes x 30 min) can never start as submitted (scheduler: InvalidAccount)"),
    ("a larger one denied for access holds back only requests as large (max_queued_jobs caps the rest)",
     {}, Snapshot(backlog=backlog(4, 4.0), windows=(W(num_nodes=8, wall_time_min=60),),
                  batch_jobs=(bj(1, Q, 8, queued=2, wall=55, never="InvalidAccount"),)),
     ((4, 55),), (), ""),
    ("one of another project holds nothing back (its account says nothing of the requests')",
     {}, Snapshot(backlog=backlog(6, 6.0), windows=(W(num_nodes=8, wall_time_min=60),), project="mine",
                  batch_jobs=(bj(1, Q, 1, queued=2, wall=30, never="InvalidAccount", project="theirs", owned=False),)),
     ((6, 55),), (), ""),
    ("one of the requests' project does",
     {}, Snapshot(backlog=backlog(6, 6.0), windows=(W(num_nodes=8, wall_time_min=60),), project="mine",
                  batch_jobs=(bj(1, Q, 1, queued=2, wall=30, never="InvalidAccount", project="mine", owned=False),)),
     (), (), "BatchJob 1 (1 nodes x 30 min) can never start"),
    ("one that never starts still holds a place among max_queued_jobs", {"max_queued_jobs": 1},
     Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(1, Q, 8, queued=2, wall=25, never="PartitionConfig"),),
              windows=(W(num_nodes=4, wall_time_min=60),)),
     (), (), "max_queued_jobs reached (1 of 1"),
]


@pytest.mark.parametrize("case,changes,snapshot,submit,cancel,reason", BACKFILL_CASES, ids=[c[0] for c in BACKFILL_CASES])
def test_backfill_strategy_decides(case, changes, snapshot, submit, cancel, reason) -> None:
    decision = BackfillStrategy(settings(**changes)).decide(snapshot)
    assert [(s.num_nodes, s.wall_time_min, *((True,) if s.regular_queue else ())) for s in decision.submit] == list(submit), decision
    assert decision.cancel == cancel, decision
    assert reason in decision.reason, decision.reason
    assert decision.reason  # every decision, above all "nothing", says why


def test_backfill_log_line_carries_the_numbers() -> None:
    snapshot = Snapshot(backlog=backlog(6, 5.5, running=2, running_fp=1.5), batch_jobs=(bj(1, R, 2),),
                        windows=(W(num_nodes=8, wall_time_min=60),))
    line = BackfillStrategy(settings()).decide(snapshot).log_line("backfill")
    assert line.startswith("[backfill] submit 5 nodes x 55 min: 5.5 runnable nodes of work, 0.5 idle | ")
    for figure in ("runnable=6", "runnable_footprint=5.5", "running_footprint=1.5", "reserved=2", "idle=0.5",
                   "batch_jobs=1/20", "window=8x60min", "shortfall=5"):
        assert figure in line.split(" | ")[1].split(), line
    nothing = BackfillStrategy(settings()).decide(Snapshot(windows=())).log_line("backfill")
    assert nothing.startswith("[backfill] nothing: no runnable jobs | runnable=0 "), nothing


SIMPLE_OPTIONS = {"nodes_per_block": 2, "wall_time_min": 30, "min_blocks": 0, "max_blocks": 3, "parallelism": 1.0}
SIMPLE_CASES = [
    ("a block that can never start is no block, and none more is submitted",
     {}, Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(1, Q, 2, queued=1, wall=30, never="PartitionNodeLimit"),)),
     (), (), "BatchJob 1 (2 nodes x 30 min) can never start as submitted (scheduler: PartitionNodeLimit)"),
    ("a block of another project that can never start holds no block back",
     {}, Snapshot(backlog=backlog(4, 4.0), project="mine",
                  batch_jobs=(bj(1, Q, 2, queued=1, wall=30, never="QOSNotAllowed", project="theirs", owned=False),)),
     ((2, 30),) * 2, (), ""),
    ("empty backlog, no blocks", {}, Snapshot(), (), (), "no runnable jobs"),
    ("empty backlog keeps min_blocks", {"min_blocks": 1}, Snapshot(), ((2, 30),), (), "0 blocks for a demand of 1"),
    ("burst: blocks up to the maximum at once", {}, Snapshot(backlog=backlog(40, 40.0)), ((2, 30),) * 3, (), ""),
    ("demand in blocks, rounded up", {}, Snapshot(backlog=backlog(3, 3.0)), ((2, 30),) * 2, (), ""),
    ("running work counts as demand", {}, Snapshot(backlog=backlog(1, 1.0, running=4, running_fp=4.0), batch_jobs=(bj(1, R, 2), bj(2, R, 2))),
     ((2, 30),), (), ""),
    ("parallelism provisions part of the backlog", {"parallelism": 0.25}, Snapshot(backlog=backlog(16, 16.0)), ((2, 30),) * 2, (), ""),
    ("enough blocks", {}, Snapshot(backlog=backlog(4, 4.0), batch_jobs=(bj(1, Q, 2), bj(2, P, 2))), (), (), "2 blocks cover"),
    ("surplus waiting blocks cancelled, newest first", {}, Snapshot(batch_jobs=(bj(1, R, 2), bj(2, Q, 2, queued=0), bj(3, P, 2))),
     (), (3, 2), "cancelling"),
    ("BatchJobs it did not create count as blocks, never cancelled",
     {}, Snapshot(batch_jobs=(bj(1, Q, 8, queued=0, owned=False), bj(2, P, 1, owned=False))), (), (), "not ours to cancel"),
    ("foreign blocks cover demand", {}, Snapshot(backlog=backlog(2, 2.0), batch_jobs=(bj(1, Q, 2, queued=0, owned=False),)),
     (), (), "1 blocks cover the demand"),
    # The status poll failed or did not see it queued: the scheduler may already run it.
    ("a block not seen queued by this cycle's poll is not cancelled",
     {"max_blocks": 4}, Snapshot(backlog=backlog(running=1, running_fp=1.0), batch_jobs=(bj(1, R, 2), bj(2, Q, 2, queued=None))),
     (), (), "may have started"),
    ("no runnable job fits: says why", {}, Snapshot(backlog=Backlog(unfit_count=1, unfit_reason="serial")), (), (),
     "no runnable job fits its BatchJobs (1 runnable: serial)"),
    ("running surplus is left to drain", {}, Snapshot(batch_jobs=(bj(1, R, 2), bj(2, R, 2))), (), (), "drains by idle_ttl_sec"),
    ("job wider than a block", {}, Snapshot(backlog=backlog(1, 4.0, smallest=4)), (), (), "more than nodes_per_block (2)"),
    ("max_queued_jobs bounds the blocks", {"max_blocks": 10}, Snapshot(backlog=backlog(40, 40.0)), ((2, 30),) * 4, (), ""),
    ("float footprint", {}, Snapshot(backlog=backlog(9, 2.25)), ((2, 30),) * 2, (), ""),
]


@pytest.mark.parametrize("case,changes,snapshot,submit,cancel,reason", SIMPLE_CASES, ids=[c[0] for c in SIMPLE_CASES])
def test_simple_strategy_decides(case, changes, snapshot, submit, cancel, reason) -> None:
    strategy = SimpleStrategy(settings(max_queued_jobs=4), {**SIMPLE_OPTIONS, **changes})
    decision = strategy.decide(snapshot)
    assert [(s.num_nodes, s.wall_time_min) for s in decision.submit] == list(submit), decision
    assert decision.cancel == cancel, decision
    assert reason in decision.reason and decision.reason, decision.reason


def test_decide_is_pure() -> None:
    snapshot = Snapshot(backlog=backlog(6, 6.0), batch_jobs=(bj(1, Q, 1, queued=20),), windows=(W(num_nodes=8, wall_time_min=60),))
    strategy = BackfillStrategy(settings())
    assert strategy.decide(snapshot) == strategy.decide(snapshot)
    assert isinstance(strategy.decide(snapshot), Decision) and attrs.has(Snapshot)


def test_strategies_are_chosen_by_name_and_options_are_checked() -> None:
    assert isinstance(load_strategy(settings()), BackfillStrategy)
    simple = load_strategy(settings(strategy="simple", strategy_options={"max_blocks": 2}))
    assert isinstance(simple, SimpleStrategy) and simple.options.max_blocks == 2
    with pytest.raises(StrategyError, match="unknown strategy 'parsl' \\(installed: backfill, simple"):
        load_strategy(settings(strategy="parsl"))
    with pytest.raises(StrategyError, match="elastic_queue.strategy_options.bogus: unknown option"):
        load_strategy(settings(strategy="simple", strategy_options={"bogus": 1}))
    with pytest.raises(StrategyError, match=r"^elastic_queue.strategy_options.min_blocks: must be between 0 and max_blocks \(2\)$"):
        SimpleStrategy(settings(), {"min_blocks": 3, "max_blocks": 2})


@pytest.mark.parametrize("changes,key,words", [
    ({"wall_time_pad_min": 35}, "wall_time_pad_min", "must be less than min_wall_time_min (35)"),
    ({"min_num_nodes": 200}, "min_num_nodes", "must not exceed max_num_nodes (127)"),
    ({"min_num_nodes": 0}, "min_num_nodes", "at least 1"),
    # Under the max-side key (max_num_nodes: 0 was reported as min_num_nodes, on the section's line).
    ({"max_num_nodes": 0}, "max_num_nodes", "must be at least 1"),
    ({"min_num_nodes": 8, "max_num_nodes": 4}, "max_num_nodes", "must be at least min_num_nodes (8)"),
    ({"max_wall_time_min": 30}, "max_wall_time_min", "must be at least min_wall_time_min (35)"),
    ({"min_wall_time_min": 400}, "min_wall_time_min", "must not exceed max_wall_time_min"),
    ({"job_mode": "hybrid"}, "job_mode", "expected 'mpi' or 'serial'"),
    ({"max_queued_jobs": 0}, "max_queued_jobs", "at least 1"),
    ({"regular_queue_after_min": -1}, "regular_queue_after_min", "must not be negative"),
    ({"strategy": "nope"}, "strategy", "unknown strategy 'nope'"),
    ({"strategy": "simple", "strategy_options": {"max_blocks": "4"}}, "strategy_options.max_blocks", "expected an integer"),
    ({"max_queue_wait_time_min": -5}, "max_queue_wait_time_min", "must not be negative"),
    # The key's own name and no repeated prefix (it was "strategy_options": "elastic_queue.strategy_options.parallelism: ...").
    ({"strategy": "simple", "strategy_options": {"parallelism": 0}}, "strategy_options.parallelism", "must be greater than 0"),
    ({"strategy": "simple", "strategy_options": {"nodes_per_block": 0}}, "strategy_options.nodes_per_block", "must be at least 1"),
    ({"strategy": "simple", "strategy_options": {"max_blocks": 0}}, "strategy_options.max_blocks", "must be at least 1"),
])
def test_options_validate_names_the_key(changes, key, words) -> None:
    problems = settings(**changes).validate()
    assert key in problems and words in problems[key], problems
    assert not problems[key].startswith("elastic_queue."), problems


def test_max_queue_wait_time_min_zero_is_allowed() -> None:
    assert settings(max_queue_wait_time_min=0).validate() == {}


def test_longest_request_is_what_a_launcher_can_lease_within() -> None:
    assert BackfillStrategy(settings()).longest_request_min() == 360
    assert BackfillStrategy(settings(use_backfill=False)).longest_request_min() == 355
    assert SimpleStrategy(settings(), {"wall_time_min": 45}).longest_request_min() == 45


def test_option_type_check() -> None:
    from balsam_elastic.simple import SimpleOptions

    assert check_option_types(SimpleOptions, {"parallelism": 1, "max_blocks": 2}) == {}
    assert check_option_types(SimpleOptions, {"max_blocks": True}) == {"max_blocks": "expected an integer, got True"}
    assert Submission(num_nodes=1, wall_time_min=2) == Submission(num_nodes=1, wall_time_min=2)
