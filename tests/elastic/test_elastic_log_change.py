"""What the elastic queue's decision line counts as a change (balsam_elastic.cycle_log): logged at
INFO, where an unchanged idle cycle is logged at DEBUG (see test_elastic_log_volume.py for the
module against a real server)."""

from __future__ import annotations

import logging

import pytest

from balsam_elastic import Decision
from balsam_elastic.cycle_log import STILL_EVERY_S, CycleLog

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
