"""The launcher's notes on its BatchJob (``status_info[key] = message``, ``balsam queue ls -v``):
one writer thread per launcher process.

Why one writer: the notes come from several threads (the full-disk pause from the loop, its end
from the acquirer; mpi mode's launch limit and node take-outs on its loop; the serial master's
ranks taken out; serial mode's error). Written by each caller in its own thread, two notes raced:
a pause's write, slow, landed after its resume's (the BatchJob said "paused" after the pause had
ended). And mpi mode wrote its notes on its loop thread: an API outage held job launching for the
client's retries (minutes).

Now :meth:`BatchJobNotes.note` only records the message (the latest per key wins; its text through
:func:`balsam.util.api_text`, as job updates: a NUL or a lone surrogate, from a job's output, made
the server refuse the write) and wakes the writer thread, which writes the pending keys in one
request, in order, one write at a time. A write that fails for an outage (no answer, 5xx, 429) is
tried again after :data:`RETRY_FIRST_SEC`, doubling to :data:`RETRY_MAX_SEC` (the notes put
meanwhile join it). A 404 (the BatchJob deleted) drops those notes with one warning. Another 4xx
refuses something in the request: its keys are then written one at a time, so that only a key the
server refuses is dropped (one warning naming the key and the server's reason; one refused value
lost every other key of its request before). :func:`flush_notes`, at the launcher's exit, waits at
most :data:`FLUSH_SEC` for what is pending (once per outage: a second flush after one that timed
out, with nothing written or noted since, does not wait again) and says which notes were dropped.

The write is ``PUT /batch-jobs/{id}`` with ``status_info_merge`` (docs/rest-api.md): the server
sets the keys sent in the same UPDATE, under the row's lock, and keeps every other key. A
read-then-PUT of the whole ``status_info`` (the Balsam 0.7 contract of ``status_info``) lost the
keys another writer set in between (the site agent's ``requeue_count``), and the agent's PATCH
from the copy it read at its cycle's start put back this launcher's earlier message; the agent
now merges its own keys too, so no note needs reading back.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional

from balsam.util import api_text

logger = logging.getLogger(__name__)

#: First wait before a failed write is tried again; it doubles up to :data:`RETRY_MAX_SEC`.
RETRY_FIRST_SEC = 1.0
RETRY_MAX_SEC = 60.0
#: How long the launcher's exit waits for the pending notes (an API that does not answer must not
#: hold the exit; the status updater gives up after its 5 s as well).
FLUSH_SEC = 5.0


def _http_status(exc: BaseException) -> Optional[int]:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _transient(exc: BaseException) -> bool:
    """Whether a failed write is worth trying again: no answer (connection error, timeout), a 5xx
    or a 429. Another 4xx is the server's word on this BatchJob (deleted, a refused credential)."""
    status = _http_status(exc)
    return status is None or status >= 500 or status == 429


def _refused_value(exc: BaseException) -> bool:
    """Whether a failed write refused something in its request (a 4xx other than 401, 403, 404 and
    429: a value the server does not take), so that each key is worth trying alone. A 404 is the
    BatchJob gone; a 401 or 403 refuses the credential, not a value: no key of it can be written
    (tried one by one, each try renewed the token and stopped the launcher once more)."""
    status = _http_status(exc)
    return status is not None and 400 <= status < 500 and status not in (401, 403, 404, 429)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


class BatchJobNotes:
    """The notes of one launcher process on BatchJob ``batch_job_id``; see the module docstring.

    ``client``: returns the REST client (by default ``service_calls.default_client``), called once,
    by the writer's thread at its first write."""

    def __init__(self, batch_job_id: int, client: Optional[Callable[[], Any]] = None) -> None:
        self.batch_job_id = int(batch_job_id)
        self._client = client
        self._cond = threading.Condition()
        #: key -> latest message not written yet.
        self._pending: dict[str, str] = {}
        self._writing = False
        self._retry_at = 0.0
        self._backoff = RETRY_FIRST_SEC
        #: Failed tries in a row (the first is logged at WARNING, the next ones at DEBUG).
        self._failures = 0
        #: A flush waits for the writer: its attempt starts now, not at the backoff's end, and ends by then.
        self._flush_deadline: Optional[float] = None
        #: Keys dropped (refused by the server) since the last flush, which reports them; a key
        #: written since under a newer note is not (:meth:`_written`).
        self._dropped: set[str] = set()
        #: A flush timed out and nothing was written or noted since (the API is away): a later flush
        #: returns at once.
        self._flush_gave_up = False
        self._thread: Optional[threading.Thread] = None
        self._bound: Any = None

    # -- callers (any thread) -------------------------------------------------------------------
    def note(self, key: str, message: str, **more: str) -> None:
        """Record ``status_info[key] = message`` (and each ``more`` key) to be written; returns at once.
        Each text goes through :func:`balsam.util.api_text` (NUL and lone surrogates, which the
        server refuses, become U+FFFD): a node take-out quotes a job's last output line."""
        cleaned = {api_text(str(k)): api_text(str(v)) for k, v in {key: message, **more}.items()}
        with self._cond:
            self._pending.update(cleaned)
            self._flush_gave_up = False  # a new note is waited for at the next flush
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-job-notes", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = FLUSH_SEC) -> bool:
        """Wait up to ``timeout`` seconds for the pending notes to be written. True when done and
        no note was dropped (refused by the server) since the last flush, but for a key written
        since under a newer note; the dropped keys are logged in one warning."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._thread is None:
                return True
            if self._flush_gave_up:
                return not self._pending and not self._writing and self._report_dropped()
            self._flush_deadline = deadline
            self._retry_at = min(self._retry_at, time.monotonic())  # one try now, not at the backoff's end
            self._cond.notify_all()
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._flush_gave_up = True
                    self._flush_deadline = None
                    logger.warning("BatchJob %s: notes %s not written within %g s at the launcher's end",
                                   self.batch_job_id, ", ".join(sorted(self._pending)) or "being written", timeout)
                    return False
                self._cond.wait(left)
            self._flush_deadline = None
            return self._report_dropped()

    def _report_dropped(self) -> bool:
        """(Under the lock.) Log the keys dropped since the last flush; True when none was."""
        if not self._dropped:
            return True
        logger.warning("BatchJob %s: notes %s were dropped (refused by the server, see above)", self.batch_job_id,
                       ", ".join(sorted(self._dropped)))
        self._dropped = set()
        return False

    # -- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._pending and now >= self._retry_at:
                        break
                    self._cond.wait(max(0.0, self._retry_at - now) if self._pending else None)
                batch, self._pending = self._pending, {}
                self._writing = True
                deadline = self._flush_deadline
            try:
                self._write(batch, deadline)
            except Exception as exc:
                if _refused_value(exc) and len(batch) > 1:
                    self._write_each(batch, deadline)
                else:
                    self._failed(batch, exc)
            else:
                self._written(batch)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _written(self, keys: Iterable[str]) -> None:
        """``keys`` were written: none of them is dropped any more. A key refused once and then
        written under a newer note (the next take-out's text) was named as dropped at the next
        flush, which returned False, though the BatchJob holds that key's latest note."""
        with self._cond:
            self._dropped.difference_update(keys)
            if self._failures:
                logger.info("BatchJob %s: notes written again after %d failed tries", self.batch_job_id,
                            self._failures)
            self._failures = 0
            self._backoff = RETRY_FIRST_SEC
            self._retry_at = 0.0
            self._flush_gave_up = False

    def _write_each(self, batch: dict[str, str], deadline: Optional[float]) -> None:
        """The server refused ``batch``'s request: its keys one request each, in order, so that only
        a key it refuses is dropped. An outage (or a 404) met on the way is handled as for a batch,
        with the keys not written yet."""
        keys = list(batch)
        wrote: list[str] = []
        for n, key in enumerate(keys):
            try:
                self._write({key: batch[key]}, deadline)
            except Exception as exc:
                if _refused_value(exc):
                    self._failed({key: batch[key]}, exc)
                    continue
                if wrote:
                    self._written(wrote)
                self._failed({k: batch[k] for k in keys[n:]}, exc)
                return
            wrote.append(key)
        if wrote:
            self._written(wrote)

    def _write(self, batch: dict[str, str], deadline: Optional[float]) -> None:
        """One request: ``batch``'s keys merged into the stored status_info by the server (the
        other keys, the agent's and any other writer's, are kept)."""
        if self._bound is None:
            # Resolved once, in this thread (the launcher's start-up never waits for it), and kept:
            # every note goes to the server and user that got the first.
            self._bound = self._client() if self._client is not None else _default_client()
        # One try per call: the writer retries on its own (it must not sit in the client's minutes
        # of retries while a flush waits); a flush's deadline bounds the attempt.
        kw: dict[str, Any] = {"retry_count": 0}
        if deadline is not None:
            kw["deadline"] = deadline
        self._bound.put(f"/batch-jobs/{self.batch_job_id}", json={"status_info_merge": batch}, **kw)

    def _failed(self, batch: dict[str, str], exc: BaseException) -> None:
        with self._cond:
            if not _transient(exc):
                self._dropped.update(batch)
                logger.warning("could not record %s on BatchJob %s (the server refused it; not tried again): %s",
                               ", ".join(sorted(batch)), self.batch_job_id, _reason(exc))
                return
            # Newer notes put meanwhile win over the batch that failed.
            self._pending = {**batch, **self._pending}
            wait = self._backoff
            self._backoff = min(RETRY_MAX_SEC, self._backoff * 2)
            self._retry_at = time.monotonic() + wait
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
        logger.log(level, "could not record %s on BatchJob %s: %s (tried again in %.3g s, then less often, up to every "
                   "%.0f s)", ", ".join(sorted(batch)), self.batch_job_id, exc, wait,
                   RETRY_MAX_SEC)


def _default_client() -> Any:
    # Imported here, not at the top: service_calls imports this module (notes_for), so a top-level
    # import back would be circular (whichever is imported first would find the other half-made).
    from .service_calls import default_client

    return default_client()


_writers: dict[int, BatchJobNotes] = {}
_writers_lock = threading.Lock()


def notes_for(batch_job_id: int) -> BatchJobNotes:
    """The process's writer of notes on BatchJob ``batch_job_id`` (one per BatchJob: every mode,
    thread and the full-disk pause of this process share it). The process's normal exit flushes
    them (atexit: the serial master's process, whose ``main`` returns through ``sys.exit``, too)."""
    with _writers_lock:
        writer = _writers.get(int(batch_job_id))
        if writer is None:
            if not _writers:
                atexit.register(flush_notes)
            writer = _writers[int(batch_job_id)] = BatchJobNotes(int(batch_job_id))
        return writer


def flush_notes(timeout: float = FLUSH_SEC) -> bool:
    """At the launcher's (or the serial master's) end: wait up to ``timeout`` seconds in all for
    every writer's pending notes. True when all were written."""
    deadline = time.monotonic() + timeout
    with _writers_lock:
        writers = list(_writers.values())
    done = True
    for writer in writers:
        done = writer.flush(max(0.0, deadline - time.monotonic())) and done
    return done
