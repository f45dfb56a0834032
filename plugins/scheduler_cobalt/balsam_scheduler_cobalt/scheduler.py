"""Cobalt driver: qsub, qstat (with our own QSTAT_HEADER), qdel, nodelist, and the job's
``.cobaltlog`` as its history record (and as the record of a submission whose qsub output was lost)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional, Sequence

from balsam.scheduler import (
    BackfillWindow,
    Command,
    CommandResult,
    JobHistory,
    Scheduler,
    SchedulerError,
    SchedulerJobStatus,
    StatusPoll,
    SubmitRequest,
    shell_reported_signal,
    unknown_outcome_of_signal,
)
from balsam.states import BatchJobState

logger = logging.getLogger("balsam.scheduler.cobalt")

Q, R, F = BatchJobState.queued, BatchJobState.running, BatchJobState.finished

#: Every Cobalt job state, mapped to the BatchJob state. ``dep_fail`` jobs stay in the queue but
#: will never run, so their BatchJob is ``submit_failed``; ``finished``/``done`` have left it.
COBALT_STATES: dict[str, BatchJobState] = {
    "queued": Q,
    "user_hold": Q,
    "admin_hold": Q,
    "dep_hold": Q,
    "maxrun_hold": Q,
    "hold": Q,
    "starting": R,
    "running": R,
    "exiting": R,
    "killing": R,
    "preempting": R,
    "cleanup": R,
    "dep_fail": BatchJobState.submit_failed,
    "failed": BatchJobState.submit_failed,
    "finished": F,
    "done": F,
}

#: Cobalt states of a job that waits for something other than free nodes (a hold, a dependency,
#: the user's limit on running jobs): it does not take nodes that come free now.
HOLD_STATES = frozenset({"user_hold", "admin_hold", "dep_hold", "maxrun_hold", "hold"})

QSTAT_COLUMNS = ("JobID", "State", "WallTime", "Queue", "Nodes", "Project", "TimeRemaining", "QueuedTime")
#: ``-x attrs=mcdram=cache:numa=quad`` becomes ``--attrs ...``; ``-x qsub_flags="..."`` is appended.
ATTRS_PARAM = "attrs"
RAW_FLAGS_PARAM = "qsub_flags"

_UTC_LINE = re.compile(r"^(?P<stamp>\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4}) (?P<offset>[+-]\d{4}) \(UTC\)(?P<rest>.*)$")
#: Cobalt's words for a job's end. "removing job from the queue" is what cqm writes when a queued or
#: held job is deleted ("user delete requested; removing job from the queue"): without it such a
#: log would read as still queued.
_END_WORDS = ("task completed", "initiating job cleanup", "job cleanup", "terminated", "killed", "deleted",
              "removing job from the queue", "exit code", "exited", "dep_fail", "failed")
#: qsub's own line as it accepts the job: "<date> +0000 (UTC) submitted with cwd set to: <dir>".
_SUBMITTED = re.compile(r"^submitted with cwd set to\b", re.I)


#: qsub's usage text, which its option parser (optparse) prints before "qsub.py: error: ..." for a
#: bad option or a missing value (e.g. in -x qsub_flags): it says nothing about the refusal, and as
#: the first lines it filled the reason `balsam queue ls` shows (60 characters) with "Usage: ...".
_USAGE_LINE = re.compile(r"^(usage:|refer to man pages\b|\S*qsub(\.py)?\s+\[options\])", re.I)
_ERROR_LINE = re.compile(r"\berror\b\s*:", re.I)
_PROG_ERROR = re.compile(r"^\S*qsub(\.py)?:\s*error:\s*", re.I)
#: A refusal that may pass on a retry: the queue manager unreachable or busy.
_TRANSIENT = re.compile(r"connection|timed out|try again|unavailable", re.I)
#: Cobalt's maxqueued restriction: "The limit of 20 jobs per user in the 'default' queue has been
#: reached" (cqm's Restriction.maxqueuedjobs); it clears as the user's jobs leave.
_AT_LIMIT = re.compile(r"limit of \d+ jobs per user .* has been reached", re.I)


def qsub_refusal_reason(said: Sequence[str], lead: Sequence[str] = ()) -> str:
    """The words of a refusing qsub worth one line: ``lead`` (the lines its refusal was classed by)
    first, then its ``error:`` lines when it has some (without optparse's ``qsub.py: error:``
    prefix), else its first lines without the usage text, else (only usage text) its first lines."""
    lines = [ln for ln in said if not _USAGE_LINE.match(ln)]
    errors = [_PROG_ERROR.sub("", ln) for ln in lines if _ERROR_LINE.search(ln)]
    picked = list(lead) + [ln for ln in (errors or lines or said) if ln not in lead]
    return " ".join(picked[:3])


def cobalt_duration_min(text: str) -> int:
    """``HH:MM:SS`` (hours may exceed 24) or ``MM`` -> whole minutes; N/A and the like -> 0."""
    parts = text.strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        return 0
    if len(numbers) == 1:
        return numbers[0]
    numbers = [0] * (3 - len(numbers)) + numbers if len(numbers) <= 3 else [0, 0, 0]
    hours, minutes, seconds = numbers
    return hours * 60 + minutes + (1 if seconds >= 30 else 0)


def parse_cobaltlog(text: str, scheduler_id: int) -> Optional[JobHistory]:
    """Start and end of a job from its .cobaltlog; a running JobHistory while it has started and
    not ended, a queued one while qsub's dated "submitted" line is there and nothing started or
    ended it (an empty or cut qstat must end neither a running allocation nor a waiting job: a
    waiting one marked submit_failed would still start, with nobody tracking it); None when the
    log says neither (no dated line yet)."""
    start: Optional[dt.datetime] = None
    end: Optional[dt.datetime] = None
    submitted = False
    last_words = ""
    failed = False
    for line in text.splitlines():
        match = _UTC_LINE.match(line.strip())
        if not match:
            continue
        try:
            stamp = dt.datetime.strptime(
                " ".join(match["stamp"].split()) + " " + match["offset"], "%a %b %d %H:%M:%S %Y %z"
            ).astimezone(dt.timezone.utc)
        except ValueError:
            logger.warning("cobaltlog of job %d: unreadable time in %r", scheduler_id, line[:200])
            continue
        rest = match["rest"].strip()
        if _SUBMITTED.match(rest):
            # Checked first: the directory it names may hold any end word ("/runs/failed").
            submitted = True
            continue
        if "COBALT_STARTTIME" in rest or re.search(r"\bstarting job\b", rest, re.I):
            start = start or stamp
        elif any(word in rest.lower() for word in _END_WORDS):
            end, last_words = stamp, rest
            failed = failed or bool(re.search(r"dep_fail|failed to start|could not start", rest, re.I))
    if end is None:
        if start is None:
            if not submitted:
                return None
            return JobHistory(scheduler_id=scheduler_id, state=BatchJobState.queued,
                              native_state="queued", message="submitted, not started (.cobaltlog)")
        return JobHistory(scheduler_id=scheduler_id, state=BatchJobState.running, start_time=start,
                          native_state="running", message="started, not ended (.cobaltlog)")
    never_ran = start is None and failed
    return JobHistory(
        scheduler_id=scheduler_id,
        state=BatchJobState.submit_failed if never_ran else BatchJobState.finished,
        start_time=start,
        end_time=end,
        native_state="failed" if never_ran else "finished",
        message=re.sub(r"^Info:\s*", "", last_words)[:300],
    )


def read_cobaltlog(scheduler_id: int, script_path: Optional[Path]) -> Optional[JobHistory]:
    """The history in the job's ``.cobaltlog`` (next to its script); None while there is none."""
    if script_path is None:
        return None
    log = Path(script_path).with_suffix(".cobaltlog")
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SchedulerError(f"cannot read {log}: {exc}") from None
    return parse_cobaltlog(text, scheduler_id)


class CobaltScheduler(Scheduler):
    """Cobalt driver (ALCF Theta, ThetaGPU, Cooley)."""

    name = "cobalt"
    default_job_template = resources.files(__package__).joinpath("job-template.sh").read_text()

    # -- submit -----------------------------------------------------------------------------
    def render_submit(self, request: SubmitRequest) -> Command:
        script = Path(request.script_path)
        params = {k: str(v).strip() for k, v in request.optional_params.items() if str(v).strip()}
        args = ["qsub", "-O", str(script.with_suffix("")), "-n", str(request.num_nodes),
                "-t", str(request.wall_time_min)]
        if request.project:
            args += ["-A", request.project]
        if request.queue:
            args += ["-q", request.queue]
        if ATTRS_PARAM in params:
            args += ["--attrs", params[ATTRS_PARAM]]
        if RAW_FLAGS_PARAM in params:
            args += shlex.split(params[RAW_FLAGS_PARAM])
        args.append(str(script))
        return Command(args, cwd=script.parent)

    def parse_submit(self, result: CommandResult) -> int:
        said = [ln.strip() for ln in (result.stderr + "\n" + result.stdout).splitlines() if ln.strip()]
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                if line.strip().isdecimal():
                    return int(line.strip())
            # qsub said yes without printing the id (a wrapper's message, a routing notice): the job
            # may be in the queue, so this is not a refusal. Transient: the agent keeps the
            # submission's marker, retries, and finally gives up without claiming nothing was queued.
            raise SchedulerError(f"qsub printed no job id: {' '.join(said[:3]) if said else 'no output'}")
        # A wrapper's qsub ended by a signal, after it may have queued the job: no answer.
        signalled = shell_reported_signal(result)
        if signalled is not None:
            raise unknown_outcome_of_signal(result, signalled)
        # Classed by every line it printed: the lines the reason shows are picked for a reader, and
        # a warning's "error:" line beside the maxqueued line made that refusal a permanent one.
        limit_lines = [ln for ln in said if _AT_LIMIT.search(ln)]
        transient_lines = [ln for ln in said if _TRANSIENT.search(ln)]
        at_limit, transient = bool(limit_lines), bool(transient_lines)
        reason = (qsub_refusal_reason(said, lead=(limit_lines or transient_lines)[:1])
                  or f"exit code {result.returncode} and no output")
        # That limit counts the user's own jobs only.
        raise SchedulerError(f"qsub refused the job: {reason}", permanent=not transient, at_queue_limit=at_limit,
                             per_user_limit=at_limit)

    # -- an earlier submission ----------------------------------------------------------------
    def find_submitted(self, request: SubmitRequest) -> Optional[list[int]]:
        """Cobalt's qstat cannot look jobs up by name, but qsub writes the job's ``.cobaltlog``
        (``-O`` stem, next to the script) as it accepts the job, starting with ``Jobid: N``: that
        is the earlier submission, if the log is not older than the script (which the agent
        rewrites before each submission; an older log is another BatchJob's of the same id, from
        an earlier site database). No such log: the scheduler cannot tell (None)."""
        with self.guard("lookup of an earlier submission"):
            script = Path(request.script_path)
            log = script.with_suffix(".cobaltlog")
            try:
                if log.stat().st_mtime < script.stat().st_mtime:
                    return None
                text = log.read_text(errors="replace")
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise SchedulerError(f"cannot read {log}: {exc}") from None
            match = re.search(r"^Jobid:\s*(\d+)\s*$", text, re.M)
            return [int(match.group(1))] if match else None

    # -- status -----------------------------------------------------------------------------
    def waits_for_other_than_nodes(self, status: SchedulerJobStatus) -> bool:
        # The message of a waiting job is its Cobalt state when not plain "queued" (see _status).
        return status.state is BatchJobState.queued and status.message in HOLD_STATES

    def render_status(self, user: str) -> Command:
        return Command(["qstat", "-u", user], env={"QSTAT_HEADER": ":".join(QSTAT_COLUMNS)},
                       unset_env=("QSTAT_FORMAT",))

    def parse_status(self, result: CommandResult, now: dt.datetime) -> dict[int, SchedulerJobStatus]:
        if result.returncode != 0:
            raise SchedulerError(f"status poll failed: {result.describe()}")
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        if not lines:
            return {}
        header = lines[0].split()
        if [h.lower() for h in header] != [c.lower() for c in QSTAT_COLUMNS]:
            raise SchedulerError(f"qstat did not print the requested columns (header: {lines[0][:120]!r})")
        statuses: dict[int, SchedulerJobStatus] = {}
        untied: list[str] = []
        read = 0
        for line in lines[1:]:
            if set(line.strip()) <= {"=", "-"}:
                continue
            fields = line.split()
            if len(fields) == len(QSTAT_COLUMNS) and fields[0].isdecimal() and fields[4].isdecimal():
                read += 1
                status = self._status(fields)
            elif len(fields) >= 2 and fields[0].isdecimal() and fields[1].lower() in COBALT_STATES:
                # A line that names its job and a Cobalt state (a column left empty or cut, a
                # garbled count) is that job's: skipped, its job read as gone from the queue, and
                # the agent ended a BatchJob whose job was still waiting.
                logger.warning("qstat: skipped unreadable line %r but for its job id and state", line[:200])
                status = self._status(fields, partial=True)
            else:
                untied.append(line)
                logger.warning("qstat: skipped unreadable line %r", line[:200])
                continue
            if status.state is not F:
                statuses[status.scheduler_id] = status
        if untied and not read:
            # No whole line beside an unreadable one (qstat's traceback, cut output): not a queue.
            raise SchedulerError(f"qstat printed nothing readable (first line: {untied[0].strip()[:120]!r})")
        # Otherwise a line tied to no job (a stray warning, a traceback's line) is skipped and logged,
        # as the other drivers do: failing the poll for it would stop every BatchJob's updates for
        # as long as qstat prints it. A job's own line, however garbled, was read above by its id.
        return statuses

    @staticmethod
    def _status(fields: list[str], partial: bool = False) -> SchedulerJobStatus:
        """The status of one qstat line's fields. ``partial``: a line of which only the job id and
        state are sure. With fewer fields than columns (the last ones left empty or cut off) the
        others are read where a whole line has them, a count or duration that does not read as one
        as 0; with more, none can be placed: 0 and ""."""
        def column(i: int) -> str:
            return fields[i] if not partial or len(fields) <= len(QSTAT_COLUMNS) and i < len(fields) else ""

        jobid, state_text = fields[0], fields[1]
        wall, queue, nodes, project, remaining, queued = (column(i) for i in range(2, len(QSTAT_COLUMNS)))
        state = COBALT_STATES.get(state_text.lower())
        if state is None:
            logger.warning("qstat: unknown Cobalt state %r of job %s", state_text, jobid)
            state = R if cobalt_duration_min(remaining) else Q
        return SchedulerJobStatus(
            scheduler_id=int(jobid),
            state=state,
            queue=queue,
            num_nodes=int(nodes) if nodes.isdecimal() else 0,
            wall_time_min=cobalt_duration_min(wall),
            project=project,
            time_remaining_min=cobalt_duration_min(remaining) if state is R else cobalt_duration_min(wall),
            queued_time_min=cobalt_duration_min(queued),
            # qstat prints no reason or comment column; its hold states are the only "why",
            # and dep_fail/failed the only word on a job that will never run
            message=(state_text.lower() if (state is Q and state_text.lower() != "queued")
                     or state is BatchJobState.submit_failed else ""),
        )

    # -- delete -----------------------------------------------------------------------------
    def render_delete(self, scheduler_id: int) -> Command:
        return Command(["qdel", str(scheduler_id)])

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        if result.returncode == 0:
            return
        if re.search(r"not found|no such job|unknown job", result.stderr + result.stdout, re.I):
            return
        raise SchedulerError(f"qdel could not delete job {scheduler_id}: {result.describe()}")

    # -- history: the .cobaltlog next to the script ------------------------------------------
    def parse_histories(self, result: Optional[CommandResult], jobs: Mapping[int, Optional[Path]],
                        last_poll: StatusPoll) -> dict[int, Optional[JobHistory]]:
        histories = {scheduler_id: read_cobaltlog(scheduler_id, path) for scheduler_id, path in jobs.items()}
        for scheduler_id, history in histories.items():
            # qstat still lists it, in a final state (dep_fail): a log that says only "submitted"
            # adds nothing, and read as "still queued" it would keep the agent from deleting a job
            # that will never run.
            if history is not None and history.state is Q and scheduler_id in last_poll.statuses:
                histories[scheduler_id] = None
        return histories

    # -- backfill ---------------------------------------------------------------------------
    def render_backfill(self) -> Optional[Command]:
        return Command(["nodelist"])

    def parse_backfill(self, result: CommandResult) -> dict[str, list[BackfillWindow]]:
        """Idle nodes with a backfill time, per queue: nodes grouped by their backfill time, the
        longest first, each window counting every node free at least that long."""
        if result.returncode != 0:
            raise SchedulerError(f"nodelist failed: {result.describe()}")
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        if not lines:
            return {}
        header = [h.lower() for h in lines[0].split()]
        try:
            i_queues, i_status, i_backfill = header.index("queues"), header.index("status"), header.index("backfill")
        except ValueError:
            raise SchedulerError(f"nodelist header lacks Queues/Status/Backfill: {lines[0][:120]!r}") from None
        by_queue: dict[str, dict[int, int]] = {}
        bad: list[str] = []
        read = 0
        for line in lines[1:]:
            if set(line.strip()) <= {"=", "-"}:
                continue
            fields = line.split()
            if len(fields) != len(header):
                bad.append(line)
                logger.warning("nodelist: skipped unreadable line %r", line[:200])
                continue
            read += 1
            if fields[i_status].lower() != "idle":
                continue
            minutes = cobalt_duration_min(fields[i_backfill]) if fields[i_backfill] not in ("-", "N/A") else 0
            if minutes <= 0:
                continue
            for queue in fields[i_queues].split(":"):
                counts = by_queue.setdefault(queue, {})
                counts[minutes] = counts.get(minutes, 0) + 1
        if bad and not read:
            # Not "no idle node": the elastic queue tells an unknown answer from an empty one.
            raise SchedulerError(f"nodelist printed nothing readable (first line: {bad[0].strip()[:120]!r})")
        windows: dict[str, list[BackfillWindow]] = {}
        for queue, counts in sorted(by_queue.items()):
            total = 0
            for minutes in sorted(counts, reverse=True):
                total += counts[minutes]
                windows.setdefault(queue, []).append(BackfillWindow(num_nodes=total, wall_time_min=minutes))
        return windows

    # -- projects ---------------------------------------------------------------------------
    def render_discover_projects(self) -> Optional[Command]:
        # Cobalt lists the user's projects when a submission names one that does not exist.
        return Command(["qsub", "-A", "balsam_no_such_project", "-n", "1", "-t", "1", "/bin/true"], timeout=20.0)

    def parse_discover_projects(self, result: CommandResult) -> list[str]:
        match = re.search(r"Projects available:\s*(.*)", result.stdout + "\n" + result.stderr)
        if not match:
            raise SchedulerError(f"qsub did not list the available projects: {result.describe()}")
        return [p for p in re.split(r"[\s,]+", match.group(1).strip()) if p]
