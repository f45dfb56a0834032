"""The level of the elastic queue's per-cycle decision line (docs/elastic.md, "What one cycle does").

At ``service_period`` 60 s one INFO line per cycle was 1,440 lines a day of ``nothing: no runnable
jobs`` on an idle site, burying the lines that say something. :class:`CycleLog` logs a cycle's line
at INFO when the decision acts (submits or cancels) or when it, its reason or the numbers it was
based on differ from the previous cycle's; an unchanged idle cycle logs it at DEBUG, and once an
hour (:data:`STILL_EVERY_S`) while it stays unchanged an INFO ``still`` line repeats it, so that
a user tailing the log sees the module is alive. Warnings and errors are not its business: the
module logs those as before.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import attrs

from .strategy import Decision

#: Longest time (seconds) an unchanged idle decision goes without an INFO line: one ``still`` line then.
STILL_EVERY_S = 3600.0
#: Figures of a decision that count elapsed time (``oldest_wait_min``: minutes the oldest runnable
#: job has waited): they differ in every cycle when nothing else does, so they are not compared.
#: A strategy adds its own (:attr:`Strategy.clock_figures`), and a decision names the words of its
#: reason that count time (:attr:`Decision.clock_text`).
CLOCK_FIGURES = frozenset({"oldest_wait_min"})
#: What stands for a decision's ``clock_text`` in the line compared.
CLOCK_MASK = "<clock>"


class CycleLog:
    """Logs each cycle's decision line to ``logger`` at INFO or DEBUG (see the module's docstring).
    ``clock``: seconds, monotonic (a test passes its own, so that hours pass without sleeping)."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.clock = clock
        #: The previous cycle's line without its clock figures (None before the first cycle).
        self._last_key: Optional[str] = None
        #: When the current unchanged run of cycles began, when its last INFO line was written,
        #: and its number of cycles so far.
        self._since = 0.0
        self._info_at = 0.0
        self._cycles = 0

    def log(self, strategy: str, decision: Decision, note: str = "",
            clock_figures: frozenset[str] = frozenset()) -> int:
        """Log ``decision``'s line (``note`` appended, e.g. the held BatchJobs, a failed status
        poll); returns the level used. ``clock_figures``: the strategy's own figures that count
        elapsed time (:attr:`Strategy.clock_figures`), not compared, as :data:`CLOCK_FIGURES` and
        the decision's ``clock_text`` are not. The records name the caller's line (stacklevel 2:
        the module's run_cycle), as before."""
        now = self.clock()
        line = decision.log_line(strategy) + note
        skip = CLOCK_FIGURES | clock_figures
        reason = decision.reason
        for text in decision.clock_text:
            reason = reason.replace(text, CLOCK_MASK) if text else reason
        compared = attrs.evolve(decision, reason=reason, numbers=tuple((k, v) for k, v in decision.numbers if k not in skip))
        key = compared.log_line(strategy) + note
        if key != self._last_key or not decision.idle:
            self._last_key, self._since, self._info_at, self._cycles = key, now, now, 1
            self.logger.info("%s", line, stacklevel=2)
            return logging.INFO
        self._cycles += 1
        if now - self._info_at >= STILL_EVERY_S:
            self._info_at = now
            self.logger.info("%s", still(strategy, line, minutes=(now - self._since) / 60, cycles=self._cycles),
                             stacklevel=2)
            return logging.INFO
        self.logger.debug("%s", line, stacklevel=2)
        return logging.DEBUG


def still(strategy: str, line: str, *, minutes: float, cycles: int) -> str:
    """``line`` ("[strategy] nothing: ...") as the hourly summary: "[strategy] still nothing: ...
    (unchanged for N min, M cycles)"."""
    head = f"[{strategy}] "
    rest = line[len(head):] if line.startswith(head) else line
    return f"{head}still {rest} (unchanged for {minutes:.0f} min, {cycles} cycles)"

