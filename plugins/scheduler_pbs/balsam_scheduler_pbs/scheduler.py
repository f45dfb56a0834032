"""PBS Pro / OpenPBS driver: qsub, qstat -f -F json, qstat -x, qdel and pbsnodes -a -F json.

Status and history are read as JSON (``-F json``), which no ``QSTAT_HEADER``/``PBS_QSTAT_*``
setting changes, with ``TZ=UTC`` so the ctime-style dates qstat prints are UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import attrs

from balsam.models import AllowedQueue
from balsam.options import option
from balsam.scheduler import (
    ANY_QUEUE,
    BackfillWindow,
    Command,
    CommandResult,
    JobHistory,
    PolledStatuses,
    Scheduler,
    SchedulerError,
    SchedulerJobStatus,
    StatusPoll,
    SubmitRequest,
    format_walltime,
    shell_reported_signal,
    unknown_outcome_of_signal,
)
from balsam.states import BatchJobState
from balsam.util import first_warning

logger = logging.getLogger("balsam.scheduler.pbs")

def _warn_once(key: tuple[str, str], message: str, *args: object) -> None:
    """A WARNING the first time this process meets ``key`` (the warning's kind and the text at
    fault), DEBUG after that (:func:`balsam.util.first_warning`, bounded): the elastic module and the
    scheduler module both read the backfill windows every cycle, and one bad pbsnodes record was warned
    about twice a minute for hours."""
    (logger.warning if first_warning(("pbsnodes",) + key) else logger.debug)(message, *args)

Q, R, F = BatchJobState.queued, BatchJobState.running, BatchJobState.finished

#: Every PBS ``job_state`` letter, mapped to the BatchJob state (``finished``: left the queue).
PBS_STATES: dict[str, BatchJobState] = {
    "Q": Q,  # queued
    "H": Q,  # held
    "W": Q,  # waiting for its start time
    "T": Q,  # being moved to a new location
    "M": Q,  # moved to another server
    "B": R,  # array job: at least one subjob started
    "R": R,  # running
    "E": R,  # exiting after having run
    "S": R,  # suspended (it had started)
    "U": R,  # suspended because the workstation became busy
    "F": F,  # finished (job history)
    "X": F,  # subjob finished (job history)
}

#: ``-x key=value`` params that become ``-l key=value`` resources on the qsub line.
RESOURCE_PARAMS = ("filesystems", "place", "mem", "ngpus", "host", "file")
#: ``-x select=ngpus=4:system=polaris`` is appended to the select chunk.
SELECT_PARAM = "select"
#: ``-x qsub_flags="-W depend=afterok:123"`` is split like a shell line and appended.
RAW_FLAGS_PARAM = "qsub_flags"

PLAIN_ENV = {"TZ": "UTC"}
#: max_walltime written by site init for a queue without a wall-time limit (one week).
UNLIMITED_WALLTIME_MIN = 7 * 1440
#: Node ``sharing`` values under which a reservation running on the node turns its state to
#: ``resv-exclusive`` (OpenPBS ``resv_exclusive_handler``): on such a node in state ``free`` the
#: reservations its ``resv`` lists are only pending. ALCF's maintenance reservation (``M...``) is
#: pending on every Polaris node (``force_exclhost``) for days before it starts; skipping each node
#: that lists one left the elastic queue no backfill window at all meanwhile.
EXCLUSIVE_SHARING = ("force_excl", "force_exclhost")
#: Seconds a discovery command (site init, on a login node) may take before it is given up.
DISCOVERY_TIMEOUT_SEC = 20.0
#: Longest scheduler comment kept as a status message.
MAX_REASON_CHARS = 300
#: Seconds a job's ``ctime`` may lie before its script's mtime and still be taken as this
#: submission by find_submitted: ctime is the PBS server's clock, the mtime the login node's or
#: file server's, each printed to the whole second, so a server clock even a fraction of a second
#: behind dates our own job before its script. The Output_Path match keeps other scripts' jobs
#: out; an earlier job of this same script path is adopted only if it was submitted within this
#: slack before the script was rewritten.
CLOCK_SLACK_SEC = 120
USER_FORMAT_VARIABLES = ("PBS_QSTAT_HEADER", "QSTAT_HEADER", "PBS_QSTAT_NO_HEADER", "PBS_QSTAT_FMT")

#: What the server itself answers when it refuses a job (its hooks, queues, limits, permissions):
#: a verdict, permanent whatever words it contains -- a hook's "Please try again with a valid
#: project" or "temporarily unavailable" is not connection trouble, and resubmitting the same job
#: gets the same answer.
_SERVER_ANSWER = re.compile(
    r"rejected by server hook|rejected by all possible destinations|unknown queue|violates queue"
    r"|exceeds queue|would exceed .*limit|maximum number of jobs|unauthorized request|illegal attribute"
    r"|unknown resource|queue is not enabled|not allowed|bad uid|invalid", re.IGNORECASE)
#: A qsub that never got an answer from the server: it could not connect (no server, pbs_iff
#: failing to authenticate, a PBS connection errno 150xx) or the connection broke or timed out.
_CONNECTION_TROUBLE = re.compile(
    r"cannot connect|connection refused|end of file|pbs_iff|errno\s*=?\s*150\d\d|timed out"
    r"|communication failure|server not available", re.IGNORECASE)

#: qsub's refusals by a queued-jobs limit (max_queued, queued_jobs_threshold and their _res forms, on a
#: queue or the server, per user, group or project, or overall), as OpenPBS's entity-limit tests
#: expect them: "would exceed queue workq's per-user limit of jobs in 'Q' state", "would exceed user
#: alice's limit on resource ncpus in complex", "Maximum number of jobs for user alice already in queue
#: workq", the older "Maximum number of jobs already in queue" (PBSE_MAXQUED). They clear as the
#: counted jobs leave the queue. Run limits (max_run) hold a queued job instead of refusing it.
_QUEUED_LIMIT = re.compile(r"would exceed .*limit|Maximum number of jobs .*already in", re.IGNORECASE)
#: ... of those, the wordings of a limit on the user's own jobs: the per-user max_queued ("would
#: exceed queue debug's per-user limit", "Maximum number of jobs for user alice already in queue
#: workq") and max_queued_res ("would exceed user alice's limit on resource ncpus in complex"). Group,
#: project and overall limits, and queued_jobs_threshold ("... limit of jobs in 'Q' state"), count
#: jobs that the user's status poll does not show.
_PER_USER_LIMIT = re.compile(r"per-user limit|\buser \S+'s limit|for user \S+ already in", re.IGNORECASE)


def _is_per_user_limit(said: str) -> bool:
    return _PER_USER_LIMIT.search(said) is not None and "'Q' state" not in said


def parse_pbs_time(text: Any) -> Optional[dt.datetime]:
    """``Mon Nov  6 16:43:39 2023`` (printed under TZ=UTC) or epoch seconds -> aware UTC datetime."""
    if text is None or text == "" or isinstance(text, bool):
        return None
    try:
        # Unreadable -> None, never an exception: a JSON stime of 1e999 (inf) raised OverflowError,
        # which failed the whole poll, and a huge epoch made the job's record unreadable.
        if isinstance(text, (int, float)):
            return dt.datetime.fromtimestamp(text, dt.timezone.utc)
        words = str(text).split()
        if len(words) == 1 and words[0].isdecimal():
            return dt.datetime.fromtimestamp(int(words[0]), dt.timezone.utc)
        return dt.datetime.strptime(" ".join(words), "%a %b %d %H:%M:%S %Y").replace(tzinfo=dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def pbs_duration_sec(text: Any) -> Optional[float]:
    """A PBS duration, ``[[HH:]MM:]SS[.fff]`` (PBS's own syntax: ``3600`` is an hour; minutes and
    seconds may exceed 59), or a JSON number of seconds -> seconds; None when unreadable."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) and text >= 0 else None  # JSON 1e999 reads as inf
    parts = str(text).strip().split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdecimal() for p in parts[:-1]):
        return None
    seconds_text = parts[-1]
    whole, _, fraction = seconds_text.partition(".")
    if not whole.isdecimal() or (fraction and not fraction.isdecimal()):
        return None
    seconds = float(seconds_text)
    if not math.isfinite(seconds):
        return None
    for part, scale in zip(reversed(parts[:-1]), (60, 3600)):
        seconds += int(part) * scale
    return seconds


def pbs_duration_min(text: Any) -> int:
    """PBS walltime ``[[HH:]MM:]SS`` -> whole minutes (30 s and more round up); unreadable -> 0."""
    seconds = pbs_duration_sec(text)
    if seconds is None:
        return 0
    return int(seconds // 60) + (1 if seconds % 60 >= 30 else 0)


def _minutes_between(start: Optional[dt.datetime], end: Optional[dt.datetime]) -> int:
    if start is None or end is None:
        return 0
    return max(0, int((end - start).total_seconds() // 60))


def job_number(pbs_job_id: str) -> Optional[int]:
    """``123.server`` -> 123; ``123[].server`` (array) and anything else -> None."""
    head = str(pbs_job_id).split(".", 1)[0].strip()
    return int(head) if head.isdecimal() else None


#: One JSON string, escapes included (matched whole, so that what it holds is never read as JSON).
_JSON_STRING = r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"'
#: A string, or a bare value after ``:`` (a number, true, false, null, or one of PBS's slips).
_STRING_OR_BARE_VALUE = re.compile(rf'({_JSON_STRING})|(:[ \t]*)([^\s,{{}}\[\]":]+)')
_JSON_LITERAL = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
#: A job record's key under "Jobs" (``123.server``, an array's ``123[].server``), one per line as
#: PBS prints it. No Variable_List or resource name starts with a digit.
_JOB_KEY = re.compile(r'^[ \t]*"(\d+(?:\[\d*\])?(?:\.[^"\s]*)?)"[ \t]*:[ \t]*\{', re.M)
_JOB_OWNER = re.compile(r'"Job_Owner"\s*:\s*"([^"@\s]*)')
_DECODER = json.JSONDecoder(strict=False)


def _quote_bad_number(match: re.Match) -> str:
    if match.group(1) is not None or _JSON_LITERAL.fullmatch(match.group(3)):
        return match.group(0)
    return match.group(2) + json.dumps(match.group(3))


def repair_pbs_json(body: str) -> str:
    """The known PBS JSON slips repaired: unescaped backslashes (and, read with ``strict=False``,
    raw control characters) inside strings, and values printed as bare numbers that JSON does not
    allow. OpenPBS before PR #2603 (2023; Polaris runs 2022.1.3) prints any value ``strtod`` reads
    (an environment value ``00``, ``005``, ``-00.1``, ``.123``, ``123.``, ``inf``) unquoted
    (openpbs issue #1255): those are quoted, as the strings they are."""
    body = re.sub(r'\\(?!["\\/bfnrt]|u[0-9a-fA-F]{4})', r"\\\\", body)
    return _STRING_OR_BARE_VALUE.sub(_quote_bad_number, body)


def load_pbs_json(text: str, what: str, object_pairs_hook: Optional[Callable[[list], Any]] = None,
                  warn: Optional[Callable[..., None]] = None) -> dict[str, Any]:
    """qstat/pbsnodes JSON, tolerating the known PBS slips (see ``repair_pbs_json``). Empty output
    is an empty document; anything else that is not a JSON object raises SchedulerError. ``warn``
    logs the repair (default: a WARNING each time)."""
    if not text.strip():
        return {}
    start = text.find("{")
    if start < 0:
        raise SchedulerError(f"{what} printed no JSON (first line: {text.strip().splitlines()[0][:120]!r})")
    body = text[start:]
    try:
        return json.loads(body, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError:
        pass
    try:
        data = json.loads(repair_pbs_json(body), strict=False, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise SchedulerError(f"{what} printed invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    (warn or logger.warning)("%s printed slightly malformed JSON; read it after repair", what)
    return data if isinstance(data, dict) else {}


def _is_complete(body: str) -> bool:
    """Whether a document ends where its braces close (outside strings): not cut off."""
    bare = re.sub(_JSON_STRING, '""', body).rstrip()
    return bare.endswith("}") and bare.count("{") == bare.count("}") and bare.count("[") == bare.count("]")


def split_job_records(body: str) -> Optional[list[tuple[str, str]]]:
    """The text of each job record under ``"Jobs"`` (``[(pbs_id, text from its "{")]``), or None
    when the document has no such records or is not complete (a cut-off listing must not read as
    a shorter queue)."""
    jobs = re.search(r'"Jobs"\s*:\s*\{', body)
    if jobs is None or not _is_complete(body):
        return None
    keys = list(_JOB_KEY.finditer(body, jobs.end()))
    ends = [k.start() for k in keys[1:]] + [len(body)]
    return [(key.group(1), body[key.end() - 1:end]) for key, end in zip(keys, ends)] or None


def _decode_record(text: str, last: bool) -> Any:
    record, end = _DECODER.raw_decode(text)
    rest = text[end:].strip()
    # Each record is followed by a comma, the last by the braces that close "Jobs" and the document.
    if not rest.startswith("}") if last else rest != ",":
        raise ValueError(f"unexpected text after the record: {rest[:40]!r}")
    return record


def load_pbs_jobs(text: str, what: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The job records of a ``qstat -f -F json`` listing: ``(readable {pbs_id: record},
    unreadable {pbs_id: (Job_Owner's user name or "", why)})``.

    The listing holds every user's jobs, so one job of another user that PBS prints as invalid
    JSON (a slip ``repair_pbs_json`` does not know) must not hide ours: when the document does not
    parse, each record is read on its own. A document that cannot be split into records (not the
    PBS layout, or cut off) raises the document's SchedulerError."""
    try:
        doc = load_pbs_json(text, what)
    except SchedulerError as exc:
        start = text.find("{")
        records = split_job_records(repair_pbs_json(text[start:])) if start >= 0 else None
        if records is None:
            raise exc from None
        jobs: dict[str, Any] = {}
        unreadable: dict[str, tuple[str, str]] = {}
        for index, (pbs_id, record) in enumerate(records):
            try:
                jobs[pbs_id] = _decode_record(record, last=index == len(records) - 1)
            except ValueError as err:
                owner = _JOB_OWNER.search(record)
                why = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
                unreadable[pbs_id] = (owner.group(1) if owner else "", why)
        logger.warning("%s; read it record by record: %d readable, %d not", exc, len(jobs), len(unreadable))
        return jobs, unreadable
    found = doc.get("Jobs", {})
    if not isinstance(found, dict):
        raise SchedulerError(f"{what}: 'Jobs' is not an object but {type(found).__name__}")
    return found, {}


class RepeatedKey(list):
    """The values of a key that a JSON object holds more than once (see ``keep_repeated_keys``)."""


def keep_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that keeps every value of a repeated key (as a ``RepeatedKey``):
    ``qstat -Q -f -F json`` prints ``max_queued`` once per restriction (openpbs issue #2677)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key not in result:
            result[key] = value
        elif isinstance(result[key], RepeatedKey):
            result[key].append(value)
        else:
            result[key] = RepeatedKey([result[key], value])
    return result


_RESTRICTION = re.compile(r"\[\s*([ougp]):([^=\]\s]+)\s*=\s*(\d+)\s*\]")


def max_queued_for(value: Any, user: str, default: Optional[int]) -> Optional[int]:
    """The number of jobs ``user`` may queue under a queue's ``max_queued`` (one or several
    ``[o:PBS_ALL=N]``, ``[u:PBS_GENERIC=N]``, ``[u:NAME=N]`` entries): ``u:<user>`` if given, else
    ``u:PBS_GENERIC``, else ``default`` (None: unknown); no more than ``o:PBS_ALL`` (all users' jobs
    together). Group (``g:``) and project (``p:``) limits may not apply to the user's jobs and are left out."""
    texts = value if isinstance(value, list) else [value]
    limits = {(kind, name): int(n) for text in texts for kind, name, n in _RESTRICTION.findall(str(text or ""))}
    own = limits.get(("u", user), limits.get(("u", "PBS_GENERIC"), default))
    overall = limits.get(("o", "PBS_ALL"))
    if own is None or overall is None:
        return overall if own is None else own
    return min(own, overall)


#: The start (lower case) of the comment PBS Pro gives a job that can never run as submitted.
NEVER_RUNS_COMMENT = "can never run"
#: ... except where what the job lacks is a switched-off *server* resource: a boolean one
#: (``(True != False)``, not a count's ``(R: 8 A: 2 T: 2)``, nor a string's ``(abaqus != ansys)``,
#: which is a request no server setting will meet) that the administrators set while the
#: system runs. ALCF sets a file system's (``eagle_fs``, ``grand_fs``, ``home_fs``) False while it is
#: down, and a job that asked for it (``-l filesystems=home:eagle``) is commented "Can Never Run:
#: Insufficient amount of server resource: eagle_fs (True != False)" -- then runs once the file
#: system is back (ALCF's Polaris job-scheduling guide, "Specifying Filesystems"). Read as never
#: starting, the elastic queue told the user to delete every such BatchJob during an outage.
SWITCHED_OFF_SERVER_RESOURCE = re.compile(r"insufficient amount of server resource: \S+ \((?:true|false) != (?:true|false)\)",
                                          re.I)


#: The start of the reason of a job in state W (``qsub -a``: waiting for its start time).
BEGIN_TIME_REASON = "waiting for its start time"


def waiting_reason(job: dict[str, Any]) -> str:
    """Why a job that has not started waits: the scheduler's ``comment`` ("Not Running: ...",
    "Can Never Run: ..."), else its holds. (A running job's comment only says where it started.)
    A job in state H or W says so first, whatever its comment ("held (...)", "waiting for its
    start time"): with a comment of the scheduler's own ("Not Running: ..."), such a job read as
    one waiting for nodes and claimed a backfill window (``waits_for_other_than_nodes``). One that
    can never run keeps that comment first (``never_starts``)."""
    comment = " ".join(str(job.get("comment") or "").split())
    letter = str(job.get("job_state", "")).strip().upper()
    holds = str(job.get("Hold_Types") or "").strip()
    held = f"held (Hold_Types {holds})" if holds and holds != "n" else ""
    first = ""
    if letter == "H":
        first = held or "held (job_state H)"
    elif letter == "W":
        start = " ".join(str(job.get("Execution_Time") or "").split())
        first = f"{BEGIN_TIME_REASON} ({start})" if start else BEGIN_TIME_REASON
    if not comment:
        return (first or held)[:MAX_REASON_CHARS]
    if not first or comment.lower().startswith((NEVER_RUNS_COMMENT, "job held")):
        return comment[:MAX_REASON_CHARS]
    return f"{first}: {comment}"[:MAX_REASON_CHARS]


#: What PBS Pro shows as ``project`` of a job submitted without ``-P`` (unrelated to ``-A``).
DEFAULT_PBS_PROJECT = "_pbs_project_default"


def job_project(job: dict[str, Any]) -> str:
    """The allocation a job charges: ``Account_Name`` (qsub ``-A``, what a BatchJob's project is),
    else a ``project`` (qsub ``-P``) other than PBS's placeholder ``_pbs_project_default``."""
    account = str(job.get("Account_Name") or "").strip()
    if account:
        return account
    project = str(job.get("project") or "").strip()
    return "" if project == DEFAULT_PBS_PROJECT else project


def select_node_count(select: str) -> int:
    """Nodes of a ``select`` spec without ``nodect``: the sum of each ``+`` chunk's leading count
    (``1:ncpus=64+2:ncpus=32`` -> 3); a chunk without one asks for one node."""
    total = 0
    for chunk in select.split("+"):
        match = re.match(r"\s*(\d+)\s*(:|$)", chunk)
        total += int(match.group(1)) if match else 1
    return total


def _owner(job: dict[str, Any]) -> str:
    """The user name of a job's ``Job_Owner`` (``alice@login-host``)."""
    return str(job.get("Job_Owner", "")).split("@", 1)[0]


def _pbs_error(result: CommandResult) -> str:
    lines = [ln.strip() for ln in (result.stderr + "\n" + result.stdout).splitlines() if ln.strip()]
    if not lines:
        return result.describe()
    return re.sub(r"^(qsub|qstat|qdel|pbsnodes): ", "", lines[0])


def _unknown_ids(result: CommandResult) -> set[int]:
    ids = set()
    for match in re.finditer(r"Unknown Job Id:?\s+(\d+)", result.stderr + result.stdout):
        ids.add(int(match.group(1)))
    return ids


@attrs.frozen
class PBSOptions:
    """``scheduler.options`` of the PBS driver."""

    backfill_window_min: int = option(
        60, "Length (minutes) of the backfill windows reported for free nodes: PBS does not say how long a "
        "node stays free, so this is the request size the elastic queue may try.",
        validator=attrs.validators.ge(1),
    )
    any_queue_key: str = option(ANY_QUEUE, "Queue name under which free nodes tied to no particular queue are reported.")


class PBSScheduler(Scheduler):
    """PBS Pro / OpenPBS driver (Polaris, Aurora, Sunspot, and any PBS site)."""

    name = "pbs"
    default_job_template = resources.files(__package__).joinpath("job-template.sh").read_text()
    options_schema = PBSOptions

    def never_starts(self, status: SchedulerJobStatus) -> bool:
        # PBS Pro's scheduler comments a job that exceeds a queue or server limit (or asks for
        # resources no node has) "Can Never Run: ..."; "Not Running: ..." waits its turn. A
        # switched-off server resource (a file system down) is no verdict: it waits for it.
        return (status.state is BatchJobState.queued and status.message.lower().startswith(NEVER_RUNS_COMMENT)
                and SWITCHED_OFF_SERVER_RESOURCE.search(status.message) is None)

    def waits_for_other_than_nodes(self, status: SchedulerJobStatus) -> bool:
        # A job in state H (qhold, or a dependency: a system hold) or W (qsub -a) reads "held (...)"
        # or "waiting for its start time" first, whatever its comment (waiting_reason); PBS
        # comments a held one "Job held by ...". One waiting for a switched-off server resource
        # (a file system down) does not take nodes that come free either.
        message = status.message.lower()
        return status.state is BatchJobState.queued and (
            message.startswith(("held (", BEGIN_TIME_REASON)) or "job held" in message
            or SWITCHED_OFF_SERVER_RESOURCE.search(message) is not None)

    # -- submit -----------------------------------------------------------------------------
    def render_submit(self, request: SubmitRequest) -> Command:
        script = Path(request.script_path)
        params = {k: str(v).strip() for k, v in request.optional_params.items() if str(v).strip()}
        select = str(request.num_nodes) + (f":{params[SELECT_PARAM]}" if SELECT_PARAM in params else "")
        args = ["qsub", "-N", request.job_name[:236], "-l", f"select={select}",
                "-l", f"walltime={format_walltime(request.wall_time_min)}",
                "-k", "doe", "-o", str(script.with_suffix(".output")), "-e", str(script.with_suffix(".error"))]
        if request.project:
            args += ["-A", request.project]
        if request.queue:
            args += ["-q", request.queue]
        for key in RESOURCE_PARAMS:
            if key in params:
                args += ["-l", f"{key}={params[key]}"]
        if RAW_FLAGS_PARAM in params:
            args += shlex.split(params[RAW_FLAGS_PARAM])
        args.append(str(script))
        return Command(args, env=PLAIN_ENV, cwd=script.parent)

    def parse_submit(self, result: CommandResult) -> int:
        if result.returncode != 0:
            # A wrapper's qsub ended by a signal, after it may have queued the job: no answer.
            signalled = shell_reported_signal(result)
            if signalled is not None and _SERVER_ANSWER.search(result.stderr + result.stdout) is None:
                raise unknown_outcome_of_signal(result, signalled)
            said = result.stderr + result.stdout
            transient = _SERVER_ANSWER.search(said) is None and _CONNECTION_TROUBLE.search(said) is not None
            raise SchedulerError(f"qsub refused the job: {_pbs_error(result)}", permanent=not transient,
                                 at_queue_limit=_QUEUED_LIMIT.search(result.stderr + result.stdout) is not None,
                                 per_user_limit=_is_per_user_limit(result.stderr + result.stdout))
        for line in result.stdout.splitlines():
            number = job_number(line.strip()) if re.fullmatch(r"\d+(\.\S+)?", line.strip()) else None
            if number is not None:
                return number
        raise SchedulerError(f"qsub printed no job id: {result.describe()}")

    # -- status -----------------------------------------------------------------------------
    def render_status(self, user: str) -> Command:
        # qstat -f does not combine with -u: one full listing, filtered by Job_Owner below.
        return Command(["qstat", "-f", "-F", "json"], env=PLAIN_ENV, unset_env=USER_FORMAT_VARIABLES)

    def parse_status(self, result: CommandResult, now: dt.datetime) -> PolledStatuses:
        """The user's jobs in the every-user listing. A record of another user that cannot be read
        is skipped (one log line); one of ours (or of no readable owner) that is not JSON fails the
        poll, and so do records of ours none of which can be read: either read as an empty queue
        would declare every queued BatchJob gone. A running job's ``stime`` is its start
        (``start_times``); an unreadable one leaves the job listed, with no start."""
        if result.returncode != 0 and not result.stdout.strip():
            raise SchedulerError(f"status poll failed: {result.describe()}")
        jobs, unreadable = load_pbs_jobs(result.stdout, "qstat -f -F json")
        ours = {pbs_id: (owner, why) for pbs_id, (owner, why) in unreadable.items() if owner in ("", self.user)}
        if ours:
            pbs_id, (owner, why) = next(iter(ours.items()))
            raise SchedulerError(f"qstat -f -F json: the record of job {pbs_id} ({owner or 'no readable Job_Owner'}) "
                                 f"is invalid JSON ({why}); {len(ours)} such record(s) of {self.user} or no "
                                 "readable owner")
        if unreadable:
            pbs_id, (owner, why) = next(iter(unreadable.items()))
            logger.warning("qstat: skipped %d unreadable record(s) of other users (first: %s of %s: %s)",
                           len(unreadable), pbs_id, owner, why)
        statuses: dict[int, SchedulerJobStatus] = {}
        start_times: dict[int, dt.datetime] = {}
        read, skipped = 0, []
        for pbs_id, job in jobs.items():
            mine = not isinstance(job, dict) or _owner(job) == self.user
            try:
                status = self.status_from_record(pbs_id, job, now)
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                logger.warning("qstat: skipped unreadable record %r: %s", pbs_id, exc)
                if mine:
                    skipped.append(pbs_id)
                continue
            if mine:
                read += 1
            if status is not None:
                statuses[status.scheduler_id] = status
                # Only a running job's: a requeued job back in Q keeps its earlier run's stime.
                started = parse_pbs_time(job.get("stime")) if status.state is R else None
                if started is not None:
                    start_times[status.scheduler_id] = started
                else:
                    start_times.pop(status.scheduler_id, None)  # two records of one number: the later's
        if skipped and not read:
            raise SchedulerError(f"qstat -f -F json: none of the user's {len(skipped)} job record(s) is readable "
                                 f"(first: {skipped[0]!r})")
        return PolledStatuses(statuses, start_times=start_times)

    def status_from_record(self, pbs_id: str, job: dict[str, Any], now: dt.datetime) -> Optional[SchedulerJobStatus]:
        """The status of one of the user's jobs still in the queue, else None."""
        if _owner(job) != self.user:
            return None
        number = job_number(pbs_id)
        if number is None:
            return None
        letter = str(job.get("job_state", "")).strip().upper()
        state = PBS_STATES.get(letter)
        if state is None:
            logger.warning("qstat: unknown job_state %r of job %s", letter, pbs_id)
            state = R if job.get("stime") else Q
        if state is F:
            return None
        resources_ = job.get("Resource_List") or {}
        walltime = pbs_duration_min(resources_.get("walltime", "0"))
        nodes = resources_.get("nodect")
        if nodes is None:
            nodes = select_node_count(str(resources_.get("select", "1")))
        qtime, stime = parse_pbs_time(job.get("qtime") or job.get("ctime")), parse_pbs_time(job.get("stime"))
        if state is Q:
            remaining, queued = walltime, _minutes_between(qtime, now)
        else:
            if stime is not None:
                used = _minutes_between(stime, now)
            else:
                used = pbs_duration_min((job.get("resources_used") or {}).get("walltime", ""))
            remaining, queued = max(0, walltime - used), _minutes_between(qtime, stime)
        return SchedulerJobStatus(
            scheduler_id=number,
            state=state,
            queue=str(job.get("queue", "")),
            num_nodes=int(nodes),
            wall_time_min=walltime,
            project=job_project(job),
            time_remaining_min=remaining,
            queued_time_min=queued,
            message=waiting_reason(job) if state is Q else "",
        )

    # -- an earlier submission ----------------------------------------------------------------
    def find_submitted(self, request: SubmitRequest) -> Optional[list[int]]:
        """``qselect`` matches the job name only, and the names are ``qlaunch<BatchJob id>``: an
        earlier site database's BatchJob of the same id left jobs of the same name (finished ones
        stay in the job history). The jobs qselect lists are read with one ``qstat -x -f -F json``
        and kept only if writing this script's output file and submitted (``ctime``) no earlier
        than ``CLOCK_SLACK_SEC`` before the script was written (the agent writes it before each
        submission); the newest of those (``[]``: none). No script: None (cannot tell)."""
        with self.guard("lookup of an earlier submission"):
            ids = sorted(set(self.parse_find(self.run(self.render_find(request, self.user)), request)))
            if not ids:
                return []
            script = Path(request.script_path)
            try:
                written = dt.datetime.fromtimestamp(int(script.stat().st_mtime), dt.timezone.utc)
            except FileNotFoundError:
                logger.warning("qselect: jobs named %s exist but %s is gone: cannot tell which is its job",
                               request.job_name, script)
                return None
            except OSError as exc:
                raise SchedulerError(f"cannot read {script}: {exc}") from None
            return self.parse_find_records(self.run(self.render_histories(dict.fromkeys(ids))), request, written)

    def render_find(self, request: SubmitRequest, user: str) -> Command:
        # -x: finished jobs too (where the server keeps job history). qselect matches the name
        # only (our job names are the site's qlaunch<BatchJob id>): find_submitted reads the jobs.
        return Command(["qselect", "-x", "-u", user, "-N", request.job_name[:236]], env=PLAIN_ENV)

    def parse_find(self, result: CommandResult, request: SubmitRequest) -> list[int]:
        if result.returncode != 0:
            raise SchedulerError(f"qselect could not look up jobs named {request.job_name}: {_pbs_error(result)}")
        found = []
        for line in result.stdout.splitlines():
            number = line.strip().split(".", 1)[0]
            if number.isdecimal():
                found.append(int(number))
            elif line.strip():
                logger.warning("qselect: skipped unreadable line %r", line[:200])
        return found

    def parse_find_records(self, result: CommandResult, request: SubmitRequest, written: dt.datetime) -> list[int]:
        """``qstat -x -f -F json`` of the jobs qselect found -> ``[id]`` of the newest one whose
        ``Output_Path`` (``host:/path``) is this script's output file and submitted (``ctime``,
        printed to the second) no earlier than ``CLOCK_SLACK_SEC`` before the script was
        ``written``; ``[]`` when none is."""
        unknown = _unknown_ids(result)  # left the history between the two commands
        if result.returncode != 0 and not result.stdout.strip() and not unknown:
            raise SchedulerError(f"qstat -x could not read the jobs named {request.job_name}: {_pbs_error(result)}")
        records = load_pbs_json(result.stdout, "qstat -x -f -F json").get("Jobs", {})
        if not isinstance(records, dict):
            raise SchedulerError(f"qstat -x -f -F json: 'Jobs' is not an object but {type(records).__name__}")
        output = str(Path(request.script_path).with_suffix(".output"))
        # the server's clock against the file system's (see CLOCK_SLACK_SEC)
        earliest = written - dt.timedelta(seconds=CLOCK_SLACK_SEC)
        ours, others = [], []
        for pbs_id, job in records.items():
            number = job_number(pbs_id)
            if number is None or not isinstance(job, dict):
                continue
            submitted = parse_pbs_time(job.get("ctime"))
            # host:/path, matched whole: the slack leaves this match as what keeps other jobs out
            written_to = str(job.get("Output_Path", ""))
            if (submitted is not None and submitted >= earliest
                    and (written_to == output or written_to.endswith(":" + output))):
                ours.append((submitted, number))
            else:
                others.append(number)
        if others:
            logger.info("qselect: job(s) %s named %s were submitted over %d s before %s was written or write "
                        "another output file: not its job", ", ".join(map(str, sorted(others))), request.job_name,
                        CLOCK_SLACK_SEC, Path(request.script_path).name)
        if len(ours) > 1:
            logger.warning("qselect: %d jobs named %s since its script was written, less the clock slack (%s): "
                           "the newest is kept", len(ours), request.job_name, ", ".join(str(n) for _, n in sorted(ours)))
        return [max(ours)[1]] if ours else []

    # -- delete -----------------------------------------------------------------------------
    def render_delete(self, scheduler_id: int) -> Command:
        return Command(["qdel", str(scheduler_id)])

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        if result.returncode == 0:
            return
        said = result.stderr + result.stdout
        if re.search(r"Unknown Job Id|Job has finished|job has already finished", said, re.I):
            return  # gone already
        if re.search(r"Request invalid for state of job", said, re.I):
            return  # exiting (state E), as Slurm's "already completing": it leaves the queue by itself
        raise SchedulerError(f"qdel could not delete job {scheduler_id}: {_pbs_error(result)}")

    # -- history ----------------------------------------------------------------------------
    def render_histories(self, jobs: Mapping[int, Optional[Path]]) -> Command:
        return Command(["qstat", "-x", "-f", "-F", "json", *map(str, jobs)], env=PLAIN_ENV,
                       unset_env=USER_FORMAT_VARIABLES)

    def parse_histories(self, result: Optional[CommandResult], jobs: Mapping[int, Optional[Path]],
                        last_poll: StatusPoll) -> dict[int, Optional[JobHistory]]:
        """``qstat -x`` prints the records it has and one ``Unknown Job Id`` line per job it has
        forgotten (exiting non-zero); both are read."""
        if result is None:
            raise SchedulerError("qstat -x was not run")
        unknown = _unknown_ids(result)
        if result.returncode != 0 and not result.stdout.strip() and not unknown:
            raise SchedulerError(f"qstat -x failed: {_pbs_error(result)}")
        records = load_pbs_json(result.stdout, "qstat -x -f -F json").get("Jobs", {})
        if not isinstance(records, dict):
            raise SchedulerError(f"qstat -x -f -F json: 'Jobs' is not an object but {type(records).__name__}")
        by_number = {job_number(k): v for k, v in records.items() if isinstance(v, dict)}
        histories: dict[int, Optional[JobHistory]] = {}
        for scheduler_id, script_path in jobs.items():
            record = by_number.get(scheduler_id)
            if record is not None:
                histories[scheduler_id] = self.history_from_record(scheduler_id, record)
            elif scheduler_id in unknown:
                histories[scheduler_id] = self.history_of_forgotten_job(scheduler_id, script_path)
            else:
                histories[scheduler_id] = None
        return histories

    @staticmethod
    def history_from_record(scheduler_id: int, job: dict[str, Any]) -> Optional[JobHistory]:
        letter = str(job.get("job_state", "")).strip().upper()
        start = parse_pbs_time(job.get("stime"))
        if PBS_STATES.get(letter) in (Q, R):  # still active: the status poll missed it
            # A requeued job back in Q keeps its earlier run's stime: not its start.
            return JobHistory(scheduler_id=scheduler_id, state=PBS_STATES[letter],
                              start_time=start if PBS_STATES[letter] is R else None,
                              native_state=letter, message=f"PBS job_state {letter}")
        if PBS_STATES.get(letter) is not F:
            return None
        end = parse_pbs_time(job.get("obittime") or job.get("mtime"))
        exit_status = job.get("Exit_status")
        details = [f"PBS job_state {letter}"]
        if exit_status is not None:
            details.append(f"Exit_status {exit_status}")
        if job.get("comment"):
            details.append(str(job["comment"]))
        # Negative Exit_status values are PBS's own "could not start the job" codes (JOB_EXEC_*);
        # a job deleted while queued has no stime and no Exit_status: it simply ended.
        failed = start is None and isinstance(exit_status, int) and exit_status < 0
        return JobHistory(
            scheduler_id=scheduler_id,
            state=BatchJobState.submit_failed if failed else BatchJobState.finished,
            start_time=start,
            end_time=end,
            native_state=letter + (f" (Exit_status {exit_status})" if exit_status is not None else ""),
            message=("never started: " if failed else "") + "; ".join(details),
        )

    @staticmethod
    def history_of_forgotten_job(scheduler_id: int, script_path: Optional[Path]) -> JobHistory:
        """PBS no longer knows the job (history disabled or expired): its output file tells
        whether it ran (``-k doe`` writes it from the first second of the run)."""
        output = Path(script_path).with_suffix(".output") if script_path else None
        if output is not None and output.exists():
            ended = dt.datetime.fromtimestamp(output.stat().st_mtime, dt.timezone.utc)
            return JobHistory(scheduler_id=scheduler_id, state=BatchJobState.finished, end_time=ended,
                              native_state="Unknown Job Id",
                              message=f"PBS has no record of job {scheduler_id}; it ran (output file {output.name})")
        return JobHistory(scheduler_id=scheduler_id, state=BatchJobState.submit_failed, native_state="Unknown Job Id",
                          message=f"PBS has no record of job {scheduler_id} and it left no output file")

    # -- queues (site init) -----------------------------------------------------------------------
    def render_discover_queues(self) -> Optional[Command]:
        return Command(["qstat", "-Q", "-f", "-F", "json"], env=PLAIN_ENV, unset_env=USER_FORMAT_VARIABLES,
                       timeout=DISCOVERY_TIMEOUT_SEC)

    def parse_discover_queues(self, result: CommandResult) -> dict[str, AllowedQueue]:
        """The queues users may submit to (enabled, not route-only) with a node limit
        (``resources_max.nodect``); wall time from ``resources_max.walltime`` (none: a week), the
        fewest nodes from ``resources_min.nodect`` (Polaris' prod: 10; none: 1, left out of
        settings.yml) and queued jobs from ``max_queued`` and ``queued_jobs_threshold`` (the
        smaller) as they apply to the user (``max_queued_for``; none stated: None, unknown: site
        init keeps the platform's limit or writes a placeholder). PBS prints ``max_queued`` once
        per restriction (openpbs #2677): every one is kept. A queue where the user may queue no job is left out, and so is one whose
        minimum exceeds its maximum (no job fits)."""
        if result.returncode != 0 and not result.stdout.strip():
            raise SchedulerError(f"qstat -Q failed: {_pbs_error(result)}")
        doc = load_pbs_json(result.stdout, "qstat -Q -f -F json", object_pairs_hook=keep_repeated_keys)
        queues = doc.get("Queue") or {}
        if not isinstance(queues, dict):
            raise SchedulerError("qstat -Q -f -F json: 'Queue' is not an object")
        found: dict[str, AllowedQueue] = {}
        for name, queue in sorted(queues.items()):
            if not isinstance(queue, dict) or str(queue.get("enabled")) != "True" or str(queue.get("from_route_only")) == "True":
                continue
            limits = queue.get("resources_max") or {}
            if not isinstance(limits, dict):  # garbled: this queue's limits unreadable, not every queue's
                logger.warning("qstat -Q: queue %s has an unreadable resources_max %r", name, str(limits)[:60])
                limits = {}
            nodes = limits.get("nodect")
            if not str(nodes).isdecimal():
                logger.info("qstat -Q: queue %s has no node limit (resources_max.nodect): left out", name)
                continue
            raw_walltime = limits.get("walltime")
            if raw_walltime in (None, ""):
                walltime = UNLIMITED_WALLTIME_MIN
            elif pbs_duration_sec(raw_walltime) is None:
                # Not silently a week: the server states a limit this driver cannot read.
                logger.warning("qstat -Q: queue %s has an unreadable resources_max.walltime %r: written as %d "
                               "minutes, as for no limit (check settings.yml)", name, raw_walltime, UNLIMITED_WALLTIME_MIN)
                walltime = UNLIMITED_WALLTIME_MIN
            else:
                walltime = pbs_duration_min(raw_walltime)
                if walltime < 1:
                    logger.warning("qstat -Q: queue %s takes jobs of at most %r (resources_max.walltime): no job "
                                   "of a whole minute fits, left out", name, raw_walltime)
                    continue
            # queued_jobs_threshold limits the jobs not yet started (Q, H, W: OpenPBS's
            # svr_setjobstate counts a job out when it starts running) as max_queued limits all of
            # them: Polaris' debug states only "[u:PBS_GENERIC=1]" there, and qsub refuses a second
            # waiting job ("would exceed queue debug's per-user limit of jobs in 'Q' state").
            # max_queued_jobs counts running jobs too, so the threshold bounds it only together with
            # the queue's max_run (debug: 1 + 1 = 2, one running and one waiting); written alone it
            # kept a second debug BatchJob from being submitted until the running one ended. With no
            # max_run stated, running jobs are unbounded and the threshold bounds nothing written here
            # (a refused qsub is then held without a try, as for any queue limit).
            threshold = max_queued_for(queue.get("queued_jobs_threshold"), self.user, None)
            max_run = max_queued_for(queue.get("max_run"), self.user, None)
            limits_of_user = [limit for limit in (max_queued_for(queue.get("max_queued"), self.user, None),
                                                  None if threshold is None or max_run is None else threshold + max_run,
                                                  0 if threshold == 0 else None)
                              if limit is not None]
            max_queued = min(limits_of_user) if limits_of_user else None
            if max_queued is not None and max_queued < 1:  # 0 would read as "no limit" in settings.yml
                logger.info("qstat -Q: queue %s lets %s queue no job (max_queued, queued_jobs_threshold): left out",
                            name, self.user)
                continue
            smallest = queue.get("resources_min") or {}
            if not isinstance(smallest, dict):
                logger.warning("qstat -Q: queue %s has an unreadable resources_min %r: taken as none", name,
                               str(smallest)[:60])
                smallest = {}
            least = smallest.get("nodect")
            if least is not None and not str(least).isdecimal():
                logger.warning("qstat -Q: queue %s has an unreadable resources_min.nodect %r: taken as none",
                               name, least)
                least = None
            min_nodes = max(int(least), 1) if least is not None else 1
            if min_nodes > int(nodes):
                logger.warning("qstat -Q: queue %s takes jobs of %d nodes or more but at most %s: left out",
                               name, min_nodes, nodes)
                continue
            found[name] = AllowedQueue(max_nodes=int(nodes), max_walltime=walltime,
                                       max_queued_jobs=max_queued, min_nodes=min_nodes)
        return found

    # -- backfill ---------------------------------------------------------------------------
    def render_backfill(self) -> Optional[Command]:
        return Command(["pbsnodes", "-a", "-F", "json"], env=PLAIN_ENV)

    def parse_backfill(self, result: CommandResult) -> dict[str, list[BackfillWindow]]:
        """Free nodes (state ``free``, no jobs, and no reservation unless the node is exclusive:
        see ``EXCLUSIVE_SHARING``), counted per node ``queue`` (``*`` for nodes not tied to a
        queue), each window ``options.backfill_window_min`` long."""
        if result.returncode != 0 and not result.stdout.strip():
            raise SchedulerError(f"pbsnodes failed: {_pbs_error(result)}")
        # Each warning once per distinct fault and process (DEBUG on later calls): the elastic
        # module and the scheduler module read the windows every cycle. The repair's warning names
        # no line (the document carries a timestamp, so its text differs each call): once.
        what = "pbsnodes -a -F json"
        nodes = load_pbs_json(result.stdout, what, warn=lambda message, *args: _warn_once(("repair", what), message, *args)
                              ).get("nodes") or {}
        free: dict[str, int] = {}
        for name, node in nodes.items():
            if not isinstance(node, dict):
                _warn_once(("node", f"{name}|{node!r:.200}"), "pbsnodes: skipped unreadable node record %r", name)
                continue
            states = {s.strip() for s in str(node.get("state", "")).split(",")}
            if states != {"free"} or node.get("jobs"):
                continue
            if node.get("resv") and str(node.get("sharing", "")).strip() not in EXCLUSIVE_SHARING:
                continue  # perhaps a reservation running on it, the node shared with it
            queue = str(node.get("queue") or (node.get("resources_available") or {}).get("queue") or self.options.any_queue_key)
            free[queue] = free.get(queue, 0) + 1
        return {q: [BackfillWindow(num_nodes=n, wall_time_min=self.options.backfill_window_min)] for q, n in sorted(free.items())}
