"""Which process a pid names: a pid and its start time identify one process (a pid given to another
process since is not it), and ending a list of processes with a grace.

Kept apart from :mod:`balsam.util` so that short-lived commands that only need these (the local
scheduler's queue command, which the site agent runs every ``sync_period``) do not import the
logging set-up and the rest of the utilities: each such command's start-up is CPU the agent spends
every cycle. On Linux a process's start time is read from ``/proc`` directly (the way psutil reads
it, to the same value): importing psutil was a third of that command's CPU beyond the interpreter's
start-up. psutil answers elsewhere, and ends processes (:func:`terminate_processes`).
"""

from __future__ import annotations

import os
import sys

# typing only for the annotations (postponed by the __future__ import): importing it costs a
# command run every sync_period ~3 ms of CPU. Type checkers take the name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

#: Two readings of one process's start time differ by clock-tick rounding only (psutil reads it
#: from ``/proc/<pid>/stat`` in clock ticks since boot, and the boot time is itself rounded).
START_TIME_TOLERANCE_SEC = 0.5

_PROCFS = sys.platform.startswith("linux")
_clock_ticks: Optional[int] = None


class _NoProcfs(Exception):
    """/proc cannot answer (not Linux, or not Linux's /proc: not mounted, another format): psutil's turn."""


def _procfs_state(pid: int) -> Optional[tuple[float, bool]]:
    """(start time, zombie) of ``pid`` from ``/proc/<pid>/stat``, None if there is no such process.

    The start time is psutil's ``create_time`` on Linux, computed as psutil 7 (the one installed)
    does: field 22 (clock ticks since boot) over ``SC_CLK_TCK`` plus the ``btime`` of /proc/stat,
    both read now, so it is the value psutil gives (and older versions stored in records), to the
    bit (tests/site/test_localq_status_cost.py compares them). psutil 6 read btime once per process:
    the same value unless the clock was stepped in between."""
    global _clock_ticks
    if not _PROCFS:
        raise _NoProcfs
    try:
        path = f"/proc/{pid:d}/stat"  # ("-1" names no file)
    except (TypeError, ValueError) as exc:  # not an integer: psutil says what it says of that
        raise _NoProcfs from exc
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it exited while being read
        return None
    except OSError as exc:
        raise _NoProcfs from exc
    try:
        # The name (field 2) is in parentheses and may hold spaces and ")": the fields after it
        # follow the last ")". fields[0] is the state (field 3), fields[19] the start (field 22).
        fields = data[data.rindex(b")") + 2:].split()
        ticks = float(fields[19])
        if _clock_ticks is None:
            _clock_ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat", "rb") as fh:  # read each time, as psutil does: it follows clock steps
            boot = next(float(line.split()[1]) for line in fh if line.startswith(b"btime"))
    except Exception as exc:
        raise _NoProcfs from exc
    return ticks / _clock_ticks + boot, fields[0] == b"Z"


def process_state(pid: int) -> Optional[tuple[float, bool]]:
    """(start time, whether it is a zombie) of process ``pid`` from one reading, None if there is no
    such process: what :func:`process_start_time` tells, and whether its ``running`` refuses it."""
    try:
        return _procfs_state(pid)
    except _NoProcfs:
        pass
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.create_time(), proc.status() == psutil.STATUS_ZOMBIE
    except Exception:  # psutil.Error (gone, not ours to read), or no psutil at all
        return None


def process_start_time(pid: int, running: bool = False) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch, psutil's ``create_time``), or None if
    there is no such process (or, with ``running``, it is a zombie: it has exited). With the pid it
    names one process: a recycled pid started later."""
    try:
        state = _procfs_state(pid)
    except _NoProcfs:
        pass
    else:
        return None if state is None or (running and state[1]) else state[0]
    try:
        import psutil

        proc = psutil.Process(pid)
        if running and proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except Exception:  # psutil.Error (gone, not ours to read), or no psutil at all
        return None


def same_process(pid: int, start_time: Optional[float] = None, running: bool = True) -> bool:
    """Whether ``pid`` is (still) the process that started at ``start_time``: it exists (with
    ``running``, the default, and is not a zombie) and its start time is within
    :data:`START_TIME_TOLERANCE_SEC` of ``start_time`` (a later process given the same pid is not
    it). Without ``start_time``, whether ``pid`` exists at all. The one rule for every record of a
    pid: the site agent's pid file (``site stop``, and the agent's process group it ends), the rsync
    backend's records of its running rsyncs, the embedded server's server.pid (dated by
    server.json) and the local scheduler's records of its batch jobs."""
    started = process_start_time(pid, running)
    if started is None:
        return False
    return start_time is None or abs(started - start_time) <= START_TIME_TOLERANCE_SEC


def terminate_processes(procs: list, grace_sec: float = 3.0) -> list[int]:
    """SIGTERM ``procs`` (``psutil.Process`` objects), SIGKILL the ones left after ``grace_sec``;
    returns their pids. Processes already gone are skipped."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace_sec)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_sec)
    return [proc.pid for proc in procs]
