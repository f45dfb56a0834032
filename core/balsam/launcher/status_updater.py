"""BulkStatusUpdater: job state changes sent in bulk PATCH /jobs/ calls from a background thread.

Launchers and the site agent's processing module ``put()`` state changes as they happen (with the
time they happened); a thread collects them and sends them in as few ``PATCH /jobs/`` calls as the
rule "at most one update per job per call" allows (a RUNNING and a RUN_DONE of one job go in two
successive calls, in order). A call the server refuses as a whole (HTTP 4xx) is split in halves until
the refused updates are isolated; those are logged and dropped, the others are sent. Connection
failures are retried until ``close()`` gives up after ``close_timeout`` seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from balsam.models import MAX_ITEMS_PER_BULK_OP
from balsam.states import JobState

logger = logging.getLogger(__name__)

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status carried by a client exception, if any (duck-typed: clients differ)."""
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def split_into_rounds(updates: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Order-preserving split so that each round holds at most one update per job id.

    An update always lands in a later round than the previous update of the same job.
    """
    rounds: list[list[dict[str, Any]]] = []
    last_round: dict[int, int] = {}
    for update in updates:
        r = last_round.get(update["id"], -1) + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(update)
        last_round[update["id"]] = r
    return rounds


class BulkStatusUpdater:
    """Collects job updates and PATCHes them to the API in batches.

    ``client`` is a :class:`balsam.client.RESTClient` (anything with ``patch(path, json=...)``);
    by default the client of ``balsam.api``. ``send`` replaces the HTTP call entirely (it receives
    one list of update dicts per call).
    """

    def __init__(
        self,
        client: Any = None,
        *,
        max_batch: int = 10_000,
        max_wait_sec: float = 0.1,
        close_timeout: float = 60.0,
        send: Optional[Callable[[list[dict[str, Any]]], Any]] = None,
        name: str = "status-updater",
    ) -> None:
        self._client = client
        self._send_fn = send
        self.max_batch = max_batch
        self.max_wait_sec = max_wait_sec
        self.close_timeout = close_timeout
        # put() only appends to a deque (atomic under the GIL): no lock on the launchers' hot path.
        self._items: deque[dict[str, Any]] = deque()
        self._put_count = itertools.count(1)
        self._last_put = 0
        self._done = 0
        self._wake = threading.Event()
        self._done_cond = threading.Condition()
        self._closed = False
        self._stopping = False
        self.sent = 0
        self.dropped: list[tuple[dict[str, Any], str]] = []
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------
    def put(
        self,
        job_id: int,
        state: "JobState | str | None" = None,
        state_timestamp: Optional[dt.datetime] = None,
        state_data: Optional[dict[str, Any]] = None,
        **fields: Any,
    ) -> None:
        """Queue one job update; ``state_timestamp`` defaults to now (the time of the change)."""
        if self._closed:
            raise RuntimeError("BulkStatusUpdater is closed")
        update: dict[str, Any] = {"id": int(job_id)}
        if state is not None:
            update["state"] = state.value if isinstance(state, JobState) else str(state)
            ts = state_timestamp or _now()
            update["state_timestamp"] = ts.isoformat() if isinstance(ts, dt.datetime) else str(ts)
            if state_data:
                update["state_data"] = state_data
        if fields:
            update.update(fields)
        self._items.append(update)
        self._last_put = next(self._put_count)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Block until every update put so far has been sent (or dropped); False on timeout."""
        target = self._last_put
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()
        with self._done_cond:
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.set()
                self._done_cond.wait(min(remaining, 0.5) if remaining is not None else 0.5)
        return True

    def close(self) -> None:
        """Send what is queued and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(self.close_timeout + 5)
        if self._thread.is_alive():
            logger.error("status updater did not finish within %.0f s; %d updates unsent", self.close_timeout, self.pending)

    @property
    def pending(self) -> int:
        return self._last_put - self._done

    def __enter__(self) -> "BulkStatusUpdater":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- background thread ---------------------------------------------------------------------
    def _drain(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        items = self._items
        while items and len(batch) < self.max_batch:
            batch.append(items.popleft())
        return batch

    def _run(self) -> None:
        while True:
            stopping = self._stopping
            if not self._items:
                if stopping:
                    return
                self._wake.wait(self.max_wait_sec)
                self._wake.clear()
                continue
            # Let a burst accumulate (one call for many jobs) unless someone is waiting on us.
            if not stopping and not self._wake.is_set():
                self._wake.wait(self.max_wait_sec)
            self._wake.clear()
            batch = self._drain()
            try:
                give_up_at = time.monotonic() + self.close_timeout if self._stopping else None
                self._send_batch(batch, give_up_at)
            except Exception:  # never let the thread die: log and account for every update
                logger.exception("status updater: unexpected error; %d updates dropped", len(batch))
                self.dropped.extend((u, "unexpected error") for u in batch)
            finally:
                with self._done_cond:
                    self._done += len(batch)
                    self._done_cond.notify_all()

    def _send_batch(self, batch: list[dict[str, Any]], give_up_at: Optional[float]) -> None:
        for round_ in split_into_rounds(batch):
            for start in range(0, len(round_), MAX_ITEMS_PER_BULK_OP):
                self._send_chunk(round_[start : start + MAX_ITEMS_PER_BULK_OP], give_up_at)

    def _patch(self, chunk: list[dict[str, Any]]) -> None:
        self.calls += 1
        if self._send_fn is not None:
            self._send_fn(chunk)
            return
        client = self._client
        if client is None:
            from balsam.launcher._api import default_client

            client = default_client()
        client.patch("/jobs/", json=chunk)

    def _send_chunk(self, chunk: list[dict[str, Any]], give_up_at: Optional[float]) -> None:
        delay = 0.5
        while True:
            try:
                self._patch(chunk)
                self.sent += len(chunk)
                return
            except Exception as exc:
                status = _http_status(exc)
                if status is not None and 400 <= status < 500 and status not in (401, 408, 429):
                    self._split_refused(chunk, exc)
                    return
                if getattr(exc, "credential_refused", False):
                    # Revoked: the server already ended our sessions (RUNNING jobs -> RUN_TIMEOUT).
                    logger.error("status updater: credential refused; %d updates not sent: %s", len(chunk), exc)
                    self.dropped.extend((u, str(exc)) for u in chunk)
                    return
                if self._stopping and give_up_at is None:
                    give_up_at = time.monotonic() + self.close_timeout
                if give_up_at is not None and time.monotonic() > give_up_at:
                    logger.error("status updater: giving up on %d updates: %s", len(chunk), exc)
                    self.dropped.extend((u, str(exc)) for u in chunk)
                    return
                logger.warning("status updater: PATCH /jobs/ failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _split_refused(self, chunk: list[dict[str, Any]], exc: BaseException) -> None:
        if len(chunk) == 1:
            logger.error("status updater: server refused update %s: %s", chunk[0], exc)
            self.dropped.append((chunk[0], str(exc)))
            return
        mid = len(chunk) // 2
        for half in (chunk[:mid], chunk[mid:]):
            try:
                self._patch(half)
                self.sent += len(half)
            except Exception as sub_exc:
                status = _http_status(sub_exc)
                if status is not None and 400 <= status < 500:
                    self._split_refused(half, sub_exc)
                else:
                    self._send_chunk(half, time.monotonic() + self.close_timeout)
