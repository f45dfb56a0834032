"""Acquires that wait for work: ``POST /sessions/{id}`` with ``Prefer: wait=N`` (RFC 7240).

The site agent's processing module polls for jobs that reach its states (STAGED_IN, RUN_DONE,
RUN_ERROR, RUN_TIMEOUT). Polling every second puts up to a second between a launcher's RUN_DONE and
the job's JOB_FINISHED, and between a parent's end and its children's start; polling faster costs
the server a request each time. Instead, an acquire that finds nothing may wait, up to ``N``
seconds (at most :data:`MAX_WAIT_SEC`), for a write by the same user that may have made jobs
leasable, and then looks again.

How a wait never misses a wake-up, although the handler looks in a worker thread and waits on the
event loop: every user has a *generation*, a counter that each wake-up increments. The handler reads
it *before* it looks for jobs; the wait returns at once if the generation has moved since. A write
that commits after the look moved it; one that committed before the look was seen by the look.

What wakes a wait: a committed write that can put jobs in a state an acquire leases (the jobs
routes' creates and updates, finished transfers, a deleted session or BatchJob whose jobs are
freed, the expiry sweep), flagged by its handler with ``Ctx.wake_acquires()``. A wake-up may find
nothing (the write moved other jobs), or jobs that the other waits it woke lease first (its lease
then finds nothing, and rolls back): the acquire waits again until its deadline. No state is held
across the wait: the acquire's transaction starts after it, so nothing is locked meanwhile, and the
request's ``Idempotency-Key`` is claimed only by the look that leases jobs (or by the last one).

A wake-up of every user (the expiry sweep) moves an *epoch* shared by all users instead: a user's
generation is the epoch plus the user's own count, so it also moves for a user whose look is in
flight and who has never been woken before.

The generations live in the server process. On PostgreSQL, wake-ups cross server processes (uvicorn
``--workers N``, several hosts) through ``LISTEN``/``NOTIFY``: see acquire_notify.py. Elsewhere (the
embedded SQLite server is one process), or while that channel is down, a wait whose wake-up happened
in another process ends at its deadline, as a poll of that period would have.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

import attrs

from .http import preferences

#: The longest wait an acquire may ask for (a longer ``Prefer: wait`` is cut to this).
MAX_WAIT_SEC = 10.0


def requested_wait(prefer_header: str) -> Optional[float]:
    """The ``wait=N`` preference of a ``Prefer`` header in seconds (cut to :data:`MAX_WAIT_SEC`),
    or None (absent, malformed, zero or negative: no wait, as a server without the feature)."""
    value = preferences(prefer_header).get("wait")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not seconds > 0:  # also NaN
        return None
    return min(seconds, MAX_WAIT_SEC)


@attrs.frozen
class WaitForJobs:
    """A handler's answer "nothing yet": wait for a wake-up after ``generation``, then call me again."""

    generation: int
    deadline: float  # time.monotonic()


class AcquireWaits:
    """Per-user wake-up generations and the waits on them (one per server process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0  # moved by wake_all
        self._generation: dict[int, int] = {}
        self._waiting: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def generation(self, user_id: int) -> int:
        with self._lock:
            return self._epoch + self._generation.get(user_id, 0)

    def wake(self, user_id: int) -> None:
        """A write of ``user_id`` committed: wake that user's waits (callable from any thread)."""
        with self._lock:
            self._generation[user_id] = self._generation.get(user_id, 0) + 1
            waiting = list(self._waiting.get(user_id, ()))
        for loop, event in waiting:
            loop.call_soon_threadsafe(event.set)

    def wake_all(self) -> None:
        """Wake every user's waits, including those of users not seen yet (callable from any thread)."""
        with self._lock:
            self._epoch += 1
            waiting = [entry for entries in self._waiting.values() for entry in entries]
        for loop, event in waiting:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, user_id: int, since: int, deadline: float) -> None:
        """Return when ``user_id``'s generation passes ``since`` or at ``deadline``."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._epoch + self._generation.get(user_id, 0) != since:
                return
            self._waiting.setdefault(user_id, set()).add(entry)
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                waiting = self._waiting.get(user_id)
                if waiting is not None:
                    waiting.discard(entry)
                    if not waiting:
                        del self._waiting[user_id]
