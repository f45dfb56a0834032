"""The ``transfers`` agent module: stages job files in and out through transfer backends.

One cycle (every ``service_period`` seconds):

1. One GET of this site's transfer items that are ``pending``, ``active`` or ``inactive`` (at most
   ``num_items_query_limit``, in-flight ones first), and one (chunked) GET of the workdirs of jobs
   not seen before. When in-flight items fill that page (``max_concurrent_transfers`` x
   ``transfer_batch_size`` may exceed it), one GET per page reads the rest of them (every task in
   flight is polled and counted against the slots) and, when a slot is free, the pending items are
   read by the pages below. When that page is full but holds fewer than ``num_items_query_limit`` items the
   cycle can act on (pending items waiting for their retry backoff, or for a location whose backend
   refused the last submission, e.g. Globus not logged in), at most
   ``PENDING_PAGES_PER_CYCLE`` more GETs page on through the pending items by id, and the next
   cycle goes on from where that stopped: waiting items never starve the other locations' items.
2. Tasks whose items are all gone from the server (their jobs were deleted, or the items held
   again) are cancelled, once each (:meth:`~balsam.transfer.TransferBackend.cancel`). The module
   keeps the ids of the tasks in flight, in memory and in ``<site>/.transfer-tasks-in-flight.json``
   (so an agent restarted after the deletion still cancels them); a tracked task absent from this
   cycle's in-flight items costs one (chunked) GET of its items by id.
   One :meth:`~balsam.transfer.TransferBackend.poll` per backend for all its in-flight tasks.
   Done items become ``done`` (the server then moves READY jobs to STAGED_IN and POSTPROCESSED jobs
   to JOB_FINISHED); a failed item goes back to ``pending`` with ``transfer_info.retry_after``
   (``retry_backoff_sec``, doubling, at most ``retry_backoff_max_sec``) until it has failed
   ``max_attempts`` times or with an error retrying cannot fix; then it becomes ``error`` and the
   server moves its job to FAILED with the error in the event's data. A failed task (or a batch)
   is logged as one line with its count of failed files and a few of its items; each item's own
   line is at DEBUG. A running task's progress figures (``transfer_info.task``) are written into
   its items when its state or reason changes, else at most every ``PROGRESS_EVERY_SEC`` (60 s):
   not every item every cycle.
3. Pending items due for a try are grouped by (direction, location alias), largest groups first,
   cut into batches of ``transfer_batch_size``; at most ``max_concurrent_transfers`` tasks run at
   once, and a cycle makes at most as many submissions as there are free slots, refused ones
   included. Each batch is one backend task; its items become ``active`` with ``task_id =
   "<backend>:<id>"``. Once a location's submission is refused, its other batches (journaled ones
   included) wait with that reason for this cycle, taking no slot (not after a refusal of that
   batch's own files, ``TransferError.batch_only``: Globus's 409 for paths another task writes); for ``retry_backoff_sec`` it is
   tried after the locations that work, then its batches take their turn as any location's (a
   batch refused for its own files likewise goes after the new batches for ``retry_backoff_sec``,
   then in its turn). A refusal retrying may fix uses no try; one the backend says is for good
   is taken for a refusal of the request (the contract cannot tell it from a refusal of the files):
   the refused batch's files each fail a try (backoff, ``max_attempts``), so a location refusing
   everything fails its jobs a batch per cycle as their tries run out, not all in one cycle.
   File items (not ``recursive``) writing the same file (two jobs staging out to one path of a
   location, or of two aliases of one address; in to one path of a shared workdir) never share a
   task, nor run beside a task still writing it (an item in flight, or any file of a tracked task,
   also of its items deleted or held again since): a backend names a task's failed files by
   destination, and one missing file failed a try of both (the delivered one too). The one after
   waits, no try used, with the stable reason SAME_FILE_WAIT (PATCHed once; such items are no work
   in hand when deciding to page past a full first page); they go one at a time, by id. Directory
   items merge (many jobs' results into one directory): they wait for nothing and hold back
   nothing, nor does a file inside another item's directory wait for it. (Job creation refuses two
   slots of one job writing one destination, two directories merging excepted.)
4. One bulk PATCH of every item that changed. The server refuses (409) the update of an item
   held again (``awaiting_job``: its job was re-run and sent back to wait for its parents after
   this cycle read the item): the others are sent, nothing is failed, one INFO line says so, and a
   task submitted (or polled) for such items only is cancelled; the items are copied again when
   their jobs are released. A task whose items were held between two cycles is cancelled as in 2.
   A task that runs on for other jobs' items keeps the destinations of the items that left it (in
   memory and in ``.transfer-tasks-in-flight.json``, so across a restart too): a failed file of
   theirs is dropped (DEBUG), not charged to the others, and a released item that left it waits
   for it to end (``waiting for task T, which still writes its destination``) rather than have the
   old copy land over the new one. Only such items wait (looked up by item id): another job's item
   whose destination lies near the task's (a directory stage-out into a shared folder) does not.

A poll that fails (the service down, not logged in, or refusing the request) says nothing about the
tasks: their items stay in flight (Globus may still be writing into the jobs' workdirs) with the
reason on them, and only the deadline below ends them. A task its backend reports not progressing
(``TaskStatus.reason``: a fault the service keeps retrying, a pause by an administrator) keeps running;
the reason is shown on its items. Each such reason, and each "will retry" of a failed submission, is
logged once per task (location) until it changes, not every cycle. A failure whose error carries
``retry_after_sec`` (the service's rate limit: an HTTP 429's Retry-After) holds that backend off:
until then its tasks are not polled (they stay in flight) and its batches wait (no try used), said
in the failure's one log line. The cycle's summary line is at INFO when an item changed state or a
task was submitted, else at DEBUG (a cycle that only polled running tasks).

A batch journaled with a submission token is sent again with that token, never under a new one
(one submission of the cycle, within its slots; one that finds no slot waits in the journal, and so
do its location's new batches): a location refusing for a reason retrying may fix keeps one batch
journaled, sent once per cycle, instead of one more per cycle. If the service refuses it for good
(the location's collection is gone, a permission to grant), it leaves the journal and its items each
fail a try, as a first submission refused for good does (backoff, then ``max_attempts``); if its
alias left settings.yml, its items fail (their jobs too), as a first submission's would; a refusal
retrying may fix keeps it journaled, its items waiting with the reason. Its items that the cycle
did not read (every slot taken: pending items are then not read) are read by id (one chunked GET);
the record leaves the journal once one of them is recorded with a task. One whose items were
deleted meanwhile (with their jobs), or are no longer pending, is sent again with its token all the
same: the task that answers is recorded for the items still pending and runs on, tracked, keeping
the gone items' destinations (their failed files are dropped from its outcome); none pending, it is
cancelled (a cancel refused for good is logged). Dropped, the task the service may have started
ran on untracked, into the deleted jobs' workdirs, and the other items went under a new token
beside it. One none of whose items is left is still sent (the token is the only handle on a task
the service may have started), but a send or cancel failing for a reason retrying may fix is
tried again after a backoff (``retry_backoff_sec`` doubling), MAX_CANCEL_TRIES times at most: then
the task is left to its service, with one WARNING naming it (or the token).

Quick polls: after a submission to a backend with ``quick_poll`` (local, rsync) the next cycle
comes :data:`QUICK_POLL_SEC` later, then after as long as the youngest such task has run, up to
``service_period``; tasks of other backends (Globus) never shorten the period.

Deadline: a task polled ``active`` or ``inactive`` more than ``task_timeout_sec`` after it started
is cancelled and its items fail a try with that reason and the reason it was not moving, as last
reported (a fault its service retries, a pause, a failing poll), then retry with backoff, or their
job goes to FAILED after ``max_attempts``. The task is polled once right after its cancel: a
backend that then reports it ``done`` (with ``file_errors`` for the files it did not deliver) is
taken at its word, so the files it delivered are done and only the others fail a try (for good
only with ``file_errors_retryable=False``); one that reports it ``failed`` answers the agent's own
cancel whatever its words or retryable flag: each file fails a try, its message kept in the error. A warning is
logged once when a task passes half of it. A task
starts when its items are submitted (``transfer_info.submitted``), unless its backend polls it
``queued`` (``TaskStatus.queued``: the ``local`` and ``rsync`` backends run ``threads`` tasks at
once and the others wait for a free thread; Globus runs 3 tasks of a user and queues the others):
its items then carry ``transfer_info.queued`` and the reason they wait (the backend's own, else
QUEUED_REASON; not logged as a task not moving), no deadline runs, and the first poll that finds it started records that time as
``transfer_info.started``, from which its deadline counts (so a task queued behind hung ones gets
its whole ``task_timeout_sec`` once it runs; the hung ones ahead of it meet their own deadlines,
and a cancelled one's thread is replaced). A task whose poll fails (or that it leaves ``unread``)
counts from its start if known; one last seen queued, from the first failed read of the unbroken
row of them (kept in memory; a read that answers ends the row), so one failed read does not end
a task queued longer than its deadline, and an outage still ends it; else from its submission.
A new submission drops both keys.
A cancel that fails for a reason retrying may fix leaves the task in flight (tried again next
cycle): its items are not sent again while it may still write.
Backends that take the deadline themselves (``section_keys`` mapping ``task_timeout_sec``: the Globus
plugin passes it to the service) stop the task on their side too.

A done task whose ``file_errors`` name files is matched to its items by destination (a file inside
a recursive item's destination is the deepest such item's; when the backend sets
``file_errors_attributed`` False, as Globus does for a task whose files it no longer knows after a
restart, every item that may hold the file: nested ones too); each item so named fails a try, or fails for good
(its job FAILED with the error) when the backend sets ``file_errors_retryable`` False (Globus: a task
cancelled by its owner or an administrator); if some error matches no item, the items without
an error of their own are not called done either: each fails a try (it is copied again, and its
job fails if that keeps happening), since the unmatched error may be theirs. A file the backend
lists as not tried (``info["not_tried"]``, :data:`NOT_TRIED_INFO`: rsync after an earlier file of
the task got no answer from a host that had answered since its last such failure) puts its item
back to pending without using a try, its error as its reason: one slow file no longer charges a
try to every file batched behind it.

Restart safety: a task id is appended (fsync'd) to ``<site>/.transfer-tasks.jsonl`` right after its
task is submitted and its line is dropped once the PATCH recording it has been answered (only the
token records of batches whose submission is still unconfirmed stay). Items that
are still ``pending`` but listed there (the agent died between the two) are polled under that task
id instead of being submitted again, unless held again since (``transfer_info.holds``, counted by
the server, is ahead of the count the line kept): that task copied files from before the parents'
new run, and is cancelled as one its items left (a line without counts, an older agent's, counts
0). A task line left by a cycle whose PATCH failed (the API down) is tracked by the next cycle as
by a restart, so its task is cancelled if its item is held meanwhile. So is the task answering a
journaled token whose items were held again since the token was journaled (still held, or
released): the batch is sent again with its token, the task that answers is cancelled, and the
pending items go in a new batch. Backends with submission tokens (Globus submission ids) get
the token journaled *before* the submission, so a batch whose task id never reached the journal
(the agent died, or the submission failed in a way that may hide a task the service started: a
timeout) is sent again with the same token and the service answers with the task it already has; backends whose task ids die with the process (``local``,
``rsync``) report them ``unknown`` and those items are submitted again, which their atomic copies
make harmless. Nothing is lost (an item is only ``done`` once its backend said so) and nothing is
doubled (a destination is written by rename).
"""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

from ...builtin.local_transfer import symlink_problem
from ...config.settings import options_problems
from ...options import OptionsError, build_options, option
from ...plugins.manager import PluginError, get_plugin_manager
from ...states import DONE_STATES, JobState, TransferDirection, TransferItemState
from ...transfer import (
    TaskState,
    TaskStatus,
    TransferBackend,
    TransferError,
    TransferFile,
    TransferLocation,
    UNKNOWN_TASK,
    backend_name_for,
    build_backend,
    one_line,
)
from ..._api.query import read_pages
from ...client.status_updater import http_status, isolate_refused
from ...models import MAX_PAGE_SIZE
from ..service_client import chunks, list_all, page_fetcher, results
from ..module import AgentModule

__all__ = ["TransfersModule", "TransfersOptions", "item_transfer_paths"]

IN_FLIGHT = (TransferItemState.active.value, TransferItemState.inactive.value)
#: ``transfer_info`` keys of one submission's clock (see the module docstring's "Deadline"): a new
#: submission, or an item leaving its task, drops them.
CLOCK_KEYS = ("queued", "started")
#: The reason shown on the items of a task its backend reports ``queued`` without a reason of its own
#: (``TaskStatus.reason``: Globus names its queue). Backend-neutral: the ``local`` and ``rsync``
#: backends queue behind their threads, a service behind its limit of running tasks.
QUEUED_REASON = "waiting for the transfer backend to start its task (it runs a limited number of tasks at once)"
JOURNAL_NAME = ".transfer-tasks.jsonl"
#: The tasks in flight and their item ids, kept so that a task whose items were all deleted (with
#: their jobs) is cancelled, even by an agent restarted after the deletion.
TASKS_NAME = ".transfer-tasks-in-flight.json"
#: GETs of pending items past a full first page per cycle (see the module docstring).
PENDING_PAGES_PER_CYCLE = 4
#: Seconds between two writes of a running task's progress figures (``transfer_info.task``) into its
#: items: a change of state or reason is written at once, progress alone at most this often (each
#: write is one row per item in the cycle's bulk PATCH).
PROGRESS_EVERY_SEC = 60.0
#: The first look at a new task comes this soon after its submission, the next ones after as long
#: as it has run so far (0.5, 1, 2, 4 s ...) until that reaches the module's period: a small local
#: or rsync copy is over in milliseconds, and its job waited a whole period (5 s by default) for
#: the poll that sees it done, on each of its stage-in and stage-out. Only for tasks of backends
#: that ask for it (:attr:`balsam.transfer.TransferBackend.quick_poll`: local, rsync); a Globus
#: task never shortens the period.
QUICK_POLL_SEC = 0.5
#: Items named in one log line about many (a task's, a batch's); the others are logged at DEBUG.
LOG_EXAMPLES = 3
#: The ``TaskStatus.info`` key under which a backend lists the ``file_errors`` keys of files it did
#: not try, for a reason not theirs that a try of its own may not repeat (the ``rsync`` backend: an
#: earlier file of the task got no answer from a host that had answered since its last such
#: failure). Each item whose own destination is listed, and that has no other error, goes back to
#: pending without using a try, its error kept as its reason; the list is not copied into the
#: items' ``transfer_info.task``. A listed key that is no item's own destination counts as an error.
NOT_TRIED_INFO = "not_tried"
#: The start of the reason of an item that waits for an earlier transfer writing the same file (see
#: :meth:`TransfersModule._file_key`). Stable (it names the path, not the task waited for): a waiting
#: row is PATCHed once, not every cycle; and such an item is no work in hand for :meth:`_read_items`.
SAME_FILE_WAIT = "waiting for an earlier transfer that writes the same file"
#: The start of the reason of a due pending item that waits for a submission slot (every one of
#: ``max_concurrent_transfers`` taken by tasks in flight or this cycle's submissions): without it
#: such an item showed no reason at all, as one no agent had read. Stable (one text whatever took
#: the slots, :func:`slot_wait_reason`: PATCHed once per item, not every cycle); submitting the
#: item clears it, and it replaces a reason the item carries that no longer holds
#: (:meth:`TransfersModule._wait_for_slot`).
SLOT_WAIT = "waiting for a free transfer slot"
#: Tries of a cancel that fails for a reason retrying may fix (a task of deleted jobs, or of items
#: held again), ``retry_backoff_sec`` apart and doubling (up to ``retry_backoff_max_sec``); then
#: the task is left to its service, untracked, with one WARNING naming it. So are the tries of a
#: journaled batch none of whose items is left, sent again with its token only to find that task.
MAX_CANCEL_TRIES = 10
#: Job ids per GET /jobs/?id=... (keeps the URL short).
JOB_ID_CHUNK = 500
#: ``transfers:`` keys that ``balsam site sync`` also sends to the Site record
#: (:func:`balsam.site.site_ops.site_record_fields`).
SITE_RECORD_KEYS = frozenset({"transfer_locations", "globus_endpoint_id"})
#: ``transfers:`` keys that only backends read (through their ``section_keys``): one set makes
#: settings.yml's check look at every installed backend taking it, used by a location or not.
BACKEND_SECTION_KEYS = ("globus_endpoint_id", "globus_endpoint_site_path")
#: What a location alias may be: it is written ``alias:/path`` in jobs, so no ':' (nor '/', spaces).
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


@attrs.frozen
class TransfersOptions:
    """The ``transfers:`` section of settings.yml."""

    transfer_locations: dict[str, str] = option(
        help="Aliases of the places jobs stage files from and to: {alias: 'globus://<endpoint-id>' | "
        "'local://' | 'rsync://user@host'}. A job names one as 'alias:/absolute/path'.",
        factory=dict,
    )
    globus_endpoint_id: Optional[str] = option(None, "The Globus endpoint (collection) id of this site's file system.")
    globus_endpoint_site_path: Optional[str] = option(
        None, "This site's directory as the Globus endpoint sees it, when it differs from the local path."
    )
    max_concurrent_transfers: int = option(5, "Most transfer tasks in flight at once.")
    transfer_batch_size: int = option(100, "Most files bundled into one transfer task.")
    num_items_query_limit: int = option(
        2000, "Transfer items a cycle reads and acts on (its first page; pages on through pending items when "
        "that page is full of items that wait).")
    service_period: float = option(5, "Seconds between two transfer cycles (at least 1).")
    max_attempts: int = option(3, "Tries of a failing file before its job goes to FAILED with the error.")
    retry_backoff_sec: float = option(30, "Wait before the first retry of a failed file; doubles on each retry.")
    retry_backoff_max_sec: float = option(600, "Longest wait between two retries.")
    task_timeout_sec: float = option(
        21600, "A transfer task still running this many seconds after it started (was submitted, or was taken from "
        "its backend's queue of tasks waiting for a free thread) is cancelled and its files "
        "fail a try (a hung host or file system); a warning is logged at half of it. 6 h by default: hours more "
        "than a batch of transfer_batch_size files needs at tens of MB/s; raise it for bigger batches.")
    backend_options: dict[str, dict[str, Any]] = option(
        help="Options of each transfer backend, by backend name (e.g. {local: {threads: 8}}; file is another name "
        "of local: give one of the two); `balsam plugins show <name>` lists them.",
        factory=dict,
    )

    def validate(self) -> dict[str, str]:
        """Problems by key (the settings loader reports them with file and line)."""
        problems: dict[str, str] = {}
        for name in ("max_concurrent_transfers", "transfer_batch_size", "num_items_query_limit", "max_attempts"):
            if getattr(self, name) < 1:
                problems[name] = f"must be at least 1, got {getattr(self, name)!r}"
        # At least a second, as sync_period and the file cleaner's and elastic queue's periods: 0
        # made the module cycle without pause (~490 GETs a second). Quick polls (QUICK_POLL_SEC
        # after a local or rsync submission) come sooner on their own.
        if self.service_period < 1:
            problems["service_period"] = f"must be at least 1 (seconds), got {self.service_period!r}"
        for name in ("retry_backoff_sec", "retry_backoff_max_sec"):
            if getattr(self, name) < 0:
                problems[name] = f"must not be negative, got {getattr(self, name)!r}"
        if self.task_timeout_sec <= 0:
            problems["task_timeout_sec"] = f"must be more than 0, got {self.task_timeout_sec!r}"
        for alias, url in self.transfer_locations.items():
            if not ALIAS_PATTERN.fullmatch(str(alias)):
                problems[f"transfer_locations.{alias}"] = (
                    f"bad location alias {alias!r}: use letters, digits, '_', '.' and '-' only "
                    "(jobs write it as 'alias:/path', so ':', '/' and spaces cannot be in it)")
                continue
            try:
                location = TransferLocation.parse(alias, url)
            except TransferError as exc:
                problems[f"transfer_locations.{alias}"] = str(exc)
                continue
            problem = _location_problem(location)
            if problem:
                problems[f"transfer_locations.{alias}"] = problem
        section = self._section_key_problems(problems)
        problems.update(section)
        if self.backend_options:
            problems.update(self._backend_options_problems(skip=section))
        return problems

    def warnings(self) -> dict[str, str]:
        """Keys that pass every check but do not act as written (the settings loader locates them,
        ``balsam site check-settings`` prints them; the file still loads)."""
        found: dict[str, str] = {}
        if self.retry_backoff_max_sec < self.retry_backoff_sec:
            # Each wait is min(retry_backoff_sec * 2**n, retry_backoff_max_sec): the cap wins from the first.
            found["retry_backoff_max_sec"] = (
                f"{self.retry_backoff_max_sec!r} is below retry_backoff_sec ({self.retry_backoff_sec!r}): every retry "
                f"waits {self.retry_backoff_max_sec!r} s and retry_backoff_sec has no effect")
        installed = set(get_plugin_manager().list_drivers("transfer", resolve=False))
        for alias, url in self.transfer_locations.items():
            try:
                backend = TransferLocation.parse(alias, url).backend_name
            except TransferError:
                continue  # refused by validate()
            if backend not in installed:
                # Accepted (a plugin may be installed later), but every transfer of it fails until then.
                found[f"transfer_locations.{alias}"] = (
                    f"no installed transfer backend serves {str(url).split('://', 1)[0]}:// (installed: "
                    f"{', '.join(sorted(installed)) or 'none'}): its jobs' transfers fail until one is installed")
        return found

    def _section_key_problems(self, found: Mapping[str, str]) -> dict[str, str]:
        """``transfers:`` section keys a backend takes as one of its options (``section_keys``: Balsam
        0.7's ``globus_endpoint_id``, ``globus_endpoint_site_path``), checked against that option's type
        and validator when settings.yml is read, under the section key (so the loader names its line).
        They were checked only with a ``backend_options`` entry of the backend, and otherwise refused
        only when the agent built the backend (its items waiting with the reason). Checked for the
        backends of ``backend_options`` and ``transfer_locations``, and for every installed one when a
        key only backends read (BACKEND_SECTION_KEYS) is set; a key set under ``backend_options`` too
        is that option's (checked there). ``found``: problems already found (not reported twice)."""
        pm = get_plugin_manager()
        available = set(pm.list_drivers("transfer", resolve=False))
        wanted = {backend_name_for(name) for name in self.backend_options}
        for alias, url in self.transfer_locations.items():
            try:
                wanted.add(TransferLocation.parse(alias, url).backend_name)
            except TransferError:
                pass
        if any(getattr(self, key, None) is not None for key in BACKEND_SECTION_KEYS):
            wanted |= available
        problems: dict[str, str] = {}
        for name in sorted(wanted & available):
            try:
                cls = pm.load_driver("transfer", name)
            except PluginError:
                continue  # reported with its backend_options, or when a location uses it
            schema = getattr(cls, "options_schema", None)
            if schema is None or not attrs.has(schema):
                continue
            fields = {f.name: f for f in attrs.fields(schema)}
            own: dict[str, Any] = {}
            for key in _option_keys(self, name):
                values = self.backend_options.get(key)
                if isinstance(values, Mapping):
                    own.update({str(k): v for k, v in values.items()})
            for section_key, option_name in dict(getattr(cls, "section_keys", {}) or {}).items():
                value = getattr(self, section_key, None)
                if (value is None or option_name in own or option_name not in fields or section_key in found
                        or section_key in problems):
                    continue
                typed = options_problems(schema, {option_name: value}, (section_key,))
                why = next(iter(typed.values()), "") or _raw_value_problems(schema, {option_name: value}, "").get(
                    f".{option_name}", "")
                if why:
                    problems[section_key] = why if option_name in why else f"{why} (the {name} backend's {option_name})"
        return problems

    def _backend_options_problems(self, skip: Mapping[str, str] = {}) -> dict[str, str]:
        """A misspelt backend or option is refused here, when settings.yml is read, rather than when
        the backend is first used (its items would wait, and `balsam site check-settings` pass)."""
        problems: dict[str, str] = {}
        pm = get_plugin_manager()
        available = sorted(pm.list_drivers("transfer", resolve=False))
        for name in self.backend_options:
            key = f"backend_options.{name}"
            # A section under another name of a backend (``file``: ``local``) is that backend's, as a
            # ``file://`` location is served by ``local``.
            canonical = backend_name_for(name)
            if canonical not in available:
                problems[key] = f"unknown transfer backend {name!r} (available: {', '.join(available) or 'none'})"
                continue
            same = _option_keys(self, canonical)
            if len(same) > 1 and name != same[0]:
                continue  # reported once, on the first of them (backend_options() raises it)
            try:
                cls = pm.load_driver("transfer", canonical)
            except PluginError as exc:
                problems[key] = str(exc)
                continue
            for option_key, problem in _section_key_conflicts(cls, name, self).items():
                problems[option_key.removeprefix("transfers.")] = problem
            # Each value against the backend's typed options, as the loader checks scheduler.options:
            # `threads: many` is refused here with its line, not when the agent first builds the backend.
            schema = getattr(cls, "options_schema", None)
            if schema is not None and attrs.has(schema):
                values = self.backend_options.get(name)
                typed = options_problems(schema, values, ("backend_options", name))
                if isinstance(values, Mapping):
                    known = {f.name for f in attrs.fields(schema)}
                    for option_name in [str(k) for k in values if str(k) not in known]:
                        # Worded as build_options words it (the backend's own refusal): the known options.
                        try:
                            build_options(schema, {option_name: None}, where=f"backend_options.{name}")
                        except OptionsError as exc:
                            where, _, why = str(exc).partition(": ")
                            typed[where] = why
                    for where, problem in _raw_value_problems(schema, values, f"backend_options.{name}").items():
                        if not any(k == where or k.startswith((where + "[", where + ".")) for k in typed):
                            typed[where] = problem  # said once per option
                if typed:
                    problems.update(typed)
                    continue
            if any(section_key in skip for section_key in dict(getattr(cls, "section_keys", {}) or {})):
                continue  # a section key's value is refused under its own key (its line)
            try:
                backend_options(cls, canonical, self)
            except OptionsError as exc:
                # build_options names the option: "transfers.backend_options.<name>.<option>: why".
                where, _, why = str(exc).partition(": ")
                where = where.removeprefix("transfers.") if why else key
                problems.setdefault(where, why or str(exc))
            except (TypeError, ValueError) as exc:  # a check across the backend's options
                problems.setdefault(key, one_line(exc))
        return problems


def _raw_value_problems(schema: type, values: Mapping[str, Any], key: str) -> dict[str, str]:
    """The options' own validators on the values as written: the loader's check converts some first
    (a string where a list of strings goes becomes a one-item list), but the backend is built from
    the values as written (``extra_args: '--bwlimit=5m'`` would be split into characters)."""
    problems: dict[str, str] = {}
    fields = {f.name: f for f in attrs.fields(schema)}
    for name, value in values.items():
        field = fields.get(str(name))
        if field is None or field.validator is None:
            continue
        try:
            field.validator(None, field, value)
        except (TypeError, ValueError) as exc:
            problems[f"{key}.{name}"] = one_line(exc.args[0] if exc.args else exc)
        except AttributeError:  # a validator reading the instance: checked when the backend is built
            pass
    return problems


def _location_problem(location: TransferLocation) -> str:
    """What the location's backend refuses in its URL ('' when nothing, or when no installed backend
    serves the protocol: its jobs then fail with that reason, as a plugin may be installed later)."""
    try:
        cls = get_plugin_manager().load_driver("transfer", location.backend_name)
    except PluginError:
        return ""
    check = getattr(cls, "check_location", None)
    if not callable(check):
        return ""
    try:
        check(location)
    except TransferError as exc:
        return str(exc)
    except Exception as exc:  # a plugin's check must not stop settings.yml from loading
        return one_line(f"{location.backend_name} cannot check this location: {type(exc).__name__}: {exc}")
    return ""


def _option_keys(options: TransfersOptions, name: str) -> list[str]:
    """The ``backend_options`` keys that name backend ``name``: its own name or another name of it
    (``file`` for ``local``, :data:`balsam.transfer.PROTOCOL_ALIASES`), in the file's order."""
    canonical = backend_name_for(name)
    return [key for key in options.backend_options if backend_name_for(key) == canonical]


def _section_key_conflicts(cls: type, key: str, options: TransfersOptions) -> dict[str, str]:
    """``{"transfers.backend_options.<key>.<option>": problem}`` for each option that the backend
    also takes from a ``transfers:`` section key (``section_keys``: ``globus_endpoint_id`` ->
    ``endpoint_id``) when both are set to different values: the backend would use the option while
    ``balsam site sync`` sends the section key to the Site record."""
    values = options.backend_options.get(key) or {}
    conflicts: dict[str, str] = {}
    for section_key, option_name in dict(getattr(cls, "section_keys", {}) or {}).items():
        section_value, option_value = getattr(options, section_key, None), values.get(option_name)
        if (section_value is not None and option_value is not None and section_value != option_value
                and str(section_value) != str(option_value)):
            synced = " (the one `balsam site sync` sends to the Site record)" if section_key in SITE_RECORD_KEYS else ""
            conflicts[f"transfers.backend_options.{key}.{option_name}"] = (
                f"{option_value!r} differs from transfers.{section_key} ({section_value!r}): set only "
                f"transfers.{section_key}{synced}, or both to the same value")
    return conflicts


def backend_options(cls: type, name: str, options: TransfersOptions) -> Any:
    """The options of backend ``cls`` (registered as ``name``): ``backend_options.<name>`` (or the
    section under another name of it: ``file`` for ``local``), plus the section keys the backend
    takes from the ``transfers:`` section (``section_keys``), built as the backend builds them.
    Raises OptionsError naming the option: also for two sections of one backend (``file`` and
    ``local``), and for a section key and its option set to different values."""
    name = backend_name_for(name)
    keys = _option_keys(options, name)
    if len(keys) > 1:
        raise OptionsError(f"transfers.backend_options.{keys[0]}: {' and '.join(f'backend_options.{k}' for k in keys)} "
                           f"are the same transfer backend ({name}): give its options under one of them")
    key = keys[0] if keys else name
    conflicts = _section_key_conflicts(cls, key, options)
    if conflicts:
        where, problem = next(iter(conflicts.items()))
        raise OptionsError(f"{where}: {problem}")
    values = dict(options.backend_options.get(key) or {})
    for section_key, option_name in dict(getattr(cls, "section_keys", {}) or {}).items():
        value = getattr(options, section_key, None)
        if value is not None and option_name not in values:
            values[option_name] = value
    schema = getattr(cls, "options_schema", None)
    if schema is None:
        return values
    return build_options(schema, values, where=f"transfers.backend_options.{key}")


def as_transfers_options(config: Any) -> TransfersOptions:
    """The section as :class:`TransfersOptions`, whichever form the settings loader produced."""
    if isinstance(config, TransfersOptions):
        return config
    if config is None:
        return TransfersOptions()
    if attrs.has(type(config)):
        values = attrs.asdict(config, recurse=False)
    else:
        values = dict(config)
    return build_options(TransfersOptions, values, where="transfers")


def item_transfer_paths(item: Mapping[str, Any], workdir: Path) -> tuple[Path, TransferFile]:
    """The job-side path of ``item`` (inside ``workdir``) and the file the backend moves.

    A stage-in with ``local_path`` ``.`` that is not recursive lands as ``workdir/<remote basename>``.
    Raises a non-retryable :class:`TransferError` for a path that leaves the workdir: as written
    (absolute, ``..``), or, for a stage-in (what it writes), through a symbolic link in the workdir.
    A stage-out's source is read wherever a link in the workdir points (its run's result written in
    scratch and linked into the workdir is shipped, as Balsam 0.7's ``workdir/local_path`` was):
    the account the agent runs as may read it anyway, and the job's run could have copied it there.
    A stage-out's source that is (or lies below) a link to nothing or a link loop, and a stage-in's
    destination reached through a loop, raise a non-retryable TransferError naming the link.
    """
    local_rel = str(item.get("local_path") or ".")
    remote = str(item["remote_path"])
    recursive = bool(item.get("recursive"))
    rel = PurePosixPath(local_rel)
    if rel.is_absolute() or ".." in rel.parts:
        raise TransferError(f"local_path {local_rel!r} must be relative and stay inside the job's workdir", retryable=False)
    if not PurePosixPath(remote).is_absolute():
        raise TransferError(f"remote path {remote!r} must be absolute", retryable=False)
    stage_in = item["direction"] == TransferDirection.stage_in.value
    local = workdir / rel
    if stage_in and rel.parts in ((), (".",)) and not recursive:
        local = workdir / PurePosixPath(remote).name
    if not stage_in:
        # A link to nothing, or a loop: one error naming the link (backends said "no such file or
        # directory: <path>" while ls listed it). A loop stays a loop; a target may yet appear (an
        # NFS client's cached "not found" for a file another node just wrote, a scratch remount), so
        # a link to nothing is retried as a missing plain file is, within max_attempts.
        broken = symlink_problem(str(local))
        if broken:
            raise TransferError(broken, retryable=not broken.endswith("a symbolic link loop"))
        return local, TransferFile(src=str(local), dest=remote, recursive=recursive)
    try:
        root = workdir.resolve()
        resolved = local.resolve()
    except (RuntimeError, OSError) as exc:
        # A loop: RuntimeError on Python 3.11, OSError ELOOP later; neither is a TransferError, and
        # raised out of the cycle it stopped every item of the site, not this one.
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        where = symlink_problem(str(local)) or one_line(exc)
        raise TransferError(f"local_path {local_rel!r} leads through a symbolic link loop in the job's workdir "
                            f"({where})", retryable=False) from None
    if resolved != root and root not in resolved.parents:
        raise TransferError(f"local_path {local_rel!r} leads outside the job's workdir ({resolved})", retryable=False)
    return local, TransferFile(src=remote, dest=str(local), recursive=recursive)


def _norm_path(path: str) -> str:
    """``path`` without repeated or trailing slashes (how backends may spell a destination)."""
    return re.sub("/+", "/", path).rstrip("/") or "/"


#: The key the cycle's summary line counts the updates without a new state under: a reason or
#: progress written, an item put back to pending for a retry after failing at its submission.
NO_STATE_CHANGE = "no new state"

#: The direction of the files of a task whose location is unknown (:meth:`TransfersModule._writers`):
#: a task of an in-flight file written before its location was kept. An item writing one of its
#: destination paths waits for it, whatever its own direction and location (see :func:`_dest_key`).
ANYWHERE = "?"


def _location_address(location: TransferLocation, home: bool = False, address: Optional[str] = None) -> str:
    """Where a stage-out to ``location`` writes, one spelling per place as its backend reaches it:
    ``local://`` and ``local://localhost`` are this machine (LocalTransfer.check_location takes no
    other host), as is ``rsync://`` with no host (rsync's local mode) or with ``localhost`` and no
    port but ssh's own (22): the same files. An rsync host is lower-cased (ssh lower-cases the
    host it is given) and ssh's default port 22 dropped. The ssh user name is part of the address
    only for a path in a home directory (``home``: ``~/...``, each user's own; kept as written, a
    user's name is case-sensitive): an absolute path is one file on its host whoever writes it
    (``rsync://alice@host/d`` and ``rsync://bob@host/d`` ran at once). Other backends' addresses are
    ``address``, the netloc as the backend spells it (:meth:`TransferBackend.location_address`: a
    Globus collection id in either case is one collection), else as written."""
    backend = location.backend_name
    if backend == "local":
        return "local://"
    if backend == "rsync":
        user, at, hostport = location.netloc.rpartition("@")
        host, colon, port = hostport.rpartition(":")
        if not colon or (hostport.startswith("[") and not host.endswith("]")):
            host, port = hostport, ""  # no port (an IPv6 address in brackets has colons of its own)
        host = host.lower()
        port = "" if port == "22" else port
        user = f"{user}{at}" if home else ""
        if not host or (host == "localhost" and not port and not user):
            return "local://"
        return f"rsync://{user}{host}" + (f":{port}" if port else "")
    return f"{backend}://{location.netloc if address is None else address}"


def _dest_key(direction: str, where: str, dest: str) -> tuple[str, str, str]:
    """What a transfer writes, as compared between items: ``dest`` on ``where`` (the site for a
    stage-in: '', whichever location it comes from; a stage-out's location address, see
    :meth:`TransfersModule._file_key`), spelt one way (``~/x`` as ``/~/x``, ``.`` and ``..``
    collapsed as Globus reports them): two spellings of one path are one destination."""
    text = str(dest)
    if text == "~" or text.startswith("~/"):
        text = "/" + text
    return (str(direction), str(where), _norm_path(os.path.normpath(text)))


#: The count a backend adds to a file error that stands for several files (the Globus backend's
#: "(and 2 more failed files)"): combined errors add their counts instead of stacking suffixes.
MORE_FAILED = re.compile(r"\s*\(and (\d+) more failed files?\)$")


def _combined(errors: list[str]) -> str:
    """One item's errors as one: the first (its file named), and how many more files failed, counting
    those each error already stands for."""
    first = errors[0]
    if len(errors) == 1:
        return first
    more = len(errors) - 1
    for n, error in enumerate(errors):
        counted = MORE_FAILED.search(error)
        if counted:
            more += int(counted.group(1))
            if n == 0:
                first = error[:counted.start()]
    return f"{first} (and {more} more failed files)"


def match_file_errors(items: Iterable[tuple[Any, str, bool]], file_errors: Mapping[str, str],
                      attributed: bool = True) -> tuple[dict[Any, str], dict[str, str]]:
    """Attribute a done task's ``file_errors`` to its items, given as (id, dest, recursive): an error
    filed under an item's dest is that item's; one under a path inside a recursive item's dest (a
    file of a directory) is that item's (the deepest such item's). ``attributed`` False (see
    ``TaskStatus.file_errors_attributed``: the backend could not say whose file it is): an error is
    every holder's, the items whose dest it is and every recursive item it is inside (the deepest
    one alone left an outer directory item done without its file). Returns ({item id: error},
    {key: error} of the errors matching no item)."""
    items = [(item_id, _norm_path(dest), recursive) for item_id, dest, recursive in items if dest]
    exact: dict[str, list[Any]] = defaultdict(list)
    for item_id, dest, _ in items:
        exact[dest].append(item_id)
    found: dict[Any, list[str]] = defaultdict(list)
    unmatched: dict[str, str] = {}
    for key, error in file_errors.items():
        path = _norm_path(str(key))
        inside = [(len(dest), item_id) for item_id, dest, recursive in items
                  if recursive and path.startswith(dest.rstrip("/") + "/")]
        if path in exact:
            for item_id in exact[path]:
                found[item_id].append(error)
            if attributed:
                continue
        elif inside and attributed:
            # A file of a directory item: its own path says which one.
            inside = [max(inside, key=lambda pair: pair[0])]
        for _, item_id in inside:
            found[item_id].append(f"{key}: {error}")
        if path not in exact and not inside:
            unmatched[str(key)] = error
    return {item_id: _combined(errs) for item_id, errs in found.items()}, unmatched


def _held_refusal(exc: BaseException, item_id: int) -> bool:
    """Whether ``exc`` refuses the update of ``item_id`` because the item is held again (the 409 of
    routes/transfers.py ``_held_conflict``, naming it in ``refused_ids``); not another 409 (an
    Idempotency-Key's, a job's state change: ``refused_ids`` then names jobs, or nothing)."""
    if http_status(exc) != 409 or item_id not in (getattr(exc, "refused_ids", None) or ()):
        return False
    return "(awaiting_job)" in str(getattr(exc, "detail", None) or exc)


def _holds(item: Mapping[str, Any]) -> int:
    """How many times the server held ``item`` again (``transfer_info.holds``, jobs_logic._hold_stage_ins)."""
    try:
        return int((item.get("transfer_info") or {}).get("holds") or 0)
    except (TypeError, ValueError):
        return 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _info_time(item: Mapping[str, Any], key: str) -> Optional[dt.datetime]:
    """A time in the item's ``transfer_info``, or None: ``submitted`` (when it was submitted to its
    task), ``started`` (when its task was first polled started after being polled ``queued``)."""
    text = (item.get("transfer_info") or {}).get(key)
    if not text:
        return None
    try:
        at = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


def _due(item: Mapping[str, Any], now: dt.datetime) -> bool:
    retry_after = (item.get("transfer_info") or {}).get("retry_after")
    if not retry_after:
        return True
    try:
        return dt.datetime.fromisoformat(str(retry_after)) <= now
    except ValueError:
        return True


def _task_figures(status: TaskStatus) -> dict[str, Any]:
    """A task's progress figures as its items keep them (``transfer_info.task``): without the list of
    its files not tried (:data:`NOT_TRIED_INFO`), which may be long and is no figure."""
    return {k: v for k, v in status.info.items() if k != NOT_TRIED_INFO}


def _not_tried(status: TaskStatus) -> set[str]:
    """The ``file_errors`` keys ``status`` lists as not tried (:data:`NOT_TRIED_INFO`), normalised;
    a malformed list (a plugin's) lists none."""
    listed = status.info.get(NOT_TRIED_INFO) if isinstance(status.info, Mapping) else None
    if not isinstance(listed, (list, tuple)):
        return set()
    keys = {str(k) for k in status.file_errors}
    return {_norm_path(k) for k in listed if isinstance(k, str) and k in keys}


def _without(info: Optional[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``transfer_info`` without ``keys``."""
    keys = set(keys)
    return {k: v for k, v in (info or {}).items() if k not in keys}


def slot_wait_reason(max_concurrent_transfers: int) -> str:
    """The whole SLOT_WAIT reason: the same whatever took the slots this cycle (tasks in flight,
    submissions refused this cycle), so that a waiting item's row is written once."""
    return (f"{SLOT_WAIT}: all transfers.max_concurrent_transfers ({max_concurrent_transfers}) are taken "
            "(by tasks in flight, or by a submission refused this cycle)")


class TransfersModule(AgentModule):
    """Stage-in and stage-out of job files (see the module docstring)."""

    section = "transfers"
    default_period = 5.0
    period_fields = ("service_period",)
    options_schema = TransfersOptions
    section_comment = "Stages job files in and out through transfer backends (local, rsync, globus ...). null disables it."
    enabled_by_default = True

    def __init__(self, site_config: Any, config: Any, client: Any) -> None:
        options = as_transfers_options(config)
        problems = options.validate()
        if problems:
            key, why = next(iter(problems.items()))
            raise OptionsError(f"transfers.{key}: {why}")
        super().__init__(site_config, options, client)
        self.backends: dict[str, TransferBackend] = {}
        self.backend_errors: dict[str, TransferError] = {}
        self.locations: dict[str, TransferLocation] = {}
        self.location_errors: dict[str, TransferError] = {}
        #: Each location's netloc as its backend spells it (:meth:`_address`).
        self._addresses: dict[TransferLocation, str] = {}
        for alias, url in self.options.transfer_locations.items():
            try:
                self.locations[alias] = TransferLocation.parse(alias, url)
            except TransferError as exc:
                self.location_errors[alias] = exc
                self.logger.error("settings.yml transfers.transfer_locations.%s: %s", alias, exc)
        self.workdirs: dict[int, tuple[str, str]] = {}
        self.journal_path = Path(site_config.site_path) / JOURNAL_NAME
        self.tasks_path = Path(site_config.site_path) / TASKS_NAME
        #: API calls of the last cycle (the benchmark reports them).
        self.last_cycle_calls = 0
        #: Aliases whose last submission was refused: {alias: reason}. For ``retry_backoff_sec`` after
        #: that refusal (``_blocked_at``) their pending items do not count as work when deciding
        #: whether to page past a full first page, and their batches are tried after the other
        #: locations' (see :meth:`_submit`); then they take their turn as any location's.
        self.blocked_aliases: dict[str, str] = {}
        #: When each alias of ``blocked_aliases`` was last refused.
        self._blocked_at: dict[str, dt.datetime] = {}
        #: Where the next cycle's extra pages of pending items start (0: right after the first page).
        self._pending_cursor = 0
        #: What each tracked task writes: {task id: {item id: (dest, recursive)}}, kept while the task
        #: is tracked, also for items that left it (held again, or deleted) while it runs on for
        #: others. A failed file of such an item is theirs, not one of the task's other items' (see
        #: :meth:`_apply_status`), and such an item, released, waits for the task (see
        #: :meth:`_left_items`). Kept in TASKS_NAME with the tasks: a task that runs on across an
        #: agent restart (Globus keeps its tasks) still knows what the items that left it wrote.
        self._task_dests: dict[str, dict[int, tuple[str, bool]]] = {}
        #: Where each tracked task writes: {task id: (direction, location alias)} (a batch is one of
        #: each), for the files of ``_task_dests`` (see :meth:`_writers`); kept in TASKS_NAME too.
        self._task_where: dict[str, tuple[str, str]] = {}
        #: Tasks in flight: {"<backend>:<id>": item ids}; a task none of whose items is left in flight
        #: on the server is cancelled.
        self.tracked_tasks: dict[str, set[int]] = self._load_tracked()
        #: What the file holds (it is written when that changes, not every cycle).
        self._tracked_saved = self._tracked_record()
        #: Tasks this cycle's poll found over (done, failed, unknown): no longer tracked, even if
        #: some of their items were deleted meanwhile (nothing left to cancel).
        self._finished_tasks: set[str] = set()
        #: Tasks whose cancel failed for a reason retrying may fix: {task id: (failed tries, when to
        #: try again)}; MAX_CANCEL_TRIES at most (see :meth:`_cancel_failed`).
        self._cancel_retries: dict[str, tuple[int, dt.datetime]] = {}
        #: The same for journaled batches none of whose items is left, sent again with their token
        #: only to find (and cancel) the task the service may have started: {token: (failed sends,
        #: when to send again)} (see :meth:`_resend`).
        self._resend_tries: dict[str, tuple[int, dt.datetime]] = {}
        #: Journaled batches whose last send was refused for their own files
        #: (``TransferError.batch_only``): {token: when}. For ``retry_backoff_sec`` after that
        #: refusal they are sent after the cycle's new batches (see :meth:`_submit`), then in their
        #: turn again. Sent first, such a batch took a free slot every cycle while another task held
        #: its paths, and with one slot free the location's other batches waited for as long; sent
        #: last for as long as it stayed journaled, it never got a slot again under a steady flow of
        #: new batches once the refusal was over (its items waiting for a slot for ever).
        self._refused_batches: dict[str, dt.datetime] = {}
        #: The items whose SAME_FILE_WAIT reason :meth:`_end_stale_waits` cleared, by their file,
        #: while they stay pending and ready: the first of each file; those behind it keep waiting.
        self._ready_files: dict[tuple[str, str, str], int] = {}
        #: Tasks already warned about for passing half of task_timeout_sec (each is warned once).
        self._half_warned: set[str] = set()
        #: The last reason logged as a warning, by what it is about (a task, a backend's poll, a
        #: location's submission): the same reason again is logged at DEBUG, not every cycle.
        self._said: dict[str, str] = {}
        #: When each in-flight task was first polled started after being polled ``queued`` (see
        #: :meth:`_clock_start`): kept here too, as the PATCH recording it as ``transfer_info.started``
        #: may fail (API down) and the items then still say ``queued``. Tasks no longer in flight are
        #: dropped each poll.
        self._task_started: dict[str, dt.datetime] = {}
        #: When the unbroken row of failed reads of each in-flight task began (its backend's poll
        #: raised, or left it ``unread``); a read that answers ends the row. A task last seen queued
        #: counts its deadline from here while its reads fail (see :meth:`_clock_start`): from its
        #: submission, one 502 cancelled every task that had waited in its service's queue (Globus:
        #: 3 running tasks per user) longer than task_timeout_sec. In memory only: an agent
        #: restarted during an outage starts the row again at its first failed read. Tasks no
        #: longer in flight are dropped each poll.
        self._unread_since: dict[str, dt.datetime] = {}
        #: When each in-flight task's progress figures were last written into its items (see
        #: PROGRESS_EVERY_SEC); tasks no longer in flight are dropped each poll.
        self._progress_at: dict[str, dt.datetime] = {}
        #: When each tracked task was first seen in flight by this process (``time.monotonic``), for
        #: the quick polls of young tasks (:data:`QUICK_POLL_SEC`).
        self._first_seen: dict[str, float] = {}
        #: Backends whose service asked not to be called before a time (``TransferError.retry_after_sec``:
        #: an HTTP 429's Retry-After): {backend name: until}. Their tasks are not polled (they stay in
        #: flight) nor their batches submitted (they wait, no try used) until then.
        self._hold_until: dict[str, dt.datetime] = {}
        #: The clock of the cycle (tests set their own: deadlines are checked without waiting).
        self.now: Callable[[], dt.datetime] = _now

    # -- backends --------------------------------------------------------------------------------

    def backend(self, name: str) -> TransferBackend:
        if name in self.backends:
            return self.backends[name]
        if name in self.backend_errors:
            raise self.backend_errors[name]
        try:
            cls = get_plugin_manager().load_driver("transfer", name)
        except PluginError as exc:
            # A location whose protocol no installed backend serves: its jobs fail with this reason.
            error = TransferError(f"no transfer backend for protocol {name!r}: {exc}", retryable=False)
        else:
            try:
                options = backend_options(cls, name, self.options)
                backend = build_backend(cls, name, options, site_path=str(self.site_config.site_path))
            except (TransferError, OptionsError) as exc:
                # Bad options of an installed backend: the operator fixes settings.yml and restarts
                # the agent; meanwhile its items wait with this reason (their jobs do not fail).
                error = TransferError(str(exc), retryable=True)
            else:
                try:
                    # Before any submission: messages may name them (Globus' login command).
                    backend.use_locations([loc for loc in self.locations.values() if loc.backend_name == name])
                except Exception as exc:  # a plugin's bug must not keep its items waiting
                    self.logger.warning("transfer backend %s: use_locations failed: %s", name, one_line(exc))
                self.backends[name] = backend
                self.logger.info("transfer backend %s ready (%s)", name, type(backend).__name__)
                return backend
        self.backend_errors[name] = error
        self.logger.error("transfer backend %s: %s", name, error)
        raise error

    def _hold(self, name: str, exc: TransferError, now: dt.datetime) -> str:
        """Hold backend ``name`` off for the ``retry_after_sec`` of ``exc`` (its service's rate limit);
        returns the words its failure's log line adds ('' when the error asks no wait)."""
        wait = getattr(exc, "retry_after_sec", None)
        if not wait or wait <= 0:
            return ""
        self._hold_until[name] = now + dt.timedelta(seconds=float(wait))
        return f"; its service asked for {float(wait):.0f} s without requests: none until then"

    def _held(self, name: str, now: dt.datetime) -> Optional[str]:
        """The reason backend ``name`` is not called this cycle (its Retry-After), else None."""
        until = self._hold_until.get(name)
        if until is None:
            return None
        if now >= until:
            del self._hold_until[name]
            return None
        return (f"transfer backend {name} is rate limited by its service: no requests until "
                f"{until.astimezone(dt.timezone.utc).strftime('%H:%M:%S')} UTC (its Retry-After)")

    def _warn_once(self, key: str, reason: str, message: str, *args: Any) -> None:
        """Log ``message`` as a warning the first time ``key`` has this ``reason``, else at DEBUG."""
        level = logging.DEBUG if self._said.get(key) == reason else logging.WARNING
        self._said[key] = reason
        self.logger.log(level, message, *args)

    def close(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception as exc:  # closing must not stop the agent's shutdown
                self.logger.warning("transfer backend %s did not close cleanly: %s", backend.name, exc)

    # -- the cycle -------------------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, Any], limit: Optional[int] = None) -> list[dict]:
        self.last_cycle_calls += 1
        return list_all(self.client, path, params, limit=limit)

    def _usable(self, item: Mapping[str, Any], now: dt.datetime) -> bool:
        """Whether this cycle can act on ``item``: poll it, or submit it (due, and its location not
        known to be refusing submissions)."""
        if item["state"] in IN_FLIGHT:
            return True
        if str((item.get("transfer_info") or {}).get("reason") or "").startswith(SAME_FILE_WAIT):
            # It waits for an earlier transfer of the same file (one at a time): a page full of them
            # is no work in hand, and the pages after it are read (their items used to start 20
            # cycles late behind 30 stage-outs to one path).
            return False
        return _due(item, now) and not self._held_back(str(item.get("location_alias") or ""), now)

    def _held_back(self, alias: str, now: dt.datetime) -> bool:
        """Whether ``alias`` was refused less than ``retry_backoff_sec`` ago (its batches go last).
        Held back for longer, a location refused once never got a slot again while others kept
        them all (400 items waited until 300 of another location were done, with the stale reason;
        one refused for good neither went nor failed): after the backoff its batches take their
        turn, so a location still refusing costs one slot per ``retry_backoff_sec``."""
        if alias not in self.blocked_aliases:
            return False
        at = self._blocked_at.get(alias)
        return at is not None and (now - at).total_seconds() < self.options.retry_backoff_sec

    def _refused_lately(self, token: str, now: dt.datetime) -> bool:
        """Whether the journaled batch of ``token`` was refused for its own files less than
        ``retry_backoff_sec`` ago (it goes after the cycle's new batches): as for a location
        (:meth:`_held_back`), a batch refused once and still refused costs a slot once per
        ``retry_backoff_sec``, and one whose refusal is over is sent in its turn."""
        at = self._refused_batches.get(token)
        return at is not None and (now - at).total_seconds() < self.options.retry_backoff_sec

    def _read_items(self, now: dt.datetime) -> list[dict]:
        """In-flight and pending items: the first page, then (when it is full of items that wait)
        up to PENDING_PAGES_PER_CYCLE pages of pending items by id, from where the last cycle's
        stopped, until ``num_items_query_limit`` items the cycle can act on are in hand."""
        limit = self.options.num_items_query_limit
        # Even with no transfer_locations left: items created while there were some must still be
        # polled (tasks in flight) or failed with "unknown transfer location", never left waiting.
        items = self._get(
            "/transfers/",
            # In-flight items first: a full page never hides a task that must be polled.
            {"site_id": self.site_id, "state": [TransferItemState.pending.value, *IN_FLIGHT], "ordering": "state"},
            limit=limit,
        )
        usable = sum(1 for it in items if self._usable(it, now))
        pending_read = sum(1 for it in items if it["state"] == TransferItemState.pending.value)
        full = len(items) >= limit
        if full and not pending_read:
            # In-flight items fill the page (transfer_batch_size x max_concurrent_transfers may be more
            # than num_items_query_limit: 1,000 x 10 against 2,000): the tasks past it would be neither
            # polled nor counted, and no pending item read, so no more than 2 of the 10 tasks ran. Read
            # the rest of the in-flight items (bulk pages), then, when a slot is free, pending ones by
            # id (the pages below, from where the last cycle's stopped).
            items.extend(self._rest_in_flight(len(items)))
            if len({it.get("task_id") for it in items if it.get("task_id")}) >= self.options.max_concurrent_transfers:
                return items  # every slot taken: nothing could be submitted
            pending_read, usable = 0, 0
        if not full or usable >= limit:
            self._pending_cursor = 0
            return items
        # The page is full but items that wait without using a try (backoff, a blocked location)
        # fill it: the limit applied before that filter and newer items of other locations never
        # started. Page on through the pending items (the first page held the oldest ones).
        seen = {it["id"] for it in items}
        # The next pages go on by id (id__gt) from the last pending item read: past the first page's
        # pending items (the oldest: ``state`` orders by id within a state), or where the last
        # cycle's pages stopped. Items that left "pending" meanwhile (submitted by the last cycle)
        # then move no other: by offset as many items as left were skipped, until the pages came
        # round again. ``_pending_cursor`` is 0 (right after the first page) or (offset, last id):
        # the offset is where a server without id__gt goes on (read_pages falls back to it).
        offset, after = self._pending_cursor or (0, None)
        first_ids = [it["id"] for it in items if it["state"] == TransferItemState.pending.value]
        offset = max(pending_read, offset)
        after = max([*first_ids, *([after] if after is not None else [])], default=None)
        size = min(limit, MAX_PAGE_SIZE)
        params = {"site_id": self.site_id, "state": [TransferItemState.pending.value], "ordering": "id"}

        get_page = page_fetcher(self.client, "/transfers/")

        def fetch(page_params: dict[str, Any]) -> tuple[int, list[dict]]:
            self.last_cycle_calls += 1
            return get_page(page_params)

        position: Any = 0
        pages = read_pages(fetch, params, page_size=size, by_id=True, offset=offset, after=after, client=self.client)
        for page in itertools.islice(pages, PENDING_PAGES_PER_CYCLE):
            position = (page.offset, page.after)
            for item in page.rows:
                if item["id"] not in seen:
                    seen.add(item["id"])
                    items.append(item)
                    usable += self._usable(item, now)
            if not page.more or usable >= limit:
                # The end, or enough work: the next cycle starts again from the oldest items.
                position = 0
                break
        # Otherwise the next cycle goes on from here, so every pending item is read in turn.
        self._pending_cursor = position
        return items

    def _rest_in_flight(self, offset: int) -> list[dict]:
        """The in-flight items past the first ``offset`` (the first page's), in pages of MAX_PAGE_SIZE
        (one call each: they are bounded by max_concurrent_transfers x transfer_batch_size)."""
        params = {"site_id": self.site_id, "state": list(IN_FLIGHT), "ordering": "state"}
        rest: list[dict] = []
        while True:
            self.last_cycle_calls += 1
            payload = self.client.get("/transfers/", params={**params, "limit": MAX_PAGE_SIZE, "offset": offset})
            page = results(payload)
            rest.extend(page)
            offset += len(page)
            total = payload.get("count") if isinstance(payload, Mapping) else None
            if not page or total is None or offset >= int(total):
                return rest

    def run_cycle(self) -> Optional[float]:
        self.last_cycle_calls = 0
        now = self.now()
        opts = self.options
        items = self._read_items(now)
        #: Each item's state as read (the cycle changes some in place): the log line says whether any moved.
        read_states = {it["id"]: it["state"] for it in items}
        updates: dict[int, dict[str, Any]] = {}
        journal, token_batches, journal_holds = self._read_journal()
        # A task line left by a cycle whose PATCH failed (the API down) is tracked as the start-up
        # tracks those of a dead agent (_load_tracked): when its item is held meanwhile (not read,
        # not re-attached) the line is dropped below, and _cancel_orphaned_tasks still cancels it.
        for item_id, task_id in journal.items():
            self.tracked_tasks.setdefault(task_id, set()).add(item_id)
        reattached: list[dict] = []
        for item in items:
            task_id = journal.get(item["id"])
            # A line without counts (an agent from before they were journaled) is of an item never
            # counted then: 0, so that a hold since (counted by the server, or migration 0023) shows.
            if (task_id and item["state"] == TransferItemState.pending.value and not item.get("task_id")
                    and _holds(item) > journal_holds.get(item["id"], 0)):
                # Held again (and released) since that submission: its task copied from before the
                # parents' new run. Submitted again; the task, tracked from the journal, is
                # cancelled as one whose items left it (_cancel_orphaned_tasks).
                self.logger.info("transfer item %s: not re-attached to task %s of the journal (the item was held "
                                 "again since); it will be submitted again", item["id"], task_id)
                continue
            if task_id and item["state"] == TransferItemState.pending.value and not item.get("task_id"):
                # Submitted by a previous cycle (or agent) that died before recording it: poll, don't resubmit.
                item["state"], item["task_id"] = TransferItemState.active.value, task_id
                # When it was submitted is not known: its deadline counts from now (a stale time of
                # an earlier try would cut it short).
                info = {**_without(item.get("transfer_info"), CLOCK_KEYS), "submitted": now.isoformat()}
                item["transfer_info"] = info
                updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": item["state"], "task_id": task_id,
                                       "transfer_info": info}
                reattached.append(item)
        if reattached:
            self._recover_dests(reattached)
        # Batches journaled with a token are sent again with it (never under a new token): their items
        # are "held" out of this cycle's new batches, and sent with the submissions below.
        resends = self._hold_journaled(token_batches, items)
        in_flight = [it for it in items if it["state"] in IN_FLIGHT]
        for item in in_flight:
            if item.get("task_id"):
                self._task_where.setdefault(str(item["task_id"]), (str(item["direction"]),
                                                                   str(item.get("location_alias") or "")))
        self._cancel_orphaned_tasks(in_flight, now)
        self._finished_tasks = set()
        still_running = self._poll(in_flight, updates, now)

        pending = [it for it in items if it["state"] == TransferItemState.pending.value and it["id"] not in updates]
        due = [it for it in pending if _due(it, now)]
        submitted, kept = self._submit(due, max(0, opts.max_concurrent_transfers - still_running), updates, now,
                                       resends=resends, writers=self._writers(in_flight))

        held: dict[int, dict[str, Any]] = {}
        if updates:
            self.last_cycle_calls += 1
            held = self._send_updates(updates)
        # The PATCH recorded every task id journaled so far: only the batches whose submission with a
        # token may or may not have arrived stay. Keeping the task lines too would re-attach their
        # items to those tasks next cycle, after the tasks failed and the items went back to pending.
        self._rewrite_journal(kept)
        self._resend_tries = {tok: at for tok, at in self._resend_tries.items() if any(r["token"] == tok for r in kept)}
        self._refused_batches = {tok: at for tok, at in self._refused_batches.items()
                                 if any(r["token"] == tok for r in kept)}
        self._track_tasks(in_flight, updates)
        if held:
            self._let_go_of_held(held, in_flight)
        self._task_dests = {tid: dests for tid, dests in self._task_dests.items() if tid in self.tracked_tasks}
        self._task_where = {tid: where for tid, where in self._task_where.items() if tid in self.tracked_tasks}
        self._cancel_retries = {tid: at for tid, at in self._cancel_retries.items() if tid in self.tracked_tasks}
        # Forget the workdirs of jobs with nothing left to move (the cache stays as big as the work).
        live = {int(it["job_id"]) for it in items}
        self.workdirs = {job_id: w for job_id, w in self.workdirs.items() if job_id in live}
        counts = defaultdict(int)
        for update in updates.values():
            # Counted by state only when it changed: a running task's progress carries the state its
            # items already had ('active'), and an update without one a reason (a wait for a slot).
            # Not "?", which read as items in an unknown state.
            state = update.get("state")
            counts[state if state is not None and state != read_states.get(update["id"]) else NO_STATE_CHANGE] += 1
        moved = any("state" in u and u["state"] != read_states.get(u["id"]) for u in updates.values())
        if updates or in_flight:
            # INFO only when an item changed state or a task was submitted: a cycle that only polled
            # running tasks (or wrote their progress, a reason) is DEBUG, else a 6 h Globus task
            # wrote ~4,300 "updates none" lines.
            self.logger.log(
                logging.INFO if moved or submitted else logging.DEBUG,
                "cycle: %d items read, %d tasks in flight, %d tasks submitted; updates %s",
                len(items), still_running, submitted, dict(counts) or "none",
            )
        return self._next_poll()

    def _recover_dests(self, items: list[dict]) -> None:
        """The destinations of ``items``, re-attached to their journaled task (the agent died after
        submitting, before its PATCH recorded them), computed from each item and its job's workdir
        as :meth:`_submit` did (one chunked GET of the workdirs not cached), into their
        ``transfer_info.dest`` (sent with their update): without it such an item wrote nothing in
        :meth:`_writers`, and a job re-created with its workdir went beside its task. One whose job
        or paths cannot be had stays without (its task's failed files then send it again)."""
        self._job_workdirs(int(it["job_id"]) for it in items)
        data_path = Path(self.site_config.data_path)
        for item in items:
            job = self.workdirs.get(int(item["job_id"]))
            if job is None:
                continue
            try:
                _, spec = item_transfer_paths(item, data_path / job[0])
            except TransferError:
                continue
            except Exception as exc:
                # Not the cycle's end (it stopped every item of the site, every cycle): this item
                # stays without, as one whose paths are refused does; its task's outcome decides.
                self.logger.error("transfer item %s (job %s): unexpected error reading its paths: %s",
                                  item["id"], item["job_id"], one_line(f"{type(exc).__name__}: {exc}"),
                                  exc_info=True)
                continue
            item["transfer_info"]["dest"] = spec.dest  # the dict of its update, too

    def _send_updates(self, updates: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """PATCH the cycle's ``updates`` (chunks of MAX_ITEMS_PER_BULK_OP; a refused chunk is sent again
        without the items the refusal names). Returns the updates refused because their item is held
        again (409: ``awaiting_job``, its job sent back to wait for its parents after this cycle read
        it), by item id; in ``updates`` each becomes ``awaiting_job`` (the item leaves its task, and
        the cycle's line counts it). Other refusals are logged at ERROR, as before."""
        sent = list(updates.values())
        refused: list[tuple[Mapping[str, Any], BaseException]] = []
        for chunk in chunks(sent):
            refused.extend(isolate_refused(lambda part: self.client.patch("/transfers/", json=list(part)), list(chunk)))
        held: dict[int, dict[str, Any]] = {}
        other = 0
        for update, exc in refused:
            item_id = int(update["id"])
            if _held_refusal(exc, item_id):
                held[item_id] = dict(update)
                updates[item_id] = {"id": item_id, "state": TransferItemState.awaiting_job.value}
            else:
                other += 1
                self.logger.error("PATCH /transfers/: the server refused the update of item %s: %s", item_id, exc)
        if other:
            self.logger.error("%d transfer item updates were refused by the server", other)
        return held

    def _let_go_of_held(self, held: Mapping[int, Mapping[str, Any]], in_flight: list[dict]) -> None:
        """The items whose update the server refused as held again (:meth:`_send_updates`): nothing of
        them is failed, and they start again when their jobs are released. A task that this cycle
        submitted or polled for them and that no other item uses is cancelled (the backend's cancel):
        it copies files from before the parents' new run. One INFO line per task."""
        read_task = {int(it["id"]): str(it.get("task_id") or "") for it in in_flight}
        by_task: dict[str, list[int]] = defaultdict(list)
        for item_id, update in held.items():
            by_task[str(update.get("task_id") or read_task.get(item_id, ""))].append(item_id)
        for task_id, ids in by_task.items():
            shown = ", ".join(str(i) for i in sorted(ids)[:LOG_EXAMPLES]) + (" ..." if len(ids) > LOG_EXAMPLES else "")
            what = (f"{len(ids)} transfer {'item' if len(ids) == 1 else 'items'} held again ({shown}): their jobs wait "
                    "for their parents again; not recorded, copied again when their jobs are released")
            if not task_id or task_id in self._finished_tasks:
                self.logger.info("%s", what)
                continue
            if task_id in self.tracked_tasks:
                # Other jobs' items are on it (a task is one unit for its service): it runs on for them.
                self.logger.info("%s; task %s runs on for its other items", what, task_id)
                continue
            self._cancel_stale(task_id, ids, f"{what}; task {task_id}")

    def _next_poll(self) -> Optional[float]:
        """Seconds until the next cycle while a young task of a quick-poll backend
        (:attr:`TransferBackend.quick_poll`: local, rsync) is in flight (:data:`QUICK_POLL_SEC`, then
        as long as the youngest has run), else None (the module's period). Tasks of other backends
        (Globus: tasks of minutes) never shorten the period: each quick cycle reads the items, polls
        every backend and writes the updates, for nothing while they run."""
        clock = time.monotonic()
        self._first_seen = {tid: self._first_seen.get(tid, clock) for tid in self.tracked_tasks}
        quick = [at for tid, at in self._first_seen.items() if self._quick_polled(tid.partition(":")[0])]
        if not quick:
            return None
        youngest = clock - max(quick)
        return max(QUICK_POLL_SEC, youngest) if youngest < self.period else None

    def _quick_polled(self, name: str) -> bool:
        """Whether backend ``name`` (built this process) asks for quick polls of its young tasks."""
        backend = self.backends.get(name)
        return backend is not None and bool(getattr(type(backend), "quick_poll", False))

    def _poll(self, in_flight: list[dict], updates: dict[int, dict[str, Any]], now: dt.datetime) -> int:
        """Poll every in-flight task; record item updates; return the number of tasks still running."""
        by_task: dict[str, list[dict]] = defaultdict(list)
        for item in in_flight:
            by_task[item.get("task_id") or ""].append(item)
            if item.get("task_id") and self._dest_of(item):
                self._task_dests.setdefault(str(item["task_id"]), {})[int(item["id"])] = (
                    self._dest_of(item), bool(item.get("recursive")))
        self._task_started = {tid: at for tid, at in self._task_started.items() if tid in by_task}
        self._unread_since = {tid: at for tid, at in self._unread_since.items() if tid in by_task}
        self._progress_at = {tid: at for tid, at in self._progress_at.items() if tid in by_task}
        by_backend: dict[str, list[str]] = defaultdict(list)
        for task_id in by_task:
            name, sep, _ = task_id.partition(":")
            if not sep or not name:
                for item in by_task[task_id]:
                    self._back_to_pending(item, updates, f"in flight without a usable task id ({task_id!r})")
                continue
            by_backend[name].append(task_id)
        running = 0
        for name, task_ids in by_backend.items():
            held = self._held(name, now)
            if held:
                # Its service asked for a pause (a 429's Retry-After, longer than the retries inside the
                # backend's call): the tasks stay in flight as they were; the next poll after it says more.
                self.logger.debug("%s: not polling its %d tasks this cycle", held, len(task_ids))
                running += len(task_ids)
                self._note_deadline_in_hold(task_ids, by_task, held, updates, now)
                continue
            backend: Optional[TransferBackend] = None
            try:
                backend = self.backend(name)
                statuses = backend.poll([tid.partition(":")[2] for tid in task_ids])
            except TransferError as exc:
                # Whatever the refusal (a 400 of the service, a login it wants), it says nothing about
                # the tasks, which may still be writing into the jobs' workdirs: their items stay in
                # flight, and the deadline is the one thing that ends them.
                pause = self._hold(name, exc, now)
                self._warn_once(f"poll:{name}", str(exc), "transfer backend %s: polling %d tasks failed (will retry%s): "
                                "%s", name, len(task_ids), pause or " every cycle", exc)
                reason = one_line(f"cannot poll its task: {exc}")
                # Said again once the poll answers in part with the same failed call: silent (DEBUG)
                # after the outage, the tasks still not read went unmentioned.
                self._forget_unread_said(name, ())
                for tid in task_ids:
                    # Also without a backend (its plugin uninstalled or unloadable): the deadline
                    # still ends the task's items, else their jobs would wait for ever.
                    running += self._not_read(backend, tid, reason, by_task[tid], updates, now)
                continue
            self._said.pop(f"poll:{name}", None)
            # Tasks the poll could not read (one failed call of several): one line per reason (the
            # call's error), not one "is not moving" per task (50 per failed Globus call).
            unread: dict[str, list[str]] = defaultdict(list)
            for tid in task_ids:
                status = statuses.get(tid.partition(":")[2]) or TaskStatus(TaskState.unknown)
                if status.state == TaskState.active and status.unread:
                    unread[status.reason].append(tid)
                    running += self._not_read(backend, tid, status.reason, by_task[tid], updates, now)
                    continue
                self._unread_since.pop(tid, None)  # read: a row of failed reads is over
                if status.state in (TaskState.active, TaskState.inactive):
                    status = self._check_deadline(backend, tid, status, by_task[tid], now)
                if status.state in (TaskState.active, TaskState.inactive):
                    running += 1
                else:
                    self._finished_tasks.add(tid)
                    self._half_warned.discard(tid)
                    self._said.pop(f"task:{tid}", None)
                self._apply_status(tid, status, by_task[tid], updates, now)
            for reason, tids in unread.items():
                self._warn_once(f"unread:{name}:{reason}", reason, "transfer backend %s: %d of %d tasks not read this "
                                "cycle (e.g. %s): %s", name, len(tids), len(task_ids), tids[0], reason)
            self._forget_unread_said(name, unread)
        return running

    def _forget_unread_said(self, name: str, reasons: Iterable[str]) -> None:
        """Forget the "tasks not read" warnings of backend ``name`` but those of ``reasons`` (this
        poll's): a reason seen again after a poll without it is a WARNING again."""
        keep = {f"unread:{name}:{reason}" for reason in reasons}
        for key in [key for key in self._said if key.startswith(f"unread:{name}:") and key not in keep]:
            del self._said[key]

    def _not_read(self, backend: Optional[TransferBackend], task_id: str, reason: str, items: list[dict],
                  updates: dict[int, dict[str, Any]], now: dt.datetime) -> int:
        """A task whose state its backend's poll could not read (the poll failed, or the call for
        this task did: :attr:`TaskStatus.unread`): its items stay in flight as they were, with
        ``reason`` (one last read queued is not taken for started), until it is read again or its
        deadline ends it: counted from its start if known; for one last read queued, from the first
        failed read of this unbroken row of them; else from its submission. Returns 1 while it runs
        on, else 0."""
        self._unread_since.setdefault(task_id, now)
        status = self._check_deadline(backend, task_id, TaskStatus(TaskState.active, reason=reason), items, now,
                                      reported=False)
        if status.state == TaskState.active:
            for item in items:
                self._wait(item, reason, updates)
            return 1
        self._finished_tasks.add(task_id)
        self._half_warned.discard(task_id)
        self._said.pop(f"task:{task_id}", None)
        self._apply_status(task_id, status, items, updates, now)
        return 0

    def _note_deadline_in_hold(self, task_ids: list[str], by_task: dict[str, list[dict]], held: str,
                               updates: dict[int, dict[str, Any]], now: dt.datetime) -> None:
        """The tasks of a held backend past ``task_timeout_sec`` say so on their items; they are not
        ended. Ending one needs its cancel, a request the service asked not to get yet, and its
        items must not go back to pending uncancelled: the task may still be writing into the jobs'
        workdirs, and their files would then be sent a second time beside it. The first poll after
        the hold (a hold lasts at most its Retry-After) cancels them (:meth:`_check_deadline`)."""
        limit = self.options.task_timeout_sec
        for tid in task_ids:
            start = self._clock_start(TaskStatus(TaskState.active), by_task[tid], now, False, task_id=tid,
                                      remembered=self._task_started, failing_since=self._unread_since.get(tid))
            if start is None or (now - start).total_seconds() <= limit:
                continue
            self._warn_once(f"task:{tid}", f"deadline in hold: {held}", "transfer task %s ran past "
                            "transfers.task_timeout_sec (%.0f s); it is cancelled once its backend may be called "
                            "again, unless that poll finds it queued: %s", tid, limit, held)
            for item in by_task[tid]:
                # The hold is why it is not ended yet, shown where no reason is (a reason the
                # backend gave stays: its cancel's error names it as why it was not moving).
                if not (item.get("transfer_info") or {}).get("reason"):
                    self._wait(item, held, updates)

    def _check_deadline(self, backend: Optional[TransferBackend], task_id: str, status: TaskStatus, items: list[dict],
                        now: dt.datetime, *, reported: bool = True) -> TaskStatus:
        """``status`` of a task still running, or a failed status (a try of each of its items) once it
        has run past ``task_timeout_sec`` and was cancelled. ``reported``: ``status`` is what the
        backend said (False: its poll failed, and ``status`` stands in for it)."""
        start = self._clock_start(status, items, now, reported, task_id=task_id, remembered=self._task_started,
                                  failing_since=None if reported else self._unread_since.get(task_id))
        if start is None:
            return status
        age = (now - start).total_seconds()
        limit = self.options.task_timeout_sec
        if age <= limit:
            if age > limit / 2 and task_id not in self._half_warned:
                self._half_warned.add(task_id)
                self.logger.warning("transfer task %s has been running for %.0f s, over half of transfers.task_timeout_sec "
                                    "(%.0f s); it is cancelled if it runs past it", task_id, age, limit)
            return status
        try:
            if backend is None:
                raise TransferError(f"its transfer backend is unavailable ({status.reason or 'cannot be built'})",
                                    retryable=False)
            backend.cancel(task_id.partition(":")[2])
        except TransferError as exc:
            if exc.retryable:
                # It may still be writing: its items are not sent again until it is known to stop.
                self.logger.warning("transfer task %s ran past transfers.task_timeout_sec (%.0f s) but cancelling it "
                                    "failed (will retry): %s", task_id, limit, exc)
                return status
            self.logger.warning("transfer task %s ran past transfers.task_timeout_sec; not cancelled (%s)", task_id, exc)
        error = f"transfer task {task_id} did not finish within {limit:.0f} s (transfers.task_timeout_sec); cancelled"
        why = self._stall_reason(status, items)
        if why:
            error += f" (last reported: {why})"
        # What the task delivered before it stopped is kept: a backend that reports its files' outcomes
        # after a cancel (done, with file_errors for those it did not deliver) is taken at its word.
        after = self._poll_after_cancel(backend, task_id)
        if after is not None and after.state == TaskState.failed:
            # The answer to the agent's own cancel, whatever its words or ``retryable`` say (a
            # backend may call it "task cancelled on request", not retryable): the deadline's, a try
            # of each file. The backend's message is kept. Only a ``done`` answer with
            # ``file_errors_retryable=False`` makes files fail for good (see balsam.transfer).
            # Words that add nothing to "cancelled" (the built-in backends' own) are not repeated.
            said = after.error.strip() if after.error.strip().lower() not in ("cancelled", "canceled") else ""
            if said:
                error = one_line(f"{error}; its backend reports: {said}")
            self.logger.info("transfer task %s ran past transfers.task_timeout_sec (%.0f s) and was cancelled; its "
                             "%d files fail a try%s", task_id, limit, len(items),
                             f" (its backend reports: {one_line(said)})" if said else "")
            return TaskStatus(TaskState.failed, error, retryable=True, info=after.info)
        if after is not None and after.state == TaskState.done:
            self.logger.info("transfer task %s ran past transfers.task_timeout_sec (%.0f s) and was cancelled; its "
                             "backend reports %d failed files, the others delivered", task_id, limit,
                             len(after.file_errors))
            return TaskStatus(TaskState.done, info=after.info,
                              file_errors={key: f"{error}; this file: {why_file}"
                                           for key, why_file in after.file_errors.items()},
                              file_errors_retryable=after.file_errors_retryable,
                              file_errors_attributed=after.file_errors_attributed)
        self.logger.info("transfer task %s ran past transfers.task_timeout_sec (%.0f s): cancelled, its %d files "
                         "fail a try", task_id, limit, len(items))
        return TaskStatus(TaskState.failed, error, retryable=True)

    @staticmethod
    def _stall_reason(status: TaskStatus, items: list[dict]) -> str:
        """Why a task past its deadline was not moving, as far as the agent knows: its backend's reason
        in this poll (a fault its service retries, a pause, a poll that failed), else the reason its
        items carry from an earlier poll ('' when none, or when it only waited for a thread)."""
        if status.state == TaskState.inactive:
            return one_line(f"paused by its service: {status.error}" if status.error else "paused by its service")
        if status.reason and status.reason != QUEUED_REASON and not (status.state == TaskState.active and status.queued):
            return one_line(status.reason)
        for item in items:
            info = item.get("transfer_info") or {}
            reason = str(info.get("reason") or "")
            # A queued task's reason (what it waited for) is no reason it was not moving.
            if reason and reason != QUEUED_REASON and not info.get("queued"):
                return one_line(reason)
        return ""

    def _poll_after_cancel(self, backend: Optional[TransferBackend], task_id: str) -> Optional[TaskStatus]:
        """The task's status right after its cancel (None: no backend, or its poll failed)."""
        if backend is None:
            return None
        raw_id = task_id.partition(":")[2]
        try:
            return backend.poll([raw_id]).get(raw_id)
        except TransferError as exc:
            self.logger.debug("transfer task %s: poll after its cancel failed: %s", task_id, exc)
            return None

    @staticmethod
    def _clock_start(status: TaskStatus, items: list[dict], now: dt.datetime, reported: bool, *, task_id: str = "",
                     remembered: Optional[dict[str, dt.datetime]] = None,
                     failing_since: Optional[dt.datetime] = None) -> Optional[dt.datetime]:
        """Since when a running task's deadline counts (None: it does not count yet).

        A task its backend reports ``queued`` (waiting for a free thread) has not started: no
        deadline yet. Once it is polled started, the deadline counts from that poll
        (``transfer_info.started``, written by :meth:`_apply_status`; ``now`` at that first poll,
        while the items still carry the ``queued`` mark). A task never seen queued (a backend that
        does not say, or a task its backend started at once) counts from its submission. A
        task whose poll failed (``reported`` False) counts from its start if known; one last seen
        queued, from ``failing_since``, the first failed read of the unbroken row of them (None:
        no read failed, its backend held off: not yet); else from its submission. A backend that
        can no longer be asked must not keep its items for ever, yet one failed read must not end a
        task that waited in its service's queue for longer than its deadline.

        ``remembered`` ({task id: start}, the module's memory) holds the start found at that first
        poll until the items record it: should the PATCH writing ``started`` fail (API down), the
        items still say ``queued`` next cycle, and the deadline must not start again at each.
        """
        if reported and status.state == TaskState.active and status.queued:
            return None
        started = [at for at in (_info_time(item, "started") for item in items) if at is not None]
        if started:
            return min(started)
        if remembered is not None and task_id in remembered:
            return remembered[task_id]  # found started by an earlier poll whose update was lost
        if reported and any((item.get("transfer_info") or {}).get("queued") for item in items):
            # It started since the last poll, which found it queued.
            if remembered is not None:
                remembered[task_id] = now
            return now
        if not reported and any((item.get("transfer_info") or {}).get("queued") for item in items):
            return failing_since
        submitted = [at for at in (_info_time(item, "submitted") for item in items) if at is not None]
        # Items of an older agent without the time: counted from their next submission.
        return min(submitted) if submitted else None

    def _apply_status(self, task_id: str, status: TaskStatus, items: list[dict], updates: dict[int, dict[str, Any]],
                      now: dt.datetime) -> None:
        if status.state in (TaskState.active, TaskState.inactive):
            state = status.state.value
            reason = status.error if status.state == TaskState.inactive else status.reason
            queued = status.state == TaskState.active and status.queued
            # Progress alone is written at most every PROGRESS_EVERY_SEC (else every poll rewrote every
            # in-flight item); with a change of state or reason it goes along at once.
            last = self._progress_at.get(task_id)
            progress_due = bool(status.info) and (last is None or (now - last).total_seconds() >= PROGRESS_EVERY_SEC)
            wrote_progress = False
            for item in items:
                info = dict(item.get("transfer_info") or {})
                new_info = dict(info)
                if queued:
                    # Its deadline starts when it does (see _clock_start).
                    new_info["queued"] = True
                elif new_info.pop("queued", None):
                    new_info.setdefault("started", self._task_started.get(task_id, now).isoformat())
                if queued:
                    # What it waits for: the backend's own words (Globus: its queue), else QUEUED_REASON.
                    new_info["reason"] = one_line(reason or QUEUED_REASON)
                elif reason:
                    new_info["reason"] = one_line(reason)
                elif status.state == TaskState.active:
                    new_info.pop("reason", None)  # resumed
                changed = item["state"] != state or new_info != info
                if status.info and (changed or progress_due or "task" not in info):
                    new_info["task"] = _task_figures(status)
                if item["state"] != state or new_info != info:
                    wrote_progress = wrote_progress or new_info.get("task") != info.get("task")
                    updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": state, "transfer_info": new_info}
            if wrote_progress or progress_due:
                self._progress_at[task_id] = now
            if status.state == TaskState.inactive:
                self._warn_once(f"task:{task_id}", reason or "", "transfer task %s is paused by its service: %s",
                                task_id, reason or "no reason given")
            elif queued:
                # Waiting for its turn (the backend's own reason, or QUEUED_REASON): not a task that
                # is not moving, and no warning (its deadline has not started).
                if self._said.get(f"task:{task_id}") != (reason or QUEUED_REASON):
                    self.logger.debug("transfer task %s is queued: %s", task_id, reason or QUEUED_REASON)
                self._said[f"task:{task_id}"] = reason or QUEUED_REASON
            elif reason:
                # Running, but not moving (a fault its service retries until the deadline, an
                # administrator's pause): said once, not taken for a slow task for hours.
                self._warn_once(f"task:{task_id}", reason, "transfer task %s is not moving: %s", task_id, reason)
            else:
                self._said.pop(f"task:{task_id}", None)
        elif status.state == TaskState.done:
            # Items that left the task while it ran on for these (held again, deleted): their files'
            # errors are theirs. Unmatched, they failed a try of every item here (FAILED at
            # max_attempts=1), each of whose own files was delivered.
            polled = {item["id"] for item in items}
            left = [(item_id, dest, recursive) for item_id, (dest, recursive) in self._task_dests.get(task_id, {}).items()
                    if item_id not in polled]
            # Files the backend did not try (NOT_TRIED_INFO): their items go back without a try,
            # so long as the key is an item's own destination (else it is an error as any other).
            spared = _not_tried(status) & {_norm_path(self._dest_of(item)) for item in items if self._dest_of(item)}
            file_errors = {key: error for key, error in status.file_errors.items() if _norm_path(str(key)) not in spared}
            errors, unmatched = match_file_errors(
                [(item["id"], self._dest_of(item), bool(item.get("recursive"))) for item in items] + left,
                file_errors, attributed=status.file_errors_attributed)
            for item_id, _, _ in left:
                if item_id in errors:
                    self.logger.debug("transfer task %s: a failed file of item %s, which left the task (held again, "
                                      "or deleted): dropped: %s", task_id, item_id, errors.pop(item_id))
            if unmatched:
                self.logger.error("transfer task %s reported %d failed files matching none of its items, e.g. %s",
                                  task_id, len(unmatched), next(iter(unmatched)))
            failures: list[tuple[dict, str, bool]] = []
            unknown = untried = 0
            not_tried_errors = {_norm_path(str(key)): error for key, error in status.file_errors.items()}
            for item in items:
                if status.file_errors and not self._dest_of(item):
                    # Recovered from the journal without its destination: which file failed is
                    # unknown, so copy it again rather than call it done.
                    self._back_to_pending(item, updates, f"task {task_id} had failed files and this item's is unknown",
                                          log=False)
                    unknown += 1
                    continue
                error = errors.get(item["id"])
                if error is None and unmatched:
                    # Some file of the task failed and nothing says it is not this item's: done would
                    # lose it. A failed try instead: copied again, and its job fails if it keeps on.
                    key, why = next(iter(unmatched.items()))
                    error = f"task {task_id} reported failed files matching none of its items ({key}: {why})"
                if error is not None:
                    # A backend may say its failed files must not be tried again (the task was
                    # cancelled on purpose); an error matched to no item stays a try (a guess).
                    own = item["id"] in errors
                    failures.append((item, error, status.file_errors_retryable or not own))
                elif _norm_path(self._dest_of(item)) in spared:
                    # Not tried (an earlier file of the task got no answer): submitted again, no try
                    # used, the backend's words as the reason it is pending again.
                    self._back_to_pending(item, updates, f"task {task_id} did not try its file", log=False)
                    pending = updates[item["id"]]["transfer_info"]
                    pending["reason"] = one_line(not_tried_errors[_norm_path(self._dest_of(item))])
                    untried += 1
                else:
                    info = _without(item.get("transfer_info"), ("retry_after", "reason", "error", "queued"))
                    if status.info:
                        info["task"] = _task_figures(status)  # figures of the whole task (all its items)
                    info["completed"] = now.isoformat()
                    updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": TransferItemState.done.value, "transfer_info": info}
            if unknown:
                self.logger.info("transfer task %s had failed files: its %d items recovered without their destination "
                                 "will be submitted again", task_id, unknown)
            if untried:
                self.logger.info("transfer task %s did not try %d of its files (an earlier file got no answer): their "
                                 "items will be submitted again, no try used", task_id, untried)
            self._fail_many(f"transfer task {task_id} (done, {len(items) - len(failures) - unknown - untried} of its "
                            f"{len(items)} items delivered)", failures, updates, now)
        elif status.state == TaskState.failed:
            error = status.error or "transfer task failed"
            self._fail_many(f"transfer task {task_id} failed", [(item, error, status.retryable) for item in items],
                            updates, now)
        else:  # unknown: the task died with a previous agent process, or its service no longer has it
            # The backend's own words when it has some ("Globus does not know task ..."): "agent
            # restarted?" was logged when it had not.
            why = one_line(status.error) if status.error and status.error != UNKNOWN_TASK else "agent restarted?"
            for item in items:
                self._back_to_pending(item, updates, f"task {task_id} is unknown to its backend ({why})", log=False)
            self.logger.info("transfer task %s is unknown to its backend (%s): its %d items will be submitted again",
                             task_id, why, len(items))

    def _file_key(self, direction: str, alias: Any, dest: str, recursive: Any) -> Optional[tuple[str, str, str]]:
        """The file an item writes, as compared between items (see :meth:`_submit`), or None for a
        directory (``recursive``): directories of many jobs merge into one (a results directory,
        as local, rsync and Globus merge them), so they never wait for each other nor for a file.
        A stage-out's location is compared by its address (backend, endpoint or host), with the
        location's path prefix applied: two aliases of one collection write one file."""
        if recursive or not dest:
            return None
        if direction == TransferDirection.stage_in.value:
            return _dest_key(direction, "", dest)
        location = self.locations.get(str(alias or ""))
        if location is None:
            return _dest_key(direction, f"alias {alias}", dest)
        try:
            remote = location.remote_path(dest)
        except TransferError:
            remote = location.prefix + dest  # (its item fails before submission: compared as written)
        kind, _, path = _dest_key(direction, "", remote)
        home = path == "/~" or path.startswith("/~/")
        return kind, _location_address(location, home, self._address(location)), path

    def _address(self, location: TransferLocation) -> str:
        """The location's netloc as its backend spells it (:meth:`TransferBackend.location_address`),
        asked once per location (cached: _file_key runs for every item of a cycle) and of the class, so
        that a backend not built yet (no credentials) still answers. A backend that is not installed
        leaves it as written, with no warning here (its items fail with "no transfer backend for
        protocol ...", see :meth:`backend`); one whose answer fails leaves it as written too, with one
        warning per location."""
        if location in self._addresses:
            return self._addresses[location]
        alias, name, address = location.alias, location.backend_name, location.netloc
        try:
            built = self.backends.get(name)
            cls = type(built) if built is not None else get_plugin_manager().load_driver("transfer", name)
        except PluginError:
            cls = None
        spell = getattr(cls, "location_address", None)
        if callable(spell):
            try:
                address = str(spell(location))
            except Exception as exc:  # a plugin's bug: compared as written, as before the hook
                self.logger.warning("transfer backend %s: location_address(%r) failed (its address is compared as "
                                    "written): %s", name, alias, one_line(exc))
        self._addresses[location] = address
        return address

    def _writers(self, in_flight: list[dict]) -> set[tuple[str, str, str]]:
        """The files (:meth:`_file_key`) that tasks still running write: the items read in flight,
        and every file of each tracked task not found over this cycle (``_task_dests``), also of
        items that left it (deleted with their jobs, held again) while it runs on for others or
        for a cancel that failed: a job re-created with the same workdir writes such a path."""
        writers: set[tuple[str, str, str]] = set()
        for task_id, dests in self._task_dests.items():
            where = self._task_where.get(task_id)
            if task_id in self._finished_tasks or task_id not in self.tracked_tasks:
                continue
            for dest, recursive in dests.values():
                if where is None:
                    # Its location unknown (see _load_tracked): its paths, whatever the location
                    # (_written); skipped, a re-created job's file went beside it.
                    key = None if recursive or not dest else _dest_key(ANYWHERE, "", dest)
                else:
                    key = self._file_key(where[0], where[1], dest, recursive)
                if key is not None:
                    writers.add(key)
        for item in in_flight:
            if item.get("task_id") and str(item["task_id"]) not in self._finished_tasks:
                key = self._file_key(item["direction"], item.get("location_alias"), self._dest_of(item),
                                     item.get("recursive"))
                if key is not None:
                    writers.add(key)
        return writers

    @staticmethod
    def _written(key: Optional[tuple[str, str, str]], dest: str, writers: set[tuple[str, str, str]]) -> bool:
        """Whether file ``key`` (:meth:`_file_key`; ``dest`` as the item names it) is in ``writers``:
        its own key, or its path written by a task of unknown location (:data:`ANYWHERE`)."""
        return key is not None and (key in writers or _dest_key(ANYWHERE, "", dest) in writers)

    def _dest_of(self, item: Mapping[str, Any]) -> str:
        return str((item.get("transfer_info") or {}).get("dest", ""))

    def _back_to_pending(self, item: dict, updates: dict[int, dict[str, Any]], why: str, *, log: bool = True) -> None:
        self.logger.log(logging.INFO if log else logging.DEBUG, "transfer item %s: %s; it will be submitted again",
                        item["id"], why)
        # Its reason was the task's (queued behind the backend's threads, a poll that failed): not
        # what it waits for now. Kept, 'waiting for the transfer backend to start its task' stayed
        # on items re-pended by a restart while they waited for a slot (see _wait_for_slot).
        info = _without(item.get("transfer_info"), ("dest", "reason", *CLOCK_KEYS))
        updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": TransferItemState.pending.value, "task_id": "", "transfer_info": info}

    def _wait(self, item: dict, reason: str, updates: dict[int, dict[str, Any]]) -> None:
        """Keep ``item`` in its state (pending, or in flight) with the reason it waits (shown by `balsam
        transfer ls`); no try used."""
        info = dict(item.get("transfer_info") or {})
        if info.get("reason") != one_line(reason):
            info["reason"] = one_line(reason)
            updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "transfer_info": info}

    def _fail(self, item: dict, error: str, retryable: bool, updates: dict[int, dict[str, Any]], now: dt.datetime) -> str:
        """A failed try of ``item``: back to pending after its backoff, or ``error`` (its job fails) when
        out of tries or not ``retryable``. Returns the new state; logged at DEBUG (the callers log one
        line for a task's or a batch's items: :meth:`_fail_many`)."""
        opts = self.options
        info = dict(item.get("transfer_info") or {})
        attempts = int(info.get("attempts", 0) or 0) + 1
        info.update(attempts=attempts, error=one_line(error))
        # The reason it waited (a slot, a queue, a refusal since cleared) is over with the try: an
        # item in error kept 'waiting for a free transfer slot' beside its error.
        for key in ("dest", "retry_after", "reason", *CLOCK_KEYS):
            info.pop(key, None)
        if retryable and attempts < opts.max_attempts:
            wait = self._backoff(attempts)
            info["retry_after"] = (now + dt.timedelta(seconds=wait)).isoformat()
            state = TransferItemState.pending.value
            self.logger.debug("transfer item %s (job %s) failed (try %d of %d; next in %.0f s): %s",
                              item["id"], item["job_id"], attempts, opts.max_attempts, wait, info["error"])
        else:
            state = TransferItemState.error.value
            why = "cannot succeed" if not retryable else f"failed {attempts} times"
            self.logger.debug("transfer item %s (job %s) %s; its job fails: %s", item["id"], item["job_id"], why,
                              info["error"])
        updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": state, "task_id": "", "transfer_info": info}
        return state

    def _fail_many(self, what: str, failures: list[tuple[dict, str, bool]], updates: dict[int, dict[str, Any]],
                   now: dt.datetime, *, level: Optional[int] = None) -> None:
        """A failed try of each ``(item, error, retryable)``, logged as one line about ``what`` (a task, a
        batch): how many, how many go on to a retry and how many fail their jobs, the error, and a few
        items (each item's own line is at DEBUG). ``level``: the line's, else WARNING, or ERROR when
        some job fails."""
        if not failures:
            return
        final = sum(self._fail(item, error, retryable, updates, now) == TransferItemState.error.value
                    for item, error, retryable in failures)
        count = len(failures)
        fates = []
        if count - final:
            fates.append(f"{count - final} will be retried")
        if final:
            fates.append(f"{final} out of tries or unrecoverable: their jobs fail")
        more = f" and {count - LOG_EXAMPLES} more" if count > LOG_EXAMPLES else ""
        errors = list(dict.fromkeys(one_line(error) for _, error, _ in failures))
        if len(errors) == 1:
            names = ", ".join(f"{item['id']} (job {item['job_id']})" for item, _, _ in failures[:LOG_EXAMPLES])
            detail = f"{errors[0]}; items {names}{more}"
        else:
            detail = "e.g. " + "; ".join(f"item {item['id']} (job {item['job_id']}): {one_line(error, 200)}"
                                         for item, error, _ in failures[:LOG_EXAMPLES]) + more
        self.logger.log(level if level is not None else logging.ERROR if final else logging.WARNING,
                        "%s: %d files failed a try (%s): %s", what, count, ", ".join(fates), detail)

    # -- submission ------------------------------------------------------------------------------

    def _job_workdirs(self, job_ids: Iterable[int]) -> None:
        missing = sorted({int(j) for j in job_ids} - self.workdirs.keys())
        for start in range(0, len(missing), JOB_ID_CHUNK):
            chunk = missing[start:start + JOB_ID_CHUNK]
            for job in self._get("/jobs/", {"id": chunk}):
                self.workdirs[int(job["id"])] = (str(job["workdir"]), str(job["state"]))

    def _submit(self, due: list[dict], slots: int, updates: dict[int, dict[str, Any]], now: dt.datetime, *,
                resends: Iterable[tuple[dict, list[dict]]] = (),
                writers: Optional[set[tuple[str, str, str]]] = None) -> tuple[int, list[dict]]:
        """Submit due items in batches, and send the journaled batches ``resends`` (their records and
        items, from :meth:`_hold_journaled`) again with their tokens. ``slots``: the most submissions
        this cycle, refused ones included. Returns (tasks submitted, the journal
        records to keep: batches sent with a token that failed in a way that may hide a task the
        service started, and journaled batches not sent this cycle; the next cycle sends them with
        their token).

        One submission refused (retrying may fix it or not) stops the location's submissions for the
        cycle: its other batches, journaled ones included, wait with the reason, using no try and no
        slot; a refusal of that batch's own files (``batch_only``) stops none of them. A location refused less than ``retry_backoff_sec`` ago is tried after the others.

        ``writers``: the files (:meth:`_file_key`) tasks still running write. A file item whose file
        a task still running or an earlier item of this cycle writes waits (no try used, reason
        SAME_FILE_WAIT): a backend names a task's failed files by destination, so two items of one
        task writing the same file could not be told apart (a missing file failed a try of both, the
        delivered one too), and two tasks writing it at once left either copy last. They go one at
        a time, by id. Directory items (``recursive``) merge: they wait for nothing, and nothing
        waits for them (a file inside another item's directory neither: see docs/transfers.md)."""
        resends = list(resends)
        writers = set(writers or ())
        for record, _ in resends:
            # A task of its token may be running (its answer was lost), sent again this cycle or not:
            # it writes these files.
            for _, _, dest, recursive in record["files"]:
                key = self._file_key(record["direction"], record["alias"], dest, recursive)
                if key is not None:
                    writers.add(key)
        if not due and not resends:
            return 0, []
        opts = self.options
        #: (alias, direction, the journal record of a batch sent again with its token or None, items)
        units: list[tuple[str, str, Optional[dict], list[dict]]] = [
            (record["alias"], record["direction"], record, members) for record, members in resends]
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for item in due:
            groups[(item["direction"], item["location_alias"])].append(item)
        for (direction, alias), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            group.sort(key=lambda it: it["id"])
            for start in range(0, len(group), opts.transfer_batch_size):
                units.append((alias, direction, None, group[start:start + opts.transfer_batch_size]))
        # A refused submission takes a slot: locations refused within retry_backoff_sec go last (a
        # stable sort), so that their try never takes the slots of locations that work; after that
        # they take their turn (see _held_back). Batches refused for their own files within
        # retry_backoff_sec go after all (see _refused_lately).
        units.sort(key=lambda unit: (unit[2] is not None and self._refused_lately(str(unit[2].get("token")), now),
                                     self._held_back(unit[0], now)))
        # One text whatever took the slots (tasks in flight, submissions refused this cycle): a text
        # that said which changed with every refused try of a location, and every waiting item was
        # PATCHed again each time (twice per retry_backoff_sec, thousands of rows), not once.
        slot_wait = slot_wait_reason(opts.max_concurrent_transfers)
        ready_items = set(self._ready_files.values())
        data_path = Path(self.site_config.data_path)
        left_tasks = self._left_items()
        submitted = calls = 0
        kept: list[dict] = []
        #: Aliases whose submission failed this cycle: {alias: the reason their items wait with}; ''
        #: for a location whose journaled batch waits for a slot (its new batches wait behind it).
        blocked: dict[str, str] = {}
        asked: set[int] = set()
        #: The files of every batch built this cycle, submitted or not: an item waiting behind one of
        #: them keeps its reason (see _end_stale_waits).
        planned: set[tuple[str, str, str]] = set()
        for index, (alias, direction, record, batch) in enumerate(units):
            full = calls >= slots
            if record is not None:
                if full or alias in blocked:
                    # Sent in a later cycle, with its token. New batches of the location wait behind it
                    # (a new token per cycle would grow the journal for as long as the location refuses).
                    kept.append(record)
                    for item in batch:
                        if item["state"] == "held":  # not an item held again (the server refuses it)
                            # The location's refusal of this cycle, else a slot (also behind an
                            # earlier journaled batch waiting for one): they showed no reason.
                            self._wait_for_slot(item, alias, slot_wait, blocked, ready_items, left_tasks, updates)
                    blocked.setdefault(alias, "")
                    continue
                outcome = self._resend(record, batch, updates, now, blocked, kept)
                calls += outcome is not None
                submitted += bool(outcome)
                continue
            if full:
                # (not break: journaled batches further on must stay in the journal.) Its items say
                # why they wait now (see _wait_for_slot).
                for item in batch:
                    self._wait_for_slot(item, alias, slot_wait, blocked, ready_items, left_tasks, updates)
                continue
            if alias in blocked:
                # Trying its other batches would fail the same way: they wait with the reason,
                # without taking the slots of other locations' batches.
                if blocked[alias]:
                    for item in batch:
                        self._wait(item, blocked[alias], updates)
                continue
            try:
                location = self._location(alias)
                backend = self.backend(location.backend_name)
            except TransferError as exc:
                if exc.retryable:
                    for item in batch:
                        self._wait(item, str(exc), updates)
                    blocked[alias] = str(exc)
                else:
                    self._fail_many(f"cannot submit {len(batch)} files to {alias!r}",
                                    [(item, str(exc), False) for item in batch], updates, now)
                continue
            held = self._held(location.backend_name, now)
            if held:
                # Rate limited: the batch waits (no try, no slot) for the next cycle after the pause.
                for item in batch:
                    self._wait(item, held, updates)
                blocked[alias] = held
                continue
            if any(int(it["job_id"]) not in self.workdirs and int(it["job_id"]) not in asked for it in batch):
                # One GET for the batches this cycle may still submit (not one per batch).
                ahead = [b for a, _, r, b in units[index:] if r is None and a not in blocked]
                ahead = ahead[: slots - calls]
                wanted = {int(it["job_id"]) for b in ahead for it in b} - asked
                asked |= wanted
                self._job_workdirs(wanted)
            files: list[TransferFile] = []
            members: list[dict] = []
            #: The files (_file_key) the batch's file items write.
            batch_dests: set[tuple[str, str, str]] = set()
            unfit: list[tuple[dict, str, bool]] = []
            missing: list[dict] = []
            for item in batch:
                job = self.workdirs.get(int(item["job_id"]))
                if job is None:
                    missing.append(item)
                    continue
                workdir_rel, job_state = job
                if JobState(job_state) in DONE_STATES:
                    unfit.append((item, f"not transferred: job {item['job_id']} is already {job_state}", False))
                    continue
                try:
                    local, spec = item_transfer_paths(item, data_path / workdir_rel)
                    # A remote path whose '..' leaves the location's prefix fails its own item here
                    # (the backend would refuse the whole batch, or copy from outside the prefix).
                    location.remote_path(str(item["remote_path"]))
                    if direction == TransferDirection.stage_in.value:
                        # The workdir itself too: a recursive "." slot then merges into it.
                        (data_path / workdir_rel).mkdir(parents=True, exist_ok=True)
                        local.parent.mkdir(parents=True, exist_ok=True)
                except TransferError as exc:
                    unfit.append((item, str(exc), exc.retryable))
                    continue
                except OSError as exc:
                    unfit.append((item, f"cannot create the job's workdir: {exc}", True))
                    continue
                except Exception as exc:
                    # Whatever else one item's paths raise (a link loop's RuntimeError was one) fails
                    # that item, for good (it would raise again), not the cycle: raised out of it, it
                    # stopped every item of the site, every cycle. _fail_many's line names the item
                    # and the error; the traceback is at DEBUG.
                    self.logger.debug("transfer item %s: unexpected error reading its paths", item["id"],
                                      exc_info=True)
                    unfit.append((item, one_line(f"unexpected error reading its paths: {type(exc).__name__}: {exc}"),
                                  False))
                    continue
                writer = left_tasks.get(int(item["id"]))
                if writer:
                    # A task the item left (held again, then released) that runs on for other items
                    # still writes its old copy there: submitted now, the new copy could land first
                    # and the stale one over it, after the job went on. It waits (no try used).
                    self._wait(item, f"waiting for task {writer}, which still writes its destination", updates)
                    continue
                key = self._file_key(direction, alias, spec.dest, spec.recursive)
                if key is not None:
                    if key in batch_dests or self._written(key, spec.dest, writers):
                        # Not the task's id (a new one each time the one before ends): a stable
                        # reason is PATCHed once, not for every waiting row every cycle.
                        self._wait(item, f"{SAME_FILE_WAIT}: {spec.dest} (one at a time, by id)", updates)
                        continue
                    batch_dests.add(key)
                files.append(spec)
                members.append(item)
            planned |= batch_dests
            if missing:
                self.logger.warning("%d transfer items to %r skipped: their jobs were not found (e.g. item %s, job %s)",
                                    len(missing), alias, missing[0]["id"], missing[0]["job_id"])
            self._fail_many(f"a batch of {len(batch)} files to {alias!r} (before its submission)",
                            unfit, updates, now)
            if not files:
                continue
            calls += 1
            token, record = None, None
            try:
                token = backend.submission_token()
                if token:
                    record = self._journal_token(token, alias, direction, members, files)
                task_id = backend.submit(location, TransferDirection(direction), files, token)
            except TransferError as exc:
                # A refusal of this batch's own files (``batch_only``) holds back none of the location's
                # other batches: taken for the location's, one batch Globus refused while another task
                # wrote its paths kept every other batch of the location waiting as long as that task ran.
                own = getattr(exc, "batch_only", False)
                if not own:
                    blocked[alias] = str(exc)
                if exc.retryable:
                    # The service, not the files: keep the items pending without using up their tries.
                    if own and token:
                        self._refused_batches[token] = now
                    pause = self._hold(location.backend_name, exc, now)
                    self._warn_once(f"batch:{token}" if own else f"submit:{alias}", str(exc), "transfer backend %s: "
                                    "submitting %d files to %s failed (will retry%s): %s", backend.name, len(files),
                                    alias, pause, exc)
                    if record:
                        # It may have arrived (a timeout after the service took it): the journal keeps
                        # the token, so the next cycle sends the batch again with it, and the service
                        # answers with the task it has rather than starting a second one.
                        kept.append(record)
                        writers |= batch_dests  # its task may be writing them
                    for item in members:
                        self._wait(item, str(exc), updates)
                else:
                    # Refused, and the same request would be refused again: the contract cannot tell
                    # a refusal of the whole request (an endpoint to activate, a permission to grant,
                    # a limit of the service) from one of these files, so it is taken for the
                    # request's. This batch's files each fail a try (their backoff, then max_attempts,
                    # as a failed task's do); the location's other batches wait for the next cycle,
                    # rather than every item of the location failing at once.
                    self._fail_many(f"transfer backend {backend.name} refused the submission of {len(files)} files to "
                                    f"{alias!r}" + ("" if own else " (the location's other batches wait for the next cycle)"),
                                    [(item, str(exc), True) for item in members], updates, now, level=logging.ERROR)
                continue
            full_id = f"{location.backend_name}:{task_id}"
            writers |= batch_dests
            self._journal(full_id, members)
            self._task_dests[full_id] = {int(it["id"]): (spec.dest, spec.recursive) for it, spec in zip(members, files)}
            self._task_where[full_id] = (direction, alias)
            for item, spec in zip(members, files):
                info = _without(item.get("transfer_info"), ("retry_after", "reason", *CLOCK_KEYS))
                info.update(dest=spec.dest, submitted=now.isoformat())
                updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": TransferItemState.active.value, "task_id": full_id,
                                       "transfer_info": info}
            submitted += 1
            self.blocked_aliases.pop(alias, None)
            self._blocked_at.pop(alias, None)
            self._said.pop(f"submit:{alias}", None)
        # Aliases not tried this cycle keep what the last try said (and when).
        for alias, why in blocked.items():
            if why:
                self.blocked_aliases[alias] = why
                self._blocked_at[alias] = now
        self._end_stale_waits(due, writers | planned, updates)
        return submitted, kept

    def _wait_for_slot(self, item: dict, alias: str, slot_wait: str, blocked: Mapping[str, str],
                       ready_items: set[int], left_tasks: Mapping[int, str], updates: dict[int, dict[str, Any]]) -> None:
        """``item`` (due, pending) finds no free slot this cycle: it shows what it waits for now. Only
        a reason that is still true is kept: a same-file wait (:meth:`_end_stale_waits` ends it), the
        location's refusal while it stands (refused this cycle: that reason; refused earlier and not
        tried since: the reason it shows, if that refusal's), a task it left that still writes its
        destination. Any other reason it carries is over (a location's refusal that has cleared, an
        older agent's queue reason), and it shows ``slot_wait``: such a reason stayed on it while it
        waited for a slot, beside items saying they waited for one. An item just made ready behind a
        same-file wait (its reason cleared; _end_stale_waits finds it by that) stays as it is."""
        reason = str((item.get("transfer_info") or {}).get("reason") or "")
        if reason.startswith(SAME_FILE_WAIT) or (not reason and item["id"] in ready_items):
            return
        if blocked.get(alias):
            self._wait(item, blocked[alias], updates)
            return
        standing = self.blocked_aliases.get(alias)
        writer = left_tasks.get(int(item["id"]))
        if reason and (
                (standing and reason == one_line(standing))
                or (writer and reason == one_line(f"waiting for task {writer}, which still writes its destination"))):
            return
        self._wait(item, slot_wait, updates)

    def _end_stale_waits(self, due: list[dict], writers: set[tuple[str, str, str]],
                         updates: dict[int, dict[str, Any]]) -> None:
        """Clear the SAME_FILE_WAIT reason of the due items still pending whose file no task writes
        now (``writers``: also this cycle's submissions), the first by id of each file: the task it
        waited for ended while no slot was free for it. It kept the reason, which said it waited
        for a transfer no longer running, and counted as no work in hand (:meth:`_usable`). It now
        goes at the next free slot. The others of that file wait on behind it, their row unchanged.
        Computed each cycle (the workdirs are cached; one chunked GET of those that are not)."""
        waiting = []
        #: Files whose item made ready by an earlier cycle is still pending and ready: the items
        #: behind it keep waiting.
        first: set[tuple[str, str, str]] = set()
        ready = {item_id: key for key, item_id in self._ready_files.items()}
        self._ready_files = {}
        for item in due:
            update = updates.get(item["id"], {})
            info = update.get("transfer_info", item.get("transfer_info")) or {}
            if "state" in update:
                continue
            if str(info.get("reason") or "").startswith(SAME_FILE_WAIT):
                waiting.append((item, info))
            elif item["id"] in ready and not info.get("reason"):
                first.add(ready[item["id"]])
                self._ready_files[ready[item["id"]]] = item["id"]
        if not waiting:
            return
        stage_in = TransferDirection.stage_in.value
        self._job_workdirs(int(it["job_id"]) for it, _ in waiting
                           if it["direction"] == stage_in and int(it["job_id"]) not in self.workdirs)
        data_path = PurePosixPath(self.site_config.data_path)
        #: {(direction, alias, dest, recursive): its file, or None when written or a directory}
        keys: dict[tuple[Any, Any, str, bool], Optional[tuple[str, str, str]]] = {}
        for item, info in sorted(waiting, key=lambda pair: pair[0]["id"]):
            # Its destination as item_transfer_paths gave it when it was made to wait (its paths were
            # checked then), without that function's resolving of the workdir on the file system:
            # thousands of waiting rows are read each cycle.
            if item["direction"] == stage_in:
                job = self.workdirs.get(int(item["job_id"]))
                if job is None:
                    continue
                rel = str(item.get("local_path") or ".")
                if PurePosixPath(rel).parts in ((), (".",)) and not item.get("recursive"):
                    rel = str(item["remote_path"]).rstrip("/").rpartition("/")[2]
                dest = f"{data_path}/{job[0]}/{rel}"  # (spelt one way by _dest_key)
            else:
                dest = str(item["remote_path"])
            spelt = (item["direction"], item.get("location_alias"), dest, bool(item.get("recursive")))
            if spelt not in keys:  # (most rows waiting are behind a few files: each is keyed once)
                key = self._file_key(*spelt)
                keys[spelt] = None if key is None or self._written(key, dest, writers) else key
            key = keys[spelt]
            if key is None or key in first:
                continue
            first.add(key)
            self._ready_files[key] = int(item["id"])
            updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"],
                                   "transfer_info": _without(info, ("reason",))}

    def _left_items(self) -> dict[int, str]:
        """{item id: the task still in flight (tracked, not found over this cycle: one that ended or
        was cancelled is not) that it was submitted to}: for a due (pending) item, a task it left
        (held again and released, or re-pended by a re-run) that still runs, for other items or for
        a cancel that failed, and may still write the old copy into its destination. By item id,
        not by path: a task writing a folder that holds other items' destinations (a recursive
        stage-out into a location's root) holds back no one else's item."""
        left: dict[int, str] = {}
        for task_id, ids in self.tracked_tasks.items():
            if task_id in self._finished_tasks:
                continue
            for item_id in itertools.chain(ids, self._task_dests.get(task_id, ())):
                left[item_id] = task_id
        return left

    def _resend(self, record: dict, members: list[dict], updates: dict[int, dict[str, Any]], now: dt.datetime,
                blocked: dict[str, str], kept: list[dict]) -> Optional[bool]:
        """Send a journaled batch again with its token (a dead agent's, or one whose submission failed):
        the service answers with the task it already has, or starts it if it never got it. Returns
        True (submitted), False (refused: kept in ``kept`` when retrying may work, else its items fail
        and it leaves the journal), None (not sent: its location or backend is unavailable).

        A stale batch (an item held again since the token was journaled: ``awaiting_job`` now, or
        released since, its count of holds ahead of the record's) is sent only for the task that
        answers, which is cancelled (:meth:`_cancel_stale`); its pending items go in a new batch, and
        a refusal for good fails none of them (the service has no task of that token to cancel)."""
        alias = record["alias"]
        files = [TransferFile(src, dest, rec) for _, src, dest, rec in record["files"]]
        # The items this cycle may update: ``members`` also holds those held again, which the server
        # refuses to update (and those finished meanwhile: a stale batch is sent with any of them).
        live = [m for m in members if m["state"] == "held"]
        journaled = record.get("holds") or [0] * len(files)
        count = {int(i): n for (i, *_), n in zip(record["files"], journaled)}
        # Items gone since the token was journaled: deleted with their jobs (not among ``members``),
        # or no longer pending. The task that answers still writes their files.
        kept_ids = {int(m["id"]) for m in members
                    if m["state"] in ("held", TransferItemState.awaiting_job.value)}
        gone = [int(i) for i, *_ in record["files"] if int(i) not in kept_ids]
        held_again = any(m["state"] == TransferItemState.awaiting_job.value or _holds(m) > count.get(int(m["id"]), 0)
                         for m in members)
        # Also with nothing pending left to record the task on (every item gone): sent only to cancel it.
        # Sent all the same, not dropped: its submission's answer was lost, so the service may have
        # started the task, and this token is the one handle on it; dropped, it ran on untracked
        # into the deleted jobs' workdirs (which a re-created job may use again).
        stale = held_again or not live
        why = ("some of its items were held again since (their jobs re-run)" if held_again
               else "none of its items is left (deleted with their jobs, or finished)")
        token = str(record["token"])
        if not live:
            if now < self._resend_tries.get(token, (0, now))[1]:
                kept.append(record)  # in its backoff: sent later with its token
                return None
        try:
            location = self._location(alias)
            backend = self.backend(location.backend_name)
        except TransferError as exc:
            if exc.retryable:
                if live or self._resend_failed(record, exc, now):
                    kept.append(record)
                blocked[alias] = str(exc)
                for item in live:
                    self._wait(item, str(exc), updates)
            elif stale:
                # No backend to ask: nothing to cancel through it either.
                self._resend_tries.pop(token, None)
                self.logger.info("a stale journaled batch of %d files to %r (%s) cannot be sent again to cancel its "
                                 "task: %s", len(files), alias, why, exc)
            else:
                # The alias left settings.yml (or no backend serves it): as a first submission would.
                self._fail_many(f"a journaled batch of {len(files)} files to {alias!r} cannot be sent again",
                                [(item, str(exc), False) for item in live], updates, now)
            return None
        held = self._held(location.backend_name, now)
        if held:
            # Rate limited: sent with its token after the pause.
            kept.append(record)
            blocked[alias] = held
            for item in live:
                self._wait(item, held, updates)
            return None
        try:
            task_id = backend.submit(location, TransferDirection(record["direction"]), files, record["token"])
        except TransferError as exc:
            own = getattr(exc, "batch_only", False)  # the batch's own files: the location's others go on
            if not own:
                blocked[alias] = str(exc)
            if stale and (own or not exc.retryable):
                # Refused for good, or for its own files (no task started for it either): the service
                # holds no task of that token, so nothing copies the old files; the record leaves the
                # journal and its pending items go in a new batch. (Kept on a refusal of its files, it
                # was sent every cycle, and once the refusal ended the task started for it was cancelled.)
                self._said.pop(f"batch:{token}", None)
                self._resend_tries.pop(token, None)
                self.logger.info("a stale journaled batch of %d files to %r (%s) was refused when sent again to "
                                 "cancel its task; nothing to cancel: %s", len(files), alias, why, exc)
                return False
            if not exc.retryable:
                # Refused for good: the record leaves the journal instead of being sent again every
                # cycle forever, and its files each fail a try, as a first submission's refused for good
                # do (the contract cannot tell a refusal of the request, e.g. a permission to grant, from
                # one of the files): their backoff, then max_attempts, not their jobs failing at once.
                self._said.pop(f"batch:{token}", None)
                self._fail_many(f"re-sending a journaled batch of {len(files)} files to {alias!r} was refused"
                                + ("" if own else " (the location's other batches wait for the next cycle)"),
                                [(item, str(exc), True) for item in live], updates, now, level=logging.ERROR)
                return False
            # Keyed by location as a first submission's "will retry" is: one warning per reason (by
            # token for a refusal of the batch's own files, which the location's next task does not end).
            if own:
                self._refused_batches[token] = now
            pause = self._hold(location.backend_name, exc, now)
            self._warn_once(f"batch:{token}" if own else f"submit:{alias}", str(exc), "re-sending a journaled batch "
                            "of %d files to %s failed (will retry%s): %s", len(files), alias, pause, exc)
            if live or self._resend_failed(record, exc, now):
                kept.append(record)
            for item in live:
                self._wait(item, str(exc), updates)
            return False
        self._said.pop(f"submit:{alias}", None)
        self._said.pop(f"batch:{token}", None)
        self.blocked_aliases.pop(alias, None)
        self._blocked_at.pop(alias, None)
        full_id = f"{location.backend_name}:{task_id}"
        self._resend_tries.pop(token, None)
        dests = {int(i): (dest, rec) for i, _, dest, rec in record["files"]}
        self._task_where[full_id] = (str(record["direction"]), alias)
        if stale:
            # An item was held again since the token was journaled (still held, or released): the
            # task that answers it may be the one the service started then, copying files from
            # before the parents' new run. Cancelled; the pending items go in a new batch. So is a
            # task none of whose items is left (deleted with their jobs): nothing would look at it.
            self._cancel_stale(full_id, dests, f"journaled batch of {len(files)} files re-sent with its token: task "
                               f"{full_id}; {why}")
            return True
        self._journal(full_id, live)
        # Also the destinations of the items gone: the task writes them still (items that left it).
        self._task_dests[full_id] = dests
        self.logger.info("journaled batch of %d files re-sent with its token: task %s", len(files), full_id)
        if gone:
            # Part of one task for the service: not cancelled for them (its other items would be
            # copied again beside it); tracked, it runs on for the others and their files are
            # dropped from its outcome (_apply_status).
            shown = ", ".join(str(i) for i in gone[:LOG_EXAMPLES]) + (" ..." if len(gone) > LOG_EXAMPLES else "")
            self.logger.info("transfer task %s also copies the files of %d items deleted (with their jobs) or finished "
                             "since its batch was journaled (%s): it runs on, tracked, for its other %d items",
                             full_id, len(gone), shown, len(live))
        for item in live:
            dest, _ = dests[int(item["id"])]
            info = _without(item.get("transfer_info"), ("retry_after", "reason", *CLOCK_KEYS))
            info.update(dest=dest, submitted=now.isoformat())
            item["state"], item["task_id"] = TransferItemState.active.value, full_id
            updates[item["id"]] = {**updates.get(item["id"], {}), "id": item["id"], "state": item["state"], "task_id": full_id,
                                   "transfer_info": info}
        return True

    def _backoff(self, tries: int) -> float:
        """Seconds before the next of ``tries`` failed tries: as a failed file's (retry_backoff_sec,
        doubling, up to retry_backoff_max_sec)."""
        opts = self.options
        return min(opts.retry_backoff_max_sec, opts.retry_backoff_sec * 2 ** max(0, tries - 1))

    def _resend_failed(self, record: dict, exc: TransferError, now: dt.datetime) -> bool:
        """A journaled batch none of whose items is left failed to be sent again (only to find the
        task its token may name, and cancel it) for a reason retrying may fix: sent again after a
        backoff, MAX_CANCEL_TRIES times at most (it was sent every cycle forever while its location
        refused); then dropped, with one WARNING naming the token. Returns whether it is kept."""
        token = str(record["token"])
        tries = self._resend_tries.get(token, (0, now))[0] + 1
        if tries < MAX_CANCEL_TRIES:
            self._resend_tries[token] = (tries, now + dt.timedelta(seconds=self._backoff(tries)))
            return True
        self._resend_tries.pop(token, None)
        self.logger.warning("a journaled batch of %d files to %r, none of whose items is left (deleted with their "
                            "jobs, or finished), could not be sent again with its submission token %s to cancel the "
                            "task it may have started (%d tries; last: %s): dropped; a task of that token is left to "
                            "the service", len(record["files"]), record["alias"], token, tries, one_line(exc))
        return False

    def _cancel_failed(self, task_id: str, exc: TransferError, what: str = "") -> bool:
        """The cancel of tracked task ``task_id`` failed for a reason retrying may fix: tried again
        after a backoff (:meth:`_backoff`), MAX_CANCEL_TRIES times at most: it was tried every cycle
        forever (a cancel the service keeps refusing, a 503 for hours). Then the task is left to its
        service (untracked: what it writes no longer holds back other items), with one WARNING
        naming it. Returns whether it is still tracked (the caller drops it otherwise). ``what``:
        why it was cancelled, said first in the line of the first failure (that line is the only
        one about this cancel: an INFO line before it said the same event twice)."""
        now = self.now()
        tries = self._cancel_retries.get(task_id, (0, now))[0] + 1
        if tries < MAX_CANCEL_TRIES:
            wait = self._backoff(tries)
            self._cancel_retries[task_id] = (tries, now + dt.timedelta(seconds=wait))
            self.logger.log(logging.WARNING if tries == 1 else logging.DEBUG,
                            "%s failed (try %d of %d; next in %.0f s): %s",
                            f"{what}; cancelling it" if what else f"transfer task {task_id}: cancelling",
                            tries, MAX_CANCEL_TRIES, wait, exc)
            return True
        self._cancel_retries.pop(task_id, None)
        self.logger.warning("transfer task %s: cancelling failed %d times (last: %s): left to its service, no longer "
                            "tracked (it may still run and write its files)", task_id, tries, one_line(exc))
        return False

    def _cancel_stale(self, task_id: str, items: "Iterable[int] | dict[int, tuple[str, bool]]", what: str) -> None:
        """Cancel ``task_id``, a copy of files from before a re-run's parents ran again; on a cancel
        that failed for a reason retrying may fix, it is tracked with ``items`` (the held items, or
        their destinations where known: those wait for it) and tried again after a backoff
        (:meth:`_cancel_failed`, _cancel_orphaned_tasks). One line, ``what`` first: INFO, or the
        WARNING of the first failed try."""
        name, _, raw_id = task_id.partition(":")
        try:
            self.backend(name).cancel(raw_id)
        except TransferError as exc:
            if exc.retryable:
                if self._cancel_failed(task_id, exc, what):
                    self.tracked_tasks[task_id] = set(items)
                    if isinstance(items, dict):
                        self._task_dests[task_id] = items
                    self._write_tracked()
            else:
                self.logger.info("%s; not cancelled (%s)", what, exc)
        else:
            self.logger.info("%s; cancelled", what)

    def _location(self, alias: str) -> TransferLocation:
        if alias in self.location_errors:
            raise self.location_errors[alias]
        location = self.locations.get(alias)
        if location is None:
            known = ", ".join(sorted(self.locations)) or "none"
            raise TransferError(
                f"unknown transfer location {alias!r} (settings.yml transfers.transfer_locations has: {known})",
                retryable=False,
            )
        return location

    # -- tasks whose items were deleted ----------------------------------------------------------

    def _load_tracked(self) -> dict[str, set[int]]:
        """The tasks in flight when the last agent stopped (what their items write goes into
        ``_task_dests``), and those of journal lines it left (a task submitted by an agent that died
        before recording it: its jobs may be deleted since)."""
        tracked: dict[str, set[int]] = defaultdict(set)
        try:
            data = json.loads(self.tasks_path.read_text(encoding="utf-8"))
            for task_id, entry in dict(data).items():
                # {"item_ids": [...], "dests": {item id: [dest, recursive]}}; a file of an agent
                # before the dests were kept has the item ids alone.
                item_ids = entry["item_ids"] if isinstance(entry, dict) else entry
                tracked[str(task_id)].update(int(i) for i in item_ids)
                if isinstance(entry, dict) and entry.get("dests"):
                    self._task_dests[str(task_id)] = {int(i): (str(dest), bool(recursive))
                                                      for i, (dest, recursive) in dict(entry["dests"]).items()}
                if isinstance(entry, dict) and entry.get("where"):
                    direction, alias = entry["where"]
                    self._task_where[str(task_id)] = (str(direction), str(alias))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self.logger.warning("cannot read %s (tasks of deleted jobs may not be cancelled): %s", self.tasks_path, exc)
        unknown = sum(1 for task_id, dests in self._task_dests.items() if task_id not in self._task_where and dests)
        if unknown:
            # Not guessed from its paths (a stage-out may write inside the data path as a stage-in
            # does): :meth:`_writers` holds back every item writing one of its destination paths,
            # whatever its location, until it ends. Said once.
            self.logger.info("%s: %d tasks recorded without their location (by an earlier agent): until they end, "
                             "an item writing one of their destination paths waits for them, whatever its location",
                             self.tasks_path, unknown)
        journal, _, _ = self._read_journal()
        for item_id, task_id in journal.items():
            tracked[task_id].add(item_id)
        return dict(tracked)

    def _cancel_orphaned_tasks(self, in_flight: list[dict], now: Optional[dt.datetime] = None) -> None:
        """Cancel the tracked tasks none of whose items is still in flight on the server: their
        items were deleted with their jobs, and nothing would ever look at what they copy. One whose
        cancel failed is asked about (and cancelled) again after its backoff (:meth:`_cancel_failed`)."""
        now = now or self.now()
        seen = {str(it.get("task_id") or "") for it in in_flight}
        missing = {tid: ids for tid, ids in self.tracked_tasks.items() if tid not in seen
                   and not (tid in self._cancel_retries and now < self._cancel_retries[tid][1])}
        if not missing:
            return
        # Not in this cycle's page is not gone (the page may be full): ask for those items by id.
        ids = sorted(set().union(*missing.values()))
        alive: set[str] = set()
        returned: set[int] = set()
        held: set[int] = set()
        for start in range(0, len(ids), JOB_ID_CHUNK):
            params = {"site_id": self.site_id, "id": ids[start:start + JOB_ID_CHUNK]}
            for item in self._get("/transfers/", params):
                returned.add(int(item["id"]))
                if item["state"] in IN_FLIGHT:
                    alive.add(str(item.get("task_id") or ""))
                elif item["state"] == TransferItemState.awaiting_job.value:
                    held.add(int(item["id"]))
        for task_id, item_ids in missing.items():
            if task_id in alive:
                continue
            name, _, raw_id = task_id.partition(":")
            # Said once per task, not on every retry of a cancel that failed.
            first = task_id not in self._cancel_retries
            said = ""
            if first:
                # "Deleted" only for the items the GET did not return. The others are there, off the
                # task: held again mid-task (jobs_logic._hold_stage_ins: its copy is of files from
                # before the parents' new run), or since released or restarted by a re-run.
                fates = {"were deleted (with their jobs)": set(item_ids) - returned,
                         "are held again (their jobs wait for their parents again)": set(item_ids) & held,
                         "left the task (held again or restarted)": set(item_ids) & returned - held}
                named = [(why, len(some)) for why, some in fates.items() if some]
                if len(named) == 1:
                    why = f"its items {named[0][0]}"
                else:
                    why = "of its items, " + ", ".join(f"{n} {what}" for what, n in named)
                said = f"transfer task {task_id}: {why}"
            try:
                self.backend(name).cancel(raw_id)
            except TransferError as exc:
                if exc.retryable:
                    # One line about this failed cancel, why first (_cancel_failed), not an INFO
                    # "cancelling it" and then a WARNING about the same cancel.
                    if self._cancel_failed(task_id, exc, said):
                        continue
                    said = ""  # (MAX_CANCEL_TRIES 1: its WARNING said it all)
                elif said:
                    self.logger.info("%s; cancelling it", said)
                if not exc.retryable:
                    # Already finished, or a service that cannot cancel: nothing more to do.
                    self.logger.info("transfer task %s was not cancelled (%s); forgotten", task_id, exc)
            else:
                if said:
                    self.logger.info("%s; cancelling it", said)
                self.logger.info("transfer task %s cancelled", task_id)
            self._cancel_retries.pop(task_id, None)
            del self.tracked_tasks[task_id]

    def _track_tasks(self, in_flight: list[dict], updates: Mapping[int, Mapping[str, Any]]) -> None:
        """Keep ``tracked_tasks`` in step with this cycle: an item read in flight belongs to its task;
        then the updates sent have the last word (a submitted item joins its task; a done, failed or
        re-pended one leaves it)."""
        tracked: dict[str, set[int]] = defaultdict(set)
        owner: dict[int, str] = {}
        for tid, ids in self.tracked_tasks.items():
            tracked[tid] = set(ids)
            owner.update(dict.fromkeys(ids, tid))

        def assign(item_id: int, task_id: str) -> None:
            old = owner.pop(item_id, None)
            if old is not None:
                tracked[old].discard(item_id)
            if task_id:
                tracked[task_id].add(item_id)
                owner[item_id] = task_id

        for item in in_flight:
            if item.get("task_id"):
                assign(int(item["id"]), str(item["task_id"]))
        for item_id, update in updates.items():
            if "state" not in update:
                continue  # a reason only
            if update["state"] in IN_FLIGHT:
                assign(int(item_id), str(update.get("task_id") or owner.get(int(item_id)) or ""))
            else:
                assign(int(item_id), "")
        self.tracked_tasks = {tid: ids for tid, ids in tracked.items() if ids and tid not in self._finished_tasks}
        if self._tracked_record() != self._tracked_saved:
            self._write_tracked()

    def _tracked_record(self) -> dict[str, dict[str, Any]]:
        """What TASKS_NAME keeps: {task id: {"item_ids": [...], "dests": {item id: [dest, recursive]},
        "where": [direction, alias] (when known)}}."""
        return {tid: {"item_ids": sorted(ids),
                      "dests": {str(i): [dest, recursive] for i, (dest, recursive)
                                in sorted(self._task_dests.get(tid, {}).items())},
                      **({"where": list(self._task_where[tid])} if tid in self._task_where else {})}
                for tid, ids in self.tracked_tasks.items()}

    def _write_tracked(self) -> None:
        record = self._tracked_record()
        try:
            if not record:
                self.tasks_path.unlink(missing_ok=True)
            else:
                tmp = self.tasks_path.with_name(self.tasks_path.name + ".tmp")
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(record, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.tasks_path)
        except OSError as exc:
            self.logger.warning("cannot write %s: %s", self.tasks_path, exc)
            return
        self._tracked_saved = record

    # -- journal of submitted tasks not yet recorded in the API -----------------------------------

    def _journal(self, task_id: str, members: list[dict]) -> None:
        # With each item's count of holds as read (``transfer_info.holds``, raised by the server each
        # time it holds the item again): a line whose count is behind the item's is of a submission
        # made before a hold, and is not re-attached (see run_cycle).
        line = json.dumps({"task_id": task_id, "item_ids": [m["id"] for m in members],
                           "holds": [_holds(m) for m in members]}) + "\n"
        with open(self.journal_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def _journal_token(self, token: str, alias: str, direction: str, members: list[dict], files: list[TransferFile]) -> dict:
        record = {"token": token, "alias": alias, "direction": direction,
                  "files": [[it["id"], f.src, f.dest, f.recursive] for it, f in zip(members, files)],
                  "holds": [_holds(it) for it in members]}
        with open(self.journal_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def _read_journal(self) -> tuple[dict[int, str], list[dict], dict[int, int]]:
        """(task id by item id, batches journaled with a submission token but no task id yet, each
        item's count of holds when its task line was written: lines of older agents have none)."""
        try:
            text = self.journal_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, [], {}
        except OSError as exc:
            self.logger.warning("cannot read %s: %s", self.journal_path, exc)
            return {}, [], {}
        found: dict[int, str] = {}
        holds: dict[int, int] = {}
        tokens: list[dict] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
                if "token" in record:
                    tokens.append({"token": str(record["token"]), "alias": str(record["alias"]),
                                   "direction": str(record["direction"]),
                                   "files": [(int(i), str(a), str(b), bool(r)) for i, a, b, r in record["files"]],
                                   "holds": [int(n) for n in record.get("holds") or ()]})
                    continue
                for item_id in record["item_ids"]:
                    found[int(item_id)] = str(record["task_id"])
                holds.update(zip((int(i) for i in record["item_ids"]), (int(n) for n in record.get("holds") or ())))
            except (ValueError, KeyError, TypeError):
                # The last line of an agent killed while writing it; that task's items are resubmitted.
                self.logger.warning("%s:%d: unreadable line skipped", self.journal_path, number)
        tokens = [b for b in tokens if not any(i in found for i, *_ in b["files"])]
        return found, tokens, holds

    def _hold_journaled(self, batches: list[dict], items: list[dict]) -> list[tuple[dict, list[dict]]]:
        """The batches journaled with a token (their submission unconfirmed) still to send, each with
        its items, which are marked ``held``: this cycle puts them in no new batch under a new token.

        Members this cycle did not read (every slot taken, a full first page: pending items are then
        not read at all) are read by id, in one (chunked) GET: an unread member is no gone member,
        and dropping its record would send its files again under a new token, beside a task the
        service may have started under the old one. A batch is dropped only when one of its items
        is recorded with a task (the PATCH recording it went through). One with an item gone (deleted
        with its job: not returned by that GET; or no longer pending) is sent again with its token all
        the same (:meth:`_resend`): the task that answers is recorded for the items still pending and
        keeps the gone ones' destinations (as items that left it), or is cancelled when none is
        pending; dropped, a task the service had started ran on untracked, and the other items went
        again under a new token beside it. A batch with an item held again (``awaiting_job``: its
        job re-run, waiting for its parents) is sent again all the same, and the task answering its
        token cancelled (:meth:`_resend`): the service may have started it before the hold, copying
        files from before the parents' new run; dropped, it would run untracked and its copy land
        over the fresh one after the release.
        A failing GET raises before anything is submitted; the journal is then left as it is."""
        by_id = {it["id"]: it for it in items}
        unread = sorted({i for batch in batches for i, *_ in batch["files"]} - by_id.keys())
        fetched: dict[int, dict] = {}
        for start in range(0, len(unread), JOB_ID_CHUNK):
            chunk = unread[start:start + JOB_ID_CHUNK]
            for item in self._get("/transfers/", {"site_id": self.site_id, "id": chunk}):
                fetched[int(item["id"])] = item
        held: list[tuple[dict, list[dict]]] = []
        for batch in batches:
            members = [by_id.get(i) or fetched.get(i) for i, *_ in batch["files"]]
            present = [m for m in members if m is not None]
            if any(m.get("task_id") for m in present):
                continue  # already recorded
            # A member deleted (with its job) or no longer pending does not drop the batch: the
            # service may have started its task, which then ran on untracked (into the deleted
            # job's workdir) while the other members went again under a new token, a second copy
            # beside it. It is sent again with its token (:meth:`_resend`).
            for item in present:
                if item["state"] == TransferItemState.pending.value:
                    item["state"] = "held"
            held.append((batch, present))
        return held

    def _rewrite_journal(self, token_records: list[dict]) -> None:
        """Leave only ``token_records`` in the journal (none: remove it), replaced atomically."""
        try:
            if not token_records:
                self.journal_path.unlink(missing_ok=True)
                return
            tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                for record in token_records:
                    fh.write(json.dumps({k: record[k] for k in ("token", "alias", "direction", "files", "holds")
                                         if k in record}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.journal_path)
        except OSError as exc:
            self.logger.warning("cannot rewrite %s: %s", self.journal_path, exc)
