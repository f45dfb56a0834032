"""What the elastic queue's decision line counts as a change (balsam_elastic.cycle_log): logged at
INFO, where an unchanged idle cycle is logged at DEBUG (see test_elastic_log_volume.py for the
module against a real server)."""

from __future__ import annotations

import logging

import attrs
import pytest

from balsam.states import BatchJobState
from balsam_elastic import BackfillStrategy, Backlog, BatchJobView, Decision, ElasticQueueOptions, Snapshot
from balsam_elastic.cycle_log import STILL_EVERY_S, CycleLog
from balsam_elastic.strategy import show_figure

LOGGER = "balsam.site.modules.elastic_queue"
PERIOD_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _idle(reason: str, **numbers) -> Decision:
    return Decision(reason=reason, numbers=tuple(numbers.items()))


@pytest.mark.parametrize("first, second, level", [
    # a clock figure (minutes the oldest runnable job has waited) alone is no change
    (_idle("w", runnable=2, oldest_wait_min=61.5), _idle("w", runnable=2, oldest_wait_min=62.5), logging.DEBUG),
    (_idle("w", runnable=2), _idle("w", runnable=3), logging.INFO),
    (_idle("w", runnable=2), _idle("x", runnable=2), logging.INFO),
    # a decision that acts is always logged at INFO
    (Decision(cancel=(7,), reason="w"), Decision(cancel=(7,), reason="w"), logging.INFO),
])
def test_what_counts_as_a_change(first, second, level) -> None:
    clock = Clock()
    log = CycleLog(logging.getLogger(LOGGER), clock=clock)
    assert log.log("backfill", first) == logging.INFO
    clock.now += PERIOD_S
    assert log.log("backfill", second) == level
    clock.now += PERIOD_S
    # the note (the held BatchJobs) is part of the line
    assert log.log("backfill", second, " | held=1 (BatchJob 3: waiting)") == logging.INFO


def test_one_still_line_an_hour_with_the_current_figures(caplog) -> None:
    clock = Clock()
    log = CycleLog(logging.getLogger(LOGGER), clock=clock)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cycles = int(3 * STILL_EVERY_S / PERIOD_S)  # 3 hours, 180 cycles
    for minute in range(cycles):
        log.log("backfill", _idle("a regular-queue BatchJob already waits", runnable=2, oldest_wait_min=minute + 0.5))
        clock.now += PERIOD_S
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 + 2, info  # the first line, then one an hour (the third hour ends before its line)
    assert info[1] == ("[backfill] still nothing: a regular-queue BatchJob already waits | runnable=2 "
                       "oldest_wait_min=60.5 (unchanged for 60 min, 61 cycles)"), info
    assert info[2].endswith("oldest_wait_min=120.5 (unchanged for 120 min, 121 cycles)"), info
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == cycles - 3


def _levels(decisions, **log_kwargs) -> list[int]:
    """The level of each decision's line, one cycle (PERIOD_S) apart."""
    clock = Clock()
    log = CycleLog(logging.getLogger(LOGGER), clock=clock)
    levels = []
    for decision in decisions:
        levels.append(log.log("backfill", decision, **log_kwargs))
        clock.now += PERIOD_S
    return levels


def test_float_noise_is_no_change() -> None:
    # running_footprint is a SQL SUM of floats without ORDER BY: the same running jobs summed in
    # another row order differ in the last bit, and idle = reserved - running_footprint showed as
    # 1.11022e-16 in one cycle and 0 in the next (each flip an INFO line).
    running = (0.9999999999999999, 1.0, 0.9999999999999999, 1.0)
    decisions = [_idle("no runnable jobs", running_footprint=r, reserved=1, idle=max(1 - r, 0.0)) for r in running]
    assert _levels(decisions) == [logging.INFO] + [logging.DEBUG] * 3
    assert decisions[0].log_line("backfill").endswith(" running_footprint=1 reserved=1 idle=0")
    # -0.0 (a difference of equal sums) is shown as 0, and is no change from it
    assert _levels([_idle("w", idle=0.0), _idle("w", idle=-0.0)]) == [logging.INFO, logging.DEBUG]
    assert _idle("w", idle=-0.0).log_line("backfill") == "[backfill] nothing: w | idle=0"
    # a real change still is one
    assert _levels([_idle("w", idle=0.0), _idle("w", idle=0.5)]) == [logging.INFO, logging.INFO]


def test_a_held_regular_queue_submission_is_no_change_while_its_job_waits_on() -> None:
    # backfill's regular-queue fallback says "a runnable job has waited N min" in its reason; when
    # the module holds the submission back (a BatchJob held at a queue limit: run_cycle appends
    # held_in_queue's words, and submits nothing), the idle line kept the minutes, and was logged
    # at INFO every cycle.
    opts = ElasticQueueOptions(regular_queue_after_min=60, max_num_nodes=8, use_backfill=True, submit_queue="debug",
                               submit_project="p")
    held = BatchJobView(id=7, state=BatchJobState.pending_submission, num_nodes=1, wall_time_min=60, owned=False,
                        project="p", held="waiting: queue 'debug' is at a scheduler limit")
    decisions = []
    for minute in range(61, 66):
        snapshot = Snapshot(batch_jobs=(held,), windows=(), project="p",
                            backlog=Backlog(runnable_count=3, runnable_footprint=3.0, min_runnable_nodes=1,
                                            max_runnable_nodes=1, oldest_runnable_wait_min=minute + 0.3))
        decision = BackfillStrategy(opts).decide(snapshot)
        assert decision.submit and f"a runnable job has waited {minute} min (regular_queue_after_min 60)" in decision.reason
        decisions.append(attrs.evolve(decision, submit=(), reason=f"{decision.reason}; BatchJob 7 of queue 'debug' "
                                      f"(project 'p') is held back ({held.held}): nothing more is submitted"))
    assert _levels(decisions) == [logging.INFO] + [logging.DEBUG] * 4
    # the line itself still says the minutes
    assert "a runnable job has waited 65 min" in decisions[-1].log_line("backfill")
    # the same text anywhere else in the reason is compared
    changed = attrs.evolve(decisions[0], reason=decisions[0].reason + "; 3 more")
    assert _levels([decisions[0], changed]) == [logging.INFO, logging.INFO]


def test_a_strategys_own_clock_figures_are_not_compared() -> None:
    # A strategy names its figures that count elapsed time (Strategy.clock_figures); the module
    # passes them (run_cycle), and they are compared no more than oldest_wait_min is.
    decisions = [_idle("no window", runnable=2, waited_min=61.0 + m) for m in range(3)]
    assert _levels(decisions, clock_figures=frozenset({"waited_min"})) == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert _levels(decisions) == [logging.INFO] * 3


def test_one_string_of_clock_text_is_one_part() -> None:
    # Decision(clock_text=(text)): the tuple's comma forgotten, a plain string. Taken as its
    # characters, every character of it was masked wherever it was in the reason: "need 1 node" ->
    # "need 6 node" was no change (DEBUG), and the minutes, masked letter by letter, still were one.
    def waiting(need: int, minute: int) -> Decision:
        waited = f"waited {minute} min"
        return Decision(reason=f"no window for need {need} node; {waited}", clock_text=(waited))  # a str

    assert waiting(1, 61).clock_text == ("waited 61 min",)
    assert _levels([waiting(1, 61), waiting(6, 61), waiting(1, 61)]) == [logging.INFO] * 3
    assert _levels([waiting(2, 61), waiting(2, 62), waiting(2, 63)]) == [logging.INFO, logging.DEBUG, logging.DEBUG]
    # any iterable is a tuple; None is none; a part that is not words is refused at once, by name
    assert Decision(clock_text=["a", "b"]).clock_text == ("a", "b") and Decision(clock_text=None).clock_text == ()
    assert attrs.evolve(waiting(1, 61), reason="x").clock_text == ("waited 61 min",)
    with pytest.raises(TypeError, match=r"^Decision.clock_text: expected words of the reason \(str\), got 61 \(int\)$"):
        Decision(reason="waited 61 min", clock_text=(61,))


@pytest.mark.parametrize("value, shown", [
    # a figure: rounded once, to 6 significant digits (rounded to 9 decimals first, then to 6
    # digits, these showed 0.0495049, 0.00961539 and 0.0364963)
    (5 / 101, "0.049505"), (1 / 104, "0.00961538"), (5 / 137, "0.0364964"), (2.5, "2.5"), (1e-7, "1e-07"),
    # float noise: a sum in another row order, a difference of equal sums
    (1 - 0.9999999999999999, "0"), (0.9999999999999999, "1"), (-0.0, "0"), (0.1 + 0.2, "0.3"),
    (3 - (0.1 + 0.2) * 10, "0"),
])
def test_show_figure_rounds_a_figure_once_and_noise_off(value, shown) -> None:
    assert show_figure(value) == shown


def test_show_figure_shows_every_footprint_as_its_own_six_digits() -> None:
    # Footprints k / packing (node_packing_count up to 256), and what is left of 16 nodes by them:
    # none is float noise, each is shown as it is to 6 digits (22 of them were not).
    grid = [k / p for p in range(1, 257) for k in range(0, 257)]
    grid += [16 - x for x in grid if x <= 16]
    wrong = [(x, show_figure(x)) for x in grid if show_figure(x) != f"{x + 0.0:.6g}"]
    assert wrong == [], wrong[:5]
