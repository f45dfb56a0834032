"""mpi job mode: every job is started with the platform's MPI launcher (``mpiexec``, ``srun``...).

One process on the head node of the partition: it leases jobs through a Session sized to the free
nodes plus a lookahead (``max_aggregate_nodes`` = free node footprint + the lookahead - the
footprint already leased and waiting, ``max_nodes_per_job`` = idle nodes, ``max_wall_time_min`` =
time left), places them with the NodeManager (node packing, CPUs, GPUs), starts
``platform.mpi_command_line(...)`` for each, and reports RUNNING / RUN_DONE / RUN_ERROR in bulk.

Jobs larger than the idle nodes: with ``sort_by: long_large_first``, while none waits leased, the
acquire may lease one up to the whole partition (:func:`~balsam.launcher.placement.acquire_size_limits`), and once the oldest job that does
not fit has waited ``mpi_drain_for_large_jobs_sec``, the nodes it is to get take no other job
(and none is queued behind a running one) until they have drained for it (:class:`~balsam.launcher.placement.DrainForLarge`).
Without this, each node freed by a short job was taken at once by another, and a multi-node job
waited until no smaller job was left.

Why a wave ahead, and why the acquire runs in a thread: an acquire is a round trip to the API,
often as long as a short job. Leasing only what fits now, on the loop thread, left a slot idle for
a round trip after every exit (measured: about one job running at a time of two possible). Now a
job that ends is replaced at once from the jobs leased ahead, and the next acquire is in flight
while jobs run. The lookahead is one wave (the partition's node footprint, at most
``max_concurrent_mpiruns`` jobs) unless jobs end faster than acquires come back: then it is what
ends in a few round trips (:class:`LeaseAhead`). Once an answer says the backlog is empty, exits
no longer send an acquire each (:class:`EmptyBacklog`), and while nothing waits leased and the
request offers room for any job the nodes could run, the acquire asks the server to wait for jobs
(``Prefer: wait``, :class:`AcquireWait`; none while the oversized-job probe is due, not even while
a job runs, so that the probe comes as the partition goes idle): a job created then (a workflow that adds one as another
ends) is leased when it is created, not ``delay_sec`` later. The Session's deletion at exit (or its expiry after
a crash) frees what never started. When the partition is full, jobs also wait in the spawner behind
running jobs of the same demand and start on their resources as they exit (hand-over, shared with
serial mode: :mod:`balsam.launcher.handover`), which saves the loop's round trip per exit.

Threads: the **loop thread** owns the NodeManager, the pending deque and the process pool; the
**acquirer thread** (an executor of one) only runs ``source.acquire`` (and the oversized-job probe)
with arguments computed by the loop, one call at a time, prepares the jobs it got (the
``JobPreparer`` is safe off the loop thread: the serial master prepares in its acquire thread too)
and wakes the loop when it is done; the loop checks them against the NodeManager and queues them.
The lease's **heartbeat thread** asks the server which held jobs their user deleted or moved
(:mod:`balsam.launcher.gone`): it copies the held ids and hands the answer over; the loop ends
those runs. A job leased again while an older copy of it is held replaces that copy (same module).
The loop starts (or queues behind another) a leased job only while the lease is known alive
(:func:`balsam.launcher.gone.lease_is_fresh`, read at the top of each turn, before the jobs handed
over as gone are looked at); otherwise the heartbeat thread is asked for a heartbeat at once and
wakes the loop with its answer (:meth:`balsam.client.lease.JobLease.check_fresh`).

Exits at a stop (the serial mode's rule, :mod:`balsam.launcher.modes.serial_worker`, "Exits at a
stop"): (a) an exit at or after the launcher's stop is RUN_TIMEOUT whatever its code (every exit during
the stop's grace), and at a signal stop one reaped after it that ended within the stop window
before it; an exit before a wall-time or idle stop that the loop had not reaped yet is the job's
own (RUN_DONE, RUN_ERROR: a finished computation is not run again); (b) an exit by a stop
signal is held :data:`~balsam.launcher.runner.STOP_WINDOW_SEC` (3 s) before it is reported, and a
stop within that time makes it RUN_TIMEOUT (also a quick failure :class:`NodeFaults` still holds);
an exit 0 more than that window before a signal stop stays RUN_DONE, and a signal exit with no
stop in the window RUN_ERROR.

A stop's SIGTERM goes first through the platform where it can deliver it (``Platform.signal_runs``:
on Slurm ``srun`` turns a SIGTERM to its process group into a SIGKILL of its step's tasks, so an
app could never save a checkpoint); those runs get what is left of the grace to end (the others
their SIGTERM at once) before the process groups are signalled, after a SIGKILL through the
platform to those still there (:meth:`MPIMode._signal_through_platform`).

At a stop, and after an exception in the loop alike, the running jobs are ended and reported first;
only then is an acquire still in flight waited for (its jobs never start; the Session's deletion,
after it, frees them): a slow API must not keep the jobs running while the batch system's kill
comes closer. An acquire answered from the loop's end on prepares nothing (no workdir is made
for a job that never starts), and a waiting acquire in flight is not waited for at all: the Session's deletion ends
its wait on the server (the deletion wakes it, and it finds no Session), and frees whatever it leased.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import resource
import signal
import threading
import time
from collections import deque
from typing import Any, Optional

import attrs

from balsam.platform import LaunchLimit, LaunchSpec, deliver_signal
from balsam.util import clip, env_number, format_threads_cpu, threads_cpu_seconds

from ..service_calls import default_client, largest_active_batch_job, note_batch_job
from ..entry import MPI_PARTITIONS_ENV
from ..gone import Acquired, GoneJobs, acquire_generation, lease_is_fresh
from ..app_run import (
    JobBuildError, JobPreparer, PreparedJob, SiteFaults, WorkdirUnavailable, inherited_environment, shell_line,
)
from ..handover import HandOver, lease_fresh_until
from ..job_mode import (
    RUNNABLE_NOTE_WAIT_SEC, JobMode, gpuless_acquire_filter, longest_offered_min, runnable_jobs_page, too_long_note,
)
from ..node_manager import Exit, NodeFaults, NodeManager, Placement, UnsatisfiableJob
from ..placement import DrainForLarge, TooLateJobs, acquire_size_limits, place_pending
from ..runner import (
    _launch_hook, disk_wait, ended_by_stop, launch_environment, local_pool, report_exit, report_failed, report_running, report_timeout,
    send_first_running, stopped_reason,
)

logger = logging.getLogger(__name__)

#: Longest sleep of a loop turn while jobs run or wait: job exits and stop requests end it at once
#: (the pool's reaper sets ``wake``); only the next acquire waits for it.
POLL_SEC = 0.05
#: Jobs asked for per probe for jobs larger than the partition (see ``_probe_too_large``).
PROBE_JOBS = 64
#: Seconds of recent job exits the lease-ahead rate is measured over (see :class:`LeaseAhead`).
EXIT_RATE_WINDOW_SEC = 1.0
#: ...or over the time since the first exit, if shorter, but at least this.
EXIT_RATE_MIN_SPAN_SEC = 0.1
#: Short jobs are leased this many acquire round trips ahead of the starts...
LEASE_AHEAD_ROUND_TRIPS = 3.0
#: ...but never more than this many seconds of exits ahead (what another launcher cannot take).
LEASE_AHEAD_MAX_SEC = 2.0
#: ...and at least this many (a round trip measures only the HTTP call, not the loop and thread
#: wake-ups around it on a busy node).
LEASE_AHEAD_MIN_SEC = 0.25
#: The acquire round trip assumed before one has been measured.
INITIAL_ROUND_TRIP_SEC = 0.1
#: After an acquire that found no job although it offered room for any job the nodes could take
#: (:class:`EmptyBacklog`), job exits bring the next acquire forward to this long after that answer,
#: no sooner (else ``delay_sec`` after it). Measured with 100 no-op jobs: asking again at every exit
#: sent one empty acquire per 2-3 exits once the backlog was leased (16 of the run's 26 acquires),
#: each a request the server handled on the CPUs the jobs needed.
EMPTY_BACKLOG_REASK_SEC = 0.25
#: How long a waiting acquire (:class:`AcquireWait`) asks the server to hold its answer for a job to
#: come (the server's cap is 10 s): an idle launcher sends one acquire per this long (was one per
#: ``delay_sec``), and a stop never waits for it (the Session's deletion ends the wait).
ACQUIRE_WAIT_SEC = 5.0
#: Hand-over (:mod:`balsam.launcher.handover`): jobs queued in the spawner behind each running job
#: of the same demand, started on its nodes the moment it exits. Two cover the loop's round trip
#: after an exit even for jobs of a few milliseconds; more would only hold jobs another slot could take.
HANDOVER_DEPTH = 2
#: ... only behind a job younger than this (an older one gives its queue back to be placed anew).
HANDOVER_MAX_AGE_SEC = 1.0
#: The least ``terminate_all`` gets at a stop whose grace the platform's delivery spent (see
#: ``_signal_through_platform``): srun, SIGTERMed, needs a moment to end its step before its SIGKILL.
STOP_MIN_GRACE_SEC = 1.0


def mpi_partitions(env: Any) -> int:
    """How many mpi partitions the batch job has (1 unless the launcher split it): a whole number from
    1, which the multi-partition launcher sets; another value is warned about once and 1 used."""
    return env_number(MPI_PARTITIONS_ENV, 1, minimum=1, environ=env, warn=logger.warning)


def share_launch_limit(limit: Optional[LaunchLimit], shares: int) -> Optional[LaunchLimit]:
    """This partition's part of a per-batch-job launch limit (the limit itself with one partition)."""
    if limit is None or shares <= 1:
        return limit
    return LaunchLimit(max(1, limit.max_launches // shares),
                       f"{limit.reason}, shared by {shares} mpi partitions")


class LeaseAhead:
    """How many nodes' worth of jobs to hold leased and waiting beyond the free nodes (pure accounting).

    One wave (the partition's nodes) while jobs last longer than an acquire: a job that ends is
    replaced from the wave, and the next acquire has a job's run time to come back. Jobs as short
    as a round trip drain a wave before the acquire's answer arrives (measured with 400 no-op jobs
    on two CPUs: gaps of 0.1-0.2 s with nothing running after every few jobs, and one acquire per
    two jobs, each a request the server handles on the CPUs the jobs need). So the lease also
    covers the nodes that ended jobs freed over the last :data:`EXIT_RATE_WINDOW_SEC`, times
    :data:`LEASE_AHEAD_ROUND_TRIPS` measured acquire round trips (at least
    :data:`LEASE_AHEAD_MIN_SEC`, at most :data:`LEASE_AHEAD_MAX_SEC`), in whole waves: what the
    partition will start before an answer can come back.
    Beyond one wave the acquire waits until half of the extra lookahead is used (:meth:`min_request`),
    so that it asks for jobs in batches rather than one per exit.
    """

    def __init__(self, wave_nodes: float, *, window_sec: float = EXIT_RATE_WINDOW_SEC,
                 round_trips: float = LEASE_AHEAD_ROUND_TRIPS, min_sec: float = LEASE_AHEAD_MIN_SEC,
                 max_sec: float = LEASE_AHEAD_MAX_SEC) -> None:
        self.wave_nodes = float(wave_nodes)
        self.window_sec = window_sec
        self.round_trips = round_trips
        self.min_sec = min_sec
        self.max_sec = max_sec
        #: Smoothed acquire round trip (written by the acquirer thread: one float assignment).
        self.round_trip_sec = INITIAL_ROUND_TRIP_SEC
        self._freed: deque[tuple[float, float]] = deque()  # (monotonic time, footprint) per exit
        self._freed_nodes = 0.0
        self._first_exit: Optional[float] = None

    def job_ended(self, footprint: float, now: float) -> None:
        self._freed.append((now, footprint))
        self._freed_nodes += footprint
        if self._first_exit is None:
            self._first_exit = now

    def acquire_took(self, seconds: float) -> None:
        self.round_trip_sec = 0.7 * self.round_trip_sec + 0.3 * max(0.0, seconds)

    def freed_nodes_per_sec(self, now: float) -> float:
        while self._freed and now - self._freed[0][0] > self.window_sec:
            self._freed_nodes -= self._freed.popleft()[1]
        if not self._freed:
            self._freed_nodes = 0.0  # no float drift left behind
            return 0.0
        # Over the time since the first exit while that is shorter than the window: the first
        # second of a launcher is when a wave runs out fastest.
        span = min(self.window_sec, max(EXIT_RATE_MIN_SPAN_SEC, now - self._first_exit))  # type: ignore[operator]
        return self._freed_nodes / span

    def nodes(self, now: float) -> float:
        """Footprint to hold leased beyond the free nodes: whole waves, so that a request never
        offers a fraction of a wave too small for the jobs (an empty answer then looks like an
        empty queue)."""
        horizon = min(self.max_sec, max(self.min_sec, self.round_trips * self.round_trip_sec))
        waves = math.ceil(self.freed_nodes_per_sec(now) * horizon / self.wave_nodes - 1e-9) if self.wave_nodes else 1
        return self.wave_nodes * max(1, waves)

    def min_request(self, ahead_nodes: float) -> float:
        """The smallest footprint worth an acquire, for a lookahead of ``ahead_nodes``."""
        return max(0.01, (ahead_nodes - self.wave_nodes) / 2)


class EmptyBacklog:
    """When to ask again after an acquire that found no job (pure accounting).

    An empty answer to a request that offered room for any job the nodes could run (its
    ``max_aggregate_nodes`` at least its ``max_nodes_per_job``: a job of up to that many nodes takes
    at most that much of the aggregate, a packed one less) means the backlog holds no job for this
    launcher now; more room freed by exits changes nothing, so asking again at each exit only costs
    the server a request (and the node the CPU the jobs need). New jobs still arrive (created by a
    workflow, or made runnable as their parents finish): exits then bring the next acquire forward to
    :data:`EMPTY_BACKLOG_REASK_SEC` after the empty answer. An answer to a request that offered less
    (``max_aggregate_nodes`` below ``max_nodes_per_job``), or a request that could now lease a larger
    job (more idle nodes), or the first that would look for oversized jobs (the partition went idle),
    is asked at once, as before: the room freed since may hold a job that did not fit.
    """

    def __init__(self, reask_sec: float = EMPTY_BACKLOG_REASK_SEC) -> None:
        self.reask_sec = reask_sec
        #: The request answered with no job (None: the last answer had jobs, or none came yet).
        self.request: Optional[dict[str, Any]] = None
        self.answered_at = 0.0

    def answered(self, request: dict[str, Any], got: int, now: float) -> None:
        """The acquire of ``request`` came back with ``got`` jobs at ``now`` (monotonic)."""
        self.request = None if got else request
        self.answered_at = now

    def clear(self) -> None:
        """An acquire failed: nothing is known of the backlog (exits ask at once, as after jobs came)."""
        self.request = None

    @staticmethod
    def may_differ(empty: dict[str, Any], request: dict[str, Any]) -> bool:
        """Whether ``request`` could lease a job that ``empty``, answered with none, could not."""
        if request["max_nodes_per_job"] > empty["max_nodes_per_job"]:
            return True
        if request.get("probe") and not empty.get("probe"):
            return True
        return (empty["max_aggregate_nodes"] < empty["max_nodes_per_job"]
                and request["max_aggregate_nodes"] > empty["max_aggregate_nodes"])

    def after_exit(self, request: Optional[dict[str, Any]], now: float) -> float:
        """When (monotonic) to send the next acquire, now that jobs ended; ``request`` is what it
        would ask (None: no room to ask for any job)."""
        empty = self.request
        if empty is None or request is None or self.may_differ(empty, request):
            return now
        return self.answered_at + self.reask_sec


class AcquireWait:
    """Whether an acquire asks the server to wait for jobs (``Prefer: wait=N``), and when to ask
    again after its empty answer (pure accounting).

    With the backlog empty, a job created by a workflow waited up to ``delay_sec`` (1 s) for the
    next acquire (measured: 978 ms median from creation to RUNNING with one job at a time). A
    waiting acquire is answered as soon as a job can be leased. It is asked for only when no exit
    during the wait could change the answer: the last answer (to a known body: not the one after a
    failed acquire, which may be the resent old body) found no job, nothing waits leased or queued
    (jobs ending only free room), and the request offers room for any job the nodes could run
    (``max_nodes_per_job`` at least the nodes in service, ``max_aggregate_nodes`` at least that): a
    partition with some nodes busy under multi-node jobs asks without waiting, as before
    (:class:`EmptyBacklog`), since a node that frees may let a larger job in.

    After an empty answer: at once again if the server held it at least half the wait (the wait was
    the pause between acquires); ``delay_sec`` after it if it came back sooner (a server that does
    not wait, an older one, answers at once: one acquire per ``delay_sec``, as before, and the next
    empty answers are not brought forward). After an empty answer to an acquire that did not wait,
    the first waiting one goes :data:`EMPTY_BACKLOG_REASK_SEC` after it (the exits' rule), not
    ``delay_sec``.
    """

    def __init__(self, wait_sec: float = ACQUIRE_WAIT_SEC) -> None:
        self.wait_sec = wait_sec
        #: False once a waiting acquire came back empty without waiting (until one waits again).
        self.server_waits = True

    def wait_for(self, request: dict[str, Any], empty: Optional[dict[str, Any]], in_service: int, holding: bool) -> float:
        """Seconds the acquire of ``request`` may wait (0: it does not); ``empty``: the request last
        answered with no job (:attr:`EmptyBacklog.request`); ``holding``: jobs wait leased or queued."""
        if empty is None or holding or self.wait_sec <= 0:
            return 0.0
        if request["max_nodes_per_job"] < in_service or request["max_aggregate_nodes"] < request["max_nodes_per_job"]:
            return 0.0
        return self.wait_sec

    def waited(self, wait_sec: float, took: float) -> bool:
        """Whether the empty answer of an acquire that asked to wait ``wait_sec`` and took ``took``
        seconds was held by the server (then the next acquire goes at once)."""
        if not wait_sec:
            return False
        self.server_waits = took >= wait_sec / 2
        return self.server_waits


@attrs.frozen
class Unbuildable:
    """An acquired job the preparer could not build (it ends FAILED with the reason)."""

    id: int
    reason: str


@attrs.frozen
class GivenBack:
    """An acquired job left unstarted: the site's file system failed its workdir (:class:`SiteFaults`).
    It stays leased, untouched; the Session's release at the end makes it runnable again."""

    id: int


class MPIMode(JobMode):
    name = "mpi"

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.node_manager = NodeManager(context.nodes, allow_node_packing=context.allow_node_packing(),
                                        cpu_ids_are_cores=bool(getattr(context.platform, "cpu_ids_are_cores", False)),
                                        hardware_threads_per_core=int(
                                            getattr(context.platform, "hardware_threads_per_core", 0) or 0))
        self.preparer = JobPreparer(context.data_path, default_postprocess=bool(context.setting("default_postprocess_in_launcher")))
        # Before the first acquire: a launcher started on a still-full disk acquires nothing (it
        # would run each job onto the full disk and give it back), and the pause shows on the BatchJob.
        disk_wait.watch(context.data_path, lambda text: note_batch_job(context.batch_job_id, "disk_full", text))
        #: Started jobs whose successful exit is reported with POSTPROCESSED (PreparedJob.postprocess_on_exit)
        self._postprocess_on_exit: set[int] = set()
        self.pending: deque[PreparedJob] = deque()
        self.max_concurrent = int(context.setting("max_concurrent_mpiruns"))
        self.delay_sec = float(context.setting("delay_sec"))
        self.started = 0
        self.finished = 0
        #: When the loop saw a wall-time or idle stop (``time.time()``; a requested stop's time is
        #: ``self.stop.requested_at``): exits before it are the jobs' own results.
        self._stopped_at: Optional[float] = None
        self._hook: Any = None
        #: Resources were freed or jobs arrived since the last placement attempt ran out of room.
        self._try_start = True
        #: The platform's cap on MPI launches per batch job (Aurora: ~1,000), or None; the mpi
        #: partitions of one batch job share it evenly.
        shares = mpi_partitions(os.environ)
        self.launch_limit = share_launch_limit(context.platform.launch_limit(), shares)
        self._limit_reported = False
        self._next_probe = 0.0
        #: With several mpi partitions a job too large for this one may fit another: never probe.
        self._probe_oversized = shares == 1
        self.lease_ahead = LeaseAhead(len(self.node_manager))
        self.empty_backlog = EmptyBacklog()
        self.acquire_wait = AcquireWait()
        #: Set as the loop ends, before the running jobs are ended: an acquire answered after it
        #: prepares nothing (its jobs never start).
        self._acquire_closed = threading.Event()
        self._footprints: dict[int, float] = {}  # running job id -> its footprint (for lease_ahead)
        #: A node that is down is taken out after a few quick failures there (NodeFaults' rule).
        self.faults = NodeFaults(len(self.node_manager))
        self._started_at: dict[int, float] = {}  # running job id -> when it started (epoch)
        self._nodes_out: list[str] = []
        #: Leased jobs set aside because they can no longer finish before the wall time (never started).
        self.too_late = TooLateJobs("the launcher's end (its Session's deletion)")
        #: Which leased job that does not fit the nodes drain for (the ``mpi_drain_for_large_jobs_sec`` setting).
        self.drain = DrainForLarge(context.setting("mpi_drain_for_large_jobs_sec"))
        #: (demand, nodes in service) -> why such a job cannot start on them (None: it can); see _cannot_fit
        self._fit_answers: dict[Any, Optional[str]] = {}
        #: The acquire's order leases the largest (and longest) jobs first (``sort_by: long_large_first``).
        self.leases_large_first = context.setting("sort_by") == "long_large_first"
        #: Every acquire's (and the probe's) extra filter: no job needing a GPU when the nodes have none.
        self._acquire_filter = gpuless_acquire_filter(context.nodes)
        #: Jobs given back because the site's file system failed their workdirs; once tripped, no
        #: more acquires (the launcher ends when idle).
        self.site_faults = SiteFaults()
        #: The first acquire's request when it was sent early (see :meth:`_acquire_early`), else None.
        self._early: Any = None
        self._early_request = self._acquire_early()
        # Started after the early acquire went out: the spawner's start (a process, tens of ms)
        # overlaps its round trip. Every task here is an MPI launcher: it keeps SIGPIPE ignored
        # (runner.local_pool).
        self.pool = local_pool(int(context.setting("error_tail_num_lines")), wake=self.wake, sigpipe_ignored=True)
        #: Jobs queued in the spawner behind running ones (counted with ``pending`` wherever the
        #: leased-but-not-started jobs are: they are not RUNNING until they start).
        self.handover = HandOver(self.pool, self.node_manager, depth=HANDOVER_DEPTH, max_age_sec=HANDOVER_MAX_AGE_SEC)
        #: Jobs the Session no longer holds (deleted or moved by their user): their runs are ended.
        self.gone = GoneJobs(self.wake)
        self.gone.held = self._held_ids

    def _acquire_early(self) -> Optional[dict[str, Any]]:
        """Send the first acquire through the Session the launcher opened early (EarlyLease), before
        the spawner starts: its answer is then in hand when the loop begins (the loop's first
        answer, taken once by :meth:`_fetch_early`). The request is the loop's own first one
        (nothing leased, queued or running yet). None when there is no early Session for this
        launcher or no room to ask; if the mode never runs, the launcher's discard of the early
        lease deletes the Session, which gives the jobs back."""
        ctx = self.context
        early = ctx.early_lease
        if early is None or not early.matches(ctx.site_id, ctx.batch_job_id):
            return None
        request = self._request_for({}, running=False)
        if request is None:
            return None
        request["wait_sec"] = 0.0  # the first acquire never waits (no empty answer yet: AcquireWait)
        early.acquire_early(ctx.filter_tags, ctx.setting("sort_by"), request["count"],
                            max_wall_time_min=self.countdown.remaining_min(),
                            max_nodes_per_job=request["max_nodes_per_job"],
                            max_aggregate_nodes=request["max_aggregate_nodes"], **self._acquire_filter)
        self._early = early
        return request

    # -- jobs deleted or moved by their user (balsam.launcher.gone) ------------------------------
    def _held_ids(self) -> list[int]:
        """The jobs running, queued behind others or leased and waiting (heartbeat thread: copies)."""
        return [*self.pool.job_ids(), *list(self.handover.queued), *(p.id for p in list(self.pending))]

    def _end_gone(self) -> None:
        """End the runs of the jobs the heartbeat said are gone; drop or cancel those not started."""
        local, cancel, _ = self.gone.take(self.pool.job_ids(), self.pending, self.handover.queued)
        for job_id in cancel:  # comes back unstarted (dropped then), or started (ended at once)
            self.pool.cancel(job_id)
        if local:
            self.pool.end(local, self.countdown.grace_sec)

    # -- one loop step each --------------------------------------------------------------------
    def _acquire_request(self) -> Optional[dict[str, Any]]:
        """Arguments of the next acquire (the free resources plus the lookahead of
        :class:`LeaseAhead`, at least one wave, less what is already leased and waiting), or None
        when there is no room to ask for any job, or too little to be worth a request."""
        return self._request_for(self.handover.queued, running=bool(self.pool.running))

    def _request_for(self, queued: Any, running: bool) -> Optional[dict[str, Any]]:
        """:meth:`_acquire_request` given the jobs queued in the spawner and whether any runs."""
        if self.site_faults.tripped or disk_wait.paused():  # a full disk: see runner.DiskWait
            return None
        nm = self.node_manager
        waiting = sum(p.footprint for p in self.pending) + sum(p.footprint for p in queued.values())
        ahead = self.lease_ahead.nodes(time.monotonic())
        room_nodes = nm.aggregate_free_nodes() + ahead - waiting
        room = self.max_concurrent - len(self.pending) - len(queued)
        if self.launch_limit is not None:
            left = self.launch_limit.max_launches - self.started - len(self.pending) - len(queued)
            if left <= 0:
                self._report_launch_limit()
                return None
            room = min(room, left)
        if not nm.allow_node_packing:
            room = min(room, nm.count_empty_nodes() + len(nm) - len(self.pending) - len(queued))
        if room_nodes < self.lease_ahead.min_request(ahead) or room <= 0:
            return None
        empty = nm.count_empty_nodes()
        if self.drain.enabled and self.leases_large_first:
            # Also a job larger than the idle nodes while none waits: the head of the line the nodes
            # drain for. Only where the server's order puts large jobs first: in its default order
            # (fewest nodes first) the room would be filled with small jobs, up to a partition's
            # worth held from the site's other launchers, and the large job leased after them anyway.
            max_nodes, room_nodes = acquire_size_limits(empty, nm.enabled_count(), (p.demand.num_nodes for p in self.pending),
                                                        room_nodes)
        else:  # such a job would only wait here, held from other launchers
            max_nodes = max(1, empty)
        return {
            "count": room,
            "max_nodes_per_job": max_nodes,
            "max_aggregate_nodes": room_nodes,
            # Jobs larger than the partition are looked for only while it is idle and nothing waits.
            "probe": empty == len(nm) and not self.pending and not running and self._probe_oversized,
        }

    def _acquire_wait_sec(self, request: Optional[dict[str, Any]]) -> float:
        """How long the acquire of ``request`` may ask the server to wait for jobs (:class:`AcquireWait`)."""
        if request is None:
            return 0.0
        if self._probe_oversized and time.monotonic() >= self._next_probe:
            # The oversized-job probe is due: it runs after the empty answer of an acquire sent with
            # the partition idle, not after a wait the idle timeout may end first (then a job larger
            # than the partition was never failed). Nor does one wait while jobs still run (a
            # one-node partition offers room for any job then): the lease has one acquire out at a
            # time, so that wait would still be in flight as the partition goes idle, and the probe
            # put off past it (measured under CPU load: an idle stop then came with no probe).
            return 0.0
        return self.acquire_wait.wait_for(request, self.empty_backlog.request, self.node_manager.enabled_count(),
                                          bool(self.pending or self.handover.queued))

    def _fetch(self, source: Any, request: dict[str, Any]) -> Acquired:
        """The acquire itself (acquirer thread); the jobs carry the acquire's number (see
        :mod:`balsam.launcher.gone`: a heartbeat answer older than them is not applied to them)."""
        began = time.monotonic()
        wait_sec = request.get("wait_sec", 0.0)
        jobs = source.acquire(
            request["count"],
            max_wall_time_min=self.countdown.remaining_min(),
            max_nodes_per_job=request["max_nodes_per_job"],
            max_aggregate_nodes=request["max_aggregate_nodes"],
            **({"wait_sec": wait_sec} if wait_sec else {}),  # (a source without waits need not know the word)
            **self._acquire_filter,
        )
        return self._answered(source, request, jobs, time.monotonic() - began)

    def _fetch_early(self, source: Any, request: dict[str, Any]) -> Acquired:
        """The answer of the acquire sent early (:meth:`_acquire_early`), as the loop's first
        (acquirer thread): handed over once by the early lease, then prepared as any other."""
        jobs, took = self._early.first_jobs()
        logger.info("the first acquire, sent early, got %d jobs in %.3f s", len(jobs), took)
        return self._answered(source, request, jobs, took)

    def _answered(self, source: Any, request: dict[str, Any], jobs: list, took: float) -> Acquired:
        wait_sec = request.get("wait_sec", 0.0)
        # Read by the loop once this call is done (the future orders it).
        request["took"] = took
        if not wait_sec:  # a waiting acquire's time is the server's wait, not a round trip
            self.lease_ahead.acquire_took(took)
        logger.debug("acquired %d jobs for up to %.2f nodes in %.3f s%s", len(jobs), request["max_aggregate_nodes"],
                     took, f" (asked to wait up to {wait_sec:g} s)" if wait_sec else "")
        if jobs and self._acquire_closed.is_set():
            # Answered after the loop ended (a waiting acquire it did not wait for): never started,
            # so not prepared either; the Session's deletion gives them back.
            logger.info("%d jobs acquired as the launcher stopped; the session release returns them", len(jobs))
            return Acquired((), acquire_generation(source))
        if not jobs and request["probe"] and not self._acquire_closed.is_set():
            jobs = self._probe_too_large(source)
        generation = acquire_generation(source)  # this thread is the lease's only acquirer
        if jobs:
            self.preparer.end_stale_runs(jobs)  # the batch's stale runs ended together: one grace for all
        # Prepared here rather than on the loop thread (app, command line, environment, workdir:
        # ~1 ms a job), so that the loop answers job exits while a batch is being prepared.
        return Acquired((self._prepare(job) for job in jobs), generation)

    def _prepare(self, job: Any) -> "PreparedJob | Unbuildable | GivenBack":
        """A job ready to place, or why it cannot be built, or given back unstarted (acquirer thread)."""
        faults = self.site_faults
        if faults.tripped:  # the rest of an acquire after the file system failed: not even tried
            faults.given_back.append(int(job.id))
            return GivenBack(int(job.id))
        try:
            prepared = self.preparer.prepare(job)
        except WorkdirUnavailable as exc:  # the site's fault, not the job's
            faults.fault(job.id, exc)
            return GivenBack(int(job.id))
        except JobBuildError as exc:
            return Unbuildable(int(job.id), str(exc))
        faults.ok()
        return prepared

    def _take(self, jobs: list["PreparedJob | Unbuildable | GivenBack"], updater: Any) -> None:
        """Queue prepared jobs (loop thread); unbuildable or impossible ones end FAILED. A job
        that arrives while an older copy of it is held replaces that copy (:meth:`GoneJobs.arrive`):
        a second copy in ``pending`` would be placed twice (the NodeManager refuses) or run twice."""
        nm = self.node_manager
        ready = []
        for prepared in jobs:
            if isinstance(prepared, GivenBack):
                continue  # left leased and unstarted: the Session's release gives it back
            try:
                if isinstance(prepared, Unbuildable):
                    raise JobBuildError(prepared.reason)
                nm.check_satisfiable(prepared.demand)
            except (JobBuildError, UnsatisfiableJob) as exc:
                logger.error("job %s FAILED: %s", prepared.id, exc)
                report_failed(updater, prepared.id, str(exc))
                continue
            ready.append(prepared)
        if not ready:
            return
        # Also those that wait for a stale copy to end (gone.successors): they reach pending later.
        self.too_late.note_leased(ready)
        now, local, cancel, _ = self.gone.arrive(ready, getattr(jobs, "generation", 0), self.pool.job_ids, self.pending,
                                                 self.handover.queued, placed=nm.placements)
        for job_id in cancel:  # comes back unstarted (dropped then), or started (ended at once)
            self.pool.cancel(job_id)
        if local:
            self.pool.end(local, self.countdown.grace_sec)
        if now:
            self.pending.extend(now)
            self._try_start = True

    def _fail(self, updater: Any, job_id: int, reason: str) -> None:
        """A job that could not be started ends FAILED."""
        self.gone.forget(job_id)
        report_failed(updater, job_id, reason)

    def _queue_ready(self) -> None:
        """New copies of jobs whose stale copy has exited and freed its resources: to ``pending``."""
        ready = self.gone.release_ready(self.node_manager.placements)
        if ready:
            self.pending.extend(ready)
            self._try_start = True

    def _probe_too_large(self, source: Any) -> list[Any]:
        """Lease jobs that ask for more nodes than this partition has, so that they end FAILED
        with the reason rather than wait unseen (the regular acquire never offers them).

        Asked only while every node is idle and the regular acquire found nothing, so the answer
        holds nothing this launcher could run (a job created in between is simply run); at most
        once per ``max(delay_sec, 5)`` seconds; and never while another BatchJob of the site that is
        waiting or running is larger than this partition (such jobs are for it), nor when the batch
        job has several mpi partitions (another may be large enough).
        """
        now = time.monotonic()
        if now < self._next_probe:
            return []
        self._next_probe = now + max(self.delay_sec, 5.0)
        nodes = len(self.node_manager)
        try:
            larger = largest_active_batch_job(self.context.site_id, self.context.batch_job_id)
        except Exception as exc:
            logger.debug("not looking for oversized jobs: the site's batch jobs are not readable (%s)", exc)
            return []
        if larger > nodes:
            return []
        return source.acquire(PROBE_JOBS, max_wall_time_min=self.countdown.remaining_min(), **self._acquire_filter)

    def _report_launch_limit(self) -> None:
        """Say once, in the log and in the BatchJob's status_info, why no more jobs are acquired."""
        if self._limit_reported or self.launch_limit is None:
            return
        self._limit_reported = True
        # Counted with the jobs taken but not yet started: the acquire runs a wave ahead of the starts.
        launches = self.started + len(self.pending) + len(self.handover.queued)
        message = (f"stopped acquiring jobs after {launches} MPI launches: {self.launch_limit.reason}; "
                   "jobs left over run in the next batch job")
        logger.warning(message)
        note_batch_job(self.context.batch_job_id, "launcher", message)

    def _launch_command(self, prepared: PreparedJob, placement: Placement) -> tuple[str, dict[str, str]]:
        """The MPI line and environment of a job on ``placement`` (started, or queued behind the
        job that holds it)."""
        env = launch_environment(prepared, placement, self.context.platform, self._hook)
        d = prepared.demand
        inherited = inherited_environment()
        spec = LaunchSpec(
            cmdline=prepared.cmdline,
            hostnames=placement.hostnames,
            ranks_per_node=d.ranks_per_node,
            threads_per_rank=d.threads_per_rank,
            threads_per_core=d.threads_per_core,
            gpus_per_rank=d.gpus_per_rank,
            cpu_ids=placement.cpu_ids,
            gpu_ids=placement.gpu_ids,
            launch_params=prepared.launch_params,
            env_names=sorted(k for k, v in env.items() if inherited.get(k) != v),
            job_id=prepared.id,
            app_id=getattr(prepared.job, "app_id", None),
            whole_nodes=placement.occupancy >= 1.0 - 1e-9,
        )
        mpi_line = self.context.platform.mpi_command_line(spec)
        return shell_line(mpi_line, prepared.preamble, prepared.workdir), env

    def _cannot_fit(self, demand: Any) -> Optional[str]:
        """Why a job could not start even on the empty nodes in service (None: it could). Kept per
        demand until a node is taken out (the answer changes only then): asked on every placement
        pass while a job waits to be drained for."""
        key = (demand, self.node_manager.enabled_count())
        cached = self._fit_answers.get(key, False)
        if cached is not False:
            return cached
        try:
            self.node_manager.check_satisfiable(demand, in_service=True)
            reason: Optional[str] = None
        except UnsatisfiableJob as exc:
            reason = str(exc)
        if len(self._fit_answers) > 256:
            self._fit_answers.clear()
        self._fit_answers[key] = reason
        return reason

    def _start_pending(self, updater: Any) -> int:
        if not self._try_start:
            return 0
        self._try_start = False
        room = self.max_concurrent - len(self.pool)
        drain = self.drain
        now = time.monotonic()
        before = drain.target
        target = (drain.choose(self.pending, now, self.node_manager.enabled_count(), self._cannot_fit)
                  if drain.unfit_since else None)
        if target is not None and target != before:
            self._cancel_handovers()  # jobs queued behind running ones would take the nodes it waits for

        def start(prepared: PreparedJob, placement: Placement) -> None:
            cmd, env = self._launch_command(prepared, placement)
            # An MPI launcher binds ranks itself, so no affinity is forced on it here. RUNNING is
            # stamped before the start is asked for, so it never sorts after a quick job's exit.
            asked = time.time()
            self.pool.start(prepared.id, cmd, prepared.workdir, env)
            self.handover.started_local(prepared, placement)
            self._note_running(updater, prepared, asked)
            if drain.unfit_since:
                drain.started(prepared.id, now)
            # Clipped: a job's arguments can be any size (a 200 KB one made a 200 KB log line).
            logger.info("started job %s on %s: %s", prepared.id, ",".join(placement.hostnames), clip(cmd))

        unfit = (lambda prepared: drain.note_unfit(prepared, now)) if drain.enabled else None
        started = place_pending(self.pending, self.node_manager, start, lambda job_id, reason: self._fail(updater, job_id, reason),
                                room=room, drain_for=target, unfit=unfit, queued=self.handover.queued.values())
        if started and not self.started:
            send_first_running(updater)
        self.started += started
        return started

    def _note_running(self, updater: Any, prepared: PreparedJob, when: float) -> None:
        """A job started at ``when`` (by this loop or by a hand-over): what its exit will need, and RUNNING."""
        self._footprints[prepared.id] = prepared.footprint
        self._started_at[prepared.id] = when
        if prepared.id in self.gone.ending:  # a hand-over cancelled as gone that started first
            self.pool.end([prepared.id], self.countdown.grace_sec)
            return
        if prepared.postprocess_on_exit:
            self._postprocess_on_exit.add(prepared.id)
        report_running(updater, prepared, when)

    # -- hand-over (balsam.launcher.handover) --------------------------------------------------
    def _queue_behind(self, updater: Any, source: Any = None) -> int:
        if self.drain.target is not None:
            return 0  # the nodes drain for a larger job: nothing more is queued onto them
        # With the lease's known-alive deadline, as serial mode: the spawner starts a queued job
        # only until then (a launcher frozen past its Session's expiry must not have it started).
        return self.handover.queue_behind(self.pending, self._launch_command,
                                          lambda job_id, reason: self._fail(updater, job_id, reason),
                                          lease_fresh_until(source))

    def _cancel_handovers(self) -> None:
        """Give back the jobs queued behind running ones (each chain from its first: the spawner drops
        what is queued behind a cancelled job too); they come back to ``pending`` unstarted."""
        for head_id, first in list(self.handover.behind.items()):
            if head_id in self.handover.local and first in self.handover.queued:
                self.pool.cancel(first)

    def _note_handovers(self, updater: Any) -> None:
        """Queued jobs that started (RUNNING at the time they started) or came back unstarted."""
        def handed_over(prepared: PreparedJob, when: float) -> None:
            self._note_running(updater, prepared, when)
            logger.info("started job %s by hand-over", prepared.id)

        started, dropped = self.handover.note_handovers(self.pending, handed_over)
        self.started += started
        if dropped:
            self._try_start = True

    def _pop_postprocess(self, job_id: int) -> bool:
        if job_id in self._postprocess_on_exit:
            self._postprocess_on_exit.discard(job_id)
            return True
        return False

    def _reap(self, updater: Any) -> int:
        done = self.pool.reap()
        if self.handover.queued:
            self._note_handovers(updater)  # before the exits: their placements pass to these
            if self.gone.ending:
                self.gone.drop_pending(self.pending)  # cancelled hand-overs of gone jobs came back
        if done:
            self._try_start = True
        now = time.monotonic()
        # A stop signal that came after this turn's stop check: what is reaped now may be its
        # doing (ended_by_stop: an exit at most the stop window before it, or after it).
        stop_time = self.stop.requested_at if self.stop.requested else None
        for job_id, rc, tail, when in done:
            placement = self.node_manager.placements.get(job_id)  # before release frees it
            started_at = self._started_at.pop(job_id, None)
            self.handover.release(job_id)
            self.lease_ahead.job_ended(self._footprints.pop(job_id, 0.0), now)
            postprocess = self._pop_postprocess(job_id)
            if self.gone.ending and self.gone.settled(job_id):
                continue  # deleted or moved by its user: the server would refuse any update
            self.gone.forget(job_id)
            logger.info("job %s exited with %s", job_id, rc)
            if stop_time is not None and ended_by_stop(rc, when, stop_time, reaped_after_stop=True):
                report_timeout(updater, job_id, stopped_reason(self.stop.reason or "signal", rc))
                continue
            if placement is None or len(placement.node_indexes) != 1 or started_at is None or not when:
                report_exit(updater, job_id, rc, tail, when, postprocess)  # a multi-node job's node is not known
                continue
            verdict = self.faults.note(Exit(job_id, placement.node_indexes[0], rc, when - started_at, tail, when), now)
            self._settle(updater, verdict, postprocess)
        self.finished += len(done)
        if self.gone.ready:  # after the exits and hand-overs that free the stale copies' placements
            self._queue_ready()
        return len(done)

    def _settle(self, updater: Any, verdict: Any, postprocess: bool) -> None:
        """Report the exits :class:`NodeFaults` settled; take a node out if it says so."""
        for e in verdict.report:  # held ones are failures: no postprocess to report for them
            report_exit(updater, e.job_id, e.returncode, e.tail, e.ended, postprocess and e.returncode == 0)
        if verdict.disabled is not None:
            self._take_out(verdict.disabled, verdict.requeue)
        for e in verdict.requeue:
            host = self.node_manager.nodes[e.node].hostname
            report_timeout(updater, e.job_id, f"node {host} taken out (down: its launches fail at once); the job did not "
                                               f"run there (exit {e.returncode}: {e.tail[-500:]})")

    def _report_expired_held(self, updater: Any) -> None:
        """Report the held quick failures whose node saw no further exit within
        :data:`~balsam.launcher.node_manager.HELD_EXIT_MAX_SEC` (as they are: no verdict came)."""
        for e in self.faults.expire(time.monotonic()):
            logger.info("job %s: its quick failure is reported (no further exit on its node to judge it)", e.job_id)
            report_exit(updater, e.job_id, e.returncode, e.tail, e.ended)

    def _take_out(self, index: int, streak: tuple) -> None:
        node = self.node_manager.nodes[index]
        if not self.node_manager.disable_node(index):
            return
        last = streak[-1].tail.strip().splitlines()[-1:] if streak else []
        message = (f"node {node.hostname} taken out: {len(streak)} jobs in a row failed there within "
                   f"{self.faults.quick_sec:g} s of their start ({last[0][:300] if last else 'no output'}); "
                   f"they are re-queued (RUN_TIMEOUT)")
        logger.error("%s; %d nodes left", message, self.node_manager.enabled_count())
        # Jobs queued behind the jobs on that node would start there: given back (they come back
        # unstarted to pending, or fail there and are re-queued as exits on a node that is out).
        for head_id, (_prepared, placement, _since) in list(self.handover.local.items()):
            first = self.handover.behind.get(head_id)
            if first is not None and index in placement.node_indexes:
                self.pool.cancel(first)
        self._nodes_out.append(message)
        note_batch_job(self.context.batch_job_id, "nodes_out", "; ".join(self._nodes_out))

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        self._hook = _launch_hook()
        logger.info(
            "mpi mode: %d nodes, wall time %.2f min (stop in %.0f s), filter_tags %s, node packing %s",
            len(self.node_manager), self.context.wall_time_min, self.countdown.remaining_sec(),
            self.context.filter_tags, self.node_manager.allow_node_packing,
        )
        reason = "wall time"
        acquirer = cf.ThreadPoolExecutor(1, thread_name_prefix="mpi-acquire")
        inflight: Optional[cf.Future] = None
        threads_cpu: list[tuple[str, int, float]] = []
        failed: Optional[BaseException] = None
        with self.lease() as (source, updater):
            self.gone.attach(source)
            updater.on_gone = self.gone.deleted  # a 404 of an update: the job was deleted meanwhile
            sent_request: dict[str, Any] = {}  # the request of the acquire in flight (or the last one)
            try:
                if self._early_request is not None:
                    # The first acquire went out as the mode was built: its answer is the loop's
                    # first, through the lease the launcher opened early (ctx.open_lease took it).
                    sent_request = self._early_request
                    inflight = acquirer.submit(self._fetch_early, source, sent_request)
                    inflight.add_done_callback(lambda _f: self.wake.set())
                next_acquire = 0.0
                freed_in_flight = False  # jobs ended while the acquire in flight was out
                backlog_empty = False  # the last acquire found no job for us
                # The last acquire failed: its request may be resent as it was (JobLease keeps the
                # body of an unanswered acquire and sends it again, unchanged, before a new one), so
                # the next answer may be to that body, not to the request the loop computed.
                after_failure = False
                while True:
                    stop = self.should_stop()
                    if stop:
                        reason = stop
                        self._stopped_at = time.time()  # a wall-time or idle stop's time (a request has its own)
                        break
                    # Read before the jobs handed over as gone are looked at (balsam.client.lease,
                    # "Known alive"): a lease found fresh here has handed over what a lost Session held.
                    fresh = lease_is_fresh(source, self.wake)
                    if self._reap(updater):
                        if inflight is not None:
                            freed_in_flight = True  # settled with the answer
                        else:  # freed resources: ask for more right away, unless the backlog is empty
                            next_acquire = min(next_acquire, self.empty_backlog.after_exit(
                                self._acquire_request() if self.empty_backlog.request is not None else None,
                                time.monotonic()))
                    if self.faults.held:
                        self._report_expired_held(updater)
                    if self.gone.news:
                        self._end_gone()
                    if inflight is not None and inflight.done():
                        failed_acquire = False
                        try:
                            got: Optional[int] = len(inflight.result())
                            self._take(inflight.result(), updater)
                        except Exception as exc:
                            logger.warning("acquire failed (will retry in %.1f s): %s", self.delay_sec, exc)
                            got = 0
                            failed_acquire = True
                        inflight = None
                        # Ask again right away while jobs keep coming; back off to delay_sec when
                        # the server has none for us. An empty answer to a request sized before
                        # jobs ended may only mean that nothing fitted the room it offered then:
                        # ask again with the room freed since (backing off here left the partition
                        # idle for delay_sec under short jobs) unless that room changes nothing
                        # (EmptyBacklog: the request offered room for any job the nodes could run).
                        now_mono = time.monotonic()
                        backlog_empty = not got
                        next_acquire = now_mono if got else now_mono + self.delay_sec
                        if failed_acquire or after_failure:
                            # No answer, or one to a body maybe resent from before (a smaller one's
                            # empty answer says nothing of the room asked now): no word on the
                            # backlog, exits ask at once.
                            self.empty_backlog.clear()
                        else:
                            self.empty_backlog.answered(sent_request, int(got or 0), now_mono)
                        if not got and not failed_acquire:
                            wait_sec = sent_request.get("wait_sec", 0.0)
                            if self.acquire_wait.waited(wait_sec, sent_request.get("took", 0.0)):
                                next_acquire = now_mono  # the server's wait was the pause: wait again
                            elif not wait_sec and self.acquire_wait.server_waits and self._acquire_wait_sec(
                                    self._acquire_request()):
                                # The first waiting acquire: when an exit would have asked (EmptyBacklog).
                                next_acquire = min(next_acquire, now_mono + self.empty_backlog.reask_sec)
                        if not got and freed_in_flight:
                            next_acquire = min(next_acquire, self.empty_backlog.after_exit(self._acquire_request(), now_mono))
                        after_failure = failed_acquire
                        freed_in_flight = False
                    if self.pending:
                        self.too_late.set_aside(self.pending, self.countdown.remaining_min, self.handover.queued.values(),
                                                self.gone.successors.values(), self.gone.ready.values(),
                                                forget=self.gone.forget)
                        if fresh:  # else a heartbeat is asked for: its answer wakes the loop
                            self._start_pending(updater)
                            self._queue_behind(updater, source)
                    # Also with nothing pending: jobs queued behind a long job go back to run on
                    # whatever frees up first (without this they waited for that job's end).
                    self.handover.cancel_behind_old()
                    if inflight is None and time.monotonic() >= next_acquire:
                        request = self._acquire_request()
                        if request is not None:  # no room: wait for a job to end instead
                            # Not after a failure: JobLease resends the old body first, never waiting.
                            request["wait_sec"] = 0.0 if after_failure else self._acquire_wait_sec(request)
                            sent_request = request
                            inflight = acquirer.submit(self._fetch, source, request)
                            inflight.add_done_callback(lambda _f: self.wake.set())
                    # An acquire in flight is not activity (one goes out every delay_sec while idle);
                    # if the idle timeout ends the launcher under it, its jobs go back with the Session.
                    busy = bool(self.pool.running or self.pending or self.handover.queued)
                    self.stop.note_activity(busy)
                    if not busy and backlog_empty:
                        # The last exits, with no job left to lease: their RUN_DONEs go now, not
                        # after the batch window (between waves of short jobs the pool empties
                        # for a moment too, and there the window keeps the PATCHes few).
                        updater.send_soon()
                    if self.pending and self._try_start and fresh:
                        continue  # jobs arrived while placing: start them before sleeping
                    # Exits, acquire answers and stop requests set `wake`; the timeout paces the
                    # next acquire.
                    # A waiting acquire's answer wakes the loop as any other (and the server holds
                    # it up to ACQUIRE_WAIT_SEC): no quick turns for it.
                    short = inflight is not None and not sent_request.get("wait_sec")
                    timeout = POLL_SEC if self.pool.running or self.pending or short else min(self.delay_sec, 0.2)
                    until_acquire = next_acquire - time.monotonic()
                    if inflight is None and until_acquire > 0:
                        timeout = min(timeout, until_acquire)
                    self.wake.wait(timeout)
                    self.wake.clear()
            except BaseException as exc:
                # Whatever broke the loop, the running jobs are still ended and reported (below):
                # left alone they would outlive the launcher and only time out with the Session.
                failed = exc
                reason = f"launcher error: {type(exc).__name__}: {exc}"
                logger.exception("mpi mode loop failed; ending the running jobs")
                raise
            finally:
                threads_cpu = threads_cpu_seconds()  # before the threads it names stop
                # Closed before the running jobs are ended (their grace may last seconds): a job a
                # waiting acquire leases meanwhile would never start, so it is not prepared either.
                self._acquire_closed.set()
                try:
                    # The running jobs are ended first, without waiting for an acquire in flight:
                    # the API may be slow to answer it, and the batch system would not wait.
                    self._shutdown(updater, reason)
                except Exception:
                    if failed is None:
                        raise
                    logger.exception("ending the running jobs after the loop failed did not complete")
                finally:
                    # Then the acquire in flight is waited for, before the Session is deleted
                    # (leaving the lease below): the deletion frees the jobs it leased, which never
                    # started, rather than a Session that is gone while the acquire still runs.
                    # Not a waiting one (up to ACQUIRE_WAIT_SEC on the server): the deletion ends its
                    # wait (it wakes the waits, which then find no Session: 404, and the closed lease
                    # opens no other), or frees what it leased first; its thread ends with the answer.
                    waiting = inflight is not None and not inflight.done() and bool(sent_request.get("wait_sec"))
                    acquirer.shutdown(wait=not waiting, cancel_futures=True)
                    if inflight is not None and inflight.done() and not inflight.cancelled() and inflight.exception() is None:
                        late = len(inflight.result())
                        if late:
                            logger.info("%d jobs acquired as the launcher stopped; the session release returns them", late)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        logger.info("mpi mode done (%s): %d started (%d by hand-over; %d queued ones given back), %d finished; CPU "
                    "%.2f s user + %.2f s system (by thread, until the stop: %s)", reason, self.started,
                    self.handover.handed_over, self.handover.given_back, self.finished, usage.ru_utime,
                    usage.ru_stime, format_threads_cpu(threads_cpu))
        # Only after an idle end with time left, as serial mode's note (SerialMode.run): a launcher
        # that went idle while jobs it could never lease wait is the case to explain. Bounded.
        if reason == "idle" and self.countdown.remaining_sec() > 2 * RUNNABLE_NOTE_WAIT_SEC:
            note = threading.Thread(target=self.note_too_long_jobs, name="too-long-note", daemon=True)
            note.start()
            note.join(RUNNABLE_NOTE_WAIT_SEC)
        return 0

    def note_too_long_jobs(self) -> Optional[str]:
        """Say once (log, BatchJob ``status_info["launcher"]``) that runnable jobs ask for more wall
        time than this launcher offered (:func:`~balsam.launcher.job_mode.too_long_note`). Best
        effort: an API that does not answer only logs it."""
        ctx = self.context
        try:
            rows, total = runnable_jobs_page(default_client(), ctx.site_id, ctx.filter_tags)
        except ValueError as exc:
            # A filter tag key holding ':' (the jobs listing's tag filter is KEY:VALUE): said once, so
            # that a missing note has a reason (the acquire sends the tags as JSON: not affected).
            logger.info("runnable jobs not read for the wall-time note: %s", exc)
            return None
        except Exception as exc:
            logger.debug("runnable jobs not read for the wall-time note: %s", exc)
            return None
        message = too_long_note(rows, total > len(rows), longest_offered_min(self.countdown), ctx.wall_time_min)
        if message:
            logger.warning(message)
            note_batch_job(ctx.batch_job_id, "launcher", message)
        return message

    def _signal_through_platform(self) -> tuple[list[tuple[int, int, str, float]], float]:
        """SIGTERM the running apps through the platform where it can (``Platform.signal_runs``:
        Perlmutter's ``srun`` turns a SIGTERM to its group into a SIGKILL of its step's tasks) and
        wait up to the grace for the runs to end, before the process groups are signalled.

        The grace counts from here, once: the platform's calls (scancel...) spend it, the runs it
        did not reach get their SIGTERM (to their groups) as soon as it has answered, and what is
        left of it is what ``terminate_all`` gets (at least :data:`STOP_MIN_GRACE_SEC`: srun needs
        a moment to end its step, a SIGKILLed srun may leave its app running; no more than the
        grace). Runs the platform signalled
        that are still there at the deadline get SIGKILL from it too (before srun's group is signalled).
        Returns the exits reaped meanwhile and that last grace. Jobs queued behind running ones are
        dropped first: they must not start during the platform's calls or the wait."""
        grace = self.countdown.grace_sec
        deadline = time.monotonic() + grace
        cancel = getattr(self.pool, "cancel", None)
        if cancel is not None:
            for job_id in list(self.handover.queued):
                cancel(job_id)
        platform = self.context.platform
        delivered = deliver_signal(platform, self.pool.job_ids(), signal.SIGTERM, timeout=grace)
        if not delivered:
            return [], self._grace_left(deadline, grace)
        undelivered = [j for j in self.pool.job_ids() if j not in delivered]
        if undelivered:
            self.pool.end(undelivered, max(0.0, deadline - time.monotonic()))
        logger.info("SIGTERM delivered to %d runs by the platform (%d others to their process groups); waiting up to "
                    "%.1f s for them to end", len(delivered), len(undelivered), max(0.0, deadline - time.monotonic()))
        early: list[tuple[int, int, str, float]] = []
        while True:
            early += self.pool.reap()
            # An exit by a signal is held in the pool a moment (pool.held): it has ended all the same.
            left = [j for j in self.pool.running if j not in self.pool.held]
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                break
            self.wake.wait(min(POLL_SEC * 4, remaining))
            self.wake.clear()
        stuck = [j for j in delivered if j in self.pool.running and j not in self.pool.held]
        if stuck:
            # Their srun would SIGKILL its step when signalled, but a SIGKILLed srun (terminate_all's
            # next step) may leave the app running: the platform kills the steps first, within
            # srun's moment (half of it at most: the rest is terminate_all's).
            moment = time.monotonic() + STOP_MIN_GRACE_SEC
            deliver_signal(platform, stuck, signal.SIGKILL, timeout=STOP_MIN_GRACE_SEC / 2)
            return early, self._grace_left(deadline, grace, moment)
        return early, self._grace_left(deadline, grace)

    @staticmethod
    def _grace_left(deadline: float, grace: float, moment: Optional[float] = None) -> float:
        """What ``terminate_all`` gets of the stop's grace: what is left of it by ``deadline``, but at
        least srun's moment (until ``moment``; default: :data:`STOP_MIN_GRACE_SEC` from now: srun needs
        it to end its step between its SIGTERM and its SIGKILL) and never more than ``grace``: the
        whole stop takes the grace, and at most that moment more."""
        now = time.monotonic()
        floor = now + STOP_MIN_GRACE_SEC if moment is None else moment
        return min(grace, max(0.0, floor - now, deadline - now))

    def _shutdown(self, updater: Any, reason: str) -> None:
        # A requested stop (a signal) has its time; the launcher's own wall-time or idle stop the
        # time its loop saw it (now, after an exception in the loop).
        signal_stop = self.stop.requested and self.stop.requested_at is not None
        stop_time = self.stop.requested_at if signal_stop else (self._stopped_at or time.time())
        for e in self.faults.flush():  # quick failures whose node was not judged: as they are...
            if ended_by_stop(e.returncode, e.ended, stop_time, signal_stop=signal_stop):  # ...unless the stop's
                report_timeout(updater, e.job_id, stopped_reason(reason, e.returncode))
            else:
                report_exit(updater, e.job_id, e.returncode, e.tail, e.ended)
        early, grace = self._signal_through_platform()
        victims, finished = self.pool.terminate_all(grace)
        finished = early + finished
        if self.handover.queued:
            self._note_handovers(updater)  # RUNNING for queued jobs that started before the stop
        self.handover.forget_queued()  # what was still queued will not start
        # Reaped after the stop: the stop's doing if it ended at or after the stop (or, at a signal
        # stop, within its window before it); an exit before a wall-time or idle stop that the loop
        # had not reaped yet is the job's own result (rule (a), module docstring).
        for job_id, rc, tail, when in finished:
            postprocess = self._pop_postprocess(job_id)
            if self.gone.ending and self.gone.settled(job_id):
                continue
            if ended_by_stop(rc, when, stop_time, reaped_after_stop=True, signal_stop=signal_stop):
                report_timeout(updater, job_id, stopped_reason(reason, rc))
                logger.info("job %s exited %s as the launcher stopped: RUN_TIMEOUT (%s)", job_id, rc, reason)
            else:
                report_exit(updater, job_id, rc, tail, when, postprocess)
        for job_id in victims:
            if self.gone.ending and self.gone.settled(job_id):
                continue
            report_timeout(updater, job_id, f"launcher stopped ({reason})")
            logger.info("job %s ended as RUN_TIMEOUT (%s)", job_id, reason)
        given_back = len(self.site_faults.given_back)
        unstarted = len(self.pending) + len(self.gone.successors) + len(self.gone.ready) + len(self.too_late) + given_back
        if unstarted:
            back = f", {given_back} given back as the file system failed their workdirs" if given_back else ""
            logger.info("%d acquired jobs never started (%d of them too long for the time that was left%s); the "
                        "session release returns them", unstarted, len(self.too_late), back)
