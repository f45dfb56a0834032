"""A job's earlier run that nobody ends any more, found and ended before the job runs again.

The fault: ``kill -9`` of a launcher *and* of its spawner processes (every balsam process of an
allocation, the OOM killer) leaves the tasks they started running: each task is in a session of
its own, and only the spawner would have ended it. The Session expires, the job is RUN_TIMEOUT and
re-queued (or, never reported RUNNING, simply freed), and the next launcher on that host (the next
BatchJob of the allocation, a restarted launcher) ran it again in the same workdir while the first
run still wrote there: two runs of one job at once.

Whoever starts a task records the run on its ``job.out`` (:class:`balsam.launcher.spawner.RunRecords`:
host, pid = process group, start on CLOCK_BOOTTIME, the identity of the process that reaps it, the
job, the pid namespace and the boot), and removes the record when it reaps the run: a record still
there names a run nobody reaped. When a launcher prepares a job
(:meth:`balsam.launcher.app_run.JobPreparer.prepare`, in the acquire thread of either mode, never
the loop) it calls :func:`end_stale_run` on the workdir:

- no record (the job's first run: one ``getxattr`` that fails, ~3 us with the Python around it):
  nothing;
- a record of another host, or of this host's name in another pid namespace (a container that
  shares the host's name and the file system) or an earlier boot: logged at WARNING as not
  verifiable from here, never signalled; the job runs;
- a record of another job (a workdir two jobs share), or of an earlier format (without the job,
  namespace and boot): logged at INFO, left alone;
- a run no longer alive, or whose pid now names another process (its start differs from the
  recorded one by more than :data:`START_SLACK_SEC`, or it no longer leads its process group):
  nothing;
- a run whose first process is gone (killed with the launcher: ``pkill -9 -f balsam`` matches
  the ``.balsam_command.N.sh`` leader of a job with a preamble) but whose process group lives on:
  Linux gives no new process the pid of a process group that exists, so members of that group in
  the session the run made, started after the recorded start and started with the job's
  ``BALSAM_JOB_ID``, are the run: treated as alive;
- a run alive whose starter (spawner, or launcher without one) is alive: it is looked after (this
  launcher's own copy, which ``balsam.launcher.gone`` ends; a rank of this launcher): left alone;
- a run alive whose starter is gone: logged at WARNING, its process group gets SIGTERM, then
  SIGKILL after :data:`STALE_RUN_GRACE_SEC` unless the group is empty by then, and the job starts
  only after that (a group we may not signal: logged as permission denied).

:func:`end_stale_runs` does the same for a batch of jobs, signalling the runs to end together
(SIGTERM to all, then one wait): the acquire thread waits one grace for a batch, not one a run
(:meth:`balsam.launcher.app_run.JobPreparer.end_stale_runs`, for a mode to call before it prepares
an acquired batch).

Limits: a run started by a process on another host (a serial worker rank's node, an earlier
allocation's head node) cannot be checked; processes that left the task's process group
(``setsid``; MPICH's ranks under ``mpiexec``: they get the SIGTERM ``mpiexec`` passes on) are not
reached directly; the spawner records a run ``RECORD_AFTER_SEC`` (0.2 s) after its start, only if
it still runs then (a run can meet its rerun only if it outlives the Session's expiry; recording
every spawn cost the spawner ~10 us a task), so a launcher and spawners killed within 0.2 s of a
task's start leave it without one.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Union

from ..util import JOB_OUTPUT_NAME
from .spawner import (
    RUN_RECORD_LINK,
    RUN_RECORD_XATTR,
    boot_id,
    group_exists,
    node_clock,
    pid_namespace,
    process_identity,
    this_host,
)

logger = logging.getLogger(__name__)

#: Grace between the SIGTERM and the SIGKILL of a stale run's process group (as the spawner's
#: ``LEFTOVER_GRACE_SEC``).
STALE_RUN_GRACE_SEC = 5.0
#: How far the start of a live process may lie after the recorded start (read just before the
#: spawn) and still be the recorded run: the spawn itself (microseconds), a busy CPU. A process
#: started later with the same pid is another one.
START_SLACK_SEC = 0.5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: getxattr errors after which the link is looked at: the file system has no user extended
#: attributes. Not ENODATA (job.out has none: the usual first run): the writer tries the attribute
#: for every record (RunRecords.write), so on a file system that has them the record is one; a
#: readlink there too would cost every job's first run 2 us more (4.5 us instead of 2.5).
_TRY_LINK = frozenset(e for e in (getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None))
                      if e is not None)


class RunRecord(NamedTuple):
    host: str
    pid: int
    started: float
    owner: str
    #: The job it runs, the writer's pid namespace and boot (None: a version 1 record, without them).
    job_id: Optional[int] = None
    namespace: Optional[str] = None
    boot: Optional[str] = None

    @classmethod
    def parse(cls, text: Union[str, bytes]) -> Optional["RunRecord"]:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        words = text.split()
        try:
            if len(words) == 8 and words[0] == "2":
                return cls(words[1], int(words[2]), float(words[3]), words[4], int(words[5]), words[6], words[7])
            if len(words) == 5 and words[0] == "1":
                return cls(words[1], int(words[2]), float(words[3]), words[4])
        except ValueError:
            pass
        return None


class StaleRun(NamedTuple):
    """What :func:`end_stale_run` found: ``kind`` is ``"elsewhere"`` (another host's run, or one of
    another pid namespace or boot of this one: not checked), ``"unverifiable"`` (a record of an
    earlier format, without the job, pid namespace and boot: not acted on), ``"other_job"`` (the
    record is another job's: a workdir two jobs share), ``"gone"`` (not running),
    ``"looked_after"`` (running, its starter alive: left alone), ``"ended"`` (running with nobody
    to end it: ended), ``"survived"`` (ended, and still there after the SIGKILL: in D state) or
    ``"denied"`` (running with nobody to end it, and not ours to signal: another user's)."""

    kind: str
    record: RunRecord


def read_run_record(workdir: Union[str, Path]) -> Optional[RunRecord]:
    """The record of the last run started in ``workdir``, or None (none: the job's first run)."""
    if hasattr(os, "getxattr"):
        try:
            return RunRecord.parse(os.getxattr(os.path.join(workdir, JOB_OUTPUT_NAME), RUN_RECORD_XATTR))
        except OSError as exc:
            if exc.errno not in _TRY_LINK:
                return None  # ENOENT: no job.out
    try:  # a file system without user extended attributes: the starter wrote a link
        return RunRecord.parse(os.readlink(os.path.join(workdir, RUN_RECORD_LINK)))
    except OSError:
        return None  # the job's first run (the usual case)


def _stat(pid: int) -> "tuple[str, int, int, int] | None":
    """``(state, process group, session, start in clock ticks)`` of ``pid``, or None."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[2]), int(fields[3]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _members(pgid: int) -> "list[tuple[int, tuple[str, int, int, int]]] | None":
    """The live (not zombie) members of process group ``pgid`` and their :func:`_stat` (None: no
    ``/proc`` to scan). Scans ``/proc`` only while the group exists: the rare path of a run that
    outlived its starter."""
    if not group_exists(pgid):
        return []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    found = []
    for entry in entries:
        if entry.isdecimal():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                found.append((int(entry), stat))
    return found


def _group_live(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie (zombies of a killed
    spawner's tasks wait for whoever adopted them to reap them)."""
    members = _members(pgid)
    return members is None or bool(members)


def _runs_job(pid: int, job_id: int) -> bool:
    """Whether process ``pid`` was started with ``BALSAM_JOB_ID=<job_id>`` (the launcher sets it
    for every task; a child inherits it)."""
    try:
        with open(f"/proc/{int(pid)}/environ", "rb") as fh:
            return f"BALSAM_JOB_ID={int(job_id)}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _alive_as_recorded(record: RunRecord) -> "str | None":
    """Whether the recorded run still runs: ``"leader"``: its first process is there and is that
    run (the same start, on the same clock, within the slack; still the leader of its process
    group; a zombie no one has reaped yet counts), and its process group has a live member;
    ``"group"``: its first process is gone (killed with the launcher: ``pkill -9 -f balsam``
    matches a ``.balsam_command.N.sh`` leader) but its process group lives on: Linux gives no new
    process the pid of a process group that still exists, and a live member is in the session the
    run's first process made, started after it, and runs the job (its ``BALSAM_JOB_ID``); None:
    not running."""
    stat = _stat(record.pid)
    if stat is not None:
        state, pgrp, _session, ticks = stat
        start = ticks / _CLOCK_TICKS
        if pgrp != record.pid or not record.started - 0.05 <= start <= record.started + START_SLACK_SEC:
            return None
        return "leader" if _group_live(record.pid) else None
    if record.job_id is None:
        return None
    for pid, (_state, _pgrp, session, ticks) in _members(record.pid) or ():
        if session == record.pid and ticks / _CLOCK_TICKS >= record.started - 0.05 and _runs_job(pid, record.job_id):
            return "group"
    return None


def _owner_alive(owner: str) -> bool:
    pid, _, _ = owner.partition(":")
    try:
        return process_identity(int(pid)) == owner and (_stat(int(pid)) or ("Z",))[0] not in ("Z", "X")
    except ValueError:
        return False


def _check(job_id: int, workdir: Union[str, Path]) -> "tuple[RunRecord | None, StaleRun | None, str]":
    """``(record, verdict, how)``: the verdict when nothing is to be ended; else None, and how the
    run was found alive (:func:`_alive_as_recorded`)."""
    record = read_run_record(workdir)
    if record is None:
        return None, None, ""
    if record.host != this_host():
        logger.warning("job %s: its workdir %s records a run started on host %s (pid %d) that may still be running "
                       "there; it cannot be checked from %s, and the job runs again", job_id, workdir, record.host,
                       record.pid, this_host())
        return record, StaleRun("elsewhere", record), ""
    if record.job_id is None:
        logger.info("job %s: its workdir %s holds a run record of an earlier format (pid %d): not checked", job_id,
                    workdir, record.pid)
        return record, StaleRun("unverifiable", record), ""
    if record.namespace != pid_namespace() or record.boot != boot_id():
        # Another pid namespace (a container with this host's name) or an earlier boot: its pid,
        # start and owner name other processes here. Never signalled.
        logger.warning("job %s: its workdir %s records a run (pid %d) started on this host in another pid namespace "
                       "(a container) or an earlier boot; it cannot be checked from here, and the job runs again",
                       job_id, workdir, record.pid)
        return record, StaleRun("elsewhere", record), ""
    if record.job_id != int(job_id):
        logger.info("job %s: its workdir %s records a run of job %s (a workdir the two share): left alone", job_id,
                    workdir, record.job_id)
        return record, StaleRun("other_job", record), ""
    how = _alive_as_recorded(record)
    if how is None:
        return record, StaleRun("gone", record), ""
    if _owner_alive(record.owner):
        return record, StaleRun("looked_after", record), ""
    return record, None, how


def _announce(job_id: int, workdir: Union[str, Path], record: RunRecord, how: str, grace: float) -> None:
    age = max(0.0, node_clock() - record.started)
    logger.warning("job %s: a run of it started %.0f s ago by a process that is gone (%s) still runs in its workdir %s "
                   "(pid %d%s): ending its process group before the job runs again (SIGTERM, SIGKILL after %g s)",
                   job_id, age, record.owner, workdir, record.pid,
                   ", whose first process is gone; the rest of its group lives on" if how == "group" else "", grace)


def _report(job_id: int, record: RunRecord, kind: str) -> StaleRun:
    if kind == "ended":
        logger.warning("job %s: its earlier run (pid %d) has ended", job_id, record.pid)
    elif kind == "denied":
        logger.error("job %s: its earlier run (pid %d) cannot be ended: permission denied (another user's processes); "
                     "the job runs again beside it", job_id, record.pid)
    else:
        logger.error("job %s: its earlier run (pid %d) is still there after SIGKILL (in D state?); the job runs again "
                     "beside it", job_id, record.pid)
    return StaleRun(kind, record)


def end_stale_run(job_id: int, workdir: Union[str, Path], grace: float = STALE_RUN_GRACE_SEC) -> Optional[StaleRun]:
    """End the job's earlier run if it still runs on this host with nobody to end it (see the
    module's docstring). Returns what was found (None: no record). Blocks up to ``grace`` + 1 s only
    when it ends a run."""
    record, verdict, how = _check(job_id, workdir)
    if record is None or verdict is not None:
        return verdict
    _announce(job_id, workdir, record, how, grace)
    return _report(job_id, record, _end_groups({record.pid: record}, grace)[record.pid])


def end_stale_runs(jobs: Iterable[tuple[int, Union[str, Path]]],
                   grace: float = STALE_RUN_GRACE_SEC) -> "dict[int, Optional[StaleRun]]":
    """:func:`end_stale_run` for each ``(job id, workdir)`` of a batch, the runs to end signalled
    together: SIGTERM to every one first, then one wait of at most ``grace`` for them all, then
    SIGKILL to those left (k runs that trap SIGTERM hold the batch ``grace`` once, not k times).
    Returns job id -> what was found."""
    found: dict = {}
    ending: dict = {}
    for job_id, workdir in jobs:
        record, verdict, how = _check(job_id, workdir)
        found[job_id] = verdict
        if record is not None and verdict is None and record.pid not in ending:
            _announce(job_id, workdir, record, how, grace)
            ending[record.pid] = (job_id, record)
    if ending:
        outcome = _end_groups({pgid: rec for pgid, (_, rec) in ending.items()}, grace)
        for pgid, (job_id, record) in ending.items():
            found[job_id] = _report(job_id, record, outcome[pgid])
    return found


def _end_groups(groups: "dict[int, RunRecord]", grace: float) -> "dict[int, str]":
    """SIGTERM to each process group, SIGKILL after ``grace`` to those not empty by then; pgid ->
    ``"ended"`` (empty, at most 1 s after the SIGKILL), ``"survived"`` or ``"denied"`` (EPERM)."""
    outcome: dict = {}
    live = set(groups)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for pgid in list(live):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                outcome[pgid] = "ended"
                live.discard(pgid)
            except PermissionError:
                outcome[pgid] = "denied"
                live.discard(pgid)
        deadline = time.monotonic() + wait
        while live:
            live = {pgid for pgid in live if _group_live(pgid)}
            if not live or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for pgid in groups:
            if pgid not in live and pgid not in outcome:
                outcome[pgid] = "ended"
        if not live:
            break
    for pgid in live:
        outcome[pgid] = "survived"
    return outcome
