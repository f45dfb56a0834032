"""The elastic queue's log volume: docs/site.md says a healthy agent writes a few lines an hour at
INFO, but the module wrote its decision line at INFO every cycle (1,440 a day at service_period 60,
all "nothing: no runnable jobs"). Now an unchanged idle cycle logs it at DEBUG, a change (or a
submission, a cancellation) at INFO, and one INFO "still" line an hour repeats an unchanged one.
The real module against a real API server and the site's local scheduler, its clock advanced
by the test (no sleeping); warnings are still logged every cycle they were."""

from __future__ import annotations

import importlib.metadata
import logging

import attrs
import pytest

import balsam_elastic.strategy as strategy_module
from balsam_elastic import Decision, ElasticQueueOptions, Snapshot, Strategy
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import Windows, batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
PERIOD_S = 60.0  # the default service_period: 60 cycles an hour
QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 600, "max_queued_jobs": 10}}}}
HELD = "waiting: queue 'debug' is at a scheduler limit: qsub: would exceed queue debug's per-user limit"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _decision_lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == level and r.getMessage().startswith("[backfill] ")]


def _cycles(module: ElasticQueueModule, clock: Clock, n: int) -> None:
    for _ in range(n):
        module.run_cycle()
        clock.now += PERIOD_S


def test_an_idle_site_logs_a_few_info_lines_an_hour_and_changes_at_once(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, job_mode="serial", max_num_nodes=1,
                                                          max_wall_time_min=60, max_queued_jobs=1), client)
    module.clock = clock = Clock()
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    _cycles(module, clock, 100)  # 100 minutes, nothing to do
    info = _decision_lines(caplog, logging.INFO)
    # Before: 100 INFO lines. Now: the first, and one "still" line after an hour.
    assert len(info) == 2, info
    assert info[0].startswith("[backfill] nothing: no runnable jobs | runnable=0 "), info
    assert info[1].startswith("[backfill] still nothing: no runnable jobs | runnable=0 "), info
    assert info[1].endswith(" (unchanged for 60 min, 61 cycles)"), info
    assert len(_decision_lines(caplog, logging.DEBUG)) == 98  # nothing lost: at DEBUG

    # Work arrives: the submitting cycle and its BatchJob are logged at INFO at once, as is the next
    # (other numbers, and another reason); the one after that is the same again: DEBUG.
    caplog.clear()
    runnable_jobs(client, site, 3)
    _cycles(module, clock, 3)
    info = _decision_lines(caplog, logging.INFO)
    assert len(info) == 2 and info[0].startswith("[backfill] submit 1 nodes x 55 min (regular queue): "), info
    assert info[1].startswith("[backfill] nothing: max_queued_jobs reached (1 of 1 BatchJobs wait or run)"), info
    assert len(_decision_lines(caplog, logging.DEBUG)) == 1
    (made,) = batch_jobs_of(client, site)
    assert any(r.levelno == logging.INFO and r.getMessage().startswith(f"created BatchJob {made['id']} ")
               for r in caplog.records)

    # An input that changes while the decision does not (another runnable job) is logged at INFO.
    caplog.clear()
    runnable_jobs(client, site, 1)
    _cycles(module, clock, 2)
    info = _decision_lines(caplog, logging.INFO)
    assert len(info) == 1 and "runnable=4 " in info[0], info
    assert len(_decision_lines(caplog, logging.DEBUG)) == 1


class FailingPoll:
    """A scheduler driver whose status poll fails in every cycle (the module warns each time)."""

    def get_statuses(self) -> dict:
        raise RuntimeError("squeue: slurm_load_jobs error: Unable to contact slurm controller")

    def get_backfill_windows(self) -> dict:
        return {}


def test_warnings_are_still_logged_every_cycle(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_num_nodes=1, max_wall_time_min=60,
                                                          max_queued_jobs=1), client, scheduler=FailingPoll())
    module.clock = clock = Clock()
    # A BatchJob made by hand, queued: the module polls the scheduler only when one of them is.
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "local",
                                             "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 4242}])
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _cycles(module, clock, 5)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 5 and all(w.startswith("scheduler status poll failed: ") for w in warnings), warnings
    info = _decision_lines(caplog, logging.INFO)
    assert len(info) == 1 and info[0].endswith(" | poll=failed"), info


class FlakyPoll(FailingPoll):
    """A status poll that fails until ``fail`` is set False (the scheduler's controller back)."""

    fail = True

    def get_statuses(self) -> dict:
        return super().get_statuses() if self.fail else {}


def test_a_poll_that_works_again_is_logged_at_info(make_site, client, caplog) -> None:
    # The poll failed twice (a WARNING each), then worked: nothing in the decision line changed, so
    # the recovery was logged at DEBUG, and the last INFO words of the module were the failure's.
    site = make_site(overrides=QUEUES)
    poll = FlakyPoll()
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_num_nodes=1, max_wall_time_min=60,
                                                          max_queued_jobs=1), client, scheduler=poll)
    module.clock = clock = Clock()
    made = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "local", "queue": "local",
                                             "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": made["id"], "state": "queued", "scheduler_id": 4242}])
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _cycles(module, clock, 2)
    poll.fail = False
    _cycles(module, clock, 3)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if r.name == LOGGER and r.getMessage().startswith("[backfill] ")]
    assert [level for level, _ in lines] == [logging.INFO, logging.DEBUG, logging.INFO, logging.DEBUG, logging.DEBUG], lines
    assert lines[0][1].endswith(" batch_jobs=1/1 | poll=failed"), lines
    assert lines[2][1].endswith(" batch_jobs=1/1"), lines  # the recovery: the same line without the note
    # and it fails again: INFO at once
    poll.fail = True
    _cycles(module, clock, 1)
    assert _decision_lines(caplog, logging.INFO)[-1] == lines[0][1]


class WaitingStrategy(Strategy):
    """A plugin strategy whose line carries a figure of elapsed time under a name of its own."""

    name = "waiting"
    clock_figures = frozenset({"waited_min"})

    def __init__(self, settings, options=None) -> None:
        super().__init__(settings, options)
        self.cycles = 0

    def decide(self, snapshot: Snapshot) -> Decision:
        self.cycles += 1
        return Decision(reason="no window", numbers=(("runnable", snapshot.backlog.runnable_count),
                                                     ("waited_min", 60.5 + self.cycles)))


def test_a_strategys_clock_figures_are_not_compared(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    options = ElasticQueueOptions(use_backfill=False, max_num_nodes=1, max_wall_time_min=60, max_queued_jobs=1)
    module = ElasticQueueModule(site, options, client)
    module.strategy = WaitingStrategy(options)
    module.clock = clock = Clock()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _cycles(module, clock, 3)
    levels = [r.levelno for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("[waiting] ")]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG], levels


class TupleClockStrategy(WaitingStrategy):
    """clock_figures as a tuple, the natural spelling of "a few names" (the docs' is a frozenset)."""

    name = "tuple_clock"
    clock_figures = ("waited_min",)  # type: ignore[assignment]


class StringClockStrategy(WaitingStrategy):
    """clock_figures as one name, not a set of names."""

    name = "string_clock"
    clock_figures = "waited_min"  # type: ignore[assignment]


def _installed(monkeypatch, *classes: type) -> None:
    """``classes`` installed as strategies under their names (entry points of this module, as a
    plugin package declares them), beside the real ones."""
    real = strategy_module.available_strategies()
    plugins = {cls.name: importlib.metadata.EntryPoint(name=cls.name, value=f"{__name__}:{cls.__qualname__}",
                                                       group=strategy_module.STRATEGY_GROUP) for cls in classes}
    monkeypatch.setattr(strategy_module, "available_strategies", lambda: {**real, **plugins})


def test_clock_figures_as_a_tuple_are_taken_and_as_a_string_refused(make_site, client, caplog, monkeypatch) -> None:
    # A tuple made every run_cycle raise a bare TypeError in the decision log (frozenset | tuple):
    # the elastic queue stopped, the module's loop logging the traceback every cycle.
    _installed(monkeypatch, TupleClockStrategy, StringClockStrategy)
    site = make_site(overrides=QUEUES)
    settings = {"use_backfill": False, "max_num_nodes": 1, "max_wall_time_min": 60, "max_queued_jobs": 1}
    module = ElasticQueueModule(site, {**settings, "strategy": "tuple_clock"}, client)
    module.clock = clock = Clock()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _cycles(module, clock, 3)
    levels = [r.levelno for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("[tuple_clock] ")]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG], levels
    assert module.strategy.clock_figures == frozenset({"waited_min"})
    # One name, not a set of names: refused when settings.yml is read, naming the strategy (the
    # module would have raised the same TypeError every cycle, or taken the name's letters).
    where = f"{__name__}:StringClockStrategy"
    with pytest.raises(ValueError, match=rf"^elastic_queue.strategy: strategy 'string_clock' \({where}\): clock_figures "
                                         r"must be a set of figure names \(e.g. frozenset\(\{'waited_min'\}\)\), "
                                         r"got 'waited_min' \(str\)$"):
        ElasticQueueModule(site, {**settings, "strategy": "string_clock"}, client)


def test_a_held_regular_queue_fallback_stays_debug_while_its_job_waits_on(make_site, client, caplog) -> None:
    # backfill's regular-queue fallback, due (a runnable job has waited past regular_queue_after_min,
    # no window), held back because a BatchJob of the queue is held at a scheduler limit: the
    # module's idle line said "a runnable job has waited N min", N one more each cycle, and was
    # logged at INFO every cycle while nothing changed.
    site = make_site(overrides={"scheduler": {"allowed_queues": {"debug": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 5}},
                                              "allowed_projects": ["proj"]}})
    module = ElasticQueueModule(site, {"submit_queue": "debug", "submit_project": "proj", "use_backfill": True,
                                       "regular_queue_after_min": 60, "max_num_nodes": 4, "max_wall_time_min": 60},
                                client, scheduler=Windows())  # no backfill window
    module.clock = clock = Clock()
    runnable_jobs(client, site, 3)
    held = client.post("/batch-jobs/", json={"site_id": site.site_id, "project": "proj", "queue": "debug",
                                             "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
    client.patch("/batch-jobs/", json=[{"id": held["id"], "status_info": {"waiting": HELD}}])
    # The jobs became runnable 61.3 minutes ago, and wait a minute more each cycle.
    waited = iter([61.3, 62.3, 63.3])
    module.read_backlog = lambda: attrs.evolve(ElasticQueueModule.read_backlog(module),
                                               oldest_runnable_wait_min=next(waited))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    decisions = []
    for _ in range(3):
        _cycles(module, clock, 1)
        decisions.append(module.last_decision)
    assert [d.submit for d in decisions] == [()] * 3 and len(batch_jobs_of(client, site)) == 1, decisions
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("[backfill] ")]
    assert [level for level, _ in lines] == [logging.INFO, logging.DEBUG, logging.DEBUG], lines
    # the held decision keeps the fallback's clock_text (run_cycle's attrs.evolve of the hold)
    assert decisions[-1].clock_text == ("a runnable job has waited 63 min",), decisions[-1]
    assert lines[0][1].startswith("[backfill] nothing: no backfill window in queue 'debug', and a runnable job has "
                                  "waited 61 min (regular_queue_after_min 60); BatchJob "), lines
    assert "a runnable job has waited 63 min" in lines[2][1] and lines[2][1].endswith(f"held=1 (BatchJob {held['id']}: {HELD})")
