"""The API models: Site, App, Job, BatchJob, Session, TransferItem, EventLog.

Fields are those of the records in :mod:`balsam.models`; filter and ordering names are those
of the Balsam 0.7 list routes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import operator
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

from balsam import models as records
from balsam.batch_job_rules import check_batch_job
from balsam.client.lease import acquire_request
from balsam.client.rest import APIError, new_idempotency_key
from balsam.util import paused_gc
from balsam.models import MAX_CHUNKS_PER_RESERVATION, MAX_JOBS_PER_SESSION_ACQUIRE
from balsam.states import DONE_STATES, RUNNABLE_STATES, BatchJobMode, BatchJobState, JobState

from . import codec
from .manager import Manager, ProgressFn, chunks
from .model import BalsamModel, structure_value

if TYPE_CHECKING:  # pragma: no cover
    from .app import ApplicationDefinition

logger = logging.getLogger(__name__)

__all__ = ["Site", "App", "Job", "BatchJob", "Session", "TransferItem", "EventLog", "JobWaitResult"]


# ====================================================================================== Site
class SiteManager(Manager["Site"]):
    pass


class Site(BalsamModel):
    _record_cls = records.Site
    _path = "/sites/"
    _manager_cls = SiteManager
    _field_checks = {"path": records.site_path_problem}
    _filters = frozenset({"name", "path", "id", "last_refresh_after"})
    _substring_filters = {"path": "path"}
    _positional = ("name", "path", "id", "last_refresh_after")
    #: ``objects.create()``'s positional fields: those Balsam 0.7's generated create() took first (the
    #: fields it required, in the order of its OpenAPI schema's ``required``); see Manager.create
    _create_positional = ("name", "path")
    _create_internal = frozenset({"backfill_windows", "queued_jobs"})  # the site agent's reports
    objects: SiteManager  # type: ignore[assignment]

    @classmethod
    def _first_positional(cls, value: Any) -> Optional[str]:
        # ``Site.objects.get(3)`` is the site of id 3 (0.7 read it as the name "3")
        return "id" if isinstance(value, int) and not isinstance(value, bool) else None

    if TYPE_CHECKING:  # pragma: no cover
        id: Optional[int]
        name: str
        path: Path
        last_refresh: Any


# ====================================================================================== App
class AppManager(Manager["App"]):
    pass


class App(BalsamModel):
    """The stored form of an ApplicationDefinition (use ApplicationDefinition to define apps)."""

    _record_cls = records.App
    _path = "/apps/"
    _manager_cls = AppManager
    _filters = frozenset({"site_id", "id", "name", "site_path", "site_name"})
    _positional = ("site_id", "id", "name", "site_path", "site_name")
    #: 0.7's required fields, in its order (see Site._create_positional)
    _create_positional = ("site_id", "name", "serialized_class", "source_code")
    objects: AppManager  # type: ignore[assignment]

    @classmethod
    def _first_positional(cls, value: Any) -> Optional[str]:
        # ``App.objects.get("Name")`` looks up by name (0.7 read it as a site_id); a number is a
        # site_id, as in 0.7
        return "name" if isinstance(value, str) and not value.isdecimal() else None

    if TYPE_CHECKING:  # pragma: no cover
        id: Optional[int]
        site_id: int
        name: str
        serialized_class: str
        parameters: dict


# ====================================================================================== Job
class JobWaitResult(NamedTuple):
    done: list["Job"]
    not_done: list["Job"]


class BulkCreateError(Exception):
    """``Job.objects.bulk_create`` of more than one chunk (5,000 jobs) failed part way.

    ``created``: the Job objects stored (complete and certain), in the order of the list given to
    ``bulk_create``: every job before the failed chunk, then those of any chunk sent beside it
    (side by side, PostgreSQL) whose answer came. ``not_created``: the other jobs, in the order of
    the list: those of the failed chunk (refused, or its answer never came), of a chunk beside it
    that got no answer either (it may be stored), and of the chunks not sent. The two lists do not
    overlap and together hold every job given. ``cause``: the error. ``resume()`` sends the chunks of
    ``not_created`` again and returns every job of the list, in its order; each of those chunks
    that was sent before is resent with the Idempotency-Key it had, so if the server did store it,
    it is not stored twice. (Sending ``not_created`` in a new ``bulk_create`` instead gives new keys:
    a job of it that was in fact stored would be stored twice.)
    """

    def __init__(self, manager: "JobManager", created: list["Job"], pending: list["_Chunk"], cause: BaseException,
                 total: int) -> None:
        # ``created``: the jobs before ``pending[0]``, the chunk that failed; a chunk of ``pending``
        # with ``stored`` set was answered beside it.
        self.manager = manager
        self.created = list(created) + [job for chunk in pending if chunk.stored is not None for job in chunk.stored]
        self.not_created = [job for chunk in pending if chunk.stored is None for job in chunk.jobs]
        self.cause = cause
        self._created_before = list(created)
        self._pending = pending
        groups = [created, *(chunk.stored for chunk in pending if chunk.stored is not None)]
        ranges = [f"{min(j.id for j in group)}..{max(j.id for j in group)}" for group in groups if group]
        stored = f"ids {', '.join(ranges)}" if ranges else "none"
        status = getattr(cause, "status_code", None)
        refused = isinstance(status, int) and 400 <= status < 500
        fate = "was refused" if refused else "got no answer (it may be stored: resume() finds out without duplicates)"
        super().__init__(
            f"bulk_create stored {len(self.created)} of {total} jobs ({stored}); the chunk of {len(pending[0].jobs)} "
            f"from item {len(created)} of the list {fate}; resume() sends the {len(self.not_created)} jobs not stored "
            f"(a chunk sent beside the failed one that got no answer either is resent with its Idempotency-Key, "
            f"never stored twice): {type(cause).__name__}: {cause}"
        )

    def resume(self, progress: ProgressFn = None) -> list["Job"]:
        """Send the jobs not stored yet; returns all created jobs (``created`` + the new ones), in
        the order of the list given to ``bulk_create``."""
        return self.manager._post_chunks(self._pending, list(self._created_before), progress)


class _Chunk:
    """One bulk POST: its jobs, their payloads (built when the chunk is first sent, then kept: a
    resent chunk must be the same request), its Idempotency-Key (None: not sent yet), and
    ``stored``: the Job objects of its answer when it was answered beside a chunk that failed (a
    resume does not send it again)."""

    __slots__ = ("jobs", "payloads", "key", "stored")

    def __init__(self, jobs: list["Job"], payloads: "list[dict[str, Any]] | None" = None,
                 key: Optional[str] = None) -> None:
        self.jobs = jobs
        self.payloads = payloads
        self.key = key
        self.stored: "list[Job] | None" = None

    def body(self) -> list[dict[str, Any]]:
        if self.payloads is None:
            self.payloads = [job._create_payload(omit_defaults=True) for job in self.jobs]
        return self.payloads


_PREFER_MINIMAL = {"Prefer": "return=minimal"}
#: The most chunks in flight at once, whatever the server says (its answer is 2 on PostgreSQL).
_MAX_IN_FLIGHT = 4
#: The clients whose server reserves nothing (SQLite, or a server without the route): their bulk
#: creates skip the reservation request.
_ONE_CHUNK_AT_A_TIME: "weakref.WeakSet[Any]" = weakref.WeakSet()


class JobManager(Manager["Job"]):
    has_bulk_patch = True
    has_query_update = True

    def bulk_create(self, objs: Iterable["Job"], progress: ProgressFn = None) -> list["Job"]:
        """Create jobs with one POST per ``bulk_chunk_size`` (5,000); returns the new Job objects.

        The given objects are left as they are (Balsam 0.7 behaviour): use the returned list.
        """
        # Listed before the checks: a generator (``bulk_create(Job(...) for i in ...)``) was used
        # up by them and nothing was created, silently.
        jobs = list(objs)
        for job in jobs:
            if not isinstance(job, Job):
                raise TypeError(f"bulk_create() takes Job objects, got {type(job).__name__}")
            if job._stored:
                raise ValueError(f"Job(id={job.id}) is already created")
            # Transfers set in place: parsed (or refused) before any request, not in a later chunk.
            job._parse_transfers_set_in_place()
        size = self.bulk_chunk_size
        chunks = [_Chunk(jobs[i : i + size]) for i in range(0, len(jobs), size)]
        try:
            return self._post_chunks(chunks, [], progress)
        except APIError as exc:
            # One request, refused as a whole (more chunks raise BulkCreateError): resent once
            # with fresh payloads when an app given by name had a stale cached id.
            if not _refresh_stale_app_names(jobs, exc):
                raise
            return self._post_chunks([_Chunk(jobs)], [], progress)

    def _post_chunks(self, chunks: list[_Chunk], created: list["Job"], progress: ProgressFn) -> list["Job"]:
        """POST the chunks, each with its own Idempotency-Key (the one it had if it was sent before),
        their ids in the order of the list. A server that reserves ids (PostgreSQL) gets two chunks
        side by side (:meth:`_post_side_by_side`); otherwise they go one after the other. A failure
        raises :class:`BulkCreateError` saying exactly what was stored."""
        total = len(created) + sum(len(chunk.jobs) for chunk in chunks)
        if len(chunks) > 1 and all(chunk.key is None for chunk in chunks) and self._client not in _ONE_CHUNK_AT_A_TIME:
            with concurrent.futures.ThreadPoolExecutor(_MAX_IN_FLIGHT, thread_name_prefix="balsam-bulk") as pool:
                reserving = pool.submit(self._reserve, chunks[:MAX_CHUNKS_PER_RESERVATION], created, chunks, total)
                chunks[0].body()  # built while the server reserves
                parallel = min(reserving.result(), _MAX_IN_FLIGHT)
                if parallel > 1:
                    return self._post_side_by_side(chunks, created, progress, parallel, total, pool)
        return self._post_one_by_one(chunks, created, progress, total)

    def _reserve(self, group: list[_Chunk], created: list["Job"], pending: list[_Chunk], total: int) -> int:
        """Reserve an Idempotency-Key with its job ids for each chunk of ``group`` (``POST
        /jobs/reservations``); returns how many chunks the server wants in flight. 1: nothing was
        reserved (SQLite, or a server without the route; remembered for this client)."""
        client = self._client
        try:
            answer = client.post(f"{Job._path}reservations", json={"sizes": [len(chunk.jobs) for chunk in group]})
        except APIError as exc:
            if exc.status_code in (404, 405):  # a server from before the route: one chunk at a time
                _ONE_CHUNK_AT_A_TIME.add(client)
                return 1
            if exc.status_code == 429:
                # The user's reservations not used yet are at the server's budget (other bulk
                # creates of theirs in flight, or abandoned): this create sends its chunks one
                # after the other, without reservation; the next one asks again.
                logger.info("bulk_create: no ids reserved (%s); sending the chunks one by one", exc.detail)
                return 1
            raise BulkCreateError(self, created, pending, exc, total) from exc
        except Exception as exc:
            raise BulkCreateError(self, created, pending, exc, total) from exc
        answer = answer if isinstance(answer, dict) else {}
        parallel = answer.get("parallel")
        reservations = answer.get("reservations")
        keys = [item.get("idempotency_key") if isinstance(item, dict) else None
                for item in (reservations if isinstance(reservations, list) else ())]
        if (not isinstance(parallel, int) or parallel <= 1 or len(keys) != len(group)
                or not all(isinstance(key, str) and key for key in keys)):
            _ONE_CHUNK_AT_A_TIME.add(client)  # nothing (usable) reserved: one chunk at a time
            return 1
        for chunk, key in zip(group, keys):
            chunk.key = key
        return parallel

    def _post_side_by_side(self, chunks: list[_Chunk], created: list["Job"], progress: ProgressFn, parallel: int,
                           total: int, pool: concurrent.futures.ThreadPoolExecutor) -> list["Job"]:
        """Up to ``parallel`` chunks in flight, each sent with its reserved key (so its jobs get the
        ids reserved for them: in the order of the list whatever the order the server stores the
        chunks in). The calling thread builds the next chunk's payloads and the Job objects of the
        answered ones, oldest first, while the server stores the others. When a chunk fails, the
        chunks still in flight are waited for: those answered are stored, and the error counts them
        as created; it names the failed chunk, those beside it without an answer and those not sent
        as not created (``resume()`` resends each sent one with its key: answered from it if stored)."""
        client = self._client
        created = list(created)
        in_flight: "collections.deque[tuple[int, concurrent.futures.Future]]" = collections.deque()
        reserved_until = min(len(chunks), MAX_CHUNKS_PER_RESERVATION)

        def collect_oldest() -> None:
            index, future = in_flight.popleft()
            chunk = chunks[index]
            try:
                data, headers = future.result()
                self._check_created(chunk, data)
            except Exception as exc:
                concurrent.futures.wait([other for _, other in in_flight])
                for other_index, other in in_flight:
                    # Answered: stored. Counted as not created, its jobs were stored twice when a
                    # user sent not_created again in a new bulk_create (new keys).
                    beside = chunks[other_index]
                    try:
                        other_data, other_headers = other.result()
                        self._check_created(beside, other_data)
                        beside.stored = self._created_jobs(beside, other_data,
                                                           other_headers.get("Preference-Applied", ""))
                    except Exception:  # no answer either: resume() resends it with its key
                        continue
                raise BulkCreateError(self, created, chunks[index:], exc, total) from exc
            created.extend(self._created_jobs(chunk, data, headers.get("Preference-Applied", "")))
            if progress:
                progress(len(created), total)

        for index, chunk in enumerate(chunks):
            if index == reserved_until:  # the next group of chunks: later reservations get higher ids
                group = chunks[index : index + MAX_CHUNKS_PER_RESERVATION]
                while in_flight:
                    collect_oldest()
                if self._reserve(group, created, chunks[index:], total) <= 1:
                    return self._post_one_by_one(chunks[index:], created, progress, total)
                reserved_until = index + len(group)
            while len(in_flight) >= parallel:
                collect_oldest()
            body = chunk.body()
            in_flight.append((index, pool.submit(client.request_with_headers, "POST", Job._path, json=body,
                                                 headers=_PREFER_MINIMAL, idempotency_key=chunk.key)))
        while in_flight:
            collect_oldest()
        return created

    def _post_one_by_one(self, chunks: list[_Chunk], created: list["Job"], progress: ProgressFn,
                         total: int) -> list["Job"]:
        """POST the chunks one after the other (so their ids follow the order of the list). While
        the server stores a chunk, a helper thread builds the payloads of the next one and the Job
        objects of the one before (the client's share of the work overlaps the server's)."""
        client = self._client
        created = list(created)
        # The Job objects of an answered chunk, being built by the helper: (its index, future).
        building: "tuple[int, concurrent.futures.Future] | None" = None

        def collect() -> None:
            nonlocal building
            if building is None:
                return
            index, future = building
            building = None
            try:
                created.extend(future.result())
            except Exception as exc:
                # That chunk is stored, and maybe the one after it: resume() resends both with
                # their keys, which the server answers with the jobs it made (no duplicates).
                raise BulkCreateError(self, created, chunks[index:], exc, total) from exc
            if progress:
                progress(len(created), total)

        with contextlib.ExitStack() as stack:
            helper = None
            if len(chunks) > 1:
                helper = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="balsam-bulk"))
            for index, chunk in enumerate(chunks):
                if chunk.stored is not None:  # a resume: answered beside the chunk that failed
                    collect()
                    created.extend(chunk.stored)
                    if progress:
                        progress(len(created), total)
                    continue
                body = chunk.body()
                last = index + 1 == len(chunks)
                next_body = helper.submit(chunks[index + 1].body) if helper and not last else None
                if chunk.key is None:
                    chunk.key = new_idempotency_key()
                try:
                    data, headers = client.request_with_headers(
                        "POST", Job._path, json=body, headers=_PREFER_MINIMAL, idempotency_key=chunk.key)
                    self._check_created(chunk, data)
                except Exception as exc:
                    collect()
                    if total <= self.bulk_chunk_size:
                        raise  # one request: it was applied entirely or not at all
                    if next_body is not None:
                        next_body.result()
                    # The failed chunk keeps its key and body (resent as the same request).
                    raise BulkCreateError(self, created, chunks[index:], exc, total) from exc
                collect()
                applied = headers.get("Preference-Applied", "")
                if helper is not None and not last:
                    # Queued behind the next chunk's payloads: that chunk is sent first.
                    building = (index, helper.submit(self._created_jobs, chunk, data, applied))
                else:
                    created.extend(self._created_jobs(chunk, data, applied))
                    if progress:
                        progress(len(created), total)
                if next_body is not None:
                    next_body.result()
            collect()
        return created

    @staticmethod
    def _check_created(chunk: _Chunk, data: Any) -> None:
        """The answer to a chunk is one object per job sent (else ValueError)."""
        if not isinstance(data, list) or len(data) != len(chunk.body()):
            raise ValueError(f"unexpected bulk-create response from the server: {str(data)[:200]}")
        for row in data:
            if not isinstance(row, dict):
                raise ValueError(f"unexpected bulk-create response from the server: {str(row)[:200]}")

    def _created_jobs(self, chunk: _Chunk, data: Any, applied: str) -> list["Job"]:
        """The new Job objects of one chunk: from the server's ``{id, state, last_update}`` per job
        and the payloads sent (``Prefer: return=minimal``), or from the full records (a server that
        does not honour the preference)."""
        payloads = chunk.body()  # data: checked by _check_created
        model = self._model
        with paused_gc():
            if applied.strip().lower() != "return=minimal":
                return model._from_api_many(data)
            defaults = model._wire_defaults()
            records = []
            for payload, row in zip(payloads, data):
                raw = defaults.copy()
                raw.update(payload)
                raw.pop("transfers", None)  # as in the server's records: a job's transfers are TransferItems
                raw.update(row)
                records.append(raw)
            return model._from_api_many(records)

    def bulk_refresh(self, jobs: Iterable["Job"]) -> None:
        """Re-read many jobs with one request per 500 ids (jobs deleted meanwhile are left as they were)."""
        self._refresh_many(jobs)

    def _refresh_many(self, jobs: Iterable["Job"]) -> list["Job"]:
        """:meth:`bulk_refresh`, returning the jobs that no longer exist."""
        jobs = list(jobs)  # read twice below: a generator would refresh nothing
        ids = [job.id for job in jobs if job.id is not None]
        if not ids:
            return []
        fresh = {j.id: j for j in self.filter(id=ids)}
        gone = []
        for job in jobs:
            if job.id in fresh:
                job._adopt(fresh[job.id])
            elif job.id is not None:
                gone.append(job)
        return gone

    def _poll(self, pending: Sequence["Job"]) -> None:
        """Refresh the pending jobs; those deleted meanwhile are marked so (see :func:`_completed`)."""
        for job in self._refresh_many(pending):
            # Like a cancelled future: completed, with no result (``result()`` says it was deleted).
            # Left pending, it kept wait() and result() without a timeout polling for ever.
            job._deleted = True

    def wait(
        self,
        jobs: Iterable["Job"],
        timeout: Optional[float] = None,
        poll_interval: float = 1.0,
        return_when: str = "ALL_COMPLETED",
    ) -> JobWaitResult:
        """Block until the jobs are done (JOB_FINISHED or FAILED), like ``concurrent.futures.wait``.

        ``return_when`` is ``"ALL_COMPLETED"`` or ``"FIRST_COMPLETED"``. Returns ``(done, not_done)``;
        on timeout the jobs still pending are in ``not_done`` (no exception). A job deleted
        meanwhile is done, as a cancelled future is: its ``result()`` raises ``Job.NoResult``.
        """
        if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED"):
            raise ValueError("return_when must be 'ALL_COMPLETED' or 'FIRST_COMPLETED'")
        jobs = list(jobs)
        _require_saved(jobs)
        deadline = None if timeout is None else time.monotonic() + timeout
        report = _WaitReport(self, len(jobs))
        while True:
            self._poll([j for j in jobs if not _completed(j)])
            done = [j for j in jobs if _completed(j)]
            not_done = [j for j in jobs if not _completed(j)]
            if not not_done or (return_when == "FIRST_COMPLETED" and done):
                return JobWaitResult(done, not_done)
            report(not_done)
            if deadline is not None and time.monotonic() >= deadline:
                return JobWaitResult(done, not_done)
            sleep = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic()))
            time.sleep(sleep)

    def as_completed(
        self, jobs: Iterable["Job"], timeout: Optional[float] = None, poll_interval: float = 1.0
    ) -> Iterator["Job"]:
        """Yield each job as it completes (or is deleted, see :meth:`wait`);
        ``concurrent.futures.TimeoutError`` if some are left at the timeout."""
        # Checked here, not in the generator: its body would run (and raise) only at the first
        # next(), away from the call that was wrong.
        pending = list(jobs)
        _require_saved(pending)
        return self._as_completed(pending, timeout, poll_interval)

    def _as_completed(self, pending: list["Job"], timeout: Optional[float], poll_interval: float) -> Iterator["Job"]:
        total = len(pending)
        deadline = None if timeout is None else time.monotonic() + timeout
        report = _WaitReport(self, total)
        while pending:
            self._poll(pending)
            still = []
            for job in pending:
                if _completed(job):
                    yield job
                else:
                    still.append(job)
            pending = still
            if not pending:
                return
            report(pending)
            if deadline is not None and time.monotonic() >= deadline:
                raise concurrent.futures.TimeoutError(_not_completed_message(pending, total, timeout))
            sleep = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic()))
            time.sleep(sleep)

    def _delete_query(self, query: Any) -> Optional[int]:
        # One bulk DELETE with the filters. The server skips the matching jobs RUNNING in a launcher
        # (named in its Balsam-Skipped-Running header: Query.delete warns) and deletes the others.
        if query._empty:
            return 0
        client = self._client
        if query._sliced or len(query._chunked_params()) > 1:
            ids = query._ids()
            deleted = 0
            for chunk in chunks(ids, query.filter_chunk_size):
                result = client.delete(Job._path, params={"id": list(chunk)})
                deleted += result if isinstance(result, int) else len(chunk)
            return deleted
        result = client.delete(Job._path, params=query._params)
        return result if isinstance(result, int) else None


def _require_saved(jobs: Sequence["Job"]) -> None:
    """A job never saved has no id to poll: wait() and result() (without a timeout) polled it for
    ever. The usual cause is waiting on the objects given to bulk_create(), which stay unsaved (as
    in 0.7): the message says so. AttributeError, as done() and refresh_from_db() raise for it."""
    unsaved = [job for job in jobs if job.id is None and not job._deleted]
    if unsaved:
        raise AttributeError(
            f"cannot wait for {len(unsaved)} Job(s) never saved (the first: workdir={str(unsaved[0].workdir)!r}): "
            "save() them, or use the list Job.objects.bulk_create() returns (it leaves the objects given unsaved)")


def _completed(job: "Job") -> bool:
    """Done (JOB_FINISHED or FAILED), or deleted: what wait() and as_completed() wait for."""
    return job.state in DONE_STATES or job._deleted


#: What a job in these states waits for, named in as_completed()'s timeout. "3 of 3 jobs not
#: completed in 600 s" alone left a user whose BatchJob the site had refused (a queue not in
#: allowed_queues) waiting out the whole timeout with nothing to say which part was missing.
_WAITS_FOR = (
    (("PREPROCESSED", "RESTART_READY"),
     "wait for a launcher: a BatchJob of their site, queued or running (`balsam queue ls --history` "
     "says why one ended or was refused)"),
    (("STAGED_IN", "RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT"),
     "wait for the site agent (`balsam site status` in the site directory)"),
    (("AWAITING_PARENTS",), "wait for their parents (`balsam job show ID`)"),
)


def _not_completed_message(pending: Sequence["Job"], total: int, timeout: Optional[float]) -> str:
    """One line: how many jobs are left, their states (as last read: no request) and what they wait for."""
    counts = collections.Counter(getattr(job.state, "value", job.state) for job in pending)
    states = ", ".join(f"{n} {state}" for state, n in counts.most_common())
    return f"{len(pending)} of {total} jobs not completed in {timeout} s: {'; '.join([states] + _waits_for(counts))}"


#: Seconds between the lines that wait(), as_completed() and result() log while jobs stay pending
#: (the first after as long): INFO, or WARNING when a FAILED ancestor holds some of them (they
#: run only once it is re-run). Without them a wait with no timeout on a child of a FAILED parent
#: polled for ever and said nothing.
WAIT_REPORT_INTERVAL_S = 600.0
#: The generations of ancestors of AWAITING_PARENTS jobs a report reads (one bulk read each, of
#: those FAILED or AWAITING_PARENTS) to find FAILED ones: a grandchild of a FAILED job waits too.
WAIT_REPORT_ANCESTOR_LEVELS = 8
#: The AWAITING_PARENTS jobs whose ancestors one report walks: the next ones (by id) at each report,
#: in turn, when more wait. And the ancestor ids one report reads at most. A wait on 12,500 leaves
#: of 8-deep chains read ~100,000 rows in ~200 GETs per report (~12 s, inside the poll loop:
#: as_completed() yielded that late); now at most 5,000 ids (~20 GETs), the report saying so.
WAIT_REPORT_ANCESTOR_JOBS = 500
WAIT_REPORT_ANCESTOR_IDS = 5000


class _WaitReport:
    """``report(pending)`` at each poll of a wait: every :data:`WAIT_REPORT_INTERVAL_S`, one line of
    how many jobs are pending, their states (as just read), what they wait for, and the FAILED
    ancestors holding AWAITING_PARENTS ones (bulk reads of their ancestors, then only)."""

    def __init__(self, manager: "JobManager", total: int) -> None:
        self._manager = manager
        self._total = total
        self._start = time.monotonic()
        self._due = self._start + WAIT_REPORT_INTERVAL_S
        #: Where the next report's turn of AWAITING_PARENTS jobs starts (their ids sorted).
        self._turn = 0

    def __call__(self, pending: Sequence["Job"]) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + WAIT_REPORT_INTERVAL_S
        counts = collections.Counter(getattr(job.state, "value", job.state) for job in pending)
        states = ", ".join(f"{n} {state}" for state, n in counts.most_common())
        held, warn = self._failed_ancestors(pending)
        # A long wait is no fault (a 6 h result() logged 36 WARNINGs): INFO. Jobs held by a FAILED
        # ancestor (or whose ancestors could not be read) never finish by waiting: WARNING.
        logger.log(logging.WARNING if warn else logging.INFO, "still waiting after %.0f s for %d of %d jobs: %s",
                   now - self._start, len(pending), self._total, "; ".join([states] + _waits_for(counts) + held))

    def _failed_ancestors(self, pending: Sequence["Job"]) -> tuple[list[str], bool]:
        """The phrases on FAILED ancestors for the report, and whether they are a WARNING."""
        awaiting = sorted((job for job in pending if job.state == JobState.awaiting_parents), key=lambda job: job.id)
        # A bounded turn of them (the next ones at each report): see WAIT_REPORT_ANCESTOR_JOBS.
        start = self._turn % len(awaiting) if awaiting else 0
        turn = (awaiting[start:] + awaiting[:start])[:WAIT_REPORT_ANCESTOR_JOBS]
        self._turn = start + len(turn)
        # parent_ids read without taking a snapshot (_peek): this may run in another thread than
        # the user's save() of the same job, which iterates the snapshots.
        parents_of: dict[Any, set[int]] = {job.id: set(job._peek("parent_ids")) for job in turn}
        waiting = list(parents_of)
        failed: set[int] = set()
        seen = set(parents_of)
        unread: set[int] = set().union(*parents_of.values()) - seen
        budget = WAIT_REPORT_ANCESTOR_IDS
        capped = False
        for _ in range(WAIT_REPORT_ANCESTOR_LEVELS):
            if not unread or not budget:
                capped = capped or bool(unread)
                break
            # Within WAIT_REPORT_ANCESTOR_IDS: the lowest ids; the rest are not read by this report.
            ids = sorted(unread)
            capped = capped or len(ids) > budget
            ids = ids[:budget]
            budget -= len(ids)
            seen.update(ids)
            try:
                rows = list(self._manager.filter(id=ids, state=["FAILED", "AWAITING_PARENTS"]))
            except Exception as exc:  # noqa: BLE001 - a report never ends the wait it describes
                why = (str(exc).splitlines() or [type(exc).__name__])[0]
                return [f"(their parents could not be read: {why})"], True
            unread = set()
            for row in rows:
                if row.state == JobState.failed:
                    failed.add(row.id)
                else:
                    parents_of[row.id] = set(row._peek("parent_ids"))
                    unread |= parents_of[row.id] - seen
        partial = len(turn) < len(awaiting) or capped
        checked = (f"(ancestors of {len(turn)} of the {len(awaiting)} AWAITING_PARENTS jobs checked"
                   + (f", up to {WAIT_REPORT_ANCESTOR_IDS} ancestors)" if capped else ")"))
        if not failed:
            return ([f"no FAILED ancestor found {checked}"] if partial else []), False
        # The jobs a FAILED one holds: its descendants among those read (children found from it).
        children: dict[int, list[int]] = collections.defaultdict(list)
        for child, parents in parents_of.items():
            for parent in parents:
                children[parent].append(child)
        held: set[int] = set()
        frontier = list(failed)
        while frontier:
            for child in children.get(frontier.pop(), ()):
                if child not in held:
                    held.add(child)
                    frontier.append(child)
        blocked = [i for i in waiting if i in held]
        if not blocked:
            return ([f"no FAILED ancestor found {checked}"] if partial else []), False
        whom = "parent" if all(parents_of[i] & failed for i in blocked) else "parent or earlier ancestor"
        ids = " ".join(f"-i {p}" for p in sorted(failed)[:5]) + (" ..." if len(failed) > 5 else "")
        return [f"{len(blocked)} of them wait for a FAILED {whom}, which keeps them waiting until it is re-run "
                f"(`balsam job modify {ids} -s RESTART_READY`)" + (f" {checked}" if partial else "")], True


def _waits_for(states: Iterable[str]) -> list[str]:
    """What jobs in these states wait for, one phrase per kind (none for RUNNING and the like)."""
    present = set(states)
    return ["/".join(s for s in group if s in present) + " " + hint
            for group, hint in _WAITS_FOR if present.intersection(group)]


_app_id_cache_lock = threading.Lock()
#: App ids looked up by name for ``Job(app_id="Name")``: (api_root, username, site_name, name) -> id
_app_name_to_id: dict[tuple[str, Optional[str], Optional[str], str], int] = {}


def forget_app_name(api_root: str, name: str) -> None:
    """Drop the cached ids of the apps named ``name`` on the server at ``api_root`` (looked up
    again on next use): ApplicationDefinition.sync() calls it, as the id may have changed."""
    with _app_id_cache_lock:
        for key in [k for k in _app_name_to_id if k[0] == api_root and k[3] == name]:
            del _app_name_to_id[key]


def _refresh_stale_app_names(jobs: Sequence["Job"], exc: BaseException) -> bool:
    """After a create refused with "App not found": look up again (one request per name) the
    apps of the jobs given by name, whose cached id may be stale (the app deleted and synced again
    by another process). True if any job's app id changed (then the create is worth resending)."""
    if not (isinstance(exc, APIError) and exc.status_code == 404 and str(exc.detail).startswith("App not found")):
        return False
    by_name: dict[tuple[str, Optional[str]], list["Job"]] = {}
    for job in jobs:
        ref = job.__dict__.get("_app_name")
        if ref is not None:
            by_name.setdefault(ref, []).append(job)
    changed = False
    for (name, site_name), group in by_name.items():
        model = type(group[0])
        forget_app_name(model._get_client().api_root, name)
        fresh = model._app_id_by_name(name, site_name)
        for job in group:
            if job.app_id != fresh:
                job.app_id = fresh
                changed = True
    return changed


class Job(BalsamModel):
    """One run of an app. Python-app jobs behave like futures: ``result()``, ``done()``."""

    _record_cls = records.Job
    _path = "/jobs/"
    _manager_cls = JobManager
    _field_checks = {"workdir": records.workdir_problem}
    _filters = frozenset(
        {
            "id", "parent_id", "app_id", "site_id", "batch_job_id", "last_update_before", "last_update_after",
            "workdir__contains", "state__ne", "state", "tags", "pending_file_cleanup",
        }
    )
    _orderings = frozenset({"last_update", "id", "state", "workdir"})
    _positional = ("id", "parent_id", "app_id", "site_id", "batch_job_id", "last_update_before", "last_update_after",
                   "workdir__contains", "state__ne", "state", "tags", "pending_file_cleanup")
    #: 0.7's required fields, in its order (see Site._create_positional)
    _create_positional = ("workdir", "app_id")
    # parameters= sets serialized_parameters; the rest are the launcher's and the server's
    _create_internal = frozenset({"serialized_parameters", "serialized_return_value", "serialized_exception",
                                  "state", "pending_file_cleanup", "batch_job_id", "return_code"})
    _reset_after_save = ("state_timestamp", "state_data")
    _create_as_list = True
    objects: JobManager  # type: ignore[assignment]

    if TYPE_CHECKING:  # pragma: no cover
        id: Optional[int]
        workdir: Path
        app_id: int
        tags: dict[str, str]
        data: dict[str, Any]
        state: Optional[JobState]
        state_data: dict[str, Any]
        parent_ids: set[int]
        num_nodes: int
        ranks_per_node: int
        threads_per_rank: int
        node_packing_count: int
        batch_job_id: Optional[int]
        serialized_parameters: str
        serialized_return_value: str
        serialized_exception: str
        return_code: Optional[int]

    class NoResult(ValueError):
        """The job has no return value (yet): it is not done, or is not a run() app. A ValueError,
        as in Balsam 0.7, so its callers' ``except ValueError`` still catches it."""

    def __init__(
        self,
        workdir: Union[str, Path, None] = None,
        app_id: Union[int, str, type, None] = None,
        *more: Any,
        site_name: Optional[str] = None,
        parameters: Optional[dict[str, Any]] = None,
        transfers: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if more:  # the error BalsamModel.__init__ gives, naming the keywords, not Python's bare count
            self._positional_fields((workdir, app_id, *more), kwargs, "Job()")
        if workdir is None:
            raise TypeError("Job() missing required field: workdir")
        if app_id is None:
            raise TypeError("Job() missing required field: app_id (an app id, app name or ApplicationDefinition)")
        kwargs["workdir"] = workdir
        kwargs["app_id"] = self._resolve_app_id(app_id, site_name)
        by_name = isinstance(app_id, str) and not app_id.isdecimal()
        if transfers:
            kwargs["transfers"] = {slot: _parse_transfer(slot, item) for slot, item in transfers.items()}
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise TypeError(f"Job parameters must be a dict, got {type(parameters).__name__}")
            kwargs["serialized_parameters"] = _serialize_parameters(parameters)
        super().__init__(**kwargs)
        if by_name:
            # The id came from a cache of names: a create refused with "App not found" looks again.
            self.__dict__["_app_name"] = (app_id, site_name)

    def save(self) -> None:
        if self._stored or self._deleted:
            super().save()
            return
        try:
            super().save()
        except APIError as exc:
            if not _refresh_stale_app_names([self], exc):
                raise
            super().save()

    @classmethod
    def _resolve_app_id(cls, app_id: Any, site_name: Optional[str]) -> int:
        from .app import ApplicationDefinition

        if isinstance(app_id, bool):
            raise TypeError("Job app_id must be an app id, app name or ApplicationDefinition")
        if isinstance(app_id, int):
            return app_id
        if hasattr(type(app_id), "__index__") and not isinstance(app_id, type):
            return operator.index(app_id)  # numpy's int64 ..., as Balsam 0.7 took it
        if isinstance(app_id, type) and issubclass(app_id, ApplicationDefinition):
            if codec.app_id_of(app_id) is None:
                app_id.sync()
            resolved = codec.app_id_of(app_id)
            assert resolved is not None
            return int(resolved)
        if isinstance(app_id, App):
            if app_id.id is None:
                raise ValueError("the App has no id: save it first")
            return app_id.id
        if isinstance(app_id, str):
            if app_id.isdecimal():
                return int(app_id)
            return cls._app_id_by_name(app_id, site_name)
        raise TypeError(f"Job app_id must be an app id, app name or ApplicationDefinition, got {type(app_id).__name__}")

    @classmethod
    def _app_id_by_name(cls, name: str, site_name: Optional[str]) -> int:
        client = cls._get_client()
        key = (client.api_root, client.username, site_name, name)
        with _app_id_cache_lock:
            if key in _app_name_to_id:
                return _app_name_to_id[key]
        AppModel = cls._model_for("App")
        lookup: dict[str, Any] = {"name": name}
        if site_name:
            lookup["site_name"] = site_name
        from .app import _either  # both App.DoesNotExist (what 0.7 raised) and ValueError

        try:
            app = AppModel.objects.get(**lookup)
        except AppModel.DoesNotExist:
            # A misspelt site_name is not cured by a sync() (it would fail on the same name): say
            # which of the two names is wrong. One more request, on this error path only.
            SiteModel = cls._model_for("Site")
            if site_name and not SiteModel.objects.filter(name=site_name).count():
                raise _either(AppModel.DoesNotExist,
                              f"no site named {site_name!r} (site_name= of app {name!r}; see `balsam site ls`)") from None
            where = f" at site {site_name!r}" if site_name else ""
            raise _either(AppModel.DoesNotExist,
                          f"no app named {name!r}{where}: sync() its ApplicationDefinition first") from None
        except AppModel.MultipleObjectsReturned:
            raise _either(AppModel.MultipleObjectsReturned,
                          f"several sites have an app named {name!r}: pass site_name= to choose one") from None
        with _app_id_cache_lock:
            _app_name_to_id[key] = app.id
        return app.id

    # ------------------------------------------------------------------ parameters
    def get_parameters(self) -> dict[str, Any]:
        payload = self.serialized_parameters
        if not payload:
            return {}
        cached = self.__dict__.get("_params_cache")
        if cached is not None and cached[0] == payload:
            return cached[1]
        params = self._decode_parameters()
        try:
            # The decoded objects written again now, before any change: what an unchanged dict
            # serializes to here. A second decode is no baseline: a set of objects hashed by id
            # iterates in another order there, and a job only read was reported changed.
            baseline: Optional[str] = codec.serialize(params)
        except codec.SerializeError:
            baseline = None
        self.__dict__["_params_cache"] = (payload, params, baseline)
        return params

    def _decode_parameters(self) -> dict[str, Any]:
        """The parameters decoded afresh, not kept: the python runner's ``run(**params)`` gets
        these, so that a run() consuming its arguments and saving ``self.job`` (progress in
        ``data``) leaves the stored parameters as they were (a re-run starts from them)."""
        payload = self.serialized_parameters
        if not payload:
            return {}
        try:
            return codec.deserialize(payload)
        except codec.DeserializeError as exc:
            raise codec.DeserializeError(f"Job(id={self.id}, workdir={str(self.workdir)!r}): cannot read its "
                                         f"parameters here: {exc}") from None

    def set_parameters(self, parameters: dict[str, Any]) -> None:
        if not isinstance(parameters, dict):
            raise TypeError(f"Job parameters must be a dict, got {type(parameters).__name__}")
        self.serialized_parameters = _serialize_parameters(parameters)

    parameters = property(get_parameters, set_parameters, doc="The app parameters (stored dill+base64).")

    def _store_parameters_changed_in_place(self) -> None:
        """``job.parameters["n"] = 2`` changes the dict ``get_parameters`` keeps: serialize it again
        into ``serialized_parameters`` where it differs (as in-place changes of ``data`` are sent),
        so that save(), bulk_update() and bulk_create() send it; they sent the old value before."""
        cached = self.__dict__.get("_params_cache")
        if cached is None:
            return
        payload, params, baseline = cached
        if payload != self.serialized_parameters:
            return  # replaced since: the kept dict is no longer the job's
        try:
            new = codec.serialize(params)
        except codec.SerializeError as exc:
            raise codec.SerializeError(f"Job(id={self.id}, workdir={str(self.workdir)!r}): cannot store its "
                                       f"parameters: {exc}") from None
        # An unchanged dict may serialize to other bytes than a payload another client wrote (0.7's
        # dill): compared with the same objects written when decoded before calling it changed.
        if new == payload or new == baseline:
            return
        self.serialized_parameters = new
        self.__dict__["_params_cache"] = (new, params, new)

    def _changed_fields(self) -> set[str]:
        self._store_parameters_changed_in_place()
        return super()._changed_fields()

    def _create_payload(self, *, omit_defaults: bool = False) -> dict[str, Any]:
        self._store_parameters_changed_in_place()
        self._parse_transfers_set_in_place()
        return super()._create_payload(omit_defaults=omit_defaults)

    def __reduce__(self) -> tuple:
        self._store_parameters_changed_in_place()  # an unsaved job's too: the copy has no decoded dict
        if not self._stored:
            self._parse_transfers_set_in_place()
        return super().__reduce__()

    def _set_field(self, key: str, value: Any) -> None:
        if key == "transfers" and isinstance(value, dict) and not self._stored:
            # As the constructor takes them: ``job.transfers = {"inp": "laptop:/data/in.txt"}``
            value = {slot: _parse_transfer(slot, item) for slot, item in value.items()}
        super()._set_field(key, value)

    def _parse_transfers_set_in_place(self) -> None:
        """Items put in ``transfers`` in place on a job not created yet (``job.transfers["inp"] =
        "laptop:/data/in.txt"``, or a dict) taken as the constructor takes them; one that is
        neither raises ValueError naming the job and the slot (it was an AttributeError from the
        encoder, in the middle of a bulk_create)."""
        transfers = self._record.transfers
        if not transfers or all(type(item) is records.JobTransferItem for item in transfers.values()):
            return
        for slot, item in list(transfers.items()):
            if type(item) is not records.JobTransferItem:
                try:
                    item = _parse_transfer(slot, item)
                    transfers[slot] = structure_value("Job", f"transfers[{slot!r}]", item, records.JobTransferItem)
                except ValueError as exc:
                    raise ValueError(f"Job(workdir={str(self.workdir)!r}): {exc}") from None

    def _load(self, data: Any) -> None:
        # The record read again (refresh_from_db, a save's answer): parameters changed in place
        # and not saved are dropped with the other unsaved changes, not kept in the decoded copy.
        self.__dict__.pop("_params_cache", None)
        super()._load(data)

    def _adopt(self, other: "BalsamModel") -> None:
        self.__dict__.pop("_params_cache", None)
        super()._adopt(other)

    # ------------------------------------------------------------------ relations
    @property
    def app(self) -> "type[ApplicationDefinition]":
        """The job's ApplicationDefinition class (loaded from the API, cached)."""
        from .app import ApplicationDefinition

        return ApplicationDefinition._load_by_id_with(self._model_for("App"), self.app_id)

    @property
    def site_id(self) -> int:
        """The site of the job's app. An app never moves to another site (the server refuses it),
        so the answer is kept per app for this client: reading ``site_id`` over a listing of jobs
        costs one GET per app, not one per job."""
        app_model = self._model_for("App")
        known = app_model.__dict__.get("_site_of_app")
        if known is None:  # one table per client's App class (not inherited from the unbound one)
            known = {}
            setattr(app_model, "_site_of_app", known)
        site_id = known.get(self.app_id)
        if site_id is None:
            site_id = known[self.app_id] = app_model.objects.get(id=self.app_id).site_id
        return site_id

    @property
    def working_directory(self) -> Path:
        """Alias of ``workdir`` (relative to the site's ``data/``)."""
        return self.workdir

    def resolve_workdir(self, data_path: Union[str, Path]) -> Path:
        return Path(data_path) / self.workdir

    def parent_query(self) -> Any:
        return type(self).objects.filter(id=sorted(self.parent_ids))

    def history(self) -> Any:
        """This job's state changes (EventLog query, newest first)."""
        return self._model_for("EventLog").objects.filter(job_id=self.id)

    # ------------------------------------------------------------------ futures API
    def done(self) -> bool:
        """Refresh from the API; True once the job is JOB_FINISHED or FAILED."""
        self.refresh_from_db()
        return self.state in DONE_STATES

    def result_nowait(self) -> Any:
        """The run() return value, re-raising the run() exception; ``Job.NoResult`` if neither exists.

        A re-raised exception carries a note naming this job (shown under its traceback): in a
        driver that reads hundreds of results, the exception alone does not say which job raised."""
        if self.serialized_exception:
            exc = codec.deserialize_exception(self.serialized_exception)
            if not isinstance(exc, Exception):
                # A SystemExit stored by an earlier runner (it serialized any BaseException):
                # raised here it would slip past the caller's ``except Exception`` and end the
                # driver script. The runner now stores only Exceptions.
                exc = codec.RemoteException(f"{type(exc).__name__}: {exc}").with_traceback(exc.__traceback__)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"raised by run() of Job(id={self.id}, workdir={str(self.workdir)!r}); its output "
                             f"is job.out in that workdir (`balsam job show {self.id}`)")
            raise exc
        if self.serialized_return_value:
            try:
                return codec.deserialize(self.serialized_return_value)
            except codec.DeserializeError as exc:
                # Typically a class of a module the compute node has and this Python lacks (a
                # torch tensor, a pandas frame): say which job, and what to do.
                raise codec.DeserializeError(
                    f"Job(id={self.id}, workdir={str(self.workdir)!r}): cannot read the return value of run() "
                    f"here: {exc} (install what it needs in this Python, or return plain data)") from None
        raise self.NoResult(self._no_result_message())

    def _no_result_message(self, reason: Optional[str] = None) -> str:
        state = getattr(self.state, "value", self.state)
        if self._deleted:
            return f"Job(id={self.id}, workdir={str(self.workdir)!r}) was deleted in state {state}: it has no result"
        head = f"Job(id={self.id}, workdir={str(self.workdir)!r}) in state {state} has no result"
        if self.state not in DONE_STATES:
            return f"{head} yet"
        if self.state == JobState.job_finished:
            return f"{head}: it is not a run() app, or its run() ended with sys.exit()"
        # FAILED without a result: run() never reported (the app did not load on the site, the
        # process was killed or ended with sys.exit(), a hook failed): say where the reason is.
        where = f"see `balsam job show {self.id}`, job.history() and job.out in its workdir"
        if reason:
            return f"{head}: run() did not report one; the failure: {reason} ({where})"
        return f"{head}: run() did not report one ({where})"

    def _failure_reason(self) -> Optional[str]:
        """The reason the newest events of this job give for its failure (one request), shortened."""
        for event in self.history()[:5]:
            data = event.data or {}
            text = str(data.get("error") or data.get("message") or "").strip()
            if text:
                lines = text.splitlines()[-5:]
                text = " | ".join(line.strip() for line in lines if line.strip())
                return text if len(text) <= 1000 else "..." + text[-997:]
        return None

    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait until the job is done, then ``result_nowait()``; ``concurrent.futures.TimeoutError`` on timeout.

        A job FAILED without a result raises ``Job.NoResult`` with the reason its events give
        (one more request, only then)."""
        waited = type(self).objects.wait([self], timeout=timeout)
        if waited.not_done:
            state = getattr(self.state, "value", self.state)
            waits = "".join(f"; {hint}" for hint in _waits_for([state]))
            raise concurrent.futures.TimeoutError(
                f"Job(id={self.id}) not done after {timeout} s (state {state}{waits})")
        if (self.state == JobState.failed and not self._deleted and not self.serialized_exception
                and not self.serialized_return_value):
            raise self.NoResult(self._no_result_message(self._failure_reason()))
        return self.result_nowait()


def _serialize_parameters(parameters: dict[str, Any]) -> str:
    """``codec.serialize(parameters)``; its error names the parameter that cannot be serialized
    ("cannot serialize dict: TypeError: cannot pickle 'generator' object" named none: a submit()
    of twenty parameters left the user to find which). Each is tried alone on that path only."""
    try:
        return codec.serialize(parameters)
    except codec.SerializeError:
        for key, value in parameters.items():
            try:
                codec.serialize(value)
            except codec.SerializeError as exc:
                raise codec.SerializeError(f"Job parameter {key!r} cannot be serialized: {exc}") from None
        raise


def _parse_transfer(slot: str, item: Any) -> Any:
    """``"alias:/abs/path"`` or ``{"location_alias":..., "path":...}`` -> JobTransferItem."""
    if isinstance(item, records.JobTransferItem):
        return item
    if isinstance(item, str):
        alias, sep, path = item.partition(":")
        if not sep or not alias or not path:
            raise ValueError(f"transfer {slot}={item!r}: expected 'location_alias:/absolute/path'")
        return {"location_alias": alias, "path": path}
    if isinstance(item, dict):
        return item
    raise ValueError(f"transfer {slot}: expected 'alias:/path' or a dict, got {type(item).__name__}")


# ====================================================================================== BatchJob
class BatchJobManager(Manager["BatchJob"]):
    has_bulk_patch = True


class BatchJob(BalsamModel):
    """A request for an allocation: the site agent submits it to the scheduler."""

    _record_cls = records.BatchJob
    _path = "/batch-jobs/"
    _manager_cls = BatchJobManager
    _filters = frozenset(
        {
            "id", "site_id", "state", "scheduler_id", "queue", "start_time_before", "start_time_after",
            "end_time_before", "end_time_after", "filter_tags",
        }
    )
    _orderings = frozenset({"start_time", "id"})
    _desc_ties_by_id_desc = False  # the server's -start_time: start_time descending, then id ascending
    _positional = ("id", "site_id", "state", "scheduler_id", "queue", "start_time_before", "start_time_after",
                   "end_time_before", "end_time_after", "filter_tags")
    #: 0.7's required fields, in its order (see Site._create_positional)
    _create_positional = ("num_nodes", "wall_time_min", "job_mode", "site_id", "project", "queue")
    _create_internal = frozenset({"scheduler_id", "state", "status_info", "start_time", "end_time"})  # the agent's
    objects: BatchJobManager  # type: ignore[assignment]

    if TYPE_CHECKING:  # pragma: no cover
        id: Optional[int]
        site_id: int
        project: str
        queue: str
        num_nodes: int
        wall_time_min: int
        job_mode: BatchJobMode
        state: BatchJobState
        scheduler_id: Optional[int]
        partitions: Optional[list]
        optional_params: dict
        filter_tags: dict

    def validate(
        self,
        allowed_queues: dict[str, Any],
        allowed_projects: Sequence[str],
        optional_batch_job_params: dict[str, str],
    ) -> None:
        """Raise ValueError (:class:`balsam.batch_job_rules.BatchJobRefused`) with the reason if this
        request does not fit the site's rules: the same rule the site agent applies before submitting."""
        check_batch_job(self, allowed_queues, allowed_projects, optional_batch_job_params)

    def partitions_to_cli_args(self) -> str:
        if not self.partitions:
            return ""
        args = []
        for part in self.partitions:
            arg = f"{part.job_mode.value}:{part.num_nodes}"
            for k, v in part.filter_tags.items():
                arg += f":{k}={v}"
            args.append(f" --part {arg}")
        return "".join(args)

    def job_query(self) -> Any:
        """The jobs that ran (or run) in this BatchJob."""
        return self._model_for("Job").objects.filter(batch_job_id=self.id)


# ====================================================================================== Session
class Session(BalsamModel):
    """A launcher's lease on jobs: ``acquire_jobs()``, ``tick()`` heartbeats, ``delete()`` releases."""

    _record_cls = records.Session
    _path = "/sessions/"
    _manager_cls = Manager
    _updatable = False
    _paginated = False
    _filters = frozenset({"id"})
    #: 0.7's required field, then its only other create field (see Site._create_positional)
    _create_positional = ("site_id", "batch_job_id")

    if TYPE_CHECKING:  # pragma: no cover
        id: Optional[int]
        site_id: int
        batch_job_id: Optional[int]

    def acquire_jobs(
        self,
        max_num_jobs: int,
        max_wall_time_min: Optional[int] = None,
        max_nodes_per_job: Optional[int] = None,
        max_aggregate_nodes: Optional[float] = None,
        serial_only: bool = False,
        sort_by: Optional[str] = None,
        filter_tags: Optional[dict[str, str]] = None,
        states: Iterable[Union[JobState, str]] = RUNNABLE_STATES,
        app_ids: Optional[Iterable[int]] = None,
    ) -> list[Job]:
        """Lease up to ``max_num_jobs`` (at most 2,048) jobs of this session's site."""
        if not 1 <= max_num_jobs <= MAX_JOBS_PER_SESSION_ACQUIRE:
            raise ValueError(f"max_num_jobs must be 1..{MAX_JOBS_PER_SESSION_ACQUIRE}, got {max_num_jobs}")
        body = acquire_request(
            max_num_jobs, max_wall_time_min=max_wall_time_min, max_nodes_per_job=max_nodes_per_job,
            max_aggregate_nodes=max_aggregate_nodes, serial_only=serial_only, sort_by=sort_by, filter_tags=filter_tags,
            states=states, app_ids=app_ids,
        )
        data = self._get_client().post(self._detail_path, json=body)
        if isinstance(data, dict) and "results" in data:
            data = data["results"]
        if not isinstance(data, list):
            raise ValueError(f"unexpected acquire response from the server: {str(data)[:200]}")
        JobModel = self._model_for("Job")
        return [JobModel._from_api(row) for row in data]

    def tick(self) -> None:
        """Heartbeat: keeps the lease alive (sessions without one for 5 minutes expire)."""
        self._get_client().put(self._detail_path, json={})


# ====================================================================================== TransferItem
class TransferItemManager(Manager["TransferItem"]):
    has_bulk_patch = True


class TransferItem(BalsamModel):
    """A file or directory to stage in/out for a job (created with the job)."""

    _record_cls = records.TransferItem
    _path = "/transfers/"
    _manager_cls = TransferItemManager
    _creatable = False
    _deletable = False
    _filters = frozenset({"id", "site_id", "job_id", "state", "direction", "job_state", "tags"})
    # `balsam transfer ls -n N` reads the newest N by order_by("-id") (the server takes it).
    _orderings = frozenset({"id"})
    _positional = ("id", "site_id", "job_id", "state", "direction", "job_state", "tags")


# ====================================================================================== EventLog
class EventLog(BalsamModel):
    """One job state change (read-only)."""

    _record_cls = records.EventLog
    _path = "/events/"
    _manager_cls = Manager
    _creatable = False
    _updatable = False
    _deletable = False
    _filters = frozenset(
        {
            "id", "job_id", "site_id", "batch_job_id", "scheduler_id", "tags", "data", "timestamp_before",
            "timestamp_after", "from_state", "to_state",
        }
    )
    _orderings = frozenset({"timestamp"})
    # Balsam 0.7's order (its filters had no site_id: that one is a keyword only)
    _positional = ("id", "job_id", "batch_job_id", "scheduler_id", "tags", "data", "timestamp_before",
                   "timestamp_after", "from_state", "to_state")
    _default_order = "-timestamp"  # the server's: newest first
