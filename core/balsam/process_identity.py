"""Which process a pid names: a pid and its start time identify one process (a pid given to another
process since is not it), and ending a list of processes with a grace.

Kept apart from :mod:`balsam.util` so that short-lived commands that only need these (the local
scheduler's queue command, which the site agent runs every ``sync_period``) do not import the
logging set-up and the rest of the utilities: each such command's start-up is CPU the agent spends
every cycle. psutil is imported where it is used, as before.
"""

from __future__ import annotations

from typing import Optional

#: Two readings of one process's start time differ by clock-tick rounding only (psutil reads it
#: from ``/proc/<pid>/stat`` in clock ticks since boot, and the boot time is itself rounded).
START_TIME_TOLERANCE_SEC = 0.5


def process_start_time(pid: int, running: bool = False) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch, psutil's ``create_time``), or None if
    there is no such process (or, with ``running``, it is a zombie: it has exited). With the pid it
    names one process: a recycled pid started later."""
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
