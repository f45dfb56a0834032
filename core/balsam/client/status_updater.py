"""BulkStatusUpdater: job state changes sent in bulk PATCH /jobs/ calls from a background thread.

Launchers and the site agent's processing module ``put()`` state changes as they happen (with the
time they happened); a thread collects them and sends what gathered in one batch window in one
``PATCH /jobs/`` call (or one per 5,000 updates), in the order they were put: the server applies
several updates of one job in one call in that order, so a short task's RUNNING and RUN_DONE cost
one call and one row write. A call the server refuses as a whole (HTTP 4xx) is resent without the
updates of the jobs the refusal names (``refused_ids``, or a 422's places of invalid items), else
split in halves until the refused updates are isolated (:func:`isolate_refused`; a job's updates still arrive in order); those are
logged (one ERROR line per call, however many it refused: :func:`log_refused`) and dropped, the
others are sent.
Connection failures and 5xx are retried for as long as the updater runs; once ``close()`` is
called, one give-up clock for all calls (each had its own, from its first failure: calls that failed
once and went through, one after another, kept close() going 31 s with a close_timeout of 1 s): once
any call has failed since close() began (or was failing when it began), no call starts later than
``close_timeout`` after it; while none has (a healthy server, however slow), sending goes on up to
``close_timeout`` + :data:`CLOSE_JOIN_EXTRA_SEC` (30 s) after it. What is unsent then is spooled.
A call sent while closing waits for its answer :data:`CLOSING_CALL_WAIT_SEC` at most past the later of its start and
``close_timeout`` (one that does not answer fails there, and the give-up is then ``close_timeout``);
close() waits for the thread ``close_timeout`` + 35 s at most (a call in flight when it began was
sent without that bound: connect 6.2 s + read 120 s), then spools what the thread holds itself, and
the thread sends and spools nothing more; the updates of that call in flight are spooled too, and
if its answer still comes they are both applied and spooled (unavoidable: their replay is a no-op
or refused). A job's updates reach the server in the order they were put, across the spool too:
once an update is spooled, its job's later updates are spooled after it, never sent before it (a
RUN_DONE sent while its RUNNING waited in the spool was refused, and the replayed RUNNING left the
job RUNNING, its return code lost). Spool file names sort by host, pid, then time: the files of one
process are in the order it wrote them, not those of two processes against each other, and a job's
updates can be spooled by two (serial mode's master and workers, a launcher and its successor). So
a replay (:class:`SpoolReplayer`) sends each job's updates in the order their states were reached
(``state_timestamp``; at one instant, in the state machine's order; one writer's in the order it
wrote them, whatever its clock did), across all the files it sends in one pass, still in one bulk call; a file with an update that follows one of its job's in a file
not sent in that pass (another process is sending it) waits for a later pass, and
:func:`send_spooled` leaves a file with such an update to the agent's replay; only an update the
server would apply with it counts (of the same session, or of none), and a file that cannot be read
holds back only its own writer's later files. A spool file is sent by one process at
a time: it is claimed (renamed) first, by the agent's replay and by a launcher's
:func:`send_spooled` alike, and a claim whose process is gone is taken back (:data:`CLAIM_STALE_SEC`).
A call answered 5xx without a ``Retry-After`` :data:`SIDE_LANE_AFTER_FAILURES` times (the server
is up and fails this call: one job's data tripping a server fault) is still resent unchanged under its Idempotency-Key,
its jobs' later updates waiting behind it in order, but the updates of other jobs go out meanwhile
in calls of their own (:class:`_SideLane`): they used to wait until close() gave up. An answer with a
``Retry-After`` (429, 503) is retried no sooner than it asks (at most :data:`MAX_SERVER_WAIT_SEC`,
plus a little jitter so that many launchers do not come back in the same instant), and never past
``close()``'s give-up: a wait that would end after it ends there, for one last try. The updates put meanwhile
go out with the refused ones in one call after a 429 (nothing of a call answered 429 was applied);
after a 503 the same call is resent with its Idempotency-Key (its commit may have been cut) and
they follow in the next call.

Leases: an updater given a ``session_id`` (a launcher's Session; an int, or a callable that tells
the current one) adds ``"session_id"`` to every update put without one. The server applies such an
update only while that session still holds the job, and checks its state change strictly: an update
of a job the user moved meanwhile (re-queued, failed) is refused (409, ``refused_ids``) and dropped
here instead of undoing the user's move. Updates put before the session is known go without it.

Nothing is lost when the API is gone at the end: with ``spool_dir``, the updates that could not be
sent are written there (one JSON line each) and :func:`replay_spool` sends them later (the site
agent's processing module does, every cycle). A replayed update the server refuses by then (the job
moved on, e.g. its session expired and it was timed out and re-queued) is dropped: the job runs
again, which is the at-least-once side of the guarantee (docs/reliability.md). A spooled update keeps
the session it was put under, so the agent replays a launcher's updates under the launcher's lease,
not its own. And the launcher's lease does not end that session while its updates wait in the spool
(:func:`send_spooled`, :meth:`balsam.client.lease.JobLease.close`): ending it would time the jobs out
and the replay would be refused.

Jobs deleted on the server: an updater given ``on_gone`` (a launcher's) reads a 404 that names a
job of the call (``refused_ids``: the server's "Job not found: N") as that job being gone, not as
a fault: its updates are dropped with one INFO line per call, and ``on_gone(ids)`` gets the ids of
the call's gone jobs at once (one call per PATCH, on the sending thread), so that the launcher ends
their runs (:mod:`balsam.launcher.gone`). A job deleted while leased and not yet RUNNING
(``Job.objects.filter(...).delete()`` at a search's early stop skips the RUNNING ones) was started,
its RUNNING refused (an ERROR line), and run to its end (its RUN_DONE refused, another ERROR): the
heartbeat that would have said it was gone comes once a minute. A 404 that names no job (a proxy's,
a wrong URL) is a refusal as before. Without ``on_gone`` (the processing module) nothing changes.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from balsam.models import MAX_ITEMS_PER_BULK_OP
from balsam.process_identity import process_start_time, same_process
from balsam.serialization import parse_datetime
from balsam.states import JobState

logger = logging.getLogger(__name__)

#: The key of an update sent under a session's lease (the server's ``jobs_logic.SESSION_KEY``).
SESSION_KEY = "session_id"
#: Statuses that mean "retry later", not "this request is wrong".
_TRANSIENT_4XX = (401, 408, 429)
#: The longest wait a server's ``Retry-After`` gets (a longer one is cut to this: the call is tried
#: again then, and a server still busy answers with a new Retry-After).
MAX_SERVER_WAIT_SEC = 60.0
#: Jitter added to a server's wait, as a fraction of it (and at most ``_MAX_JITTER_SEC``): the
#: launchers of one busy server all answered ``Retry-After: N`` at once would otherwise all come
#: back at once, the load the 429 was sent to spread.
_JITTER_FRACTION = 0.1
_MAX_JITTER_SEC = 5.0
#: After this many failed tries of one call answered 5xx without a ``Retry-After`` (the server is up
#: and fails this call: a data-dependent fault of one of its jobs), the updates of other jobs go out
#: in calls of their own while it is retried (see :class:`_SideLane`).
SIDE_LANE_AFTER_FAILURES = 3
#: A side call failing in turn may open side calls of its own, this many levels deep at most: a
#: proxy answering 502 to everything (no Retry-After) would otherwise open one more level every few
#: seconds (a recursion, and a new backoff at each) for as long as updates keep coming.
SIDE_LANE_MAX_DEPTH = 3
#: The updater's own backoff between tries of a failing call the server gave no ``Retry-After`` for
#: (a refused connection, a timeout, a 5xx, a ``Retry-After: 0``): the first wait, doubled at each
#: failure up to ``BACKOFF_MAX_SEC``. 0.5 s: a server restart (seconds) loses little time, and a
#: call failing for one of its jobs reaches the side lane (``SIDE_LANE_AFTER_FAILURES``) within
#: 1.5 s. 10 s: an outage of hours costs a PATCH (and a log line) per 10 s per failing call, no more,
#: and the updates are sent within 10 s of its end. Module-level so that tests of the failures can
#: shorten them in-process (monkeypatch); read at each failure.
BACKOFF_FIRST_SEC = 0.5
BACKOFF_MAX_SEC = 10.0
#: Once close() has begun, a call waits for its answer at most this long past the later of its own
#: start and ``close_timeout`` after close() began, and never past close()'s last give-up (see
#: :data:`CLOSE_JOIN_EXTRA_SEC`) + this. A call already in flight when close() began was sent without
#: this bound (the client's own timeouts: connect 6.2 s + read 120 s by default); close() waits for
#: its thread ``close_timeout`` + :data:`CLOSE_JOIN_EXTRA_SEC` + this at most, then spools what is
#: left itself (:meth:`BulkStatusUpdater.close`).
CLOSING_CALL_WAIT_SEC = 5.0
#: close()'s give-up is ``close_timeout`` after it began once any call has failed since it began (or
#: was failing when it began); while none has (a healthy server, however slow), sending goes on up
#: to ``close_timeout`` + this after it began. A slow server that answered every call had its updates spooled at
#: ``close_timeout`` (before, close() sent everything however long it took).
CLOSE_JOIN_EXTRA_SEC = 30.0
#: ``BulkStatusUpdater.dropped`` keeps the most recent this many dropped updates (``dropped_count``
#: counts them all): a long-lived updater (the site agent's processing module) must not grow without bound.
MAX_DROPPED_KEPT = 1000
#: A dropped update (or the reason) is logged and kept cut to about this many characters: one value
#: the server refuses as too long (a run() result over 512,000 characters) made a log line of 800 KB.
MAX_DROPPED_CHARS = 2000
#: ...and each of its values cut to this many when the whole is longer.
_MAX_DROPPED_VALUE_CHARS = 200
#: A refused chunk's ERROR line names this many of its refused jobs, and this many distinct reasons
#: (each cut to ``_MAX_REASON_CHARS``); the ids of all of them are in a DEBUG line.
_REFUSED_IDS_SHOWN = 5
_REFUSED_REASONS_SHOWN = 3
_MAX_REASON_CHARS = 500


def excerpt(value: Any, limit: int = MAX_DROPPED_CHARS) -> str:
    """``value`` as text (``repr`` unless a string), cut to ``limit`` characters with the total size."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters in all)"


def bounded_update(update: Any) -> Any:
    """``update`` itself when its text is short, else a copy whose long values are cut (see
    :func:`excerpt`): what ``dropped`` keeps (the id, state and other short fields stay as they are)."""
    if not isinstance(update, dict) or len(repr(update)) <= MAX_DROPPED_CHARS:
        return update
    return {key: value if isinstance(value, (int, float, bool, type(None))) or len(repr(value)) <= _MAX_DROPPED_VALUE_CHARS
            else excerpt(value, _MAX_DROPPED_VALUE_CHARS) for key, value in update.items()}


def log_refused(name: str, refused: Sequence[tuple[Any, BaseException]], total: int) -> None:
    """Log the updates the server refused in one call of ``total`` updates: one ERROR line for
    them all (how many, the first few job ids, each distinct reason once), the ids of every refused
    update at DEBUG. A user moving 1,000 jobs a session held made 1,000 ERROR lines of the same
    409, one per job. One refused update keeps its line of old (the update itself, cut)."""
    if not refused:
        return
    if len(refused) == 1:
        update, error = refused[0]
        logger.error("%s: server refused update %s: %s", name, excerpt(update), excerpt(str(error)))
        return
    by_reason: dict[str, list[Any]] = {}
    for update, error in refused:
        by_reason.setdefault(str(error), []).append(_record_id(update))
    ids = [_record_id(update) for update, _ in refused]
    shown = ", ".join(str(i) for i in ids[:_REFUSED_IDS_SHOWN])
    if len(ids) > _REFUSED_IDS_SHOWN:
        shown += f" and {len(ids) - _REFUSED_IDS_SHOWN} more"
    reasons = [excerpt(reason, _MAX_REASON_CHARS) for reason in list(by_reason)[:_REFUSED_REASONS_SHOWN]]
    if len(by_reason) > _REFUSED_REASONS_SHOWN:
        reasons.append(f"and {len(by_reason) - _REFUSED_REASONS_SHOWN} other reasons")
    logger.error("%s: server refused updates: %d of the %d of one call (jobs %s): %s", name, len(refused), total, shown,
                 "; ".join(reasons))
    if logger.isEnabledFor(logging.DEBUG):
        for reason, reason_ids in by_reason.items():
            logger.debug("%s: the %d updates refused (%s) were of jobs %s", name, len(reason_ids),
                         excerpt(reason, _MAX_REASON_CHARS), reason_ids)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status carried by a client exception, if any (duck-typed: clients differ)."""
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def is_refusal(exc: BaseException) -> bool:
    """The server refused the request as it is (4xx other than 401/408/429): resending it cannot help."""
    status = http_status(exc)
    return status is not None and 400 <= status < 500 and status not in _TRANSIENT_4XX


def refused_as_unknown(exc: BaseException, names: Iterable[str]) -> bool:
    """A 422 refusing one of ``names`` (a field or a query parameter) as unknown: a server older
    than it. Read by each detail entry's place (``loc``, its last element), not by its words alone:
    a current server's message for an unknown parameter lists the valid ones, these names among
    them; a detail that is no list is read as text (``name: unknown ...``)."""
    if http_status(exc) != 422:
        return False
    wanted = set(names)
    detail = getattr(exc, "detail", None)
    if isinstance(detail, list) and detail:
        return any(isinstance(entry, dict) and isinstance(entry.get("loc"), (list, tuple)) and entry["loc"]
                   and str(entry["loc"][-1]) in wanted and "unknown" in str(entry.get("msg", ""))
                   for entry in detail)
    said = str(exc)
    return any(f"{name}: unknown" in said for name in wanted)


def refuses_session_key(exc: BaseException) -> bool:
    """A 422 saying ``session_id`` is an unknown field: a server older than leases (before
    December 2026) refuses every update that carries it, whatever else the update says."""
    return refused_as_unknown(exc, [SESSION_KEY])


def _record_id(item: Any) -> Any:
    return item.get("id") if isinstance(item, dict) else None


def isolate_refused(send: Callable[[list], Any], items: list) -> list[tuple[Any, BaseException]]:
    """Send ``items`` in one call; if the server refuses the call as a whole, find the refused items
    and send the others. Returns ``[(item, error), ...]`` of the refused ones (the rest were sent).
    Any other failure of ``send`` propagates (the caller retries or gives up).

    Where the refusal names its records (``refused_ids``: every one, by id), the items of the other
    records are sent again at once and the named records' items refused (:func:`_isolate_named`:
    a record with several items here is looked at on its own); where a 422 names the items by
    their place in the call, those are refused and the others sent again. Where it does neither, the call is split in halves until the refused items are alone (about 2k log2(n/k)
    calls for k refused of n; 2n calls when all are: a spool of 5,000 updates of deleted jobs was
    10,000 requests). The halves and the groups keep each record's items in their order."""
    try:
        send(items)
        return []
    except Exception as exc:
        if not is_refusal(exc):
            raise
        if len(items) == 1:
            return [(items[0], exc)]
        positions = _refused_positions(exc, len(items))
        if positions:
            # A 422 names the items by their place in the call (``loc: ["body", i, field]``): those
            # are refused for their own values, whatever comes with them; the others go again at
            # once (the server stops at the first invalid item: k invalid items cost k + 1 calls,
            # where halving cost about 2k log2(n/k)).
            others = [item for i, item in enumerate(items) if i not in positions]
            refused = [(items[i], _error_at(exc, i)) for i in sorted(positions)]
            return (isolate_refused(send, others) if others else []) + refused
        named = getattr(exc, "refused_ids", None)
        if named:
            suspects = [item for item in items if _record_id(item) in named]
            others = [item for item in items if _record_id(item) not in named]
            # A record with all of this call's items named and several of them would come back
            # here unchanged: halves instead.
            if suspects and (others or http_status(exc) == 404 or len({_record_id(i) for i in suspects}) > 1):
                return (isolate_refused(send, others) if others else []) + _isolate_named(send, suspects, exc)
        mid = len(items) // 2
        return isolate_refused(send, items[:mid]) + isolate_refused(send, items[mid:])


def _named_not_found(update: Any, error: BaseException) -> bool:
    """Whether ``error`` is a 404 naming ``update``'s job among the records not found (the server's
    ``refused_ids``): the job is gone. A 404 that names no record (a proxy's, a wrong path) is not."""
    if http_status(error) != 404:
        return False
    named = getattr(error, "refused_ids", None)
    return bool(named) and _record_id(update) in named


def _refused_positions(exc: BaseException, count: int) -> set[int]:
    """The places in the call of the items a 422 refused for their values (its ``detail`` entries'
    ``loc`` is ``["body", i, ...]``); empty when it does not say (then the call is halved)."""
    detail = getattr(exc, "detail", None)
    if http_status(exc) != 422 or not isinstance(detail, list):
        return set()
    positions: set[int] = set()
    for index, entry in enumerate(detail):
        loc = entry.get("loc") if isinstance(entry, dict) else None
        if isinstance(loc, list) and len(loc) >= 2 and loc[0] == "body" and type(loc[1]) is int and 0 <= loc[1] < count:
            positions.add(loc[1])
        elif not (positions and index == len(detail) - 1 and isinstance(entry, dict)
                  and _COUNTS_OTHERS.match(str(entry.get("msg", "")))):
            return set()  # a refusal of the call as a whole, or of an unknown shape
        # else: the server's last item counting the problems it did not list, at the loc they all
        # share (``["body", i]`` when they are of one item, taken above). At ``["body"]`` the items
        # listed are refused all the same and the others sent again: a problem of theirs comes
        # back in that call's 422 (halving cost about 2 log2(n) calls).
    return positions


#: The last item of a 422 that lists only its first problems (balsam.server.errors.ValidationFailed):
#: with their number, or without where the server stopped looking ("and more problems (...)").
_COUNTS_OTHERS = re.compile(r"and (?:\d+ )?more problems\b")


def _error_at(exc: BaseException, position: int) -> BaseException:
    """``exc`` as it would read for the item at ``position`` sent alone (its own entries, at 0)."""
    entries = [{**entry, "loc": ["body", 0, *entry["loc"][2:]]} for entry in exc.detail  # type: ignore[attr-defined]
               if len(entry["loc"]) >= 2 and entry["loc"][1] == position]  # (a count of all at ["body"]: no item's)
    try:
        return type(exc)(exc.method, exc.url, exc.status_code, entries)  # type: ignore[attr-defined,call-arg]
    except Exception:  # another client's exception type: the shared one
        return exc


def _isolate_named(send: Callable[[list], Any], suspects: list, exc: BaseException) -> list[tuple[Any, BaseException]]:
    """The items of the records a refusal named. A record that does not exist (404) can take none of
    them; a record with one item here is refused for that item (alone it meets the same check). A
    record with several (RUNNING and RUN_DONE of one job) may have valid ones after the refused
    one, so its items are looked at on their own: a few calls per such record, none for the rest."""
    if http_status(exc) == 404:
        return [(item, exc) for item in suspects]
    by_record: dict[Any, list] = {}
    for item in suspects:
        by_record.setdefault(_record_id(item), []).append(item)
    refused: list[tuple[Any, BaseException]] = []
    for record_items in by_record.values():
        refused.extend([(record_items[0], exc)] if len(record_items) == 1 else isolate_refused(send, record_items))
    return refused


def split_into_rounds(updates: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Order-preserving split so that each round holds at most one update per job id (no longer
    needed by :class:`BulkStatusUpdater`, whose server applies a job's updates of one call in order;
    kept for job modes and agent modules written against it).

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


def _flatten(items: Iterable[Any]) -> list[dict[str, Any]]:
    """The updates of queued items (an item is an update or a tuple of them)."""
    out: list[dict[str, Any]] = []
    for item in items:
        if type(item) is tuple:
            out.extend(item)
        else:
            out.append(item)
    return out


class _GaveUp(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Abandoned(BaseException):
    """Raised in the updater's thread once close() stopped waiting for it and spooled what it held
    (:meth:`BulkStatusUpdater.close`): the thread sends and spools nothing more. A BaseException:
    no ``except Exception`` on the way (a side call's, isolate_refused's) may take it for a failed call."""


class _WaitedUnapplied(Exception):
    """Raised by ``_send_retrying`` after it waited out a server's 429: no try of the call was
    applied, so the caller may send it again with the updates put meanwhile, under a new key."""


def server_wait(exc: BaseException) -> Optional[float]:
    """The seconds a failed call's answer asked to wait (its ``Retry-After``, as the client read
    it: :attr:`balsam.client.rest.APIError.retry_after`), None when it did not say."""
    wait = getattr(exc, "retry_after", None)
    return float(wait) if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait >= 0 else None


class _SideCall:
    """A side call being sent: the jobs it blocks (the rest of its batch's, and those of the updates
    it holds) and the updates it holds, which go back to the front of the queue, in their order,
    when it ends (went through, refused or given up), not when the call it was sent beside ends."""

    def __init__(self, blocked: Iterable[Any]) -> None:
        self.blocked = set(blocked)
        self.held: list[Any] = []


class _SideLane:
    """The updates that cannot pass a call being retried (``blocked``: its jobs', the rest of its
    batch's): while it fails, :meth:`BulkStatusUpdater._send_other_jobs` sends the updates of other
    jobs in calls of their own and keeps those of blocked jobs in ``held``, in their order, each
    job's later updates too; ``held`` goes back to the front of the queue once the call ends. A
    call answered 500 every time (one job's data tripping a server fault) held every later update
    of every job until close() gave up, and the spooled call then held the agent's replay the same
    way."""

    def __init__(self, blocked: Iterable[Any]) -> None:
        self.blocked = set(blocked)
        self.held: list[Any] = []
        #: The side calls being sent, outermost first (a side call may itself be stuck and have its
        #: own side calls): each holds the updates of its jobs while it is sent. Held in ``held``
        #: instead (until the lane's call ends), a job whose side call was retried a moment had its
        #: later updates wait for the lane's call long after its side call went through.
        self.sending: list[_SideCall] = []
        #: Updates sent (or dropped) by side calls: counted done once the held ones are.
        self.done = 0
        #: The side calls' batches being sent (for close() to spool if it gives up on the thread).
        self.batches: list[list[dict[str, Any]]] = []

    def blocks(self, ids: set[Any]) -> bool:
        return bool(ids & self.blocked) or any(ids & side.blocked for side in self.sending)

    def hold(self, item: Any, ids: set[Any]) -> None:
        """Hold ``item`` (of jobs ``ids``, which :meth:`blocks`) with the innermost side call it shares
        a job with, the first of them to end: it is looked at again then, and held by the next one
        (after that one's earlier updates of its jobs) if another still blocks it; else with the
        call of the lane, whose jobs stay blocked until it ends (its later updates wait behind it)."""
        for side in reversed(self.sending):
            if ids & side.blocked:
                side.held.append(item)
                side.blocked |= ids
                return
        self.held.append(item)
        self.blocked |= ids

    def all_held(self) -> list[Any]:
        """The held updates, each job's in their order (the lane's call's, then the side calls', outermost first)."""
        return self.held + [item for side in self.sending for item in side.held]


class _Replacement(dict):
    """An update ``on_refused`` gave in place of a refused one (sent as any dict)."""


class BulkStatusUpdater:
    """Collects job updates and PATCHes them to the API in batches.

    ``client`` is a :class:`balsam.client.RESTClient` (anything with ``patch(path, json=...)``);
    by default the client of ``balsam.api``. ``send`` replaces the HTTP call entirely (it receives
    one list of update dicts per call). ``spool_dir``: where updates that could not be sent by the
    end of ``close()`` are written (see :func:`replay_spool`); without it they are only logged.
    ``session_id``: the Session whose lease the updates are sent under (see the module's docstring):
    an int, or a callable returning the current one (or None); settable later (:attr:`session_id`),
    before the first update of a leased job is put.
    ``on_refused(update, error)``: called (in the sending thread) for each update the server
    refused; it may return a replacement update to send in its place (once per job: a refused
    replacement is only dropped). The processing module fails a job whose hook left a value the
    server refuses, which would otherwise leave the job leased and never processed again.
    ``on_gone(job_ids)``: called (in the sending thread, once per call) with the jobs a call's 404
    named as not found (deleted on the server); their updates are dropped and logged at INFO, not
    handed to ``on_refused`` (see the module's docstring). Settable later (:attr:`on_gone`).
    """

    def __init__(
        self,
        client: Any = None,
        *,
        max_batch: int = 10_000,
        max_wait_sec: float = 0.1,
        close_timeout: float = 10.0,
        send: Optional[Callable[[list[dict[str, Any]]], Any]] = None,
        name: str = "status-updater",
        spool_dir: "Path | str | None" = None,
        session_id: "int | Callable[[], Optional[int]] | None" = None,
        on_refused: "Callable[[dict[str, Any], BaseException], Optional[dict[str, Any]]] | None" = None,
        on_gone: "Callable[[list[int]], None] | None" = None,
    ) -> None:
        self._client = client
        self._on_refused = on_refused
        #: See the class docstring: the jobs a 404 named gone, handed over; None: 404s are refusals.
        self.on_gone = on_gone
        self._session: "int | Callable[[], Optional[int]] | None" = session_id
        #: False once the server refused ``session_id`` as an unknown field (it is older than
        #: leases): updates then go without it, as they did before (no stale-result check there).
        self.sends_session = True
        self._send_fn = send
        self.max_batch = max_batch
        self.max_wait_sec = max_wait_sec
        self.close_timeout = close_timeout
        self.name = name
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        # put() only appends to a deque (atomic under the GIL): no lock on the launchers' hot path.
        # An item is one update, or a tuple of updates that must reach the server in one call
        # (put_updates).
        self._items: deque[Any] = deque()
        self._put_count = itertools.count(1)
        self._last_put = 0
        self._done = 0
        self._wake = threading.Event()
        #: Set by close() (never cleared): cuts a wait between two tries short.
        self._closing = threading.Event()
        self._done_cond = threading.Condition()
        self._closed = False
        self._stopping = False
        #: When close() began (``time.monotonic()``): no call starts (and none waits) past
        #: ``close_timeout`` after it (:meth:`_give_up_at`), whatever the calls do meanwhile.
        self._closing_at: Optional[float] = None
        #: Jobs with updates this updater wrote to the spool (given up): their later updates are
        #: spooled after them, never sent before them (:meth:`_must_spool`).
        self._spooled_ids: set[Any] = set()
        #: Updates taken from the queue and spooled instead of sent (:meth:`_spool_taken`), not counted done yet.
        self._spooled_taken = 0
        #: A 429's call resent with more updates at close()'s give-up still gets the try planned there.
        self._last_try_planned = False
        #: Failed tries since the last call that went through (the first is logged as a WARNING).
        self._failures = 0
        self._inflight: list[dict[str, Any]] = []
        #: Held by the thread while it moves updates between the places close() spools from (the
        #: queue, ``_inflight``, the side lane) and while it spools; by close() while it takes them.
        self._lock = threading.RLock()
        #: Set by close() (under ``_lock``) when its wait for the thread ran out and it took what the
        #: thread held: the thread then sends and spools nothing more (:class:`_Abandoned`).
        self._abandoned = False
        #: Updates of the batch being sent that are settled (went through, refused, or spooled), by
        #: identity (``id(update)`` -> [update, times]): not spooled again at a give-up or by close().
        self._settled: dict[int, list[Any]] = {}
        #: A call failed (connection, 5xx, timeout ...) since close() began, or was failing when it
        #: began: the give-up is then ``close_timeout`` after close() began (:meth:`_give_up_at`).
        self._failed_closing = False
        #: The slow-server extra of close()'s give-up: :data:`CLOSE_JOIN_EXTRA_SEC`, or less up to close()'s ``extra_until``.
        self._close_extra = CLOSE_JOIN_EXTRA_SEC
        #: The side lane of the call being retried (None: none), for close() to spool what it holds.
        self._lane: Optional[_SideLane] = None
        #: Updates put back at the front of the queue by a side lane and not taken again yet; while
        #: there are, the count of updates done waits in ``_deferred_done`` (done_through() tells
        #: that every update up to a number is done: a later one sent first is not counted yet).
        self._held_outstanding = 0
        self._deferred_done = 0
        self.sent = 0
        #: (update, reason) of the most recent :data:`MAX_DROPPED_KEPT` updates dropped (refused, or
        #: never sent), long values cut (:func:`bounded_update`); ``dropped_count`` counts them all.
        self.dropped: list[tuple[dict[str, Any], str]] = []
        self.dropped_count = 0
        #: True once closing gave up on an unreachable API (then nothing else should wait for it).
        self.gave_up = False
        #: Updates written to ``spool_dir`` because the API could not be reached at the end.
        self.spooled = 0
        self.spool_files: list[Path] = []
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------
    @property
    def session_id(self) -> Optional[int]:
        """The session added to the updates put from now on (None: none)."""
        source = self._session
        if source is None or type(source) is int:
            return source
        if callable(source):
            value = source()
            return None if value is None else int(value)
        return int(source)

    @session_id.setter
    def session_id(self, value: "int | Callable[[], Optional[int]] | None") -> None:
        self._session = value

    def _stamped(self, update: dict[str, Any]) -> dict[str, Any]:
        """``update`` with this updater's session (a copy), unless it has one or there is none."""
        if self._session is None or SESSION_KEY in update or not self.sends_session:
            return update
        session_id = self.session_id
        return update if session_id is None else {**update, SESSION_KEY: session_id}

    def put(
        self,
        job_id: int,
        state: "JobState | str | None" = None,
        state_timestamp: Optional[dt.datetime] = None,
        state_data: Optional[dict[str, Any]] = None,
        **fields: Any,
    ) -> int:
        """Queue one job update; ``state_timestamp`` defaults to now (the time of the change).
        Returns its sequence number (see :meth:`done_through`)."""
        update: dict[str, Any] = {"id": int(job_id)}
        if state is not None:
            update["state"] = state.value if isinstance(state, JobState) else str(state)
            ts = state_timestamp or _now()
            update["state_timestamp"] = ts.isoformat() if isinstance(ts, dt.datetime) else str(ts)
            if state_data:
                update["state_data"] = state_data
        if fields:
            update.update(fields)
        return self.put_update(update)

    def put_update(self, update: dict[str, Any], *, stamp_session: bool = True) -> int:
        """Queue an update already in wire form (``{"id": ..., "state": ...}``); returns its sequence
        number (see :meth:`done_through`). ``stamp_session=False``: sent as it is, without this
        updater's session (another client's update: a replayed spool's)."""
        if self._closed:
            raise RuntimeError("BulkStatusUpdater is closed")
        self._items.append(self._stamped(update) if stamp_session else update)
        self._last_put = next(self._put_count)
        return self._last_put

    def put_updates(self, updates: Sequence[dict[str, Any]]) -> int:
        """Queue updates already in wire form that must reach the server in the same call, in this
        order: several state changes of one job (a launcher's RUN_DONE, then POSTPROCESSED), which
        no other client should see half done. Returns the sequence number of the last one.

        A call the server refuses as a whole is split to isolate the refused updates (as always);
        only then may such a group travel in two calls."""
        if self._closed:
            raise RuntimeError("BulkStatusUpdater is closed")
        group = tuple(self._stamped(u) for u in updates) if self._session is not None else tuple(updates)
        if not group:
            return self._last_put
        self._items.append(group if len(group) > 1 else group[0])
        for _ in group:
            self._last_put = next(self._put_count)
        return self._last_put

    def send_soon(self) -> None:
        """Send what is queued now instead of waiting up to ``max_wait_sec`` for more (without
        blocking), when the caller knows that no more updates are coming soon: a launcher with
        nothing left running, the processing module after a cycle's whole batch. Whoever waits for
        these states (the processing module, a user's ``Job.objects.wait``) then does not wait for
        the batch window."""
        if self._items:
            self._wake.set()

    def done_through(self, sequence: int) -> bool:
        """True once the update numbered ``sequence`` and all before it were sent (or dropped)."""
        return self._done >= sequence

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

    def close(self, extra_until: Optional[float] = None) -> None:
        """Send what is queued and stop the thread.

        ``extra_until`` (a ``time.monotonic()`` time): the slow-server extra
        (:data:`CLOSE_JOIN_EXTRA_SEC`) ends there at the latest (never before ``close_timeout``): a
        launcher's allocation ends, and close() running 30 s more outlasted a short one's margin.

        What is not sent by close()'s give-up is given up (and spooled when ``spool_dir`` is set): no
        call starts later. The give-up is ``close_timeout`` seconds after close() began once any call
        has failed since then (or was failing when it began); while none has (a healthy, slow
        server), ``close_timeout`` + :data:`CLOSE_JOIN_EXTRA_SEC`. A call sent from now on waits :data:`CLOSING_CALL_WAIT_SEC` at most
        for its answer past the later of its start and ``close_timeout`` (and never past the give-up +
        that). The thread is waited for ``close_timeout`` + :data:`CLOSE_JOIN_EXTRA_SEC` +
        :data:`CLOSING_CALL_WAIT_SEC` at most (a call in flight when close() began has no such bound);
        then close() takes what it holds and spools it, and the thread sends and spools nothing more.
        The updates of the call in flight then are spooled too: if its answer still comes, they are
        applied and also in the spool (their replay is a no-op or refused).
        """
        if self._closed:
            return
        self._closed = True
        # A call failing when close() began (waiting to be tried again: a 429's Retry-After, a 500
        # every time) counts as failed since: the server is not just slow.
        self._failed_closing = self._failures > 0
        self._closing_at = time.monotonic()  # before _stopping: read once that is set
        self._close_extra = CLOSE_JOIN_EXTRA_SEC if extra_until is None else min(
            CLOSE_JOIN_EXTRA_SEC, max(0.0, extra_until - self._closing_at - self.close_timeout))
        self._stopping = True
        self._closing.set()
        self._wake.set()
        # A call in flight when close() began was sent without a deadline: it may take the client's
        # timeouts before the give-up clock is checked (calls sent from now on: CLOSING_CALL_WAIT_SEC).
        waited = self.close_timeout + self._close_extra + CLOSING_CALL_WAIT_SEC
        self._thread.join(waited)
        if not self._thread.is_alive():
            return
        with self._lock:
            # Taken under the lock the thread holds while it moves or spools updates, and marked
            # abandoned in the same hold: the thread sends and spools nothing after this (it went on,
            # and spooled these again once its call ended: twice in the spool).
            self._abandoned = True
            self.gave_up = True
            lane = self._lane
            taken = self._unsettled(list(self._inflight) + ([u for b in lane.batches for u in b] if lane is not None
                                                             else []))
            left = taken + (_flatten(lane.all_held()) if lane is not None else []) + _flatten(self._items)
            self._items.clear()
            logger.error("%s did not finish within %.0f s; %d updates unsent", self.name, waited, len(left))
            self._write_spool(left)
        with self._done_cond:
            self._done = self._last_put  # each one sent, dropped or spooled
            self._done_cond.notify_all()

    @property
    def pending(self) -> int:
        return self._last_put - self._done

    def __enter__(self) -> "BulkStatusUpdater":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- background thread ---------------------------------------------------------------------
    def _drain(self, room: Optional[int] = None) -> list[dict[str, Any]]:
        # At most one call's worth (MAX_ITEMS_PER_BULK_OP), so that no group is split between two
        # calls; a group larger than that alone goes whole to the chunking of _send_batch. With
        # ``room`` (what a call being sent has left), only what fits in it, groups whole.
        with self._lock:
            if self._abandoned:
                raise _Abandoned()
            return self._drain_locked(room)

    def _drain_locked(self, room: Optional[int]) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        items = self._items
        whole = room is None
        room = min(self.max_batch, MAX_ITEMS_PER_BULK_OP) if room is None else room
        out_of_time = self._out_of_time()
        to_spool: list[Any] = []
        while items and len(batch) < room:
            item = items[0]  # this thread alone takes items: what it peeks at is what it pops
            if out_of_time or (self._spooled_ids and self._must_spool(item)):
                # Its job's earlier updates are in the spool (or close()'s time is over): spooled
                # after them, not sent before them.
                items.popleft()
                self._took(item)
                to_spool.append(item)
                continue
            if type(item) is tuple:
                if (batch or not whole) and len(batch) + len(item) > room:
                    break
                batch.extend(item)
            else:
                batch.append(item)
            items.popleft()
            self._took(item)
        self._spool_taken(to_spool)
        return batch

    def _out_of_time(self) -> bool:
        give_up_at = self._give_up_at()
        return give_up_at is not None and time.monotonic() >= give_up_at

    def _must_spool(self, item: Any) -> bool:
        """``item`` (taken from the queue) is of a job whose earlier updates this updater spooled."""
        updates = item if type(item) is tuple else (item,)
        return any(_record_id(u) in self._spooled_ids for u in updates)

    def _spool_taken(self, items: list[Any]) -> None:
        """Spool queue items taken instead of being sent (counted done with the batch being sent)."""
        if not items:
            return
        updates = _flatten(items)
        if self._out_of_time():
            self.gave_up = True
            reason = self._give_up_reason()
            logger.error("%s: giving up on %d updates: %s", self.name, len(updates), reason)
        else:
            reason = "spooled after earlier updates of its job"
        self._drop(updates, reason)
        self._spool(updates)
        self._spooled_taken += len(updates)

    def _took(self, item: Any) -> None:
        """``item`` left the queue: one less held one outstanding if it was one (they are in front)."""
        if self._held_outstanding:
            self._held_outstanding -= min(self._held_outstanding, len(item) if type(item) is tuple else 1)

    def _run(self) -> None:
        try:
            self._loop()
        except _Abandoned:
            pass  # close() took what was left

    def _loop(self) -> None:
        while True:
            if not self._items:
                if self._stopping:
                    return
                # Cleared before looking again, so that a send_soon() or flush() that follows a
                # put() in between is not lost.
                self._wake.clear()
                if not self._items:
                    self._wake.wait(self.max_wait_sec)
                if not self._items:
                    continue
                # What arrived during that wait has waited for (part of) a window already: sent
                # now. A call still goes out at most once per window, and an update waits at most
                # one window, not one to come empty and another to gather.
            elif not self._stopping and not self._wake.is_set():
                # Let a burst accumulate (one call for many jobs) unless someone is waiting on us.
                self._wake.wait(self.max_wait_sec)
            self._wake.clear()
            with self._lock:  # taken and made visible to close() in one hold
                batch = self._inflight = self._drain()
            try:
                self._send_batch(batch)
            except Exception:  # never let the thread die: log and account for every update
                logger.exception("%s: unexpected error; %d updates dropped", self.name, len(batch))
                self._drop(batch, "unexpected error")
            finally:
                with self._lock:
                    self._inflight = []
                    self._settled = {}
                    abandoned = self._abandoned
                if abandoned:
                    return  # close() counted every update done
                with self._done_cond:
                    counted = len(batch) + self._deferred_done + self._spooled_taken
                    self._spooled_taken = 0
                    if self._held_outstanding:
                        self._deferred_done = counted  # earlier updates held back are not done yet
                    else:
                        self._done += counted
                        self._deferred_done = 0
                    self._done_cond.notify_all()

    def _send_batch(self, batch: list[dict[str, Any]], outer: Optional[_SideLane] = None) -> None:
        """Send ``batch`` (the list ``_run`` counts as done afterwards: updates taken into it here
        are counted with it) in calls of MAX_ITEMS_PER_BULK_OP at most. ``outer``: the side lane
        ``batch`` is sent in (a side call: it takes in nothing after a 429, and its own side calls
        share that lane)."""
        start = 0
        while start < len(batch):
            chunk = batch[start : start + MAX_ITEMS_PER_BULK_OP]
            rest_ids = {_record_id(u) for u in batch[start:]}
            if outer is None:
                lane = self._lane = _SideLane(rest_ids)
            else:
                lane = outer
                lane.sending.append(_SideCall(rest_ids))

            def send(items: list, chunk: list = chunk) -> None:
                # Only the whole chunk may take in more updates after a 429: a part of it sent while
                # isolating refused updates follows others of the chunk that were applied.
                self._send_retrying(items, merge=outer is None and items is chunk, lane=lane)

            try:
                refused = isolate_refused(send, chunk)
                self._settle([update for update, _error in refused])
            except _WaitedUnapplied:
                # Nothing of it was applied: the updates put during the server's wait go with it,
                # after it (their order), in the one call it is sent again as, where it has room.
                room = min(self.max_batch, MAX_ITEMS_PER_BULK_OP) - len(chunk)
                # Not at close()'s give-up: the queue is spooled then, and would be before this
                # call if its last try fails (a job's later updates ahead of its earlier ones).
                if start + len(chunk) == len(batch) and room > 0 and not lane.held and not self._out_of_time():
                    with self._lock:  # into the batch close() spools from, in one hold
                        batch.extend(self._drain(room))
                continue
            except _GaveUp as exc:
                with self._lock:
                    if self._abandoned:
                        raise _Abandoned() from exc
                    self.gave_up = True
                    # Not the updates of this chunk that already went through: the give-up may cut
                    # the isolation of a refused call (isolate_refused's follow-up calls), and the
                    # whole chunk was spooled, its applied part replayed a second time.
                    unsent = self._unsettled(batch)
                    logger.error("%s: giving up on %d updates: %s", self.name, len(unsent), exc.cause)
                    self._drop(unsent, str(exc.cause))
                    self._spool(unsent)
                return
            finally:
                if outer is None:
                    self._release(lane)
                else:
                    self._requeue(lane.sending.pop().held)
            if refused and self.on_gone is not None:
                gone = [pair for pair in refused if _named_not_found(*pair)]
                if gone:
                    refused = [pair for pair in refused if not _named_not_found(*pair)]
                    self._hand_gone(gone)
            self._log_refused(refused, len(chunk))
            for update, error in refused:
                self._drop([update], str(error))
                self._replace_refused(update, error)
            self.sent += len(chunk) - len(refused)
            start += len(chunk)

    def _release(self, lane: _SideLane) -> None:
        """The call ``lane`` was opened for ended: the updates it held go back to the front of the
        queue, in their order (before anything put since: each job's updates stay in order)."""
        with self._lock:
            self._lane = None
            self._requeue(lane.held)
            lane.held = []
            self._deferred_done += lane.done

    def _requeue(self, held: list[Any]) -> None:
        """Put ``held`` back at the front of the queue, in their order (before anything put since: each
        job's updates stay in order); not counted done until taken again (``_held_outstanding``)."""
        with self._lock:
            if held and not self._abandoned:  # abandoned: close() spooled them
                self._items.extendleft(reversed(held))
                self._held_outstanding += len(_flatten(held))

    def _send_other_jobs(self, lane: _SideLane, until: float) -> None:
        """Until ``until`` (``time.monotonic()``) or the queue is empty: send the queued updates of
        jobs ``lane`` does not block in calls of their own (each retried, and isolated when refused,
        as any); hold the others (:meth:`_SideLane.hold`). Not while closing: the queue is spooled in order then."""
        room = min(self.max_batch, MAX_ITEMS_PER_BULK_OP)
        while not self._stopping and time.monotonic() < until and self._items:
            with self._lock:  # taken, held or spooled, and the batch made visible to close(), in one hold
                if self._abandoned:
                    raise _Abandoned()
                batch = self._take_other_jobs(lane, room)
            if not batch:
                continue
            logger.info("%s: sending %d updates of other jobs meanwhile", self.name, len(batch))
            try:
                self._send_batch(batch, outer=lane)
            except Exception:  # as _run: never lose count of an update
                logger.exception("%s: unexpected error; %d updates dropped", self.name, len(batch))
                self._drop(batch, "unexpected error")
            finally:
                with self._lock:
                    lane.batches.pop()
                lane.done += len(batch)

    def _take_other_jobs(self, lane: _SideLane, room: int) -> list[dict[str, Any]]:
        """Take the next side call's batch from the queue (see :meth:`_send_other_jobs`; under ``_lock``)."""
        batch: list[dict[str, Any]] = []
        to_spool: list[Any] = []
        while self._items and len(batch) < room:
            item = self._items[0]  # this thread alone takes items
            updates = item if type(item) is tuple else (item,)
            if batch and len(batch) + len(updates) > room:
                break
            self._items.popleft()
            self._took(item)
            ids = {_record_id(u) for u in updates}
            if self._spooled_ids and self._must_spool(item):
                to_spool.append(item)  # after its job's updates in the spool
            elif lane.blocks(ids):
                lane.hold(item, ids)  # its later updates wait behind it
            else:
                batch.extend(updates)
        self._spool_taken(to_spool)
        if batch:
            lane.batches.append(batch)
        return batch

    def _log_refused(self, refused: Sequence[tuple[Any, BaseException]], total: int) -> None:
        """Log the updates the server refused in one call (:func:`log_refused`; a subclass whose
        refusals are expected says so instead)."""
        log_refused(self.name, refused, total)

    def _hand_gone(self, gone: Sequence[tuple[Any, BaseException]]) -> None:
        """Drop the updates of deleted jobs (one INFO line for the call) and hand their ids to
        ``on_gone`` once (sender thread only)."""
        ids = sorted({_record_id(update) for update, _error in gone})
        shown = ", ".join(str(i) for i in ids[:_REFUSED_IDS_SHOWN])
        if len(ids) > _REFUSED_IDS_SHOWN:
            shown += f" and {len(ids) - _REFUSED_IDS_SHOWN} more"
        logger.info("%s: job%s %s %s deleted on the server (HTTP 404): %d update%s dropped", self.name,
                    "s" if len(ids) > 1 else "", shown, "were" if len(ids) > 1 else "was", len(gone),
                    "s" if len(gone) > 1 else "")
        for update, error in gone:
            self._drop([update], str(error))
        callback = self.on_gone
        if callback is None:
            return
        try:
            callback(ids)
        except Exception:
            logger.exception("%s: on_gone failed for jobs %s", self.name, ids)

    def _drop(self, updates: Sequence[dict[str, Any]], reason: str) -> None:
        """Keep a bounded record of dropped updates (sender thread only)."""
        self.dropped_count += len(updates)
        reason = excerpt(reason)
        kept = updates[-MAX_DROPPED_KEPT:]
        self.dropped.extend((bounded_update(u), reason) for u in kept)
        if len(self.dropped) > MAX_DROPPED_KEPT:
            del self.dropped[: len(self.dropped) - MAX_DROPPED_KEPT]

    def _replace_refused(self, update: dict[str, Any], error: BaseException) -> None:
        if self._on_refused is None or type(update) is _Replacement:
            return  # a refused replacement is only dropped
        try:
            replacement = self._on_refused(update, error)
        except Exception:
            logger.exception("%s: on_refused failed for update %s", self.name, update)
            return
        if replacement is None:
            return
        # Marked by its type, not by job id: the same job may have a later update refused (a re-run
        # whose hook leaves a bad value again), which gets its replacement too. Queued here, by the only thread that takes items, also while closing (put_update refuses
        # then): _run sends what is queued before it ends. Counted as a put, so flush() waits for it.
        with self._lock:
            if self._abandoned:
                raise _Abandoned()
            self._items.append(_Replacement(replacement))
            self._last_put = next(self._put_count)

    def _send_retrying(self, chunk: list[dict[str, Any]], merge: bool = False,
                       lane: Optional[_SideLane] = None) -> None:
        """One PATCH, retried through outages; raises refusals, and :class:`_GaveUp` once closing has
        seen failures for ``close_timeout`` seconds. Every try carries the same Idempotency-Key: a
        try the server applied whose answer was lost is answered from its record, not applied again.
        ``merge``: after waiting out a 429 when no try of the call can have been applied, raise
        :class:`_WaitedUnapplied` instead of resending it as it is (the caller adds the updates put
        meanwhile; the new body gets a new key)."""
        delay = BACKOFF_FIRST_SEC
        key = uuid.uuid4().hex  # as rest.new_idempotency_key (rest, and httpx, load only when first sent)
        # Every failed try so far was answered 429: refused before anything was applied (a rate
        # limit's answer, the server's or a proxy's). A timeout or a 5xx may follow an applied
        # commit: then only this body under this key is safe to send again.
        unapplied = True
        failed = 0  # tries of this call that failed (self._failures: of any call since one went through)
        # The try planned at close()'s give-up (a server's wait cut there): made, though it starts
        # at the give-up. Planned by the call a 429 refused and resent here with more updates, too.
        last_try, self._last_try_planned = self._last_try_planned, False
        while True:
            give_up_at = self._give_up_at()
            if give_up_at is not None and not last_try and time.monotonic() >= give_up_at:
                # close()'s time is over: no call starts now (a side call going through now and then
                # gave each failing call after it a fresh close_timeout: close() took many times it).
                raise _GaveUp(TimeoutError(self._give_up_reason()))
            if self._abandoned:
                raise _Abandoned()
            try:
                self._patch(chunk, key)
            except Exception as exc:
                if self._abandoned:
                    raise _Abandoned() from exc
                if self.sends_session and refuses_session_key(exc) and any(SESSION_KEY in u for u in chunk):
                    # Every update would be refused for ever (jobs left leased, hook results lost):
                    # send them as an older client did. A new key: the body is not the same.
                    self.sends_session = False
                    logger.warning("%s: the server is older than this client and does not know job leases (%s): "
                                   "sending updates without session_id, so it cannot refuse a stale one "
                                   "(upgrade the server)", self.name, excerpt(str(exc)))
                    key = uuid.uuid4().hex
                    continue
                if is_refusal(exc):
                    raise
                if getattr(exc, "credential_refused", False):
                    # Revoked: nothing more gets through with this credential; the spool hands the
                    # updates to the site agent (the server already ended our sessions).
                    raise _GaveUp(exc) from exc
                if self._closing_at is not None:
                    # The server is not just slow: close() gives up close_timeout after it began.
                    self._failed_closing = True
                unapplied = unapplied and http_status(exc) == 429
                asked = server_wait(exc)
                if asked is not None and asked <= 0:
                    # "Retry-After: 0" asks nothing of us: honoured as a wait, every retry went out
                    # at once (67 PATCHes in 3 s of a proxy's 429s), an INFO line each. Our own
                    # backoff (BACKOFF_FIRST_SEC up to BACKOFF_MAX_SEC) instead.
                    asked = None
                if asked is not None:
                    # The server (or a proxy) said when to come back: sooner would be the load it
                    # refused (every launcher of a busy server retrying on its own schedule).
                    wait = min(asked, MAX_SERVER_WAIT_SEC)
                    wait += random.uniform(0, min(wait * _JITTER_FRACTION, _MAX_JITTER_SEC))
                else:
                    wait = delay
                    delay = min(delay * 2, BACKOFF_MAX_SEC)
                now = time.monotonic()
                retry_at = self._retry_at(now + wait, asked is not None, exc)
                # The first failure of a run of them is a warning; the rest (one every 10 s at most
                # through an outage) are logged as the client logs its retries.
                log = logger.warning if self._failures == 0 else logger.info
                log("%s: PATCH /jobs/ failed (%s); retrying in %.1f s%s", self.name, exc, retry_at - now,
                    " (as the server's Retry-After asks)" if asked is not None else "")
                self._failures += 1
                failed += 1
                status = http_status(exc)
                if (lane is not None and asked is None and status is not None and status >= 500
                        and failed >= SIDE_LANE_AFTER_FAILURES and len(lane.sending) < SIDE_LANE_MAX_DEPTH):
                    # The server answers, and fails this call (not a busy server: no Retry-After):
                    # the other jobs' updates need not wait for it. This call is still resent
                    # unchanged, under its key (a 500 may follow a commit), when the wait is over.
                    failures = self._failures
                    self._send_other_jobs(lane, retry_at)
                    # A side call that went through says nothing of this one: still failing.
                    self._failures = max(self._failures, failures)
                # Always on the event, never a plain sleep: close() may have begun since retry_at
                # was planned (while the line above was written), and then the wait returns at once
                # and is planned again as closing (cut to the give-up). Checking _stopping first
                # left that race a plain sleep of up to 65 s: close() ran out its join and spooled
                # the update the thread then sent (applied and spooled).
                if self._closing.wait(max(0.0, retry_at - time.monotonic())):  # side calls took some of it
                    # close() began before or during the wait: what is left of it is planned as closing.
                    # This call is failing: close() gets no slow server's extra time (close() read
                    # no failure yet when it began while the failure's line was being written, and
                    # the 429's 30 s wait ran out its whole extra).
                    self._failed_closing = True
                    retry_at = self._retry_at(retry_at, asked is not None, exc)
                give_up_at = self._give_up_at()
                last_try = give_up_at is not None and retry_at >= give_up_at
                time.sleep(max(0.0, retry_at - time.monotonic()))
                if merge and unapplied and asked is not None:
                    self._last_try_planned = last_try  # for the call it is resent as
                    raise _WaitedUnapplied() from exc
                continue
            self._failures = 0
            # Settled at once (by identity), not when the chunk is: a give-up in the middle of
            # isolating a refused call spools only what did not go through.
            self._settle(chunk)
            return

    def _give_up_reason(self) -> str:
        """Why close() gave up, for its log line: which of :meth:`_give_up_at`'s two times ran out
        (a healthy slow server's give-up at close_timeout + 30 s was logged as "close_timeout (5 s) ran out")."""
        if self._failed_closing:
            return f"close_timeout ({self.close_timeout:g} s) ran out, a call having failed"
        return (f"close_timeout ({self.close_timeout:g} s) + {self._close_extra:g} s for a slow server "
                f"that answered every call ran out")

    def _give_up_at(self) -> Optional[float]:
        """When close()'s time is over (``time.monotonic()``; None before close()): ``close_timeout``
        after close() began once a call has failed since it began, else ``close_timeout`` +
        :data:`CLOSE_JOIN_EXTRA_SEC` (a healthy server, however slow, gets its updates: it used to
        have them spooled at ``close_timeout``). No call starts and no wait ends after it; what is
        unsent then is spooled."""
        if self._closing_at is None:
            return None
        return self._closing_at + self.close_timeout + (0.0 if self._failed_closing else self._close_extra)

    def _settle(self, updates: Iterable[dict[str, Any]]) -> None:
        """``updates`` of the batch being sent went through (or were refused, or spooled): not to be
        spooled again (:meth:`_unsettled`). Raises :class:`_Abandoned` once close() took them."""
        with self._lock:
            if self._abandoned:
                raise _Abandoned()
            for update in updates:
                entry = self._settled.get(id(update))
                if entry is None:
                    # The update is kept here: its id is not reused while the batch is sent.
                    self._settled[id(update)] = [update, 1]
                else:
                    entry[1] += 1

    def _unsettled(self, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``updates`` less the settled ones (:meth:`_settle`), in their order (an update object put
        twice counts twice)."""
        left = {key: entry[1] for key, entry in self._settled.items()}
        out = []
        for update in updates:
            if left.get(id(update), 0) > 0:
                left[id(update)] -= 1
            else:
                out.append(update)
        return out

    def _retry_at(self, end: float, asked: bool, exc: BaseException) -> float:
        """When to try again, a wait due to end at ``end`` (``time.monotonic()``; ``asked``: the
        server's Retry-After), or :class:`_GaveUp`. Once close() has begun, a call is given up at
        :meth:`_give_up_at` (the updates go to the spool), one clock for all calls: with a clock per
        call (from its first failure), calls that failed and went through in turn each got a fresh
        ``close_timeout``, and close() outlasted it many times. A wait the server asked for ends at
        that give-up at the latest, for one last try; our own backoff is then one second at most."""
        give_up_at = self._give_up_at()
        if not self._stopping or give_up_at is None:
            return end
        now = time.monotonic()
        if now >= give_up_at:
            raise _GaveUp(exc)
        if not asked:
            return min(end, now + 1.0, give_up_at)  # a try at the give-up at the latest, none after
        if end > give_up_at:
            # Its wait is cut at the give-up, for one last try: close() ends by then, and one call
            # a little early (not one a second) may still find a server back from a short outage
            # (503 with Retry-After 5 against a launcher's close_timeout of 5 s).
            logger.warning("%s: closing, and the server asks to wait %.1f s more, past the %.1f s left to "
                           "send the updates: one last try then", self.name, end - now, give_up_at - now)
            return give_up_at
        return end

    def _patch(self, chunk: list[dict[str, Any]], key: Optional[str] = None) -> None:
        # (Its signature is kept: subclasses override it, processing.py's _ReplayUpdater.)
        self.calls += 1
        if not self.sends_session:
            chunk = [{k: v for k, v in u.items() if k != SESSION_KEY} if SESSION_KEY in u else u for u in chunk]
        if self._send_fn is not None:
            self._send_fn(chunk)
            return
        client = self._client
        if client is None:
            from .default import get_default_client

            client = self._client = get_default_client()
        from .rest import RESTClient

        if isinstance(client, RESTClient):
            # One attempt per call: _send_retrying does the retrying, and checks between tries whether
            # close() has begun. A call given the client's own budget (10 tries, backoff to 30 s) that
            # went out just before close() held the launcher's exit 35 s when the API was gone
            # (close() cannot cut a call short; it joined the thread for close_timeout + 30 s).
            # ``deadline``: while closing, the call waits CLOSING_CALL_WAIT_SEC at most past close()'s
            # give-up (a server that accepts and never answers held it a read timeout, 120 s).
            give_up_at = self._give_up_at()
            deadline = None
            if give_up_at is not None and self._closing_at is not None:
                # Past the later of its start and close_timeout: a slow call of a healthy server
                # goes on (the give-up is later while no call failed); one that does not answer
                # fails there, and close() then gives up at close_timeout.
                deadline = min(max(self._closing_at + self.close_timeout, time.monotonic()) + CLOSING_CALL_WAIT_SEC,
                               give_up_at + CLOSING_CALL_WAIT_SEC)
            client.patch("/jobs/", json=chunk, idempotency_key=key, retry_count=0, deadline=deadline)
        else:
            client.patch("/jobs/", json=chunk)

    # -- spool -----------------------------------------------------------------------------------
    def _spool(self, updates: list[dict[str, Any]]) -> None:
        """Write ``updates`` to a new spool file. Their jobs' later updates are spooled after them
        from now on (:meth:`_drain`): sent now, they would reach the server before these, which the
        replay sends later (a RUN_DONE applied, then the spooled RUNNING refused and logged as an
        error, the return code and times of the run lost)."""
        with self._lock:
            if self._abandoned:
                raise _Abandoned()  # close() spooled what the thread held
            self._settle(updates)
            self._write_spool(updates)

    def _write_spool(self, updates: list[dict[str, Any]]) -> None:
        """Write ``updates`` to a new spool file (:meth:`_spool`; close() itself when it abandons the thread)."""
        if not updates:
            return
        if self.spool_dir is None:
            logger.error("%s: %d job updates lost (no spool directory): %s", self.name, len(updates), updates[:3])
            return
        try:
            path = write_spool(self.spool_dir, updates)
        except OSError as exc:
            # A full or over-quota site directory: say what is lost and what follows (it said only
            # that it could not spool). Their jobs come back when their Session ends, as after a kill.
            ids = [str(i) for i in dict.fromkeys(_record_id(u) for u in updates)]
            logger.error("%s: cannot spool %d job updates to %s: %s; lost (jobs %s%s are run or processed again "
                         "once their Session ends)", self.name, len(updates), self.spool_dir, exc.strerror or exc,
                         ", ".join(ids[:10]), " ..." if len(ids) > 10 else "")
            return
        self.spooled += len(updates)
        self.spool_files.append(path)
        self._spooled_ids.update(_record_id(u) for u in updates)
        _note_spooled(path, updates, api_of(self._client))
        logger.warning("%s: %d job updates saved to %s; the site agent sends them when the API is back",
                       self.name, len(updates), path)


SPOOL_SUFFIX = ".jsonl"

#: (API root, session id) -> the spool files this process wrote with updates sent under that
#: session, until :func:`send_spooled` sends them. The lease of that session must not end it
#: meanwhile (:meth:`balsam.client.lease.JobLease.close`): ending it makes its RUNNING jobs
#: RUN_TIMEOUT and frees its jobs, and the spooled RUN_DONE would then be refused at replay ("no
#: longer held by session"), the job run again. Per process: a launcher's updater and lease live
#: in one (on the same client, or clients of the same API root).
_SPOOLED: dict[tuple[Optional[str], int], set[Path]] = {}
_SPOOLED_LOCK = threading.Lock()
_last_spool_ns = 0


def api_of(client: Any) -> Optional[str]:
    """The API root of ``client`` (None for a client that does not tell): session ids are per API."""
    root = getattr(client, "api_root", None)
    return root if isinstance(root, str) else None


def _note_spooled(path: Path, updates: list[dict[str, Any]], api: Optional[str]) -> None:
    sessions = {u.get(SESSION_KEY) for u in updates}
    with _SPOOLED_LOCK:
        for session_id in sessions:
            if type(session_id) is int:
                _SPOOLED.setdefault((api, session_id), set()).add(path)


def spooled_for(client: Any, session_id: int) -> list[Path]:
    """The spool files of this process that hold updates sent under ``session_id`` of the API of
    ``client``, not sent yet."""
    with _SPOOLED_LOCK:
        return sorted(_SPOOLED.get((api_of(client), session_id), ()))


def _forget_spooled(path: Path) -> None:
    with _SPOOLED_LOCK:
        for key in list(_SPOOLED):
            _SPOOLED[key].discard(path)
            if not _SPOOLED[key]:
                del _SPOOLED[key]


#: :func:`send_spooled`'s other writers' spool files, not read yet.
_UNREAD = object()


class _ClaimLost(Exception):
    """send_spooled's claim was taken back by the site agent (it found the claim stale) while it sent."""


def send_spooled(client: Any, session_id: int) -> bool:
    """One more try (no retry) to send the spool files holding updates of ``session_id`` now, on
    ``client``; each file sent is deleted. True when none is left unsent.

    A launcher calls this (through its lease's close) before it ends its Session: the API that was
    gone when its updater gave up may be back. Updates the server refuses are dropped, as a replay
    would drop them. Each file is claimed first (:func:`claim_spool_file`), as the site agent's
    replay claims the files it sends: one process sends a file at a time. A file gone unclaimed was
    replayed by the agent (it deletes a file only once it sent it); a file the agent claimed is not
    sent yet (False: the Session must not end), and neither are the later files of this process
    (sent before it, a job's later update would reach the server before its earlier one).

    The claim is refreshed before each call, and each call waits :data:`SPOOLED_CALL_WAIT_SEC` at
    most: a live claim is never :data:`CLAIM_STALE_SEC` old, which is how the agent tells the claim
    of a launcher killed in here on another host (it takes it back then, well within the Session's
    expiry). Whatever ends the sending (a failed call, KeyboardInterrupt, SystemExit), the claim is
    given back with the updates not sent yet.

    A file with an update that follows one of its job's in another process's spool file (claimed
    or not) is left to the agent's replay (False), which sends both in order; only an update the
    server would apply with it counts (of the same session, or of none: :func:`_follows`), and a
    file that cannot be read or is gone meanwhile holds none."""
    elsewhere: Any = _UNREAD  # the other writers' spool files: read at the first file claimed
    for path in spooled_for(client, session_id):
        claimed = claim_spool_file(path)
        if claimed is None:
            if claims_of(path):
                logger.info("spooled updates %s are being sent by another process (the site agent)", path.name)
                return False
            _forget_spooled(path)  # replayed by the agent
            continue
        held, sent = True, False  # held: not taken back by the agent meanwhile
        updates: list[dict[str, Any]] = []
        done = 0

        def call(part: list, claimed: Path = claimed) -> Any:
            if not refresh_claim(claimed):
                raise _ClaimLost()
            return client.patch("/jobs/", json=part, idempotency_key=uuid.uuid4().hex, retry_count=0,
                                deadline=time.monotonic() + SPOOLED_CALL_WAIT_SEC)

        try:
            try:
                lines = claimed.read_text().splitlines()
            except OSError as exc:
                logger.warning("cannot read spooled updates %s: %s", claimed, exc)
                return False
            updates = spooled_updates(claimed, lines)
            if elsewhere is _UNREAD:
                elsewhere = _spooled_elsewhere(path)  # read once for all of this process's files
            if elsewhere is None or _earlier_elsewhere(updates, elsewhere):
                # Sent now, a job's update would reach the server before its earlier one in another
                # process's file that the server would apply too (a RUN_DONE before its RUNNING:
                # refused). The agent's replay sends both in order, within the Session's expiry
                # (not ended meanwhile: False).
                logger.info("spooled updates %s follow updates of their jobs that another process spooled: "
                            "left for the site agent", path.name)
                return False
            for start in range(0, len(updates), MAX_ITEMS_PER_BULK_OP):
                chunk = updates[start : start + MAX_ITEMS_PER_BULK_OP]
                refused = isolate_refused(call, chunk)
                log_refused(f"spooled updates {path.name}", refused, len(chunk))
                done = start + len(chunk)
            sent = True
        except _ClaimLost:
            held = False
            _unhold(claimed)
            logger.warning("spooled updates %s: taken back by the site agent while being sent; left to it "
                           "(%d of %d sent here)", path.name, done, len(updates))
            return False
        except Exception as exc:
            logger.warning("spooled updates %s still cannot be sent (%s): left for the site agent", path.name, exc)
            return False
        finally:
            # Given back on any way out, KeyboardInterrupt and SystemExit too (a claim left behind
            # waits to be taken back). The file keeps only what is unsent: the agent's replay of the
            # whole file sent the chunks sent here again, after the later updates of their jobs (a
            # RUNNING after its RUN_DONE: refused, an ERROR line each).
            if held and not sent:
                release_spool_file(claimed, updates[done:] if done else None)
        logger.info("sent %d spooled job updates from %s", len(updates), path.name)
        _drop_claim(claimed)
        _forget_spooled(path)
    return True


#: A spool file being sent is renamed ``<name>`` + this + ``<host>-<pid>.<start>`` of the launcher sending it
#: (:func:`claim_spool_file`, :func:`_claim_tag`), ``<name>`` + this + ``agent_<host>-<pid>.<start>`` by the site agent's replay
#: (:data:`AGENT_CLAIM_TAG`): a name the replay's ``*.jsonl`` does not match, and a rename fails
#: for all but one process. The site agent's replay and a launcher's :func:`send_spooled` each sent
#: the same file, and a launcher's rewrite of a file sent in part re-created one the agent had
#: replayed and deleted meanwhile (its updates replayed again, refused).
CLAIM_MARK = ".claimed-"
#: What marks the site agent's claims (``_`` is no host name character: a launcher on a host named
#: ``agent-1`` is not read as an agent). A site has one agent at a time (its lock file,
#: :func:`balsam.site.agent.acquire_agent_lock`): an agent's claim this process does not hold is of
#: an agent that is gone (killed -9, its host rebooted, on this or another login node), and the agent
#: now running takes it back at once.
AGENT_CLAIM_TAG = "agent_"
#: Added to a claim's name while its holder gives it back (:func:`release_spool_file`): a rename of
#: the claim first, which fails (ENOENT) once the agent took the claim back.
_GIVEBACK_MARK = ".giveback"
#: A launcher's claim of another host is taken back by the site agent's replay (:class:`SpoolReplayer`)
#: once it is this old (by its mtime): :func:`send_spooled` refreshes it before each call, and no
#: call waits more than :data:`SPOOLED_CALL_WAIT_SEC`, so a live one never is (60 s of clock skew
#: between hosts spared). Well under a Session's expiry (``session_expire_sec``, 300 s by default):
#: the claim of a launcher killed while sending (its wall time out, on a compute node) is taken back
#: and replayed while its Session still holds the jobs (it was 15 min: the Session had expired, the
#: RUN_DONE was refused, the job ran again). A launcher's claim on the agent's host is taken back at
#: once when its process is gone (its pid runs no more, or runs a process started at another time
#: than the one the claim names: :func:`_claim_tag`), never while it runs; an agent's claim, see :data:`AGENT_CLAIM_TAG`.
CLAIM_STALE_SEC = 90.0
#: The longest a call of :func:`send_spooled` waits for its answer (its ``deadline``): see :data:`CLAIM_STALE_SEC`.
SPOOLED_CALL_WAIT_SEC = 30.0

#: The claimed names this process holds now (claimed and not yet given back or deleted): a claim
#: named with this process's pid that is not among them is of an earlier process given the same
#: pid (a reboot) or one whose give-back failed, and is taken back as any stale claim. One set per
#: process: a launcher's send_spooled and an agent's replay in one process (tests) hold each apart.
_HELD_CLAIMS: set[str] = set()


def _hold(claimed: Path) -> None:
    with _SPOOLED_LOCK:
        _HELD_CLAIMS.add(str(claimed))


def _unhold(claimed: Path) -> None:
    with _SPOOLED_LOCK:
        _HELD_CLAIMS.discard(str(claimed))


def holds_claim(claimed: Path) -> bool:
    """Whether this process holds ``claimed`` (see :data:`_HELD_CLAIMS`)."""
    with _SPOOLED_LOCK:
        return str(claimed) in _HELD_CLAIMS


def _drop_claim(claimed: Path) -> bool:
    """Delete a claimed file that was sent; False (with a warning) when it was taken back meanwhile."""
    _unhold(claimed)
    try:
        claimed.unlink()
    except FileNotFoundError:
        logger.warning("spooled updates %s were sent, but their claim had been taken back: they are sent again",
                       claimed_original(claimed).name)
        return False
    return True


#: pid -> this process's start time in ms, as a claim names it (by pid: a forked child is another process).
_STARTED_MS: dict[int, Optional[int]] = {}


def _claim_tag(agent: bool) -> str:
    """``[agent_]<host>-<pid>[.<start time, ms>]``: the pid with its start time names one process
    (:mod:`balsam.process_identity`); a live process given the pid since is not the claimer."""
    pid = os.getpid()
    if pid not in _STARTED_MS:
        started = process_start_time(pid)
        _STARTED_MS[pid] = None if started is None else int(started * 1000)
    started_ms = _STARTED_MS[pid]
    return (f"{AGENT_CLAIM_TAG if agent else ''}{socket.gethostname()}-{pid}"
            f"{'' if started_ms is None else f'.{started_ms}'}")


def claim_spool_file(path: Path, agent: bool = False) -> Optional[Path]:
    """Rename spool file ``path`` to this process's claimed name (``agent``: the site agent's; its
    mtime the time of the claim); None when it is gone (claimed or deleted by another process)."""
    claimed = path.with_name(f"{path.name}{CLAIM_MARK}{_claim_tag(agent)}")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        # NFS: a rename whose reply was lost is sent again, and the second answers ENOENT though the
        # first was done: the file is ours (no other process makes this name).
        if not claimed.exists():
            return None
    _hold(claimed)
    refresh_claim(claimed)
    return claimed


def refresh_claim(claimed: Path) -> bool:
    """Mark ``claimed`` as held now (its mtime, which :data:`CLAIM_STALE_SEC` is measured from);
    False when it is gone (taken back by the site agent)."""
    try:
        os.utime(claimed)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def claimed_original(claimed: Path) -> Path:
    """The spool file name a claimed file had (:func:`claim_spool_file`)."""
    return claimed.with_name(claimed.name.rpartition(CLAIM_MARK)[0])


def _claimer(claimed: Path) -> Optional[tuple[bool, str, int, Optional[float]]]:
    """(an agent's claim, host, pid, the claimer's start time or None) of a claimed name (see
    :func:`_claim_tag`); None for one not made by :func:`claim_spool_file`."""
    tag = claimed.name.rpartition(CLAIM_MARK)[2]
    if tag.endswith(_GIVEBACK_MARK):
        tag = tag[: -len(_GIVEBACK_MARK)]
    agent = tag.startswith(AGENT_CLAIM_TAG)
    host, _, process = tag[len(AGENT_CLAIM_TAG) if agent else 0 :].rpartition("-")
    pid, _, started_ms = process.partition(".")
    if not host or not pid.isdecimal() or (started_ms and not started_ms.isdecimal()):
        return None
    return agent, host, int(pid), int(started_ms) / 1000 if started_ms else None


def claims_of(path: Path) -> list[Path]:
    """The claimed names of spool file ``path`` (none or one, unless a claim was taken back)."""
    try:
        return list(path.parent.glob(f"{path.name}{CLAIM_MARK}*"))
    except OSError:
        return []


def release_spool_file(claimed: Path, rest: Optional[list[dict[str, Any]]] = None) -> bool:
    """Give a claimed spool file back under its own name (for the next try), keeping only ``rest``
    of its updates when given. False when the claim was taken back meanwhile (the agent has the
    whole file: ``rest`` is dropped) or the give-back failed (logged)."""
    _unhold(claimed)
    return _give_back(claimed, claimed.with_name(claimed.name + _GIVEBACK_MARK), rest)


def _take_back(claimed: Path) -> bool:
    """The site agent takes back a stale claim (:func:`_claim_stale`) under its own name again."""
    private = claimed.with_name(f"{claimed_original(claimed).name}{CLAIM_MARK}{_claim_tag(True)}{_GIVEBACK_MARK}")
    return _give_back(claimed, private, None)


def _give_back(claimed: Path, private: Path, rest: Optional[list[dict[str, Any]]]) -> bool:
    """Rename ``claimed`` to ``private`` (this process's alone: whoever renames a claim first has
    it; ENOENT: another did), write ``rest`` there, then put it back under its own name without
    replacing a file of that name (link, unlink). A claimer that wrote its rest over its claim
    after the agent had taken it back and replayed it re-created the file: sent twice."""
    original = claimed_original(claimed)
    try:
        os.rename(claimed, private)
    except FileNotFoundError:
        if not private.exists():  # NFS: a retransmitted rename answers ENOENT though done
            logger.warning("spooled updates %s: the claim %s was taken back meanwhile; left to its taker",
                           original.name, claimed.name)
            return False
    except OSError as exc:
        logger.warning("cannot give back spooled updates %s: %s", claimed, exc)
        return False
    _hold(private)
    try:
        if rest is not None:
            _write_updates(private, rest)
        try:
            os.link(private, original)
        except FileExistsError:
            if not os.path.samefile(private, original):  # else NFS: a retransmitted link done before
                logger.error("cannot give back spooled updates %s: %s exists; left as %s", claimed.name,
                             original.name, private.name)
                return False
        except OSError:
            os.rename(private, original)  # a file system without hard links
            return True
        private.unlink(missing_ok=True)
        return True
    except OSError as exc:
        logger.warning("cannot give back spooled updates %s (now %s): %s", claimed.name, private.name, exc)
        return False
    finally:
        _unhold(private)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: it runs
    return True


def _claim_stale(claimed: Path, now: float) -> bool:
    """``claimed`` (not held by this process: the caller checks) was claimed by a process that is
    gone (see :data:`CLAIM_STALE_SEC` and :data:`AGENT_CLAIM_TAG`)."""
    try:
        mtime = claimed.stat().st_mtime
    except OSError:
        return False
    claimer = _claimer(claimed)
    if claimer is None:
        return now - mtime > CLAIM_STALE_SEC
    agent, host, pid, started = claimer
    if agent or (host == socket.gethostname() and pid == os.getpid()):
        return True  # the site's one agent is this process: another agent's claim is of one gone
    if host == socket.gethostname():
        if started is not None:
            # Gone when its pid runs no more or runs another process (started at another time).
            return not same_process(pid, started)
        # No start time (a claim of the previous version, or none could be read): a live pid may be
        # another process since (a reboot, pid reuse), and a live claimer refreshes its claim at
        # least every SPOOLED_CALL_WAIT_SEC: stale once unrefreshed for CLAIM_STALE_SEC.
        return not _pid_alive(pid) or now - mtime > CLAIM_STALE_SEC
    return now - mtime > CLAIM_STALE_SEC


def _writer_of(name: str) -> str:
    """The writing process's part of a spool file's name (``unsent-<host>-<pid>``)."""
    return name[: -len(SPOOL_SUFFIX)].rpartition("-")[0] if name.endswith(SPOOL_SUFFIX) else name


def _wrong_type(update: dict[str, Any]) -> Optional[str]:
    """The field of ``update`` whose value has a type the server refuses and the replay cannot order
    by (a state or session that is no str or int cannot be a dict key), or None."""
    state = update.get("state")
    if state is not None and not isinstance(state, str):
        return "state"
    session = update.get(SESSION_KEY)
    if session is not None and (not isinstance(session, int) or isinstance(session, bool)):
        return SESSION_KEY
    stamp = update.get("state_timestamp")
    if stamp is not None and (not isinstance(stamp, (str, int, float)) or isinstance(stamp, bool)):
        return "state_timestamp"
    return None


def spooled_updates(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    """The job updates of a spool file's ``lines``: a line that is not one, or one with a field of
    the wrong type (the server refuses it; ordering by it raised at every poll and stopped the
    whole replay), is logged and skipped. The replay's consumers rely on these checks."""
    updates = []
    for number, line in enumerate(lines, 1):
        try:
            update = json.loads(line)
            int(update["id"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: not a job update; skipped", path, number)
            continue
        wrong = _wrong_type(update)
        if wrong is not None:
            logger.warning("%s:%d: job update with a %s of the wrong type (%s); skipped", path, number, wrong,
                           type(update[wrong]).__name__)
            continue
        updates.append(update)
    return updates


def _instant(update: dict[str, Any]) -> Optional[float]:
    """When ``update``'s state was reached (its ``state_timestamp``, read as the server reads it), in
    seconds; None without one (or one that is not a time: the server refuses it)."""
    value = update.get("state_timestamp")
    if value is None:
        return None
    try:
        return parse_datetime(value).timestamp()
    except ValueError:
        return None


#: A job's states in the order of its life (:class:`JobState`'s order: ... RUNNING, RUN_DONE,
#: RUN_ERROR, RUN_TIMEOUT, RESTART_READY, POSTPROCESSED ...): of two updates of a job stamped the
#: same instant, the earlier state goes first (a RUN_DONE put before its RUNNING was refused). A
#: state that is none of them goes after them (the server refuses it).
_STATE_RANK: dict[Any, int] = {state.value: rank for rank, state in enumerate(JobState)}
#: An order key: (when the state was reached, its rank in :data:`_STATE_RANK`).
_Key = tuple[float, int]
#: The key of an update without a time and without an earlier update of its job in its file.
_FIRST: _Key = (float("-inf"), -1)
_NEVER: _Key = (float("inf"), 0)
#: job -> session of its updates (None: none) -> the earliest (or the latest) key of those.
_Bounds = dict[Any, dict[Any, _Key]]


def _keyed(updates: Iterable[dict[str, Any]],
           last: Optional[dict[Any, _Key]] = None) -> list[tuple[_Key, dict[str, Any]]]:
    """``(order key, update)`` of a file's ``updates`` (or some of them, in the file's order): the
    time each one's state was reached and the state's rank, at least its job's previous key in the
    file (or in ``last``: its writer's earlier files, updated here), so that a sort by key keeps each
    writer's own order (an update without a time, no state change but a field, keeps its place
    after its job's previous update, or first when none)."""
    if last is None:
        last = {}
    keyed = []
    for update in updates:
        job = _record_id(update)
        key = last.get(job, _FIRST)
        instant = _instant(update)
        if instant is not None:
            own = (instant, _STATE_RANK.get(update.get("state"), len(_STATE_RANK)))
            if own > key:
                key = own
        last[job] = key
        keyed.append((key, update))
    return keyed


def _bounds(keyed: Iterable[tuple[_Key, dict[str, Any]]], first: bool) -> _Bounds:
    """job -> session -> the earliest (``first``) or the latest key of ``keyed``'s updates of it."""
    bounds: _Bounds = {}
    for key, update in keyed:
        per_session = bounds.setdefault(_record_id(update), {})
        session = update.get(SESSION_KEY)
        have = per_session.get(session)
        if have is None or (key < have if first else key > have):
            per_session[session] = key
    return bounds


def _lower(into: _Bounds, bounds: _Bounds) -> list[Any]:
    """Lower ``into`` to ``bounds`` (earliest keys both); the jobs whose bound moved."""
    lowered = []
    for job, per_session in bounds.items():
        have = into.setdefault(job, {})
        for session, key in per_session.items():
            if key < have.get(session, _NEVER):
                have[session] = key
                lowered.append(job)
    return lowered


def _follows(latest: dict[Any, _Key], earliest: dict[Any, _Key]) -> bool:
    """Some update of a job (``latest``: its latest keys per session) was reached at or after one of
    its updates elsewhere (``earliest``: their earliest keys per session) that the server would
    apply with it: of the same session, or one of the two of none. Updates of two sessions are not
    both applied (one session holds the job at a time, and one that lost it never has it back): a
    stale file of an earlier run, under its session that expired, holds back nothing."""
    for session, key in latest.items():
        if session is None:
            before = min(earliest.values(), default=_NEVER)
        else:
            before = min(earliest.get(session, _NEVER), earliest.get(None, _NEVER))
        if before <= key:  # the same instant: after it too, unless its state is the earlier one
            return True
    return False


def _shared(job_sets: list[set[Any]]) -> set[Any]:
    """The jobs found in more than one of ``job_sets`` (the jobs of each file)."""
    seen: set[Any] = set()
    shared: set[Any] = set()
    for jobs in job_sets:
        shared |= seen & jobs
        seen |= jobs
    return shared


#: Per file: ``(place in the file, order key, update)`` of its updates of some jobs (:func:`_key_files`).
_Keyed = list[list[tuple[int, _Key, dict[str, Any]]]]


def _key_files(files: list[list[dict[str, Any]]], writers: list[str], jobs: set[Any]) -> _Keyed:
    """The order keys of the updates of ``jobs`` in ``files`` (in name order; ``writers``: each one's
    writer), each job's carried across the files of one writer (:func:`_keyed`): a writer's files
    are in the order it wrote them, even when its clock stepped back between two of them or it
    stamped two states out of rank order at one instant. Keyed once per poll, for the merge and
    the hold-back both."""
    lasts: dict[str, dict[Any, _Key]] = {}
    keyed: _Keyed = []
    for updates, writer in zip(files, writers):
        mine = [(at, update) for at, update in enumerate(updates) if _record_id(update) in jobs]
        keys = _keyed((update for _, update in mine), lasts.setdefault(writer, {}))
        keyed.append([(at, key, update) for (at, _), (key, update) in zip(mine, keys)])
    return keyed


def _replay_order(files: list[list[dict[str, Any]]], keyed: _Keyed) -> list[tuple[int, dict[str, Any]]]:
    """``(file index, update)`` of the updates of ``files`` (in name order) in the order to send
    them: in file order, except that the updates in ``keyed`` (of the jobs found in several files,
    :func:`_key_files`) take their job's places in the order their states were reached (a stable
    sort by order key: each writer's own order is kept, and at equal keys the earlier file goes
    first). Spool files sort by writer: a job updated by two processes (serial mode's master and
    workers, a launcher and its successor) had its RUN_DONE of the one sent before its RUNNING of
    the other, refused (409), the job left RUNNING."""
    slots = [(index, update) for index, updates in enumerate(files) for update in updates]
    places: dict[Any, list[int]] = {}
    found: dict[Any, list[tuple[_Key, int, dict[str, Any]]]] = {}
    place = 0
    for index, updates in enumerate(files):
        for at, key, update in keyed[index]:
            places.setdefault(_record_id(update), []).append(place + at)
            found.setdefault(_record_id(update), []).append((key, index, update))
        place += len(updates)
    for job, entries in found.items():
        entries.sort(key=lambda entry: entry[0])  # stable: in file order at equal keys
        for at, (_, index, update) in zip(places[job], entries):
            slots[at] = (index, update)
    return slots


#: Looks for a spool file's current name before :func:`_read_spool_file` gives up on one that moves.
_READ_ROUNDS = 3


def _read_spool_file(path: Path) -> Optional[list[str]]:
    """The lines of spool file ``path`` (an unclaimed name or a claim), read under whichever name it
    has now (claimed or given back since it was listed); None when it has none of them (sent and
    deleted meanwhile: it counts as sent). Raises OSError when it is there and cannot be read (no
    read permission, EIO, a directory of that name), or when it moved at each of
    :data:`_READ_ROUNDS` looks.

    Gone only when a fresh look finds no name for it: a give-back renames the claim (to
    ``<claim>.giveback``), then links the original, then unlinks the claim, so the file always has
    a name, but the names listed before the reads may all be gone by then (it counted as sent,
    and a later update of its job went out before it, refused). The original is read again after
    the glob: a give-back that ended between the first read and the glob left no claim to find."""
    original = claimed_original(path) if CLAIM_MARK in path.name else path
    error: Optional[OSError] = None
    first = [path] if path != original else []
    for _ in range(_READ_ROUNDS):
        listed = claims_of(original)  # a fresh glob each round
        for name in [*first, original, *listed, original]:
            try:
                return name.read_text().splitlines()
            except FileNotFoundError:
                continue
            except OSError as exc:
                error = exc
        if error is not None:
            raise error
        if not listed:
            return None
        first = []
    raise FileNotFoundError(f"spool file {original.name} moved at each of {_READ_ROUNDS} looks")


def _spooled_elsewhere(path: Path) -> Optional[dict[Any, list[list[dict[str, Any]]]]]:
    """job -> its updates in each spool file of a writer other than ``path``'s, claimed or not
    (:func:`send_spooled`); None when the spool directory cannot be listed. A file gone since the
    listing was sent; one that cannot be read is left out (the agent's replay holds back only its
    own writer's later files: that it holds an update of one of these jobs is not known)."""
    writer = _writer_of(path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return None
    found: dict[Any, list[list[dict[str, Any]]]] = {}
    for name in names:
        if name.startswith(".") or not (name.endswith(SPOOL_SUFFIX) or f"{SPOOL_SUFFIX}{CLAIM_MARK}" in name):
            continue
        if _writer_of(name.rpartition(CLAIM_MARK)[0] or name) == writer:
            continue  # this process's own files: in the order it wrote them
        try:
            lines = _read_spool_file(path.parent / name)
        except OSError as exc:
            logger.info("cannot read spooled updates %s (%s): not waited for", name, exc)
            continue
        by_job: dict[Any, list[dict[str, Any]]] = {}
        for update in spooled_updates(path.parent / name, lines or []):
            by_job.setdefault(_record_id(update), []).append(update)
        for job, updates in by_job.items():
            found.setdefault(job, []).append(updates)
    return found


def _earlier_elsewhere(updates: list[dict[str, Any]], elsewhere: dict[Any, list[list[dict[str, Any]]]]) -> bool:
    """Some of ``updates`` (of one spool file) follows an update of its job in ``elsewhere`` (the
    other writers' files, :func:`_spooled_elsewhere`) that the server would apply with it."""
    for job, latest in _bounds(_keyed(updates), first=False).items():
        for theirs in elsewhere.get(job, ()):
            if _follows(latest, _bounds(_keyed(theirs), first=True)[job]):
                return True
    return False


def spool_prefix(host: str, pid: int) -> str:
    """The start of the names of the spool files written by process ``pid`` on ``host``."""
    return f"unsent-{host}-{pid}-"


def write_spool(spool_dir: "Path | str", updates: list[dict[str, Any]]) -> Path:
    """Write ``updates`` to a new file in ``spool_dir`` (complete or not at all: write, then rename)."""
    global _last_spool_ns
    spool_dir = Path(spool_dir)
    spool_dir.mkdir(parents=True, exist_ok=True)
    with _SPOOLED_LOCK:
        # Names sort in the order written (a replay sends the files in name order: a job's updates
        # spooled in two files arrive in order), even two files within one clock tick.
        _last_spool_ns = max(time.time_ns(), _last_spool_ns + 1)
        stamp = _last_spool_ns
    stem = f"{spool_prefix(socket.gethostname(), os.getpid())}{stamp}"
    path = spool_dir / f"{stem}{SPOOL_SUFFIX}"
    _write_updates(path, updates)
    return path


def _write_updates(path: Path, updates: list[dict[str, Any]]) -> None:
    """Write ``updates`` to ``path``, one JSON line each, complete or not at all (write, then rename)."""
    tmp = path.with_name(f".{path.stem}.tmp")
    try:
        with open(tmp, "w") as fh:
            for update in updates:
                fh.write(json.dumps(update, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full or over-quota disk: the part written is removed (it was left, taking the room
        # the next try needs, and no replay ever reads a .tmp).
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


class SpoolReplayer:
    """Sends the updates launchers spooled (see :class:`BulkStatusUpdater`), through ``updater``.

    :meth:`poll` never blocks: it claims and queues the updates of new spool files and deletes a file
    once the updater has sent (or dropped as refused) all of its updates. If the agent stops first,
    its own updater spools what it could not send, so deleting a replayed file never loses an update
    (:meth:`release`, after the updater's close, deletes them then). Made by the site agent (its
    claims are marked as the agent's: :data:`AGENT_CLAIM_TAG`).
    """

    def __init__(self, spool_dir: "Path | str", updater: BulkStatusUpdater) -> None:
        self.spool_dir = Path(spool_dir)
        self.updater = updater
        self._queued: dict[Path, int] = {}
        self.replayed = 0
        #: The spool files found unreadable (their own names), warned about once while they stay.
        self._unreadable: set[str] = set()

    def poll(self) -> int:
        """Queue new spool files; delete the ones fully sent. Returns the number of updates queued.

        A file is claimed before it is read (:func:`claim_spool_file`): one another process is
        sending (a launcher's :func:`send_spooled`) is skipped, and so are the later files of the
        same writer (its job's updates stay in order), also when the claim fails here (a launcher
        claimed it since the listing: its later file sent first made a RUN_DONE arrive before its
        RUNNING) or the file cannot be read (warned about once). A claim whose process is gone is
        taken back first (:func:`_claim_stale`); the claims this replay holds are refreshed (their mtime).

        The updates of all the files of one poll are put in one go (one bulk call), each job's in the
        order its states were reached (:func:`_replay_order`): a job's updates can be spooled by two
        writers, whose files sort apart. A file with an update of a job at or after that job's update
        in a file not sent in this poll (another process is sending it, or it waits behind such a one)
        that the server would apply with it (:func:`_follows`) is given back for a later poll, and so
        are its writer's later files (:meth:`_hold_back_later`)."""
        for claimed, sequence in list(self._queued.items()):
            if self.updater.done_through(sequence):
                _unhold(claimed)
                claimed.unlink(missing_ok=True)
                del self._queued[claimed]
            else:
                refresh_claim(claimed)
        now = time.time()
        try:
            names = os.listdir(self.spool_dir)  # one listing: the claims and the files as of one moment
        except OSError:
            return 0
        self._unreadable.intersection_update(name.rpartition(CLAIM_MARK)[0] or name for name in names)
        files = {name for name in names if name.endswith(SPOOL_SUFFIX)}
        #: writer -> the first of its files that this poll cannot send (claimed by another process):
        #: its files from there on wait for a later poll.
        blocked: dict[str, str] = {}
        #: The files this poll does not send (claimed elsewhere, or waiting behind one): a job's
        #: update in one of them goes before its later updates in the files sent now.
        unsent: list[Path] = []

        def block(name: str) -> None:
            writer = _writer_of(name)
            blocked[writer] = min(blocked.get(writer, name), name)

        for name in names:
            # A dotted name is a temporary file being written (a give-back's rest): no claim.
            if name.startswith(".") or f"{SPOOL_SUFFIX}{CLAIM_MARK}" not in name:
                continue
            claimed = self.spool_dir / name
            if claimed in self._queued:
                continue
            original = claimed_original(claimed).name
            if not holds_claim(claimed) and _claim_stale(claimed, now):
                logger.warning("spooled updates %s: taking back the claim of a process that is gone", name)
                if _take_back(claimed):
                    files.add(original)
                    continue
            block(original)
            unsent.append(claimed)
        taken: list[tuple[Path, Path, list[dict[str, Any]]]] = []  # (claimed, path, updates) in name order
        claims: list[Path] = []  # every claim taken in this poll
        put: dict[int, int] = {}  # the id of each update put (queued) in this poll -> its sequence
        try:
            for name in sorted(files):
                path = self.spool_dir / name
                if path in self.updater.spool_files:
                    continue
                writer = _writer_of(name)
                if writer in blocked and blocked[writer] < name:
                    unsent.append(path)
                    continue  # an earlier file of its writer is being sent elsewhere: this one after it
                claimed = claim_spool_file(path, agent=True)
                if claimed is None:
                    block(name)  # claimed by another process since the listing
                    unsent.append(path)
                    continue
                claims.append(claimed)
                try:
                    lines = claimed.read_text().splitlines()
                except OSError as exc:
                    self._warn_unreadable(path, exc)
                    release_spool_file(claimed)
                    block(name)
                    continue
                taken.append((claimed, path, spooled_updates(path, lines)))
            return self._queue(taken, unsent, put)
        except BaseException:
            # A claim left behind here is never stale (this process holds it): its file, and every
            # later file of its writer and of its jobs, waited until the agent restarted.
            self._give_back_unqueued(claims, taken, put)
            raise

    def _queue(self, taken: list[tuple[Path, Path, list[dict[str, Any]]]], unsent: list[Path],
               put: dict[int, int]) -> int:
        """Put the updates of the ``taken`` files that may go now (:meth:`_hold_back_later`), merged
        (:func:`_replay_order`), recording each one's id and sequence in ``put``; the number put."""
        jobs_of = [{_record_id(update) for update in updates} for _, _, updates in taken]
        theirs = self._read_unsent(unsent) if taken else []
        waited_for = set().union(*jobs_of) & {_record_id(update) for updates in theirs for update in updates}
        # Keyed once, for the hold-back and the merge: the updates of the jobs that may be held back
        # (in an unsent file) or reordered (in two taken files); the others cost no time parsing.
        keyed = _key_files([updates for _, _, updates in taken], [_writer_of(path.name) for _, path, _ in taken],
                           _shared(jobs_of) | waited_for)
        kept = self._hold_back_later(taken, keyed, theirs, waited_for)
        taken, keyed = [taken[index] for index in kept], [keyed[index] for index in kept]
        queued = 0
        last: dict[Path, int] = {}  # a file's claim -> the sequence of the last of its updates put
        for index, update in _replay_order([updates for _, _, updates in taken], keyed):
            # As it was sent: under its launcher's session (or none), never the agent's.
            last[taken[index][0]] = put[id(update)] = self.updater.put_update(update, stamp_session=False)
            queued += 1
        for claimed, path, updates in taken:
            logger.info("replaying %d spooled job updates from %s", len(updates), path.name)
            if claimed in last:
                self._queued[claimed] = last[claimed]
            else:
                _drop_claim(claimed)
        self.replayed += queued
        return queued

    def _give_back_unqueued(self, claims: list[Path], taken: list[tuple[Path, Path, list[dict[str, Any]]]],
                            put: dict[int, int]) -> None:
        """After a poll failed: give back each of its ``claims`` still held and not queued, without
        the updates already put (their ids in ``put``: sent by the updater, or spooled by it at its
        close); a file all put is queued as it would have been."""
        updates_of = {claimed: updates for claimed, _, updates in taken}
        for claimed in claims:
            if claimed in self._queued or not holds_claim(claimed):
                continue  # queued, released or dropped already
            updates = updates_of.get(claimed, [])
            rest = [update for update in updates if id(update) not in put]
            if len(rest) == len(updates):
                release_spool_file(claimed)
            elif rest:
                release_spool_file(claimed, rest)
            else:
                self._queued[claimed] = max(put[id(update)] for update in updates)

    def _warn_unreadable(self, path: Path, exc: OSError) -> None:
        name = claimed_original(path).name if CLAIM_MARK in path.name else path.name
        if name in self._unreadable:
            logger.debug("still cannot read spooled updates %s: %s", name, exc)
            return
        self._unreadable.add(name)
        logger.warning("cannot read spooled updates %s (%s): its writer's later files wait for it; the "
                       "other files are replayed", name, exc)

    def _read_unsent(self, unsent: list[Path]) -> list[list[dict[str, Any]]]:
        """The updates of each of the ``unsent`` files (read, not claimed: another process may be
        sending it). One gone meanwhile was sent; one that cannot be read is left out: it holds back
        its own writer's later files only (they are unsent too)."""
        theirs = []
        for path in unsent:
            try:
                lines = _read_spool_file(path)
            except OSError as exc:
                self._warn_unreadable(path, exc)
                continue
            theirs.append(spooled_updates(path, lines or []))
        return theirs

    def _hold_back_later(self, taken: list[tuple[Path, Path, list[dict[str, Any]]]], keyed: _Keyed,
                         theirs: list[list[dict[str, Any]]], waited_for: set[Any]) -> list[int]:
        """The indices of the files of ``taken`` (in name order; ``keyed``: their keys,
        :func:`_key_files`, of every job in ``waited_for``) that may be sent now: each one with an
        update that follows one of its job's in ``theirs`` (the files not sent in this poll,
        :func:`_follows`) is given back, and so are the later files of its writer, whose updates may
        hold back others in turn.

        Linear: each update is keyed once per poll; a job's files are checked again only when its
        earliest update elsewhere moved earlier (a worklist of jobs). Checking every file again at
        each file given back took 8-14 s a poll at 10^5 updates."""
        if not waited_for:
            return list(range(len(taken)))
        holding: dict[Any, list[int]] = {}  # job -> the indices of the taken files with keyed updates of it
        latest: list[_Bounds] = []  # a taken file's index -> its latest keys (of the keyed jobs)
        for index, mine in enumerate(keyed):
            latest.append(_bounds(((key, update) for _, key, update in mine), first=False))
            for job in latest[index]:
                holding.setdefault(job, []).append(index)
        earliest: _Bounds = {}
        for updates in theirs:
            # Keyed per file, not carried across its writer's files: a key no later than the carried
            # one, which holds back at least as much.
            _lower(earliest, _bounds(_keyed(u for u in updates if _record_id(u) in waited_for), first=True))
        files_of: dict[str, list[int]] = {}  # writer -> the indices of its taken files, in name order
        for index, (_, path, _) in enumerate(taken):
            files_of.setdefault(_writer_of(path.name), []).append(index)
        place = {index: at for indices in files_of.values() for at, index in enumerate(indices)}
        cut = {writer: len(indices) for writer, indices in files_of.items()}  # its files from there on wait
        work = dict.fromkeys(job for job in earliest if job in holding)
        while work:
            job, _ = work.popitem()
            for index in holding[job]:
                writer = _writer_of(taken[index][1].name)
                if place[index] >= cut[writer] or not _follows(latest[index][job], earliest[job]):
                    continue  # given back already, or nothing to wait for
                for later in files_of[writer][place[index] : cut[writer]]:
                    claimed, path, _ = taken[later]
                    logger.info("spooled updates %s wait: an earlier update of one of their jobs is in a file not "
                                "sent yet (another process is sending it)", path.name)
                    release_spool_file(claimed)
                    held = ((key, update) for _, key, update in keyed[later])
                    work.update(dict.fromkeys(_lower(earliest, _bounds(held, first=True))))
                cut[writer] = place[index]
        return [index for index, (_, path, _) in enumerate(taken) if place[index] < cut[_writer_of(path.name)]]

    def release(self) -> None:
        """At the agent's stop, once its updater is closed: delete the files it sent (or spooled anew),
        give the others back under their own names for the next agent."""
        for claimed, sequence in list(self._queued.items()):
            if self.updater.done_through(sequence):
                _unhold(claimed)
                claimed.unlink(missing_ok=True)
            else:
                release_spool_file(claimed)
            del self._queued[claimed]
