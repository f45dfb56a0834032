"""The ``scheduler`` agent module: turns BatchJobs into real scheduler submissions and tracks them.

Each cycle (``scheduler.sync_period`` seconds):

1. reads this site's active BatchJobs (one GET) and polls the scheduler once (``get_statuses()``);
2. submits ``pending_submission`` BatchJobs whose ``filter_tags`` contain the site's ``filter_tags``,
   after validating them against ``allowed_queues`` / ``allowed_projects`` /
   ``optional_batch_job_params`` and ``max_queued_jobs`` (the site's jobs count toward their
   BatchJob's queue, whatever queue name the scheduler shows); the rendered script is
   ``qsubmit/qlaunch<id:05d>.sh``;
3. deletes ``pending_deletion`` BatchJobs from the scheduler (one whose submission's outcome was
   never recorded is first looked up, so that no job of it is left in the queue), and withdraws
   a queued BatchJob marked ``status_info[WITHDRAW_IF_QUEUED]`` only while this cycle's poll shows
   it still waiting (deleted, then pending_deletion); one that started keeps running, its marker
   dropped (see :meth:`SchedulerModule._withdraw_if_queued`; a marker written while the cycle
   ran is kept: the cycle's PATCH changes only the status_info keys it changed, see 5.);
4. copies queued/running from the scheduler (``start_time``: the scheduler's own start time of
   the job where the poll gives one, ``StatusPoll.start_times``); a BatchJob that left the queue
   is looked up in the scheduler's history (start/end times, final native state) before it is
   declared finished (a lookup that fails leaves it as it is until one answers);
5. sends all BatchJob changes in one bulk PATCH and updates the Site (``queued_jobs``,
   ``backfill_windows``; the update also refreshes ``last_refresh``, the "active" flag). A
   BatchJob's status_info goes as ``status_info_merge`` (docs/rest-api.md), the keys this cycle
   set or removed and no other (:func:`status_info_merge`): the server applies them under the
   row's lock, so the keys others wrote since this cycle's read (a launcher's notes, the elastic
   queue's withdrawal marker) are kept, and none of theirs is put back from this cycle's older
   copy (the whole status_info sent, a launcher's note written meanwhile was lost or reverted);
6. keeps the launcher credentials of queued and running BatchJobs alive (each BatchJob's launcher
   gets a site-scoped credential minted before its submission; see
   :mod:`balsam.site.launcher_credentials`).
7. once an hour, removes the site's files older than ``logging.retention_days`` that nothing else
   removes (:class:`RetentionSweeper`): the batch scripts and scheduler outputs of BatchJobs not in
   this cycle's list of active ones, launchers' logs but a running launcher's, and agent logs but
   the running agent's; at most :data:`RETENTION_SWEEP_MAX_CALLS` stats and removals and about
   :data:`RETENTION_SWEEP_MAX_PART_SEC` a cycle, the rest of the sweep at the next cycles.

A BatchJob that ended whose launcher wrote its one-line ``Error: ...`` last (a settings.yml broken
since the agent started: every launcher exits 1 at once, which the scheduler reports only as "exit
status 1") gets that line in ``status_info["launcher_error"]``, read from the tail of the job's
output file (``qsubmit/qlaunch<id:05d>.sh.output`` or ``.output``).

Every refusal or failure is written to the BatchJob's ``status_info`` (``error``, ``error_time``), where
``balsam queue ls -v`` and the API show it; so is the scheduler's reason for keeping a queued job
waiting (``scheduler_reason``, e.g. Slurm's ``PartitionNodeLimit``), updated when it changes and removed
when the scheduler no longer gives one. No scheduler exception escapes a cycle.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import stat
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Collection, Optional

import attrs

from ...batch_job_rules import BatchJobRefused, check_batch_job
from ...config import LAUNCHER_SECTIONS, load_settings
from ...models import AllowedQueue
from ...options import option
from ...scheduler import (
    REFUSED_FOR_GOOD, START_TIME_SKEW_SEC, STILL_ACTIVE, JobHistory, SchedulerError, SchedulerJobStatus, StatusPoll,
    SubmitRequest, with_poll_record,
)
from ...serialization import format_datetime, parse_datetime, to_dict
from ...states import BatchJobState
from ...util import NO_ROOM_ERRNOS
from ..service_client import bulk_patch, iso_now, list_all, utcnow
from ..job_template import (JobTemplateError, PluginHookFailed, ScriptValueRefused, build_context, read_template,
                            render_job_script, template_platform_options)
from ..launcher_credentials import LauncherCredentials
from ..module import AgentModule

#: Minutes past its wall time after which a job whose history still says "running" counts as gone.
ACTIVE_RECORD_GRACE_MIN = 10

ACTIVE = (
    BatchJobState.pending_submission,
    BatchJobState.queued,
    BatchJobState.running,
    BatchJobState.pending_deletion,
)


@attrs.frozen
class SchedulerSettings:
    """The ``scheduler:`` section of settings.yml."""

    name: str = option("local", "Scheduler plugin that submits BatchJobs (local, slurm, pbs, ...).")
    options: Any = option(
        help="Options of the scheduler plugin named above (its options schema; `balsam plugins show NAME`).",
        factory=dict,
    )
    sync_period: int = option(10, "Seconds between two polls of the scheduler queue.")
    allowed_queues: dict[str, AllowedQueue] = option(
        help="Queues BatchJobs may be submitted to, with their limits (none: every BatchJob is refused).",
        factory=lambda: {"local": AllowedQueue(max_nodes=1, max_walltime=1440, max_queued_jobs=1000)},
    )
    allowed_projects: list[str] = option(
        help="Projects (allocations) BatchJobs may charge; [] accepts any project.", factory=lambda: ["local"]
    )
    optional_batch_job_params: dict[str, str] = option(
        help="Extra job-template variables a BatchJob may set, with their default values.", factory=dict
    )
    job_template_path: str = option("job-template.sh", "The batch script template, relative to the site directory.")
    queue_limit_retry_sec: int = option(
        300,
        "After the scheduler refused a submission because a queue limit is reached (e.g. Slurm's "
        "QOSMaxSubmitJobPerUserLimit, PBS's per-user max_queued), that queue's BatchJobs of the same project "
        "wait: a submission is tried again as soon as a status poll lists fewer of the user's jobs in that "
        "queue, or after this many seconds (jobs the limit also counts may be listed elsewhere or belong to "
        "others).",
    )

    def validate(self) -> dict[str, str]:
        problems = {}
        if self.sync_period < 1:
            problems["sync_period"] = f"must be at least 1, got {self.sync_period}"
        if self.queue_limit_retry_sec < 1:
            problems["queue_limit_retry_sec"] = f"must be at least 1, got {self.queue_limit_retry_sec}"
        return problems

    def validate_with(self, sections: dict[str, Any]) -> dict[str, str]:
        """Once ``options`` is the driver's options object: a queue name the driver refuses
        (its options' ``queue_name_problem(name) -> str``; Slurm under ``queue_flag: --qos``, a
        QOS name with capitals, which the scheduler lists in lower case and the agent never
        matched to the user's other jobs of that QOS). Each such queue under its own key
        (``allowed_queues.<name>``, a dotted path as ``validate()`` gives one), so that each is
        reported on its own line, as a queue's bad ``max_nodes`` is; under ``allowed_queues``
        alone only the first was, on the line of ``allowed_queues:``."""
        check = getattr(self.options, "queue_name_problem", None)
        if not callable(check):
            return {}
        problems = {}
        for name in self.allowed_queues:
            problem = check(str(name))
            if problem:
                problems[f"allowed_queues.{name}"] = problem
        return problems

    def validate_files(self, base_dir: Path) -> dict[str, str]:
        """A job template named in settings.yml, resolved against the site directory (``base_dir``,
        the settings file's) as the module resolves it: a missing one was accepted, then every
        BatchJob went submit_failed. The default name is left alone: `balsam site init` writes
        that file, and a settings file is often read away from its site (checked before it is
        copied in, or built by a program); a BatchJob then names it missing."""
        if self.job_template_path == attrs.fields(SchedulerSettings).job_template_path.default:
            return {}
        path = Path(self.job_template_path)
        full = path if path.is_absolute() else base_dir / path
        if not full.exists():
            return {"job_template_path": f"file not found: {full}"}
        if not full.is_file():
            return {"job_template_path": f"not a file: {full}"}
        return {}


@attrs.frozen
class QueueLimitHold:
    """A queue and project the scheduler refused a submission of because a queue limit is reached
    (``SchedulerError.at_queue_limit``): the queue's BatchJobs of that project wait, untried, until
    the hold lifts. Keyed by (queue, project): a project at its own account or association limit
    must not keep another project's BatchJobs of the same queue from being tried."""

    #: What the scheduler said, for the waiting BatchJobs' status_info.
    message: str
    #: The user's jobs the status poll listed in that queue at the refusal (None: the poll failed).
    listed: Optional[int]
    #: ``time.monotonic()`` after which a submission is tried again anyway.
    retry_at: float
    #: Since when (``time.monotonic()``) the queue has been held, across refusals.
    since: float
    #: Lifted: the next BatchJob of the queue is tried (a refusal holds the queue again).
    lifted: bool = False

    def lifts(self, listed_now: Optional[int], now: float) -> bool:
        # A job of the user leaving the queue frees a place under a per-user limit; under a group,
        # project or queue-wide limit (other users' jobs count too) only the retry time tells.
        return now >= self.retry_at or (self.listed is not None and listed_now is not None and listed_now < self.listed)


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if hasattr(value, "__attrs_attrs__"):
        return to_dict(value)
    return dict(value)


def validate_batch_job(batch_job: dict, scheduler_settings: SchedulerSettings) -> None:
    """Refuse a BatchJob that the site's settings do not allow (raises :class:`BatchJobRefused`);
    the same rule as the client's (:func:`balsam.batch_job_rules.check_batch_job`)."""
    check_batch_job(
        batch_job,
        scheduler_settings.allowed_queues,
        scheduler_settings.allowed_projects,
        scheduler_settings.optional_batch_job_params,
    )


#: Longest scheduler text kept in a status_info field.
MAX_SCHEDULER_TEXT = 2000
_CONTROL_CHARS = dict.fromkeys(i for i in range(32) if i not in (9, 10)) | {0x7F: None}


def clean_text(text: Any, limit: int = MAX_SCHEDULER_TEXT) -> str:
    """Scheduler text made safe to store: no NUL or other control characters (PostgreSQL cannot
    store NUL, and the API refuses it), at most ``limit`` characters."""
    text = str(text or "").translate(_CONTROL_CHARS)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean_record(value: Any) -> Any:
    """``clean_text`` applied to every string in a JSON-ready value (keys included)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k): clean_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_record(v) for v in value]
    return value


def _read_marker(marker: Path) -> Optional[int]:
    """The scheduler id a ``.scheduler_id`` marker holds; None when there is none (or it is unreadable)."""
    return _read_marker_token(marker)[0]


def _read_marker_token(marker: Path) -> tuple[Optional[int], Optional[str]]:
    """A ``.scheduler_id`` marker's scheduler id and submit token (``"<id> <token>"``); the token is
    None in a marker written by an agent older than submit tokens. (None, None): no marker."""
    try:
        words = marker.read_text().split()
        return int(words[0]), (words[1] if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def _marker_text(scheduler_id: int, batch_job: dict) -> str:
    """A ``.scheduler_id`` marker's content: the scheduler id and the BatchJob's submit token (a
    marker without the token would be taken for another BatchJob's and moved aside)."""
    token = (batch_job.get("status_info") or {}).get(SUBMIT_TOKEN)
    return f"{scheduler_id} {token}\n" if token else f"{scheduler_id}\n"


def _read_pending_token(pending: Path) -> Optional[str]:
    """The submit token of a ``.submitting`` marker (``"<time> <token>"``); None without one."""
    try:
        words = pending.read_text().split()
    except OSError:
        return None
    return words[1] if len(words) > 1 and words[1] != _EARLIER_UNKNOWN else None


#: The third word of a ``.submitting`` marker whose BatchJob had an earlier submit command end
#: without an answer that no lookup by name could settle (the scheduler cannot look jobs up by
#: name: Cobalt before its .cobaltlog exists): a job of that try may be queued, so a later try's
#: refusal must not delete the marker, nor revoke the credential its launcher will read. Kept in
#: the marker (not in memory) so that an agent restart between the tries keeps it; a lookup that
#: answers "none queued" for sure clears it.
_EARLIER_UNKNOWN = "earlier-try-unknown"


def _pending_earlier_unknown(pending: Path) -> bool:
    """Whether a ``.submitting`` marker says an earlier try's outcome is unknown (:data:`_EARLIER_UNKNOWN`)."""
    try:
        return _EARLIER_UNKNOWN in pending.read_text().split()[1:]
    except OSError:
        return False


#: status_info key of the token that ties a BatchJob's submit markers to it. BatchJob ids are not
#: unique over a site directory's life (the server's database reset or restored, an id reused):
#: a ``qlaunch<id>.sh.scheduler_id`` marker left by an earlier BatchJob of the same id must not make
#: a new one "already submitted". The token is stored on the server (in the BatchJob's status_info)
#: before the submit command runs and written into both markers, so a marker proves whose it is.
SUBMIT_TOKEN = "submit_token"

#: status_info key of a conditional withdrawal (its value: when it was asked, and by whom): the
#: BatchJob is deleted from the scheduler only if it has not started, as this module's own status
#: poll shows it in the cycle that acts on it. The elastic queue withdraws its requests no backlog
#: needs this way: marked pending_deletion from its own poll, a request that started before this
#: module's next cycle (up to sync_period later) was deleted, killing a launcher that had leased
#: jobs. ``balsam queue term`` (state pending_deletion) still deletes unconditionally.
WITHDRAW_IF_QUEUED = "withdraw_if_queued"

#: The start of the error written while the scheduler's status poll keeps failing.
_STATUS_UNAVAILABLE = "scheduler status unavailable"
#: The status_info key of that error: a key of its own, not ``error``, which the launcher's
#: failure report (``report_batch_job_error``) writes too: the outage overwrote the launcher's
#: error and the recovery removed it (a launcher error written during the recovery cycle was
#: deleted by its merge). Agents before this key wrote the outage as ``error``: such an ``error``
#: is still read as the outage (``balsam site stop``) and removed when the scheduler answers.
SCHEDULER_STATUS_ERROR = "scheduler_status_error"

#: The start of the error of a pending_deletion BatchJob whose scheduler job the delete command
#: failed to delete (tried again next cycle).
_DELETE_FAILED = "delete failed: "

#: The start of the error of a queued BatchJob marked WITHDRAW_IF_QUEUED whose delete failed (tried
#: again next cycle while the job waits); removed once the delete goes through, the job starts
#: (the withdrawal is dropped) or it leaves the queue.
_WITHDRAW_DELETE_FAILED = "withdrawal: delete failed: "

#: The start of the error of a transient submit failure that will be retried.
_SUBMIT_RETRY = "submit failed (attempt "

#: Seconds between two log lines about an outage that lasts (status poll, lookups by name), and
#: between two summaries of an error that repeats (a broken plugin hook, an unexpected error).
OUTAGE_LOG_EVERY_S = 300.0

#: errnos of a write to a file system with no room (full, over quota).
#: The longest wait between two tries of a BatchJob waiting for room on disk (the wait doubles from
#: ``sync_period``): each try costs a credential renewal and a submit command, once a cycle for hours.
NO_ROOM_RETRY_MAX_SEC = 300.0


def _write_replacing(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a write that fails (no room) leaves the file as it was,
    not truncated (a ``.submitting`` marker kept for an earlier try lost its note that the try's
    outcome is unknown, and a later refusal then removed it and revoked the credential that try's
    queued launcher needs). The temporary file starts with ``.tmp-``, so that it still ends as
    ``path`` does."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise

#: The longest wait between two renderings of a BatchJob whose plugin hook failed (the wait
#: doubles from ``sync_period`` at each failure).
HOOK_RETRY_MAX_SEC = 300.0


#: How often the scheduler module removes files past ``logging.retention_days`` (docs/site.md, "Logs"):
#: the retention is counted in days, so an hour late is nothing, and the sweep's two directory scans
#: (qsubmit/ and log/, a stat per file) are not repeated every sync_period.
RETENTION_SWEEP_PERIOD_SEC = 3600.0

#: A launcher's file changed less than this before the earliest start of an active BatchJob may be
#: that BatchJob's launcher's (a launcher file's name does not say whose it is): the scheduler's
#: clock (start_time) and the file system's (mtime) need not agree.
RETENTION_CLOCK_SLACK_SEC = 3600.0

#: The most file-system calls (a stat or a removal each) one scheduler cycle spends on a sweep; the
#: rest of its listing waits for the next cycles. In one go, a site with 10^5 old files held a cycle
#: (its submissions, its status updates) for 2-7 s on a local disk, and far longer on Lustre.
RETENTION_SWEEP_MAX_CALLS = 10_000

#: The most wall time one scheduler cycle spends on a sweep (checked before each file, so a part
#: ends within one file's stat and removal of it): 10,000 calls of 2-3 ms each on a loaded Lustre
#: held the cycle 20-30 s, longer than the agent's stop wait (balsam.site.agent.DEFAULT_STOP_WAIT_SEC).
RETENTION_SWEEP_MAX_PART_SEC = 1.0

#: A BatchJob's files in the submit directory, as the module and the scheduler drivers name them:
#: ``qlaunch<id:05d>.sh``, its output (``.sh.output``: local; ``.output`` and ``.error``: Slurm, PBS,
#: Cobalt's ``-O`` stem, with its ``.cobaltlog``; ``.sh.error`` read as an output too), its markers
#: ``.sh.scheduler_id`` and ``.sh.submitting``, and those moved aside as ``.stale-<UTC stamp>``
#: (:meth:`SchedulerModule._move_aside`). Nothing else: a user's ``qlaunch00007.sh.bak`` is theirs;
#: temporary files start with ``.tmp-``. ASCII digits: ``int()`` also reads other scripts' digits.
_BATCH_JOB_FILE = re.compile(
    r"qlaunch(?P<id>[0-9]+)(?:\.sh(?:\.output|\.error)?|\.output|\.error|\.cobaltlog"
    r"|\.sh\.(?:scheduler_id|submitting)(?:\.stale-[0-9]{8}T[0-9]{12})?)")
#: A launcher's files in log/: ``<mode>_mode_<YYYY-mm-dd_HHMMSS>_<host>_<pid>.<partition>.<suffix>``
#: (:meth:`balsam.launcher.job_mode.LauncherContext.log_file`, ``launcher_stamp``): the launcher's
#: ``.log``, serial mode's ``.master.log`` and ``.<hostname>.<rank>.log`` (any ``.log``), ``.out``,
#: ``.serial.json``, ``.serial.session``, ``.serial.start-error``. A plugin mode's name may hold
#: ``-`` or ``.`` (docs/launcher.md's ``one-at-a-time``). Group ``launcher``: the files of one
#: launcher process, whose ``<launcher>.log`` it touches hourly while it runs
#: (:data:`balsam.launcher.entry.LOG_TOUCH_PERIOD_SEC`).
_LAUNCHER_FILE = re.compile(
    r"(?P<launcher>[\w.-]+?_mode_[0-9]{4}-[0-9]{2}-[0-9]{2}_[0-9]{6}_[\w-]+_[0-9]+\.[0-9]+)"
    r"\.(?:log|out|serial\.json|serial\.session|serial\.start-error|[\w.-]+\.log)")
#: An agent's log (:func:`balsam.site.agent.setup_logging`).
_AGENT_LOG = re.compile(r"agent_[0-9]{4}-[0-9]{2}-[0-9]{2}_[0-9]{6}\.log")


@attrs.define
class RetentionSweep:
    """What one sweep removed (by kind: ``batch_job``, ``launcher``, ``agent``), and the files it
    could not remove with why."""

    removed: dict[str, int] = attrs.Factory(dict)
    failed: list[tuple[str, str]] = attrs.Factory(list)


class RetentionSweeper:
    """One sweep of the site's files that nothing else removes, done in parts. Built, it lists
    ``submit_dir`` and ``log_dir`` once each (names only: no stat) and keeps the names of balsam's
    kinds; each :meth:`step` then makes at most ``max_calls`` file-system calls on them:

    * in ``submit_dir``, the files of each BatchJob whose id is not in ``active_ids`` (the BatchJobs
      still pending, queued, running or being deleted, from the caller's list). All files of an id
      with a ``.submitting`` marker stay: that submission's outcome is unknown, and its job may
      still be waiting in the queue for its script (whatever its BatchJob's state);
    * in ``log_dir``, launchers' files last changed before ``launcher_cutoff`` too (a launcher of an
      active BatchJob may still write its log; the caller bounds it by their start times), unless
      their launcher's ``.log`` changed since (a running launcher touches it hourly: a serial rank's
      log or an mpi launcher's quiet ``.log`` is a live launcher's whether or not it has a BatchJob);
      and agent logs, but those in ``keep`` (real paths of the logs this process writes to: a log
      buffered with a long ``flush_period`` is written rarely, and its mtime says nothing).

    Each step takes the caller's present list and cutoffs. Directories are left alone; a file
    removed meanwhile is not a failure."""

    def __init__(self, submit_dir: Path, log_dir: Path) -> None:
        self.result = RetentionSweep()
        #: (kind, path, BatchJob id or launcher) in listing order; :attr:`_next` is the first not done.
        self._todo: list[tuple[str, str, Any]] = []
        self._next = 0
        #: Ids with a ``.submitting`` marker at the listing (a later one's BatchJob is active).
        self._unknown: set[int] = set()
        for name in _scan_dir(submit_dir, self.result):
            match = _BATCH_JOB_FILE.fullmatch(name)
            if match:
                if name.endswith(".submitting"):
                    self._unknown.add(int(match["id"]))
                self._todo.append(("batch_job", os.path.join(submit_dir, name), int(match["id"])))
        for name in _scan_dir(log_dir, self.result):
            if _AGENT_LOG.fullmatch(name):
                self._todo.append(("agent", os.path.join(log_dir, name), None))
            else:
                match = _LAUNCHER_FILE.fullmatch(name)
                if match:
                    self._todo.append(("launcher", os.path.join(log_dir, name),
                                       os.path.join(log_dir, match["launcher"] + ".log")))

    def step(self, cutoff: float, active_ids: Collection[int], launcher_cutoff: float, keep: Collection[str] = (),
             max_calls: Optional[int] = None, stop: Optional[threading.Event] = None,
             max_seconds: Optional[float] = None) -> bool:
        """Remove what of the listing is past ``cutoff`` (a ``time.time()``), with at most
        ``max_calls`` stats and removals and for at most ``max_seconds`` (None: no bound; at least
        one file a step) or until ``stop`` is set; True once the listing is done."""
        calls = 0
        started = time.monotonic()
        anchors: dict[str, float] = {}  # a launcher's .log -> its mtime (-inf: none), once a step
        launcher_cutoff = min(cutoff, launcher_cutoff)
        while self._next < len(self._todo):
            if stop is not None and stop.is_set():
                return False
            kind, path, key = self._todo[self._next]
            most = 3 if kind == "launcher" and key not in anchors else 2  # (its launcher's .log,) stat, unlink
            if max_calls is not None and calls and calls + most > max_calls:
                return False
            if max_seconds is not None and calls and time.monotonic() - started >= max_seconds:
                return False
            self._next += 1
            if kind == "batch_job":
                if key in active_ids or key in self._unknown:
                    continue
                calls += _remove_if_older(path, cutoff, kind, self.result)
            elif kind == "agent":
                if os.path.realpath(path) not in keep:
                    calls += _remove_if_older(path, cutoff, kind, self.result)
            else:
                if key not in anchors:
                    calls += 1
                    try:
                        anchors[key] = os.lstat(key).st_mtime
                    except OSError:  # gone (or unreadable): the file's own mtime decides
                        anchors[key] = float("-inf")
                if anchors[key] < launcher_cutoff:
                    calls += _remove_if_older(path, launcher_cutoff, kind, self.result)
        return True


def sweep_expired_files(submit_dir: Path, log_dir: Path, cutoff: float, active_ids: Collection[int],
                        launcher_cutoff: float, keep: Collection[str] = ()) -> RetentionSweep:
    """A whole :class:`RetentionSweeper` sweep in one call (the scheduler module spreads its own
    over its cycles)."""
    sweeper = RetentionSweeper(submit_dir, log_dir)
    sweeper.step(cutoff, active_ids, launcher_cutoff, keep)
    return sweeper.result


def _scan_dir(directory: Path, result: RetentionSweep) -> list[str]:
    try:
        with os.scandir(directory) as scan:
            return [entry.name for entry in scan]
    except FileNotFoundError:  # no BatchJob submitted yet, or no log written
        return []
    except OSError as exc:
        result.failed.append((str(directory), exc.strerror or str(exc)))
        return []


def _remove_if_older(path: str, cutoff: float, kind: str, result: RetentionSweep) -> int:
    """Remove ``path`` if it is no directory and last changed before ``cutoff``; the number of
    file-system calls made."""
    calls = 1
    try:
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode) or info.st_mtime >= cutoff:
            return calls
        calls += 1
        os.unlink(path)
    except FileNotFoundError:  # removed since the listing
        return calls
    except OSError as exc:
        result.failed.append((path, exc.strerror or str(exc)))
        return calls
    result.removed[kind] = result.removed.get(kind, 0) + 1
    return calls


def open_log_files() -> set[str]:
    """Real paths of the files this process's root log handlers write to (the agent's log, also
    behind the buffering handler: its ``target``)."""
    paths = set()
    for handler in logging.getLogger().handlers:
        for each in (handler, getattr(handler, "target", None)):
            name = getattr(each, "baseFilename", None)
            if isinstance(name, str):
                paths.add(os.path.realpath(name))
    return paths


def launcher_files_cutoff(batch_jobs: list[dict]) -> float:
    """The time before which no launcher file can be an active BatchJob's launcher's: the earliest
    start of the active BatchJobs that started, less :data:`RETENTION_CLOCK_SLACK_SEC` (a launcher
    starts after its BatchJob, and its files change after it starts); no bound without one; none
    kept (-inf) while a running BatchJob (or one being deleted) has no start time that reads."""
    earliest = float("inf")
    for batch_job in batch_jobs:
        text = batch_job.get("start_time")
        try:
            start = _aware(parse_datetime(text)).timestamp() if text else None
        except (TypeError, ValueError, OverflowError, OSError):
            start = None
        if start is not None:
            earliest = min(earliest, start)
        elif batch_job.get("state") in (BatchJobState.running.value, BatchJobState.pending_deletion.value):
            return float("-inf")
    return earliest - RETENTION_CLOCK_SLACK_SEC


def status_info_merge(stored: Any, wanted: Any) -> dict[str, Optional[str]]:
    """The ``status_info_merge`` (docs/rest-api.md) that turns ``stored`` (the status_info this
    cycle read) into ``wanted`` (what this cycle made of it): the keys set or changed, and the keys
    removed as null. Only those: a key nobody here touched is not sent, so the server keeps the
    value another writer stored since the read."""
    stored, wanted = dict(stored or {}), dict(wanted or {})
    merge: dict[str, Optional[str]] = {key: value for key, value in wanted.items()
                                       if key not in stored or stored[key] != value}
    merge.update({key: None for key in stored if key not in wanted})
    return merge


def as_merge(update: dict, stored: Any) -> dict:
    """``update`` (``{"id": ..., field: value}``, its ``status_info`` the whole object this cycle
    wants) with its status_info sent as ``status_info_merge`` against ``stored``; no status_info
    field when this cycle changed no key."""
    if "status_info" not in update:
        return update
    out = {k: v for k, v in update.items() if k != "status_info"}
    merge = status_info_merge(stored, update["status_info"])
    if merge:
        out["status_info_merge"] = merge
    return out


class _RepeatLog:
    """Says whether an error that may repeat every cycle is logged in full (the first time), not
    at all, or summed up (once per ``OUTAGE_LOG_EVERY_S``, with the BatchJobs it struck): a broken
    plugin hook logged a traceback per pending BatchJob every cycle, 8,640 a day for each.
    The ``MAX_KEPT`` most recent distinct errors are remembered."""

    MAX_KEPT = 64

    def __init__(self) -> None:
        #: key -> [when last logged (time.monotonic()), times since, BatchJob ids since]
        self.seen: dict[Any, list] = {}

    def note(self, key: Any, batch_job_id: int) -> Optional[str]:
        """None: log it in full; "": log nothing; else the summary to log."""
        now = time.monotonic()
        entry = self.seen.pop(key, None)
        if entry is None:
            self.seen[key] = [now, 0, set()]
            while len(self.seen) > self.MAX_KEPT:
                del self.seen[next(iter(self.seen))]  # the one seen least recently
            return None
        self.seen[key] = entry  # the most recently seen last
        entry[1] += 1
        entry[2].add(batch_job_id)
        if now - entry[0] < OUTAGE_LOG_EVERY_S:
            return ""
        ids = sorted(entry[2])
        shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        note = (f"repeated {entry[1]} times in the last {(now - entry[0]) / 60:.0f} min "
                f"(BatchJob{'s' if len(ids) != 1 else ''} {shown})")
        self.seen[key] = [now, 0, set()]
        return note


def _delete_failure_key(kind: str, exc: BaseException, message: str, scheduler_id: int) -> tuple:
    """What a failed delete is remembered by (:class:`_RepeatLog`): its kind, its type and its
    message with the job's number taken out. The driver's message names the job (``could not
    delete job 1001: ...``): keyed by it, a scheduler outage logged a line per BatchJob, and past
    ``_RepeatLog.MAX_KEPT`` BatchJobs the keys evicted each other and every one was logged in full
    every cycle."""
    text = re.sub(rf"(?<![0-9]){int(scheduler_id)}(?![0-9])", "<job>", clean_text(message, 500))
    return (kind, type(exc).__name__, text)


def _raised_where(exc: BaseException) -> tuple[Any, str]:
    """What an unexpected error is remembered by (:class:`_RepeatLog`): its type and the frames it
    was raised through (file, line), not its message, which often names its BatchJob (a script's
    path, an id): keyed by message, a bug striking more pending BatchJobs than ``MAX_KEPT`` was
    forgotten before it came round, and logged a full traceback per BatchJob every cycle. Also the
    innermost frame, ``file:line``, for the summary."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:  # never raised (no traceback): its message is all there is
        return ("unexpected", type(exc).__name__, str(exc)), "?"
    last = frames[-1]
    return (("unexpected", type(exc).__name__, tuple((f.filename, f.lineno) for f in frames)),
            f"{os.path.basename(last.filename)}:{last.lineno}")


def _aware(when: dt.datetime) -> dt.datetime:
    """A datetime comparable with the API's (UTC-aware ones); a naive one is taken as UTC."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def _submit_time(batch_job: dict) -> Optional[dt.datetime]:
    """When the agent recorded the BatchJob's submission, or for one recorded after the fact its
    marker's time (``status_info["submit_time"]``, see :func:`_marker_time`); None when it has
    none or it does not read as a time."""
    text = (batch_job.get("status_info") or {}).get("submit_time")
    try:
        return _aware(parse_datetime(str(text))) if text else None
    except (TypeError, ValueError):
        return None


def _marker_time(path: Path) -> Optional[str]:
    """When the submission a submit marker is of was made (ISO, UTC), for ``status_info["submit_time"]``:
    a ``.submitting`` marker's first word (the time written just before its submit command ran),
    else the file's modification time (a ``.scheduler_id`` marker is written as its submit command
    returned). Never past now (a file system's clock ahead of the agent's); None when the file
    cannot be read."""
    try:
        first = path.read_text().split()[:1]
        when = _aware(parse_datetime(first[0])) if path.name.endswith(".submitting") and first else None
    except (OSError, TypeError, ValueError):
        when = None
    if when is None:
        try:
            when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
        except (OSError, OverflowError, ValueError):
            return None
    return min(when.astimezone(dt.timezone.utc), utcnow()).isoformat()


def _has_run(batch_job: dict) -> bool:
    """Whether the BatchJob's scheduler job ever ran: it has a start, or it was requeued (a requeued
    BatchJob is ``queued`` again, yet it ran). Such a job that ends without a history record, or
    with one that gives no start (sacct of a requeued job cancelled while pending again), is
    ``finished``, never ``submit_failed``."""
    if batch_job.get("start_time") or BatchJobState(batch_job["state"]) == BatchJobState.running:
        return True
    try:
        return int((batch_job.get("status_info") or {}).get("requeue_count") or 0) > 0
    except (TypeError, ValueError):
        return True  # a requeue_count was written: the job ran


def _tags_match(batch_job_tags: dict, site_tags: dict) -> bool:
    return all(batch_job_tags.get(k) == v for k, v in site_tags.items())


#: In the error of a BatchJob whose job left the queue while the history lookup kept failing.
#: Bytes read from the end of a finished BatchJob's output file for the launcher's error line.
LAUNCHER_OUTPUT_TAIL_BYTES = 8192


def launcher_error_line(script: Path) -> Optional[str]:
    """The launcher's last one-line error (``Error: ...``, its convention for a launcher that cannot
    start, printed to stderr) at the end of the job's output files, else None. The drivers name them
    ``<script>.output`` (local: stdout and stderr together) or ``<script stem>.output`` and
    ``<script stem>.error`` (PBS, Slurm: stderr apart, where the line lands); of the files whose
    last line is such an error, the newest one's, each read in its last ``LAUNCHER_OUTPUT_TAIL_BYTES``
    only (a job's output can be large)."""
    found = []
    for candidate in (script.with_name(script.name + ".output"), script.with_suffix(".output"),
                      script.with_name(script.name + ".error"), script.with_suffix(".error")):
        line = _last_error_line(candidate)
        if line is not None:
            try:
                found.append((candidate.stat().st_mtime, line))
            except OSError:
                continue
    return max(found)[1] if found else None


def _last_error_line(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as fp:
            fp.seek(0, os.SEEK_END)
            fp.seek(max(0, fp.tell() - LAUNCHER_OUTPUT_TAIL_BYTES))
            tail = fp.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    # Only when the error is the file's last word: an earlier one the launcher survived tells
    # nothing about how the job ended.
    if lines and lines[-1].startswith("Error:"):
        return lines[-1]
    return None


_LOOKUP_FAILING = "left the queue; its history lookup keeps failing"

#: How the scheduler drivers start the message of a history record without a start time.
_NEVER_STARTED = "never started: "

#: The start of the ``waiting`` note of a BatchJob whose filter_tags lack the site's.
_TAGS_WAITING = "waiting: filter_tags mismatch"


def _hold_key(batch_job: dict) -> tuple[str, str]:
    """What a "queue limit reached" hold is kept by: the BatchJob's queue and project."""
    return batch_job["queue"], batch_job.get("project") or ""


def _show_tags(tags: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(tags.items())) + "}"



def _current_info(update: dict[str, Any], batch_job: dict[str, Any]) -> dict[str, Any]:
    """The status_info this cycle's update will leave: the update's own when it has one (an empty
    one too: ``or`` fell back to the stored copy, writing back a key the cycle had just removed),
    else the stored one."""
    if "status_info" in update:
        return dict(update["status_info"] or {})
    return dict(batch_job.get("status_info") or {})

class SchedulerModule(AgentModule):
    section = "scheduler"
    default_period = 10.0
    period_fields = ("sync_period",)
    options_schema = SchedulerSettings
    section_comment = "Submits, polls and deletes BatchJobs through the scheduler plugin."
    enabled_by_default = True

    def __init__(self, site_config: Any, config: Any, client: Any, *, scheduler: Any = None) -> None:
        super().__init__(site_config, config, client)
        self.scheduler = scheduler if scheduler is not None else self.site_scheduler()
        # The driver's own tolerance of failed status polls (a ClassVar of balsam.scheduler.Scheduler).
        threshold = getattr(self.scheduler, "status_error_threshold", None)
        self.threshold = max(1, int(threshold)) if threshold is not None else 3
        self.poll_failures = 0
        #: When (time.monotonic(), and wall time) the current run of failed status polls began.
        self._poll_failing_since: Optional[float] = None
        self._poll_failing_since_iso = ""
        self._poll_failure_logged = 0.0
        #: This cycle's status poll (None: it failed), for the submit markers' ownership check.
        self._statuses: Optional[dict] = None
        #: This cycle's poll's start times of running jobs, by scheduler id (StatusPoll.start_times).
        self._start_times: dict[int, Any] = {}
        #: The kinds of scheduler start times ignored so far: the first of each kind is logged at
        #: INFO, the others at DEBUG (a clock far off would otherwise log a line per BatchJob).
        self._start_time_ignored: set[str] = set()
        #: BatchJob id -> why this cycle's bulk PATCH of submit tokens did not store its token.
        self._token_waiting: dict[int, str] = {}
        #: BatchJob id -> consecutive cycles it was missing from the queue with no history record.
        self.missing_counts: dict[int, int] = {}
        #: BatchJob id -> its "queue limit reached" refusals in a row while no job of the user was listed in any
        #: queue, by a limit on the user's own jobs (SchedulerError.per_user_limit).
        self.limit_refusals_alone: dict[int, int] = {}
        #: BatchJob id -> when the poll first missed a job whose history says queued (no start).
        self.missed_since: dict[int, dt.datetime] = {}
        #: BatchJob id -> consecutive transient submit failures.
        self.submit_failures: dict[int, int] = {}
        #: scheduler id -> history record, fetched in bulk once per cycle.
        self._histories: dict[int, Optional[JobHistory]] = {}
        #: scheduler ids whose history lookup failed this cycle (their end is unknown, not missing).
        self._history_unknown: set[int] = set()
        #: consecutive cycles whose history lookup failed, and the last failure's message.
        self.history_failures = 0
        self._history_error = ""
        #: (queue, project) -> the hold its last submission's "queue limit reached" refusal put on it.
        self.queue_holds: dict[tuple[str, str], QueueLimitHold] = {}
        #: Whether this cycle's status poll answered (queued_counts then include the user's other jobs).
        self._poll_answered = False
        #: The last backfill query's failure ("" after one answered): warned once, not every cycle.
        self._backfill_error = ""
        #: Why settings.yml does not load as a launcher reads it ("" when it does), looked at once per
        #: cycle with a submission to make (None: not yet this cycle), and the last one logged.
        self._settings_problem: Optional[str] = None
        self._settings_problem_logged = ""
        #: Errors that repeat every cycle (a broken plugin hook, an unexpected error), logged once
        #: in full and then summed up.
        self._repeats = _RepeatLog()
        #: BatchJob id -> (failed renderings in a row because a plugin hook failed, when
        #: (time.monotonic()) it is rendered again).
        self._hook_retry: dict[int, tuple[int, float]] = {}
        #: BatchJob id -> (tries in a row that found no room on disk, when (time.monotonic()) it is
        #: tried again).
        self._no_room_retry: dict[int, tuple[int, float]] = {}
        self.credentials = LauncherCredentials(client, self.site_path, self.site_id)
        #: When (time.monotonic()) the next retention sweep is due (the first cycle sweeps).
        self._next_retention_sweep = float("-inf")
        #: The sweep in progress, carried on at the next cycle (None: none).
        self._retention_sweeper: Optional[RetentionSweeper] = None
        #: Set by :meth:`close`: a sweep in progress stops.
        self._closing = threading.Event()
        #: The sweep begun and not yet logged (sweeper, retention_days, log dir), whether a part of
        #: it runs now; under the lock: :meth:`close` (the agent's thread) logs a stopped sweep
        #: unless a part runs, which then logs it as it returns (its counts final).
        self._sweep_lock = threading.Lock()
        self._sweep_unlogged: Optional[tuple[RetentionSweeper, int, Path]] = None
        self._sweep_stepping = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def site_path(self) -> Path:
        return Path(self.site_config.site_path)

    @property
    def submit_dir(self) -> Path:
        return Path(getattr(self.site_config, "job_path", self.site_path / "qsubmit"))

    def template_path(self) -> Path:
        configured = getattr(self.site_config, "job_template_path", None)
        if configured:
            return Path(configured)
        path = Path(self.options.job_template_path)
        return path if path.is_absolute() else self.site_path / path

    def script_path(self, batch_job_id: int) -> Path:
        return self.submit_dir / f"qlaunch{batch_job_id:05d}.sh"

    def _site_filter_tags(self) -> dict:
        settings = getattr(self.site_config, "settings", None)
        return dict(getattr(settings, "filter_tags", None) or {})

    def _error(self, update: dict, batch_job: dict, message: str, *, log: bool = True) -> None:
        info = _current_info(update, batch_job)
        message = clean_text(message)
        info.update(error=message, error_time=iso_now())
        update["status_info"] = info
        if log:
            self.logger.warning("BatchJob %s: %s", batch_job["id"], message)

    def _clear_error(self, batch_job: dict, update: dict, prefix: str) -> None:
        """Remove an error of the BatchJob that starts with ``prefix``: its condition ended."""
        info = _current_info(update, batch_job)
        if str(info.get("error") or "").startswith(prefix):
            update["status_info"] = {k: v for k, v in info.items() if k not in ("error", "error_time")}

    # -- one cycle ---------------------------------------------------------------------------------
    def run_cycle(self) -> Optional[float]:
        batch_jobs = list_all(
            self.client, "/batch-jobs/", {"site_id": self.site_id, "state": [s.value for s in ACTIVE]}
        )
        active_ids = {b["id"] for b in batch_jobs}
        self._hook_retry = {k: v for k, v in self._hook_retry.items() if k in active_ids}
        self._no_room_retry = {k: v for k, v in self._no_room_retry.items() if k in active_ids}
        statuses, poll_error = self._poll()
        self._poll_answered = statuses is not None
        self._statuses = statuses
        updates: dict[int, dict] = {}
        queued_counts: dict[str, int] = {}
        # A job of ours counts toward its BatchJob's queue, the one max_queued_jobs limits: the
        # scheduler may list it under another name (a PBS routing queue's job shows the execution
        # queue it was routed to; a Slurm `--qos` job the QOS a job_submit plugin may have set), and counted by that
        # name it would never fill the limit. The user's other jobs count by the scheduler's name,
        # and also toward each queue whose BatchJobs this poll lists under that name, by name only
        # (the elastic queue's window claims go by partition under --qos once its own job is
        # listed; a count of queued jobs has no nodes to match): counted by `gpu_regular` alone,
        # the user's other jobs of a `regular` request kept as `gpu_regular` never counted toward
        # `regular`. Any driver and mode: a Slurm partition a job_submit plugin rewrote, a PBS
        # routing queue's execution queue (docs/settings.md), the scheduler's jobs of that queue.
        owner_queues = {b["scheduler_id"]: b["queue"] for b in batch_jobs if b.get("scheduler_id") is not None}
        aliases: dict[str, set[str]] = {}
        for scheduler_id, status in (statuses or {}).items():
            owner = owner_queues.get(scheduler_id)
            if owner is not None and status.queue and status.queue != owner:
                aliases.setdefault(status.queue, set()).add(owner)
        for scheduler_id, status in (statuses or {}).items():
            owner = owner_queues.get(scheduler_id)
            for queue in {owner} if owner is not None else {status.queue, *aliases.get(status.queue, ())}:
                queued_counts[queue] = queued_counts.get(queue, 0) + 1
        if statuses is None:
            # No count from the scheduler (whose count also has the user's other jobs): this
            # site's own queued and running BatchJobs keep max_queued_jobs enforced meanwhile.
            for b in batch_jobs:
                if b["state"] in (BatchJobState.queued.value, BatchJobState.running.value):
                    queued_counts[b["queue"]] = queued_counts.get(b["queue"], 0) + 1
        self._histories, self._history_unknown = self._fetch_histories(batch_jobs, statuses)
        self._store_submit_tokens(batch_jobs, queued_counts)
        self._settings_problem = None  # read again if this cycle submits

        for batch_job in sorted(batch_jobs, key=lambda b: b["id"]):
            update: dict = {}
            try:
                self._handle(batch_job, statuses, poll_error, queued_counts, update)
            except Exception as exc:  # a driver bug must not stop the other BatchJobs
                # In full the first time; the same error again (every cycle for every BatchJob
                # it strikes) is summed up every OUTAGE_LOG_EVERY_S.
                key, where = _raised_where(exc)
                note = self._repeats.note(key, batch_job["id"])
                if note is None:
                    self.logger.exception("BatchJob %s: unexpected error (the same error again, %s raised at %s, is "
                                          "summed up every %.0f s)", batch_job["id"], type(exc).__name__, where,
                                          OUTAGE_LOG_EVERY_S)
                elif note:
                    self.logger.error("unexpected error again: %s raised at %s (the last: %s); %s",
                                      type(exc).__name__, where, clean_text(exc, 500), note)
                message = clean_text(f"{type(exc).__name__}: {exc}")
                if (batch_job.get("status_info") or {}).get("error") != message:  # not PATCHed every cycle
                    self._error(update, batch_job, message, log=False)
            if update.get("state") == BatchJobState.submit_failed.value:
                self._drop_waiting(batch_job, update)
            if update:
                updates[batch_job["id"]] = {"id": batch_job["id"], **update}

        try:
            if updates:
                # batch_job["status_info"]: this module's copy of what the server holds (read at the
                # cycle's start, replaced, never changed in place, where a token was stored since).
                by_id = {b["id"]: b for b in batch_jobs}
                sent = [as_merge(u, by_id[i].get("status_info")) for i, u in updates.items()]
                refused = bulk_patch(self.client, "/batch-jobs/", [u for u in sent if len(u) > 1])
                if refused:
                    self._record_refusals(refused, by_id)
                self._revoke_unused_credentials(updates, {update["id"] for update, _ in refused})
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug(
                    "cycle: %d active BatchJobs %s; scheduler lists %s; queued per queue %s; updates %s",
                    len(batch_jobs), {b["id"]: b["state"] for b in batch_jobs},
                    "nothing (poll failed)" if statuses is None else sorted(statuses), queued_counts,
                    {i: {k: v for k, v in u.items() if k != "id"} for i, u in updates.items()} or "none",
                )
            self._update_site(statuses)
        finally:
            # Even when the API refused the cycle's writes: a launcher credential that expires
            # ends a running launcher's work (its renewal call has its own error handling).
            self._keep_launcher_credentials(batch_jobs, updates)
        try:
            self._sweep_expired_files(batch_jobs)
        except Exception:  # a bug of the sweep must not stop the submissions (it is tried again in an hour)
            self.logger.exception("removing files older than logging.retention_days failed")
        return None

    def _sweep_expired_files(self, batch_jobs: list[dict]) -> None:
        """Once every :data:`RETENTION_SWEEP_PERIOD_SEC`, a :class:`RetentionSweeper` sweep, at most
        :data:`RETENTION_SWEEP_MAX_CALLS` of its file-system calls and about
        :data:`RETENTION_SWEEP_MAX_PART_SEC` a cycle, each part with its own cycle's list of active
        BatchJobs; once it is done, one INFO line when it removed something, one WARNING when it
        could not remove some; one line with what it removed so far when it stops before its end
        (:meth:`close`, or a part raised)."""
        settings = getattr(self.site_config, "settings", None)
        days = getattr(getattr(settings, "logging", None), "retention_days", None)
        sweeper, self._retention_sweeper = self._retention_sweeper, None
        if not days:
            return
        now = time.monotonic()
        log_dir = Path(getattr(self.site_config, "log_path", self.site_path / "log"))
        if sweeper is None:
            if now < self._next_retention_sweep:
                return
            self._next_retention_sweep = now + RETENTION_SWEEP_PERIOD_SEC
            sweeper = RetentionSweeper(self.submit_dir, log_dir)
            with self._sweep_lock:
                self._sweep_unlogged = (sweeper, days, log_dir)
        with self._sweep_lock:
            self._sweep_stepping = True
        # Taken back only once its step returns: a step that raises (a bug) drops the sweep, tried
        # again at the next period rather than raising again each cycle.
        try:
            done = sweeper.step(time.time() - days * 86400.0, {b["id"] for b in batch_jobs},
                                launcher_files_cutoff(batch_jobs), keep=open_log_files(),
                                max_calls=RETENTION_SWEEP_MAX_CALLS, stop=self._closing,
                                max_seconds=RETENTION_SWEEP_MAX_PART_SEC)
        except Exception:
            self._log_stopped_sweep("a part of it raised", stepping_ends=True)
            raise
        if not done:
            self._retention_sweeper = sweeper
            # Read under the lock: a close() that came while the part ran left the line to it.
            with self._sweep_lock:
                self._sweep_stepping = False
                closed = self._closing.is_set()
            if closed:
                self._log_stopped_sweep("the module was closed")
            return
        with self._sweep_lock:
            self._sweep_stepping = False
            self._sweep_unlogged = None
        result = sweeper.result
        removed = result.removed
        if removed:
            self.logger.info("removed %d files older than logging.retention_days (%d days): %d of ended BatchJobs "
                             "(%s), %d of launchers and %d agent logs (%s)", sum(removed.values()), days,
                             removed.get("batch_job", 0), self.submit_dir, removed.get("launcher", 0),
                             removed.get("agent", 0), log_dir)
        if result.failed:
            path, why = result.failed[0]
            self.logger.warning("could not remove %d files older than logging.retention_days (%d days), tried again "
                                "in %.0f s: %s: %s%s", len(result.failed), days,
                                max(0.0, self._next_retention_sweep - time.monotonic()), path, why,
                                f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else "")

    def _log_stopped_sweep(self, why: str, stepping_ends: bool = False) -> None:
        """One line with what the sweep begun removed (and could not remove) before it stopped, once
        per sweep; nothing while a part of it runs (that part logs it as it returns), or when it
        removed and failed nothing."""
        with self._sweep_lock:
            if stepping_ends:
                self._sweep_stepping = False
            elif self._sweep_stepping:
                return
            unlogged, self._sweep_unlogged = self._sweep_unlogged, None
        if unlogged is None:
            return
        sweeper, days, log_dir = unlogged
        removed, failed = sweeper.result.removed, sweeper.result.failed
        if not removed and not failed:
            return
        failure = ""
        if failed:
            failure = f"; could not remove {len(failed)}: {failed[0][0]}: {failed[0][1]}"
        self.logger.log(logging.WARNING if failed else logging.INFO,
                        "the sweep of files older than logging.retention_days (%d days) stopped before its end (%s): "
                        "removed %d files: %d of ended BatchJobs (%s), %d of launchers and %d agent logs (%s)%s",
                        days, why, sum(removed.values()), removed.get("batch_job", 0), self.submit_dir,
                        removed.get("launcher", 0), removed.get("agent", 0), log_dir, failure)

    def close(self) -> None:
        """A sweep in progress stops at its next file, and what it removed so far is logged. The
        agent closes its modules as it stops, after its stop wait for the cycles in progress (a
        part of a sweep is bounded by :data:`RETENTION_SWEEP_MAX_PART_SEC`, well within it)."""
        self._closing.set()
        self._log_stopped_sweep("the module was closed")

    def _revoke_unused_credentials(self, updates: dict[int, dict], refused: "set[int]") -> None:
        """The credentials of BatchJobs that went submit_failed this cycle are revoked, unless a
        submit command of theirs ended without a known outcome (its ``.submitting`` marker is
        kept): its job may be queued, and its launcher would need the credential."""
        failed = []
        for bj_id, update in updates.items():
            if update.get("state") != BatchJobState.submit_failed.value or bj_id in refused:
                continue
            if not self._submission_unknown(bj_id):
                failed.append(bj_id)
        if failed:
            try:
                self.credentials.revoke_unused(failed)
            except Exception:  # never let credential housekeeping stop the scheduler cycle
                self.logger.exception("revoking unused launcher credentials failed")

    def _keep_launcher_credentials(self, batch_jobs: list[dict], updates: dict[int, dict]) -> None:
        live = [b for b in batch_jobs if updates.get(b["id"], {}).get("state", b["state"])
                in (BatchJobState.queued.value, BatchJobState.running.value)]
        try:
            self.credentials.renew_due(live)
            # A submit_failed BatchJob whose .submitting marker was kept may still have a job queued
            # (a try that ended without an answer): its launcher reads the file when it starts.
            self.credentials.remove_stale({b["id"] for b in batch_jobs}, may_be_queued=self._submission_unknown)
        except Exception:  # never let credential housekeeping stop the scheduler cycle
            self.logger.exception("launcher credential housekeeping failed")

    def _submission_unknown(self, batch_job_id: int) -> bool:
        """Whether a submit command of the BatchJob ended without a known outcome (its ``.submitting``
        marker is kept): a job of it may be in the scheduler's queue."""
        script = self.script_path(batch_job_id)
        return script.with_name(script.name + ".submitting").exists()

    def _record_refusals(self, refused: list, by_id: dict[int, dict]) -> None:
        """Say in each refused BatchJob's status_info why its update did not go through (the other
        BatchJobs of the cycle were updated)."""
        notes = []
        for update, error in refused:
            batch_job = by_id.get(update["id"], {"id": update["id"]})
            note: dict = {}
            self._error(note, batch_job, f"the API refused this BatchJob's update: {clean_text(str(error), 500)}")
            notes.append(as_merge({"id": update["id"], "status_info": note["status_info"]},
                                  batch_job.get("status_info")))
        bulk_patch(self.client, "/batch-jobs/", notes)

    def _poll(self) -> tuple[Optional[dict], Optional[str]]:
        """Poll the scheduler. An outage is logged once when it starts, at most once every
        ``OUTAGE_LOG_EVERY_S`` while it lasts, and once when the scheduler answers again."""
        now = time.monotonic()
        try:
            statuses = self.scheduler.get_statuses()
        except Exception as exc:
            self.poll_failures += 1
            self._start_times = {}
            message = str(exc) if isinstance(exc, SchedulerError) else f"{type(exc).__name__}: {exc}"
            if self._poll_failing_since is None:
                self._poll_failing_since, self._poll_failing_since_iso = now, iso_now()
                self._poll_failure_logged = now
                self.logger.warning("scheduler status poll failed: %s (queued and running BatchJobs are left as "
                                    "they are until it answers; repeated at most every %.0f s)",
                                    message, OUTAGE_LOG_EVERY_S)
            elif now - self._poll_failure_logged >= OUTAGE_LOG_EVERY_S:
                self._poll_failure_logged = now
                self.logger.warning("scheduler status poll still failing (%d polls in a row, for %.0f s): %s",
                                    self.poll_failures, now - self._poll_failing_since, message)
            return None, message
        # The poll the driver kept (a duck-typed driver keeps none): its start times of running jobs.
        poll = getattr(self.scheduler, "last_poll", None)
        self._start_times = dict(poll.start_times) if isinstance(poll, StatusPoll) else {}
        if self._poll_failing_since is not None:
            self.logger.warning("scheduler status poll answers again after %d failed polls (%.0f s)",
                                self.poll_failures, now - self._poll_failing_since)
        self.poll_failures = 0
        self._poll_failing_since = None
        self._poll_failing_since_iso = ""
        return statuses, None

    def _handle(self, batch_job: dict, statuses: Optional[dict], poll_error: Optional[str],
                queued_counts: dict[str, int], update: dict) -> None:
        state = BatchJobState(batch_job["state"])
        scheduler_id = batch_job.get("scheduler_id")
        if statuses is not None:  # the scheduler answers (again): an outage's error is outdated
            info = _current_info(update, batch_job)
            if SCHEDULER_STATUS_ERROR in info:
                update["status_info"] = {k: v for k, v in info.items() if k != SCHEDULER_STATUS_ERROR}
            self._clear_error(batch_job, update, _STATUS_UNAVAILABLE)  # written as `error` by an older agent
        if state == BatchJobState.pending_submission:
            job_tags, site_tags = batch_job.get("filter_tags") or {}, self._site_filter_tags()
            if _tags_match(job_tags, site_tags):
                self._submit(batch_job, queued_counts, update)
            else:
                # Not this agent's to submit (an agent of this site with other filter_tags may
                # be): say so once, instead of leaving it pending with no reason. A note another
                # agent of the site left about the same mismatch is not overwritten each cycle.
                info = batch_job.get("status_info") or {}
                if not str(info.get("waiting") or "").startswith(_TAGS_WAITING):
                    update["status_info"] = {**info, "waiting": (
                        f"{_TAGS_WAITING}: its filter_tags {_show_tags(job_tags)} do not include the site's "
                        f"filter_tags {_show_tags(site_tags)}, so this site's agent does not submit it")}
            return
        if state == BatchJobState.pending_deletion:
            if scheduler_id is None:
                self._delete_unrecorded(batch_job, update)
            elif statuses is None:
                # Not deleted while the queue cannot be read (the job may have ended meanwhile);
                # the outage is noted as on a queued or running BatchJob: `balsam site stop`,
                # which waits for the BatchJobs `balsam queue term` marked, reads it there.
                self._note_outage(batch_job, update, poll_error)
            elif scheduler_id in statuses:
                self._delete(batch_job, scheduler_id, update)
            else:
                self._left_queue(batch_job, update, deleting=True)
            return
        # queued or running
        if statuses is None:
            self._note_outage(batch_job, update, poll_error)
            return
        status = statuses.get(scheduler_id) if scheduler_id is not None else None
        if status is None or status.state in (BatchJobState.finished, BatchJobState.submit_failed):
            self._left_queue(batch_job, update, listed=status)
            return
        self.missing_counts.pop(batch_job["id"], None)
        self.missed_since.pop(batch_job["id"], None)
        new_state = status.state
        if WITHDRAW_IF_QUEUED in (batch_job.get("status_info") or {}):
            if self._withdraw_if_queued(batch_job, state, new_state, update):
                return
        if new_state in (BatchJobState.queued, BatchJobState.running) and new_state != state:
            update["state"] = new_state.value
            stored = batch_job.get("start_time")
            # The scheduler's own start is sent also where a start is stored already: the server
            # stores a launcher's first Session's time as soon as it opens (usually before this
            # poll), and the scheduler's start is earlier and exact. The server keeps the earlier
            # (a requeued job's later start is not sent: start_time is the first start).
            if new_state == BatchJobState.running and (not stored or scheduler_id in self._start_times):
                started = self._start_time(batch_job, scheduler_id)
                if not stored or started < _aware(parse_datetime(stored)):
                    update["start_time"] = format_datetime(started)
            if state == BatchJobState.running and new_state == BatchJobState.queued:
                self._record_requeue(batch_job, update)
            else:
                self.logger.info("BatchJob %s: %s -> %s", batch_job["id"], state.value, new_state.value)
        self._copy_reason(batch_job, getattr(status, "message", "") or "", update)

    def _start_time(self, batch_job: dict, scheduler_id: int) -> dt.datetime:
        """When a job this cycle's poll first shows running started: the scheduler's own start
        time where the poll gave one (``StatusPoll.start_times``), else now, the agent's sighting
        (up to ``sync_period`` late). A start past now (but within ``START_TIME_SKEW_SEC``: the
        scheduler's clock a little ahead) is now, when the job was seen running; one further past
        now, or more than ``START_TIME_SKEW_SEC`` before the BatchJob's submission
        (``status_info["submit_time"]``), or without a time zone, is not taken (logged: the first
        of each kind at INFO)."""
        now = utcnow()
        started = self._start_times.get(scheduler_id)
        if started is None:
            return now
        if not isinstance(started, dt.datetime):
            return self._ignore_start("not a time", batch_job, f"{started!r} is not a time", now)
        if started.tzinfo is None or started.utcoffset() is None:
            # Most likely datetime.fromtimestamp() or a local-time parse in a driver: read as UTC
            # it would be off by the agent's UTC offset, hours, with nothing to tell it.
            return self._ignore_start("no time zone", batch_job, f"{started.isoformat()} has no time zone "
                                      "(a driver's start_times are aware UTC datetimes)", now)
        skew = dt.timedelta(seconds=START_TIME_SKEW_SEC)
        if started > now + skew:
            return self._ignore_start("after now", batch_job, f"{format_datetime(started)} is more than "
                                      f"{START_TIME_SKEW_SEC} s past now ({format_datetime(now)})", now)
        submitted = _submit_time(batch_job)
        if submitted is not None and started < submitted - skew:
            return self._ignore_start("before submission", batch_job, f"{format_datetime(started)} is more than "
                                      f"{START_TIME_SKEW_SEC} s before its submission ({format_datetime(submitted)})",
                                      now)
        return min(started, now)

    def _ignore_start(self, kind: str, batch_job: dict, why: str, now: dt.datetime) -> dt.datetime:
        first = kind not in self._start_time_ignored
        self._start_time_ignored.add(kind)
        self.logger.log(logging.INFO if first else logging.DEBUG,
                        "BatchJob %s: the scheduler's start time of job %s is not taken: %s; start_time is when "
                        "the agent saw it running%s", batch_job["id"], batch_job.get("scheduler_id"), why,
                        " (further such cases are logged at DEBUG)" if first else "")
        return now

    def _note_outage(self, batch_job: dict, update: dict, poll_error: Optional[str]) -> None:
        """The status poll failed: say so in the BatchJob's status_info once the outage reaches the
        driver's threshold of failed polls, as ``status_info[SCHEDULER_STATUS_ERROR]`` (not ``error``,
        the launcher's: see :data:`SCHEDULER_STATUS_ERROR`). Written once (the poll count and the driver's text
        change every poll and are left out of later cycles, so the BatchJobs are not PATCHed each
        cycle); the module logs the outage itself, not once per BatchJob. Removed once the
        scheduler answers again (:meth:`_handle`)."""
        if self.poll_failures < self.threshold:
            return
        info = _current_info(update, batch_job)
        if SCHEDULER_STATUS_ERROR not in info and not str(info.get("error") or "").startswith(_STATUS_UNAVAILABLE):
            since = self._poll_failing_since_iso or iso_now()
            update["status_info"] = {**info, SCHEDULER_STATUS_ERROR: clean_text(
                f"{_STATUS_UNAVAILABLE} since {since} (the status poll failed {self.poll_failures} times in a row): "
                f"{poll_error}")}

    def _delete(self, batch_job: dict, scheduler_id: int, update: dict) -> None:
        """Delete the scheduler job of a pending_deletion BatchJob the poll still lists. A delete
        that fails is tried again next cycle (the job is still listed then, or it left the queue
        and the BatchJob ends); its error is written every cycle it fails, with its time, which
        `balsam site stop` reads as "cannot end it now" when written since its wait began, and
        removed once a delete goes through. Logged in full once, then summed up."""
        try:
            self.scheduler.delete_job(scheduler_id)
        except Exception as exc:
            self._delete_failed(batch_job, scheduler_id, exc, update, _DELETE_FAILED)
            return
        self.logger.info("BatchJob %s: deleted scheduler job %s", batch_job["id"], scheduler_id)
        self._clear_error(batch_job, update, _DELETE_FAILED)

    def _delete_failed(self, batch_job: dict, scheduler_id: int, exc: Exception, update: dict, prefix: str) -> None:
        """A delete (``prefix``: of a pending_deletion BatchJob, or a withdrawal's) failed: its error is
        written (with its time, each cycle it fails), and logged in full the first time a failure of
        this text (the job's number aside) is met, then summed up every ``OUTAGE_LOG_EVERY_S`` with
        the BatchJobs it struck: one line for a scheduler outage, not one per BatchJob."""
        message = str(exc) if isinstance(exc, SchedulerError) else f"{type(exc).__name__}: {exc}"
        self._error(update, batch_job, f"{prefix}{message}", log=False)
        note = self._repeats.note(_delete_failure_key(prefix, exc, message, scheduler_id), batch_job["id"])
        if note is None:
            self.logger.warning("BatchJob %s: %s (tried again every cycle; the same failure of other jobs is "
                                "summed up every %.0f s)", batch_job["id"], update["status_info"]["error"],
                                OUTAGE_LOG_EVERY_S)
        elif note:
            self.logger.warning("%sscheduler jobs still failing: %s; %s", "withdrawal: delete of "
                                if prefix == _WITHDRAW_DELETE_FAILED else "delete of ", clean_text(message, 500), note)

    def _withdraw_if_queued(self, batch_job: dict, state: BatchJobState, polled: BatchJobState,
                            update: dict) -> bool:
        """A BatchJob marked ``status_info[WITHDRAW_IF_QUEUED]``: deleted from the scheduler now, and
        pending_deletion, when both its state and this cycle's poll say it still waits (True: done
        with it this cycle). Once it started (running in the API or in the poll) the withdrawal is
        dropped, the marker removed, one INFO line, and the BatchJob goes on as any other (False).
        A delete that fails keeps the marker: tried again next cycle, if the job still waits."""
        scheduler_id = batch_job["scheduler_id"]
        info = batch_job.get("status_info") or {}
        if state == BatchJobState.queued and polled == BatchJobState.queued:
            try:
                self.scheduler.delete_job(scheduler_id)
            except Exception as exc:
                self._delete_failed(batch_job, scheduler_id, exc, update, _WITHDRAW_DELETE_FAILED)
                return True
            self._clear_error(batch_job, update, _WITHDRAW_DELETE_FAILED)
            update["state"] = BatchJobState.pending_deletion.value
            self.logger.info("BatchJob %s: withdrawn while still queued (%s %s): deleted scheduler job %s",
                             batch_job["id"], WITHDRAW_IF_QUEUED, info.get(WITHDRAW_IF_QUEUED), scheduler_id)
            return True
        self._clear_error(batch_job, update, _WITHDRAW_DELETE_FAILED)  # no withdrawal any more
        update["status_info"] = {k: v for k, v in (update["status_info"] if "status_info" in update else info).items() if k != WITHDRAW_IF_QUEUED}
        self.logger.info("BatchJob %s: withdrawal dropped (%s %s): it started (it was %s, scheduler job %s is %s), "
                         "so it goes on running", batch_job["id"], WITHDRAW_IF_QUEUED, info.get(WITHDRAW_IF_QUEUED),
                         state.value, scheduler_id, polled.value)
        return False

    def _record_requeue(self, batch_job: dict, update: dict) -> None:
        """The scheduler lists a running job as waiting again: it was requeued (Slurm's ``scontrol
        requeue``, a node failure, a preemption that requeues). The BatchJob goes back to queued and
        its status_info counts the requeues (``requeue_count``, ``requeue_time``: the last one seen).
        ``start_time`` keeps the first start (when the allocation first held nodes); the last run's
        start, from the scheduler's history, goes to status_info ``last_start_time`` when it ends."""
        info = _current_info(update, batch_job)
        try:
            count = int(info.get("requeue_count") or 0) + 1
        except ValueError:
            count = 1
        info.update(requeue_count=str(count), requeue_time=iso_now())
        update["status_info"] = info
        self.logger.warning("BatchJob %s: scheduler job %s was requeued (running -> queued, requeue %d); its "
                            "launcher's run ended, the scheduler starts it again", batch_job["id"],
                            batch_job.get("scheduler_id"), count)

    def _copy_reason(self, batch_job: dict, reason: str, update: dict) -> None:
        """Keep ``status_info["scheduler_reason"]`` equal to the scheduler's current word on why the job
        waits (Slurm's pending reason, PBS's comment): set, changed, or removed once it has none.
        Only a change goes into the cycle's bulk PATCH."""
        info = _current_info(update, batch_job)
        reason = clean_text(reason)
        if info.get("scheduler_reason", "") == reason:
            return
        if reason:
            info["scheduler_reason"] = reason
            self.logger.info("BatchJob %s: scheduler says %s", batch_job["id"], reason)
        else:
            info.pop("scheduler_reason", None)
        update["status_info"] = info

    def _fetch_histories(self, batch_jobs: list[dict],
                         statuses: Optional[dict]) -> tuple[dict[int, Optional[JobHistory]], set[int]]:
        """One history lookup (sacct, qstat -x ...) for every job that left the queue this cycle:
        the records found, and the ids whose lookup failed (their end is unknown this cycle)."""
        if statuses is None:
            self.history_failures = 0
            return {}, set()
        gone = {
            b["scheduler_id"]: self.script_path(b["id"])
            for b in batch_jobs
            if b.get("scheduler_id") is not None
            and b["state"] != BatchJobState.pending_submission.value
            and (
                b["scheduler_id"] not in statuses
                or statuses[b["scheduler_id"]].state in (BatchJobState.finished, BatchJobState.submit_failed)
            )
        }
        if not gone:
            self.history_failures = 0
            return {}, set()
        # What the last status poll said of the jobs that ended (squeue lists them for MinJobAge
        # seconds). The driver's get_histories falls back on these itself, but when its lookup
        # fails it then answers None for every other job, which reads as "no record" and would
        # count toward declaring them failed: it is asked with a poll that has no ended records
        # (so a failed lookup raises) and the fallback is applied here.
        poll = getattr(self.scheduler, "last_poll", None)
        ended = {i: h for i, h in poll.ended.items() if i in gone and h is not None} if isinstance(poll, StatusPoll) else {}
        try:
            if ended:
                found = self.scheduler.get_histories(gone, last_poll=attrs.evolve(poll, ended={}))
            else:
                found = self.scheduler.get_histories(gone)
            histories = {i: with_poll_record(found.get(i), ended.get(i)) for i in gone}
        except Exception as exc:
            self.history_failures += 1
            message = str(exc) if isinstance(exc, SchedulerError) else f"{type(exc).__name__}: {exc}"
            self._history_error = message
            unknown = set(gone) - set(ended)
            self.logger.warning(
                "history lookup of %d jobs failed (%d in a row): %s; %s", len(gone), self.history_failures, message,
                f"jobs {', '.join(map(str, sorted(unknown)))} are left as they are until it answers" if unknown
                else "the last status poll's record of them is used",
            )
            return dict(ended), unknown
        self.history_failures = 0
        return histories, set()

    def _history_unknown_note(self, batch_job: dict, update: dict) -> None:
        """The job left the queue but its history lookup failed: its end (ran or not, when) is
        unknown, so it is not counted as missing. Once the lookup has failed ``threshold`` cycles
        in a row the BatchJob's status_info says so (written when the text changes only)."""
        if self.history_failures < self.threshold:
            return
        message = (f"scheduler job {batch_job['scheduler_id']} {_LOOKUP_FAILING}, "
                   f"so its end is not recorded yet: {self._history_error}")
        if (batch_job.get("status_info") or {}).get("error") != clean_text(message):
            self._error(update, batch_job, message)

    def _left_queue(self, batch_job: dict, update: dict, *, deleting: bool = False,
                    listed: Optional[SchedulerJobStatus] = None) -> None:
        """The scheduler no longer lists the job (or lists it in a final state, ``listed``): ask its
        history before declaring it finished."""
        scheduler_id = batch_job["scheduler_id"]
        if scheduler_id in self._history_unknown:
            # Not "no record": the lookup itself failed (accounting daemon down, a timeout). The
            # job may well have run; it is looked up again next cycle, and not counted as missing.
            self._history_unknown_note(batch_job, update)
            return
        history: Optional[JobHistory] = self._histories.get(scheduler_id)
        if (deleting and history is not None and history.state == BatchJobState.queued
                and history.start_time is None):
            # A waiting record of a job we deleted ourselves (a log whose delete line is not
            # written or not visible yet: file-system lag) says nothing the deletion did not: it
            # is read as no record, so the job ends now instead of after its wall time + grace.
            history = None
        if history is not None and history.state in STILL_ACTIVE:
            if self._still_active(batch_job, history, update):
                return
            history = None  # past its wall time: a record that never ends counts as no record
        if history is None and deleting:
            # We asked for the deletion: a job without a history record is simply gone.
            history = JobHistory(scheduler_id=scheduler_id, state=BatchJobState.finished, message="deleted")
        if history is None and listed is not None and listed.state == BatchJobState.submit_failed:
            self._delete_never_running(batch_job, listed, update)
            return
        if history is None:
            missing = self.missing_counts.get(batch_job["id"], 0) + 1
            self.missing_counts[batch_job["id"]] = missing
            if missing < self.threshold:
                return
            self.missing_counts.pop(batch_job["id"], None)
            self.missed_since.pop(batch_job["id"], None)
            state = BatchJobState(batch_job["state"])
            never_ran = state == BatchJobState.queued and not deleting and not _has_run(batch_job)
            final = BatchJobState.submit_failed if never_ran else BatchJobState.finished
            update.update(state=final.value, end_time=format_datetime(utcnow()))
            self._error(update, batch_job, f"scheduler job {scheduler_id} left the queue and has no history record")
            update["status_info"].pop("scheduler_reason", None)  # why it waited: outdated once it ended
            self._note_launcher_error(batch_job, update["status_info"])
            return
        self.missing_counts.pop(batch_job["id"], None)
        self.missed_since.pop(batch_job["id"], None)
        final = history.state
        if deleting or final not in (BatchJobState.finished, BatchJobState.submit_failed):
            final = BatchJobState.finished
        ran_anyway = final == BatchJobState.submit_failed and _has_run(batch_job)
        if ran_anyway:  # a record without a start (a requeued job cancelled while it waited again)
            final = BatchJobState.finished
        update["state"] = final.value
        info = dict(batch_job.get("status_info") or {})
        # start_time is the allocation's first start: a requeued job's history gives its last
        # run's start, which is kept in status_info (last_start_time) instead. The earlier of the
        # stored and the history's start is kept (the stored one is the poll's start time of the
        # job, or where the poll gave none the agent's first sighting of it running, up to
        # sync_period late; the history's is exact for a job never requeued).
        stored = _aware(parse_datetime(batch_job["start_time"])) if batch_job.get("start_time") else None
        if history.start_time is not None:
            if stored is None or _aware(history.start_time) < stored:
                update["start_time"] = format_datetime(history.start_time)
            elif info.get("requeue_count") and _aware(history.start_time) > stored:
                info["last_start_time"] = format_datetime(history.start_time)
        update["end_time"] = format_datetime(history.end_time or utcnow())
        info.pop("scheduler_reason", None)  # why it waited: outdated once it ended
        info.pop(SCHEDULER_STATUS_ERROR, None)  # the poll answered
        if (_LOOKUP_FAILING in str(info.get("error") or "")  # outdated now that the lookup answered
                or str(info.get("error") or "").startswith(_STATUS_UNAVAILABLE)  # an older agent's outage
                or (deleting and str(info.get("error") or "").startswith(_DELETE_FAILED))  # the job is gone
                or str(info.get("error") or "").startswith(_WITHDRAW_DELETE_FAILED)):  # nothing to withdraw
            info.pop("error", None)
            info.pop("error_time", None)
        if history.native_state:
            info["scheduler_state"] = clean_text(history.native_state)
        if history.message:
            message = history.message
            if ran_anyway and message.startswith(_NEVER_STARTED):  # the driver's word for no start
                message = message[len(_NEVER_STARTED):]
            info["scheduler_message"] = clean_text(message)
        if final == BatchJobState.submit_failed:
            info.update(error=clean_text(history.message) or f"the scheduler never ran job {scheduler_id}", error_time=iso_now())
        self._note_launcher_error(batch_job, info)
        if info != (batch_job.get("status_info") or {}):
            update["status_info"] = info
        self.logger.info("BatchJob %s: scheduler job %s %s", batch_job["id"], scheduler_id, final.value)

    def _launcher_settings_problem(self) -> str:
        """Why the site's settings.yml does not load as a launcher reads it ("" when it does, or
        when there is no such file to read). Read once per cycle that has a submission to make;
        logged once when the problem appears or changes, and once when it is gone."""
        if self._settings_problem is not None:
            return self._settings_problem
        path = self.site_path / "settings.yml"
        problem = ""
        if path.exists():
            try:
                load_settings(path, only=LAUNCHER_SECTIONS, log_warnings=False)
            except Exception as exc:  # SettingsError, or a reading problem: either stops the launcher
                problem = clean_text(str(exc))
        if problem and problem != self._settings_problem_logged:
            self.logger.error("submissions held: settings.yml does not load, so launchers could not start: %s", problem)
        elif not problem and self._settings_problem_logged:
            self.logger.info("settings.yml loads again: submissions resume")
        self._settings_problem = self._settings_problem_logged = problem
        return problem

    def _note_launcher_error(self, batch_job: dict, info: dict) -> None:
        """Put the launcher's last ``Error:`` line (see :func:`launcher_error_line`) into the ended
        BatchJob's ``info``: the scheduler says only "exit status 1", and the reason was in the
        output file alone. Sent with the cycle's other updates (one bulk PATCH)."""
        try:
            line = launcher_error_line(self.script_path(batch_job["id"]))
        except Exception:  # a reading problem must not keep the BatchJob from ending
            self.logger.exception("BatchJob %s: cannot read its output file", batch_job["id"])
            return
        if line:
            info["launcher_error"] = clean_text(line)
            self.logger.warning("BatchJob %s: its launcher failed: %s", batch_job["id"], clean_text(line))

    def _delete_never_running(self, batch_job: dict, status: SchedulerJobStatus, update: dict) -> None:
        """The scheduler still lists the job but says it will never run (Cobalt's dep_fail): it
        would hold a place among the queue's jobs (and max_queued_jobs) until deleted by hand, so
        it is deleted, and the BatchJob is submit_failed with the scheduler's word at once."""
        scheduler_id = batch_job["scheduler_id"]
        said = clean_text(status.message) or "failed"
        try:
            self.scheduler.delete_job(scheduler_id)
        except Exception as exc:  # tried again next cycle: the job is still listed
            message = str(exc) if isinstance(exc, SchedulerError) else f"{type(exc).__name__}: {exc}"
            self._error(update, batch_job, f"the scheduler will never run job {scheduler_id} ({said}); "
                                           f"deleting it failed: {message}")
            return
        self.missing_counts.pop(batch_job["id"], None)
        update.update(state=BatchJobState.submit_failed.value, end_time=format_datetime(utcnow()))
        self._error(update, batch_job, f"the scheduler will never run job {scheduler_id} ({said}): deleted it")
        update["status_info"].pop("scheduler_reason", None)
        update["status_info"]["scheduler_state"] = said

    def _still_active(self, batch_job: dict, history: JobHistory, update: dict) -> bool:
        """The status poll did not list the job but its history says it is still queued or
        running (an empty or cut status output; Cobalt's .cobaltlog with a start and no end): the
        BatchJob is kept (a queued one moves to running), and the job is not counted as missing
        until it is past its wall time plus ``ACTIVE_RECORD_GRACE_MIN`` (a record that never ends,
        e.g. the scheduler died with the job, must not hold the BatchJob for ever)."""
        started = history.start_time or (parse_datetime(batch_job["start_time"]) if batch_job.get("start_time") else None)
        # Never started: bounded from when the poll first missed it (a record stuck in a queued
        # state, e.g. PBS's M for a job moved to another server, or a Slurm runaway job).
        since = started or self.missed_since.setdefault(batch_job["id"], utcnow())
        if utcnow() > since + dt.timedelta(minutes=int(batch_job["wall_time_min"]) + ACTIVE_RECORD_GRACE_MIN):
            return False  # counted as missing from now on (missed_since is dropped when it ends)
        self.missing_counts.pop(batch_job["id"], None)
        if history.state == BatchJobState.running and batch_job["state"] == BatchJobState.queued.value:
            update["state"] = BatchJobState.running.value
            if not batch_job.get("start_time"):
                update["start_time"] = format_datetime(started or utcnow())
            elif history.start_time is not None:
                # As _left_queue: a stored start is not always a requeued job's first one. The
                # server records the launcher's first Session while the BatchJob is still queued
                # (sessions_logic.note_batch_job_start), later than the scheduler's exact start:
                # an earlier history start is sent (the server keeps the earlier). A requeued
                # BatchJob runs again: start_time keeps the first start (as in _record_requeue),
                # and this run's later start is status_info's last_start_time.
                stored = _aware(parse_datetime(batch_job["start_time"]))
                info = _current_info(update, batch_job)
                if _aware(history.start_time) < stored:
                    update["start_time"] = format_datetime(history.start_time)
                elif info.get("requeue_count") and _aware(history.start_time) > stored:
                    info["last_start_time"] = format_datetime(history.start_time)
                    update["status_info"] = info
            self.logger.info("BatchJob %s: queued -> running (from the scheduler's history)", batch_job["id"])
        self.logger.debug("BatchJob %s: scheduler job %s not in the status poll, but its history says %s",
                          batch_job["id"], batch_job["scheduler_id"], history.state.value)
        return True

    def _submit(self, batch_job: dict, queued_counts: dict[str, int], update: dict) -> None:
        try:
            validate_batch_job(batch_job, self.config)
        except BatchJobRefused as exc:
            update["state"] = BatchJobState.submit_failed.value
            self._error(update, batch_job, f"refused: {exc}")
            return
        queue = batch_job["queue"]
        limits = _as_dict(self.options.allowed_queues.get(queue))
        max_queued = int(limits.get("max_queued_jobs") or 0)
        if max_queued and queued_counts.get(queue, 0) >= max_queued:
            message = f"waiting: {queued_counts[queue]} jobs already in queue {queue!r} (max_queued_jobs {max_queued})"
            self.logger.debug("BatchJob %s: not submitted, %s", batch_job["id"], message)
            if (batch_job.get("status_info") or {}).get("waiting") != message:
                update["status_info"] = {**(batch_job.get("status_info") or {}), "waiting": message}
            return
        script = self.script_path(batch_job["id"])
        marker = script.with_name(script.name + ".scheduler_id")
        if not self._markers_checked(batch_job, script, update):
            return
        # Submitted before, but the API never heard of it (outage, agent restart): never submit twice.
        scheduler_id = _read_marker(marker)
        if scheduler_id is not None:
            self._record_submitted(batch_job, script, scheduler_id, update, "already submitted", since=marker)
            return
        if self._held_back(batch_job, queued_counts, update):
            return
        problem = self._launcher_settings_problem()
        if problem:
            # Its launcher would exit at once reading the file (the agent read it at its start):
            # the allocation wasted, and the BatchJob "finished" with the scheduler's "exit status 1".
            self._set_waiting(batch_job, update, f"waiting: settings.yml does not load, so its launcher could "
                                                 f"not start (fix the file): {problem}")
            return
        retry = self._no_room_retry.get(batch_job["id"])
        if retry is not None and time.monotonic() < retry[1]:
            return  # waiting for room on disk: its status_info says so (_wait_for_room)
        request = self._submit_request(batch_job, script)
        pending = script.with_name(script.name + ".submitting")
        if pending.is_file() and self._adopt_earlier_submission(batch_job, request, pending, marker, update):
            return
        # Set by the lookup above when it could not tell (it then wrote it into the marker).
        earlier_unknown = pending.is_file() and _pending_earlier_unknown(pending)
        # Rendered before the launcher credential is minted: a BatchJob whose script cannot be
        # rendered (a broken template or plugin hook) costs no credential at each try.
        text = self._render_script(batch_job, update)
        if text is None:
            return
        try:
            self.credentials.mint(batch_job)
        except Exception as exc:
            # No submission without a way for its launcher to report: try again next cycle (later
            # when the file found no room). Logged when the wait starts or its reason changes.
            if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:
                self._wait_for_room(batch_job)
            self._waiting_lookup(batch_job, update, f"waiting: cannot mint the launcher credential: {exc}")
            return
        token = self._submit_token(batch_job, update)
        if token is None:
            return
        pending_existed = pending.exists()
        writing = script
        try:
            script.parent.mkdir(parents=True, exist_ok=True)
            # Whole or not at all (_write_replacing): an earlier try's queued job may run this file.
            _write_replacing(script, text)
            os.chmod(script, 0o755)
            # Written before the submit command runs and removed once its outcome is known: found
            # on a later cycle (the agent stopped, or the command timed out), it says that a job
            # may be in the queue already, and the scheduler is asked before submitting again.
            writing = pending
            _write_replacing(pending, f"{iso_now()} {token}{' ' + _EARLIER_UNKNOWN if earlier_unknown else ''}\n")
        except OSError as exc:
            if exc.errno in NO_ROOM_ERRNOS:
                self._no_room_for_submit(batch_job, update, writing, exc, keep_files=pending_existed)
                return
            update["state"] = BatchJobState.submit_failed.value
            self._error(update, batch_job, f"job template: {exc}")
            return
        try:
            scheduler_id = int(self.scheduler.submit(request))
        except Exception as exc:
            permanent = getattr(exc, "permanent", not isinstance(exc, SchedulerError))
            message = str(exc) if isinstance(exc, SchedulerError) else f"{type(exc).__name__}: {exc}"
            if getattr(exc, "at_queue_limit", False):  # nothing reached the queue; no try charged
                if not earlier_unknown:  # else kept: an earlier try's job may be queued
                    pending.unlink(missing_ok=True)
                self._hold_queue(batch_job, queued_counts, message, update,
                                 per_user=bool(getattr(exc, "per_user_limit", False)))
                return
            if getattr(exc, "no_room", False):
                # The scheduler's own signal (SchedulerError.no_room: the local queue's state
                # directory is full or over quota), never its message's words: a remote controller's
                # "No space left on device" for a quota of the job's waited for ever, a submit
                # command every cycle. Nothing reached the queue: not a try of the 3 (which a few
                # seconds apart ended the BatchJob over a disk full for a minute), no marker kept
                # (unless an earlier try's outcome is unknown); tried again after a wait that
                # doubles up to NO_ROOM_RETRY_MAX_SEC. Not ended after some limit: each try costs
                # one command every 5 minutes, the wait and its reason are in status_info, and a
                # BatchJob ended would be replaced (by the elastic queue) by another that waits for
                # the same room; delete it to give up.
                if not earlier_unknown:
                    pending.unlink(missing_ok=True)
                self._wait_for_room(batch_job)
                self._waiting_lookup(batch_job, update, f"waiting: no room on disk to submit ({message}); "
                                                        f"submitted once there is room")
                return
            if permanent and not earlier_unknown:  # the scheduler refused the request: nothing reached its queue
                pending.unlink(missing_ok=True)
            failures = self.submit_failures.get(batch_job["id"], 0) + 1
            self.submit_failures[batch_job["id"]] = failures
            if not permanent and failures >= self.threshold and self._last_try_reached_queue(
                    batch_job, request, pending, marker, update, message):
                if update.get("state") == BatchJobState.queued.value:  # found: it counts toward max_queued_jobs
                    queued_counts[queue] = queued_counts.get(queue, 0) + 1
                return
            if permanent or failures >= self.threshold:
                self.submit_failures.pop(batch_job["id"], None)
                update["state"] = BatchJobState.submit_failed.value
                if pending.is_file():  # kept: a try's outcome is unknown (see _revoke_unused_credentials)
                    message += (f"; a submit command of {request.job_name} ended without an answer and the "
                                f"{self.scheduler.name or type(self.scheduler).__name__} scheduler cannot look jobs up "
                                f"by name: a job {request.job_name} may be in its queue (its launcher credential is "
                                f"kept for it; delete the job by hand if it is not wanted)")
                self._error(update, batch_job, f"submit failed: {message}")
                if permanent:
                    update["status_info"][REFUSED_FOR_GOOD] = "true"
            else:
                self._error(update, batch_job, f"submit failed (attempt {failures}, will retry): {message}")
            return
        self.submit_failures.pop(batch_job["id"], None)
        queued_counts[queue] = queued_counts.get(queue, 0) + 1
        held = self.queue_holds.pop(_hold_key(batch_job), None)
        if held is not None:
            self.logger.info("queue %r accepts submissions of project %r again (held back %.0f s by its limit)",
                             queue, batch_job["project"], time.monotonic() - held.since)
        self._record_submitted(batch_job, script, scheduler_id, update, "submitted", marker=marker, pending=pending)

    def _render_script(self, batch_job: dict, update: dict) -> Optional[str]:
        """The BatchJob's batch script, or None: not rendered. A template the file or the
        BatchJob's values break makes the BatchJob submit_failed with the reason. A plugin's
        ``balsam_job_template_context`` hook that raises (:class:`PluginHookFailed`) is the
        site's code: the BatchJob stays pending_submission with the reason in status_info
        (``waiting``), rendered again after a wait that doubles from ``sync_period`` up to
        ``HOOK_RETRY_MAX_SEC`` (a hook may depend on a file or a service that comes back; a fixed
        plugin is loaded when the agent restarts, and submits it). Logged once in full, then summed up."""
        bj_id = batch_job["id"]
        retry = self._hook_retry.get(bj_id)
        now = time.monotonic()
        if retry is not None and now < retry[1]:
            return None  # its waiting note says why
        try:
            text = render_job_script(
                read_template(self.template_path()),
                build_context(
                    batch_job,
                    self.site_path,
                    default_optional_params=self.options.optional_batch_job_params,
                    platform_options=template_platform_options(getattr(self.site_config, "settings", None)),
                ),
                source=str(self.template_path()),
            )
        except PluginHookFailed as exc:
            failures = (retry[0] if retry is not None else 0) + 1
            wait = min(HOOK_RETRY_MAX_SEC, max(1.0, self.period) * 2 ** min(failures - 1, 20))
            self._hook_retry[bj_id] = (failures, now + wait)
            # Constant while the error is: not PATCHed again at every try.
            self._set_waiting(batch_job, update, (
                f"waiting: its batch script cannot be rendered: {exc}; it stays pending_submission and is "
                f"tried again (at least every {HOOK_RETRY_MAX_SEC:.0f} s): fix the plugin and restart the agent"))
            note = self._repeats.note(("hook", str(exc)), bj_id)
            if note is None:
                self.logger.error("BatchJob %s not submitted: %s; it stays pending_submission and is rendered again "
                                  "after a wait that doubles up to %.0f s (fix the plugin and restart the agent; the "
                                  "same error again is summed up every %.0f s)", bj_id, exc, HOOK_RETRY_MAX_SEC,
                                  OUTAGE_LOG_EVERY_S)
            elif note:
                self.logger.error("not submitted again: %s; %s", exc, note)
            return None
        except JobTemplateError as exc:
            self._hook_retry.pop(bj_id, None)
            update["state"] = BatchJobState.submit_failed.value
            self._error(update, batch_job, f"job template: {exc}")
            if isinstance(exc, ScriptValueRefused):
                # The BatchJob's own values: the same request is refused again at every try
                # (queue_maintainer stops posting it rather than backing off for ever).
                update["status_info"][REFUSED_FOR_GOOD] = "true"
            return None
        if self._hook_retry.pop(bj_id, None) is not None:
            self.logger.info("BatchJob %s: its batch script renders again (the plugin hook answered)", bj_id)
        return text

    def _last_try_reached_queue(self, batch_job: dict, request: SubmitRequest, pending: Path, marker: Path,
                                update: dict, message: str) -> bool:
        """The last try of a submission failed without a refusal (a timeout: the scheduler may have
        queued the job without answering). Before the BatchJob is given up as submit_failed, the
        scheduler is asked for the job, as the next try would have asked: a job it holds is tracked
        (marking the BatchJob submit_failed left that job in the queue, unknown to balsam, to start
        and burn the allocation, while the elastic queue requested another). True when it was found
        (recorded as submitted) or the scheduler cannot be asked now (the BatchJob waits and the
        next cycle asks again, its ``.submitting`` marker kept); False: nothing is queued, or the
        scheduler cannot look jobs up by name: submit_failed as before."""
        if not pending.is_file():
            return False
        try:
            found = self.scheduler.find_submitted(request)
        except Exception as exc:
            self.submit_failures[batch_job["id"]] = self.threshold - 1  # the next cycle's lookup decides
            self._waiting_lookup(batch_job, update, (
                f"waiting: the last submission of {request.job_name} failed ({message}) and the scheduler cannot "
                f"say now whether it queued the job: {exc}"))
            return True
        if not found:
            if found is not None:  # nothing queued: no lookup is left to do
                pending.unlink(missing_ok=True)
            return False
        self.submit_failures.pop(batch_job["id"], None)
        if len(found) > 1:
            self.logger.warning("BatchJob %s: the scheduler has %d jobs named %s (%s); tracking %s",
                                batch_job["id"], len(found), request.job_name, ", ".join(map(str, found)), found[0])
        self._record_submitted(batch_job, Path(request.script_path), found[0], update,
                               f"found in the scheduler after its submit command failed ({message})",
                               marker=marker, pending=pending, since=pending)
        return True

    def _held_back(self, batch_job: dict, queued_counts: dict[str, int], update: dict) -> bool:
        """Whether the BatchJob's queue and project are held by an earlier "queue limit reached"
        refusal (then the BatchJob waits, untried); a hold whose time came, or whose queue shrank,
        lifts here."""
        queue, key = batch_job["queue"], _hold_key(batch_job)
        hold = self.queue_holds.get(key)
        if hold is None or hold.lifted:
            return False
        listed_now = queued_counts.get(queue, 0) if self._poll_answered else None
        if hold.lifts(listed_now, time.monotonic()):
            self.queue_holds[key] = attrs.evolve(hold, lifted=True)
            return False
        self._set_waiting(batch_job, update, f"waiting: queue {queue!r} is at a scheduler limit: {hold.message}")
        return True

    def _hold_queue(self, batch_job: dict, queued_counts: dict[str, int], message: str, update: dict, *,
                    per_user: bool) -> None:
        """The scheduler refused the BatchJob because a queue limit is reached: it stays
        pending_submission (no try charged), and so do the queue's other BatchJobs of the same
        project until the hold lifts.

        The hold is keyed by (queue, project): a project at its own account/association limit holds
        back its own BatchJobs only, and another project's first BatchJob in the queue is still tried.
        Under a per-user limit (which every project of the user shares) this costs at most one refused
        submit per project per lift: acceptable, each is a cheap refusal and the hold is set again."""
        queue, project, key = batch_job["queue"], batch_job["project"], _hold_key(batch_job)
        now = time.monotonic()
        earlier = self.queue_holds.get(key)
        listed = queued_counts.get(queue, 0) if self._poll_answered else None
        listed_anywhere = sum(queued_counts.values()) if self._poll_answered else None
        if listed_anywhere == 0 and per_user:
            # A limit on the user's own jobs (the driver says so from its scheduler's wording:
            # SchedulerError.per_user_limit), and the poll lists none of the user's jobs in any
            # queue (a QOS or a server-wide limit counts those of other queues too), yet it is
            # reached: the request alone exceeds it (PBS max_queued_res, a QOS allowing 0 jobs),
            # which no wait clears; held, it would be tried first at every lift and keep the
            # project's other BatchJobs of the queue waiting for ever. Group, account, association
            # and project limits count other users' jobs, which the poll does not list: never "alone".
            alone = self.limit_refusals_alone.get(batch_job["id"], 0) + 1
            self.limit_refusals_alone[batch_job["id"]] = alone
            if alone >= self.threshold:
                self.limit_refusals_alone.pop(batch_job["id"], None)
                self.queue_holds.pop(key, None)
                update["state"] = BatchJobState.submit_failed.value
                self._error(update, batch_job, f"submit failed: {message} (refused at a queue limit {alone} times while "
                                               f"the scheduler listed no job of yours in queue {queue!r}: the request "
                                               f"alone exceeds the limit; it listed none in any other queue either)")
                update["status_info"][REFUSED_FOR_GOOD] = "true"
                return
        else:
            self.limit_refusals_alone.pop(batch_job["id"], None)
        retry = max(1, int(self.options.queue_limit_retry_sec))
        self.queue_holds[key] = QueueLimitHold(message=clean_text(message), listed=listed, retry_at=now + retry,
                                               since=earlier.since if earlier is not None else now)
        self.submit_failures.pop(batch_job["id"], None)
        self._set_waiting(batch_job, update, f"waiting: queue {queue!r} is at a scheduler limit: {message}")
        if earlier is None:
            if listed:
                when = (f"when a status poll lists fewer than the {listed} job{'s' if listed != 1 else ''} of yours "
                        f"there, or in {retry} s")
            elif listed == 0:
                when = (f"in {retry} s (the status poll lists no job of yours in that queue, so none leaving it can "
                        f"lift the hold sooner)")
            else:
                when = f"in {retry} s (the status poll failed: your jobs there are not counted)"
            self.logger.warning("queue %r, project %r: the scheduler refused BatchJob %s: %s: the project's BatchJobs "
                                "of that queue wait in pending_submission; submitting again %s",
                                queue, project, batch_job["id"], clean_text(message), when)
        else:
            self.logger.info("queue %r, project %r: still at its limit (BatchJob %s refused again); next try in %d s",
                             queue, project, batch_job["id"], retry)

    def _drop_waiting(self, batch_job: dict, update: dict) -> None:
        """A BatchJob that failed waits for nothing: its "waiting" note (a queue-limit hold's, a
        max_queued_jobs wait's) is outdated beside its error."""
        info = _current_info(update, batch_job)
        if "waiting" in info:
            update["status_info"] = {k: v for k, v in info.items() if k != "waiting"}

    def _set_waiting(self, batch_job: dict, update: dict, message: str) -> None:
        message = clean_text(message)
        info = _current_info(update, batch_job)
        if info.get("waiting") != message:
            update["status_info"] = {**info, "waiting": message}

    def _waiting_lookup(self, batch_job: dict, update: dict, message: str) -> None:
        """A lookup by name that failed (also a credential, batch script or submit with no room on
        disk): the BatchJob waits. Said (status_info, one log line) when the wait starts or its text
        changes, not every cycle while the scheduler stays unreachable (or the disk full)."""
        message = clean_text(message)
        if (batch_job.get("status_info") or {}).get("waiting") == message:
            self.logger.debug("BatchJob %s: %s", batch_job["id"], message)
            return
        update["status_info"] = {**_current_info(update, batch_job), "waiting": message}
        self.logger.warning("BatchJob %s: %s", batch_job["id"], message)

    def _store_submit_tokens(self, batch_jobs: list[dict], queued_counts: dict[str, int]) -> None:
        """Store the submit tokens of the BatchJobs this cycle may submit in one bulk PATCH, before
        any submit command runs (an elastic burst of N BatchJobs costs one request, not N). The
        candidates: pending_submission, the site's filter_tags, allowed by the site's settings,
        within their queue's max_queued_jobs, and without submit markers (a BatchJob with markers
        has them checked first, and stores its token alone if it is then submitted). A BatchJob
        whose token the server did not store waits (``_submit_token`` notes why)."""
        self._token_waiting = {}
        site_tags = self._site_filter_tags()
        room: dict[str, Optional[int]] = {}  # queue -> submissions left under max_queued_jobs (None: no limit)
        candidates: list[dict] = []
        for b in sorted(batch_jobs, key=lambda b: b["id"]):
            if b["state"] != BatchJobState.pending_submission.value or (b.get("status_info") or {}).get(SUBMIT_TOKEN):
                continue
            if not _tags_match(b.get("filter_tags") or {}, site_tags):
                continue
            try:
                validate_batch_job(b, self.config)
            except Exception:  # refused (or unreadable): _submit says why
                continue
            script = self.script_path(b["id"])
            if any(script.with_name(script.name + end).exists() for end in (".scheduler_id", ".submitting")):
                continue
            queue = b["queue"]
            if queue not in room:
                max_queued = int(_as_dict(self.options.allowed_queues.get(queue)).get("max_queued_jobs") or 0)
                room[queue] = max_queued - queued_counts.get(queue, 0) if max_queued else None
            left = room[queue]
            if left is not None:
                if left <= 0:
                    continue
                room[queue] = left - 1
            candidates.append(b)
        if not candidates:
            return
        infos = {b["id"]: {**(b.get("status_info") or {}), SUBMIT_TOKEN: uuid.uuid4().hex} for b in candidates}
        try:
            refused = bulk_patch(self.client, "/batch-jobs/", [{"id": i, "status_info_merge": {SUBMIT_TOKEN: v[SUBMIT_TOKEN]}}
                                                               for i, v in infos.items()])
        except Exception as exc:
            refused = [({"id": i}, exc) for i in infos]
        errors = {update["id"]: error for update, error in refused}
        for b in candidates:
            if b["id"] in errors:
                self._token_waiting[b["id"]] = clean_text(
                    f"waiting: cannot store the submit token before submitting: {errors[b['id']]}")
            else:
                b["status_info"] = infos[b["id"]]  # this cycle's later updates keep it
        if errors:
            self.logger.warning("cannot store the submit tokens of BatchJobs %s before submitting them (they wait "
                                "a cycle): %s", ", ".join(map(str, sorted(errors))),
                                clean_text(next(iter(errors.values())), 500))

    def _submit_token(self, batch_job: dict, update: dict) -> Optional[str]:
        """The BatchJob's submit token (:data:`SUBMIT_TOKEN`), stored on the server before the
        first submit command runs (usually by the cycle's :meth:`_store_submit_tokens`), so that
        the markers written around it can prove whose they are after the agent crashed between the
        submit command and the PATCH recording its outcome.
        None (the BatchJob waits, noted in status_info) when the server cannot store it now."""
        info = dict(batch_job.get("status_info") or {})
        token = info.get(SUBMIT_TOKEN)
        if token:
            return str(token)
        waiting = self._token_waiting.get(batch_job["id"])
        if waiting is not None:  # this cycle's bulk PATCH of tokens failed for it (logged there)
            self._set_waiting(batch_job, update, waiting)
            return None
        token = uuid.uuid4().hex
        info[SUBMIT_TOKEN] = token
        try:
            refused = bulk_patch(self.client, "/batch-jobs/", [{"id": batch_job["id"], "status_info_merge": {SUBMIT_TOKEN: token}}])
        except Exception as exc:
            refused = [({}, exc)]
        if refused:
            message = clean_text(f"waiting: cannot store the submit token before submitting: {refused[0][1]}")
            self._set_waiting(batch_job, update, message)
            self.logger.warning("BatchJob %s: %s", batch_job["id"], message)
            return None
        batch_job["status_info"] = info  # this cycle's later updates keep it
        return token

    def _markers_checked(self, batch_job: dict, script: Path, update: dict) -> bool:
        """Move aside the submit markers of ``script`` (``.scheduler_id``, ``.submitting``) that
        belong to another BatchJob of the same id (the server's database was reset or restored
        while the site directory was kept; an id was reused). A marker proves it is this
        BatchJob's by holding the BatchJob's submit token. A marker without a token (written by an
        older agent) is trusted only while the status poll lists its job (the BatchJob then has no
        token either); a job that is no longer listed is not this BatchJob's to adopt. False:
        cannot tell now (the status poll failed), the BatchJob waits."""
        token = (batch_job.get("status_info") or {}).get(SUBMIT_TOKEN)
        marker = script.with_name(script.name + ".scheduler_id")
        pending = script.with_name(script.name + ".submitting")
        scheduler_id, marked = _read_marker_token(marker)
        if scheduler_id is not None:
            if marked is not None:
                stale = marked != token
            elif token:
                stale = True  # this BatchJob's own markers carry its token
            elif self._statuses is None:
                self._set_waiting(batch_job, update, f"waiting: {marker.name} (no submit token) names scheduler job "
                                                     f"{scheduler_id}; the status poll must answer to tell whose it is")
                return False
            else:
                stale = scheduler_id not in self._statuses
            if stale:
                if not self._move_aside(batch_job, marker, f"scheduler job {scheduler_id}"):
                    return False
                if marked is None:  # its .submitting, if any, is as old
                    pending_token = _read_pending_token(pending)
                    if pending.is_file() and pending_token is None:
                        self._move_aside(batch_job, pending, "an unfinished submission")
        if pending.is_file():
            pending_token = _read_pending_token(pending)
            if pending_token is not None and pending_token != token:
                if not self._move_aside(batch_job, pending, "an unfinished submission"):
                    return False
        return True

    def _move_aside(self, batch_job: dict, path: Path, what: str) -> bool:
        aside = path.with_name(f"{path.name}.stale-{utcnow().strftime('%Y%m%dT%H%M%S%f')}")
        try:
            path.rename(aside)
        except OSError as exc:
            self.logger.warning("BatchJob %s: %s belongs to another BatchJob of id %s (%s) and cannot be moved "
                                "aside: %s; not submitted until it is", batch_job["id"], path.name, batch_job["id"],
                                what, exc)
            return False
        self.logger.warning("BatchJob %s: %s is another BatchJob's (%s; not this BatchJob's submit token): "
                            "moved aside to %s", batch_job["id"], path.name, what, aside.name)
        return True

    def _submit_request(self, batch_job: dict, script: Path) -> SubmitRequest:
        return SubmitRequest(
            script_path=script,
            project=batch_job["project"],
            queue=batch_job["queue"],
            num_nodes=int(batch_job["num_nodes"]),
            wall_time_min=int(batch_job["wall_time_min"]),
            job_name=script.stem,
            # The site's defaults overlaid with the BatchJob's own values, as the job script sees
            # them: a default a driver puts on the command line (PBS's `select`, which the command
            # line's `-l select=N` replaced in the script; a raw-flags default) was lost otherwise.
            optional_params={**(self.options.optional_batch_job_params or {}), **(batch_job.get("optional_params") or {})},
        )

    def _delete_unrecorded(self, batch_job: dict, update: dict) -> None:
        """Cancel a BatchJob the API knows no scheduler job of. Usually it was never submitted and
        simply finishes; but a submit command whose outcome is unknown (its ``.submitting`` marker:
        the command timed out, the agent stopped) or whose job id never reached the API (its
        ``.scheduler_id`` marker) may have left a job in the queue, which would run unwatched. That
        job is found the way an interrupted submission is adopted, deleted, and recorded: the next
        cycles follow it to its end like any deletion. A lookup that fails is retried next cycle."""
        script = self.script_path(batch_job["id"])
        marker = script.with_name(script.name + ".scheduler_id")
        pending = script.with_name(script.name + ".submitting")
        if not self._markers_checked(batch_job, script, update):
            return
        recorded = _read_marker(marker)
        found: Optional[list[int]]
        if recorded is not None:
            found = [recorded]
        elif pending.is_file():
            try:
                found = self.scheduler.find_submitted(self._submit_request(batch_job, script))
            except Exception as exc:
                message = (f"waiting: cannot tell whether the earlier submission of {script.stem} reached the "
                           f"scheduler, so the BatchJob is not deleted yet: {exc}")
                self._waiting_lookup(batch_job, update, message)
                return
        else:
            found = []  # never submitted
        if not found:
            update.update(state=BatchJobState.finished.value, end_time=format_datetime(utcnow()))
            if found is None:
                self._error(update, batch_job, (
                    f"an earlier submit command of {script.stem} ended without an answer and the "
                    f"{self.scheduler.name or type(self.scheduler).__name__} scheduler cannot look jobs up by name: "
                    f"a job {script.stem} may be left in its queue (delete it by hand)"))
            try:
                pending.unlink(missing_ok=True)
            except OSError:  # a stale marker of a finished BatchJob is harmless: it is never submitted again
                pass
            return
        for scheduler_id in found:
            try:
                self.scheduler.delete_job(scheduler_id)
            except Exception as exc:  # retried next cycle: the lookup finds the same job again
                message = str(exc) if isinstance(exc, SchedulerError) else f"{type(exc).__name__}: {exc}"
                self._error(update, batch_job, f"delete of scheduler job {scheduler_id} failed: {message}")
                return
            self.logger.info("BatchJob %s: deleted scheduler job %s (its submission was never recorded)",
                             batch_job["id"], scheduler_id)
        try:
            marker.write_text(_marker_text(found[0], batch_job))
            pending.unlink(missing_ok=True)
        except OSError as exc:  # the lookup runs again next cycle; deleting twice is harmless
            self.logger.warning("BatchJob %s: cannot record the submission in %s: %s", batch_job["id"], marker, exc)
        update["scheduler_id"] = found[0]
        info = batch_job.get("status_info") or {}
        if "waiting" in info:
            update["status_info"] = {k: v for k, v in info.items() if k != "waiting"}

    def _adopt_earlier_submission(self, batch_job: dict, request: SubmitRequest, pending: Path, marker: Path,
                                  update: dict) -> bool:
        """An earlier submit command of this BatchJob ended without a known outcome. True when the
        scheduler has its job (recorded as submitted) or cannot be asked yet (wait); False when
        submitting now cannot make a second job, or the scheduler cannot look jobs up by name."""
        try:
            found = self.scheduler.find_submitted(request)
        except Exception as exc:
            message = (f"waiting: cannot tell whether the earlier submission of {request.job_name} reached the "
                       f"scheduler: {exc}")
            self._waiting_lookup(batch_job, update, message)
            return True
        if found is None:
            self.logger.warning(
                "BatchJob %s: an earlier submit command of %s ended without an answer and the %s scheduler "
                "cannot look jobs up by name: submitting again (a second job is possible)",
                batch_job["id"], request.job_name, self.scheduler.name or type(self.scheduler).__name__,
            )
            try:  # remembered across tries and agent restarts: the next try's marker keeps it
                if not _pending_earlier_unknown(pending):
                    with open(pending, "a") as fp:
                        fp.write(f" {_EARLIER_UNKNOWN}\n")
            except OSError as exc:
                self.logger.warning("BatchJob %s: cannot note the unknown outcome in %s: %s", batch_job["id"], pending, exc)
            return False
        if not found:
            # At DEBUG while the BatchJob waits for room on disk: said at every try, once in 5 min for hours.
            self.logger.log(logging.DEBUG if batch_job["id"] in self._no_room_retry else logging.INFO,
                            "BatchJob %s: the earlier submission of %s did not reach the scheduler: submitting",
                            batch_job["id"], request.job_name)
            return False
        if len(found) > 1:
            self.logger.warning("BatchJob %s: the scheduler has %d jobs named %s (%s); tracking %s",
                                batch_job["id"], len(found), request.job_name, ", ".join(map(str, found)), found[0])
        self._record_submitted(batch_job, Path(request.script_path), found[0], update,
                               "found in the scheduler after an interrupted submission", marker=marker, pending=pending,
                               since=pending)
        return True

    def _no_room_for_submit(self, batch_job: dict, update: dict, path: Path, exc: OSError, *,
                            keep_files: bool) -> None:
        """The batch script or its ``.submitting`` marker found no room (ENOSPC, EDQUOT): nothing was
        submitted, and the BatchJob waits for room, as when its credential finds none (it went
        submit_failed at once). The file is named; the partial files are removed (an empty marker
        said "a job may be queued" and kept the credential live), and the credential is revoked
        (minted again at the next try). Not where a ``.submitting`` marker was there before this try
        (``keep_files``): a job of an earlier try may be queued, and need the script and credential."""
        if not keep_files:
            script = self.script_path(batch_job["id"])
            for partial in (script.with_name(script.name + ".submitting"), script):
                try:
                    partial.unlink(missing_ok=True)
                except OSError:
                    pass
            try:
                self.credentials.revoke_unused([batch_job["id"]])
            except Exception:  # never let credential housekeeping stop the scheduler cycle
                self.logger.exception("BatchJob %s: revoking its unused launcher credential failed", batch_job["id"])
        self._wait_for_room(batch_job)
        self._waiting_lookup(batch_job, update, f"waiting: cannot write {path}: {exc.strerror or exc}; submitted "
                                                f"once there is room")

    def _wait_for_room(self, batch_job: dict) -> None:
        """The BatchJob's try found no room on disk: its next try waits ``sync_period``, doubled at
        each try in a row that finds none, up to :data:`NO_ROOM_RETRY_MAX_SEC`."""
        tries = self._no_room_retry.get(batch_job["id"], (0, 0.0))[0] + 1
        wait = min(NO_ROOM_RETRY_MAX_SEC, max(1.0, self.period) * 2 ** min(tries - 1, 20))
        self._no_room_retry[batch_job["id"]] = (tries, time.monotonic() + wait)

    def _record_submitted(self, batch_job: dict, script: Path, scheduler_id: int, update: dict, how: str, *,
                          marker: Optional[Path] = None, pending: Optional[Path] = None,
                          since: Optional[Path] = None) -> None:
        """``since``: the marker of a submission recorded after the fact (an interrupted or timed-out
        submit command whose job was found, an id that reached only the ``.scheduler_id`` marker):
        its time, not now, is the submission's (:func:`_marker_time`). Its job may have been
        running for hours: a submit_time of now made the scheduler's true start look "before its
        submission" (not taken), and hid its first runs from ``first_runs_query``."""
        submitted = _marker_time(since) if since is not None else None
        self._no_room_retry.pop(batch_job["id"], None)  # its wait for room (if any) is over
        if marker is not None:
            try:
                marker.write_text(_marker_text(scheduler_id, batch_job))
                if pending is not None:
                    pending.unlink(missing_ok=True)
            except OSError as exc:  # the .submitting marker stays: a later cycle asks the scheduler
                self.logger.warning("BatchJob %s: cannot record the submission in %s: %s", batch_job["id"], marker, exc)
        info = {k: v for k, v in (batch_job.get("status_info") or {}).items() if k not in ("waiting",)}
        if str(info.get("error") or "").startswith(_SUBMIT_RETRY):  # the retry succeeded: outdated
            info.pop("error", None)
            info.pop("error_time", None)
        info.update(submit_script=str(script), submit_time=submitted or iso_now())
        update.update(state=BatchJobState.queued.value, scheduler_id=scheduler_id, status_info=info)
        self.logger.info("BatchJob %s: %s as scheduler job %s (%s)", batch_job["id"], how, scheduler_id, script.name)

    def _update_site(self, statuses: Optional[dict]) -> None:
        payload: dict[str, Any] = {}
        if statuses is not None:
            payload["queued_jobs"] = {
                # to_dict leaves an empty message out (SchedulerJobStatus.message): 0.7's format
                str(k): clean_record(to_dict(v)) for k, v in statuses.items() if -(2**63) <= int(k) < 2**63
            }
        try:
            windows = self.scheduler.get_backfill_windows()
            payload["backfill_windows"] = {q: [to_dict(w) for w in ws] for q, ws in (windows or {}).items()}
        except Exception as exc:
            # Once per distinct failure: a site without the backfill command (Cobalt's `nodelist`
            # not installed) would otherwise log the same warning every cycle, 8,640 times a day.
            if str(exc) != self._backfill_error:
                self.logger.warning("backfill windows unavailable: %s (said once until it changes)", exc)
            self._backfill_error = str(exc)
            payload["backfill_windows"] = {}
        else:
            self._backfill_error = ""
        self.client.put(f"/sites/{self.site_id}", json=payload)
