"""The churn guard: BatchJobs that end having started no job, for a backlog that is still there.

A launcher may refuse runnable jobs the elastic queue counts: a requirement of the jobs its nodes
do not meet that the module cannot see from settings.yml, a filter of its acquire, a launcher that
fails at its start. Each BatchJob then leaves after ``launcher.idle_ttl_sec`` having run nothing,
the backlog is unchanged, and the next cycle submits another: on the CI's Slurm, 2 GPU jobs on
GPU-less nodes got 9 BatchJobs of 2 nodes x 30 min in 50 s, for ever.

:class:`ChurnGuard` is the pure logic. Every cycle it is shown the backlog's numbers (a
:func:`backlog_key`, :meth:`ChurnGuard.observe`): numbers other than the last cycle's end the streak
and start a new period. In submitting cycles it is also told the module's BatchJobs that ended since
it last looked, with whether any of them leased a job (one aggregate request by the module, see
``ElasticQueueModule.churn_backoff``). Ended BatchJobs that leased nothing and started within the
current period (the backlog the same in every cycle since before they started) make a streak; from
:data:`CHURN_STREAK_MIN` on, nothing is submitted until the newest of them ended
``service_period x 2^(streak - 1)`` seconds ago, at most :data:`CHURN_BACKOFF_MAX_S`. A BatchJob
that leased a job, or a change of the backlog's numbers, ends the streak: normal rate again.
Compared only in submitting cycles, a backlog that went 2 -> 0 -> 2 jobs of the same shape in
between read as unchanged: a healthy campaign adding identical batches, whose first BatchJob ran
every batch while the extra ones found nothing left, got the ERROR and a doubling hold.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import attrs

from .strategy import Backlog

#: Ended BatchJobs in a row that leased nothing before the guard holds submissions back: one alone
#: may have found its jobs taken by another BatchJob of the same burst (the backlog then changes).
CHURN_STREAK_MIN = 2
#: Longest wait between two submissions while the streak lasts (seconds).
CHURN_BACKOFF_MAX_S = 30 * 60


def backlog_key(backlog: Backlog) -> tuple[Any, ...]:
    """The runnable backlog's numbers that a BatchJob running jobs, or a user adding, removing or
    changing jobs, changes (not the waiting time, which grows by itself)."""
    return (backlog.runnable_count, round(backlog.runnable_footprint, 6), backlog.min_runnable_nodes,
            backlog.max_runnable_nodes, backlog.min_runnable_wall_time_min, backlog.unfit_count)


@attrs.define
class ChurnGuard:
    """Streak of the module's ended BatchJobs that leased no job while the backlog stayed the same."""

    #: The ended BatchJobs of the streak (ids), and when the newest of them ended.
    streak: list[int] = attrs.field(factory=list)
    last_end: Optional[dt.datetime] = None
    #: The backlog the streak was counted for (:func:`backlog_key`), and when a cycle first saw it
    #: (None: not known, every ended BatchJob counts).
    key: Optional[tuple[Any, ...]] = None
    key_since: Optional[dt.datetime] = None
    #: Ended BatchJobs already counted (ids), so that each counts once.
    seen: set[int] = attrs.field(factory=set)

    def unseen(self, ended: Sequence[tuple[int, dt.datetime]]) -> list[tuple[int, dt.datetime]]:
        """Of ``ended`` (id, end time), those not yet counted."""
        return [(i, when) for i, when in ended if i not in self.seen]

    def observe(self, key: tuple[Any, ...], now: dt.datetime) -> None:
        """A cycle read the backlog ``key`` at ``now``: other numbers than the last cycle's end the
        streak (the BatchJobs that ended were sized for another backlog, or their jobs were run)."""
        if key != self.key:
            self.key, self.key_since, self.streak, self.last_end = key, now, [], None

    def update(self, key: tuple[Any, ...], ended: Sequence[tuple[int, dt.datetime]], any_leased: bool,
               still_listed: Optional[set[int]] = None,
               started: Optional[Mapping[int, dt.datetime]] = None) -> bool:
        """Count ``ended`` (BatchJobs that ended since the last update; ``any_leased``: whether any of
        them leased a job) for the backlog ``key``. ``still_listed``: the ids the module still reads
        (the others are forgotten). ``started``: when each of them started; one that started before
        a cycle first saw ``key`` (:meth:`observe`) lived partly under another backlog and is not
        counted. Returns True when the streak has just reached :data:`CHURN_STREAK_MIN` (the time
        to say so, once)."""
        was = len(self.streak)
        self.seen.update(i for i, _ in ended)
        if still_listed is not None:
            self.seen &= still_listed | {i for i, _ in ended}
        if key != self.key:
            # Another backlog: the BatchJobs that ended were sized for the old one.
            self.key, self.key_since, self.streak, self.last_end = key, None, [], None
            return False
        if any_leased:
            self.streak, self.last_end = [], None
            return False
        if self.key_since is not None and started is not None:
            # Started before these numbers were first seen: its launcher may have found the jobs of
            # an earlier backlog taken by another BatchJob (2 -> 0 -> 2 identical jobs in between).
            ended = [(i, when) for i, when in ended if i in started and started[i] >= self.key_since]
        if ended:
            self.streak.extend(sorted(i for i, _ in ended))
            newest = max(when for _, when in ended)
            self.last_end = newest if self.last_end is None else max(self.last_end, newest)
        return was < CHURN_STREAK_MIN <= len(self.streak)

    def wait_s(self, period_s: float) -> float:
        """Seconds from the newest ended BatchJob of the streak to the next submission (0: none held back)."""
        if len(self.streak) < CHURN_STREAK_MIN:
            return 0.0
        return float(min(period_s * 2 ** min(len(self.streak) - 1, 30), CHURN_BACKOFF_MAX_S))

    def blocked_until(self, period_s: float, now: dt.datetime) -> Optional[dt.datetime]:
        """Until when nothing is submitted, or None (no streak, or its wait is over)."""
        wait = self.wait_s(period_s)
        if not wait or self.last_end is None:
            return None
        until = self.last_end + dt.timedelta(seconds=wait)
        return until if now < until else None
