"""PBS Pro / OpenPBS driver: qsub, qstat -f -F json, qstat -x, qdel and pbsnodes -a -F json.

Status and history are read as JSON (``-F json``), which no ``QSTAT_HEADER``/``PBS_QSTAT_*``
setting changes, with ``TZ=UTC`` so the ctime-style dates qstat prints are UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs

from balsam.models import AllowedQueue
from balsam.options import option
from balsam.scheduler import (
    ANY_QUEUE,
    BackfillWindow,
    Command,
    CommandResult,
    JobHistory,
    Scheduler,
    SchedulerError,
    SchedulerJobStatus,
    StatusPoll,
    SubmitRequest,
    format_walltime,
)
from balsam.states import BatchJobState

logger = logging.getLogger("balsam.scheduler.pbs")

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
#: Seconds a discovery command (site init, on a login node) may take before it is given up.
DISCOVERY_TIMEOUT_SEC = 20.0
#: max_queued_jobs written by site init for a queue without a per-user max_queued.
DISCOVERED_MAX_QUEUED_JOBS = 20
#: Longest scheduler comment kept as a status message.
MAX_REASON_CHARS = 300
USER_FORMAT_VARIABLES = ("PBS_QSTAT_HEADER", "QSTAT_HEADER", "PBS_QSTAT_NO_HEADER", "PBS_QSTAT_FMT")

_CONNECTION_TROUBLE = ("cannot connect", "connection refused", "end of file", "timed out", "try again",
                       "communication failure", "server not available", "pbs_server", "temporarily")


def parse_pbs_time(text: Any) -> Optional[dt.datetime]:
    """``Mon Nov  6 16:43:39 2023`` (printed under TZ=UTC) or epoch seconds -> aware UTC datetime."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return dt.datetime.fromtimestamp(text, dt.timezone.utc)
    words = str(text).split()
    try:
        if len(words) == 1 and words[0].isdigit():
            return dt.datetime.fromtimestamp(int(words[0]), dt.timezone.utc)
        return dt.datetime.strptime(" ".join(words), "%a %b %d %H:%M:%S %Y").replace(tzinfo=dt.timezone.utc)
    except (ValueError, OverflowError):
        return None


def pbs_duration_min(text: Any) -> int:
    """PBS walltime ``[[HH:]MM:]SS`` -> whole minutes (30 s and more round up); unreadable -> 0."""
    try:
        parts = [int(p) for p in str(text).strip().split(":")]
    except ValueError:
        return 0
    parts = [0] * (3 - len(parts)) + parts if len(parts) <= 3 else []
    if not parts:
        return 0
    hours, minutes, seconds = parts
    return hours * 60 + minutes + (1 if seconds >= 30 else 0)


def _minutes_between(start: Optional[dt.datetime], end: Optional[dt.datetime]) -> int:
    if start is None or end is None:
        return 0
    return max(0, int((end - start).total_seconds() // 60))


def job_number(pbs_job_id: str) -> Optional[int]:
    """``123.server`` -> 123; ``123[].server`` (array) and anything else -> None."""
    head = str(pbs_job_id).split(".", 1)[0].strip()
    return int(head) if head.isdigit() else None


def load_pbs_json(text: str, what: str) -> dict[str, Any]:
    """qstat/pbsnodes JSON, tolerating the known PBS slips (unescaped backslashes and control
    characters inside Variable_List values). Empty output is an empty document."""
    if not text.strip():
        return {}
    start = text.find("{")
    if start < 0:
        raise SchedulerError(f"{what} printed no JSON (first line: {text.strip().splitlines()[0][:120]!r})")
    body = text[start:]
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        pass
    repaired = re.sub(r'\\(?!["\\/bfnrt]|u[0-9a-fA-F]{4})', r"\\\\", body)
    try:
        data = json.loads(repaired, strict=False)
    except json.JSONDecodeError as exc:
        raise SchedulerError(f"{what} printed invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    logger.warning("%s printed slightly malformed JSON; read it after repair", what)
    return data if isinstance(data, dict) else {}


#: The start (lower case) of the comment PBS Pro gives a job that can never run as submitted.
NEVER_RUNS_COMMENT = "can never run"


def waiting_reason(job: dict[str, Any]) -> str:
    """Why a job that has not started waits: the scheduler's ``comment`` ("Not Running: ...",
    "Can Never Run: ..."), else its holds. (A running job's comment only says where it started.)"""
    comment = " ".join(str(job.get("comment") or "").split())
    if comment:
        return comment[:MAX_REASON_CHARS]
    holds = str(job.get("Hold_Types") or "").strip()
    if holds and holds != "n":
        return f"held (Hold_Types {holds})"
    return ""


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
        # resources no node has) "Can Never Run: ..."; "Not Running: ..." waits its turn.
        return status.state is BatchJobState.queued and status.message.lower().startswith(NEVER_RUNS_COMMENT)

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
            said = (result.stderr + result.stdout).lower()
            transient = any(t in said for t in _CONNECTION_TROUBLE)
            raise SchedulerError(f"qsub refused the job: {_pbs_error(result)}", permanent=not transient)
        for line in result.stdout.splitlines():
            number = job_number(line.strip()) if re.fullmatch(r"\d+(\.\S+)?", line.strip()) else None
            if number is not None:
                return number
        raise SchedulerError(f"qsub printed no job id: {result.describe()}")

    # -- status -----------------------------------------------------------------------------
    def render_status(self, user: str) -> Command:
        # qstat -f does not combine with -u: one full listing, filtered by Job_Owner below.
        return Command(["qstat", "-f", "-F", "json"], env=PLAIN_ENV, unset_env=USER_FORMAT_VARIABLES)

    def parse_status(self, result: CommandResult, now: dt.datetime) -> dict[int, SchedulerJobStatus]:
        if result.returncode != 0 and not result.stdout.strip():
            raise SchedulerError(f"status poll failed: {result.describe()}")
        jobs = load_pbs_json(result.stdout, "qstat -f -F json").get("Jobs") or {}
        if not isinstance(jobs, dict):
            raise SchedulerError("qstat -f -F json: 'Jobs' is not an object")
        statuses: dict[int, SchedulerJobStatus] = {}
        for pbs_id, job in jobs.items():
            try:
                status = self.status_from_record(pbs_id, job, now)
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                logger.warning("qstat: skipped unreadable record %r: %s", pbs_id, exc)
                continue
            if status is not None:
                statuses[status.scheduler_id] = status
        return statuses

    def status_from_record(self, pbs_id: str, job: dict[str, Any], now: dt.datetime) -> Optional[SchedulerJobStatus]:
        """The status of one of the user's jobs still in the queue, else None."""
        owner = str(job.get("Job_Owner", ""))
        if owner.split("@", 1)[0] != self.user:
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
            nodes = str(resources_.get("select", "1")).split(":", 1)[0]
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
    def render_find(self, request: SubmitRequest, user: str) -> Command:
        # -x: finished jobs too (where the server keeps job history). qselect matches the name
        # only; our job names are the site's qlaunch<BatchJob id>.
        return Command(["qselect", "-x", "-u", user, "-N", request.job_name[:236]], env=PLAIN_ENV)

    def parse_find(self, result: CommandResult, request: SubmitRequest) -> list[int]:
        if result.returncode != 0:
            raise SchedulerError(f"qselect could not look up jobs named {request.job_name}: {_pbs_error(result)}")
        found = []
        for line in result.stdout.splitlines():
            number = line.strip().split(".", 1)[0]
            if number.isdigit():
                found.append(int(number))
            elif line.strip():
                logger.warning("qselect: skipped unreadable line %r", line[:200])
        return found

    # -- delete -----------------------------------------------------------------------------
    def render_delete(self, scheduler_id: int) -> Command:
        return Command(["qdel", str(scheduler_id)])

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        if result.returncode == 0:
            return
        said = result.stderr + result.stdout
        if re.search(r"Unknown Job Id|Job has finished|job has already finished", said, re.I):
            return  # gone already
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
        records = load_pbs_json(result.stdout, "qstat -x -f -F json").get("Jobs") or {}
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
        if PBS_STATES.get(letter) is not F:
            return None  # still queued or running: the status poll missed it
        start = parse_pbs_time(job.get("stime"))
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
        (``resources_max.nodect``); wall time from ``resources_max.walltime`` (none: a week) and
        queued jobs from the per-user ``max_queued`` (none: ``DISCOVERED_MAX_QUEUED_JOBS``)."""
        if result.returncode != 0 and not result.stdout.strip():
            raise SchedulerError(f"qstat -Q failed: {_pbs_error(result)}")
        queues = load_pbs_json(result.stdout, "qstat -Q -f -F json").get("Queue") or {}
        if not isinstance(queues, dict):
            raise SchedulerError("qstat -Q -f -F json: 'Queue' is not an object")
        found: dict[str, AllowedQueue] = {}
        for name, queue in sorted(queues.items()):
            if not isinstance(queue, dict) or str(queue.get("enabled")) != "True" or str(queue.get("from_route_only")) == "True":
                continue
            limits = queue.get("resources_max") or {}
            nodes = limits.get("nodect")
            if not str(nodes).isdigit():
                logger.info("qstat -Q: queue %s has no node limit (resources_max.nodect): left out", name)
                continue
            walltime = pbs_duration_min(limits["walltime"]) if limits.get("walltime") else UNLIMITED_WALLTIME_MIN
            per_user = re.search(r"\bu:PBS_GENERIC=(\d+)", str(queue.get("max_queued") or ""))
            found[name] = AllowedQueue(max_nodes=int(nodes), max_walltime=walltime or UNLIMITED_WALLTIME_MIN,
                                       max_queued_jobs=int(per_user.group(1)) if per_user else DISCOVERED_MAX_QUEUED_JOBS)
        return found

    # -- backfill ---------------------------------------------------------------------------
    def render_backfill(self) -> Optional[Command]:
        return Command(["pbsnodes", "-a", "-F", "json"], env=PLAIN_ENV)

    def parse_backfill(self, result: CommandResult) -> dict[str, list[BackfillWindow]]:
        """Free nodes (state ``free``, no jobs, no reservation), counted per node ``queue``
        (``*`` for nodes not tied to a queue), each window ``options.backfill_window_min`` long."""
        if result.returncode != 0 and not result.stdout.strip():
            raise SchedulerError(f"pbsnodes failed: {_pbs_error(result)}")
        nodes = load_pbs_json(result.stdout, "pbsnodes -a -F json").get("nodes") or {}
        free: dict[str, int] = {}
        for name, node in nodes.items():
            if not isinstance(node, dict):
                logger.warning("pbsnodes: skipped unreadable node record %r", name)
                continue
            states = {s.strip() for s in str(node.get("state", "")).split(",")}
            if states != {"free"} or node.get("jobs") or node.get("resv"):
                continue
            queue = str(node.get("queue") or (node.get("resources_available") or {}).get("queue") or self.options.any_queue_key)
            free[queue] = free.get(queue, 0) + 1
        return {q: [BackfillWindow(num_nodes=n, wall_time_min=self.options.backfill_window_min)] for q, n in sorted(free.items())}
