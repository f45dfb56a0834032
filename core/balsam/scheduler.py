"""The scheduler driver contract (entry-point group ``balsam.schedulers``).

A scheduler is a set of *pure* functions that render each command (submit, status, delete, history,
backfill, queue and project discovery) and parse its output, plus typed options
(``options_schema``, settings.yml ``scheduler.options``) and an injected :class:`CommandRunner` that
actually runs the commands. Tests feed recorded real outputs to the driver through a replaying
runner (``balsam.testing``) and run it against fake ``qsub``/``squeue`` on PATH; the agent never
sees an exception from a driver method other than :class:`SchedulerError` (whose message goes into
``BatchJob.status_info``).

Subclasses implement the ``render_*``/``parse_*`` pairs and nothing else: the orchestration methods
(``submit``, ``get_statuses``, ``get_histories`` ...) are shared, run each pair inside one error
guard (:meth:`Scheduler.guard`) and keep the one piece of state between calls, the last parsed
status poll (:class:`StatusPoll`), which the history parser receives. A driver keeps no state of
its own. The rare driver that must orchestrate differently overrides a public method and wraps its
body in ``with self.guard("what it does"):``.

The render/parse pairs:

=================================  =====================================================================
``render_submit``/``parse_submit``  ``SubmitRequest`` -> command; output -> the new job's id
``render_status``/``parse_status``  the user's jobs -> ``{id: SchedulerJobStatus}`` of the jobs still in
                                    the queue, or a :class:`StatusPoll` that also says how jobs the
                                    status command still lists in a final state ended and when
                                    the running ones started (or a :class:`PolledStatuses` dict
                                    with those start times)
``render_delete``/``parse_delete``  delete one job (already gone is success)
``render_histories``/               one command for the final record of several jobs (None when the
``parse_histories``                 records are files); parsed with the last status poll at hand
``render_find``/``parse_find``      an earlier submission of a request whose outcome is unknown ->
                                    the ids of the jobs it left (None: cannot look up)
``render_backfill``/                idle nodes -> ``{queue: [BackfillWindow]}``
``parse_backfill``
``never_starts``                    a queued job's status -> whether its scheduler reason says it
                                    can never start as submitted (exceeds a limit)
``waits_for_other_than_nodes``      a queued job's status -> whether it waits for a hold, a
                                    dependency, a begin time or a limit
``submit_time_unknown``             a queued job's status -> whether its queued_time_min 0 is unknown
``render_discover_queues``/         the queues and their limits -> ``{name: AllowedQueue}``
``parse_discover_queues``           (used by :meth:`Scheduler.site_defaults`); ``max_queued_jobs``
                                    None where the scheduler reports no per-user limit (unknown)
``render_discover_projects``/       the user's projects (allocations) -> names
``parse_discover_projects``
=================================  =====================================================================
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, Union

import attrs

from .models import AllowedQueue, BackfillWindow, SchedulerJobStatus
from .options import NoOptions, build_options
from .util import to_tuple
from .states import BatchJobState

logger = logging.getLogger("balsam.scheduler")

__all__ = [
    "ANY_QUEUE",
    "BackfillWindow",
    "Command",
    "CommandResult",
    "CommandRunner",
    "JobHistory",
    "Scheduler",
    "SchedulerError",
    "shell_reported_signal",
    "unknown_outcome_of_signal",
    "SchedulerGuard",
    "START_TIME_SKEW_SEC",
    "STILL_ACTIVE",
    "SchedulerJobStatus",
    "PolledStatuses",
    "StatusPoll",
    "SubmitRequest",
    "subprocess_runner",
    "with_poll_record",
]


#: The :meth:`Scheduler.get_backfill_windows` key of windows usable from any queue (PBS nodes tied
#: to no queue, Slurm's windows under ``queue_flag: --qos``); the elastic queue reads it beside its
#: own queue's.
ANY_QUEUE = "*"

#: The ``status_info`` key that the site agent's scheduler module sets (to ``"true"``: status_info
#: holds strings) on a BatchJob it made submit_failed because the scheduler refused the request for
#: good (``SchedulerError.permanent``, or a request alone over a per-user queue limit), not because a
#: command kept failing (a daemon down for a few cycles): a request as large would be refused again,
#: which the elastic queue reads.
REFUSED_FOR_GOOD = "refused_for_good"

#: The ``max_queued_jobs`` written into settings.yml for a discovered queue whose per-user limit the
#: scheduler does not report (``parse_discover_queues`` gave None: sinfo shows no QOS limits, a PBS
#: queue may state no max_queued) when no platform default states one either. It is a guess, so
#: ``balsam site init`` never takes it as the scheduler's word over a platform's documented limit.
UNREPORTED_MAX_QUEUED_JOBS = 20


class SchedulerError(Exception):
    """A scheduler command failed or printed something we cannot read.

    The message is one line meant for users (it is stored in ``BatchJob.status_info["error"]``).
    ``permanent`` says whether retrying the same request is pointless (e.g. the scheduler refused a
    submission because the queue does not exist) or may work later (a timeout, a daemon restart).

    ``at_queue_limit`` says the scheduler refused a submission only because the user (or their
    group, project or the whole queue) already has as many jobs or resources queued as a limit
    allows: nothing reached the queue, and the same request is accepted once some of those jobs
    leave it, which may take hours. It is neither a failure nor worth a try every cycle: the agent
    keeps the BatchJob waiting and holds back that queue's submissions until the queue shrinks.

    ``per_user_limit`` (with ``at_queue_limit``) says the limit reached counts the submitting user's
    own jobs only (Slurm's QOSMaxSubmitJobPerUserLimit, PBS's per-user max_queued, Cobalt's
    maxqueued), as the driver reads its scheduler's wording: then a refusal while the status poll
    lists none of the user's jobs means that the request alone exceeds the limit, which no wait
    clears. A limit of a group, account, association or project, or of the whole queue, counts other
    users' jobs, which the poll does not list: never "alone". False where the driver cannot tell.

    ``no_room`` says the submission failed only because a file system the submit command itself
    writes (the local queue's state directory) is full or over quota, as the scheduler signals it in
    a way of its own (not a message that merely contains "No space left on device", which a remote
    controller's submit plugin may print for a quota of the job's): nothing reached the queue, and
    the same request is accepted once there is room. The agent keeps the BatchJob waiting, trying
    again after a wait that doubles up to 5 minutes (docs/reliability.md, "When the disk is full").
    False where the driver does not know.
    """

    def __init__(self, message: str, *, permanent: bool = False, at_queue_limit: bool = False,
                 per_user_limit: bool = False, no_room: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent and not at_queue_limit and not no_room
        self.at_queue_limit = at_queue_limit
        self.per_user_limit = at_queue_limit and per_user_limit
        self.no_room = no_room


@attrs.frozen
class Command:
    """A command line to run, with extra environment variables (merged over ``os.environ``)."""

    args: tuple[str, ...] = attrs.field(converter=to_tuple)
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: Optional[Path] = None
    timeout: float = 60.0
    #: Variables removed from the inherited environment (e.g. a user's SQUEUE_FORMAT or
    #: SQUEUE_PARTITION, which would change what the command prints).
    unset_env: tuple[str, ...] = attrs.field(converter=to_tuple, default=())


@attrs.frozen
class CommandResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """One line: the command, its exit code and the first line of what it said."""
        said = (self.stderr.strip() or self.stdout.strip()).splitlines()
        first = said[0] if said else "no output"
        return f"`{' '.join(self.args[:1])}` exited {self.returncode}: {first}"


class CommandRunner(Protocol):
    def __call__(self, command: Command) -> CommandResult: ...


#: Popen options that start a scheduler command as the leader of a process group of its own,
#: still in the agent's session. A terminal signals its foreground process group (Ctrl-C: SIGINT),
#: and a shell whose terminal or ssh session closes sends SIGHUP to its jobs (their groups): with
#: the agent's group, the command died of either (a submit cut between queueing the job and
#: printing its id leaves a job nobody knows of). Out of that group, no terminal-generated signal
#: reaches it, whatever the command does with its signal mask (dash, the /bin/sh of Debian and
#: Ubuntu, clears the mask, so blocking SIGINT did not protect a ``#!/bin/sh`` site wrapper around
#: qsub). A session of its own is avoided: ``balsam site stop --force`` ends the agent's
#: descendants of its session (:func:`balsam.site.site_ops.stop_agent`), and a local batch job is
#: told apart from a command by the session of its own the local scheduler gives it.
if sys.version_info >= (3, 11):
    _OWN_GROUP: dict[str, Any] = {"process_group": 0}
else:  # pragma: no cover - Python 3.10: setpgid(0, 0) in the child before its exec
    _OWN_GROUP = {"preexec_fn": os.setpgrp}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command and what it started in its group (a wrapper's qsub, which would hold
    the output pipes open and run on). Its group id stays taken while a member lives, so the
    signal reaches no process of anyone else's."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # all gone already
        proc.kill()


#: Seconds the processes an exited command left in its group get to end on SIGTERM before SIGKILL.
LEFTOVER_GRACE_SEC = 1.0
#: How often a running command is checked for having been stopped (see :func:`_stopped_member`).
STOP_CHECK_SEC = 1.0


#: Where the process table is read (Linux's procfs; a test points it at a missing folder: a host
#: without one, macOS).
_PROC = "/proc"
#: What the kernel keeps below the pids it gives again once it reached ``pid_max`` (RESERVED_PIDS).
_RESERVED_PIDS = 300
#: The most pids given since a command's that a look at its group opens one by one (a failed open
#: for each one not in use, about 2 us); past it /proc is listed (about 0.3 us a process).
_OPEN_MAX = 64
#: The numbers a process may hold taken: its pid, and its group's and session's, which stay taken
#: while a member lives after the leader exited (see :func:`_pids_given_since`).
_IDS_PER_TASK = 3


def _read_proc(name: str) -> Optional[bytes]:
    try:
        with open(f"{_PROC}/{name}", "rb") as fp:
            return fp.read()
    except OSError:
        return None


def _proc_int(name: str) -> Optional[int]:
    data = _read_proc(name)
    text = data.strip().decode("ascii", "replace") if data is not None else ""
    return int(text) if text.isdecimal() else None


def _forks() -> Optional[int]:
    """How many processes (and threads) the host started since it booted (/proc/stat's
    ``processes``); None where that cannot be read."""
    data = _read_proc("stat")
    for line in (data or b"").splitlines():
        if line.startswith(b"processes "):
            count = line.split()[1].decode("ascii", "replace")
            return int(count) if count.isdecimal() else None
    return None


def _pid_use() -> Optional[tuple[int, int]]:
    """The host's processes started since boot (:func:`_forks`) and its tasks now (processes and
    threads, zombies included: /proc/loadavg's 4th field's total); None where either cannot be read."""
    forks = _forks()
    fields = (_read_proc("loadavg") or b"").split()
    total = fields[3].rpartition(b"/")[2].decode("ascii", "replace") if len(fields) > 3 else ""
    if forks is None or not total.isdecimal():
        return None
    return forks, int(total)


def _pids_given_since(pgid: int, before: Optional[tuple[int, int]], forks: Optional[int],
                      last: Optional[int], pid_max: Optional[int]) -> Optional[tuple[range, ...]]:
    """Which pids the kernel gave out since it gave ``pgid``, a command's: where its group's other
    members are (see :func:`_listed_alive`). None: every pid (a figure could not be read, or the
    kernel may have come round the whole pid space again since).

    The kernel gives pids in turn, each the next one not taken after the last given (``last``,
    ns_last_pid), from ``_RESERVED_PIDS`` again after ``pid_max - 1``. While
    it did not come round past ``pgid`` again, the pids given since are those after ``pgid`` up to
    ``last``: ``(pgid, last]``, or ``(pgid, pid_max)`` and ``[1, last]`` where ``last < pgid`` (it
    wrapped once). A whole round steps over every pid of the round, ``pid_max - _RESERVED_PIDS``
    of them: each one either given since the command started (counted by the host's processes
    counter: ``forks``, read with ``last``, less ``before[0]``, read before the command
    started) or skipped as taken; a taken one that was not given since was taken already when the
    command started, as the pid, group or session id of one of the host's tasks then
    (``before[1]``). So no round was made while ``forks - before[0] + _IDS_PER_TASK * before[1]``
    stays below ``pid_max - _RESERVED_PIDS``. The counters are the host's (every pid namespace):
    never fewer than this namespace's. Not counted: a fork the kernel refused after it gave the
    pid (a cgroup's pids.max), which moves the turn on too."""
    if before is None or forks is None or last is None or pid_max is None:
        return None
    started, tasks = before
    if forks - started + _IDS_PER_TASK * tasks >= pid_max - _RESERVED_PIDS:
        return None
    if last >= pgid:
        return (range(pgid + 1, last + 1),)
    return range(pgid + 1, pid_max), range(1, last + 1)


def _no_reap() -> None:
    pass


def _group_alive(pgid: int, before: Optional[tuple[int, int]] = None,
                 reap: Callable[[], object] = _no_reap) -> bool:
    """Whether process group ``pgid``, an exited command's (its pid: ``_OWN_GROUP``), has a member
    that has not exited, other than the command. /proc says which members are zombies (a zombie
    re-parented to init: srun's helper, which a container's init reaps 1-2 s later; counted, every
    such command was warned about and waited for 1 s), among them the command itself, not yet
    reaped (:class:`_CommandOutput`). Where /proc cannot be read (macOS), ``killpg(pgid, 0)``'s
    word, which counts every member, zombies too: the command is reaped (``reap``) first, so that
    it is not counted (as before it was kept unreaped: its group then is no one's that a stop of
    the agent finds). ``before``: :func:`_pid_use` before the command started."""
    listed = _listed_alive(pgid, before)
    if listed is not None:
        return listed
    reap()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member of another user (a setuid helper): still a member
        return True
    return True


def _listed_alive(pgid: int, before: Optional[tuple[int, int]]) -> Optional[bool]:
    """Whether /proc lists a member of ``pgid`` that has not exited, other than its leader; None
    where /proc cannot be listed. Its members were started after it (its children and theirs: a
    process joins another group only by ``setpgid``, of itself or of a child before its exec, which
    is what a shell does for its jobs, never for another group's; nothing but the command's own
    takes its group), so only the processes holding pids given out since
    (:func:`_pids_given_since`) are read, where a read of every process cost a busy login node
    15 ms of CPU per command at 1,600 processes: up to :data:`_OPEN_MAX` pids opened one by one,
    past it one listing of /proc and a read of those listed in the range (else a failed open
    for each pid not in use: 7.6 ms of CPU for 4,096)."""
    given = _pids_given_since(pgid, before, _forks(), _proc_int("sys/kernel/ns_last_pid"),
                              _proc_int("sys/kernel/pid_max"))
    if given is not None and sum(len(span) for span in given) <= _OPEN_MAX:
        names = [str(pid) for span in given for pid in span]
    else:
        try:
            entries = os.listdir(_PROC)
        except OSError:
            return None
        names = [entry for entry in entries
                 if entry.isdecimal() and (given is None or any(int(entry) in span for span in given))]
    group, own = b"%d" % pgid, str(pgid)
    for name in names:
        if name == own:  # the command itself, exited: checked by the caller
            continue
        data = _read_proc(f"{name}/stat")
        if data is None:
            continue  # no such process (a pid not in use), gone meanwhile, or not ours to read
        # After the command name: state, ppid, pgrp.
        fields = data.rsplit(b")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == group and fields[0] != b"Z":
            return True
    return False


def _end_group_leftovers(command: Command, pgid: int, before: Optional[tuple[int, int]] = None,
                         reap: Callable[[], object] = _no_reap) -> None:
    """End what an exited command left in its process group: a ``(helper &)`` whose output went to
    /dev/null outlives it there, unseen by ``communicate``; run every poll, one more process was left
    each time, and since the command is no longer the agent's descendant, no ``balsam site stop``
    found it. ``pgid`` is the command's pid, exited but not yet reaped (:class:`_CommandOutput`;
    where /proc cannot be read, reaped by ``reap``: see :func:`_group_alive`): the kernel gives
    that number to no new process while the command's zombie or a member of the group lives, so
    the signal reaches only what the command started. SIGTERM
    first (with SIGCONT, for a stopped one), so that a helper may clean up (a lock, a temporary
    file); SIGKILL for what is still there after :data:`LEFTOVER_GRACE_SEC`. A daemon that meant to
    outlive the command (``ssh -o ControlPersist``, an agent) starts a session of its own and is not
    in the group."""
    if not _group_alive(pgid, before, reap):
        return
    logger.warning("`%s` exited and left processes in its process group: ending them", command.args[0])
    try:
        os.killpg(pgid, signal.SIGTERM)
        os.killpg(pgid, signal.SIGCONT)
    except OSError:
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_SEC
    while _group_alive(pgid, before, reap) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass  # all gone


def _stopped_member(pid: int) -> bool:
    """Whether the command ``pid`` or one of its descendants is stopped (``T``). Out of the
    terminal's foreground group (``_OWN_GROUP``), a process that reads the terminal (a password
    prompt of ssh, kinit, getpass) gets SIGTTIN, and one that changes its modes (turning echo off)
    SIGTTOU: stopped, it would never go on, and only the timeout ended it, a minute later. Only
    processes of the command's session count: no terminal stops another session's (a batch job the
    local scheduler starts in a session of its own)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        members = [proc, *proc.children(recursive=True)]
        session = os.getsid(pid)
    except (OSError, psutil.Error):
        return False
    for member in members:
        try:
            if member.status() == psutil.STATUS_STOPPED and os.getsid(member.pid) == session:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _stopped_error(command: Command) -> SchedulerError:
    return SchedulerError(f"`{command.args[0]}` was stopped: it (or a process it started) tried to use the "
                          "terminal (a password or passphrase prompt?); make the command non-interactive "
                          "(ssh keys, a Kerberos ticket, no prompts)")


class _CommandOutput:
    """A running command's output, read until its pipes close, and its exit, seen without reaping
    it (``waitid`` with ``WNOWAIT``). Until the runner reaps it, the exited command stays the
    agent's child (a zombie), and its group one that a stop of the agent finds
    (:func:`balsam.site.site_ops.agent_command_groups`): reaped before what it left in its group was
    ended, a ``--force`` stop that killed the agent in between found that group nowhere, and the
    command's ``(helper &)`` ran on. Where ``waitid`` is missing, the exit is seen by reaping.
    :attr:`returncode` is the one seen then: the agent's shutdown (``kill_descendants``) may reap
    the command before ``Popen.wait`` does, which then takes it for an exit 0."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self._chunks: dict[Any, list[bytes]] = {proc.stdout: [], proc.stderr: []}
        self._open = list(self._chunks)  # the pipes not yet at their end
        #: Popen's, the negative signal number for a command a signal ended; None while it runs,
        #: and for one reaped by another before its exit was seen here (its outcome is unknown).
        self.returncode: Optional[int] = None
        self.exited = False

    def wait(self, timeout: float) -> bool:
        """Read for up to ``timeout`` seconds; whether the pipes are closed and the command exited."""
        end = time.monotonic() + timeout
        if self._open:
            with selectors.DefaultSelector() as selector:
                for pipe in self._open:
                    selector.register(pipe, selectors.EVENT_READ)
                while self._open:
                    ready = selector.select(max(0.0, end - time.monotonic()))
                    for key, _events in ready:
                        data = os.read(key.fd, 32768)
                        if data:
                            self._chunks[key.fileobj].append(data)
                        else:
                            selector.unregister(key.fileobj)
                            self._open.remove(key.fileobj)
                    # After the reads too: a command that keeps its pipes full is never idle.
                    if self._open and time.monotonic() >= end:
                        return False
        delay = 0.0005  # as Popen.wait with a timeout: polls, from short to at most 50 ms
        while not self._exited():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            if not self._wait_for_exit(remaining):
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.05)
        return True

    def _wait_for_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, woken by the command's exit (a pidfd, Linux 5.3+: unlike
        a poll's sleep, whose oversleeping on a busy host made each command slower than
        ``Popen.wait``); False where there is none to wait on."""
        try:
            pidfd = os.pidfd_open(self._proc.pid)
        except (AttributeError, OSError):  # not Linux, an old kernel, or reaped already
            return False
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll(timeout * 1000)
        finally:
            os.close(pidfd)
        return True

    def _exited(self) -> bool:
        if self.exited:
            return True
        try:
            if not hasattr(os, "waitid") or not hasattr(os, "WNOWAIT"):  # macOS before Python 3.13
                pid, status = os.waitpid(self._proc.pid, os.WNOHANG)
                if pid == 0:
                    return False
                self.returncode = self._proc.returncode = os.waitstatus_to_exitcode(status)
            else:
                info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if info is None:
                    return False
                self.returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        except ChildProcessError:  # reaped by another (the agent stopping): its exit status is lost
            pass
        self.exited = True
        return True

    def text(self, pipe: Any) -> str:
        """What the command wrote to ``pipe``, decoded as ``Popen(encoding="utf-8",
        errors="replace")`` does, universal newlines included: one stray byte in a job name must
        not make the whole output unreadable."""
        data = b"".join(self._chunks[pipe]).decode("utf-8", errors="replace")
        return data.replace("\r\n", "\n").replace("\r", "\n")


def reset_ignored_sigchld() -> bool:
    """Set SIGCHLD back to its default action where this process was started with it ignored
    (SIG_IGN survives exec: a parent, a batch system's or a wrapper's, that ignored it): then the
    kernel discards the exit status of every child the moment it exits, and no command
    :func:`subprocess_runner` runs has an outcome it can read. For the main thread at a program's
    start (the agent's, the CLI's); whether it was reset (not from another thread: signal.signal
    refuses, and the runner's error then says why every command failed)."""
    if not hasattr(signal, "SIGCHLD") or signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN:
        return False
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread
        return False
    return True


def subprocess_runner(command: Command) -> CommandResult:
    """Run a command for real, in a process group of its own (see ``_OWN_GROUP``). A missing
    executable, a timeout or a command stopped by the terminal comes back as a SchedulerError.
    Processes the command left in its group when it exited are ended (:func:`_end_group_leftovers`)
    before it is reaped (:class:`_CommandOutput`)."""
    env = {**os.environ, **command.env}
    for name in command.unset_env:
        env.pop(name, None)
    before = _pid_use()  # before the command starts: see _pids_given_since
    try:
        proc = subprocess.Popen(
            list(command.args),
            env=env,
            cwd=command.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            **_OWN_GROUP,
        )
    except FileNotFoundError:
        raise SchedulerError(f"`{command.args[0]}` was not found on PATH", permanent=True) from None
    deadline = time.monotonic() + command.timeout
    with proc:  # as subprocess.run, but the whole group is killed on a timeout or any exception while waiting
        try:
            output = _CommandOutput(proc)
            # In slices, to notice a command the terminal stopped.
            while not output.wait(max(0.0, min(STOP_CHECK_SEC, deadline - time.monotonic()))):
                if _stopped_member(proc.pid):
                    _kill_group(proc)
                    proc.wait()
                    raise _stopped_error(command)
                if time.monotonic() >= deadline:
                    _kill_group(proc)
                    proc.wait()
                    raise SchedulerError(f"`{command.args[0]}` did not answer within {command.timeout:.0f} s")
        except SchedulerError:
            raise
        except BaseException:
            _kill_group(proc)
            raise
        _end_group_leftovers(command, proc.pid, before, proc.wait)
    # Reaped by the with's exit (Popen.wait), once nothing the command left in its group runs.
    if output.returncode is None:
        # Not an exit 0 (Popen's word for a child another reaped): a submit may have queued the job.
        if hasattr(signal, "SIGCHLD") and signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
            raise SchedulerError(f"`{command.args[0]}`'s exit status cannot be read: this process ignores SIGCHLD "
                                 "(SIG_IGN, as inherited across exec from what started it), so the kernel discards "
                                 "every child's exit status: its outcome is unknown (run it with SIGCHLD at default)")
        raise SchedulerError(f"`{command.args[0]}` was reaped elsewhere (the agent's shutdown ending its children) "
                             "before its exit status was read: its outcome is unknown")
    return CommandResult(tuple(command.args), output.returncode, output.text(proc.stdout), output.text(proc.stderr))


def shell_reported_signal(result: CommandResult) -> Optional[int]:
    """The signal a shell's exit status says ended the command, when that is all the command said.

    A ``#!/bin/sh`` wrapper that runs qsub without ``exec`` exits 128+N when qsub is ended by signal
    N (the OOM killer, a watchdog), printing nothing or only its notice (bash: ``line 2: 1234
    Killed  qsub ...``; ``Terminated``, ``Hangup``): qsub had no say, and may have queued the job
    before it died. None when the status is not in 129..128+NSIG or the command printed anything
    else (a scheduler's refusal names its reason: a PBS qsub's own exit status can be above 128)."""
    number = result.returncode - 128
    if not 0 < number < getattr(signal, "NSIG", 65):
        return None
    description = signal.strsignal(number) if hasattr(signal, "strsignal") else None
    lines = [ln for ln in (result.stderr + "\n" + result.stdout).splitlines() if ln.strip()]
    if lines and (not description or not all(description in ln for ln in lines)):
        return None
    return number


def unknown_outcome_of_signal(result: CommandResult, number: int) -> SchedulerError:
    """The not-permanent error for :func:`shell_reported_signal`'s case."""
    return SchedulerError(f"`{result.args[0] if result.args else 'the command'}` exited with status "
                          f"{result.returncode}, a shell's word for a command ended by signal "
                          f"{_signal_name(number)}, with no answer of the scheduler: its outcome is unknown")


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


@attrs.frozen
class SubmitRequest:
    """Everything a scheduler needs to submit one BatchJob's rendered script."""

    script_path: Path
    project: str
    queue: str
    num_nodes: int
    wall_time_min: int
    job_name: str = "balsam"
    optional_params: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class JobHistory:
    """What the scheduler's history/accounting says about a job that left the queue.

    ``state`` is finished, or submit_failed when the scheduler never ran it; or queued/running when
    the history says the job is still active, i.e. the status poll missed it (an empty or cut
    qstat): the agent then keeps the BatchJob as it is rather than counting the job as gone, until
    the job is past its wall time.
    """

    scheduler_id: int
    state: BatchJobState
    start_time: Optional[dt.datetime] = None
    end_time: Optional[dt.datetime] = None
    #: The scheduler's own final state and reason, e.g. "TIMEOUT" or "CANCELLED by 0".
    native_state: str = ""
    message: str = ""


#: JobHistory states that say the job is still active (the status poll missed it).
STILL_ACTIVE = (BatchJobState.queued, BatchJobState.running)


def with_poll_record(history: Optional[JobHistory], ended: Optional[JobHistory]) -> Optional[JobHistory]:
    """A job's history, or what the last status poll said of its end (``StatusPoll.ended``) when
    the history has no record or still says queued/running: a final record of the poll beats a
    history that lags (sacct behind a busy slurmdbd says RUNNING after squeue showed COMPLETED)."""
    return ended if ended is not None and (history is None or history.state in STILL_ACTIVE) else history


def _set_or_usual(field: "attrs.Attribute", value: Any) -> bool:
    """attrs.asdict filter: a field marked ``omit_if_default`` only when it is not its default."""
    return not (field.metadata.get("omit_if_default") and value == field.default)


def _frozen_mapping(value: Optional[Mapping]) -> Mapping:
    return MappingProxyType(dict(value or {}))


#: Seconds by which the scheduler's start time of a job (``StatusPoll.start_times``) may lie past
#: the agent's clock, or before the BatchJob's submission as the agent recorded it, and still be
#: taken for the scheduler's clock being a little off (as PBS's CLOCK_SLACK_SEC). Further off, it
#: is garbage or a clock far off: the agent's own sighting of the job running is the start.
START_TIME_SKEW_SEC = 120


@attrs.frozen
class StatusPoll:
    """What one status poll said: the jobs still in the queue and, for status commands that also
    list jobs that just ended (squeue keeps them for MinJobAge seconds), how those ended.

    ``parse_status`` returns one (or a plain ``statuses`` dict); the base class keeps the last one
    and passes it to ``parse_histories`` and falls back on ``ended`` when the history command has
    no record (accounting disabled, or behind) or fails.
    """

    time: dt.datetime
    statuses: Mapping[int, SchedulerJobStatus] = attrs.field(factory=dict, converter=_frozen_mapping)
    ended: Mapping[int, JobHistory] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: Optional: for a driver whose job's queue does not say which nodes it may take (Slurm under
    #: ``queue_flag: --qos``: the queue is a QOS, the nodes are its partition's), the node pools
    #: each listed job waits for or runs on, by scheduler id (several where it may start in any
    #: of them). Empty where the queue says it: the elastic queue then matches by queue alone.
    node_pools: Mapping[int, tuple[str, ...]] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: Optional: the scheduler's own start time (aware UTC) of listed running jobs, by scheduler id
    #: (squeue's %S, qstat's stime, the local queue's record), where it reports one. The agent
    #: takes it for ``BatchJob.start_time`` when a poll first shows the job running: its own
    #: sighting is up to ``sync_period`` late. Not part of ``SchedulerJobStatus`` (Balsam 0.7's
    #: wire model, which has no such key). Empty: the agent's sighting is the start. A naive
    #: datetime is not taken (``datetime.fromtimestamp(epoch)`` is the agent's local time, which
    #: read as UTC is hours off unnoticed): the agent logs it and uses its sighting.
    start_times: Mapping[int, dt.datetime] = attrs.field(factory=dict, converter=_frozen_mapping)


class PolledStatuses(dict):
    """``parse_status``'s ``{scheduler_id: SchedulerJobStatus}`` (a plain dict to every reader)
    that also carries the scheduler's start times of its running jobs (``start_times``, as
    :attr:`StatusPoll.start_times`): for a driver that needs no other StatusPoll field, so that
    its parse_status keeps returning the dict its callers and tests read."""

    def __init__(self, statuses: Optional[Mapping[int, SchedulerJobStatus]] = None, *,
                 start_times: Optional[Mapping[int, dt.datetime]] = None) -> None:
        super().__init__(statuses or {})
        self.start_times: Mapping[int, dt.datetime] = dict(start_times or {})

    # dict's own copy() and == know nothing of start_times: a copy lost them, and two polls that
    # differ only in them compared equal. (dict(p) and a comprehension still give a plain dict.)
    def copy(self) -> "PolledStatuses":
        return PolledStatuses(self, start_times=self.start_times)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PolledStatuses):
            return dict.__eq__(self, other) and dict(self.start_times) == dict(other.start_times)
        return dict.__eq__(self, other)  # a plain dict: the statuses alone, as before

    def __ne__(self, other: object) -> bool:  # dict defines its own __ne__: keep the two consistent
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal


#: The poll before the first poll: nothing known.
_NO_POLL = StatusPoll(time=dt.datetime.min.replace(tzinfo=dt.timezone.utc))


class Scheduler(abc.ABC):
    """Base class of scheduler drivers. Subclasses set ``name`` and implement render/parse pairs."""

    #: The driver name used in ``settings.yml`` (``scheduler: {name: slurm}``).
    name: ClassVar[str] = ""
    #: The Jinja2 text of the default ``job-template.sh`` for this scheduler (see docs/job-template.md).
    default_job_template: ClassVar[str] = ""
    #: How many consecutive failed status polls are tolerated before BatchJobs are marked failed.
    status_error_threshold: ClassVar[int] = 3
    #: The attrs class of this driver's options (``scheduler.options`` in settings.yml); see balsam.options.
    options_schema: ClassVar[type] = NoOptions

    def __init__(
        self, runner: CommandRunner = subprocess_runner, *, user: Optional[str] = None, options: Any = None
    ) -> None:
        self.options = build_options(self.options_schema, options, where="scheduler.options")
        self.runner = runner
        self.user = user or os.environ.get("USER") or _current_user()
        #: The last parsed status poll (the one piece of state, kept by the base class).
        self.last_poll: StatusPoll = _NO_POLL

    # -- pure render/parse pairs (override these) ----------------------------------------------
    @abc.abstractmethod
    def render_submit(self, request: SubmitRequest) -> Command:
        ...

    @abc.abstractmethod
    def parse_submit(self, result: CommandResult) -> int:
        ...

    @abc.abstractmethod
    def render_status(self, user: str) -> Command:
        ...

    @abc.abstractmethod
    def parse_status(
        self, result: CommandResult, now: dt.datetime
    ) -> Union[Mapping[int, SchedulerJobStatus], StatusPoll]:
        """The jobs still in the queue, or a StatusPoll when the output also tells how some ended."""

    @abc.abstractmethod
    def render_delete(self, scheduler_id: int) -> Command:
        ...

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        if result.returncode != 0:
            raise SchedulerError(f"could not delete job {scheduler_id}: {result.describe()}")

    def render_histories(self, jobs: Mapping[int, Optional[Path]]) -> Optional[Command]:
        """One command that reads the final record of several jobs (``{scheduler_id: script_path}``),
        or None when the records are files next to the scripts (or there are none)."""
        return None

    def parse_histories(
        self, result: Optional[CommandResult], jobs: Mapping[int, Optional[Path]], last_poll: StatusPoll
    ) -> dict[int, Optional[JobHistory]]:
        """``{scheduler_id: JobHistory or None}`` for every job asked (None: the scheduler has no
        record of it yet, or it is still queued or running). ``result`` is None when
        ``render_histories`` returned None. ``last_poll`` is the last status poll (the base class
        already falls back on its ``ended`` records for the jobs left at None).

        The default, for schedulers with no history: a job that left the queue simply finished.
        """
        return {scheduler_id: JobHistory(scheduler_id=scheduler_id, state=BatchJobState.finished) for scheduler_id in jobs}

    def render_find(self, request: SubmitRequest, user: str) -> Optional[Command]:
        """The command that lists the user's jobs that ``request`` may already have submitted (its
        ``job_name``, and where the scheduler shows it, its script or directory): queued, running or
        recently ended. Asked when a submission's outcome is unknown (the agent stopped while the
        submit command ran, or the command timed out), so that the BatchJob is not submitted twice.
        None: this scheduler cannot look jobs up like that (the agent submits again, as before)."""
        return None

    def parse_find(self, result: CommandResult, request: SubmitRequest) -> list[int]:
        """The ids of the jobs ``render_find``'s command listed (empty: none was submitted)."""
        return []

    def never_starts(self, status: SchedulerJobStatus) -> bool:
        """Whether a queued job can never start as it was submitted, per the scheduler's own word on
        why it waits (``status.message``): it asks for more than its queue, partition, account or QOS
        allows, so it waits for ever instead of for its turn. Pure; each driver knows its own words.
        The default, for a scheduler that does not say: False (it may start)."""
        return False

    def waits_for_other_than_nodes(self, status: SchedulerJobStatus) -> bool:
        """Whether a queued job waits for something other than free nodes and its turn: a hold, a
        dependency, a begin time, a per-user/account/QOS limit, a reservation or a partition that
        is down. Such a job does not take nodes that come free now: the elastic queue does not
        count it as claiming a backfill window. Each driver knows its own words. The default, for
        a scheduler that does not say: False."""
        return False

    def submit_time_unknown(self, status: SchedulerJobStatus) -> bool:
        """Whether the scheduler did not give this queued job's submit time: its
        ``queued_time_min`` 0 means unknown, not just submitted. Apart from
        ``waits_for_other_than_nodes``: the elastic queue counts a job of unknown wait that it did
        not make as claiming no window, but knows the age of its own requests. Default: False."""
        return False

    def render_backfill(self) -> Optional[Command]:
        return None

    def parse_backfill(self, result: CommandResult) -> dict[str, list[BackfillWindow]]:
        return {}

    def render_discover_queues(self) -> Optional[Command]:
        """The command that lists the queues (partitions) and their limits; None: not supported."""
        return None

    def parse_discover_queues(self, result: CommandResult) -> dict[str, AllowedQueue]:
        return {}

    def render_discover_projects(self) -> Optional[Command]:
        return None

    def parse_discover_projects(self, result: CommandResult) -> list[str]:
        return []

    # -- orchestration through the injected runner -------------------------------------------
    # Every method below raises only SchedulerError: a parser that trips over output nobody
    # anticipated must not take the agent down (see guard).
    def guard(self, what: str) -> "SchedulerGuard":
        """``with self.guard("status poll"):`` turns any exception but SchedulerError raised in the
        block into a one-line SchedulerError naming the driver and ``what``. For the rare driver
        that overrides an orchestration method below."""
        return SchedulerGuard(self, what)

    def run(self, command: Command) -> CommandResult:
        """Run ``command`` through the runner. A command that a signal ended (a negative
        returncode: the OOM killer, a site's watchdog, a kill by hand) raises a SchedulerError that
        is not permanent, for every driver: it had no say, so what it did is unknown (a qsub or
        sbatch may have queued the job without printing its id). Read as a refusal, the submission
        lost its ``.submitting`` marker and its launcher credential and the BatchJob became
        submit_failed while its job could be queued; not permanent, the marker is kept and the
        scheduler is asked for the job (``find_submitted``) before anything is submitted again.
        (An exit status above 128, a shell's word for a child a signal ended, is left to the
        drivers: it is also a scheduler's own exit code for a refusal.)"""
        result = self.runner(command)
        if result.returncode < 0:
            raise SchedulerError(f"`{' '.join(command.args[:1])}` was ended by signal "
                                 f"{_signal_name(-result.returncode)} before it answered: its outcome is unknown")
        return result

    def submit(self, request: SubmitRequest) -> int:
        with self.guard("submit"):
            result = self.run(self.render_submit(request))
            return self.parse_submit(result)

    def get_statuses(self, now: Optional[dt.datetime] = None) -> dict[int, SchedulerJobStatus]:
        """One bulk poll of all the user's jobs still in the queue. Raises SchedulerError when the
        poll itself failed. The poll is kept (``last_poll``) for the next history lookup."""
        now = now or dt.datetime.now(dt.timezone.utc)
        with self.guard("status poll"):
            parsed = self.parse_status(self.run(self.render_status(self.user)), now)
            poll = parsed if isinstance(parsed, StatusPoll) else StatusPoll(
                time=now, statuses=parsed, start_times=getattr(parsed, "start_times", None))
            statuses = {i: s for i, s in poll.statuses.items() if s.state is not BatchJobState.finished}
        self.last_poll = poll
        return statuses

    def find_submitted(self, request: SubmitRequest) -> Optional[list[int]]:
        """The ids (lowest first) of the jobs an earlier submission of ``request`` left in the
        scheduler, ``[]`` when there are none, None when the scheduler cannot tell (no
        ``render_find``). Raises SchedulerError when the lookup itself failed."""
        with self.guard("lookup of an earlier submission"):
            command = self.render_find(request, self.user)
            if command is None:
                return None
            return sorted(set(self.parse_find(self.run(command), request)))

    def delete_job(self, scheduler_id: int) -> None:
        with self.guard(f"delete of job {scheduler_id}"):
            self.parse_delete(self.run(self.render_delete(scheduler_id)), scheduler_id)

    def get_history(self, scheduler_id: int, script_path: Optional[Path] = None) -> Optional[JobHistory]:
        """The history of one job (see :meth:`get_histories`)."""
        return self.get_histories({scheduler_id: script_path})[scheduler_id]

    def get_histories(
        self, jobs: Mapping[int, Optional[Path]], last_poll: Optional[StatusPoll] = None
    ) -> dict[int, Optional[JobHistory]]:
        """History of jobs that left the queue: ``{scheduler_id: script_path}`` in (one command for
        all), ``{scheduler_id: JobHistory or None}`` out (None: no record yet; a JobHistory in state
        queued or running: the history says the job is still active).

        Jobs the history has no record of take what the last status poll said of their end
        (``StatusPoll.ended``); when the lookup fails, those are returned if there are any, and the
        SchedulerError is raised otherwise.
        """
        if not jobs:
            return {}
        poll = last_poll if last_poll is not None else self.last_poll
        fallback = {scheduler_id: poll.ended.get(scheduler_id) for scheduler_id in jobs}
        try:
            with self.guard("history lookup"):
                command = self.render_histories(jobs)
                result = self.run(command) if command is not None else None
                parsed = self.parse_histories(result, jobs, poll)
                histories = {scheduler_id: parsed.get(scheduler_id) for scheduler_id in jobs}
        except SchedulerError as exc:
            if not any(fallback.values()):
                raise
            logger.warning("%s; using the last status poll's record of the jobs that ended", exc)
            return fallback
        return {i: with_poll_record(histories[i], fallback[i]) for i in jobs}

    def get_backfill_windows(self) -> dict[str, list[BackfillWindow]]:
        with self.guard("backfill query"):
            command = self.render_backfill()
            if command is None:
                return {}
            return self.parse_backfill(self.run(command))

    def discover_queues(self) -> dict[str, AllowedQueue]:
        with self.guard("queue discovery"):
            command = self.render_discover_queues()
            if command is None:
                return {}
            return self.parse_discover_queues(self.run(command))

    def discover_projects(self) -> list[str]:
        with self.guard("project discovery"):
            command = self.render_discover_projects()
            if command is None:
                return []
            return self.parse_discover_projects(self.run(command))

    # -- on the login node (site init) ----------------------------------------------------------
    def site_defaults(self, unreported_max_queued_jobs: Optional[int] = UNREPORTED_MAX_QUEUED_JOBS) -> dict[str, Any]:
        """What this scheduler contributes to a new site's settings.yml (``balsam site init``), in
        settings.yml shape: its name, and the queues (with their limits) and projects it can
        discover on this machine. A discovery that fails is left out (logged): site init must work
        off the machine too, and a platform plugin's defaults are applied over these.

        A queue's ``max_queued_jobs`` that the scheduler does not report is
        ``unreported_max_queued_jobs``; site init passes None (left None) so that it can tell a
        reported limit from a guess when it merges the platform's limits.
        """
        section: dict[str, Any] = {"name": self.name}
        try:
            queues = self.discover_queues()
        except SchedulerError as exc:
            logger.info("site defaults: no queues discovered (%s)", exc)
            queues = {}
        if queues:
            # A limit newer than settings.yml's usual shape (min_nodes) only where one was discovered.
            section["allowed_queues"] = {name: attrs.asdict(limits, filter=_set_or_usual) for name, limits in queues.items()}
            for limits in section["allowed_queues"].values():
                if limits.get("max_queued_jobs") is None:
                    limits["max_queued_jobs"] = unreported_max_queued_jobs
        try:
            projects = self.discover_projects()
        except SchedulerError as exc:
            logger.info("site defaults: no projects discovered (%s)", exc)
            projects = []
        if projects:
            section["allowed_projects"] = list(projects)
        return {"scheduler": section}


class SchedulerGuard:
    """Turn anything but a SchedulerError raised inside the block into a one-line SchedulerError
    (``Scheduler.guard(what)`` makes one)."""

    def __init__(self, scheduler: "Scheduler", what: str) -> None:
        self.scheduler = scheduler
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, SchedulerError) or not isinstance(exc, Exception):
            return False
        name = self.scheduler.name or type(self.scheduler).__name__
        raise SchedulerError(f"{name} {self.what} failed: {type(exc).__name__}: {exc}") from exc


def _current_user() -> str:
    import getpass

    return getpass.getuser()


# Helpers shared by scheduler drivers ------------------------------------------------------------


def format_walltime(wall_time_min: int) -> str:
    """Minutes -> ``HH:MM:00`` (hours may exceed 24, as PBS and Cobalt accept)."""
    return f"{wall_time_min // 60:02d}:{wall_time_min % 60:02d}:00"

