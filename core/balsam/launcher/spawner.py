"""A spawner process: starts and reaps a launcher's tasks outside the launcher's own interpreter.

Why a second process: on CPython 3.11 ``subprocess.Popen`` holds the GIL while its vfork child
runs up to ``exec`` (0.3-1 ms on a busy CPU), so a launcher that starts thousands of short tasks a
second spends most of its loop thread in ``fork_exec`` and stalls its other threads (the prefetcher,
the status updater, the reaper) meanwhile. Here a small single-threaded Python (standard library
only, started with ``-I -S``: ~15 ms) does the spawning and reaping, and the launcher only writes
requests to a pipe and reads exits from another (:class:`~balsam.launcher.runner.SpawnerPool`).

Single-threaded is what makes it cheap: the process may ``chdir`` to the task's workdir and set its
own CPU mask before each spawn (so the child is pinned from its first instruction and runs in its
workdir) and use ``os.posix_spawn`` (``clone(CLONE_VM|CLONE_VFORK)`` in glibc, no Python code in
the child); its only children are the tasks, so ``waitpid(-1)`` after a SIGCHLD reaps exactly them.

Protocol (both ways: a 4-byte little-endian length, then a :mod:`marshal` payload; only plain
types cross, and both ends are the same interpreter):

- launcher -> spawner: a list of commands. ``("s", job_id, cpu_ids, argv, cwd, outfile, env_set,
  env_unset)`` starts a task: ``argv[0]`` an absolute path, the environment this process started
  with minus ``env_unset`` plus ``env_set``, stdout and stderr to ``outfile`` (truncated), stdin
  from ``/dev/null``, a new session (so the whole task tree is killed by process group), the
  signal dispositions and mask reset (an ``argv[0]`` the kernel will not exec, a script without
  ``#!``, is run by ``/bin/bash`` as bash would). ``("q", after_id, job_id, argv, cwd, outfile, env_set,
  env_unset)`` queues a task behind a running (or queued) one: it starts on the same CPUs the
  moment that one exits, without waiting for the launcher (a **hand-over**), unless that one died
  of a termination signal or a stop signal reached this process (the allocation is ending: the
  queued task is dropped); a request that
  arrives just after that one ended normally starts at once on its CPUs. ``("Q", deadline,
  after_id, job_id, argv, ...)`` is ``"q"`` with a deadline: a :func:`node_clock` value
  (CLOCK_BOOTTIME, one clock for every process of a node) after which the task is not started
  but dropped (``"d"``, with what is queued behind it), the launcher's Session being no longer
  known alive then (:meth:`balsam.client.lease.JobLease.fresh_until`): a launcher frozen past its
  Session's expiry must not have its queued jobs started, the server may have given them to
  another launcher. ``("c",
  job_id)`` drops a queued task (and what is queued behind it) that has not started.
  ``("t", grace)`` drops what is queued, ends every task (SIGTERM to its process group, SIGKILL
  to the group after ``grace`` seconds unless the whole group is gone by then, its leader or not),
  answers and exits. ``("k", [job_id, ...], grace)`` ends those running tasks the same way without
  waiting (:class:`Ending`: the loop sends the SIGKILLs when their grace is over) and never
  relaunches them: their user deleted or moved the jobs; their exits are reported as any other.
- spawner -> launcher: ``("x", [event, ...])`` in the order they happened: ``("e", job_id,
  returncode, end_time, spawn_error)`` a task ended (``returncode`` as Popen gives it: ``-N`` for
  signal N; a task that could not be started has :data:`SPAWN_FAILED` and the reason, also written
  to its output file), with a sixth item ``True`` when it was reaped after a stop signal reached
  this process (:meth:`Spawner.stop_signalled`: the launcher holds it as an exit by a stop signal);
  ``("h", after_id, job_id, start_time)`` a queued task started on the CPUs of the one that ended
  just before; ``("d", job_id)`` a queued task was dropped unstarted; ``("r",
  job_id, returncode, seconds_run)`` a task failed quickly and was started again (below);
  ``("g", signum)`` a stop signal reached this process (:meth:`Spawner.stop_signalled`), ``("g",
  0)`` it was cleared, no ``"t"`` having come within :data:`STOP_SIGNAL_CLEAR_SEC`. The
  answer to ``"t"``: ``("T", ended_by_signal, [("e", ...) events before the signal...])``. Events
  that only say that tasks exited 0 and handed their CPUs over (``"e"`` with its ``"h"``) wait up
  to :data:`EVENT_HOLD_SEC` while every running task has :data:`EVENT_HOLD_DEPTH` tasks queued
  behind it, and go with the next message (:meth:`Spawner.send_events`). Exits a stop signal may
  have caused (not 0, or 0 after a long run) wait :data:`STOP_RACE_SEC` (the signal may reach the
  tasks before this process); after a stop signal, a ``"s"`` is not started but answered with its
  ``"e"`` (returncode -1, :data:`NOT_STARTED`, marked).

End of file on the request pipe means the launcher is gone: every task is ended as by ``"t"`` with
a 5 s grace, and the process exits (tasks do not outlive their launcher unnoticed); so does any
error of this process's own (its tasks are ended before it exits).

A task whose leader exits leaves nothing running: a process it left in its process group
(``cmd &``, ``nohup cmd &``) gets SIGTERM at once and SIGKILL after :data:`LEFTOVER_GRACE_SEC`
(:class:`Ending`). A process that called ``setsid`` (``setsid cmd``, a daemon) has left the group
and escapes: only a cgroup per task would catch it. SIGTERM and
SIGINT do not end this process: the launcher gets them too and decides (it sends ``"t"``). One that
reaches it (its own session spares it from a kill of the launcher's group: the batch system's,
which signals every process of the job) only stops the relaunch of quick failures and the start of
tasks, for :data:`STOP_SIGNAL_CLEAR_SEC` at most (:meth:`Spawner.stop_signalled`).

**Run records.** Each task still running :data:`RECORD_AFTER_SEC` after its start gets a record of
its run on its ``job.out`` (:func:`run_record`: this host, the task's pid, which is its process
group, its start on :func:`node_clock`, this process's pid and start, the job, this pid namespace
and boot), as the extended attribute :data:`RUN_RECORD_XATTR` (one ``setxattr``, about 4 us; a
file system without user extended attributes gets a symbolic link :data:`RUN_RECORD_LINK` in the
workdir instead, whose target is the record: one ``symlink``, about 70 us; tried per record, not
latched per process). The record is removed when the task is reaped (:meth:`RunRecords.forget`).
Shorter tasks get none: they cannot outlive a
Session's expiry, and the write cost a tenth of this process's work per task with the shortest
ones (:class:`RunRecords`). When every balsam process of a launcher is killed
(``kill -9``, the OOM killer), nothing ends its tasks: the next launcher that prepares the job
reads the record and ends a run still alive on its host
(:func:`balsam.launcher.stale_run.end_stale_run`) before the job runs again in the same workdir.

Started as ``spawner.py REQUEST_FD REPLY_FD [sigpipe-ignored] [relaunch=CODES;WINDOW;MAX]``. With
``sigpipe-ignored`` the tasks keep SIGPIPE ignored (as this interpreter has it) instead of getting the
default back: mpi mode's tasks are MPI launchers, which a late write can kill after a successful run
(see :func:`balsam.launcher.runner.local_pool`). With ``relaunch=...`` (serial mode: Balsam 0.7's
rule, whose constants are :data:`balsam.launcher.runner.RETRY_CODES` and its neighbours) a task that
exits with one of the comma-separated CODES less than WINDOW seconds after it started is started
again :data:`STOP_RACE_SEC` later (unless a stop signal comes meanwhile), same request, same CPUs,
its queue kept behind it, up to MAX times; only its last exit is reported (each relaunch is an
``"r"`` event).
"""

from __future__ import annotations

import errno
import marshal
import os
import select
import signal
import struct
import sys
import time
from typing import Callable


if hasattr(time, "CLOCK_BOOTTIME"):
    def node_clock() -> float:
        """The clock of the ``"Q"`` deadlines, the lease's ``session_clock`` (CLOCK_BOOTTIME, one for
        every process of the node): it goes on while the machine is suspended, which
        ``time.monotonic`` does not, so a suspend cannot stretch a deadline past the Session's expiry."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
else:
    def node_clock() -> float:
        """``time.monotonic()`` where there is no ``CLOCK_BOOTTIME``."""
        return time.monotonic()


#: The shell a line that cannot be exec'd directly runs under (as the launcher's ``/bin/bash -c``).
SHELL = "/bin/bash"
#: The returncode of a task that could not be started (as :class:`~balsam.launcher.app_run.AppProcess`).
SPAWN_FAILED = 12345
#: Start failures that starting the same command again cannot cure (a command line or an argument
#: over the kernel's limits): reported at once, not relaunched as a quick failure (12345 is one of
#: RETRY_CODES, for the passing kinds: EAGAIN, ENOMEM, a file system hiccup).
UNRETRYABLE_SPAWN_ERRNOS = frozenset({errno.E2BIG, errno.ENAMETOOLONG})
#: Ended tasks whose CPUs are remembered for a late queue request (the oldest are forgotten first).
MAX_FREED = 4096
#: Grace of the stop after the launcher vanished (end of file on the request pipe).
ORPHAN_GRACE_SEC = 5.0
#: Grace of the processes a task left in its process group when its leader exited (SIGTERM at the
#: exit, SIGKILL after this).
LEFTOVER_GRACE_SEC = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP)
#: Exit statuses of a process ended by a signal a batch system sends when it ends an allocation:
#: Popen's ``-N``, a shell's ``128+N``, and MPICH hydra's mpiexec, which exits with its rank's
#: signal number (15 for a SIGTERM'd rank). No hand-over after such an exit.
STOP_SIGNAL_EXITS = frozenset(
    [-int(s) for s in _STOP_SIGNALS] + [128 + int(s) for s in _STOP_SIGNALS] + [int(signal.SIGTERM), int(signal.SIGKILL)]
)
_HEADER = struct.Struct("<I")
#: Signals whose disposition a task gets back to default: this process ignores some (SIGTERM,
#: SIGINT), CPython ignores SIGPIPE and SIGXFSZ, and ignored dispositions survive exec.
_RESET_SIGNALS = tuple(s for s in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None), signal.SIGTERM, signal.SIGINT,
                                   signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT) if s is not None)
#: The optional third argument: the tasks keep SIGPIPE ignored (see the module's docstring).
SIGPIPE_IGNORED_ARG = "sigpipe-ignored"
#: The optional argument that turns the quick-failure relaunch on: ``relaunch=CODES;WINDOW;MAX``.
RELAUNCH_ARG = "relaunch"
#: How the name of a command line's script starts (a line too long for one exec argument, written
#: to the task's workdir by :func:`balsam.launcher.app_run.shell_argv` and run as ``[SHELL, FILE]``):
#: the script removes itself as its first command, so one that never ran (dropped, failed to
#: start) is removed here, and one relaunched is written again (the relaunch reuses the argv).
COMMAND_SCRIPT_PREFIX = ".balsam_command."


#: The extended attribute of a task's output file (``job.out``) that holds the record of its run.
RUN_RECORD_XATTR = "user.balsam.run"
#: Where the record is kept on a file system without user extended attributes: a symbolic link in
#: the task's workdir whose target is the record (one ``symlink`` call, no file to write).
RUN_RECORD_LINK = ".balsam_run"
#: The version of the record's format (its first word). Version 1 (``1 HOST PID STARTED OWNER``,
#: without the job, the pid namespace or the boot) is read, but never acted on.
RUN_RECORD_VERSION = "2"
#: A task's run is recorded this long after its start, if it still runs then (:meth:`RunRecords.defer`).
#: Why not at once: setting the attribute cost the spawner about 10 us a task (measured with 3,000
#: ``true`` tasks: 70-83 us of spawner CPU a task before, 90-95 us with the record written at the
#: spawn), a tenth of its work for the shortest tasks. A run can meet its rerun only if it outlives
#: the Session's expiry (minutes), so only a launcher and spawners killed within this time of a
#: long task's start leave it unrecorded.
RECORD_AFTER_SEC = 0.2
#: The least time between two passes over the runs whose record is due (:meth:`RunRecords.flush`).
RECORD_FLUSH_SEC = 0.05
_XATTR_UNSUPPORTED = frozenset(e for e in (getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None))
                               if e is not None)


def proc_stat(pid: int) -> "tuple[str, int, int] | None":
    """``(state, process group, start in clock ticks since boot)`` of process ``pid`` from
    ``/proc/<pid>/stat``, or None (no such process, not Linux)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[2]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_identity(pid: int) -> str:
    """``"PID:START"``: a process told apart from a later one that got its pid (START: its start in
    clock ticks since boot, ``?`` where unknown)."""
    stat = proc_stat(pid)
    return f"{int(pid)}:{stat[2] if stat is not None else '?'}"


def run_record(host: str, pid: int, started: float, owner: str, job_id: int = 0,
               namespace: "str | None" = None, boot: "str | None" = None) -> str:
    """The record of one run: ``2 HOST PID STARTED OWNER JOB PIDNS BOOT``. ``pid`` is the task's
    first process and its process group (tasks start in a session of their own); ``started``:
    :func:`node_clock` read just before the spawn (``/proc/<pid>/stat``'s start is on the same
    clock, so a pid reused since is told apart); ``owner``: :func:`process_identity` of the process
    that started it and reaps it (this spawner, or the launcher process without one): while it
    lives, the run is looked after; ``job_id``: the job it runs (a workdir two jobs share holds
    the later one's); ``namespace`` and ``boot``: :func:`pid_namespace` and :func:`boot_id` of the
    writer (default: this process's): a pid, a start and an owner mean something only in the same
    pid namespace (a container on the same host, with the same hostname, numbers its own
    processes from 1) and boot."""
    return (f"{RUN_RECORD_VERSION} {host} {int(pid)} {started:.3f} {owner} {int(job_id)} "
            f"{namespace or pid_namespace()} {boot or boot_id()}")


_identity: "dict[str, str]" = {}


def pid_namespace() -> str:
    """``DEV:INO`` of this process's pid namespace (``/proc/self/ns/pid``), ``:TIMENS`` added where
    there is a time namespace (its clocks may be offset: starts read in another one differ);
    ``-`` where unknown (never equal to a known one). Read once a process."""
    value = _identity.get("ns")
    if value is None:
        try:
            st = os.stat("/proc/self/ns/pid")
            value = f"{st.st_dev}:{st.st_ino}"
            try:
                value += f":{os.stat('/proc/self/ns/time').st_ino}"
            except OSError:
                pass
        except OSError:
            value = "-"
        _identity["ns"] = value
    return value


def boot_id() -> str:
    """This boot of the host (``/proc/sys/kernel/random/boot_id``; ``-`` where unknown). Read once a process."""
    value = _identity.get("boot")
    if value is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
                value = fh.read().decode(errors="replace").strip() or "-"
        except OSError:
            value = "-"
        _identity["boot"] = value
    return value


def this_host() -> str:
    """This host's name, as ``socket.gethostname()`` gives it (without importing socket here)."""
    return os.uname().nodename


class RunRecords:
    """Writes the record of each run this process starts (see the module's docstring), and removes
    it when the run is reaped (:meth:`forget`): a record still there names a run nobody reaped."""

    def __init__(self, owner: "str | None" = None) -> None:
        self.host = this_host()
        self.owner = owner or process_identity(os.getpid())
        self._prefix = f"{RUN_RECORD_VERSION} {self.host} "
        self._owner = f" {self.owner} "
        self._suffix = f" {pid_namespace()} {boot_id()}"
        #: Whether to try the extended attribute first. Tried for every record: a file system
        #: without user extended attributes (ENOTSUP: NFS, ramfs) gets the link, and the next
        #: record, on another file system, the attribute again (one failed ``setxattr`` of a few
        #: us per record there, for runs that lasted RECORD_AFTER_SEC: never the short tasks).
        self.xattr = hasattr(os, "setxattr")
        #: Runs whose record is due (:meth:`defer`): ``(due, pid, outfile, cwd, started, job_id)``,
        #: oldest first, from index ``_head`` on.
        self.pending: list = []
        self._head = 0
        #: When :meth:`flush` is next due (:func:`node_clock`; infinite: nothing pending).
        self.next_flush = float("inf")
        #: pid -> ``(path, is_link, record)`` of each run recorded and not reaped yet (:meth:`forget`).
        self.written: dict = {}

    def text(self, pid: int, started: float, job_id: int = 0) -> str:
        """:func:`run_record` of this host and owner."""
        return f"{self._prefix}{int(pid)} {started:.3f}{self._owner}{int(job_id)}{self._suffix}"

    def write(self, target: "int | str", cwd: str, pid: int, started: float, job_id: int = 0,
              path: "str | None" = None) -> None:
        """Record the run ``pid`` of job ``job_id`` whose output file is ``target`` (an open
        descriptor, or its path: ``path`` names it for :meth:`forget`), in workdir ``cwd``. Never
        raises: a run without a record is only unprotected against a second run."""
        text = self.text(pid, started, job_id)
        data = text.encode()
        if self.xattr:
            try:
                os.setxattr(target, RUN_RECORD_XATTR, data)
                self.written[pid] = (path or target, False, data)
                return
            except OSError as exc:
                if exc.errno not in _XATTR_UNSUPPORTED:
                    return  # ENOENT: the workdir was removed meanwhile
        link = os.path.join(cwd, RUN_RECORD_LINK)  # this file system has none: the link
        try:
            try:
                os.symlink(data, link)
            except FileExistsError:  # an earlier run's
                os.unlink(link)
                os.symlink(data, link)
            self.written[pid] = (link, True, data)
        except OSError:
            pass

    def forget(self, pid: int) -> None:
        """The run ``pid`` was reaped: its record, if it got one and it is still its own (a workdir
        two jobs share holds the later one's), is removed. Costs nothing for a run never recorded."""
        entry = self.written.pop(pid, None)
        if entry is None or isinstance(entry[0], int):
            return  # never recorded; or recorded through a descriptor closed since (the launcher's own)
        path, is_link, data = entry
        try:
            if is_link:
                if os.fsencode(os.readlink(path)) == data:
                    os.unlink(path)
            elif os.getxattr(path, RUN_RECORD_XATTR) == data:
                os.removexattr(path, RUN_RECORD_XATTR)
        except OSError:
            pass

    def defer(self, pid: int, outfile: str, cwd: str, started: float, job_id: int = 0) -> None:
        """Record the run :data:`RECORD_AFTER_SEC` after its start, if it still runs then
        (:meth:`flush`): a task that ends sooner (the thousands of short tasks a second of serial
        mode) costs no write, and only a run that outlives a Session's expiry can meet its rerun."""
        due = started + RECORD_AFTER_SEC
        self.pending.append((due, pid, outfile, cwd, started, job_id))
        if due < self.next_flush:
            self.next_flush = due

    def flush(self, running: "dict | set", now: float) -> "float | None":
        """Write the records that are due at ``now`` (:func:`node_clock`), of the runs still in
        ``running`` (pid -> job id; a pid a later task got since is not that run); seconds until
        the next call is due (None: none pending). Calls are at least :data:`RECORD_FLUSH_SEC`
        apart, so that with thousands of short tasks a second the records that fall due (of tasks
        long gone) are dropped in bulk rather than one per turn of the spawner's loop (a turn then
        costs one clock read, :attr:`next_flush`)."""
        pending = self.pending
        head = self._head
        size = len(pending)
        by_job = isinstance(running, dict)
        while head < size:
            entry = pending[head]
            if entry[0] > now:
                break
            head += 1
            if entry[1] in running and (not by_job or running[entry[1]] == entry[5]):
                self.write(entry[2], entry[3], entry[1], entry[4], entry[5])
        if head >= size:
            pending.clear()
            self._head = 0
            self.next_flush = float("inf")
            return None
        if head > 1024 and head * 2 > size:
            del pending[:head]
            head = 0
        self._head = head
        self.next_flush = max(pending[head][0], now + RECORD_FLUSH_SEC)
        return self.next_flush - now


def command_script(argv: list) -> "str | None":
    """The script file of an argv ``[SHELL, <workdir>/.balsam_command.*.sh]``, or None."""
    if len(argv) == 2 and argv[0] == SHELL and os.path.basename(argv[1]).startswith(COMMAND_SCRIPT_PREFIX):
        return argv[1]
    return None


def remove_command_script(argv: list) -> None:
    """Remove the command-line script of ``argv`` (a task that will not run it), if any."""
    script = command_script(argv)
    if script is not None:
        try:
            os.unlink(script)
        except OSError:
            pass


def relaunch_arg(codes: "list[int] | tuple[int, ...] | frozenset[int]", window_sec: float, max_relaunches: int) -> str:
    """The argument for the relaunch rule (built by the launcher, read by :func:`parse_relaunch_arg`)."""
    return f"{RELAUNCH_ARG}={','.join(str(int(c)) for c in codes)};{float(window_sec)!r};{int(max_relaunches)}"


def parse_relaunch_arg(args: list) -> "tuple[frozenset[int], float, int] | None":
    """``(codes, window_sec, max_relaunches)`` from the first ``relaunch=`` argument, else None."""
    for arg in args:
        if arg.startswith(RELAUNCH_ARG + "="):
            codes, window, most = arg.split("=", 1)[1].split(";")
            return frozenset(int(c) for c in codes.split(",") if c), float(window), int(most)
    return None


def encode(obj: object) -> bytes:
    """One frame of the protocol."""
    payload = marshal.dumps(obj)
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into protocol frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            end = _HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(marshal.loads(bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return out


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Ending:
    """Process groups being ended while everything else goes on (jobs their user deleted): SIGTERM
    now; SIGKILL to a group still there after its grace, whether or not its leader is gone (the
    rule of :meth:`Spawner.stop_all`, without its blocking wait). A group seen empty is forgotten
    (its number may be reused), so :meth:`check` must be called every :data:`ENDING_POLL_SEC` or so
    while :attr:`groups` is not empty."""

    def __init__(self, on_ended: "Callable[[int], None] | None" = None) -> None:
        self.groups: dict[int, float] = {}  # process group id -> when its SIGKILL is due (monotonic)
        #: Called with a group's id once it is empty or SIGKILLed (its run's record goes then).
        self.on_ended = on_ended

    def add(self, pgid: int, grace: float) -> None:
        if pgid not in self.groups:
            _kill_group(pgid, signal.SIGTERM)
            self.groups[pgid] = time.monotonic() + grace

    def check(self) -> "float | None":
        """SIGKILL the groups whose grace is over, forget the empty ones; seconds until the next
        call is due (None: none left)."""
        now = time.monotonic()
        for pgid, due in list(self.groups.items()):
            if not group_exists(pgid):
                del self.groups[pgid]
            elif now >= due:
                _kill_group(pgid, signal.SIGKILL)
                del self.groups[pgid]
            else:
                continue
            if self.on_ended is not None:
                self.on_ended(pgid)
        if not self.groups:
            return None
        return max(0.0, min(ENDING_POLL_SEC, min(self.groups.values()) - now))


#: Events that only say that tasks ended (exit 0) and handed their CPUs to the task queued behind
#: them, and those starts, are held this long at most while every running task still has
#: EVENT_HOLD_DEPTH tasks queued behind it (:meth:`Spawner.send_events`): each message wakes the
#: launcher's reader thread and its loop, and the loop has nothing to do for them but report them
#: and queue more. Serial mode's short tasks: ~1 message per task, 0.2-0.5 ms apart.
EVENT_HOLD_SEC = 0.002
EVENT_HOLD_DEPTH = 2
#: How often groups being ended are looked at (an empty group tells nobody).
ENDING_POLL_SEC = 0.1
#: How long an exit that the batch system's signal may have caused is kept before it is sent or
#: relaunched (:meth:`Spawner.stop_signalled`). A batch system ends an allocation by signalling every
#: process of the job, and Slurm's proctrack/linuxproc signals a process's descendants before it
#: (the tasks before their spawner): a task that traps SIGTERM and exits at once can be reaped before
#: this process notes its own signal. Kept this long, its exit is claimed by that signal when it
#: comes (the kill loop's gap: measured up to about 10 ms on a busy 2-CPU node) instead of being
#: relaunched (serial mode's quick failure, its job.out truncated) or reported as the job's own. Kept:
#: the relaunch of a quick failure, an exit other than 0 (and other than a stop signal's, which the
#: launcher holds itself), and an exit 0 of a task that ran :data:`STOP_RACE_MIN_RUN_SEC` or longer.
STOP_RACE_SEC = 0.05
#: An exit 0 is kept :data:`STOP_RACE_SEC` only if its task ran this long: the report (and the reuse
#: of the CPUs, when nothing is queued behind the task) is then late by at most 1 % of the run; the
#: short tasks of serial mode (thousands a second) are sent at once. An exit 0 of a shorter task
#: that the spawner reaps before it notes the signal is the job's own (RUN_DONE).
STOP_RACE_MIN_RUN_SEC = 5.0
#: A stop signal that no ``"t"`` follows within this many seconds was not the batch system's (a
#: user's ``kill`` of this process): the spawner starts and relaunches tasks again (the batch
#: system's SIGKILL comes after its own kill delay, Slurm's KillWait is 30 s by default).
STOP_SIGNAL_CLEAR_SEC = 30.0
#: The reason of a task refused because a stop signal reached the spawner (returncode -1, reported
#: as one reaped after the signal): :func:`balsam.launcher.runner.report_exit` makes it RUN_TIMEOUT.
NOT_STARTED = "not started: a stop signal reached the spawner process (the allocation is ending)"


class Spawner:
    def __init__(self, request_fd: int, reply_fd: int, *, sigpipe_ignored: bool = False,
                 relaunch: "tuple[frozenset[int], float, int] | None" = None) -> None:
        self.request_fd = request_fd
        self.reply_fd = reply_fd
        self.sigpipe_ignored = sigpipe_ignored
        #: Dispositions a task gets back to default (SIGPIPE stays ignored with ``sigpipe_ignored``).
        self.reset_signals = tuple(s for s in _RESET_SIGNALS if not (sigpipe_ignored and s == signal.SIGPIPE))
        #: In bytes: posix_spawn encodes every str variable of every task's environment (9 us a
        #: task for 240 variables); these are encoded once.
        self.base_env = dict(os.environb)
        self.home_mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.mask: object = None  # the CPU mask currently set on this process (None: home_mask)
        self.cwd = os.getcwd()
        self.running: dict[int, int] = {}  # pid -> job id
        self.cpus_of: dict[int, list] = {}  # job id -> CPU ids, of the running tasks
        self.after: dict[int, tuple] = {}  # job id -> the task queued behind it (a "q" command's tail)
        self.queued: set[int] = set()  # job ids of queued tasks not started
        self.deadline_of: dict[int, float] = {}  # queued job id -> node_clock() time it may start until ("Q")
        #: job id -> CPU ids of a task that ended normally with nothing queued behind it: a request
        #: to queue behind it that comes late still starts there (the launcher keeps those CPUs
        #: for it until it hears whether the queued task started).
        self.freed: dict[int, list] = {}
        self.events: list[tuple] = []
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.setsid_ok = True
        #: The quick-failure relaunch rule ``(codes, window_sec, max_relaunches)``, or None (every
        #: exit is reported: mpi mode). With it, ``started`` keeps each running task's start
        #: (monotonic) and request, and ``relaunched`` how often a task has been started again.
        self.relaunch = relaunch
        self.relaunch_rule = relaunch  # the rule to restore when a stray stop signal is cleared
        self.started: dict[int, tuple] = {}
        self.relaunched: dict[int, int] = {}
        #: Relaunches kept :data:`STOP_RACE_SEC` (job id -> (due, returncode, error)): the task's
        #: start record stays in ``started``, its CPUs in ``cpus_of``, its queue in ``after``.
        self.relaunch_due: dict[int, tuple] = {}
        #: pid -> its start (node_clock) of each running task: how long a task that exits 0 ran.
        self.began: dict[int, float] = {}
        #: Until when (monotonic) the events not sent yet are kept for a stop signal to claim (an
        #: exit it may have caused: :data:`STOP_RACE_SEC`), or None.
        self._claim_until: "float | None" = None
        #: Tasks ended on request ("k"): never relaunched; their groups, SIGKILLed after the grace.
        self.ending = Ending(on_ended=self._group_ended)
        self.ending_jobs: set[int] = set()
        #: With the relaunch rule: job id -> (path, text) of the command-line script it runs.
        self.scripts: dict = {}
        #: The record of each run, on its job.out (see the module's docstring).
        self.records = RunRecords()
        #: A stop signal reached this process (:meth:`stop_signalled`): the allocation is ending.
        self.stopping = False
        self._signal = 0  # the signal that set ``stopping``
        #: The signal of ``stopping`` once it is noted (events marked, the launcher told: ``"g"``).
        self._stop_noted = 0
        #: When (monotonic) ``stopping`` is cleared if no ``"t"`` came (:data:`STOP_SIGNAL_CLEAR_SEC`).
        self._stop_clear_at: "float | None" = None
        #: Since when (monotonic) the events not sent yet have been held (:meth:`send_events`).
        self._held_since: "float | None" = None

    # -- starting ------------------------------------------------------------------------------
    def start(self, job_id: int, cpu_ids: list, argv: list, cwd: str, outfile: str, env_set: dict, env_unset: list) -> None:
        self.cpus_of[job_id] = cpu_ids  # also when the start fails: a task queued behind gets them
        if self.stopping:
            # The allocation is ending: a job started now would be killed a moment later (its
            # job.out truncated). Reported as an exit after the signal: the launcher's stop makes
            # it RUN_TIMEOUT, or report_exit does (NOT_STARTED) if no stop follows.
            remove_command_script(argv)
            self._ended(job_id, -1, NOT_STARTED)
            return
        if self.relaunch is not None:  # before the spawn: a start that fails may be relaunched too
            self.started[job_id] = (time.monotonic(), argv, cwd, outfile, env_set, env_unset)
            script = command_script(argv)
            if script is not None and job_id not in self.scripts:
                try:  # the script removes itself when it runs: kept to write it again for a relaunch
                    with open(script, "rb") as text:
                        self.scripts[job_id] = (script, text.read())
                except OSError:
                    pass
        try:
            env = self.base_env
            if env_set or env_unset:
                env = dict(env)
                for key in env_unset:
                    env.pop(os.fsencode(key), None)
                env.update({os.fsencode(k): os.fsencode(v) for k, v in env_set.items()})
            fd = os.open(outfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except (OSError, ValueError) as exc:  # ValueError: a lone surrogate fsencode cannot encode
            remove_command_script(argv)
            self._failed(job_id, outfile, exc)
            return
        try:
            self._set_mask(cpu_ids)
            if cwd != self.cwd:
                os.chdir(cwd)  # single-threaded: the process's cwd is the child's
                self.cwd = cwd
            started = node_clock()
            try:
                pid = self._spawn(argv, env, fd)
            except OSError as exc:
                if exc.errno != errno.ENOEXEC or argv[0] == SHELL:
                    raise
                # An executable script without a '#!' line, exec'd directly (the launcher's
                # direct_argv): the kernel refuses it, where bash (the line's other path) runs it
                # as a shell script, as `bash script args` does. Only this error path pays for it.
                pid = self._spawn([SHELL, *argv], env, fd)
            self.records.defer(pid, outfile, cwd, started, job_id)
            self.began[pid] = started
        except (OSError, ValueError) as exc:
            # ValueError: a NUL in an argv word or an environment variable ("embedded null byte";
            # the launcher refuses those jobs before they get here). Uncaught, it ended this
            # process and with it every other task's report.
            remove_command_script(argv)
            self._failed(job_id, outfile, exc)
            return
        finally:
            os.close(fd)
        self.running[pid] = job_id

    def queue(self, after_id: int, job_id: int, *request: object) -> None:
        if after_id in self.cpus_of or after_id in self.queued:
            self.after[after_id] = (job_id, *request)
            self.queued.add(job_id)
        elif after_id in self.freed and not self.stopping and not self._past_deadline(job_id):
            # It ended just before the request came: start on its CPUs now.
            self.deadline_of.pop(job_id, None)
            self.events.append(("h", after_id, job_id, time.time()))
            self.start(job_id, self.freed.pop(after_id), *request)
        else:  # it ended by a termination signal, or long ago; or too late, or a stop signal came: placed again
            remove_command_script(request[0])  # never run: the launcher writes a new one when it places it again
            self.deadline_of.pop(job_id, None)
            self.events.append(("d", job_id))

    def queue_until(self, deadline: float, after_id: int, job_id: int, *request: object) -> None:
        """``"Q"``: :meth:`queue`, started only until ``deadline`` (:func:`node_clock`)."""
        self.deadline_of[job_id] = float(deadline)
        self.queue(after_id, job_id, *request)

    def _past_deadline(self, job_id: int) -> bool:
        deadline = self.deadline_of.get(job_id)
        return deadline is not None and node_clock() >= deadline

    def cancel(self, job_id: int) -> None:
        if job_id in self.queued:
            for after_id, task in list(self.after.items()):
                if task[0] == job_id:
                    self._drop(self.after.pop(after_id))
                    break

    def end(self, job_ids: list, grace: float) -> None:
        """End these running tasks (``"k"``), without waiting for them."""
        wanted = set(job_ids)
        for pid, job_id in self.running.items():
            if job_id in wanted:
                self.ending_jobs.add(job_id)
                self.ending.add(pid, grace)
        for job_id in wanted.intersection(self.relaunch_due):  # exited, its relaunch not due yet: final
            entry = self.relaunch_due.pop(job_id)
            self._final_exit(job_id, entry[1], entry[2])

    def _drop(self, task: tuple) -> None:
        job_id = task[0]
        remove_command_script(task[1])
        self.queued.discard(job_id)
        self.deadline_of.pop(job_id, None)
        self.events.append(("d", job_id))
        behind = self.after.pop(job_id, None)
        if behind is not None:
            self._drop(behind)

    def _spawn(self, argv: list, env: dict, fd: int) -> int:
        actions = [(os.POSIX_SPAWN_DUP2, self.devnull, 0), (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)]
        if self.setsid_ok:
            try:
                return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True,
                                      setsigmask=(), setsigdef=self.reset_signals)
            except NotImplementedError:  # a libc without POSIX_SPAWN_SETSID
                self.setsid_ok = False
        import subprocess  # the fallback only

        return subprocess.Popen(argv, env=env, stdin=self.devnull, stdout=fd, stderr=fd, start_new_session=True,
                                close_fds=True, restore_signals=not self.sigpipe_ignored).pid

    def _set_mask(self, cpu_ids: list) -> None:
        if self.home_mask is None:
            return
        wanted = tuple(cpu_ids) if cpu_ids else None
        if wanted == self.mask:
            return
        try:
            os.sched_setaffinity(0, wanted if wanted is not None else self.home_mask)
            self.mask = wanted
        except OSError:  # CPUs outside our cpuset: run unpinned rather than not at all
            os.sched_setaffinity(0, self.home_mask)
            self.mask = None

    def unpin(self) -> None:
        """Back on every CPU of the launcher's before waiting. Left on the last task's CPUs, the
        spawner would react to an exit elsewhere only when that task's CPU gave it a turn, while the
        CPU just freed sat idle; its next task would wait for it."""
        self._set_mask([])

    def _failed(self, job_id: int, outfile: str, exc: Exception) -> None:
        reason = f"could not start the job: {exc}"
        try:
            with open(outfile, "ab") as out:
                out.write((reason + "\n").encode())
        except OSError:
            pass
        if getattr(exc, "errno", None) in UNRETRYABLE_SPAWN_ERRNOS:
            self.started.pop(job_id, None)  # no start record: _ended reports it, never relaunches
        self._ended(job_id, SPAWN_FAILED, reason)

    def stop_signalled(self, signum: int, _frame: object = None) -> None:
        """SIGTERM or SIGINT reached this process (a signal handler: the loop does the rest, see
        :meth:`_note_stop`). Its own session spares it from a kill of the launcher's group, so it
        is most likely the batch system's (Slurm signals every process of the job at scancel or the
        time limit): the allocation is ending. From now on no task is relaunched, started or
        started by a hand-over: the same signal reached the tasks, and a quick failure of one (an
        app that saves its state on SIGTERM and exits 1) was started again, its job.out truncated,
        to be killed by the launcher's stop a moment later. Every exit from now on is reported
        marked (the launcher holds it for its stop); so are the exits kept for it
        (:data:`STOP_RACE_SEC`: the signal may reach the tasks first). The launcher's ``"t"``
        still decides the rest; without one within :data:`STOP_SIGNAL_CLEAR_SEC` (a user's
        ``kill`` of this process) all this ends."""
        self.stopping = True
        self.relaunch = None  # every exit from now on is reported, marked (see _final_exit)
        self._signal = int(signum)

    def _note_stop(self) -> None:
        """The loop's part of :meth:`stop_signalled`: exits not sent yet (kept for the signal or
        held) are claimed by it, so are relaunches not due yet; the launcher is told (``"g"``)."""
        self._stop_noted = self._signal or int(signal.SIGTERM)
        self._stop_clear_at = time.monotonic() + STOP_SIGNAL_CLEAR_SEC
        self._claim_until = None
        self.events = [e if e[0] != "e" or len(e) > 5 else (*e, True) for e in self.events]
        for job_id in list(self.relaunch_due):
            entry = self.relaunch_due.pop(job_id)
            self._final_exit(job_id, entry[1], entry[2])
        self.events.append(("g", self._stop_noted))

    def _check_stop_clear(self) -> "float | None":
        """Seconds until a stop signal with no ``"t"`` after it is cleared; clear it when that is
        over (the relaunch rule back, tasks started again; the launcher told: ``("g", 0)``)."""
        left = self._stop_clear_at - time.monotonic()
        if left > 0:
            return left
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # a second signal now is not lost
        try:
            self.stopping = False
            self._signal = 0
            self._stop_noted = 0
            self._stop_clear_at = None
            self.relaunch = self.relaunch_rule
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        self.events.append(("g", 0))
        return None

    def _ended(self, job_id: int, returncode: int, error: str = "", began: float = 0.0) -> None:
        """A task exited (or could not start). ``began``: its start (node_clock), 0 if unknown."""
        rule = self.relaunch
        if self.ending_jobs and job_id in self.ending_jobs:
            self.ending_jobs.discard(job_id)
            rule = None  # ended on request: its exit is final
            self.started.pop(job_id, None)
            self.relaunched.pop(job_id, None)
        if rule is not None:
            started = self.started.get(job_id)
            if (returncode in rule[0] and started is not None
                    and self._relaunch_kept(job_id, returncode, error, started, rule)):
                return
        self._final_exit(job_id, returncode, error, began)

    def _final_exit(self, job_id: int, returncode: int, error: str = "", began: float = 0.0) -> None:
        """A task's exit that is reported: its event, then its CPUs to the task queued behind it."""
        if self.started:
            self.started.pop(job_id, None)
        if self.relaunched:
            self.relaunched.pop(job_id, None)
        if self.scripts:
            self.scripts.pop(job_id, None)
        now = time.time()
        if self.stopping:  # after the batch system's signal: the launcher holds it as a signal exit
            self.events.append(("e", job_id, returncode, now, error, True))
        else:
            self.events.append(("e", job_id, returncode, now, error))
            if self._claim_until is None and (
                    (returncode != 0 and returncode not in STOP_SIGNAL_EXITS)
                    or (returncode == 0 and began and node_clock() - began >= STOP_RACE_MIN_RUN_SEC)):
                # The batch system's signal may have caused it and reach this process a moment
                # later (the tasks are signalled first): kept for it (send_events).
                self._claim_until = time.monotonic() + STOP_RACE_SEC
        cpu_ids = self.cpus_of.pop(job_id, [])
        task = self.after.pop(job_id, None)
        if task is None:
            if returncode not in STOP_SIGNAL_EXITS:
                self.freed[job_id] = cpu_ids
                if len(self.freed) > MAX_FREED:
                    del self.freed[next(iter(self.freed))]
            return
        self.queued.discard(task[0])
        if returncode in STOP_SIGNAL_EXITS or self.stopping:
            self._drop(task)
            return
        if self._past_deadline(task[0]):
            # The launcher's Session is no longer known alive: the job comes back unstarted (with
            # what is queued behind it), the launcher frees the CPUs and places it again after its
            # own freshness check.
            self._drop(task)
            return
        self.deadline_of.pop(task[0], None)
        # At once, not kept for a stop signal (the hot path of mpi mode's hand-over): a task started
        # just before the signal is noted is ended by the launcher's stop (RUN_TIMEOUT: it runs again).
        self.events.append(("h", job_id, task[0], now))
        self.start(task[0], cpu_ids, *task[1:])

    def _relaunch_kept(self, job_id: int, returncode: int, error: str, started: tuple, rule: tuple) -> bool:
        """Whether the relaunch rule starts a task that failed quickly again (False: too late, or
        relaunched enough). It is started :data:`STOP_RACE_SEC` later (:meth:`relaunch_kept_due`),
        on its CPUs and with what is queued behind it, unless a stop signal comes meanwhile."""
        _codes, window, most = rule
        seconds = time.monotonic() - started[0]
        if seconds >= window or self.relaunched.get(job_id, 0) >= most:
            return False
        self.relaunch_due[job_id] = (time.monotonic() + STOP_RACE_SEC, returncode, error, started, seconds)
        return True

    def relaunch_kept_due(self) -> "float | None":
        """Relaunch the tasks kept :data:`STOP_RACE_SEC` whose time is up (reported as their exit
        instead if a stop signal came: :meth:`_note_stop`); seconds until the next is due (None: none)."""
        now = time.monotonic()
        for job_id, (due, returncode, error, started, seconds) in list(self.relaunch_due.items()):
            if due > now:
                continue
            del self.relaunch_due[job_id]
            if self.stopping or self.relaunch is None:
                self._final_exit(job_id, returncode, error)
                continue
            self.relaunched[job_id] = self.relaunched.get(job_id, 0) + 1
            self.events.append(("r", job_id, returncode, seconds))
            if job_id in self.scripts:
                _write_script(*self.scripts[job_id])
            self.start(job_id, self.cpus_of[job_id], *started[1:])  # a start that fails may be kept again
        if not self.relaunch_due:
            return None
        return max(0.0, min(entry[0] for entry in self.relaunch_due.values()) - now)

    # -- reaping -------------------------------------------------------------------------------
    def _group_ended(self, pgid: int) -> None:
        """The children a task left in its group are gone (or SIGKILLed): its record goes now."""
        if self.records.written:
            self.records.forget(pgid)

    def reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            job_id = self.running.pop(pid, None)
            if job_id is not None:
                leftovers = group_exists(pid)
                # The record goes with the run: now, or once the children it left are gone (a
                # spawner killed meanwhile leaves it for the next launcher's check to find them).
                if self.records.written and not leftovers:  # only runs that lasted RECORD_AFTER_SEC have one
                    self.records.forget(pid)
                # Children the task left in its process group (``cmd &``, ``nohup cmd &``) would
                # outlive it unseen, on CPUs the launcher gives to the next task: the group is
                # ended as a "k" request ends it. One killpg(0) per exit, which finds nothing for
                # a task that leaves nothing behind (the serial hot path: ~1 us). Grandchildren
                # that called setsid() are in groups of their own and escape (only a cgroup
                # catches them).
                if leftovers:
                    self.ending.add(pid, LEFTOVER_GRACE_SEC)
                self._ended(job_id, os.waitstatus_to_exitcode(status), "", self.began.pop(pid, 0.0))

    def send_events(self, *, hold: bool = True) -> "float | None":
        """Send what happened; or hold it, while the launcher has no use for it yet (:meth:`_holdable`),
        at most :data:`EVENT_HOLD_SEC`: returns the seconds left until it is sent (None: sent, or nothing)."""
        if self.stopping and not self._stop_noted:
            self._note_stop()
        events = self.events
        if not events:
            return None
        if hold and self._claim_until is not None and not self.stopping:
            left = self._claim_until - time.monotonic()
            if left > 0:  # an exit a stop signal may have caused (STOP_RACE_SEC)
                return left
        if hold and not self.stopping and self._holdable(events):
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now
            left = self._held_since + EVENT_HOLD_SEC - now
            if left > 0:
                return left
        self.events = []
        self._held_since = None
        self._claim_until = None
        write_all(self.reply_fd, encode(("x", events)))
        return None

    def _holdable(self, events: list) -> bool:
        """Whether ``events`` are only exits 0 whose CPUs went to the task queued behind them, and
        those starts, while every running task still has :data:`EVENT_HOLD_DEPTH` tasks queued
        behind it: the launcher would only report them and queue more, and each task has work
        queued behind it for longer than the hold."""
        handed = {e[1] for e in events if e[0] == "h"}
        for event in events:
            if event[0] != "h" and (event[0] != "e" or event[2] != 0 or event[1] not in handed):
                return False
        after = self.after
        for job_id in self.running.values():
            for _ in range(EVENT_HOLD_DEPTH):
                task = after.get(job_id)
                if task is None:
                    return False
                job_id = task[0]
        return True

    def answer_stop(self, grace: float) -> None:
        """``"t"``: the events held go first (a queued task whose start is held there is one of the
        running tasks the answer names as ended: the launcher must know it started), then the stop
        and its answer."""
        self.send_events(hold=False)
        victims, before = self.stop_all(grace)
        write_all(self.reply_fd, encode(("T", victims, before)))

    def stop_all(self, grace: float) -> tuple[list, list]:
        """Drop what is queued; SIGTERM every task's process group, SIGKILL every group still there
        after ``grace``: (ended job ids, exit events before the signal).

        A task is its whole process group (its leader's pid is the group id: each task starts a
        session of its own), not its leader: a leader that dies of the SIGTERM can leave children
        that ignore or handle it (an app saving a checkpoint, ``trap '' TERM``, a helper started
        in the background). The wait ends early only when every group is empty, and the SIGKILL
        goes to every group still there, whether or not its leader has been reaped; a group is no
        longer signalled once it was seen empty (its number may then be a new process's)."""
        for task in self.after.values():
            remove_command_script(task[1])
        self.after.clear()
        self.queued.clear()
        self.deadline_of.clear()
        self.freed.clear()
        self.relaunch = None  # from here on every exit is final
        for job_id in list(self.relaunch_due):  # exited before the stop, relaunch not due yet: final
            entry = self.relaunch_due.pop(job_id)
            self._final_exit(job_id, entry[1], entry[2])
        self.scripts.clear()
        self.reap()
        before, self.events = [e for e in self.events if e[0] == "e"], []
        victims = list(self.running.values())
        # With the groups of tasks ended on request whose leader is gone but not every process.
        groups = set(self.running) | set(self.ending.groups)
        left_children = set(self.ending.groups)  # their records go once they are SIGKILLed below
        self.ending.groups.clear()
        for pgid in groups:
            _kill_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while groups and time.monotonic() < deadline:
            self.reap()  # a leader left a zombie would keep its group "there"
            groups = {pgid for pgid in groups if group_exists(pgid)}
            if groups:
                time.sleep(0.02)
        # With the groups reaped leaders left behind during the wait (already sent SIGTERM).
        left_children |= set(self.ending.groups)
        for pgid in groups | set(self.ending.groups):
            _kill_group(pgid, signal.SIGKILL)
        self.ending.groups.clear()
        for pgid in left_children if self.records.written else ():
            self.records.forget(pgid)
        for pid in list(self.running):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.records.forget(pid)
        self.running.clear()
        self.events.clear()
        return victims, before

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._loop()
        except BrokenPipeError:  # the launcher closed its end of the reply pipe: it is gone
            self.stop_all(ORPHAN_GRACE_SEC)
            return 1
        except BaseException:
            # Whatever else broke the loop: the tasks are ended before this process goes, so that
            # the launcher's "ended with the spawner" is true and none runs on as an orphan on
            # CPUs the launcher frees.
            import traceback  # here only: importing it costs every spawner ~10 ms at start-up

            traceback.print_exc()
            try:  # what is held (exits 0 and the starts behind them) is true: the launcher must hear it
                self.send_events(hold=False)
            except BaseException:
                traceback.print_exc()
            try:
                self.stop_all(ORPHAN_GRACE_SEC)
            except BaseException:
                traceback.print_exc()
            return 1

    def _loop(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler (not SIG_IGN) so the wake-up fd is written
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        poller = select.poll()
        poller.register(self.request_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        frames = FrameReader()
        records = self.records
        hold: "float | None" = None  # seconds until the events held are sent (send_events)
        relaunch_left: "float | None" = None  # seconds until a relaunch kept is due
        clear_left: "float | None" = None  # seconds until a stop signal with no "t" is cleared
        while True:
            due = self.ending.check() if self.ending.groups else None
            for left in (hold, relaunch_left, clear_left):
                if left is not None:
                    due = left if due is None else min(due, left)
            if records.pending:
                now = node_clock()
                record_due = records.flush(self.running, now) if now >= records.next_flush else records.next_flush - now
                if record_due is not None:
                    due = record_due if due is None else min(due, record_due)
            events = poller.poll(None if due is None else due * 1000)
            for fd, _ in events:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                data = os.read(self.request_fd, 1 << 16)
                if not data:  # the launcher is gone
                    self.stop_all(ORPHAN_GRACE_SEC)
                    return 1
                for message in frames.feed(data):
                    for command in message:
                        kind = command[0]
                        if kind == "s":
                            self.start(*command[1:])
                        elif kind == "q":
                            self.queue(*command[1:])
                        elif kind == "Q":
                            self.queue_until(*command[1:])
                        elif kind == "c":
                            self.cancel(command[1])
                        elif kind == "k":
                            self.end(command[1], float(command[2]))
                        elif kind == "t":
                            self.answer_stop(float(command[1]))
                            return 0
            self.reap()
            relaunch_left = self.relaunch_kept_due() if self.relaunch_due else None
            clear_left = self._check_stop_clear() if self._stop_clear_at is not None else None
            hold = self.send_events()
            self.unpin()


def _write_script(path: str, text: bytes) -> None:
    """Write a command-line script again for a relaunch (owner-only, as the launcher wrote it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError:  # the relaunch then fails with bash's reason in the output file
        return
    try:
        write_all(fd, text)
    except OSError:
        pass
    finally:
        os.close(fd)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_exists(pgid: int) -> bool:
    """Whether any process (a zombie included) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal (it changed its user): still there
        return True
    return True


def main(argv: list) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    request_fd, reply_fd = int(argv[0]), int(argv[1])
    for fd in (request_fd, reply_fd):
        os.set_inheritable(fd, False)  # the tasks must not hold the launcher's pipes open
    spawner = Spawner(request_fd, reply_fd, sigpipe_ignored=SIGPIPE_IGNORED_ARG in argv[2:],
                      relaunch=parse_relaunch_arg(argv[2:]))
    for sig in (signal.SIGTERM, signal.SIGINT):  # noted, not obeyed (Spawner.stop_signalled)
        signal.signal(sig, spawner.stop_signalled)
    return spawner.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
