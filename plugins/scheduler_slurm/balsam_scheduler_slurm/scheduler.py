"""Slurm driver: sbatch, squeue, scancel, sacct, sinfo and sacctmgr.

Every command is run with an explicit output format (``-o``/``--parsable2`` and a ``|``
delimiter), ``TZ=UTC`` and ``SLURM_TIME_FORMAT=standard`` (so times are ISO-8601 UTC), and the
user's ``SQUEUE_*``/``SACCT_*``/``SINFO_*`` variables removed, so nothing in the user's
environment changes what we have to read.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional

import attrs

from balsam.options import OptionsError, option
from balsam.models import AllowedQueue
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
)
from balsam.states import BatchJobState
from balsam.util import first_warning

logger = logging.getLogger("balsam.scheduler.slurm")

def _warn_once(key: tuple[str, str], message: str, *args: object) -> None:
    """A WARNING the first time this process meets ``key`` (the warning's kind and the text at
    fault), DEBUG after that (:func:`balsam.util.first_warning`, bounded): the elastic module and the
    scheduler module both read the backfill windows every cycle, and one bad sinfo line was warned
    about twice a minute for hours."""
    (logger.warning if first_warning(("sinfo",) + key) else logger.debug)(message, *args)

Q, R, F = BatchJobState.queued, BatchJobState.running, BatchJobState.finished

#: Every job state Slurm reports (squeue %T, sacct State), mapped to the BatchJob state.
#: ``finished`` means the job has left the queue for good (it is then looked up in sacct).
SLURM_STATES: dict[str, BatchJobState] = {
    "PENDING": Q,
    "REQUEUED": Q,
    "REQUEUE_FED": Q,
    "REQUEUE_HOLD": Q,
    "RESV_DEL_HOLD": Q,
    "SPECIAL_EXIT": Q,  # requeued and held after a special exit code
    "CONFIGURING": R,
    "RUNNING": R,
    "COMPLETING": R,
    "SIGNALING": R,
    "STAGE_OUT": R,
    "RESIZING": R,
    "SUSPENDED": R,
    "STOPPED": R,
    "COMPLETED": F,
    "CANCELLED": F,
    "DEADLINE": F,
    "FAILED": F,
    "NODE_FAIL": F,
    "OUT_OF_MEMORY": F,
    "PREEMPTED": F,
    "TIMEOUT": F,
    "BOOT_FAIL": F,
    "REVOKED": F,
}

#: ``-x key=value`` optional params that become sbatch flags (empty values are left out).
PASS_THROUGH_FLAGS: dict[str, str] = {
    "reservation": "--reservation",
    "constraint": "--constraint",
    "qos": "--qos",
    "gres": "--gres",
    "gpus": "--gpus",
    "gpus_per_node": "--gpus-per-node",
    "mem": "--mem",
    "licenses": "--licenses",
    "exclude": "--exclude",
    "nodelist": "--nodelist",
    "begin": "--begin",
    "signal": "--signal",
}
#: ``-x key=yes`` optional params that become bare sbatch switches.
PASS_THROUGH_SWITCHES: dict[str, str] = {"exclusive": "--exclusive", "requeue": "--requeue", "no_requeue": "--no-requeue"}
#: ``-x sbatch_flags="--foo=1 --bar"`` is split like a shell line and appended as is.
RAW_FLAGS_PARAM = "sbatch_flags"
#: The ``-x exclusive=...`` values that turn the ``exclusive`` option's --exclusive off for one BatchJob.
_FALSE_WORDS = ("0", "no", "false", "off")
#: sbatch flags by which a BatchJob's own flags choose how its nodes are shared: the driver then
#: adds no --exclusive of its own (``--exclusive=user`` and ``--oversubscribe`` say something else).
_SHARING_FLAG = re.compile(r"--exclusive(=.*)?|--oversubscribe|-s|--share")
#: The optional param a site's defaults may carry for its GPU nodes (Perlmutter's ``gpus_per_node:
#: '4'``); a BatchJob asking for GPUs itself goes without it where the two conflict
#: (:func:`replaces_gpus_per_node`).
GPUS_PER_NODE_PARAM = "gpus_per_node"
#: sbatch's options that take a value (long names; short ones by :data:`_SBATCH_SHORT`), so that a
#: value (``--comment -Gx``, ``--job-name --gpus``) is not read as a flag. Options whose value is
#: optional (``--exclusive[=user]``, ``--nice``, ``--export``) take one only after ``=``.
_SBATCH_VALUE_OPTIONS = frozenset("""
    account acctg-freq array batch bb bbf begin burst-buffer chdir cluster cluster-constraint clusters comment
    constraint container core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot
    dependency distribution error exclude export-file extra extra-node-info gid gpu-bind gpu-freq gpus
    gpus-per-node gpus-per-socket gpus-per-task gres gres-flags hint input job-name kill-on-invalid-dep licenses
    mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network nodefile nodelist nodes
    ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode output partition power
    prefer priority profile qos reservation signal sockets-per-node switches thread-spec threads-per-core time
    time-min tmp tres-per-task uid wckey wrap""".split())
#: sbatch's long options that take no value (or one only after ``=``): for getopt's prefixes.
_SBATCH_FLAG_OPTIONS = frozenset("""
    contiguous exclusive export get-user-env help hold ignore-pbs nice no-kill no-requeue overcommit oversubscribe
    parsable propagate quiet reboot requeue spread-job test-only usage use-min-nodes verbose version wait""".split())
#: sbatch's short options that take a value, by their long names.
_SBATCH_SHORT = {"a": "array", "A": "account", "b": "begin", "B": "extra-node-info", "c": "cpus-per-task",
                 "C": "constraint", "d": "dependency", "D": "chdir", "e": "error", "F": "nodefile", "G": "gpus",
                 "i": "input", "J": "job-name", "L": "licenses", "m": "distribution", "M": "clusters",
                 "n": "ntasks", "N": "nodes", "o": "output", "p": "partition", "q": "qos", "S": "core-spec",
                 "t": "time", "w": "nodelist", "x": "exclude"}
#: Own GPU flags that the default gpus_per_node cannot stand beside, on real Slurm 22.05 with GPU
#: GRES (--exclusive --gpus-per-node=4 and the flag): sbatch refused --gpus=1 / -G 1 and
#: --gpus-per-socket=1 ("Invalid generic resource (gres) specification"); --gpus-per-node=2 replaced it.
_GPU_COUNT_OPTIONS = ("gpus", "gpus-per-node", "gpus-per-socket")

#: The status poll's columns. The QOS (%q) is a BatchJob's queue under ``queue_flag: --qos``; it
#: comes before the reason, which stays last: a reason is free text that may hold a '|'.
SQUEUE_FIELDS = ("jobid", "state", "partition", "nodes", "timelimit", "account", "timeleft", "submit", "start", "end",
                 "qos", "reason")
SQUEUE_FORMAT = "|".join(("%i", "%T", "%P", "%D", "%l", "%a", "%L", "%V", "%S", "%e", "%q", "%r"))
#: The header squeue prints above SQUEUE_FORMAT's columns (status polls of named clusters keep it).
SQUEUE_HEADER = ("JOBID", "STATE", "PARTITION", "NODES", "TIME_LIMIT", "ACCOUNT", "TIME_LEFT", "SUBMIT_TIME",
                 "START_TIME", "END_TIME", "QOS", "REASON")
#: The columns of the format before the QOS was asked for (outputs recorded then, and a wrapper
#: that still prints them): read with no QOS.
_SQUEUE_FIELDS_WITHOUT_QOS = len(SQUEUE_FIELDS) - 1
#: What squeue prints for a job without a QOS (a site without accounting storage gives none).
_NO_QOS = {"", "(NULL)", "N/A"}
#: The line squeue (-M/--clusters) prints before each cluster's jobs.
_CLUSTER_LINE = re.compile(r"CLUSTER:\s*(\S+)\s*")
#: The optional param naming the cluster a BatchJob goes to (sbatch --clusters).
CLUSTER_PARAM = "cluster"
SACCT_FIELDS = ("JobIDRaw", "State", "Submit", "Start", "End", "ExitCode", "Reason")

#: Environment variables that change what squeue/sacct/sinfo print or which jobs they list.
USER_FORMAT_VARIABLES = (
    "SQUEUE_FORMAT", "SQUEUE_FORMAT2", "SQUEUE_SORT", "SQUEUE_STATES", "SQUEUE_ACCOUNT", "SQUEUE_PARTITION",
    "SQUEUE_QOS", "SQUEUE_USERS", "SQUEUE_NAMES", "SQUEUE_LICENSES", "SQUEUE_CLUSTERS", "SQUEUE_ALL",
    "SQUEUE_ARRAY", "SQUEUE_PRIORITY", "SQUEUE_SIBLING", "SQUEUE_RESERVATION", "SQUEUE_LOCAL", "SQUEUE_FEDERATION",
    "SACCT_FORMAT", "SACCT_FEDERATION", "SACCT_LOCAL", "SINFO_FORMAT", "SINFO_PARTITION", "SINFO_SORT",
    "SLURM_CLUSTERS", "SLURM_TIME_FORMAT",
)
PLAIN_ENV = {"TZ": "UTC", "SLURM_TIME_FORMAT": "standard"}

#: max_walltime written by site init for a partition without a time limit (one week).
UNLIMITED_WALLTIME_MIN = 7 * 1440
#: Seconds a discovery command (site init, on a login node) may take before it is given up.
DISCOVERY_TIMEOUT_SEC = 20.0

_NO_TIME = {"", "N/A", "UNKNOWN", "NONE", "INVALID", "NOT_SET"}
#: What sacct says (lower case) at a site with no accounting storage (AccountingStorageType=none).
ACCOUNTING_DISABLED = "accounting storage is disabled"
#: Longest scheduler reason kept (``ReqNodeNotAvail, UnavailableNodes:...`` can list many nodes).
MAX_REASON_CHARS = 300


#: squeue pending reasons (%r) that say the job asks for more than its partition, account or QOS
#: allows (or for something it may not use): it waits for ever, not for its turn, until an
#: administrator changes the limits or it is deleted. (PartitionNodeLimit also shows while enough of
#: the partition's nodes are down: each status poll says it again, so a job whose reason changes
#: counts again.)
NEVER_STARTS_REASONS = frozenset({
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "AccountNotAllowed", "QOSNotAllowed",
    "InvalidAccount", "InvalidQOS", "BadConstraints",
    "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit", "QOSMaxCpuPerJobLimit", "QOSMinNode",
    "AssocMaxNodesPerJobLimit", "AssocMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit",
})

#: squeue pending reasons (%r) of a job that waits for something other than free nodes and its
#: turn: a hold (user's or administrator's), a dependency, a begin time, a reservation, nodes or a
#: partition that are down, an array's task limit. It does not take nodes that come free now
#: (``SlurmScheduler.waits_for_other_than_nodes``).
WAITS_FOR_OTHER_REASONS = frozenset({
    "Dependency", "DependencyNeverSatisfied", "JobHeldUser", "JobHeldAdmin", "BeginTime",
    "ReqNodeNotAvail", "Reservation", "PartitionDown", "PartitionInactive", "JobArrayTaskLimit",
})

#: The starts of squeue's open-ended family of limit reasons (QOSMaxJobsPerUserLimit,
#: QOSGrpNodeLimit, AssocGrpNodeLimit, AssocMaxJobsLimit...): the job waits for the user's, the
#: account's or the QOS's other jobs to end, not for idle nodes. (Those in NEVER_STARTS_REASONS
#: never start at all.)
WAITS_FOR_LIMIT_PREFIXES = ("QOS", "Assoc")


def pending_reason(reason: str) -> str:
    """squeue's %r as the status message: ``None`` (running, or not yet evaluated) means no reason."""
    reason = reason.strip()
    if reason.upper() in ("NONE", "(NULL)", "N/A"):
        return ""
    return reason[:MAX_REASON_CHARS]


def _parse_time(text: str) -> Optional[dt.datetime]:
    """ISO time printed under TZ=UTC -> aware datetime; Unknown/None/N/A -> None."""
    text = text.strip()
    if text.upper() in _NO_TIME:
        return None
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def slurm_duration_min(text: str) -> int:
    """A Slurm time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in whole
    minutes (30 s and more round up). Note ``5:00`` is five minutes here, not five hours.
    UNLIMITED/INVALID/NOT_SET -> 0; anything else unreadable raises ValueError."""
    text = text.strip()
    if text.upper() in ("", "UNLIMITED", "INFINITE", "INVALID", "NOT_SET", "N/A"):
        return 0
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
    else:
        parts = [int(p) for p in text.split(":")]
        parts = [0] * (3 - len(parts)) + parts if len(parts) > 1 else [0, parts[0], 0]  # MM, MM:SS
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise ValueError(f"not a Slurm time: {text!r}")
    hours, minutes, seconds = parts
    return days * 1440 + hours * 60 + minutes + (1 if seconds >= 30 else 0)


def _minutes(text: str) -> int:
    try:
        return slurm_duration_min(text)
    except ValueError:
        return 0


def _job_size(text: str) -> Optional[tuple[int, Optional[int]]]:
    """sinfo's job size (``%s``: the partition's MinNodes-MaxNodes) -> ``(min_nodes, max_nodes)``,
    max None when unlimited; None when unreadable. sinfo prints ``1-infinite`` (no limits), ``2-3``,
    ``4`` (min = max), MinNodes 0 as 1."""
    match = re.fullmatch(r"(\d+)(?:-(\d+|infinite|unlimited))?", text.strip(), re.IGNORECASE)
    if match is None:
        return None
    low, high = int(match.group(1)), match.group(2)
    if high is None:
        return max(low, 1), low
    return max(low, 1), int(high) if high.isdecimal() else None


def _minutes_between(start: Optional[dt.datetime], end: Optional[dt.datetime]) -> int:
    if start is None or end is None:
        return 0
    return max(0, int((end - start).total_seconds() // 60))


def _native_state(text: str) -> str:
    """``CANCELLED by 1000`` -> ``CANCELLED``; ``RUNNING`` -> ``RUNNING``."""
    words = text.strip().split()
    return words[0].upper() if words else ""


@attrs.frozen
class SqueueRow:
    """One line of our squeue format."""

    scheduler_id: int
    native_state: str
    partition: str
    num_nodes: int
    wall_time_min: int
    account: str
    time_left_min: int
    submit_time: Optional[dt.datetime]
    start_time: Optional[dt.datetime]
    end_time: Optional[dt.datetime]
    reason: str
    #: The cluster squeue listed the job under (a poll with --clusters), else "".
    cluster: str = ""
    #: The job's QOS (%q); "" when squeue gave none or the line has no QOS column.
    qos: str = ""

    @property
    def state(self) -> BatchJobState:
        mapped = SLURM_STATES.get(self.native_state)
        if mapped is None:  # a state newer than this driver: decide by whether it started
            logger.warning("squeue: unknown Slurm state %r of job %d", self.native_state, self.scheduler_id)
            return R if self.start_time else Q
        return mapped


def parse_squeue_line(line: str, with_qos: Optional[bool] = None) -> SqueueRow:
    """Parse one line of ``squeue -o SQUEUE_FORMAT`` (``with_qos``), or of the format before it
    had the QOS column (one field fewer: its qos is ""); None: the line's own field count says
    which, as for a line read alone. ValueError says what is wrong with it."""
    if with_qos is None:
        with_qos = len(line.split("|", len(SQUEUE_FIELDS) - 1)) != _SQUEUE_FIELDS_WITHOUT_QOS
    want = len(SQUEUE_FIELDS) if with_qos else _SQUEUE_FIELDS_WITHOUT_QOS
    fields = [f.strip() for f in line.split("|", want - 1)]
    if len(fields) != want:
        raise ValueError(f"expected {want} '|'-separated fields"
                         f"{'' if with_qos else ' (the format without the QOS column)'}, got {len(fields)}")
    if not with_qos:
        fields.insert(SQUEUE_FIELDS.index("qos"), "")
    jobid, state, partition, nodes, limit, account, left, submit, start, end, qos, reason = fields
    if not jobid.isdecimal():
        raise ValueError(f"job id {jobid!r} is not a plain job number (array or heterogeneous job?)")
    if not nodes.isdecimal():
        raise ValueError(f"node count {nodes!r} is not a number")
    if not re.fullmatch(r"[A-Z_]+", state):
        raise ValueError(f"state {state!r} is not a Slurm state name")
    return SqueueRow(
        scheduler_id=int(jobid),
        native_state=state,
        partition=partition,
        num_nodes=int(nodes),
        wall_time_min=_minutes(limit),
        account=account,
        time_left_min=_minutes(left),
        submit_time=_parse_time(submit),
        start_time=_parse_time(start),
        end_time=_parse_time(end),
        reason=reason,
        qos="" if qos.upper() in _NO_QOS else qos,
    )


def _is_header(line: str) -> bool:
    return line.split("|", 1)[0].strip().upper() == SQUEUE_HEADER[0]


def _has_qos_column(stdout: str) -> bool:
    """Whether a poll's output is in SQUEUE_FORMAT or in the format before it had the QOS column,
    decided once for the whole output: a reason is free text, and an old line whose reason holds
    a '|' has as many fields as a line with the QOS (its reason's first part was read as the QOS,
    the rest as the reason). The header says it where squeue prints one (polls of named clusters:
    its titles hold no '|'). Else the lines vote: a line of exactly the old count is of the old
    format (none with the QOS column has so few), one of more fields most likely of the new; the
    old wins only with more lines than the new, so that neither an old line whose reason holds a
    '|' nor a new line cut short (output cut in its QOS) sways the whole poll."""
    lines = [line for line in stdout.splitlines() if line.strip() and not _CLUSTER_LINE.fullmatch(line.strip())]
    headers = [line for line in lines if _is_header(line)]
    if headers:
        return any(len(line.split("|")) >= len(SQUEUE_FIELDS) for line in headers)
    counts = [len(line.split("|")) for line in lines]
    old = sum(1 for n in counts if n == _SQUEUE_FIELDS_WITHOUT_QOS)
    return old <= sum(1 for n in counts if n >= len(SQUEUE_FIELDS))


def parse_squeue_rows(result: CommandResult) -> list[SqueueRow]:
    """All readable lines of a squeue poll. Unreadable lines are logged and skipped; a failed
    command, or output of which no line is readable, raises SchedulerError. A poll of named
    clusters (``--clusters``) prints ``CLUSTER: name`` and the column header before each cluster's
    jobs: each row keeps its cluster."""
    if result.returncode != 0:
        raise SchedulerError(f"status poll failed: {result.describe()}")
    rows: list[SqueueRow] = []
    bad: list[str] = []
    cluster = ""
    with_qos = _has_qos_column(result.stdout)
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        marker = _CLUSTER_LINE.fullmatch(line.strip())
        if marker:
            cluster = marker.group(1)
            continue
        if _is_header(line):
            continue  # the column header (its other titles vary between Slurm versions)
        try:
            rows.append(attrs.evolve(parse_squeue_line(line, with_qos), cluster=cluster))
        except ValueError as exc:
            bad.append(line)
            logger.warning("squeue: skipped unreadable line %r: %s", line[:200], exc)
    if bad and not rows:
        raise SchedulerError(f"squeue printed nothing readable (first line: {bad[0][:120]!r})")
    return rows


def history_from_sacct(native: str, submit: Optional[dt.datetime], start: Optional[dt.datetime],
                       end: Optional[dt.datetime], exit_code: str, reason: str, scheduler_id: int) -> Optional[JobHistory]:
    """A JobHistory from the final state of a job; while it is still queued or running (the status
    poll missed it), one in that state."""
    state = _native_state(native)
    mapped = SLURM_STATES.get(state)
    if mapped is None:
        if end is None:
            return None
        mapped = F
    if mapped in (Q, R):
        return JobHistory(scheduler_id=scheduler_id, state=mapped, start_time=start, native_state=native.strip(),
                          message=f"Slurm state {native.strip()}")
    if mapped is not F:
        return None
    details = [f"Slurm state {native.strip()}"]
    if exit_code and exit_code not in ("0:0", ""):
        details.append(f"exit code {exit_code}")
    # sacct's Reason is the last reason the job waited for: it explains a job that never started,
    # not one that ran (a requeued job that completed said "COMPLETED, reason BeginTime").
    if start is None and reason and reason.upper() not in ("NONE", ""):
        details.append(f"reason {reason}")
    never_ran = start is None and state != "CANCELLED"
    return JobHistory(
        scheduler_id=scheduler_id,
        state=BatchJobState.submit_failed if never_ran else BatchJobState.finished,
        start_time=start,
        end_time=end,
        native_state=native.strip(),
        message=("never started: " if never_ran else "") + ", ".join(details),
    )


def _at_least_one(field: attrs.Attribute, value: int) -> None:
    # Worded as settings.yml's other checks ("must be at least 1, got -1"), not as attrs' ge
    # ("'unlimited_window_min' must be >= 1: -1"); the field goes along, as attrs' own validators
    # pass it, so the loader puts the line on this key.
    if value < 1:
        raise ValueError(f"must be at least 1, got {value!r}", field)


@attrs.frozen
class SlurmOptions:
    """``scheduler.options`` of the Slurm driver."""

    queue_flag: str = option(
        "--partition",
        "The sbatch flag a BatchJob's queue goes to: --partition, or --qos at sites whose queues are QOS "
        "names (NERSC: regular, debug, premium).",
        validator=attrs.validators.in_(("--partition", "--qos")),
    )
    unlimited_window_min: int = option(
        1440, "Length (minutes) of a backfill window on a partition with no time limit.",
        validator=lambda _self, field, value: _at_least_one(field, value),
    )
    clusters: list[str] = option(
        help="Slurm clusters (multi-cluster -M names) this site's jobs may go to; [] (default): the login node's "
        "own cluster only. Jobs go to the first unless a BatchJob names another with -x cluster=NAME; squeue, "
        "scancel and sacct then ask all of them.",
        factory=list,
    )
    exclusive: bool = option(
        True,
        "Ask sbatch for whole nodes (--exclusive). A launcher places jobs on every core and GPU of its "
        "allocation's nodes: on a partition that shares nodes between jobs (SelectType cons_tres, "
        "OverSubscribe), two BatchJobs got the same nodes while others stayed idle. false: at a site that "
        "sells parts of nodes (a shared QOS or partition); one BatchJob turns it off with -x exclusive=no.",
    )

    def validate(self) -> dict[str, str]:
        """Checked by the settings loader (``settings.yml:LINE scheduler.options.clusters: ...``)
        and by the driver: a comma or a space would silently name other clusters."""
        bad = [name for name in self.clusters if not re.fullmatch(r"[A-Za-z0-9_.\-]+", str(name))]
        return {"clusters": f"{bad[0]!r} is not a Slurm cluster name (letters, digits, '_', '.', '-')"} if bad else {}

    def queue_name_problem(self, name: str) -> str:
        """Why ``name`` cannot be a queue of settings.yml's allowed_queues ("" when it can; read by
        the scheduler section's check). Under --qos it is a QOS name, which Slurm keeps in lower
        case (``sbatch --qos Normal`` is listed as ``normal``): a queue with capitals matched none
        of the user's other jobs, whose count max_queued_jobs and the elastic queue need."""
        if self.queue_flag == "--qos" and name != name.lower():
            return (f"{name!r} is a QOS name (queue_flag: --qos), which Slurm lists in lower case: "
                    f"write {name.lower()!r}")
        return ""


@attrs.frozen
class SlurmPoll(StatusPoll):
    """A squeue poll, with the cluster each job was listed under (polls of named clusters)."""

    clusters: Mapping[int, str] = attrs.field(factory=dict)
    #: Its waiting jobs whose submit time squeue did not give (%V N/A): their queued_time_min 0
    #: means unknown, not just submitted.
    unknown_submit: frozenset[int] = attrs.field(factory=frozenset, converter=frozenset)


class WindowsOfPools(dict):
    """Backfill windows ({queue: [BackfillWindow]}, a plain dict to every reader) that also say
    which node pools (partitions) their nodes are in: under ``queue_flag: --qos`` every
    partition's idle nodes are one list under ``*``, and the elastic queue counts the user's other
    jobs waiting in those partitions only (``node_pools``, as in :attr:`StatusPoll.node_pools`)."""

    def __init__(self, windows: Mapping[str, list[BackfillWindow]], *, node_pools: tuple[str, ...]) -> None:
        super().__init__(windows)
        self.node_pools = tuple(node_pools)


def _cluster_flag_values(tokens: list[str]) -> list[str]:
    """The clusters raw sbatch flags name (``-M a,b``, ``-Ma``, ``--clusters=a``, ``--cluster a``...)."""
    names: list[str] = []
    for i, token in enumerate(tokens):
        value: Optional[str] = None
        if token == "-M" or re.fullmatch(r"--clu(s(t(e(rs?)?)?)?)?", token):
            value = tokens[i + 1] if i + 1 < len(tokens) else ""
        elif token.startswith("-M"):
            value = token[2:]
        elif re.match(r"--clu(s(t(e(rs?)?)?)?)?=", token):
            value = token.split("=", 1)[1]
        if value is not None:
            names += [n.strip() for n in value.split(",")]
    return names


class SlurmScheduler(Scheduler):
    """sbatch/squeue/scancel/sacct/sinfo driver. Queue = Slurm partition, or QOS (``queue_flag``)."""

    name = "slurm"
    default_job_template = resources.files(__package__).joinpath("job-template.sh").read_text()
    options_schema = SlurmOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for key, problem in self.options.validate().items():  # options built in code, not from settings.yml
            raise OptionsError(f"scheduler.options.{key}: {problem}")

    def never_starts(self, status: SchedulerJobStatus) -> bool:
        # The message is squeue's %r: one reason word (a few are followed by ", details").
        word = status.message.split(",", 1)[0].strip()
        return status.state is BatchJobState.queued and word in NEVER_STARTS_REASONS

    def waits_for_other_than_nodes(self, status: SchedulerJobStatus) -> bool:
        word = status.message.split(",", 1)[0].strip()
        return status.state is BatchJobState.queued and (
            word in WAITS_FOR_OTHER_REASONS or (word.startswith(WAITS_FOR_LIMIT_PREFIXES)
                                                and word not in NEVER_STARTS_REASONS))

    def submit_time_unknown(self, status: SchedulerJobStatus) -> bool:
        unknown = getattr(self.last_poll, "unknown_submit", frozenset())
        return status.state is BatchJobState.queued and status.scheduler_id in unknown

    # -- submit -----------------------------------------------------------------------------
    def render_submit(self, request: SubmitRequest) -> Command:
        script = Path(request.script_path)
        args = [
            "sbatch", "--parsable",
            "--job-name", request.job_name,
            "--output", str(script.with_suffix(".output")),
            "--error", str(script.with_suffix(".error")),
            "--nodes", str(request.num_nodes),
            "--time", str(request.wall_time_min),
        ]
        if request.project:
            args += ["--account", request.project]
        if request.queue:
            args += [self.options.queue_flag, request.queue]
        cluster = self.submit_cluster(request.optional_params)
        if cluster:
            args.append(f"--clusters={cluster}")
        params = {k: v for k, v in request.optional_params.items() if k != CLUSTER_PARAM}
        passed = self.pass_through_args(params)
        own_sharing = [a for a in passed if _SHARING_FLAG.fullmatch(a)]
        whole_nodes = ((self.wants_whole_nodes(request.optional_params) and not own_sharing)
                       or "--exclusive" in own_sharing)
        if (str(params.get(GPUS_PER_NODE_PARAM, "") or "").strip()
                and replaces_gpus_per_node(params, whole_nodes=whole_nodes)):
            # A site default (Perlmutter's gpus_per_node '4') beside the BatchJob's own GPU request:
            # sbatch refused or every step failed (see replaces_gpus_per_node).
            params.pop(GPUS_PER_NODE_PARAM, None)
            passed = self.pass_through_args(params)
        if self.wants_whole_nodes(request.optional_params) and not own_sharing:
            args.append("--exclusive")
        args += passed
        args.append(str(script))
        return Command(args, env=PLAIN_ENV, cwd=script.parent, unset_env=("SLURM_CLUSTERS",))

    def wants_whole_nodes(self, optional_params: Mapping[str, str]) -> bool:
        """The ``exclusive`` option, unless the BatchJob says ``-x exclusive=no`` (the BatchJob's
        ``-x exclusive=yes`` or its own sharing flags are passed through as they are)."""
        return self.options.exclusive and str(optional_params.get("exclusive", "")).strip().lower() not in _FALSE_WORDS

    def submit_cluster(self, optional_params: Mapping[str, str]) -> str:
        """The cluster a job goes to: the BatchJob's ``cluster`` param, else the first of the
        ``clusters`` option, else none (the login node's own). A cluster the option does not list
        is refused: squeue, scancel and sacct would never see the job there, and it would be
        declared failed while it waits or runs."""
        wanted = str(optional_params.get(CLUSTER_PARAM, "") or "").strip()
        named = ([wanted] if wanted else []) + _cluster_flag_values(
            shlex.split(str(optional_params.get(RAW_FLAGS_PARAM, "") or "")))
        unknown = [name for name in named if name not in self.options.clusters]
        if unknown:
            listed = ", ".join(self.options.clusters) or "none"
            raise SchedulerError(
                f"cluster {unknown[0]!r} (optional param {CLUSTER_PARAM if unknown[0] == wanted else RAW_FLAGS_PARAM}) "
                f"is not in scheduler.options.clusters of settings.yml (listed: {listed}): the agent would not see "
                f"the job there", permanent=True)
        return wanted or (self.options.clusters[0] if self.options.clusters else "")

    def _clusters_args(self) -> list[str]:
        """``--clusters=a,b`` for the commands that look jobs up, when the site names clusters."""
        return [f"--clusters={','.join(self.options.clusters)}"] if self.options.clusters else []

    @staticmethod
    def pass_through_args(optional_params: Mapping[str, str]) -> list[str]:
        args: list[str] = []
        for key, value in optional_params.items():
            value = str(value).strip()
            if not value:
                continue
            if key in PASS_THROUGH_FLAGS:
                args.append(f"{PASS_THROUGH_FLAGS[key]}={value}")
            elif key in PASS_THROUGH_SWITCHES and value.lower() in ("1", "yes", "true", "on"):
                args.append(PASS_THROUGH_SWITCHES[key])
            elif key == RAW_FLAGS_PARAM:
                args += shlex.split(value)
        return args

    def parse_submit(self, result: CommandResult) -> int:
        if result.returncode != 0:
            limit = _submit_limit_reason(result)
            raise SchedulerError(f"sbatch refused the job: {_slurm_error(result)}", permanent=_is_refusal(result),
                                 at_queue_limit=limit is not None, per_user_limit=_counts_only_the_users_jobs(limit))
        for line in reversed(result.stdout.strip().splitlines()):
            match = re.fullmatch(r"(\d+)(;\S+)?", line.strip()) or re.search(r"Submitted batch job (\d+)", line)
            if match:
                return int(match.group(1))
        raise SchedulerError(f"sbatch printed no job id: {result.describe()}")

    # -- status -----------------------------------------------------------------------------
    def render_status(self, user: str) -> Command:
        # With --clusters, --noheader would also drop the `CLUSTER: name` lines that tell which
        # cluster each job is on (Slurm 22.05): the header is kept and skipped when read.
        header = [] if self.options.clusters else ["--noheader"]
        return Command(
            ["squeue", *header, "--states=all", "--user", user, *self._clusters_args(), "--format", SQUEUE_FORMAT],
            env=PLAIN_ENV,
            unset_env=USER_FORMAT_VARIABLES,
        )

    def parse_status(self, result: CommandResult, now: dt.datetime) -> StatusPoll:
        """The jobs in the queue, and the final word on those squeue still lists in a final state
        (for MinJobAge seconds): the history when sacct is unavailable or has no record yet."""
        rows = parse_squeue_rows(result)
        clusters: dict[int, str] = {}
        for row in rows:
            if row.cluster and clusters.setdefault(row.scheduler_id, row.cluster) != row.cluster:
                # Each cluster numbers its own jobs: the same number on two clusters cannot be told
                # apart by the agent, which knows a job by its number only.
                logger.warning("squeue: job %d is listed on clusters %s and %s; the later line is kept",
                               row.scheduler_id, clusters[row.scheduler_id], row.cluster)
                clusters[row.scheduler_id] = row.cluster
        ended = {
            row.scheduler_id: history
            for row in rows
            if row.state is F
            and (history := history_from_sacct(row.native_state, row.submit_time, row.start_time, row.end_time,
                                               "", row.reason, row.scheduler_id)) is not None
        }
        unknown = {row.scheduler_id for row in rows if row.state is Q and row.submit_time is None}
        by_qos = self.options.queue_flag == "--qos"
        statuses = self.statuses_from_rows(rows, now, by_qos=by_qos)
        # Under --qos a job's queue is its QOS, and one QOS may reach several partitions
        # (Perlmutter's regular: regular_milan_ss11 and gpu_ss11): the partition says whose idle
        # nodes it takes (the elastic queue's window claims). A pending job asked for several
        # lists them all (%P "a,b"). Where the queue is the partition it says so already.
        pools = {sid: tuple(p for p in (part.strip() for part in row.partition.split(",")) if p)
                 for row in rows if (sid := row.scheduler_id) in statuses} if by_qos else {}
        # A running job's %S is when it started (a pending job's is only Slurm's estimate): the
        # agent's BatchJob.start_time, exact where its own sighting is up to sync_period late.
        # An unreadable %S (None) leaves the job listed, with no start.
        starts = {row.scheduler_id: row.start_time for row in rows
                  if row.start_time is not None and row.state is R
                  and (status := statuses.get(row.scheduler_id)) is not None and status.state is R}
        return SlurmPoll(time=now, statuses=statuses, ended=ended, clusters=clusters, unknown_submit=unknown,
                         node_pools=pools, start_times=starts)

    @staticmethod
    def statuses_from_rows(rows: list[SqueueRow], now: dt.datetime, *,
                           by_qos: bool = False) -> dict[int, SchedulerJobStatus]:
        """The statuses of the rows still in the queue. A job's queue is its partition, or with
        ``by_qos`` (``queue_flag: --qos``) its QOS, the name a BatchJob's queue has there (the
        partition where squeue gave no QOS): the agent counts the user's other jobs of a queue
        by this name (max_queued_jobs, the elastic queue's backfill windows)."""
        statuses = {}
        for row in rows:
            state = row.state
            if state is F:  # left the queue: the agent looks it up in sacct for its times
                continue
            if state is Q:
                queued_min = _minutes_between(row.submit_time, now)
                remaining = row.wall_time_min
            else:
                queued_min = _minutes_between(row.submit_time, row.start_time)
                remaining = row.time_left_min
            statuses[row.scheduler_id] = SchedulerJobStatus(
                scheduler_id=row.scheduler_id,
                state=state,
                queue=(row.qos or row.partition) if by_qos else row.partition,
                num_nodes=row.num_nodes,
                wall_time_min=row.wall_time_min,
                project=row.account,
                time_remaining_min=remaining,
                queued_time_min=queued_min,
                message=pending_reason(row.reason),
            )
        return statuses

    # -- an earlier submission ----------------------------------------------------------------
    def render_find(self, request: SubmitRequest, user: str) -> Command:
        # %o is the batch script's path as sbatch recorded it: with the name, it tells this site's
        # job from another site's job of the same name. States=all: a job that already ended
        # stays listed for MinJobAge seconds.
        return Command(
            ["squeue", "--noheader", "--states=all", "--user", user, *self._clusters_args(),
             "--name", request.job_name, "--format", "%i|%o"],
            env=PLAIN_ENV,
            unset_env=USER_FORMAT_VARIABLES,
        )

    def parse_find(self, result: CommandResult, request: SubmitRequest) -> list[int]:
        if result.returncode != 0:
            raise SchedulerError(f"squeue could not look up jobs named {request.job_name}: {_slurm_error(result)}")
        script = str(Path(request.script_path))
        found = []
        for line in result.stdout.splitlines():
            jobid, sep, command = line.strip().partition("|")
            if not sep or not jobid.isdecimal():
                if line.strip() and not _CLUSTER_LINE.fullmatch(line.strip()):
                    logger.warning("squeue: skipped unreadable line %r", line[:200])
                continue
            if command.strip() == script:
                found.append(int(jobid))
        return found

    # -- delete -----------------------------------------------------------------------------
    def render_delete(self, scheduler_id: int) -> Command:
        # The cluster the last poll listed the job on: scancel -M of every listed cluster would
        # also cancel the user's job of the same number on another cluster.
        cluster = getattr(self.last_poll, "clusters", {}).get(scheduler_id)
        where = [f"--clusters={cluster}"] if cluster and self.options.clusters else self._clusters_args()
        return Command(["scancel", *where, str(scheduler_id)], unset_env=("SLURM_CLUSTERS",))

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        said = f"{result.stdout}\n{result.stderr}"
        if result.returncode == 0 and "error" not in said.lower():
            return
        if re.search(r"Invalid job id|already completing or completed|Job has already finished", said, re.I):
            return  # gone already: what deletion wanted
        raise SchedulerError(f"scancel could not delete job {scheduler_id}: {_slurm_error(result)}")

    # -- history ----------------------------------------------------------------------------
    def render_histories(self, jobs: Mapping[int, Optional[Path]]) -> Command:
        return Command(
            ["sacct", "--allocations", "--noheader", "--parsable2", *self._clusters_args(),
             "--jobs", ",".join(str(i) for i in jobs), "--format", ",".join(SACCT_FIELDS)],
            env=PLAIN_ENV,
            unset_env=USER_FORMAT_VARIABLES,
        )

    def parse_histories(self, result: Optional[CommandResult], jobs: Mapping[int, Optional[Path]],
                        last_poll: StatusPoll) -> dict[int, Optional[JobHistory]]:
        """sacct's records; jobs it does not know (yet) are None, and take what squeue last said
        of them (``last_poll.ended``, merged by the base class), as they do when sacct fails."""
        if result is not None and result.returncode != 0 and ACCOUNTING_DISABLED in (result.stderr + result.stdout).lower():
            # Not a failed lookup but a site without accounting: no record will ever come, so the
            # jobs take what squeue last said of them, else are missing (which the agent counts).
            return {i: None for i in jobs}
        if result is None or result.returncode != 0:
            raise SchedulerError(f"sacct failed: {_slurm_error(result) if result else 'not run'}")
        wanted = set(jobs)
        histories: dict[int, Optional[JobHistory]] = {i: None for i in jobs}
        for line in result.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < len(SACCT_FIELDS) or not fields[0].strip().isdecimal():
                if line.strip():
                    logger.warning("sacct: skipped unreadable line %r", line[:200])
                continue
            jobid, native, _submit, start, end, exit_code, reason = (f.strip() for f in fields[: len(SACCT_FIELDS)])
            if int(jobid) not in wanted:
                continue
            # a requeued job has several records: the last one is the final word
            histories[int(jobid)] = history_from_sacct(
                native, None, _parse_time(start), _parse_time(end), exit_code, reason, int(jobid)
            )
        return histories

    # -- backfill ---------------------------------------------------------------------------
    def render_backfill(self) -> Optional[Command]:
        return Command(["sinfo", "--noheader", "--format", "%R|%a|%T|%D|%l"], env=PLAIN_ENV,
                       unset_env=USER_FORMAT_VARIABLES)

    def parse_backfill(self, result: CommandResult) -> dict[str, list[BackfillWindow]]:
        """Idle nodes of each partition that is up, for the partition's time limit.

        sinfo prints one line per (partition, node state); only nodes in the plain ``idle`` state
        count (``idle~`` is powered off, ``idle*`` not responding, ``mixed`` partly busy).

        Keyed by partition; with ``queue_flag: --qos`` under ``*`` (usable from any queue) instead:
        a BatchJob's queue is then a QOS name, which sinfo never shows and whose partitions Slurm
        picks at submission, so partition keys would match no queue and no window would ever be used.
        The mapping then also says which partitions they came from (:class:`WindowsOfPools`).
        """
        if result.returncode != 0:
            raise SchedulerError(f"sinfo failed: {_slurm_error(result)}")
        idle: dict[str, int] = {}
        limits: dict[str, int] = {}
        bad: list[str] = []
        read = 0
        for line in result.stdout.splitlines():
            fields = [f.strip() for f in line.split("|")]
            # isdecimal, not isdigit: "²" is a digit that int() cannot read (in every driver).
            if len(fields) != 5 or not fields[3].isdecimal():
                if line.strip():
                    bad.append(line)
                    # Once per distinct line (DEBUG on later calls): parse_backfill runs every cycle.
                    _warn_once(("line", line[:200]), "sinfo: skipped unreadable line %r", line[:200])
                continue
            read += 1
            partition, avail, state, count, limit = fields
            if avail.lower() != "up" or state.lower() != "idle":
                continue
            if limit.lower() in ("infinite", "unlimited"):
                minutes = self.options.unlimited_window_min
            else:
                try:
                    minutes = slurm_duration_min(limit)
                except ValueError:
                    minutes = 0
                if minutes <= 0:  # a window of unknown length is no window
                    _warn_once(("limit", f"{partition}|{limit[:60]}"), "sinfo: partition %s: unreadable time limit "
                               "%r: its idle nodes are no backfill window", partition, limit[:60])
            idle[partition] = idle.get(partition, 0) + int(count)
            limits[partition] = minutes
        if bad and not read:
            raise SchedulerError(f"sinfo printed nothing readable (first line: {bad[0][:120]!r})")
        windows = {
            partition: [BackfillWindow(num_nodes=count, wall_time_min=limits[partition])]
            for partition, count in sorted(idle.items())
            if count > 0 and limits[partition] > 0
        }
        if self.options.queue_flag == "--qos":
            if not windows:
                return {}
            return WindowsOfPools({ANY_QUEUE: [w for ws in windows.values() for w in ws]}, node_pools=tuple(windows))
        return windows

    # -- queues and projects (site init) ---------------------------------------------------------
    def render_discover_queues(self) -> Optional[Command]:
        # --noconvert: sinfo prints the job size (%s) with unit suffixes otherwise (MaxNodes=2048: "2K").
        return Command(["sinfo", "--noheader", "--noconvert", "--format", "%R|%D|%l|%s"], env=PLAIN_ENV,
                       unset_env=USER_FORMAT_VARIABLES, timeout=DISCOVERY_TIMEOUT_SEC)

    def parse_discover_queues(self, result: CommandResult) -> dict[str, AllowedQueue]:
        """Each partition with its node count and time limit (no limit: a week), and its job size
        limits (``%s``, ``MinNodes-MaxNodes``): ``max_nodes`` is the node count, or the partition's
        MaxNodes where smaller; ``min_nodes`` its MinNodes (left at 1, out of settings.yml, where
        Slurm says 1 or none). Slurm's per-user job limits live in QOS records sinfo does not show:
        ``max_queued_jobs`` None (unknown), so site init keeps the platform's limit or writes a
        placeholder. A partition whose MinNodes exceeds what it can give is left out (logged).

        A line without a readable partition name or node count (``%D``) is skipped (logged). An
        unreadable job size or time limit is that column skipped (logged): the partition keeps
        its other limits, as if sinfo had stated none (no size limits; a week), unless another of
        its lines states it. Output of which no line is readable raises SchedulerError."""
        if result.returncode != 0:
            raise SchedulerError(f"sinfo failed: {_slurm_error(result)}")
        nodes: dict[str, int] = {}
        walltimes: dict[str, int] = {}
        sizes: dict[str, tuple[int, Optional[int]]] = {}
        bad: list[str] = []
        for line in result.stdout.splitlines():
            fields = [f.strip() for f in line.split("|")]
            # Three columns: a line without the job size (%s), as recorded before the column was
            # asked for; its partition then has no size limits.
            if len(fields) not in (3, 4) or not fields[1].isdecimal() or not re.fullmatch(r"[\w.\-]+", fields[0]):
                if line.strip():
                    bad.append(line)
                    logger.warning("sinfo: skipped unreadable line %r", line[:200])
                continue
            partition, count, limit = fields[:3]
            size = _job_size(fields[3]) if len(fields) == 4 else None
            if size is None and len(fields) == 4:
                logger.warning("sinfo: partition %s: unreadable job size %r (MinNodes-MaxNodes) skipped",
                               partition, fields[3][:60])
            if limit.lower() in ("infinite", "unlimited"):
                walltime: Optional[int] = UNLIMITED_WALLTIME_MIN
            else:
                try:
                    walltime = slurm_duration_min(limit)
                except ValueError:
                    walltime = None
                if walltime is None or (walltime == 0 and limit.upper() in ("", "N/A", "INVALID", "NOT_SET")):
                    logger.warning("sinfo: partition %s: unreadable time limit %r skipped", partition, limit[:60])
                    walltime = None
            if walltime == 0:
                logger.warning("sinfo: partition %s has a time limit of %r: no job fits, left out", partition, limit)
                continue
            # sinfo prints a partition once per node state: its nodes add up; its limits are the
            # same on every line (the strictest is kept should they differ).
            nodes[partition] = nodes.get(partition, 0) + int(count)
            if walltime is not None:
                walltimes[partition] = max(walltime, walltimes.get(partition, 0))
            known_min, known_max = sizes.get(partition, (1, None))
            if size is not None:
                maxes = [m for m in (known_max, size[1]) if m is not None]
                known_min, known_max = max(known_min, size[0]), (min(maxes) if maxes else None)
            sizes[partition] = (known_min, known_max)
        if bad and not nodes:
            raise SchedulerError(f"sinfo printed nothing readable (first line: {bad[0][:120]!r})")
        queues: dict[str, AllowedQueue] = {}
        for partition, count in nodes.items():
            min_nodes, max_size = sizes[partition]
            max_nodes = count if max_size is None else min(count, max_size)
            if min_nodes > max_nodes:
                logger.warning("sinfo: partition %s takes jobs of %d nodes or more but has %d: left out",
                               partition, min_nodes, max_nodes)
                continue
            if partition not in walltimes:
                logger.warning("sinfo: partition %s states no readable time limit: max_walltime written as %d "
                               "minutes (check settings.yml)", partition, UNLIMITED_WALLTIME_MIN)
            queues[partition] = AllowedQueue(
                max_nodes=max_nodes,
                max_walltime=walltimes.get(partition, UNLIMITED_WALLTIME_MIN),
                max_queued_jobs=None,  # unknown: Scheduler.site_defaults, site init
                min_nodes=min_nodes,
            )
        return queues

    def render_discover_projects(self) -> Optional[Command]:
        return Command(["sacctmgr", "--noheader", "--parsable2", "show", "associations", f"user={self.user}",
                        "format=account"], timeout=DISCOVERY_TIMEOUT_SEC)

    def parse_discover_projects(self, result: CommandResult) -> list[str]:
        if result.returncode != 0:
            raise SchedulerError(f"sacctmgr failed: {_slurm_error(result)}")
        seen: list[str] = []
        for line in result.stdout.splitlines():
            account = line.strip().strip("|")
            if account and re.fullmatch(r"[\w.\-]+", account) and account not in seen:
                seen.append(account)
        return seen


def sbatch_options(text: str) -> list[tuple[str, str]]:
    """``sbatch_flags`` as ``(long option name, value)`` pairs (``""``: none), each value taken
    with its option, so that a value is never read as an option (``--comment -Gx`` is a comment);
    getopt's unique prefixes (``--gpus-per-n=2``, which sbatch took for --gpus-per-node) are
    resolved. Words that are no option (a stray value) are left out."""
    tokens = shlex.split(text)
    known = _SBATCH_VALUE_OPTIONS | _SBATCH_FLAG_OPTIONS
    options: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if name not in known:
                prefixed = [option for option in known if option.startswith(name)]
                name = prefixed[0] if len(prefixed) == 1 else name
            if not eq and name in _SBATCH_VALUE_OPTIONS and i < len(tokens):
                value = tokens[i]
                i += 1
            options.append((name, value))
        elif token.startswith("-") and len(token) > 1:
            name = _SBATCH_SHORT.get(token[1])
            if name is None:
                options.append((token[1:], ""))  # a short switch (-O, -s, -Q ...)
                continue
            value = token[2:]
            if not value and i < len(tokens):
                value = tokens[i]
                i += 1
            options.append((name, value))
    return options


def _gpu_count(value: str) -> str:
    """The GPU count of a ``--gres``/``--tres-per-task`` value (``gpu:2``, ``gres/gpu:a100:1``,
    ``cpu:4,gres/gpu:1``; ``gpu`` alone: ``1``), or ``""`` where it names no gpu."""
    for item in value.split(","):
        parts = item.strip().removeprefix("gres/").split(":")
        if parts[0] == "gpu":
            return parts[-1] if len(parts) > 1 else "1"
    return ""


def replaces_gpus_per_node(optional_params: Mapping[str, str], *, whole_nodes: bool) -> bool:
    """Whether a BatchJob's own GPU request takes the place of ``gpus_per_node`` (a site default)
    rather than going beside it (a shared job's ``--gres=gpu:2`` beside it got 2 GPUs with
    SLURM_GPUS_PER_NODE=4: every step failed, "Step requested gres_per_node=gpu:4 is more than the
    job's gres_per_node=gpu:2"): ``gpus``, ``--gpus``/``-G``, ``--gpus-per-node``/``-socket``
    (:data:`_GPU_COUNT_OPTIONS`); a ``gres``/``--gres`` naming gpu where the nodes are shared; and a
    per-task count (``--gpus-per-task``, ``--tres-per-task=gres/gpu:N``) where sbatch refuses the two together.

    A per-task count keeps the default on whole nodes: its steps inherit it as their request
    (``SLURM_GPUS_PER_TASK``), and under ``--exclusive --ntasks-per-node=4 --gpus-per-task=1``
    alone every single-rank step got GPU 0 (real Slurm 22.05; balsam gave packed jobs 1-3), with
    ``--gpus-per-node=4`` beside it the node's 4. sbatch took the two with ``-n N`` (no
    ``--ntasks-per-node``) and where ``--ntasks-per-node`` x the count made the default's, refused
    other products (``--ntasks-per-node=1 --gpus-per-task=1``: "Invalid generic resource (gres)
    specification"), and any without ``--exclusive`` ("Requested node configuration is not available")."""
    def given(key: str) -> str:
        return str(optional_params.get(key, "") or "").strip()

    options = sbatch_options(given(RAW_FLAGS_PARAM))
    if given("gpus") or any(name in _GPU_COUNT_OPTIONS for name, _ in options):
        return True
    if (_gpu_count(given("gres")) or any(name == "gres" and _gpu_count(value) for name, value in options)):
        # On whole nodes sbatch took --gres=gpu:N beside it and every step had the node's GPUs; alone,
        # a single-rank step's --gres=craynetwork:0 replaced the job's --gres: no GPU.
        return not whole_nodes
    per_task = [value.rsplit(":", 1)[-1] if name == "gpus-per-task" else _gpu_count(value)
                for name, value in options if name == "gpus-per-task" or name == "tres-per-task"]
    per_task = [count for count in per_task if count]
    if not per_task:
        return False
    if not whole_nodes:
        return True
    per_node = [value for name, value in options if name == "ntasks-per-node"]
    default = given(GPUS_PER_NODE_PARAM).rsplit(":", 1)[-1]
    if not per_node:
        # sbatch refuses a default the count does not divide ("--gres=gpu/--gpus-per-node not
        # multiple of --gpus-per-task": --gpus-per-task=3 beside 4), which it took alone.
        return (per_task[-1].isdecimal() and default.isdecimal() and int(per_task[-1]) > 0
                and int(default) % int(per_task[-1]) != 0)
    return not (per_node[-1].isdecimal() and per_task[-1].isdecimal() and default.isdecimal()
                and int(per_node[-1]) * int(per_task[-1]) == int(default))


def _slurm_error(result: CommandResult) -> str:
    """The most telling line Slurm printed: the last ``error:`` line (after the limit's reason code
    sbatch prints on the line before it, e.g. ``QOSMaxNodePerJobLimit: Batch job submission failed:
    Job violates accounting/QOS policy ...``: the policy line alone does not say which limit), else
    the first line."""
    lines = [ln.strip() for ln in (result.stderr + "\n" + result.stdout).splitlines() if ln.strip()]
    errors = [re.sub(r"^\w+: error: ", "", ln) for ln in lines if "error" in ln.lower()]
    if errors:
        reasons = [e for e in errors[:-1] if _REASON_CODE.fullmatch(e)]
        return f"{reasons[-1]}: {errors[-1]}" if reasons else errors[-1]
    return result.describe()


#: A job reason code alone on its line (sbatch prints the limit a refused job hit this way).
_REASON_CODE = re.compile(r"(?:QOS|Assoc)[A-Za-z]+")
#: The reasons of limits on how many jobs may be queued at once (per user, account, association or
#: QOS): they clear by themselves as the counted jobs end. Size and time limits (QOSMaxNodePerJobLimit,
#: ...) do not: the same request is refused every time.
_SUBMIT_LIMIT = re.compile(r"(?:QOS|Assoc)\w*Submit\w*Limit")


def _submit_limit_reason(result: CommandResult) -> Optional[str]:
    """The reason code of a submission refused only because a job-count limit is reached."""
    match = _SUBMIT_LIMIT.search(result.stderr + "\n" + result.stdout)
    return match.group(0) if match else None


def _counts_only_the_users_jobs(reason: Optional[str]) -> bool:
    """Whether a submit-limit reason code counts the user's own jobs only (QOSMaxSubmitJobPerUserLimit).
    Group, account and association limits (AssocMaxSubmitJobLimit, AssocGrpSubmitJobsLimit,
    QOSGrpSubmitJobsLimit, QOSMaxSubmitJobPerAccountLimit) count jobs of other users or of other
    partitions that the user's status poll does not list."""
    return reason is not None and "PerUser" in reason and not re.search(r"Grp|Account|Assoc", reason)


def _is_refusal(result: CommandResult) -> bool:
    """True when Slurm looked at the request and said no (retrying the same request is pointless)."""
    said = result.stderr + result.stdout
    transient = ("Unable to contact slurm controller", "Socket timed out", "Connection refused", "Zero Bytes",
                 "try again", "temporarily")
    if any(t.lower() in said.lower() for t in transient):
        return False
    return "Batch job submission failed" in said or "invalid" in said.lower() or "error:" in said
