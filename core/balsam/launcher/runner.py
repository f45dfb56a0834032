"""Pieces shared by the job modes: launch environment, status reports, a pool of local processes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import ChainMap, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from balsam.platform import LaunchSpec, is_mig_id
from balsam.states import JobState

from ..util import api_text, env_number, first_warning, format_threads_cpu, tail_file, threads_cpu_seconds
from . import spawner
from .app_run import (JOB_OUTPUT_NAME, PLATFORM_VARIABLES, AppProcess, PreparedJob, direct_argv, inherited_environment,
                      shell_argv)
from .node_manager import Placement

logger = logging.getLogger(__name__)


def _launch_hook() -> Any:
    from balsam.plugins.manager import get_plugin_manager

    return get_plugin_manager().hook.balsam_launch_environment


def launch_environment(prepared: PreparedJob, placement: Placement, platform: Any, hook: Any = None) -> dict[str, str]:
    """The job's environment with the platform's GPU visibility, then the plugins' adjustments.

    The platform's variables (``Platform.job_environment``: those of ``gpu_environment`` for the
    job's GPU ids, and any the platform sets for every job) replace the app's own, with one warning
    naming them (and so are the variables a job on whole nodes gets on its MPI line,
    ``Platform.whole_node_environment``, which its environment does not hold: the ranks get them
    from the line). A job with a shell preamble also gets their names in
    :data:`~balsam.launcher.app_run.PLATFORM_VARIABLES`, so that its shell line sets them again
    after the preamble (:func:`~balsam.launcher.app_run.shell_line`)."""
    env = dict(prepared.env)
    gpu_ids = placement.gpu_ids[0] if placement.gpu_ids else ()
    job_environment = getattr(platform, "job_environment", None)
    if job_environment is not None:
        platform_env = job_environment(list(gpu_ids))
    else:  # a platform object without the Platform base class (gpu_environment only)
        platform_env = platform.gpu_environment(list(gpu_ids)) if gpu_ids else {}
    # A job on whole nodes without GPU ids (multi-node) gets its GPU variables on its MPI line
    # (Platform.whole_node_environment), over the app's own in every rank: named in the same warning.
    on_line = _whole_node_environment(prepared, placement, platform) if not gpu_ids and len(placement.hostnames) > 1 else {}
    if platform_env or on_line:
        platform_env = {str(k): str(v) for k, v in platform_env.items()}
        _warn_replaced(prepared, env, platform_env, on_line)
        env.update(platform_env)
        if prepared.preamble and prepared.preamble.strip():
            names = [k for k in platform_env if k.isidentifier() and k.isascii()]
            if names:
                env[PLATFORM_VARIABLES] = " ".join(names)
    threads_per_core = prepared.demand.threads_per_core
    cap = getattr(platform, "hardware_threads_per_core", 0) or 0
    if cap and threads_per_core > cap and getattr(platform, "cpu_ids_are_cores", False):
        app = _app_of(prepared)
        if first_warning((app, "threads_per_core", threads_per_core, cap)):
            logger.warning("job %s: threads_per_core=%d is more than the %d hardware threads of a core on this machine: "
                           "it is placed, bound and pinned at threads_per_core=%d (%d cores per node); the same for "
                           "every job of %s with threads_per_core=%d (warned once)", prepared.id, threads_per_core, cap, cap,
                           prepared.demand.cpu_ids_per_node(True, cap), _app_name(app), threads_per_core)
    if gpu_ids:
        if prepared.demand.ranks_per_node > 1 and len(gpu_ids) > 1 and any(map(is_mig_id, gpu_ids)):
            # CUDA shows a process the first MIG instance it is given: without narrowing, every rank
            # of the job runs on the same one.
            logger.warning("job %s: its %d ranks per node get one CUDA_VISIBLE_DEVICES of %d ids with MIG instances: "
                           "each rank uses the first unless the command narrows it per rank (gpu_per_rank.sh in "
                           "docs/platforms/polaris.md)", prepared.id, prepared.demand.ranks_per_node, len(gpu_ids))
    env.setdefault("OMP_NUM_THREADS", str(prepared.demand.threads_per_rank))
    hook = hook or _launch_hook()
    implementations = getattr(hook, "get_hookimpls", None)
    if implementations is not None and not implementations():
        return env  # no plugin implements the hook: nothing can have put in a non-string
    hook(job=prepared.job, env=env, node_hostnames=list(placement.hostnames))
    # Hooks may put in non-strings; the common case (none did) costs no second copy. The check
    # runs over the whole environment for every job while any plugin implements the hook: at C
    # level (map over the types) rather than a generator of ``type(k) is str and ...`` (2.0 us
    # against 2.8 for 44 variables; the gap grows with the environment, hundreds of variables on
    # a login node with modules loaded).
    if _STR_ONLY.issuperset(map(type, env)) and _STR_ONLY.issuperset(map(type, env.values())):
        return env
    return {str(k): str(v) for k, v in env.items()}


#: ``{str}``: a set of types holds only str (exactly, not a subclass) iff this is a superset of it.
_STR_ONLY = frozenset({str})




def _app_of(prepared: PreparedJob) -> Any:
    return getattr(prepared.job, "app_id", None)


def _app_name(app: Any) -> str:
    return "its app" if app is None else f"app {app}"


def _whole_node_environment(prepared: PreparedJob, placement: Placement, platform: Any) -> dict[str, str]:
    """``Platform.whole_node_environment`` of the job (what its MPI line sets in every rank); none
    from a platform object without the Platform base class."""
    whole_node_environment = getattr(platform, "whole_node_environment", None)
    if whole_node_environment is None:
        return {}
    d = prepared.demand
    spec = LaunchSpec(cmdline=prepared.cmdline, hostnames=placement.hostnames, ranks_per_node=d.ranks_per_node,
                      threads_per_rank=d.threads_per_rank, threads_per_core=d.threads_per_core,
                      gpus_per_rank=d.gpus_per_rank, cpu_ids=placement.cpu_ids, gpu_ids=placement.gpu_ids,
                      launch_params=prepared.launch_params, job_id=prepared.id, app_id=_app_of(prepared),
                      whole_nodes=placement.occupancy >= 1.0 - 1e-9)
    return {str(k): str(v) for k, v in (whole_node_environment(spec) or {}).items()}


def _warn_replaced(prepared: PreparedJob, env: dict[str, str], platform_env: dict[str, str],
                   on_line: Optional[dict[str, str]] = None) -> None:
    """A warning for the platform variables that replace the app's own (its
    ``environment_variables`` or ``get_environ_vars()``: those that differ from the launcher's
    environment), and one for ``launch_params`` that set them for the MPI launcher (PALS ``--env
    NAME=value``, ``srun --export``), whose value the ranks would get instead of the platform's:
    each once per app and value in this process (:func:`balsam.util.first_warning`), for every such job.
    ``on_line``: the variables the platform's MPI line sets in the ranks of a job on whole nodes
    (``Platform.whole_node_environment``), over both the app's and ``platform_env``; no launch
    params warning for them (no other job's GPUs are on the job's nodes)."""
    inherited = inherited_environment()
    given = {**platform_env, **on_line} if on_line else platform_env
    replaced = [k for k, v in given.items() if k in env and env[k] != v and inherited.get(k) != env[k]]
    if replaced:
        app = _app_of(prepared)
        if first_warning((app, "replaced", tuple((k, env[k]) for k in replaced))):
            # The job's own environment (its shell line: a command template's $ZE_AFFINITY_MASK)
            # keeps the app's value of a variable only the line sets.
            line_only = [k for k in replaced if on_line and k in on_line and k not in platform_env]
            where = (f" (set on its MPI launcher line for its ranks: the job has whole nodes; its command line "
                     f"itself still sees the app's {', '.join(line_only)})") if line_only else ""
            logger.warning("job %s: its app's %s %s replaced by the platform's GPU visibility variables: %s%s; the "
                           "same in every job of %s that sets %s (warned once)", prepared.id,
                           ", ".join(f"{k}={env[k]}" for k in replaced), "is" if len(replaced) == 1 else "are",
                           ", ".join(f"{k}={given[k]}" for k in replaced), where, _app_name(app),
                           "that value" if len(replaced) == 1 else "those values")
    if prepared.launch_params and platform_env:  # none: an empty pattern would match every "="
        pattern = re.compile(r"(?<![A-Za-z0-9_])(%s)=" % "|".join(map(re.escape, platform_env)))
        for key, value in prepared.launch_params.items():
            named = sorted(set(pattern.findall(f"{key} {value}")))
            if named and first_warning((_app_of(prepared), "launch_params", key, value)):
                logger.warning("job %s: launch_params %s=%r sets %s for the MPI launcher, over the value the platform "
                               "set for the GPUs this job was given: its ranks may use GPUs assigned to other jobs; "
                               "the same for every job of %s with that launch param (warned once)",
                               prepared.id, key, value, ", ".join(named), _app_name(_app_of(prepared)))


def env_difference(base: dict[str, str], env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``env`` as changes to ``base``: (the variables to set, the names to unset). What a spawner or
    a worker rank, which start from ``base``, needs to build ``env`` (runs for every task)."""
    get = base.get  # bound once: this runs over the whole environment for every task
    env_set = {k: v for k, v in env.items() if get(k) != v}
    env_unset = [] if base.keys() <= env.keys() else [k for k in base if k not in env]  # a C-level check first
    return env_set, env_unset


#: A file system with less than this left for users counts as full.
DISK_FULL_BYTES = 64 * 1024


def disk_full_note(path: Any) -> str:
    """"No space left on device: ..." when the file system holding ``path`` is full (blocks or
    inodes), else "". A job that dies on a full disk usually cannot write its own error anywhere."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    if st.f_blocks == 0:
        # A pseudo file system (/proc, /sys, /dev/pts): no blocks at all, never "full". Counted as
        # full, a job's line naming one paused its launcher.
        return ""
    free = st.f_bavail * st.f_frsize
    if free < DISK_FULL_BYTES:
        return f"No space left on device: the file system of {path} has {free} bytes free"
    if st.f_files and st.f_favail == 0:
        return f"No space left on device: the file system of {path} has no free inodes"
    return ""


class ErrorTail(str):
    """A failed run's error tail (:func:`finished_record`) that ended on a full workdir file system:
    ``disk_full`` is ``(workdir, note)``, the statvfs finished_record made of the job's own workdir.
    Carried beside the text, never read from it: a job that printed such a line itself (naming
    any file system) is not taken for one. A str, so every path that passes a tail on (Exit
    records, a worker rank's pickled report to the master) passes this too."""

    disk_full: Optional[tuple[str, str]] = None

    def __new__(cls, text: str, disk_full: Optional[tuple[str, str]] = None) -> "ErrorTail":
        tail = super().__new__(cls, text)
        tail.disk_full = disk_full
        return tail

    def __reduce__(self) -> Any:
        return (ErrorTail, (str(self), self.disk_full))


def with_note(tail: str, note: str) -> str:
    """``tail`` with ``note`` as a last line, keeping an :class:`ErrorTail`'s disk fact."""
    text = f"{tail}\n{note}" if tail.strip() else note
    full = getattr(tail, "disk_full", None)
    return ErrorTail(text, full) if full else text
#: While paused for a full disk, how often the launcher looks at that file system again.
DISK_RECHECK_SEC = 5.0


class DiskWait:
    """The launcher's pause while the file system of its jobs' workdirs is full.

    A run that ends nonzero on a full file system failed for the site's fault, not the job's (it
    could not write): reported RUN_ERROR, the default ``handle_error`` FAILED it, and a full
    ``data/`` failed the whole backlog in seconds. Such a run is reported RUN_TIMEOUT instead (the
    processing module's default ``handle_timeout`` makes it RESTART_READY: it runs again) and the
    launcher stops acquiring jobs until the file system has room again, looked at every
    :data:`DISK_RECHECK_SEC`. A launcher looks at its data directory before its first acquire
    (:meth:`watch`): one started on a still-full disk acquires nothing, idles and ends at its idle
    time. The jobs already leased and waiting to start when the disk filled still start (and end
    there, given back too). A job that fills the disk itself runs again once room is made, and
    pauses its launcher again each time it fills it: nothing bounds its give-backs. One WARNING when
    the pause starts, one INFO when it ends, and the BatchJob's ``status_info["disk_full"]`` set at
    each (:meth:`watch`'s ``on_change``: the launcher's note writer, in order, never blocking).
    Shared by the threads of the launcher process (the loop reports exits, the acquirer asks
    :meth:`paused`): under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.path: Optional[str] = None
        self.since: Optional[float] = None
        self._checked = 0.0
        self.given_back = 0
        self._on_change: Optional[Any] = None

    def watch(self, data_path: Any, on_change: Optional[Any] = None) -> None:
        """Before the first acquire: pause at once if ``data_path``'s file system is full (a new
        launcher would acquire, run onto the full disk and give back, again and again).
        ``on_change(message)`` is called once when a pause starts and once when it ends (the
        mode records it on its BatchJob: ``service_calls.note_batch_job``, which returns at once).
        It is called under the lock, so that a pause's message and its end's come in the order
        of the pause and its end (called after the lock, a pause's message could follow its end's
        from another thread); it must not block."""
        self._on_change = on_change
        note = disk_full_note(data_path)
        if note:
            self._pause(os.fspath(data_path), note, "no job is acquired")

    def note_full(self, path: str, note: str) -> None:
        with self._lock:
            self.given_back += 1
        self._pause(path, note, "runs ending there are given back (RUN_TIMEOUT, run again), and no more jobs are acquired")

    def _pause(self, path: str, note: str, what: str) -> None:
        with self._lock:
            self._checked = time.monotonic()
            if self.path is not None:
                return
            self.path, self.since = path, time.monotonic()
            if self._on_change is not None:
                self._on_change(f"paused at {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}: {note}; "
                                "no job is acquired until it has room")
        logger.warning("%s: %s until it has room (looked at every %g s)", note, what, DISK_RECHECK_SEC)

    def paused(self) -> bool:
        """Whether acquiring waits for room; looks at the full file system again when due."""
        if self.path is None:
            return False
        with self._lock:
            path = self.path
            if path is None or time.monotonic() - self._checked < DISK_RECHECK_SEC:
                return path is not None
            self._checked = time.monotonic()
        if disk_full_note(path):
            return True
        with self._lock:
            if self.path is None:
                return False
            since, given_back = self.since or time.monotonic(), self.given_back
            self.path, self.since, self.given_back = None, None, 0
            waited = time.monotonic() - since
            if self._on_change is not None:
                self._on_change(f"resumed at {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} after a "
                                f"{waited:.0f} s pause for a full disk ({path}; {given_back} runs given back)")
        logger.info("the file system of %s has room again (%d bytes free) after %.0f s: acquiring jobs again "
                    "(%d runs were given back meanwhile)", path, disk_free_bytes(path), waited, given_back)
        return False


#: The launcher process's :class:`DiskWait` (the disk is the same for every thread of it).
disk_wait = DiskWait()


def disk_free_bytes(path: Any) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def disk_full_exit(tail: str) -> Optional[tuple[str, str]]:
    """``(workdir, note)`` when ``tail`` is :func:`finished_record`'s :class:`ErrorTail` of a run
    that ended with its own workdir's file system full (that statvfs, not a second one), else None.
    What a job prints (a "No space left on device" line of its own, naming any path) is never it."""
    return getattr(tail, "disk_full", None)


def report_running(updater: Any, prepared: PreparedJob, when: Optional[float] = None) -> None:
    ts = dt.datetime.fromtimestamp(when, dt.timezone.utc) if when else None
    updater.put(prepared.id, JobState.running, state_timestamp=ts, state_data={"num_nodes": prepared.footprint})


def send_first_running(updater: Any) -> None:
    """Have the updater send the launcher's first RUNNING updates now, not after its batching
    interval: how soon a new launcher shows running jobs is what users watch. (``flush`` with no
    time to wait only wakes the updater's thread: at most one interval instead of two.)

    Also logs :func:`start_up_note` once: where the start-up's time went."""
    updater.flush(timeout=0)
    logger.info("%s", start_up_note())


def process_age_sec() -> Optional[float]:
    """Seconds since this process started (for a launcher that the job template execs: since its
    batch script started), to a clock tick; None without ``/proc`` (not Linux). The kernel's start
    time counts on CLOCK_BOOTTIME, so the boot time is read from that clock, not from
    ``/proc/stat``'s whole seconds (up to 1 s off)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # the name before ")" may hold spaces
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
        boot_clock = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return max(0.0, boot_clock - since_boot)


def start_up_note() -> str:
    """One line for the log at a launcher's first job start: how long after its process started,
    and how much CPU the process (all its threads) had spent by then, by thread.

    Why: on a busy node the start-up's wall time is mostly waiting for a CPU, not balsam's work
    (measured on a 2-CPU VM shared with other work: first start 0.40 s after the process started,
    with 0.20 s of CPU); the two side by side tell a slow start-up from a busy node."""
    age = process_age_sec()
    cpu = time.process_time()
    threads = threads_cpu_seconds()
    when = f"{age:.3f} s after this process started" if age is not None else "(process start time unknown)"
    share = f", {100 * cpu / age:.0f} % of that time" if age else ""
    # Threads that have ended (the early lease's) are no longer listed: their CPU is in the rest,
    # with /proc's rounding of each thread's (clock ticks, 10 ms here).
    ended = cpu - sum(seconds for _name, _n, seconds in threads)
    rest = f", the rest (ended threads, rounding) {ended:.2f} s" if threads and ended >= 0.005 else ""
    return (f"first job started {when}, with {cpu:.3f} s of CPU spent by this process{share} "
            f"(by thread: {format_threads_cpu(threads)}{rest})")


#: The start of the reason :class:`SpawnerPool` gives (with returncode -1) for each task of a
#: spawner process that died: the task's own exit was never seen.
SPAWNER_GONE = "the spawner process exited unexpectedly"


def lost_with_spawner(returncode: int, tail: str) -> bool:
    """Whether an exit is the one :class:`SpawnerPool` made up for a task of a spawner that died,
    or one a spawner refused to start after a stop signal reached it (``spawner.NOT_STARTED``):
    the job never ran to an end there. ``tail``: the reason, or an error tail whose last line it is
    (the job's output comes first: a task that wrote to its job.out before its spawner died)."""
    if returncode != -1:
        return False
    last = tail.rstrip("\n").rsplit("\n", 1)[-1]
    return last.startswith(SPAWNER_GONE) or last.startswith(spawner.NOT_STARTED)


def report_exit(updater: Any, job_id: int, returncode: int, tail: str, when: Optional[float] = None,
                postprocess: bool = False) -> None:
    """RUN_DONE or RUN_ERROR. ``postprocess`` (the job's app keeps the default postprocess, see
    :attr:`~balsam.launcher.app_run.PreparedJob.postprocess_on_exit`): a RUN_DONE is followed by
    POSTPROCESSED in the same call, which is all the processing module would have done.

    A task lost with its spawner process is RUN_TIMEOUT (run again), as any run the launcher lost
    (a worker rank, a node taken out, its own crash): its exit was never seen. It was RUN_ERROR -1,
    which the default ``handle_error`` made FAILED, also for a task that went on running (its
    spawner killed by a signal) and succeeded; a job's rerun on this host ends such a run first
    (``stale_run``). Decided here, where every mode's exits end (a serial worker rank's too)."""
    if lost_with_spawner(returncode, tail):
        if spawner.NOT_STARTED in tail:
            report_timeout(updater, job_id, f"{spawner.NOT_STARTED}; the job runs again")
        else:
            report_timeout(updater, job_id, f"{tail}; the job runs again (its task may still run until then: a later "
                                            "run of it on this host ends that first)")
        return
    full = disk_full_exit(tail) if returncode != 0 else None
    if full is not None:
        # The site's fault (the job could not write), not the job's: run again once there is room
        # (see DiskWait); never FAILED by the default handle_error.
        path, note = full
        disk_wait.note_full(path, note)
        logger.debug("job %s exited %s on a full disk: RUN_TIMEOUT, it runs again", job_id, returncode)
        report_timeout(updater, job_id, f"{note}; the run ended (exit code {returncode}) with no room to write: "
                                        "the job runs again once there is room")
        return
    ts = dt.datetime.fromtimestamp(when, dt.timezone.utc) if when else None
    if returncode == 0 and postprocess:
        stamp = (ts or dt.datetime.now(dt.timezone.utc)).isoformat()
        updater.put_updates([
            {"id": job_id, "state": JobState.run_done.value, "state_timestamp": stamp, "return_code": 0},
            {"id": job_id, "state": JobState.postprocessed.value, "state_timestamp": stamp},
        ])
    elif returncode == 0:
        updater.put(job_id, JobState.run_done, state_timestamp=ts, return_code=0)
    else:
        # api_text: the server refuses a NUL (or a lone surrogate) anywhere in an update, and a
        # refused RUN_ERROR left the job RUNNING until its session expired (then RUN_TIMEOUT, and
        # it ran again, forever). The tail is the job's own output; the reasons below may quote it.
        updater.put(job_id, JobState.run_error, state_timestamp=ts,
                    state_data={"returncode": returncode, "error": api_text(tail)}, return_code=returncode)


def report_timeout(updater: Any, job_id: int, reason: str) -> None:
    updater.put(job_id, JobState.run_timeout, state_data={"reason": api_text(reason)})


def report_failed(updater: Any, job_id: int, reason: str) -> None:
    updater.put(job_id, JobState.failed, state_data={"error": api_text(reason)})


class ChildReaper:
    """Collects the exits of the processes it is given, and of no others, the moment they happen.

    Each watched child gets a pidfd (Linux >= 5.3): a descriptor that becomes readable when that
    process exits and stays readable until it is reaped, so an exit that happened before
    :meth:`watch` was even called is still seen (level-triggered: an exit cannot be missed). One
    thread sleeps in ``epoll_wait`` on the pidfds plus a wake-up descriptor, reaps exactly the pid
    that became readable (``waitpid(pid)``, never "any child", so another owner's children and
    zombies are left alone and cannot starve ours), records the status and sets ``wake`` so the job
    mode's loop reacts at once.

    Thread contract: :meth:`watch` and :meth:`stop` are called by the owner's thread; the reaper
    thread only appends to :attr:`exited` (a deque the owner pops from: both ends are atomic). The
    pid -> process map is shared under ``_lock``. Where pidfds are missing (not Linux), the thread
    polls ``waitpid(pid, WNOHANG)`` on each watched pid every :data:`FALLBACK_POLL_SEC`.
    """

    FALLBACK_POLL_SEC = 0.002

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self.exited: deque[AppProcess] = deque()
        self._lock = threading.Lock()
        self._by_fd: dict[int, AppProcess] = {}  # pidfd -> process (pidfd mode)
        self._by_pid: dict[int, AppProcess] = {}  # pid -> process (fallback mode)
        self._stopped = False
        self._use_pidfd = hasattr(os, "pidfd_open") and hasattr(select, "epoll")
        if self._use_pidfd:
            self._epoll = select.epoll()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="child-reaper", daemon=True)
        self._thread.start()

    def _done(self, proc: AppProcess) -> None:
        self.exited.append(proc)
        self.wake.set()

    def watch(self, proc: AppProcess) -> None:
        proc.reaped_externally = True
        pid = proc.pid
        if pid is None or proc.returncode is not None:  # never started
            self._done(proc)
            return
        if not self._use_pidfd:
            with self._lock:
                self._by_pid[pid] = proc
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:  # ENOSYS (old kernel) or a pid already gone: reap it directly
            logger.debug("pidfd_open(%s): %s", pid, exc)
            self._reap(pid, proc)
            return
        with self._lock:
            self._by_fd[fd] = proc
            self._epoll.register(fd, select.EPOLLIN)

    def stop(self) -> None:
        self._stopped = True
        if self._use_pidfd:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _reap(self, pid: int, proc: AppProcess) -> None:
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else after all: the status is lost
            code = -1
        # Looked at right after the reap, while the leader's pid cannot name another group yet;
        # the owner's reap() ends what is left (see ProcessPool.reap).
        proc.group_left = spawner.group_exists(pid)
        proc.end_time = time.time()  # the exit's time for finished_record (not the pool's later reap)
        proc.mark_exited(code)
        self._done(proc)

    def _run(self) -> None:
        if not self._use_pidfd:
            return self._run_polling()
        try:
            while not self._stopped:
                try:
                    events = self._epoll.poll()
                except InterruptedError:
                    continue
                for fd, _mask in events:
                    if fd == self._wake_r:
                        continue
                    with self._lock:
                        proc = self._by_fd.pop(fd, None)
                        if proc is not None:
                            self._epoll.unregister(fd)
                    if proc is None:
                        continue
                    os.close(fd)
                    self._reap(proc.pid, proc)  # type: ignore[arg-type]
        finally:
            with self._lock:
                for fd in self._by_fd:
                    os.close(fd)
                self._by_fd.clear()
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run_polling(self) -> None:
        while not self._stopped:
            with self._lock:
                watched = list(self._by_pid.items())
            for pid, proc in watched:
                try:
                    done_pid, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done_pid, status = pid, -1 << 8
                if done_pid:
                    with self._lock:
                        self._by_pid.pop(pid, None)
                    proc.group_left = spawner.group_exists(pid)
                    proc.end_time = time.time()
                    proc.mark_exited(os.waitstatus_to_exitcode(status) if status >= 0 else -1)
                    self._done(proc)
            time.sleep(self.FALLBACK_POLL_SEC)


#: Exit statuses of a process ended by a signal a batch system sends when it ends an allocation
#: (scancel, qdel, the wall time): defined beside the spawner, which acts on them too.
STOP_SIGNAL_EXITS = spawner.STOP_SIGNAL_EXITS
#: The stop window. When a batch system ends an allocation (scancel, a requeue, a node set down,
#: the time limit) it signals every process of the job at once, and a job may die of that signal
#: before the launcher's own stop comes: on a Slurm test cluster the serial master's stop came up to
#: 1.5 s after its tasks had died of Slurm's SIGTERM (the signal reaches the master through the MPI
#: launcher). An exit by a stop signal (:data:`STOP_SIGNAL_EXITS`) that the launcher's stop follows
#: within this many seconds is the stop's doing: RUN_TIMEOUT, and the job runs again. 3 s: twice the
#: delay seen there; a longer window would delay by as much the report (and the reuse of the CPUs)
#: of every job killed while no stop comes (its user's ``kill``, the OOM killer's SIGKILL).
STOP_WINDOW_SEC = 3.0
#: How long such an exit is held back before it is reported as the job's own error (see ProcessPool):
#: the whole stop window, so that its RUN_ERROR is never even queued for the server while a stop
#: may still claim it (the status updater sends what it is given within 0.1 s: a RUN_ERROR put
#: there is as good as sent).
STOP_SIGNAL_HOLD_SEC = STOP_WINDOW_SEC


def ended_by_stop(
    returncode: int, ended: Optional[float], stop_time: Optional[float], *, reaped_after_stop: bool = False,
    signal_stop: bool = True,
) -> bool:
    """Whether an exit is the launcher's stop's doing (report RUN_TIMEOUT: the job runs again)
    rather than the job's own result. ``stop_time``: when the stop came (``time.time()``; None: no
    stop); ``ended``: when the task exited (same clock); ``signal_stop``: the stop was requested
    (a signal, a refused credential: something outside the launcher, which may have reached the
    jobs too), not the launcher's own wall-time or idle countdown.

    (a) an exit at or after the stop time, whatever its code (a wrapper that traps the stop's
    SIGTERM and exits 0). At a signal stop, also one reaped after it (``reaped_after_stop``) that
    ended at most :data:`STOP_WINDOW_SEC` before it: the batch system signals the jobs and the
    launcher at once, and its signal may reach a job (and its wrapper exit 0) up to 1.5 s before
    the launcher's stop is recorded, so such an exit 0 cannot be told from the stop's doing.
    (b) at a signal stop, an exit by a stop signal (:data:`STOP_SIGNAL_EXITS`) at most
    :data:`STOP_WINDOW_SEC` before it.
    Any other exit before the stop is the job's own result (RUN_DONE, RUN_ERROR): at a wall-time
    or idle stop nothing outside signalled the jobs, so an exit 0 the loop had not reaped yet is a
    finished computation, not to be run again. An exit with no end time: the stop's when reaped
    after a signal stop (the committed rule), else the job's."""
    if stop_time is None:
        return False
    if not ended:
        return reaped_after_stop and signal_stop
    if ended >= stop_time:
        return True
    if not signal_stop or stop_time - ended > STOP_WINDOW_SEC:
        return False
    return reaped_after_stop or returncode in STOP_SIGNAL_EXITS


def stopped_reason(reason: str, returncode: Optional[int] = None) -> str:
    """The RUN_TIMEOUT reason of a job the launcher's stop ended (``reason``: the stop's), with
    the exit it was seen to make, if any."""
    if returncode is None:
        return f"launcher stopped ({reason})"
    killed = signal_note(returncode)
    how = killed if killed else f"exit code {returncode}"
    return f"launcher stopped ({reason}); the job ended ({how}) as the launcher stopped: it runs again"

# Serial mode's quick-failure relaunch: Balsam 0.7's constants (its serial-mode ``Worker``:
# ``RETRY_CODES = [-11, 1, 255, 12345]``, ``RETRY_WINDOW = 20``, ``MAX_RETRY = 3``), with 0.7's rule:
# a task that exits with one of RETRY_CODES less than RETRY_WINDOW seconds after it (re)started is
# started again at once, on the same CPUs and GPUs (its placement is kept: the launcher's loop does not
# hear of the exit), up to MAX_RETRY times; then its exit is reported (RUN_ERROR). 12345 is a task that
# could not be started (spawner.SPAWN_FAILED); -11 a segmentation fault. Only pools made with
# ``relaunch_quick_failures`` (serial mode's) apply it: 0.7's mpi mode reported every non-zero exit.
# Read when a pool is made (the spawner gets them as an argument).
#: Exit codes of a quick failure worth a relaunch (Balsam 0.7's ``Worker.RETRY_CODES``).
RETRY_CODES = frozenset([-11, 1, 255, 12345])
#: Seconds from a task's (re)start within which such an exit is relaunched (0.7's ``Worker.RETRY_WINDOW``).
RETRY_WINDOW = 20.0
#: Most relaunches of one task (0.7's ``Worker.MAX_RETRY``: up to 4 runs in all).
MAX_RETRY = 3


def relaunch_rule() -> tuple[frozenset[int], float, int]:
    """``(codes, window_sec, max_relaunches)``: the module's constants as they are now."""
    return frozenset(RETRY_CODES), float(RETRY_WINDOW), int(MAX_RETRY)


def log_relaunch(job_id: int, returncode: int, seconds: float, count: int, most: int) -> None:
    logger.info("job %s exited %s after %.1f s: relaunching (%d of %d)", job_id, returncode, seconds, count, most)


def relaunch_note(count: int, returncode: int, rule: tuple[frozenset[int], float, int]) -> str:
    """What the RUN_ERROR of a task relaunched ``count`` times says about it (after its output tail)."""
    codes, window, _most = rule
    times = "once" if count == 1 else f"{count} times"
    listed = ", ".join(map(str, sorted(codes)))
    return (f"balsam: relaunched {times} (Balsam 0.7's serial-mode rule: exit code {listed} within {window:g} s "
            f"of the start); the last run exited {returncode}")


def _note_relaunches(finished: list[tuple[int, int, str, float]], relaunched: dict[int, int],
                     rule: tuple[frozenset[int], float, int]) -> list[tuple[int, int, str, float]]:
    """``finished`` with the relaunch note on the tail of the failures among the jobs in
    ``relaunched`` (whose entries are removed); a success after relaunches is logged."""
    out = []
    for record in finished:
        count = relaunched.pop(record[0], 0)
        if count:
            job_id, rc, tail, when = record
            if rc:
                note = relaunch_note(count, rc, rule)
                record = (job_id, rc, with_note(tail, note), when)
            else:
                logger.info("job %s finished after %d relaunch(es)", job_id, count)
        out.append(record)
    return out


def finished_record(proc: Any, error_tail_num_lines: int) -> tuple[int, int, str, float]:
    """``(job_id, returncode, error_tail, end_time)`` of an ended task (``proc``: ``job_id``,
    ``returncode``, ``workdir``, ``tail(n)``, optionally ``end_time``, else now); the tail only for
    a failure."""
    rc = proc.returncode if proc.returncode is not None else -1
    tail = ""
    if rc != 0:
        tail = proc.tail(error_tail_num_lines)
        full = disk_full_note(proc.workdir)
        if not full and not tail and not os.path.isdir(proc.workdir):
            # Removed while the job ran (by the job itself, or a purge): an empty error said nothing.
            tail = f"{JOB_OUTPUT_NAME} missing: workdir {os.fspath(proc.workdir)} no longer exists"
        killed = signal_note(rc)
        if killed:
            tail = f"{tail}\n{killed}" if tail.strip() else killed
        if full:
            # The job could not even write its error to job.out: say why (the last line). The
            # fact travels as ErrorTail.disk_full to report_exit (in the master, for a worker rank's
            # exit too): a run that ended on a full disk is given back, not failed. One line per
            # such exit (DiskWait stops the acquiring, logged once).
            logger.warning("job %s exited %s: %s", proc.job_id, rc, full)
            tail = ErrorTail(f"{tail}\n{full}" if tail.strip() else full, (os.fspath(proc.workdir), full))
    return (proc.job_id, rc, tail, getattr(proc, "end_time", None) or time.time())


def signal_note(returncode: int) -> str:
    """"killed by signal SIGKILL (9) (out of memory?)" for a returncode ``-N`` (Popen's: the
    process died of signal N), else "": a bare -9 told a user nothing. Not for -1: the pools'
    "status unknown" (a spawner gone, a status lost), far more often than a SIGHUP."""
    if returncode >= -1:
        return ""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    note = f"killed by signal {name} ({-returncode})"
    # The kernel's OOM killer (and a batch system's memory limit) kill with SIGKILL.
    return note + " (out of memory?)" if -returncode == signal.SIGKILL else note


def settle_exits(exited: Sequence[Any], running: dict[int, Any], held: dict[int, float],
                 error_tail_num_lines: int) -> list[tuple[int, int, str, float]]:
    """The pools' shared exit rule: ``exited`` tasks leave ``running`` as finished records, except
    exits by a termination signal, which wait in ``held`` (job id -> when noticed) for
    :data:`STOP_SIGNAL_HOLD_SEC` first (see :class:`ProcessPool`)."""
    now = time.monotonic()
    finished = []
    for proc in exited:
        # A spawner's exit reaped after the batch system's signal reached it (an app that saves its
        # state on SIGTERM and exits 1, or 0) is held as one by the signal: the stop that follows claims it.
        if proc.returncode in STOP_SIGNAL_EXITS or getattr(proc, "stop_signalled", False):
            held[proc.job_id] = now
        else:
            del running[proc.job_id]
            finished.append(finished_record(proc, error_tail_num_lines))
    for job_id, since in list(held.items()):
        if now - since >= STOP_SIGNAL_HOLD_SEC:
            del held[job_id]
            proc = running.pop(job_id)
            finished.append(finished_record(proc, error_tail_num_lines))
    return finished


class ProcessPool:
    """The processes this launcher process started.

    With ``wake`` (an Event), a :class:`ChildReaper` collects exits the moment they happen and sets
    ``wake``; without it, :meth:`reap` polls every running process.

    When a batch system ends an allocation it signals every process in it at once: the launcher and
    the jobs it runs. A job can then die of the signal a moment before the launcher's own stop ends
    it, and reporting that exit as RUN_ERROR would fail a job the allocation merely cut short (it
    must be RUN_TIMEOUT and run again). So an exit by a termination signal (:data:`STOP_SIGNAL_EXITS`)
    is held back for :data:`STOP_SIGNAL_HOLD_SEC`: if :meth:`terminate_all` comes in that time, the
    job is one of its victims; otherwise it is reported as the job's exit. A held process stays in
    ``running`` (it still holds its resources until reported).
    """

    def __init__(self, error_tail_num_lines: int, wake: Optional[threading.Event] = None, *,
                 sigpipe_ignored: bool = False, relaunch_quick_failures: bool = False) -> None:
        self.error_tail_num_lines = error_tail_num_lines
        #: The processes keep SIGPIPE ignored (MPI launchers: see :func:`local_pool`).
        self.sigpipe_ignored = sigpipe_ignored
        self.running: dict[int, AppProcess] = {}
        self.reaper = ChildReaper(wake) if wake is not None else None
        self.held: dict[int, float] = {}  # job id -> when its exit by a signal was noticed (monotonic)
        #: Serial mode's quick-failure relaunch (:data:`RETRY_CODES`), or None. With it, ``_requests``
        #: keeps each running task's start request and ``_relaunched`` how often it was started again.
        self.relaunch = relaunch_rule() if relaunch_quick_failures else None
        self._requests: dict[int, tuple[str, Any, dict[str, str], Sequence[int]]] = {}
        self._relaunched: dict[int, int] = {}
        #: Tasks ended on request (:meth:`end`): their groups until empty or SIGKILLed.
        self.ending = spawner.Ending()

    def __len__(self) -> int:
        return len(self.running)

    def job_ids(self) -> list[int]:
        """The running tasks' job ids; safe from any thread (``list()`` of a dict is one C call)."""
        return list(self.running)

    def end(self, job_ids: Sequence[int], grace_sec: float) -> None:
        """End these running tasks without waiting (SIGTERM to each group now, SIGKILL to what is
        left after ``grace_sec``, sent by later :meth:`reap` calls); never relaunched. Their exits
        come out of :meth:`reap` as any other."""
        for job_id in job_ids:
            # Always: the reaper thread may have seen a quick failure that reap() has not taken
            # yet, and that reap() would start it again (see _relaunched_now).
            self._requests.pop(job_id, None)
            proc = self.running.get(job_id)
            if proc is not None and proc.pid is not None and proc.returncode is None:
                self.ending.add(proc.pid, grace_sec)  # signalled only while it runs

    def start(self, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str], cpu_ids: Sequence[int] = ()) -> AppProcess:
        proc = AppProcess(job_id, shell_cmd, workdir, env, cpu_ids, sigpipe_ignored=self.sigpipe_ignored)
        self.running[job_id] = proc
        if self.relaunch is not None:
            self._requests[job_id] = (shell_cmd, workdir, env, cpu_ids)
        if self.reaper is not None:
            self.reaper.watch(proc)
        return proc

    def _relaunch_due(self, proc: AppProcess, rule: tuple[frozenset[int], float, int]) -> bool:
        """Whether the relaunch ``rule`` starts ``proc``'s task again after its exit."""
        codes, window, most = rule
        rc = proc.returncode
        if rc is None or rc not in codes or proc.job_id not in self._requests:
            return False
        if getattr(proc, "spawn_errno", None) in spawner.UNRETRYABLE_SPAWN_ERRNOS:
            return False  # the same command line would fail the same way
        # Judged at the exit (the reaper dates it), not when it is looked at: a stop's grace or a
        # loaded machine must not turn a relaunch into a reported failure.
        ended = getattr(proc, "end_time", None) or time.time()
        return ended - proc.start_time < window and self._relaunched.get(proc.job_id, 0) < most

    def _relaunched_now(self, proc: AppProcess, rule: tuple[frozenset[int], float, int]) -> bool:
        """Start ``proc``'s task again if the relaunch ``rule`` says so (it keeps its place in
        ``running`` and its resources); False to report the exit."""
        if not self._relaunch_due(proc, rule):
            return False
        rc, most = proc.returncode, rule[2]
        seconds = time.time() - proc.start_time
        count = self._relaunched.get(proc.job_id, 0)
        self._relaunched[proc.job_id] = count + 1
        log_relaunch(proc.job_id, rc, seconds, count + 1, most)
        self.start(proc.job_id, *self._requests[proc.job_id])
        return True

    def _finished(self, proc: AppProcess) -> tuple[int, int, str, float]:
        return finished_record(proc, self.error_tail_num_lines)

    def _exited_leaders(self) -> list[int]:
        """The running tasks (not held) whose leader has exited: a zombie (``waitid`` with
        ``WNOWAIT`` sees it and leaves it to the reaper thread), or already reaped by that thread."""
        exited = []
        for job_id, proc in self.running.items():
            if job_id in self.held or proc.pid is None:
                continue
            if proc.returncode is not None:
                exited.append(job_id)
                continue
            try:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    exited.append(job_id)
            except ChildProcessError:  # reaped by the reaper thread, not handed over yet
                exited.append(job_id)
        return exited

    def _exited_before_the_stop(self, job_ids: list[int], victims: list[int]) -> list[tuple[int, int, str, float]]:
        """The finished records of the tasks in ``job_ids`` (:meth:`_exited_leaders`, looked at
        before the stop's signal; their exits are collected by now), taken out of ``victims``,
        as :meth:`reap` would have reported them: an exit by a stop signal, and a quick failure
        the relaunch rule would have started again (the stop then ends that relaunch), stay
        victims, so an exit has one outcome whenever the reaper thread got to it."""
        rule = self.relaunch
        records = []
        for job_id in job_ids:
            proc = self.running.get(job_id)
            if proc is None or proc.returncode is None or proc.returncode in STOP_SIGNAL_EXITS:
                continue
            if rule is not None and self._relaunch_due(proc, rule):
                continue
            victims.remove(job_id)
            self._requests.pop(job_id, None)
            records.append(self._finished(proc))
        if records and self._relaunched and rule is not None:
            records = _note_relaunches(records, self._relaunched, rule)
        return records

    def reap(self) -> list[tuple[int, int, str, float]]:
        """Finished processes as ``(job_id, returncode, error_tail, end_time)`` (exits by a
        termination signal once they have been held :data:`STOP_SIGNAL_HOLD_SEC`)."""
        if self.ending.groups:
            self.ending.check()
        exited: list[AppProcess] = []
        if self.reaper is not None:
            queue = self.reaper.exited
            while queue:
                proc = queue.popleft()
                if proc.job_id in self.running:
                    exited.append(proc)
                    if proc.group_left:  # what the task left in its group is ended (spawner.reap)
                        self.ending.add(proc.pid, spawner.LEFTOVER_GRACE_SEC)  # type: ignore[arg-type]
        else:
            exited = [proc for job_id, proc in self.running.items() if job_id not in self.held and proc.poll() is not None]
            for proc in exited:
                if proc.pid is not None and spawner.group_exists(proc.pid):
                    self.ending.add(proc.pid, spawner.LEFTOVER_GRACE_SEC)
        rule = self.relaunch
        if rule is None:
            return settle_exits(exited, self.running, self.held, self.error_tail_num_lines)
        if exited:
            exited = [proc for proc in exited if not (proc.returncode and self._relaunched_now(proc, rule))]
        finished = settle_exits(exited, self.running, self.held, self.error_tail_num_lines)
        for record in finished:
            self._requests.pop(record[0], None)
        return _note_relaunches(finished, self._relaunched, self.relaunch) if self._relaunched else finished

    def terminate_all(self, grace_sec: float) -> tuple[list[int], list[tuple[int, int, str, float]]]:
        """SIGTERM every task's process group, SIGKILL every group still there after ``grace_sec``.

        Returns ``(ended_by_us, finished_on_their_own)``: a process that exits 0 before the signal
        lands still counts as done; one held after an exit by a termination signal is ended by us.

        A task is its process group (its leader's pid: each starts a session of its own), as in
        the spawner (:meth:`balsam.launcher.spawner.Spawner.stop_all`): the leader may die of the
        SIGTERM and leave children that ignore or handle it, so the wait ends early only when
        every group is empty, and the SIGKILL goes to each group still there, leader reaped or not
        (a group seen empty is not signalled again: its number may be reused).
        """
        finished = self.reap()
        victims = list(self.running)
        # Tasks whose leader had exited before the stop's signal but whose exit reap() did not
        # take: the reaper thread had not reaped it yet (under load its turn comes late) or had
        # not handed it over (recording the exit, removing the run's record). Those exits are the
        # tasks' own (an exit 0 before a wall-time stop is RUN_DONE, not a rerun). Looked at
        # before any signal, without reaping, so the reaper thread is never raced.
        exited_before = self._exited_leaders() if self.reaper is not None else []
        groups = {proc.pid for proc in self.running.values() if proc.pid is not None} | set(self.ending.groups)
        self.ending.groups.clear()
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_sec
        while groups and time.monotonic() < deadline:
            for proc in self.running.values():
                proc.poll()  # reaps a leader (the reaper thread does when there is one): no zombie
            groups = {pgid for pgid in groups if spawner.group_exists(pgid)}
            if groups:
                time.sleep(0.02)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        for proc in self.running.values():
            proc.wait(2.0)
        if exited_before:
            finished += self._exited_before_the_stop(exited_before, victims)
        self.running.clear()
        self.held.clear()
        self._requests.clear()
        self._relaunched.clear()
        if self.reaper is not None:
            self.reaper.exited.clear()
            self.reaper.stop()
        return victims, finished


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class SpawnedTask:
    """A task run by the spawner process: what the pool needs to report its exit."""

    __slots__ = ("job_id", "workdir", "outfile", "returncode", "end_time", "spawn_error", "script", "stop_signalled")

    def __init__(self, job_id: int, workdir: str, outfile: str) -> None:
        self.job_id = job_id
        self.workdir = workdir
        self.outfile = outfile
        #: The command-line script of a long line (``spawner.command_script``), else None: removed
        #: here if the spawner dies before it runs it.
        self.script: Optional[str] = None
        self.returncode: Optional[int] = None
        self.end_time: Optional[float] = None
        self.spawn_error = ""
        #: Reaped after a stop signal reached the spawner (the batch system's: it signals every
        #: process of the job): held as an exit by a stop signal (:func:`settle_exits`), whatever its code.
        self.stop_signalled = False

    def tail(self, num_lines: int) -> str:
        text = tail_file(self.outfile, num_lines)
        if self.spawn_error and self.spawn_error not in text:
            text = f"{text}\n{self.spawn_error}" if text.strip() else self.spawn_error
        return text


#: How long closing waits for the spawner to end what still runs (its own grace is 5 s).
SPAWNER_CLOSE_WAIT_SEC = spawner.ORPHAN_GRACE_SEC + 5.0


class SpawnerPool:
    """A :class:`ProcessPool` whose processes are started and reaped by a spawner process
    (:mod:`balsam.launcher.spawner`), so the launcher's interpreter never forks.

    Same interface and the same exit rules as ProcessPool (the hold of exits by a termination
    signal included). :meth:`start` decides the argv (exec'd directly when the line needs no
    shell, as :func:`~balsam.launcher.app_run.direct_argv`) and sends it with the environment as
    a difference from the one the spawner started with (the launcher's), so a request is a few
    hundred bytes. A reader thread queues the spawner's events in :attr:`events` and sets ``wake``.

    Hand-over (:meth:`queue_after`): a task may be queued behind a running one, to start on its
    CPUs the moment it ends, without a round trip through the launcher's loop. :meth:`reap` turns
    the spawner's events into exits (returned), starts of queued tasks (:meth:`take_started`:
    ``(after_id, job_id, start_time)``, in order) and tasks dropped unstarted
    (:meth:`take_dropped`). A queued task is not in :attr:`running` until it starts.

    Thread contract: every method but the reader thread's is the owner's thread's; the reader
    thread only appends to :attr:`events` (a deque) and stores the answer to the stop request. If
    the spawner dies, every task it ran is reported with returncode -1 and the reason, what was
    queued is dropped, and starts go to an in-process :class:`ProcessPool`.
    """

    #: How long :meth:`terminate_all` waits for the spawner's answer beyond the grace.
    ANSWER_MARGIN_SEC = 15.0

    def __init__(self, error_tail_num_lines: int, wake: threading.Event, *, python: str = sys.executable,
                 sigpipe_ignored: bool = False, relaunch_quick_failures: bool = False) -> None:
        self.error_tail_num_lines = error_tail_num_lines
        self.wake = wake
        self.sigpipe_ignored = sigpipe_ignored
        #: Serial mode's quick-failure relaunch (:data:`RETRY_CODES`), applied by the spawner; or None.
        self.relaunch = relaunch_rule() if relaunch_quick_failures else None
        self._relaunched: dict[int, int] = {}  # job id -> relaunches the spawner reported ("r")
        self.running: dict[int, Any] = {}
        self.queued: dict[int, SpawnedTask] = {}
        self.held: dict[int, float] = {}
        self.events: deque[tuple] = deque()
        self.base_env = dict(os.environ)
        self._started: list[tuple[int, int, float]] = []
        self._dropped: list[int] = []
        self._answer: Optional[tuple[list[int], list[Any]]] = None
        self._answered = threading.Event()
        self._gone: Optional[str] = None
        self._closing = False
        self._fallback: Optional[ProcessPool] = None
        request_r, self._request_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", spawner.__file__, str(request_r), str(reply_w),
                 *([spawner.SIGPIPE_IGNORED_ARG] if sigpipe_ignored else []),
                 *([spawner.relaunch_arg(*self.relaunch)] if self.relaunch is not None else [])],
                pass_fds=(request_r, reply_w), stdin=subprocess.DEVNULL, env=self.base_env,
                # A session of its own: a kill of this process's group (an MPI launcher ending a
                # rank, a batch system or a user ending the launcher) must spare the spawner, which
                # then sees end of file on its request pipe and ends its tasks (their own sessions:
                # the group kill missed them) within ORPHAN_GRACE_SEC instead of leaving them orphans.
                start_new_session=True,
            )
        finally:
            os.close(request_r)
            os.close(reply_w)
        self._reader = threading.Thread(target=self._read, name="spawner-reader", daemon=True)
        self._reader.start()

    def __len__(self) -> int:
        return len(self.running)

    @property
    def can_queue(self) -> bool:
        """Whether :meth:`queue_after` works (not after the spawner died)."""
        return self._gone is None

    # -- owner's thread ------------------------------------------------------------------------
    def _request(self, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str]) -> tuple[SpawnedTask, tuple]:
        # Strings, not Paths: this runs for every task (a Path costs a parse per join).
        path = os.fspath(workdir)
        if not os.path.isabs(path):
            path = os.path.abspath(path)
        task = SpawnedTask(job_id, path, os.path.join(path, JOB_OUTPUT_NAME))
        argv = direct_argv(shell_cmd, env)
        if argv is None:
            argv = shell_argv(shell_cmd, path, job_id=job_id)
            task.script = spawner.command_script(argv)
        env_set, env_unset = env_difference(self.base_env, env)
        return task, (argv, path, task.outfile, env_set, env_unset)

    def _send(self, command: tuple) -> bool:
        try:
            spawner.write_all(self._request_w, spawner.encode([command]))
            return True
        except OSError as exc:  # the spawner is gone: its reader thread reports what it ran
            self._gone = self._gone or f"the spawner process is gone ({exc})"
            return False

    def start(self, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str], cpu_ids: Sequence[int] = ()) -> Any:
        if self._gone is None:
            task, request = self._request(job_id, shell_cmd, workdir, env)
            self.running[job_id] = task
            if self._send(("s", job_id, list(cpu_ids), *request)):
                return task
            del self.running[job_id]
            spawner.remove_command_script(request[0])  # never sent: the fallback writes its own
        return self._fallback_pool().start(job_id, shell_cmd, workdir, env, cpu_ids)

    def queue_after(self, after_id: int, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str],
                    deadline: Optional[float] = None) -> bool:
        """Queue ``job_id`` to start on ``after_id``'s CPUs when that one ends; False if not sent
        (then the job was not taken: place it again). ``deadline``: a ``spawner.node_clock()`` value
        (the lease's ``fresh_until()``) after which the spawner no longer starts it but gives it back
        unstarted (a :meth:`take_dropped` entry), as for a job ahead that died of a stop signal."""
        if self._gone is not None:
            return False
        task, request = self._request(job_id, shell_cmd, workdir, env)
        self.queued[job_id] = task
        command = ("q", after_id, job_id, *request) if deadline is None else ("Q", float(deadline), after_id, job_id, *request)
        if self._send(command):
            return True
        del self.queued[job_id]
        spawner.remove_command_script(request[0])
        return False

    def cancel(self, job_id: int) -> None:
        """Drop a queued task if it has not started (a ``take_dropped`` entry says so)."""
        if job_id in self.queued and self._gone is None:
            self._send(("c", job_id))

    def job_ids(self) -> list[int]:
        """As :meth:`ProcessPool.job_ids` (the in-process fallback's too)."""
        fallback = self._fallback
        return list(self.running) + (fallback.job_ids() if fallback is not None else [])

    def end(self, job_ids: Sequence[int], grace_sec: float) -> None:
        """As :meth:`ProcessPool.end`, done by the spawner (``"k"``)."""
        mine = [j for j in job_ids if isinstance(self.running.get(j), SpawnedTask)]
        if mine and self._gone is None:
            self._send(("k", mine, float(grace_sec)))
        if self._fallback is not None:
            self._fallback.end(job_ids, grace_sec)

    def take_started(self) -> list[tuple[int, int, float]]:
        started, self._started = self._started, []
        return started

    def take_dropped(self) -> list[int]:
        dropped, self._dropped = self._dropped, []
        return dropped

    def _fallback_pool(self) -> ProcessPool:
        if self._fallback is None:
            logger.error("%s: starting tasks from the launcher process from now on", self._gone)
            self._fallback = ProcessPool(self.error_tail_num_lines, wake=self.wake, sigpipe_ignored=self.sigpipe_ignored,
                                         relaunch_quick_failures=self.relaunch is not None)
        return self._fallback

    def reap(self) -> list[tuple[int, int, str, float]]:
        exited = []
        events = self.events
        while events:
            event = events.popleft()
            kind, job_id = event[0], event[1]
            if kind == "e":
                task = self.running.get(job_id)
                if isinstance(task, SpawnedTask):
                    if task.returncode is not None and lost_with_spawner(event[2], event[4] or ""):
                        # The reader thread reports every task still in ``running`` lost when the
                        # spawner dies, this one too if its real exit was read first and is not
                        # reaped yet (in this batch, or held): the real exit stands (a made-up -1
                        # made a finished job RUN_TIMEOUT, to run again).
                        continue
                    task.returncode, task.end_time, task.spawn_error = event[2], event[3], event[4]
                    task.stop_signalled = len(event) > 5 and bool(event[5])
                    exited.append(task)
                    if self._relaunched:
                        self._note_relaunched(task)
            elif kind == "h":
                started = self.queued.pop(event[2], None)
                if started is not None:
                    self.running[started.job_id] = started
                    self._started.append((job_id, started.job_id, event[3]))
            elif kind == "d":
                if self.queued.pop(job_id, None) is not None:
                    self._dropped.append(job_id)
            elif kind == "r":  # the spawner started a task that failed quickly again
                count = self._relaunched[job_id] = self._relaunched.get(job_id, 0) + 1
                log_relaunch(job_id, event[2], event[3], count, self.relaunch[2] if self.relaunch else count)
            elif kind == "g":  # a stop signal reached the spawner (job_id: the signal), or was cleared (0)
                self._log_stop_signal(job_id)
        finished = settle_exits(exited, self.running, self.held, self.error_tail_num_lines)
        if self._fallback is not None:
            done = self._fallback.reap()
            for job_id, *_ in done:
                self.running.pop(job_id, None)
            finished.extend(done)
        return finished

    def _log_stop_signal(self, signum: int) -> None:
        if signum:
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = f"signal {signum}"
            logger.warning(
                "the spawner process (pid %s) got %s: taken for the batch system ending the allocation; it starts "
                "and relaunches no task and its jobs' exits wait for the launcher's stop (RUN_TIMEOUT), until a "
                "stop follows or for %g s", self.proc.pid, name, spawner.STOP_SIGNAL_CLEAR_SEC)
        else:
            logger.info("no stop followed the signal to the spawner process (pid %s) within %g s: it starts and "
                        "relaunches tasks again", self.proc.pid, spawner.STOP_SIGNAL_CLEAR_SEC)

    def _note_relaunched(self, task: SpawnedTask) -> None:
        """The last exit of a task the spawner relaunched: its RUN_ERROR says so (after the tail)."""
        count = self._relaunched.pop(task.job_id, 0)
        if not count:
            return
        if task.returncode:
            note = relaunch_note(count, task.returncode, self.relaunch or relaunch_rule())
            task.spawn_error = f"{task.spawn_error}\n{note}" if task.spawn_error else note
        else:
            logger.info("job %s finished after %d relaunch(es)", task.job_id, count)

    def terminate_all(self, grace_sec: float) -> tuple[list[int], list[tuple[int, int, str, float]]]:
        """As :meth:`ProcessPool.terminate_all`, done by the spawner (which then exits). Queued
        tasks that had not started are forgotten (they never ran); call :meth:`take_started`
        afterwards for the ones that started meanwhile (they are among the victims or finished)."""
        finished = self.reap()
        victims: list[int] = []
        if self._fallback is not None:
            fb_victims, fb_finished = self._fallback.terminate_all(grace_sec)
            victims += fb_victims
            finished += fb_finished
        if self._gone is None:
            self._send(("t", float(grace_sec)))
            self._answered.wait(grace_sec + self.ANSWER_MARGIN_SEC)
        finished += self.reap()  # what ended or started before the stop request reached the spawner
        answer = self._answer
        if answer is not None:
            ended, before = answer
            for _kind, job_id, rc, when, error, *signalled in before:
                task = self.running.pop(job_id, None)
                if isinstance(task, SpawnedTask):
                    task.returncode, task.end_time, task.spawn_error = rc, when, error
                    if rc in STOP_SIGNAL_EXITS or any(signalled):
                        victims.append(job_id)
                    else:
                        finished.append(finished_record(task, self.error_tail_num_lines))
            victims += [j for j in ended if self.running.pop(j, None) is not None]
        # Held exits (killed by a stop signal before ours) and anything unanswered: ended by us.
        victims += [j for j, t in self.running.items() if isinstance(t, SpawnedTask)]
        self.running.clear()
        self.queued.clear()
        self.held.clear()
        self._relaunched.clear()
        self.close()
        return victims, finished

    def close(self) -> None:
        """Let the spawner go (end of file: it ends what still runs) and wait for it."""
        self._closing = True
        if self._request_w >= 0:
            os.close(self._request_w)
            self._request_w = -1
        try:
            self.proc.wait(SPAWNER_CLOSE_WAIT_SEC)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # -- reader thread -------------------------------------------------------------------------
    def _read(self) -> None:
        frames = spawner.FrameReader()
        try:
            while True:
                data = os.read(self._reply_r, 1 << 16)
                if not data:
                    break
                for kind, *body in frames.feed(data):
                    if kind == "x":
                        self.events.extend(body[0])
                    elif kind == "T":
                        self._answer = (body[0], body[1])
                        self._answered.set()
                self.wake.set()
        except OSError as exc:
            logger.error("reading from the spawner process: %s", exc)
        finally:
            os.close(self._reply_r)
        if not self._answered.is_set():
            rc = self.proc.wait()
            self._gone = f"{SPAWNER_GONE} (status {rc})"
            if not self._closing:
                # It ends its tasks before it exits on an error of its own (Spawner.run); killed
                # by a signal, it could not.
                fate = "its tasks may still run" if rc < 0 else "its tasks were ended"
                logger.error("%s; %s", self._gone, fate)
            # What it ran has been ended with it (or never reported): an exit each, which
            # report_exit (lost_with_spawner) makes RUN_TIMEOUT.
            # (list() of a dict is one C call: no change by the owner's thread can interleave.)
            now = time.time()
            self.events.extend(("e", job_id, -1, now, self._gone) for job_id in list(self.running))
            self.events.extend(("d", job_id) for job_id in list(self.queued))
            # The scripts of long lines it never started (queued, or a start it never read) would
            # stay in their workdirs: one it started has removed itself already (its first command).
            for task in [*self.queued.values(), *self.running.values()]:
                script = getattr(task, "script", None)
                if script is not None:
                    try:
                        os.unlink(script)
                    except OSError:
                        pass
            self._answered.set()
            self.wake.set()


class SpawnerShards:
    """Several spawner processes, each starting and reaping the tasks of a share of the node's
    CPUs; the interface of :class:`SpawnerPool`.

    Why: a spawner is one thread, and ``posix_spawn`` (vfork) holds it until the child has exec'd.
    With short tasks one spawner is the bottleneck: while it starts a task on one CPU, a task that
    ends on another waits for it, and that CPU sits idle. On 2 CPUs, 5,000 ``true`` tasks packed
    with hand-over, driven without a server: one spawner 1,615-1,680 tasks/s with the CPUs 18-20 %
    idle, two spawners 2,030-2,432 tasks/s and 0.2-0.6 % idle (alternated, 1 December 2026).

    A task goes to the shard of its first CPU id (``cpu % shards``: neighbouring CPUs, which
    first-fit placement fills first, go to different spawners); a task without CPU ids to the
    shard with the fewest running. A task queued behind another (hand-over) goes to that one's
    shard, which starts it on the same CPUs. Thread contract as SpawnerPool: one owner's thread.

    The first spawner starts with the pool, the others when a task first goes to them, so that
    they do not compete for the CPUs with the launcher's start-up and its first task. One that
    cannot start leaves its CPUs to the first spawner.
    """

    def __init__(self, count: int, error_tail_num_lines: int, wake: threading.Event, *,
                 sigpipe_ignored: bool = False, relaunch_quick_failures: bool = False) -> None:
        self._new_pool = lambda: SpawnerPool(error_tail_num_lines, wake, sigpipe_ignored=sigpipe_ignored,
                                             relaunch_quick_failures=relaunch_quick_failures)
        #: The spawners started so far (each once).
        self.shards: list[SpawnerPool] = [self._new_pool()]
        self._route: list[Optional[SpawnerPool]] = [self.shards[0]] + [None] * (count - 1)
        self._shard_of: dict[int, SpawnerPool] = {}  # job id -> its shard, while running or queued
        # ... and of the tasks that ended lately: a task may be queued behind one that has just
        # ended (its spawner then starts it at once on the CPUs just freed).
        self._ended_shard: dict[int, SpawnerPool] = {}

    # The owner reads these for truthiness and membership only: views, not copies.
    @property
    def running(self) -> ChainMap:
        return ChainMap(*(shard.running for shard in self.shards))

    @property
    def held(self) -> ChainMap:
        return ChainMap(*(shard.held for shard in self.shards))

    @property
    def queued(self) -> ChainMap:
        return ChainMap(*(shard.queued for shard in self.shards))

    @property
    def events(self) -> bool:
        """Whether a spawner has told something not yet reaped."""
        return any(shard.events for shard in self.shards)

    @property
    def can_queue(self) -> bool:
        return any(shard.can_queue for shard in self.shards)

    def __len__(self) -> int:
        return sum(len(shard.running) for shard in self.shards)

    def start(self, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str], cpu_ids: Sequence[int] = ()) -> Any:
        if cpu_ids:
            index = cpu_ids[0] % len(self._route)
            routed = self._route[index]
            # "is None", not "or": a pool with no running task is falsy (it has a length).
            shard = routed if routed is not None else self._start_shard(index)
        else:
            shard = min(self.shards, key=lambda s: len(s.running))
        self._shard_of[job_id] = shard
        return shard.start(job_id, shell_cmd, workdir, env, cpu_ids)

    def _start_shard(self, index: int) -> SpawnerPool:
        try:
            shard = self._new_pool()
        except OSError as exc:
            logger.warning("spawner process %d did not start (%s): the first one starts its tasks", index, exc)
            shard = self.shards[0]
        else:
            self.shards.append(shard)
        self._route[index] = shard
        return shard

    def queue_after(self, after_id: int, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str],
                    deadline: Optional[float] = None) -> bool:
        shard = self._shard_of.get(after_id)
        if shard is None:
            shard = self._ended_shard.get(after_id)
        if shard is None or not shard.queue_after(after_id, job_id, shell_cmd, workdir, env, deadline):
            return False
        self._shard_of[job_id] = shard
        return True

    def cancel(self, job_id: int) -> None:
        shard = self._shard_of.get(job_id)
        if shard is not None:
            shard.cancel(job_id)

    def job_ids(self) -> list[int]:
        return [job_id for shard in list(self.shards) for job_id in shard.job_ids()]

    def end(self, job_ids: Sequence[int], grace_sec: float) -> None:
        by_shard: dict[int, tuple[SpawnerPool, list[int]]] = {}
        for job_id in job_ids:
            shard = self._shard_of.get(job_id)
            if shard is not None:
                by_shard.setdefault(id(shard), (shard, []))[1].append(job_id)
        for shard, ids in by_shard.values():
            shard.end(ids, grace_sec)

    def take_started(self) -> list[tuple[int, int, float]]:
        return [started for shard in self.shards for started in shard.take_started()]

    def take_dropped(self) -> list[int]:
        dropped = [job_id for shard in self.shards for job_id in shard.take_dropped()]
        for job_id in dropped:
            self._shard_of.pop(job_id, None)
        return dropped

    def reap(self) -> list[tuple[int, int, str, float]]:
        finished = [record for shard in self.shards for record in shard.reap()]
        for record in finished:
            shard = self._shard_of.pop(record[0], None)
            if shard is not None:
                self._ended_shard[record[0]] = shard
        while len(self._ended_shard) > spawner.MAX_FREED:
            del self._ended_shard[next(iter(self._ended_shard))]
        return finished

    def terminate_all(self, grace_sec: float) -> tuple[list[int], list[tuple[int, int, str, float]]]:
        """Every spawner ends its tasks at the same time (one grace, not one per spawner)."""
        with ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="spawner-stop") as stoppers:
            answers = list(stoppers.map(lambda shard: shard.terminate_all(grace_sec), self.shards))
        self._shard_of.clear()
        self._ended_shard.clear()
        return [j for victims, _ in answers for j in victims], [r for _, finished in answers for r in finished]

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


#: ``BALSAM_LAUNCHER_SPAWNER`` in a launcher's environment: ``0`` starts tasks from the launcher
#: process; a number N >= 1 sets how many spawner processes serial mode runs per node (default:
#: :data:`MAX_AUTO_SPAWNERS` or fewer, one per CPU).
SPAWNER_ENV = "BALSAM_LAUNCHER_SPAWNER"
#: Serial mode's spawners per node by default: one per CPU up to this many (one spawner starts
#: about 1,700 short tasks/s here; more processes only cost memory and start-up).
MAX_AUTO_SPAWNERS = 4


def spawner_count(node_cpus: int) -> int:
    """How many spawner processes a serial-mode node runs: ``BALSAM_LAUNCHER_SPAWNER=N`` if set
    to a number >= 1 (0 means none: see :func:`local_pool`), else one per CPU up to
    :data:`MAX_AUTO_SPAWNERS`."""
    value = spawner_setting()
    if value is not None and value >= 1:
        return value
    return max(1, min(MAX_AUTO_SPAWNERS, node_cpus))


#: The most spawner processes per node ``BALSAM_LAUNCHER_SPAWNER`` may ask for: each is a process
#: with its own pipes, and a typo's 1000000 would fork until the node ran out of processes.
MAX_SPAWNERS = 256


def spawner_setting() -> Optional[int]:
    """``BALSAM_LAUNCHER_SPAWNER`` as a whole number from 0 to :data:`MAX_SPAWNERS`, or None when it
    is unset or not one (warned about once, with its value: the launcher runs on with the default)."""
    return env_number(SPAWNER_ENV, None, maximum=MAX_SPAWNERS, warn=logger.warning,
                      instead=f"using the default (a spawner per CPU of the node, up to {MAX_AUTO_SPAWNERS})")


def local_pool(error_tail_num_lines: int, wake: threading.Event, *, sigpipe_ignored: bool = False,
               spawners: int = 1, relaunch_quick_failures: bool = False) -> "ProcessPool | SpawnerPool | SpawnerShards":
    """The pool a job mode starts this node's processes with: a spawner process (see
    :mod:`balsam.launcher.spawner`), so that the launcher's loop thread only writes a request per job
    (an in-process ``Popen`` of ``mpiexec`` cost mpi mode's loop 1.5-2.5 ms of held GIL per job); an
    in-process :class:`ProcessPool` if the spawner cannot start, or with ``BALSAM_LAUNCHER_SPAWNER=0``
    in the environment (to compare, or to rule the spawner out).

    ``spawners``: how many spawner processes share the node's CPUs (:class:`SpawnerShards`; serial
    mode asks for :func:`spawner_count`).

    ``sigpipe_ignored``: the processes keep SIGPIPE ignored instead of getting the default back.
    mpi mode asks for it because its processes are MPI launchers: MPICH's hydra ``mpiexec``
    sometimes writes, as a job ends, to a connection whose other end has already closed (most
    likely its proxy's), and under the default disposition that write killed ``mpiexec`` (exit
    -13) after a run that had succeeded, so the job ended RUN_ERROR (24 of 15,000 ``mpiexec -n 1
    true`` under load; 1 of 1,800 mpi-mode jobs in the launcher benchmark). With SIGPIPE ignored
    the write fails with EPIPE and ``mpiexec`` exits with its ranks' status (0 of 15,000). The
    ranks are not affected: the MPI launcher's daemons start them with the default disposition
    (tested with hydra).

    ``relaunch_quick_failures``: a task that fails quickly is started again before its exit is
    reported (Balsam 0.7's serial-mode rule, :data:`RETRY_CODES`); serial mode asks for it."""
    options: dict[str, Any] = {"sigpipe_ignored": sigpipe_ignored, "relaunch_quick_failures": relaunch_quick_failures}
    if spawner_setting() == 0:
        return ProcessPool(error_tail_num_lines, wake=wake, **options)
    try:
        if spawners > 1:
            return SpawnerShards(spawners, error_tail_num_lines, wake, **options)
        return SpawnerPool(error_tail_num_lines, wake=wake, **options)
    except OSError as exc:
        logger.warning("no spawner process (%s): tasks are started from the launcher process", exc)
        return ProcessPool(error_tail_num_lines, wake=wake, **options)
