"""The serial mode's master and workers: many single-rank tasks packed on every node of a partition.

:class:`~balsam.launcher.modes.serial.SerialMode` runs them one of two ways:

- **With MPI** (the general case): the platform's MPI launcher starts one rank per node,
  ``<mpi line> python -m balsam.launcher.modes.serial_worker CONFIG.json``. Rank 0 is the
  :class:`Master`, the other ranks are :class:`Worker` s; they talk over mpi4py
  (:class:`MPITransport`: many tasks per message, reports in batches).
- **Without MPI**: a one-node partition on the launcher's own node, on a platform that declares
  ``serial_workers_without_mpi`` (the launcher runs on the compute node itself). The master runs
  inside the launcher process over a :class:`LocalTransport`: no MPI start-up, no second Python.

Start check (Balsam 0.7 degraded silently here): before any job is leased, every rank says which
host it runs on and :func:`rank_for_node` checks that there is exactly one rank per node of the
partition (and, where the node names can be compared with the ranks' host names, one on each node).
Otherwise the launch fails loudly: the reason goes to the master log, the ``start-error`` file that
SerialMode reads, and from there into the BatchJob's ``status_info``.

Threads of the master (each with one job): the **loop thread** (:meth:`Master.run`) alone owns the
NodeManager's occupancy, the pending deque, the process pool and the transport; the
:class:`~balsam.launcher.prefetch.Prefetcher` thread leases and prepares jobs ahead (its hand-over
contract is in its module); the pool's reader thread (:class:`~balsam.launcher.runner.SpawnerPool`)
collects what the spawner process reports and sets ``wake``; the BulkStatusUpdater thread sends
state changes in bulk.

Every node's tasks are started and reaped by **spawner processes** (:mod:`balsam.launcher.spawner`;
one per CPU up to four, :class:`~balsam.launcher.runner.SpawnerShards`), never by the master's or a
worker's interpreter: a fork/exec holds the GIL of the process that makes it (CPython 3.11), which
used to stall the prefetcher and the updater for most of the master's time, and a worker rank is an
MPI process, which is better not forked once per task. **Hand-over**
(:mod:`balsam.launcher.handover`, shared with mpi mode): when the node is full, the master queues
up to :data:`HANDOVER_DEPTH` pending jobs of the same demand behind each young running task, in the
spawner, which starts the next one on the same CPUs the moment the one ahead exits, without a round
trip through this loop (short tasks otherwise leave their CPU idle while the exit travels to the
master and the next start back); a long task (older than :data:`HANDOVER_MAX_AGE_SEC`) gives its
queue back.
**Quick failures** are relaunched as in Balsam 0.7's serial mode: a task that exits with one of
:data:`~balsam.launcher.runner.RETRY_CODES` less than ``RETRY_WINDOW`` seconds after it started is
started again at once by its spawner, on the same CPUs, up to ``MAX_RETRY`` times, before its exit
reaches the master (the master's and every worker's pool: ``relaunch_quick_failures``); mpi mode
does not (0.7's did not either).
Jobs their user deleted or moved while leased (:mod:`balsam.launcher.gone`): the master learns
them through its lease's heartbeat, ends its own node's runs, tells the rank running each other one
to end it (``{"end": [...], "grace": sec}``, the worker ends it and reports its exit as usual), and
reports nothing for them; their resources are freed when the exit comes back. A leased job is
placed (or queued behind another) only while the lease is known alive: the loop reads
:func:`~balsam.launcher.gone.lease_is_fresh` at the top of each turn, before it looks at the jobs
handed over as gone; otherwise the lease's heartbeat thread is asked for a heartbeat at once and
sets ``wake`` with its answer (a Session found gone hands its jobs over first: they are dropped,
not started; :mod:`balsam.client.lease`, "Known alive").
**Hung workers** (SIGSTOP, a node wedged in D state, a hung file system): a worker sends a report
at least every :data:`HEARTBEAT_SEC` (an empty one when it has nothing else to say); a rank silent
for :data:`RANK_SILENCE_SEC` (``$BALSAM_SERIAL_RANK_SILENCE_SEC``) is taken out: its jobs are
reported RUN_TIMEOUT (``serial worker rank N on HOST unresponsive for X s``) and run again
elsewhere (its tasks are not stopped: they may still run there, in the same workdirs, see
:meth:`Master._take_rank_out`), its node gets no more tasks (the idle timeout no longer counts it
busy), its late reports are dropped (a job is never reported twice), and the BatchJob's
``status_info["nodes_out"]`` says so. The master's own node stays in service.
**Jobs that can no longer finish before the wall time** (``wall_time_min`` over the whole minutes
left, the acquire's own rule: :func:`~balsam.launcher.placement.split_too_late`) are never started:
the prefetcher holds them back when the master takes them, and the master checks again the jobs
that wait for a slot (:class:`~balsam.launcher.placement.TooLateJobs`). They count as neither work
nor held jobs, and are given back (a release request; set aside while giving back was given up: once
it resumes), or, with a server without that route, stay leased until the Session's deletion at the stop.
Stop conditions (signal, wall time, idle timeout, refused credential) are one
:class:`~balsam.launcher.job_mode.StopConditions`, the same object as the job mode's when the
master runs in the launcher process.
**Exits at a stop** (:func:`~balsam.launcher.runner.ended_by_stop`; mpi mode follows the same rule).
A batch system that ends the allocation (scancel, a requeue, a node set down, the time limit)
signals every process of the job at once, so a task may die, or its wrapper exit, before the
launcher's own stop has ended it. The rule:

(a) an exit at or after the stop's time (``time.time()``: a requested stop's
    ``StopConditions.requested_at``, else when the loop saw the wall time or the idle timeout) is
    the stop's: RUN_TIMEOUT (reason ``launcher stopped (<the stop's reason>); the job ended (...) as
    the launcher stopped``), the job runs again, whatever its code: a wrapper that traps SIGTERM
    and exits 0, a task that ended in the grace. At a signal (requested) stop, so is an exit reaped
    after it that ended at most :data:`~balsam.launcher.runner.STOP_WINDOW_SEC` before it: the
    batch system signals the jobs and the launcher at once, and a wrapper may trap its SIGTERM and
    exit 0 before the launcher's stop is recorded (up to 1.5 s before, on a real Slurm cluster).
    An exit before a wall-time or idle stop (nothing outside signalled the jobs) that the loop had
    not reaped yet (up to one loop turn) is the job's own result: RUN_DONE with its postprocess, or
    RUN_ERROR, never re-run. A worker rank: what it reaps after a stop signal of its own is
    reported ``killed`` (never ``done``); at the master's stop message it reports what it ended as
    ``killed`` and the exits its pool had not reaped yet, with their end times, as
    ``reaped_at_stop``, which the master judges as its own pool's; an exit a rank reports ``done``
    that happened after the master's stop (its end time) is the stop's too.
(b) an exit by a stop signal (SIGTERM, SIGKILL, SIGINT, SIGHUP: ``-N``, a shell's ``128+N``, or
    hydra's ``15``/``9``: :data:`~balsam.launcher.runner.STOP_SIGNAL_EXITS`) that the stop follows
    within :data:`~balsam.launcher.runner.STOP_WINDOW_SEC` (3 s) is the stop's too. Its report is
    held that long in the pool that reaped it (the master's or a rank's, with its resources), so no
    RUN_ERROR of it has been queued, let alone sent, when the stop comes: the status updater sends
    within 0.1 s what it is given, so "not sent yet" is only dependable for what was never put.
    The master applies the same window to a rank's ``done`` report by the exit's end time.
(c) an exit a spawner reaps after a SIGTERM or SIGINT reached the spawner itself (the batch
    system's: the spawner's own session spares it from a kill of the launcher's group) is held as
    in (b), whatever its code, and from then on that spawner relaunches no quick failure and starts
    no queued task (:meth:`balsam.launcher.spawner.Spawner.stop_signalled`).

Limits: with no stop in the window, such an exit is the job's own (RUN_ERROR, reported 3 s late):
a user's ``kill``, the OOM killer's SIGKILL. A stop later than 3 s after the exit finds its
RUN_ERROR sent: it stays. An exit 0 more than 3 s before a signal stop, or before a wall-time or
idle stop, is taken as a finished job (RUN_DONE). A stop-signal exit still held in a pool when the
stop comes (whatever stop) is ended with the pool's running tasks: RUN_TIMEOUT.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
import types
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from balsam.config import LoggingSettings
from balsam.platform import NodeInfo
from balsam.util import env_number, format_threads_cpu, threads_cpu_seconds

from ..service_calls import note_batch_job, open_lease, open_updater
from ..entry import _platform, configure_logging
from ..gone import GoneJobs, lease_is_fresh
from ..app_run import JobPreparer, PreparedJob, shell_line
from ..handover import HandOver, lease_fresh_until
from ..job_mode import StopConditions, announce_end
from ..node_manager import NodeManager, Placement
from ..placement import TooLateJobs, place_pending
from ..prefetch import Prefetcher
from ..runner import (
    ProcessPool, SpawnerPool, SpawnerShards, _launch_hook, disk_wait, ended_by_stop, env_difference, local_pool, spawner_count, launch_environment, report_exit, report_failed, report_running, report_timeout, send_first_running,
    stopped_reason,
)
from ..wake import WakeEvent

TAG_LAUNCH = 11  # master -> worker: {"launch": [task...]}, {"end": [job id...], "grace": sec} or {"stop": reason, "grace": sec}
TAG_REPORT = 12  # worker -> master: {"done": [...]} (empty: alive) or {"done": [...], "killed": [...], "final": True}

logger = logging.getLogger("balsam.launcher.serial")

#: Sleep of a loop turn without progress while other ranks run tasks (their reports are polled);
#: local exits, new jobs and stop requests set ``wake`` and end the sleep at once.
POLL_SEC = 0.0005
#: Sleep of a loop turn with nothing running remotely (still woken at once by ``wake``).
IDLE_WAIT_SEC = 0.05
#: A pass of the placement loop gives up after this many tasks in a row did not fit.
MAX_PLACEMENT_MISSES = 8
#: Exit code of a serial-mode start that failed its start check.
EXIT_START_FAILED = 3
#: Bounds of one prefetch chunk, the most jobs one fill of free room leases (Balsam 0.7:
#: ``serial_mode_prefetch_per_rank`` per slot; here never more than the partition can start).
MIN_PREFETCH, MAX_PREFETCH = 64, 2048
#: The prefetcher keeps at least this much work leased ahead, at the rate jobs are being started
#: (short tasks: fewer, larger acquires; see :class:`~balsam.launcher.prefetch.Prefetcher`).
#: Half a second: each top-up (at half of it) then leases a quarter second of work. With a quarter
#: second, 5,000 no-op jobs on a loaded 2-CPU VM took 78-178 acquires, each ~3.5-6 ms of server CPU
#: besides its jobs (0.06-0.2 ms a job); with half a second 36-64 (docs/performance.md, 7 December).
PREFETCH_LOOKAHEAD_SEC = 0.5
#: ... and at least this many jobs, whatever the size of the partition: enough that a slot that
#: frees starts a held job at once while the top-up (at half of it) is leased, few enough that a
#: full launcher with long jobs holds only a handful beyond what runs (the rest stays visible to
#: the elastic queue and to other BatchJobs' launchers). Not per node: a large partition that
#: turns many jobs over has a high rate of jobs ending, and the lookahead above grows with it.
PREFETCH_FLOOR = 8
#: Jobs that waited leased this long with no start (every slot busy) are given back to the server
#: in one request, and the prefetcher leases no lookahead until jobs end fast enough again
#: (:meth:`Master._give_back_stalled`, :class:`~balsam.launcher.prefetch.Prefetcher`, "Giving back"):
#: with hour-long jobs, the floor's jobs were hidden from the elastic queue and from other BatchJobs'
#: launchers for an hour while a new allocation could have run them. A few seconds: a partition
#: whose jobs end every few seconds starts a job from the floor well within it and gives nothing back.
PREFETCH_RELEASE_SEC = 5.0
#: Hand-over: tasks queued in the spawner behind each running local task (same demand, same CPUs).
HANDOVER_DEPTH = 4
#: ... only behind a task younger than this: a long task gives its queue back (cancelled) so that
#: the jobs waiting behind it run wherever resources free up first.
HANDOVER_MAX_AGE_SEC = 1.0
#: A worker rank sends the master a report at least this often: an empty one (``{"done": []}``)
#: when it sent nothing else for this long (:meth:`Worker.run`), so that the master can tell a hung
#: rank (SIGSTOP, a node wedged in D state, a hung file system) from a quiet one. 3 s: a rank whose
#: tasks end often never sends one (its exit reports count), an idle one sends one small message
#: every 3 s (nothing beside a task's start), and it is short beside :data:`RANK_SILENCE_SEC`.
HEARTBEAT_SEC = 3.0
#: A worker rank silent for this long is taken out (:meth:`Master._check_ranks`): its jobs are
#: reported RUN_TIMEOUT (run again elsewhere), its node gets no more tasks, its late reports are
#: dropped. 10 heartbeats, at least 30 s: a rank whose node is overloaded by its own tasks (swapping,
#: a slow file system under a task's start) may miss a few heartbeats without being lost.
#: ``$BALSAM_SERIAL_RANK_SILENCE_SEC`` overrides it (:func:`rank_silence_sec`).
RANK_SILENCE_SEC = max(30.0, 10 * HEARTBEAT_SEC)
RANK_SILENCE_ENV = "BALSAM_SERIAL_RANK_SILENCE_SEC"
#: The least silence the variable may ask for: two heartbeats, so that one late heartbeat never
#: takes a rank out.
MIN_RANK_SILENCE_SEC = 2 * HEARTBEAT_SEC


def rank_silence_sec() -> float:
    """How long a worker rank may be silent before the master takes it out:
    ``$BALSAM_SERIAL_RANK_SILENCE_SEC`` (seconds from :data:`MIN_RANK_SILENCE_SEC` to a day; a site
    whose nodes stall longer under their own tasks raises it, one that wants a hung rank's jobs back
    sooner lowers it), else :data:`RANK_SILENCE_SEC` (with a warning, once, when it is set but not
    such a number)."""
    return env_number(RANK_SILENCE_ENV, RANK_SILENCE_SEC, fraction=True, minimum=MIN_RANK_SILENCE_SEC,
                      maximum=24 * 3600.0, warn=logger.warning)


#: How often the master looks for silent ranks.
RANK_CHECK_SEC = 1.0
#: At a stop, the master waits for the workers' last reports at most ``grace + this``, and never
#: past the allocation's end less :data:`FINAL_SEND_RESERVE_SEC`.
FINAL_COLLECT_EXTRA_SEC = 10.0
#: Kept free before the allocation's end after the last reports are collected: the master still
#: sends its updates and deletes its Session, before the launcher's backstop kills the MPI launcher
#: at the allocation's end (:meth:`~balsam.launcher.modes.serial.SerialMode.run`).
FINAL_SEND_RESERVE_SEC = 2.0


class StartError(Exception):
    """The serial mode did not start one worker per node; ``str()`` says what was seen."""


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "::1"}


def _short(host: str) -> str:
    """A host's short name; loopback names stand for this machine (test allocations name one host
    several ways) and IP addresses stay whole (``10.0.0.1`` is not ``10``)."""
    name = host.strip().lower()
    if name in _LOOPBACK_NAMES or name.startswith("127."):
        name = socket.gethostname().lower()
    elif name.replace(".", "").isdecimal() or ":" in name:
        return name
    return name.split(".")[0]


def rank_for_node(nodes: Sequence[NodeInfo], rank_hosts: Sequence[str]) -> list[int]:
    """The rank that serves each node (index = node index), or :class:`StartError`.

    There must be exactly one rank per node. Where the nodes' names are distinct and match the
    ranks' host names (short names: ``nid001.domain`` is ``nid001``), each node gets the rank that
    runs on it, and the master (rank 0) must be on one of them; node names that are aliases the
    ranks cannot see (or one host standing in for several nodes, as in tests) map rank i to node i.
    """
    if len(rank_hosts) != len(nodes):
        raise StartError(
            f"serial mode started {len(rank_hosts)} worker rank(s) for the {len(nodes)} node(s) of the partition: "
            f"the platform's launch command must start exactly one per node (ranks on {_hosts_summary(rank_hosts)})"
        )
    node_hosts = [_short(n.hostname) for n in nodes]
    ranks = [_short(h) for h in rank_hosts]
    if len(set(node_hosts)) != len(node_hosts) or not set(ranks) & set(node_hosts):
        return list(range(len(nodes)))
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(ranks):
        by_host.setdefault(host, []).append(rank)
    crowded = sorted(h for h, rs in by_host.items() if len(rs) > 1)
    missing = [h for h in node_hosts if h not in by_host]
    if crowded or missing:
        raise StartError(
            f"serial mode workers do not run one per node: {len(by_host)} host(s) for {len(nodes)} node(s)"
            + (f"; several on {', '.join(crowded[:5])}" if crowded else "")
            + (f"; none on {', '.join(missing[:5])}" if missing else "")
        )
    return [by_host[h][0] for h in node_hosts]


def _hosts_summary(hosts: Sequence[str]) -> str:
    distinct = sorted(set(hosts))
    shown = ", ".join(distinct[:5]) + (" ..." if len(distinct) > 5 else "")
    return f"{len(distinct)} host(s): {shown}" if distinct else "no host"


# -- transports -----------------------------------------------------------------------------------
class Transport(Protocol):
    """How the master reaches the other ranks (rank 0 is the master itself)."""

    size: int

    def hosts(self) -> list[str]: ...
    def send_tasks(self, rank: int, tasks: list[dict[str, Any]]) -> None: ...
    def end_tasks(self, rank: int, job_ids: list[int], grace: float) -> None: ...
    def reports(self) -> list[tuple[int, dict[str, Any]]]: ...
    def stop_workers(self, reason: str, grace: float) -> None: ...
    def flush(self) -> None: ...
    # Optional: ``abandon(rank)``, never wait again for a send to ``rank`` (taken out as hung).


class LocalTransport:
    """A master alone on its node: no other rank, no MPI."""

    size = 1

    def hosts(self) -> list[str]:
        return [socket.gethostname()]

    def send_tasks(self, rank: int, tasks: list[dict[str, Any]]) -> None:
        raise ValueError(f"no rank {rank}: this master runs alone")

    def end_tasks(self, rank: int, job_ids: list[int], grace: float) -> None:
        raise ValueError(f"no rank {rank}: this master runs alone")

    def reports(self) -> list[tuple[int, dict[str, Any]]]:
        return []

    def stop_workers(self, reason: str, grace: float) -> None:
        pass

    def flush(self) -> None:
        pass


class MPITransport:
    """mpi4py point-to-point messages between the master and its workers (non-blocking sends)."""

    #: Outstanding send requests waited for in one go past this count.
    MAX_REQUESTS = 64

    def __init__(self, comm: Any, mpi: Any) -> None:
        self.comm = comm
        self.mpi = mpi
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self._requests: list[Any] = []
        self._dests: list[int] = []  # the rank each of _requests goes to
        #: Ranks taken out as hung, and the sends to them, never waited for (kept: the request
        #: holds the message's buffer).
        self._abandoned: set[int] = set()
        self._orphans: list[Any] = []
        self._status = mpi.Status()

    def _isend(self, msg: dict[str, Any], dest: int, tag: int) -> None:
        request = self.comm.isend(msg, dest=dest, tag=tag)
        if self._abandoned and dest in self._abandoned:
            self._orphans.append(request)
            return
        self._requests.append(request)
        self._dests.append(dest)
        if len(self._requests) > self.MAX_REQUESTS:
            self.flush()

    def flush(self) -> None:
        self.mpi.Request.Waitall(self._requests)
        self._requests.clear()
        self._dests.clear()

    def abandon(self, rank: int) -> None:
        """Never wait again for a send to ``rank`` (the master took it out as hung): a message too
        large to go eagerly completes only once the receiver takes it, and a wait for it would hang
        the master with the rank."""
        self._abandoned.add(rank)
        kept = [(r, d) for r, d in zip(self._requests, self._dests) if d != rank]
        self._orphans.extend(r for r, d in zip(self._requests, self._dests) if d == rank)
        self._requests[:] = [r for r, _ in kept]
        self._dests[:] = [d for _, d in kept]

    def hosts(self) -> list[str]:
        """Every rank's host name, on rank 0 (a collective call: every rank makes it)."""
        return self.comm.gather(socket.gethostname(), root=0) or []

    # master side
    def send_tasks(self, rank: int, tasks: list[dict[str, Any]]) -> None:
        self._isend({"launch": tasks}, rank, TAG_LAUNCH)

    def end_tasks(self, rank: int, job_ids: list[int], grace: float) -> None:
        """End these running tasks (jobs their user deleted or moved); their exits come back as usual."""
        self._isend({"end": job_ids, "grace": grace}, rank, TAG_LAUNCH)

    def reports(self) -> list[tuple[int, dict[str, Any]]]:
        out = []
        while self.comm.Iprobe(source=self.mpi.ANY_SOURCE, tag=TAG_REPORT, status=self._status):
            source = self._status.Get_source()
            out.append((source, self.comm.recv(source=source, tag=TAG_REPORT)))
        return out

    def stop_workers(self, reason: str, grace: float) -> None:
        for rank in range(1, self.size):
            self._isend({"stop": reason, "grace": grace}, rank, TAG_LAUNCH)

    # worker side
    def receive(self) -> Optional[dict[str, Any]]:
        if self.comm.Iprobe(source=0, tag=TAG_LAUNCH):
            return self.comm.recv(source=0, tag=TAG_LAUNCH)
        return None

    def report(self, msg: dict[str, Any]) -> None:
        self._isend(msg, 0, TAG_REPORT)


# -- master ---------------------------------------------------------------------------------------
class SessionRecord:
    """The master's Session id, in a file of the launcher's log directory (``session_path`` of the
    config; none: nothing is written).

    Why: the master is an MPI rank. When a rank dies (kill -9, a node failure), the MPI launcher
    ends every other rank with it, the master included, before it can delete its Session; its
    RUNNING jobs then stayed RUNNING until the Session expired. The launcher process, which
    started the MPI launcher and outlives it, reads this file and deletes the Session
    (:meth:`~balsam.launcher.modes.serial.SerialMode.run`): its RUNNING jobs become RUN_TIMEOUT at
    once and are run again. ``closed`` (the master's stop reason) says the master closed the
    Session itself: nothing is left to do. The id is noted again whenever the lease replaced a lost
    Session; ``pid`` and ``host`` name the master's spool files (updates it could not send)."""

    def __init__(self, path: "str | Path | None") -> None:
        self.path = Path(path) if path else None
        self.noted: Optional[int] = None

    def note(self, lease: Any) -> None:
        """Record ``lease``'s Session if it is not the one recorded (cheap: called every loop turn)."""
        session_id = getattr(lease, "session_id", None)
        if session_id is None or session_id == self.noted or self.path is None:
            return
        self.noted = session_id
        self._write({"session_id": session_id, "pid": os.getpid(), "host": socket.gethostname(), "closed": None})

    def closed(self, reason: str) -> None:
        if self.path is not None and self.noted is not None:
            self._write({"session_id": self.noted, "pid": os.getpid(), "host": socket.gethostname(), "closed": reason})

    def _write(self, record: dict[str, Any]) -> None:
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)  # whole or not at all: the reader may come at any moment
        except OSError as exc:
            logger.warning("cannot record the session in %s: %s", self.path, exc)


def read_session_record(path: Path) -> Optional[dict[str, Any]]:
    """What :class:`SessionRecord` wrote at ``path``, or None."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("session_id"), int) else None


def master_exit_code(reason: str) -> int:
    """The launcher's exit code for the master's stop ``reason`` (:meth:`Master.stop_reason`, also
    the ``closed`` of its Session record): 1 when it lost its Session (``no session: ...``), else 0."""
    return 1 if reason.startswith("no session") else 0


def prefetch_depth(nodes: Sequence[NodeInfo], per_slot: int) -> int:
    """The most jobs one fill of free room leases (the prefetch chunk): ``per_slot`` per CPU of the
    partition, bounded (what is leased also stays within the room: :func:`free_room`)."""
    slots = sum(max(1, len(n.cpu_ids)) for n in nodes)
    return max(MIN_PREFETCH, min(MAX_PREFETCH, int(per_slot) * slots))


def no_idle_cpu(node_manager: NodeManager) -> bool:
    """Whether no node in service has an idle CPU: then no job can be placed, since every job
    needs one at least (:meth:`~balsam.launcher.node_manager.Demand.cpu_ids_per_node`), a job of
    several nodes on empty nodes. The nodes open to a placement are looked at first (none in a full
    partition), then, only if there are none, the others' idle CPUs (a node whose occupancy is full
    may still hold a job of a tiny share, ``node_packing_count`` in the hundreds)."""
    if next(iter(node_manager.open_nodes()), None) is not None:
        return False
    return not any(node.idle_cpus for node in node_manager.nodes if not node.disabled)


def free_room(node_manager: NodeManager, cap: Optional[int] = None) -> int:
    """Jobs the partition could start now, as the prefetcher sizes a fill of free room by: on each
    node, as many as its free occupancy, idle CPUs and free GPU capacity hold of jobs the size of
    the running ones' mean; with none running, one a node (the jobs' size is not known yet: the next
    fill, with those placed, sizes the rest). GPUs count: 1-GPU jobs on nodes whose GPUs all run
    one left the CPUs' room (60 a 64-CPU node), and the prefetcher leased jobs that could not start,
    held unseen by the elastic queue and other BatchJobs. An estimate too high (GPU capacity split
    across GPUs) leases jobs the loop cannot place; then it holds them and leases no more room
    until it has placed them.

    Called on every turn of the loop: the means come from the NodeManager's running totals, only
    the nodes with room are looked at, and counting stops at ``cap`` (the prefetcher leases at most
    its ``depth`` of room at a time)."""
    usage = node_manager.usage()
    if not usage.jobs:
        return node_manager.enabled_count() if cap is None else min(cap, node_manager.enabled_count())
    occupancy = usage.occupancy / usage.jobs  # of one job
    cpus = usage.busy_cpus / usage.jobs
    gpus = usage.busy_gpus / usage.jobs
    if gpus < 1e-6:  # float residue of freed fractional shares is no GPU work
        gpus = 0.0
    room = 0
    for index in node_manager.open_nodes(gpus=gpus > 0):
        node = node_manager.nodes[index]
        fits = int((1.0 - node.occupancy) / occupancy + 1e-6) if occupancy > 0 else len(node.idle_cpus)
        if cpus > 0:
            fits = min(fits, int(len(node.idle_cpus) / cpus + 1e-6))
        if gpus > 0:
            fits = min(fits, int((len(node.info.gpu_ids) - node.gpu_busy) / gpus + 1e-6))
        room += max(0, fits)
        if cap is not None and room >= cap:
            return cap
    return room


class Master:
    """Places tasks on every node, starts its own node's, sends the others to their ranks, reports."""

    def __init__(
        self,
        *,
        node_manager: NodeManager,
        rank_of_node: Sequence[int],
        transport: Transport,
        stop: StopConditions,
        wake: threading.Event,
        pool: "ProcessPool | SpawnerPool | SpawnerShards",
        prefetcher: Prefetcher,
        updater: Any,
        platform: Any,
        launch_hook: Callable[..., Any],
        gone: Optional[GoneJobs] = None,
        session_record: Optional[SessionRecord] = None,
        record_nodes_out: Optional[Callable[[str], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_manager = node_manager
        self.session_record = session_record if session_record is not None else SessionRecord(None)
        self.rank_of_node = list(rank_of_node)
        self.transport = transport
        self.stop = stop
        self.wake = wake
        self.pool = pool
        self.prefetcher = prefetcher
        self.updater = updater
        self.platform = platform
        self.launch_hook = launch_hook
        self.pending: deque[PreparedJob] = deque()
        self.remote: dict[int, int] = {}  # job id -> rank running it
        self.outbox: dict[int, list[dict[str, Any]]] = {}
        self.base_env = dict(os.environ)
        self.started = 0
        self.finished = 0
        #: Started jobs whose successful exit is reported with POSTPROCESSED (PreparedJob.postprocess_on_exit)
        self.postprocess_on_exit: set[int] = set()
        #: Worth a placement pass: resources were freed or jobs arrived since the last one.
        self._try_start = True
        #: Jobs queued in the spawner behind running local jobs (see the module docstring).
        self.handover = HandOver(pool, node_manager, depth=HANDOVER_DEPTH, max_age_sec=HANDOVER_MAX_AGE_SEC)
        #: Jobs the Session no longer holds (deleted or moved by their user): the prefetcher's lease
        #: asks about :meth:`_held_ids` with each heartbeat (``build_master`` attaches it).
        self.gone = gone if gone is not None else GoneJobs(wake)
        self.gone.held = self._held_ids
        # -- hung worker ranks (see _check_ranks) --
        self.clock = clock
        #: Worker rank -> when the master last heard from it (ranks in service only).
        self._heard: dict[int, float] = {rank: clock() for rank in range(1, transport.size)}
        self._next_rank_check = 0.0
        #: Read once, at the start: the master runs in the launcher's environment.
        self.rank_silence_sec = rank_silence_sec()
        #: Worker ranks taken out as hung -> why; those that reported again since (logged once).
        self.ranks_out: dict[int, str] = {}
        self._spoke_again: set[int] = set()
        #: Sets the BatchJob's ``status_info["nodes_out"]`` (the key mpi mode's node take-out uses);
        #: returns at once (build_master's hands it to the launcher's note writer, balsam.launcher.batch_job_notes).
        self._record_nodes_out = record_nodes_out
        #: Taken jobs set aside because they waited for a slot until the time left ran short (never
        #: started; given back at once where the server has the release route, _release_too_late;
        #: the prefetcher holds back those it never handed over).
        self.too_late = TooLateJobs("a release request (POST /sessions/{id}/release) or, where the server has no "
                                    "such route, the master's stop (its Session's deletion)")
        #: Since when jobs have waited in ``pending`` with none started (None: none wait, or one started
        #: this turn), on ``clock``; past PREFETCH_RELEASE_SEC they are given back (_give_back_stalled).
        self._stalled_since: Optional[float] = None
        #: The acquire numbers of the set-aside jobs not given back yet (_forget_set_aside; given back
        #: by _release_too_late once the prefetcher may release, dropped by _take when leased again).
        self._set_aside_generations: dict[int, int] = {}
        #: ``finished`` when the lean floor was last leased, or jobs last taken or given back: the
        #: floor is leased again only after a job ends (else the jobs that do not fit the open slot
        #: were leased and given back every 5 s for as long as the long jobs ran, hidden from the
        #: elastic queue nearly all the time).
        self._floor_mark = 0
        #: When the loop stopped (``time.time()``: the signal's time for a requested stop) and why.
        self._stopped_at: Optional[float] = None
        self._stop_reason = ""

    # -- jobs deleted or moved by their user (balsam.launcher.gone) ------------------------------
    def _held_ids(self) -> list[int]:
        """Running here or on another rank, queued behind a local task, or waiting (heartbeat
        thread: copies)."""
        return [*self.pool.job_ids(), *list(self.remote), *list(self.handover.queued),
                *(p.id for p in list(self.pending))]

    def _end_gone(self) -> None:
        self._end_runs(*self.gone.take(self.pool.job_ids(), self.pending, self.handover.queued, self.remote))

    def _end_runs(self, local: list[int], cancel: list[int], by_rank: dict[int, list[int]]) -> None:
        """End runs here, cancel queued hand-overs, tell other ranks to end theirs (exits come back as usual)."""
        if not (local or cancel or by_rank):
            return
        grace = self.stop.countdown.grace_sec
        for job_id in cancel:  # comes back unstarted (dropped then), or started (ended at once)
            self.pool.cancel(job_id)
        if local:
            self.pool.end(local, grace)
        for rank, ids in by_rank.items():
            self.transport.end_tasks(rank, ids, grace)

    # -- hung worker ranks ---------------------------------------------------------------------
    def _check_ranks(self, now: float) -> None:
        """Take out every worker rank silent for ``rank_silence_sec`` (:func:`rank_silence_sec`; each
        sends at least one report per :data:`HEARTBEAT_SEC`). The master's own node stays in: a hung
        worker never ends the launcher, whose other nodes go on (the master's, at least)."""
        self._next_rank_check = now + RANK_CHECK_SEC
        silent = [(rank, now - heard) for rank, heard in self._heard.items() if now - heard > self.rank_silence_sec]
        for rank, silent_sec in silent:
            self._take_rank_out(rank, silent_sec)

    def _take_rank_out(self, rank: int, silent_sec: float) -> None:
        """Its jobs are reported RUN_TIMEOUT (run again, elsewhere), its node gets no more tasks, the
        transport never waits for it again, its later reports are dropped.

        Its tasks are not stopped: they run in their own sessions under the rank's spawners, which a
        hung rank (SIGSTOP, D state) does not stop, and the master cannot reach processes on another
        node, nor does it know their pids on its own (only the rank does). Each may go on writing in
        its workdir while the job runs again elsewhere: the reason and the log say so. A rank that
        comes back is told to end them (:meth:`Transport.end_tasks`)."""
        index = self.rank_of_node.index(rank) if rank in self.rank_of_node else None
        host = self.node_manager.nodes[index].hostname if index is not None else "?"
        reason = f"serial worker rank {rank} on {host} unresponsive for {silent_sec:.0f} s"
        self._heard.pop(rank, None)
        self.ranks_out[rank] = reason
        if index is not None and not self.node_manager.disable_node(index):
            logger.error("node %s of the unresponsive rank %d could not be taken out", host, rank)
        abandon = getattr(self.transport, "abandon", None)
        if abandon is not None:
            abandon(rank)
        jobs = sorted(job_id for job_id, r in self.remote.items() if r == rank)
        if jobs:
            # If the rank comes back, its copies are ended (their exits are dropped with its reports).
            self.transport.end_tasks(rank, jobs, self.stop.countdown.grace_sec)
        gone = self.gone
        for job_id in jobs:
            self.remote.pop(job_id, None)
            self.handover.release(job_id)  # frees its placement: the node is out, nothing goes there again
            self.postprocess_on_exit.discard(job_id)
            if gone.ending and gone.settled(job_id):  # deleted or moved by its user: nothing to report
                continue
            gone.forget(job_id)
            report_timeout(self.updater, job_id, f"{reason}; taken out, the job runs again (its task there may "
                                                  f"still be running: the master cannot end it)")
        message = (f"{reason}: taken out, its {len(jobs)} running job(s) re-queued (RUN_TIMEOUT); their tasks "
                   f"may still be running on {host}, in the same workdirs as their new runs")
        logger.error("%s; %d of %d nodes left", message, self.node_manager.enabled_count(), len(self.node_manager))
        self._record_out()

    def _late_report(self, rank: int) -> None:
        if rank not in self._spoke_again:
            self._spoke_again.add(rank)
            logger.warning("serial worker rank %d reported again after it was taken out (%s); it stays out, its "
                           "reports are dropped (its jobs were reported RUN_TIMEOUT)", rank, self.ranks_out[rank])

    def _record_out(self) -> None:
        """Every rank taken out so far, in the BatchJob's ``status_info["nodes_out"]``. Handed to the
        launcher's note writer (``service_calls.note_batch_job``), which returns at once and writes
        in its own thread, in order (the latest text, naming every rank, is written last), tried
        again through an outage, waited for at the process's exit: no thread per note here."""
        if self._record_nodes_out is None:
            return
        text = "; ".join(f"{reason}: taken out" for reason in self.ranks_out.values())
        try:
            self._record_nodes_out(text)
        except Exception as exc:  # the log says it already: the loop goes on
            logger.warning("could not record the nodes taken out: %s", exc)

    # -- one loop turn -------------------------------------------------------------------------
    def stop_reason(self) -> Optional[str]:
        if self.prefetcher.error is not None:
            return f"no session: {self.prefetcher.error}"
        return self.stop.check()

    def step(self) -> int:
        """Reap, collect reports, take new jobs, start what fits; returns how much happened."""
        progress = 0
        started_before = self.started
        self.session_record.note(self.prefetcher.lease)  # before any job of a new Session starts
        # Read before the jobs handed over as gone are looked at (balsam.client.lease, "Known
        # alive"): a lease found fresh here has handed over what a lost Session held.
        fresh = lease_is_fresh(self.prefetcher.lease, self.wake)
        done = self.pool.reap()
        if self.handover.queued:
            progress += self._note_handovers()
        if done:
            self._finish(done)
            progress += len(done)
        heard = self._heard  # worker ranks in service (none: a master alone)
        now = self.clock() if heard else 0.0
        for rank, msg in self.transport.reports():
            if rank in heard:
                heard[rank] = now
            elif rank in self.ranks_out:
                self._late_report(rank)  # its jobs were reported RUN_TIMEOUT: never report them again
                continue
            done = msg.get("done", [])
            self._finish(done, local=False)
            killed = msg.get("killed")
            if killed:  # the rank got a stop signal of its own: its exits since are the stop's
                self._finish_stopped(killed, self._stop_reason_now() or f"serial worker rank {rank} got a stop signal")
            progress += len(done) + len(killed or ())
        if heard and now >= self._next_rank_check:
            self._check_ranks(now)
        new = self.prefetcher.take()
        if new:
            self._take(new, self.prefetcher.taken_generation)
            self._floor_mark = self.finished
            progress += len(new)
        if self.gone.ready:  # after the exits and hand-overs that free the stale copies' placements
            ready = self.gone.release_ready(self.node_manager.placements)
            if ready:
                self.pending.extend(ready)
                self._try_start = True
        if self.gone.news:
            self._end_gone()
            progress += 1
        if self.pending:  # before anything takes jobs from pending to start them
            self.too_late.set_aside(self.pending, self.stop.countdown.remaining_min, self.handover.queued.values(),
                                    self.gone.successors.values(), self.gone.ready.values(),
                                    forget=self._forget_set_aside)
        # Also those set aside while giving back was off (given up): once it resumes (before, they
        # stayed leased, hidden from the elastic queue and from launchers with time left, until the
        # Session's deletion). One dict check a turn while none waits.
        if self._set_aside_generations and self.prefetcher.may_release:
            self._release_too_late()
        if self.pending and self._try_start and fresh:
            self._try_start = False
            if no_idle_cpu(self.node_manager):
                # Every exit sets _try_start, also one whose CPUs passed to the job queued behind it
                # (hand-over): with every CPU busy, the pass placed nothing and only moved the first
                # MAX_PLACEMENT_MISSES pending jobs to the back (each a miss), at 20 us a turn (a
                # refused assign per job): the same move, without the pass.
                self.pending.rotate(-min(len(self.pending), MAX_PLACEMENT_MISSES))
            else:
                started = place_pending(self.pending, self.node_manager, self._start, self._fail,
                                        max_misses=MAX_PLACEMENT_MISSES)
                if started and not self.started:
                    send_first_running(self.updater)
                self.started += started
                progress += started
                self._send_outbox()
        if fresh:
            # Started by the spawner only while the Session is still known alive (the lease's deadline).
            progress += self.handover.queue_behind(self.pending, self._launch_command, self._fail,
                                                   lease_fresh_until(self.prefetcher.lease))
        self.handover.cancel_behind_old()
        stalled = bool(self.pending) and fresh and self.started == started_before
        # Read only where used (below): with jobs held and none stalled, as before, no count.
        room_now = (free_room(self.node_manager, self.prefetcher.depth)
                    if stalled or self.prefetcher.lean or not (self.pending or self.handover.queued) else None)
        # Given back only with no free room (every slot busy): a job that waits beside a free slot
        # (a whole-node job beside a running one) is not stalled by a full partition, and giving it
        # back churned (leased again at once, and given back 5 s later) while the slot stood idle.
        if stalled and room_now == 0:
            self._give_back_stalled()
        else:
            self._stalled_since = None
        if (room_now == 0 and self.prefetcher.lean and self.finished > self._floor_mark
                and next(iter(self.node_manager.open_nodes()), None) is not None):
            # free_room counts slots of the running jobs' mean size: a freed quarter node is no room
            # beside half-node jobs (mean 0.375), and a lean prefetcher, with no lookahead, leased
            # nothing while small runnable jobs waited on the server and the slot stood idle. A
            # node with a free slot: the floor is leased (one job would be the head job again, the
            # one that does not fit); what does not fit is given back after the bound.
            room_now = self.prefetcher.floor
        held = len(self.pending) + len(self.handover.queued)
        # With none held the loop placed every job it took: the partition may have room, which the
        # prefetcher leases (in chunks); with some held it is full, and it leases only a lookahead.
        # A lean prefetcher also leases the room beside held jobs that do not fit now (prefetch,
        # "Giving back"): with no lookahead, nothing else fills that room.
        self.prefetcher.note_held(held, room_now if not held or self.prefetcher.lean else None,
                                  self.node_manager.usage().jobs)
        busy = bool(self.pool.running or self.remote or self.pending or self.handover.queued or self.prefetcher.backlog)
        self.stop.note_activity(busy or not self.prefetcher.exhausted)
        if not busy and self.prefetcher.exhausted:
            # The last exits, with no job left to lease: their RUN_DONEs go now, not after the
            # batch window (between waves the pool empties for a moment too, and there the window
            # keeps the PATCHes few).
            self.updater.send_soon()
        return progress

    def _give_back_stalled(self) -> None:
        """Jobs wait in ``pending`` and none started this turn: once that has lasted
        PREFETCH_RELEASE_SEC (every slot busy all along), hand the waiting jobs to the prefetcher to
        be released (:meth:`Prefetcher.give_back`). Taken out of ``pending`` here, on the loop thread,
        the only one that starts jobs: they are never started by this launcher (the race-freedom
        argument is sessions_logic's "giving back jobs"). Copies waiting on a stale run's end, and
        jobs being ended as gone, are not in ``pending`` and stay."""
        now = self.clock()
        if self._stalled_since is None:
            self._stalled_since = now
            return
        waited = now - self._stalled_since
        if waited < PREFETCH_RELEASE_SEC or not self.prefetcher.may_give_back:
            return
        self._stalled_since = None
        self._floor_mark = self.finished  # the floor is leased again only after a job ends
        copies = self.gone.copies
        back = [(p, copies.get(p.id, 0)) for p in self.pending if p.id not in self.gone.ending]
        if not back:
            return
        kept = [p for p in self.pending if p.id in self.gone.ending]
        self.pending.clear()
        self.pending.extend(kept)
        for prepared, _generation in back:
            self.gone.forget(prepared.id)
        logger.info("%d leased jobs waited %.1f s with no room for them: given back to the server (the elastic queue "
                    "and other launchers see them again); leasing again as slots free", len(back), waited)
        self.prefetcher.give_back(back)

    def _release_too_late(self) -> None:
        """Give back the jobs :meth:`TooLateJobs.set_aside` set aside and not given back yet (this
        turn's, and those set aside while giving back was given up) instead of keeping them leased
        until the stop: the elastic queue then sees them, and a launcher with time left can lease
        them (this one's acquires ask only for jobs that fit its time left). Never started: taken out
        of ``pending`` on this thread, and each given back once (popped here). Each with its own
        acquire number: one of a Session lost since is not sent (the prefetcher's ``_send_release``;
        the server freed it with that Session)."""
        jobs, generations = self.too_late.jobs, self._set_aside_generations
        back = [(jobs.pop(job_id), generations.pop(job_id)) for job_id in list(generations) if job_id in jobs]
        generations.clear()  # none is left (set aside and dropped together): the turn's check stays one look
        if back:
            self.prefetcher.give_back(back, too_late=True)

    def _drop_set_aside(self, jobs: list[PreparedJob]) -> None:
        """A job set aside and not given back yet (giving back off) that is leased again (its user
        re-queued it, lowering its wall time, or a lost Session's, leased by the new one) is no longer
        held by that copy: given back later under this Session, its id freed the new copy, which
        this loop may start meanwhile (run twice). Dropped; the new copy is checked as any job."""
        generations, set_aside = self._set_aside_generations, self.too_late.jobs
        for prepared in jobs:
            if generations.pop(prepared.id, None) is not None:
                set_aside.pop(prepared.id, None)

    def _forget_set_aside(self, job_id: int) -> None:
        """TooLateJobs.set_aside's ``forget``: the job's acquire number is read before the gone-jobs
        bookkeeping drops it (read after, every one was 0, "not numbered", and once the lease had
        replaced a lost Session the release dropped them as that Session's: kept leased, hidden)."""
        self._set_aside_generations[job_id] = self.gone.copies.get(job_id, 0)
        self.gone.forget(job_id)

    def _start(self, prepared: PreparedJob, placement: Placement) -> None:
        rank = self.rank_of_node[placement.node_indexes[0]]
        cmd, env = self._launch_command(prepared, placement)
        # The assigned ids are cores; a threads_per_core > 1 task also gets their sibling hardware
        # threads, as mpi mode's binding gives them. A job handed over later runs on these same ids
        # (the spawner keeps the CPUs of the job ahead).
        cpu_ids = self.platform.task_cpu_ids(placement.cpu_ids[0], prepared.demand.threads_per_core)
        # RUNNING is stamped before the spawn is asked for: a task that ends at once is stamped
        # RUN_DONE by its spawner, possibly before this thread gets the CPU back (its events would
        # sort RUN_DONE before RUNNING).
        asked = time.time()
        if rank == 0:
            self.pool.start(prepared.id, cmd, prepared.workdir, env, cpu_ids)
            self.handover.started_local(prepared, placement)
        else:
            self.outbox.setdefault(rank, []).append(self._remote_task(prepared.id, cmd, prepared.workdir, env, cpu_ids))
            self.remote[prepared.id] = rank
        self._note_running(prepared, asked)

    def _fail(self, job_id: int, reason: str) -> None:
        self.gone.forget(job_id)
        report_failed(self.updater, job_id, reason)

    def _take(self, jobs: list[PreparedJob], generation: int) -> None:
        """Queue jobs the prefetcher leased (copies of acquire ``generation`` or older). A job that
        arrives while an older copy of it is held (re-queued by its user, or leased again by a
        replaced Session) replaces that copy (:meth:`GoneJobs.arrive`): two copies in ``pending``
        would be placed twice (the NodeManager refuses: the loop crashed) or run twice."""
        # Also those that wait for a stale copy to end (gone.successors): they reach pending later.
        self.too_late.note_leased(jobs)
        if self._set_aside_generations:
            self._drop_set_aside(jobs)
        now, local, cancel, by_rank = self.gone.arrive(jobs, generation, self.pool.job_ids, self.pending,
                                                       self.handover.queued, self.remote, placed=self.node_manager.placements)
        self._end_runs(local, cancel, by_rank)
        if now:
            self.pending.extend(now)
            self._try_start = True

    # -- hand-over (balsam.launcher.handover) --------------------------------------------------
    def _launch_command(self, prepared: PreparedJob, placement: Placement) -> tuple[str, dict[str, str]]:
        """A job's shell line and environment on ``placement`` (started, or queued behind a local job)."""
        env = launch_environment(prepared, placement, self.platform, self.launch_hook)
        return shell_line(prepared.cmdline, prepared.preamble, prepared.workdir), env

    def _note_running(self, prepared: PreparedJob, when: float) -> None:
        """A task started at ``when`` (by this loop or by a hand-over): what its exit will need, and RUNNING."""
        if prepared.id in self.gone.ending:  # a hand-over cancelled as gone that started first
            self.pool.end([prepared.id], self.stop.countdown.grace_sec)
            return
        if prepared.postprocess_on_exit:
            self.postprocess_on_exit.add(prepared.id)
        report_running(self.updater, prepared, when)

    def _note_handovers(self) -> int:
        """Queued jobs that started (RUNNING, at the time they started) or were given back."""
        started, dropped = self.handover.note_handovers(self.pending, self._note_running)
        self.started += started
        if dropped:
            self._try_start = True
            if self.gone.ending:
                self.gone.drop_pending(self.pending)  # cancelled hand-overs of gone jobs came back
        return started + dropped

    def _remote_task(self, job_id: int, cmd: str, workdir: Path, env: dict[str, str], cpu_ids: Sequence[int]) -> dict[str, Any]:
        """What a worker needs to start a task; the environment as a difference from the master's
        (every rank starts with the same one), to keep messages small."""
        env_set, env_unset = env_difference(self.base_env, env)
        return {"id": job_id, "cmd": cmd, "workdir": str(workdir), "env": env_set, "unset": env_unset, "cpu_ids": list(cpu_ids)}

    def _send_outbox(self) -> None:
        for rank, tasks in self.outbox.items():
            if tasks:
                self.transport.send_tasks(rank, tasks)
        self.outbox.clear()

    def _stop_time(self) -> Optional[float]:
        """When the launcher's stop came (``time.time()``), or None while none has."""
        if self.stop.requested:
            return self.stop.requested_at
        return self._stopped_at

    def _stop_reason_now(self) -> Optional[str]:
        return self._stop_reason if self._stopped_at is not None else (self.stop.reason if self.stop.requested else None)

    def _finish(self, results: Sequence[Sequence[Any]], *, local: bool = True) -> None:
        """Report exits: the job's own result (RUN_DONE, RUN_ERROR), or RUN_TIMEOUT where the
        launcher's stop ended it (:func:`~balsam.launcher.runner.ended_by_stop`: any exit at or
        after the stop; at a signal stop, one reaped after it or by a stop signal within the stop
        window before it; an exit before a wall-time or idle stop is the job's own). ``local``:
        reaped after the stop, by this master's pool or a rank's at the stop message (else a
        rank's report of an exit it reaped before any stop)."""
        if results:
            self._try_start = True
        postprocess_on_exit = self.postprocess_on_exit
        gone = self.gone
        forget = gone.copies.pop
        stop_time = self._stop_time()
        signal_stop = self.stop.requested  # else the launcher's own wall-time or idle stop
        for job_id, rc, tail, when in results:
            self.handover.release(job_id)
            self.remote.pop(job_id, None)
            if not (gone.ending and gone.settled(job_id)):  # gone: the server would refuse any update
                forget(job_id, None)
                if stop_time is not None and ended_by_stop(rc, when, stop_time, reaped_after_stop=local, signal_stop=signal_stop):
                    reason = self._stop_reason_now() or "signal"
                    logger.info("job %s exited %s as the launcher stopped (%s): RUN_TIMEOUT", job_id, rc, reason)
                    report_timeout(self.updater, job_id, stopped_reason(reason, rc))
                else:
                    report_exit(self.updater, job_id, rc, tail, when, job_id in postprocess_on_exit)
            postprocess_on_exit.discard(job_id)
        self.finished += len(results)

    def _finish_stopped(self, job_ids: Sequence[int], reason: str) -> None:
        """Jobs a worker rank ended, or saw exit, after a stop (the master's, or a stop signal of
        its own): RUN_TIMEOUT, their resources freed (counted as finished, like :meth:`_finish`;
        the freed CPUs are looked at on the next turn)."""
        if job_ids:
            self._try_start = True
        gone = self.gone
        for job_id in job_ids:
            self.handover.release(job_id)
            self.remote.pop(job_id, None)
            self.postprocess_on_exit.discard(job_id)
            if not (gone.ending and gone.settled(job_id)):
                gone.copies.pop(job_id, None)
                report_timeout(self.updater, job_id, stopped_reason(reason))
        self.finished += len(job_ids)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> str:
        """Run until a stop condition; end what runs; return why it stopped."""
        logger.info("serial master: %d ranks, %d nodes, prefetch %d, stop in %.0f s",
                    self.transport.size, len(self.node_manager), self.prefetcher.depth, self.stop.countdown.remaining_sec())
        self.stop.idle_timer.busy()  # idle time counts from here, not from the (slow, under load) start-up
        started = self.clock()
        for rank in self._heard:  # so do the ranks' silences
            self._heard[rank] = started
        reason = "wall time"
        threads_cpu: list[tuple[str, int, float]] = []
        try:
            while True:
                stop = self.stop_reason()
                if stop:
                    reason = stop
                    self._stop_reason = reason
                    self._stopped_at = self.stop.requested_at if self.stop.requested and self.stop.requested_at else time.time()
                    break
                self.wake.clear()  # before looking: an event from now on makes the next wait return
                if not self.step() or not self.remote:
                    # Also after a turn that did something: one turn takes every chain of work to its
                    # end (exits free slots that are filled, new jobs are placed, hand-overs queued),
                    # and whatever arrived since the clear has set ``wake``, so the wait returns at
                    # once. Turning again at once found nothing in half of the turns (4,092 of 8,230,
                    # 24 us each, for 5,000 short jobs). Other ranks' reports are polled, not
                    # signalled: with tasks on them, the next turn comes at once, as before.
                    self.wake.wait(POLL_SEC if self.remote else IDLE_WAIT_SEC)
        finally:
            threads_cpu = threads_cpu_seconds()  # before the threads it names stop
            self.prefetcher.stop()
            self.shutdown(reason)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        logger.info("serial master done (%s): %d started (%d by hand-over; %d queued ones given back), %d finished; "
                    "%d acquired, %d released unstarted to the server, prefetch depth up to %d; CPU %.2f s user + "
                    "%.2f s system (by thread, until the stop: %s)", reason, self.started, self.handover.handed_over,
                    self.handover.given_back, self.finished, self.prefetcher.acquired,
                    getattr(self.prefetcher, "released", 0), self.prefetcher.depth_peak, usage.ru_utime,
                    usage.ru_stime, format_threads_cpu(threads_cpu))
        return reason

    def shutdown(self, reason: str) -> None:
        """Stop the workers, end running tasks as RUN_TIMEOUT (what finished on its own counts as
        done), then close the prefetcher, the updater and the lease in that order: the updates are
        sent before the Session is deleted, since deleting it turns RUNNING jobs to RUN_TIMEOUT."""
        grace = self.stop.countdown.grace_sec
        try:
            self.transport.stop_workers(reason, grace)
            victims, finished = self.pool.terminate_all(grace)
            if hasattr(self.pool, "take_started"):
                self._note_handovers()  # RUNNING for queued jobs that started before the stop
            self.handover.forget_queued()  # what was still queued will not start
            if self._stopped_at is None:  # a loop that broke on an exception: its stop is now
                self._stop_reason, self._stopped_at = reason, time.time()
            # Reaped after the stop: the stop's doing if it ended at or after the stop (a wrapper
            # that traps SIGTERM and exits 0), or at a signal stop within the window before it; an
            # exit before a wall-time or idle stop is the job's own (rule (a), module docstring).
            self._finish(finished)
            for job_id in victims:
                self.handover.release(job_id)
                if not (self.gone.ending and self.gone.settled(job_id)):
                    report_timeout(self.updater, job_id, f"launcher stopped ({reason})")
            if victims:
                logger.info("%d local tasks ended as RUN_TIMEOUT (%s)", len(victims), reason)
            self._collect_final_reports(reason, self.final_collect_sec(grace, time.time()))
            self.transport.flush()
        finally:
            self.prefetcher.join()
            try:
                self.updater.close()
            finally:
                self.prefetcher.close_lease(quick=bool(getattr(self.updater, "gave_up", False)))
                self.session_record.closed(reason)
                self._log_unstarted()

    def _log_unstarted(self) -> None:
        """Say how many leased jobs never started: nothing is reported for them, the Session's
        deletion (``close_lease``) returned them, those held back near the wall time included."""
        too_late = len(self.too_late) + len(self.prefetcher.too_late)
        faults = getattr(self.prefetcher, "site_faults", None)
        given_back = len(faults.given_back) if faults is not None else 0
        # Given back to the server but not released yet (the stop came first), or whose release may
        # have been applied and was still unanswered at the stop (resent until then; prefetch, "Giving back").
        releasing = getattr(self.prefetcher, "releasing", 0) + len(getattr(self.prefetcher, "release_unknown", ()))
        unstarted = (len(self.pending) + len(self.gone.successors) + len(self.gone.ready) + self.prefetcher.backlog
                     + too_late + given_back + releasing)
        if unstarted:
            back = f", {given_back} given back as the file system failed their workdirs" if given_back else ""
            back += f", {releasing} given back with no release answered" if releasing else ""
            logger.info("%d acquired jobs never started (%d of them too long for the time that was left%s); the "
                        "session release returns them", unstarted, too_late, back)

    def final_collect_sec(self, grace: float, now: float) -> float:
        """How long a stop at ``now`` waits for the workers' last reports: ``grace`` +
        :data:`FINAL_COLLECT_EXTRA_SEC`, but not past the allocation's end less
        :data:`FINAL_SEND_RESERVE_SEC`, where the launcher's backstop kills the MPI launcher: the
        reports must reach the server before that. ``now`` is on the countdown's clock (``time.time()``,
        the clock of its ``start_time``)."""
        wanted = grace + FINAL_COLLECT_EXTRA_SEC
        countdown = self.stop.countdown
        if countdown.wall_time_sec <= 0:
            return wanted
        left = countdown.start_time + countdown.wall_time_sec - now - FINAL_SEND_RESERVE_SEC
        return max(0.0, min(wanted, left))

    def _collect_final_reports(self, reason: str, timeout: float) -> None:
        # Ranks taken out as hung are not waited for (nor heard: their jobs were reported already).
        waiting = set(range(1, self.transport.size)) - set(self.ranks_out)
        deadline = self.clock() + timeout
        while waiting and self.clock() < deadline:
            reports = self.transport.reports()
            for rank, msg in reports:
                if rank in self.ranks_out:
                    self._late_report(rank)
                    continue
                self._finish(msg.get("done", []), local=False)
                self._finish(msg.get("reaped_at_stop", []), local=True)
                self._finish_stopped(msg.get("killed", []), reason)
                if msg.get("final"):
                    waiting.discard(rank)
            if not reports:
                time.sleep(0.01)
        for job_id in list(self.remote):
            if not (self.gone.ending and self.gone.settled(job_id)):
                report_timeout(self.updater, job_id, f"launcher stopped ({reason}); worker did not report")
        self.remote.clear()
        if waiting:
            logger.error("workers %s did not confirm their stop", sorted(waiting))


def build_master(
    config: dict[str, Any],
    transport: Transport,
    rank_of_node: Sequence[int],
    stop: StopConditions,
    wake: threading.Event,
    platform: Callable[[], Any],
    lease: Optional[Callable[[], Any]] = None,
) -> Master:
    """A master for ``config`` (:meth:`SerialMode.worker_config`). The prefetcher starts leasing
    before ``platform()`` (which may load plugins) is called, to shorten the time to the first task.
    ``lease`` opens the job source (default: a new Session for the config's site and tags)."""
    launcher = config["launcher"]
    nodes = [NodeInfo(**n) for n in config["nodes"]]
    node_manager = NodeManager(nodes, allow_node_packing=True, cpu_ids_are_cores=bool(config.get("cpu_ids_are_cores", False)),
                               hardware_threads_per_core=int(config.get("hardware_threads_per_core", 0) or 0))
    updater = open_updater(config.get("spool_path"))
    gone = GoneJobs(wake)
    updater.on_gone = gone.deleted  # a 404 of an update: the job was deleted meanwhile (its run is ended)
    open_source = lease or (lambda: open_lease(config["site_id"], config["batch_job_id"], config["filter_tags"]))
    preparer = JobPreparer(Path(config["data_path"]), default_postprocess=bool(launcher["default_postprocess_in_launcher"]))
    # Before the first acquire: on a still-full disk nothing is leased (the prefetcher is exhausted
    # while paused: the master ends at its idle time), and the pause shows on the BatchJob.
    disk_wait.watch(config["data_path"], lambda text: note_batch_job(config.get("batch_job_id"), "disk_full", text))
    prefetcher = Prefetcher(
        lambda: gone.attach(open_source()),  # heartbeats ask which held jobs are gone (Master._held_ids)
        preparer.prepare,
        node_manager.check_satisfiable,
        updater,
        depth=prefetch_depth(nodes, launcher["serial_mode_prefetch_per_rank"]),
        remaining_min=stop.countdown.remaining_min,
        retry_sec=float(launcher["delay_sec"]),
        on_ready=wake.set,
        acquire_kwargs={"max_nodes_per_job": 1, "serial_only": True, **config.get("acquire_filter", {})},
        lookahead_sec=PREFETCH_LOOKAHEAD_SEC,
        max_depth=MAX_PREFETCH,
        floor=PREFETCH_FLOOR,
        room=len(nodes),  # an empty partition: one job per node (free_room)
        before_prepare=preparer.end_stale_runs,
        release_after_sec=PREFETCH_RELEASE_SEC,
    ).start()
    # The prefetcher opens the lease: the updates are sent under its Session (the one holding the
    # job now: a lost one is replaced), and the server refuses those of a job it no longer holds.
    updater.session_id = lambda: getattr(prefetcher.lease, "session_id", None)
    # At the batch system's SIGTERM the master's Session is said to end soon (its SIGKILL may come
    # before the master has reported its tasks: balsam.client.lease, "An announced end"). Through the
    # prefetcher: a stop requested while its thread still creates the Session is announced once it exists.
    stop.when_requested(lambda: announce_end(prefetcher))
    pool: Any = None
    try:
        own_node = nodes[list(rank_of_node).index(0)] if 0 in rank_of_node else nodes[0]
        # relaunch_quick_failures: Balsam 0.7's serial-mode rule (runner.RETRY_CODES), on every rank.
        pool = local_pool(int(launcher["error_tail_num_lines"]), wake, relaunch_quick_failures=True,
                          spawners=spawner_count(len(own_node.cpu_ids) or os.cpu_count() or 1))
        return Master(
            node_manager=node_manager,
            rank_of_node=rank_of_node,
            transport=transport,
            stop=stop,
            wake=wake,
            pool=pool,
            prefetcher=prefetcher,
            updater=updater,
            platform=platform(),
            launch_hook=_launch_hook(),
            gone=gone,
            session_record=SessionRecord(config.get("session_path")),
            record_nodes_out=lambda text: note_batch_job(config.get("batch_job_id"), "nodes_out", text),
        )
    except BaseException:
        # Start-up failed: give the leased jobs back now rather than at session expiry.
        if isinstance(pool, (SpawnerPool, SpawnerShards)):
            pool.close()
        prefetcher.stop()
        prefetcher.join()
        try:
            updater.close()
        finally:
            prefetcher.close_lease()
        raise


def record_start_error(config: dict[str, Any], message: str) -> None:
    """Say why the start failed where SerialMode looks (appended: several lone masters may write)."""
    logger.error("serial mode start check failed: %s", message)
    path = config.get("start_error_path")
    if path:
        with open(path, "a") as fh:
            fh.write(message.replace("\n", " ") + "\n")


# -- worker ---------------------------------------------------------------------------------------
class Worker:
    """Starts the tasks the master sends, reports their exits in batches, stops when told; says
    it is alive (an empty report) when it sent nothing for :data:`HEARTBEAT_SEC`."""

    #: After a signal, wait this long for the master's stop message before ending tasks alone.
    ORPHAN_STOP_SEC = 30.0

    def __init__(self, transport: MPITransport, wake: threading.Event, stop: StopConditions,
                 pool: "ProcessPool | SpawnerPool | SpawnerShards", clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.wake = wake
        self.stop = stop
        self.pool = pool
        self.base_env = dict(os.environ)
        self.clock = clock

    def _env(self, task: dict[str, Any]) -> dict[str, str]:
        env = dict(self.base_env)
        for key in task.get("unset", ()):
            env.pop(key, None)
        env.update(task["env"])
        return env

    def run(self) -> int:
        signal_time: Optional[float] = None
        clock = self.clock
        last_sent = clock()  # the last report sent to the master (its liveness deadline counts from there)
        while True:
            self.wake.clear()
            msg = self.transport.receive()
            if msg is not None:
                if "stop" in msg:
                    victims, finished = self.pool.terminate_all(float(msg.get("grace", 5)))
                    if self.stop.requested:
                        # A stop signal of this rank's own came first: every exit reaped since is
                        # the stop's (rule (a), module docstring), whatever its code.
                        for job_id, rc, _tail, _when in finished:
                            logger.info("job %s exited %s as the launcher stopped: reported ended by the stop", job_id, rc)
                        self.transport.report({"done": [], "killed": victims + [r[0] for r in finished], "final": True})
                    else:
                        # Exits before this rank signalled anything (the pool reaps them first):
                        # the master judges them by their end time against its stop (an exit 0
                        # before a wall-time or idle stop is the job's RUN_DONE).
                        self.transport.report({"done": [], "reaped_at_stop": finished, "killed": victims, "final": True})
                    self.transport.flush()
                    logger.info("worker stopped (%s): %d tasks ended", msg["stop"], len(victims) + len(finished))
                    return 0
                if "end" in msg:  # jobs their user deleted or moved: exits reported as usual, the master drops them
                    self.pool.end(msg["end"], float(msg.get("grace", 5)))
                    logger.info("ending jobs %s: deleted or moved by their user", msg["end"])
                for task in msg.get("launch", ()):
                    self.pool.start(task["id"], task["cmd"], task["workdir"], self._env(task), task.get("cpu_ids", ()))
                continue
            done = self.pool.reap()
            if done:
                if self.stop.requested:
                    # A stop signal of this rank's own came first (the batch system signals every
                    # process of the job): what exits now is the stop's doing, not the job's result.
                    for job_id, rc, _tail, _when in done:
                        logger.info("job %s exited %s after a stop signal: reported ended by the stop", job_id, rc)
                    self.transport.report({"done": [], "killed": [r[0] for r in done]})
                else:
                    self.transport.report({"done": done})
                last_sent = clock()
                continue
            now = clock()
            if now - last_sent >= HEARTBEAT_SEC:  # nothing sent for a while: say we are alive
                self.transport.report({"done": []})
                last_sent = now
            if self.stop.requested:
                # The master got the same signal and will send "stop"; fend for ourselves if it does not.
                signal_time = signal_time or time.monotonic()
                if time.monotonic() - signal_time > self.ORPHAN_STOP_SEC:
                    victims, _ = self.pool.terminate_all(5)
                    logger.error("no stop message from the master %.0f s after a signal; %d tasks killed",
                                 self.ORPHAN_STOP_SEC, len(victims))
                    return 1
            # Messages from the master are polled; task exits set `wake` at once.
            self.wake.wait(POLL_SEC if self.pool.running else 0.002)


# -- program --------------------------------------------------------------------------------------
#: Variables by which an MPI launcher tells the process it started which MPI process it is and how
#: to reach its process manager (rank, size, the PMI socket/fd, the job's key-value space). Every
#: rank of the serial mode has them, and a task inherits the rank's environment: an MPI program
#: run as a task then took itself for that rank, tried to connect to a PMI fd it does not hold
#: ("PMI_Init returned -1") and failed. After MPI_Init has read them (see :func:`main`) they are
#: removed from this process's environment, so that tasks start from a clean one (an mpi4py task
#: runs as a singleton, or under its own mpiexec). User settings stay: MPICH_*, I_MPI_*, FI_*,
#: UCX_*, HYDRA_* (hydra's mpiexec options, e.g. HYDRA_LAUNCHER), OMPI_MCA_ and PMIX_MCA_ tuning
#: parameters, PBS_* and the allocation's SLURM_* (SLURM_JOB_*, SLURM_NODELIST, SLURM_CONF, ...:
#: a task's own srun needs them). Under Slurm a rank is also a task of an srun step (the serial
#: line's srun, or the one hydra's mpiexec starts its proxies with): the SLURM_* srun sets or
#: changes for a step (:data:`SLURM_LAUNCHER_NAMES`) are put back to the launcher's values, the
#: job script's (see :data:`LAUNCHER_SLURM_ENV`).
RANK_BOOTSTRAP_PREFIXES = (
    # PMI-1/PMI-2 (MPICH hydra, Intel MPI, Slurm --mpi=pmi2, Cray PMI under PALS): PMI_FD, PMI_PORT,
    # PMI_ID, PMI_RANK, PMI_SIZE, PMI_HOSTNAME, PMI_KVSNAME, PMI_JOBID, PMI_LOCAL_RANK,
    # PMI_CONTROL_PORT, PMI_SHARED_SECRET ...: all of them describe this process's PMI connection.
    "PMI_",
    # hydra's proxy-internal variables (HYDI_CONTROL_FD: a descriptor of this rank's proxy).
    "HYDI_",
    # Open MPI's (ORTE and PRRTE) per-process identity: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK ...
    "OMPI_COMM_WORLD_",
    # Open MPI 4's connection to its orted daemon and its process name (the job id, the vpid).
    "OMPI_MCA_orte_",
    "OMPI_MCA_ess_base_",
)
#: Single names of the same kind (``PMIX_*`` is handled in :func:`is_rank_bootstrap_variable`).
RANK_BOOTSTRAP_NAMES = frozenset({
    "MPI_LOCALRANKID", "MPI_LOCALNRANKS",  # hydra: this rank's index on its node, ranks on the node
    "OMPI_MCA_ess", "OMPI_MCA_pmix", "OMPI_UNIVERSE_SIZE", "OMPI_FIRST_RANKS", "OMPI_APP_CTX_NUM_PROCS",
    "OMPI_NUM_APP_CTX", "OMPI_FILE_LOCATION",
    # Cray PALS (Polaris' and Aurora's mpiexec): this rank's ids and its application's spool.
    "PALS_RANKID", "PALS_NODEID", "PALS_LOCAL_RANKID", "PALS_LOCAL_SIZE", "PALS_APID", "PALS_APINFO",
    "PALS_SPOOL_DIR", "PALS_DEPTH",
    # ALPS (aprun): this rank's processing element number and its application id.
    "ALPS_APP_PE", "ALPS_APP_ID",
})
#: What srun/slurmstepd set for one task of a step and for the step itself (srun(1), OUTPUT
#: ENVIRONMENT VARIABLES, Slurm 22.05, and a worker step's environment on the real Slurm). A task
#: of worker k inherited SLURM_PROCID=k, SLURM_NTASKS=<workers>: code that reads them (PyTorch
#: Lightning, torchrun-less DDP setups, scripts) took itself for rank k of the workers' step. The
#: srun inputs among them (SLURM_NTASKS, SLURM_NNODES, SLURM_NTASKS_PER_NODE, SLURM_DISTRIBUTION,
#: SLURM_CPU_BIND, SLURM_MEM_BIND) also made a task's own srun take the workers' layout: a bare
#: ``srun`` ran one process per worker, and ``srun -N 3 -n 6`` went cyclic. Dropping them is not
#: enough: a job script has its own SLURM_NNODES, SLURM_NTASKS, SLURM_TASKS_PER_NODE... (from
#: sbatch/salloc -N/-n/--ntasks-per-node), which ``srun -N "$SLURM_NNODES"`` and a bare srun read.
#: So a task gets the launcher's values of these names (the batch shell's, as a command of the
#: job script sees them), or none where the launcher had none: see :data:`LAUNCHER_SLURM_ENV`.
SLURM_STEP_NAMES = frozenset({
    # this task: its rank in the step, on its node, its node's index in the step, its pid, and
    # SLURM_GTIDS (the step's task ids on the node, which Slurm's PMI reads: srun(1) warns that
    # leaving it set breaks third-party software)
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASK_PID", "SLURM_GTIDS",
    # the step: its id, nodes, task layout, and the srun that started it
    "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_GPUS", "SLURM_STEP_RESV_PORTS", "SLURM_STEP_LAUNCHER_PORT",
    "SLURM_SRUN_COMM_HOST", "SLURM_SRUN_COMM_PORT", "SLURM_LAUNCH_NODE_IPADDR",
    "SLURM_PTY_PORT", "SLURM_PTY_WIN_COL", "SLURM_PTY_WIN_ROW",
    # the step's options, which srun writes over the job script's (and reads back as input)
    "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NNODES", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK", "SLURM_DISTRIBUTION",
    "SLURM_CPU_BIND", "SLURM_CPU_BIND_LIST", "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_VERBOSE",
    "SLURM_MEM_BIND", "SLURM_MEM_BIND_LIST", "SLURM_MEM_BIND_PREFER", "SLURM_MEM_BIND_SORT",
    "SLURM_MEM_BIND_TYPE", "SLURM_MEM_BIND_VERBOSE",
    # --mpi=pmix: the step's process map and srun's abort agent (PMIX_* is dropped below)
    "SLURM_PMIX_MAPPING_SERV", "SLURM_PMIXP_ABORT_AGENT_PORT",
})
#: Also set for a step's tasks by srun from its options (--overcommit, --threads-per-core,
#: --cpu-freq) or by slurmstepd (SLURM_CPUS_ON_NODE: the step's CPUs on the node, not the job's):
#: without the launcher's values (:data:`LAUNCHER_SLURM_ENV`) they stay as srun set them.
SLURM_STEP_OUTPUT_NAMES = frozenset({"SLURM_OVERCOMMIT", "SLURM_THREADS_PER_CORE", "SLURM_CPU_FREQ_REQ", "SLURM_CPUS_ON_NODE"})
#: Every SLURM_* name srun may set or change for a step: those a task gets as the launcher had them.
SLURM_LAUNCHER_NAMES = SLURM_STEP_NAMES | SLURM_STEP_OUTPUT_NAMES
#: The variable by which the launcher hands its own values of :data:`SLURM_LAUNCHER_NAMES` to the
#: ranks (a JSON object, null for a name it had not): srun and mpiexec pass the launcher's
#: environment to the ranks, but srun writes its step's values over these names first. The ranks
#: put the launcher's values back and remove it (:func:`drop_rank_bootstrap_environment`).
LAUNCHER_SLURM_ENV = "BALSAM_LAUNCHER_SLURM_ENV"


#: The carrier's key for the launcher's node (``SLURMD_NODENAME``; not a variable to restore).
LAUNCHER_NODE_KEY = "SLURMD_NODENAME"
#: The batch shell's values that describe its own node and process: restored on the launcher's
#: node only.
SLURM_PER_NODE_NAMES = frozenset({"SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_TASK_PID", "SLURM_GTIDS",
                                  "SLURM_CPUS_ON_NODE"})


def launcher_slurm_environment(environ: Any = None) -> str:
    """The value of :data:`LAUNCHER_SLURM_ENV` for the ranks started from ``environ`` (``os.environ``)."""
    environ = os.environ if environ is None else environ
    values = {name: environ.get(name) for name in sorted(SLURM_LAUNCHER_NAMES)}
    # The launcher's node: its per-node values are the batch shell's on that node only.
    values[LAUNCHER_NODE_KEY] = environ.get("SLURMD_NODENAME")
    return json.dumps(values)


def is_rank_bootstrap_variable(name: str) -> bool:
    """Whether ``name`` is one of the variables an MPI launcher sets to identify the process it
    started (:data:`RANK_BOOTSTRAP_PREFIXES`, :data:`RANK_BOOTSTRAP_NAMES`, :data:`SLURM_STEP_NAMES`,
    and ``PMIX_*``: the PMIx server's address, namespace and rank, but not ``PMIX_MCA_*``, which
    are user settings)."""
    if name in RANK_BOOTSTRAP_NAMES or name in SLURM_STEP_NAMES or name.startswith(RANK_BOOTSTRAP_PREFIXES):
        return True
    return name.startswith("PMIX_") and not name.startswith("PMIX_MCA_")


def drop_rank_bootstrap_environment(environ: Any = None) -> list[str]:
    """Remove this rank's MPI bootstrap variables from ``environ`` (``os.environ``), which the
    tasks' environment is built from, and give :data:`SLURM_LAUNCHER_NAMES` the launcher's values
    where it passed them (:data:`LAUNCHER_SLURM_ENV`, removed too); returns the names removed or
    changed. Call only after MPI_Init."""
    environ = os.environ if environ is None else environ
    before = dict(environ)
    for name in [name for name in environ if is_rank_bootstrap_variable(name)]:
        del environ[name]
    carried = environ.pop(LAUNCHER_SLURM_ENV, None)
    if carried is not None:
        try:
            values = json.loads(carried)
        except ValueError:
            values = None
        if not isinstance(values, dict) or not all(v is None or isinstance(v, str) for v in values.values()):
            raise ValueError(f"{LAUNCHER_SLURM_ENV}: not a JSON object of SLURM_* names to strings or null: {carried[:200]!r}")
        launcher_node = values.get(LAUNCHER_NODE_KEY)
        elsewhere = launcher_node is not None and before.get("SLURMD_NODENAME") not in (None, launcher_node)
        for name in SLURM_LAUNCHER_NAMES:
            value = values.get(name)
            if elsewhere and name in SLURM_PER_NODE_NAMES:
                # On another node than the launcher's, the batch shell's node id, task pid, local
                # ids and CPU count are another node's (a task on node2 read SLURM_NODEID=0 and
                # node1's CPU count): no job-script command runs here, so its identity names go,
                # and SLURM_CPUS_ON_NODE stays as srun set it for this node.
                if name != "SLURM_CPUS_ON_NODE":
                    environ.pop(name, None)
                elif "SLURM_CPUS_ON_NODE" in before:
                    environ[name] = before[name]
                continue
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
    return sorted(name for name in set(before) | set(environ)
                  if name != LAUNCHER_SLURM_ENV and environ.get(name) != before.get(name))


def _usable_cpus() -> int:
    """How many CPUs this process may run on (what its MPI launcher bound it to, else the node's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _setup_logging(path: Path, logging_config: Optional[dict[str, Any]]) -> None:
    # The launcher's resolved ``logging:`` settings; a key it left out (null) takes the schema's default.
    values = {k: v for k, v in (logging_config or {}).items() if v is not None}
    configure_logging(path, types.SimpleNamespace(logging=LoggingSettings(**values)))


def _load_platform(config: dict[str, Any]) -> Any:
    """The platform the launcher resolved (``launcher.platform`` and ``platform_options`` in the
    config): the master never reads settings.yml, whose agent-module sections are not a
    launcher's to check (a broken one must not stop a serial start)."""
    launcher = config["launcher"]
    section = types.SimpleNamespace(platform=launcher["platform"], platform_options=launcher.get("platform_options") or {})
    return _platform(types.SimpleNamespace(launcher=section))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m balsam.launcher.modes.serial_worker CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    wake = WakeEvent()
    stop = StopConditions.for_launcher(config["wall_time_min"], config["start_time"], config["launcher"]["idle_ttl_sec"], wake)

    def on_signal(signum: int, _frame: Any) -> None:
        stop.request(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # Importing mpi4py.MPI initialises MPI: only here, in the program the MPI launcher started.
    from mpi4py import MPI

    # MPI is initialised: this rank's bootstrap variables have been read. Before any task
    # environment is built from os.environ (the master's jobs through get_environ_vars, the
    # workers' and spawners' base environments), take them out: a task is not this rank.
    dropped = drop_rank_bootstrap_environment()
    transport = MPITransport(MPI.COMM_WORLD, MPI)
    log_dir = Path(config["log_path"])
    base = f"serial_mode_{config['timestamp']}.{config['partition_index']}"
    hosts = transport.hosts()  # collective: before anything else, on every rank
    if transport.rank != 0:
        _setup_logging(log_dir / f"{base}.{socket.gethostname()}.{transport.rank}.log", config.get("logging"))
        logger.debug("MPI bootstrap variables not passed to tasks, or set to the launcher's: %s", " ".join(dropped) or "none")
        try:
            # Spawner processes here too, as on the master's node: a fork/exec from this
            # interpreter holds its GIL (and forks an MPI process) once per task.
            pool = local_pool(int(config.get("error_tail_num_lines", 10)), wake, spawners=spawner_count(_usable_cpus()),
                              relaunch_quick_failures=True)
            return Worker(transport, wake, stop, pool).run()
        except Exception:
            logger.exception("serial worker failed")
            return 1
    _setup_logging(log_dir / f"{base}.master.log", config.get("logging"))
    logger.debug("MPI bootstrap variables not passed to tasks, or set to the launcher's: %s", " ".join(dropped) or "none")
    nodes = [NodeInfo(**n) for n in config["nodes"]]
    try:
        ranks = rank_for_node(nodes, hosts)
    except StartError as exc:
        record_start_error(config, str(exc))
        transport.stop_workers("start check failed", 0)
        transport.flush()
        return EXIT_START_FAILED
    try:
        master = build_master(config, transport, ranks, stop, wake, lambda: _load_platform(config))
        reason = master.run()
    except Exception:
        logger.exception("serial master failed")
        transport.stop_workers("master failed", 5)
        return 1
    return master_exit_code(reason)


if __name__ == "__main__":
    sys.exit(main())
