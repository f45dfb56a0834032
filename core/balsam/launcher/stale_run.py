"""A job's earlier run that nobody ends any more, found and ended before the job runs again.

The fault: ``kill -9`` of a launcher *and* of its spawner processes (every balsam process of an
allocation, the OOM killer) leaves the tasks they started running: each task is in a session of
its own, and only the spawner would have ended it. The Session expires, the job is RUN_TIMEOUT and
re-queued (or, never reported RUNNING, simply freed), and the next launcher on that host (the next
BatchJob of the allocation, a restarted launcher) ran it again in the same workdir while the first
run still wrote there: two runs of one job at once.

Whoever starts a task records the run on its ``job.out`` (:class:`balsam.launcher.spawner.RunRecords`:
host, pid = process group, start on CLOCK_BOOTTIME, the identity of the process that reaps it).
When a launcher prepares a job (:meth:`balsam.launcher.app_run.JobPreparer.prepare`, in the acquire
thread of either mode, never the loop) it calls :func:`end_stale_run` on the workdir:

- no record (the job's first run: one ``getxattr`` that fails, ~3 us with the Python around it): nothing;
- a record of another host: logged at WARNING as not verifiable from here; the job runs;
- a run no longer alive, or whose pid now names another process (its start differs from the
  recorded one by more than :data:`START_SLACK_SEC`, or it no longer leads its process group):
  nothing;
- a run alive whose starter (spawner, or launcher without one) is alive: it is looked after (this
  launcher's own copy, which ``balsam.launcher.gone`` ends; a rank of this launcher): left alone;
- a run alive whose starter is gone: logged at WARNING, its process group gets SIGTERM, then
  SIGKILL after :data:`STALE_RUN_GRACE_SEC` unless the group is empty by then, and the job starts
  only after that.

Limits: a run started by a process on another host (a serial worker rank's node, an earlier
allocation's head node) cannot be checked; processes that left the task's process group
(``setsid``) are not reached; the spawner records a run ``RECORD_AFTER_SEC`` (0.2 s) after its
start, only if it still runs then (a run can meet its rerun only if it outlives the Session's
expiry; recording every spawn cost the spawner ~10 us a task), so a launcher and spawners killed
within 0.2 s of a task's start leave it without one.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple, Optional, Union

from ..util import JOB_OUTPUT_NAME
from .spawner import (
    RUN_RECORD_LINK,
    RUN_RECORD_VERSION,
    RUN_RECORD_XATTR,
    group_exists,
    node_clock,
    proc_stat,
    process_identity,
    this_host,
)

logger = logging.getLogger(__name__)

#: Grace between the SIGTERM and the SIGKILL of a stale run's process group (as the spawner's
#: ``LEFTOVER_GRACE_SEC``).
STALE_RUN_GRACE_SEC = 5.0
#: How far the start of a live process may lie after the recorded start (read just before the
#: spawn) and still be the recorded run: the spawn itself, a busy CPU. A process started later with
#: the same pid is another one.
START_SLACK_SEC = 2.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_NO_RECORD = frozenset(e for e in (errno.ENODATA if hasattr(errno, "ENODATA") else None, errno.ENOENT,
                                   errno.ENOTDIR) if e is not None)
_UNSUPPORTED = frozenset(e for e in (getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None))
                         if e is not None)


class RunRecord(NamedTuple):
    host: str
    pid: int
    started: float
    owner: str

    @classmethod
    def parse(cls, text: Union[str, bytes]) -> Optional["RunRecord"]:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        words = text.split()
        if len(words) != 5 or words[0] != RUN_RECORD_VERSION:
            return None
        try:
            return cls(words[1], int(words[2]), float(words[3]), words[4])
        except ValueError:
            return None


class StaleRun(NamedTuple):
    """What :func:`end_stale_run` found: ``kind`` is ``"elsewhere"`` (another host's run, not
    checked), ``"gone"`` (not running), ``"looked_after"`` (running, its starter alive: left alone),
    ``"ended"`` (running with nobody to end it: ended) or ``"survived"`` (ended, and still there after
    the SIGKILL: in D state)."""

    kind: str
    record: RunRecord


def read_run_record(workdir: Union[str, Path]) -> Optional[RunRecord]:
    """The record of the last run started in ``workdir``, or None (none: the job's first run)."""
    if hasattr(os, "getxattr"):
        try:
            return RunRecord.parse(os.getxattr(os.path.join(workdir, JOB_OUTPUT_NAME), RUN_RECORD_XATTR))
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                return None  # ENODATA: never run (the usual case); ENOENT: no job.out
    try:  # a file system without user extended attributes: the spawner wrote a link
        return RunRecord.parse(os.readlink(os.path.join(workdir, RUN_RECORD_LINK)))
    except OSError:
        return None


def _alive_as_recorded(record: RunRecord) -> bool:
    """Whether the recorded run still runs: its first process is there and is that run (the same
    start, on the same clock, within the slack; still the leader of its process group; a zombie
    no one has reaped yet counts), and its process group has a live member."""
    stat = proc_stat(record.pid)
    if stat is None:
        return False
    _state, pgrp, ticks = stat
    start = ticks / _CLOCK_TICKS
    if pgrp != record.pid or not record.started - 0.05 <= start <= record.started + START_SLACK_SEC:
        return False
    return _group_live(record.pid)


def _group_live(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie (zombies of a killed
    spawner's tasks wait for whoever adopted them to reap them). Scans ``/proc`` only while the
    group exists: the rare path of a run that outlived its starter."""
    if not group_exists(pgid):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if entry.isdecimal():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                return True
    return False


def _owner_alive(owner: str) -> bool:
    pid, _, _ = owner.partition(":")
    try:
        return process_identity(int(pid)) == owner and (proc_stat(int(pid)) or ("Z",))[0] not in ("Z", "X")
    except ValueError:
        return False


def end_stale_run(job_id: int, workdir: Union[str, Path], grace: float = STALE_RUN_GRACE_SEC) -> Optional[StaleRun]:
    """End the job's earlier run if it still runs on this host with nobody to end it (see the
    module's docstring). Returns what was found (None: no record). Blocks up to ``grace`` + 1 s only
    when it ends a run."""
    record = read_run_record(workdir)
    if record is None:
        return None
    if record.host != this_host():
        logger.warning("job %s: its workdir %s records a run started on host %s (pid %d) that may still be running "
                       "there; it cannot be checked from %s, and the job runs again", job_id, workdir, record.host,
                       record.pid, this_host())
        return StaleRun("elsewhere", record)
    if not _alive_as_recorded(record):
        return StaleRun("gone", record)
    if _owner_alive(record.owner):
        return StaleRun("looked_after", record)
    age = max(0.0, node_clock() - record.started)
    logger.warning("job %s: a run of it started %.0f s ago by a process that is gone (%s) still runs in its workdir %s "
                   "(pid %d): ending its process group before the job runs again (SIGTERM, SIGKILL after %g s)",
                   job_id, age, record.owner, workdir, record.pid, grace)
    kind = "ended" if _end_group(record.pid, grace) else "survived"
    if kind == "ended":
        logger.warning("job %s: its earlier run (pid %d) has ended", job_id, record.pid)
    else:
        logger.error("job %s: its earlier run (pid %d) is still there after SIGKILL (in D state?); the job runs again "
                     "beside it", job_id, record.pid)
    return StaleRun(kind, record)


def _end_group(pgid: int, grace: float) -> bool:
    """SIGTERM to process group ``pgid``, SIGKILL after ``grace`` unless it is empty by then; True
    once it is empty (at most 1 s after the SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + wait
        while _group_live(pgid):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        else:
            return True
    return not _group_live(pgid)
