"""Requests of one user stored in the order they arrived (bulk creates).

Why: job ids are handed out as rows are inserted, and a launcher takes runnable jobs in id order,
so jobs created by one client in chunks must get ids in the order the chunks were sent. A client
may keep two chunks in flight (the next one is sent and parsed while the server stores the one
before: ``JobManager.bulk_pipeline_depth``); the server's threads would then race to the insert.

How: a request takes a ticket when its body has been read, on the event loop, hence in arrival
order (a pipelining client starts a chunk only once the previous body is written). Its handler
validates in parallel with the others, then waits for its turn before its write transaction: its
turn comes when every earlier ticket of the same user has finished or left (a request that fails
before its turn leaves at once). Tickets live in one server process; with several workers, two
chunks may still land in different processes, as two clients' requests would.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Hashable, Iterator


class ArrivalOrder:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queues: dict[Hashable, deque[int]] = {}
        self._next = 0

    def arrive(self, key: Hashable) -> tuple[Hashable, int]:
        """A ticket for a request of ``key`` (a user), behind those that arrived before it."""
        with self._changed:
            self._next += 1
            self._queues.setdefault(key, deque()).append(self._next)
            return key, self._next

    @contextlib.contextmanager
    def turn(self, ticket: "tuple[Hashable, int] | None") -> Iterator[None]:
        """Wait until every earlier ticket of the same key has left; leave on exit."""
        if ticket is None:
            yield
            return
        key, number = ticket
        with self._changed:
            self._changed.wait_for(lambda: self._queues[key][0] == number)
        try:
            yield
        finally:
            self.leave(ticket)

    def leave(self, ticket: "tuple[Hashable, int] | None") -> None:
        """Give up the ticket (idempotent): later requests no longer wait for it."""
        if ticket is None:
            return
        key, number = ticket
        with self._changed:
            queue = self._queues.get(key)
            if queue is None or number not in queue:
                return
            queue.remove(number)
            if not queue:
                del self._queues[key]
            self._changed.notify_all()
