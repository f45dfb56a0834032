"""The job mode contract: what ``balsam launcher -j NAME`` runs on one partition of the allocation.

A job mode is a class registered in the ``balsam.job_modes`` entry-point group (built-ins: ``mpi``
and ``serial``). The launcher builds a :class:`LauncherContext` for each partition and calls
``JobModeClass(context).run()``; ``request_stop()`` is called from the SIGTERM handler. Third-party
job modes subclass :class:`JobMode`::

    class MyMode(JobMode):
        name = "mine"

        def run(self) -> int:
            with self.lease() as (source, updater):
                ...  # acquire with source.acquire(...), report with updater.put(...)
            return 0
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import attrs

from balsam.config.schema import LauncherSettings
from balsam.platform import NodeInfo, Platform, nvidia_smi_note
from balsam.states import RUNNABLE_STATES
from balsam.util import env_number

from .wake import WakeEvent

logger = logging.getLogger(__name__)


def launcher_setting(settings: Any, name: str) -> Any:
    """``settings.launcher.<name>``; the defaults are those of the schema (``LauncherSettings``),
    the one source, also for a settings object without a launcher section (tests, embedding)."""
    section = getattr(settings, "launcher", None)
    return getattr(section if section is not None else LauncherSettings(), name)


def allows_node_packing(settings: Any, platform: "Callable[[], Any]") -> bool:
    """Whether MPI runs may share a node: ``launcher.mpirun_allows_node_packing``, else (null) the
    platform's default (``platform()`` is asked only then). The launcher and the elastic queue's
    sizing both follow this one rule."""
    configured = launcher_setting(settings, "mpirun_allows_node_packing")
    if configured is None:
        return bool(getattr(platform(), "mpirun_allows_node_packing", True))
    return bool(configured)


def gpuless_acquire_filter(nodes: Sequence[NodeInfo], env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The acquire filter of a launcher whose nodes have no GPU at all: ``{"max_gpus_per_node": 0}``,
    else ``{}``. Logs once why (call it once per launcher, in the process that discovered the nodes).

    Such a launcher (a CPU partition of a mixed site, or a GPU node whose driver does not answer now)
    could only fail the jobs that need a GPU as impossible here, for good; the server leases it the
    others and keeps those for a launcher with GPUs (a later one, once the driver is back). A job that
    does not fit for another reason (too many CPUs, more GPUs than a GPU node has) is leased and
    FAILED with the reason as before."""
    if not nodes or any(node.gpu_ids for node in nodes):
        return {}
    env = os.environ if env is None else env
    note = nvidia_smi_note()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip(","):
        why, level = f"CUDA_VISIBLE_DEVICES={visible!r}", logging.INFO
    elif note:
        # nvidia-smi present but failing, or listing nothing, is a GPU node in trouble: warn.
        why, level = f"nvidia-smi: {note}", logging.INFO if note == "not on PATH" else logging.WARNING
    else:
        why, level = "the platform lists none", logging.INFO
    logger.log(level, "jobs that need GPUs are not acquired: this launcher's nodes have none (%s); they are left "
               "for another launcher", why)
    return {"max_gpus_per_node": 0}


def env_float(name: str, default: float) -> float:
    """``$name`` as a number of seconds of 0 or more, plain decimal digits with an optional point
    (:func:`balsam.util.env_number`), else ``default`` (with a warning, once, when it is set).
    float() took "nan", "inf", negatives, "1e3" and "1_000": a margin of nan made every acquire fail
    ("cannot convert float NaN to integer") and the stop's grace nan; a negative one ran the jobs
    past the allocation's end, where the batch system kills them unreported."""
    return env_number(name, float(default), fraction=True, warn=logger.warning)


class Countdown:
    """Time left before running jobs must be ended (the allocation's wall time minus a safety margin).

    The margin is 10 % of the wall time, at least 1 s and at most 120 s
    (``$BALSAM_LAUNCHER_MARGIN_SEC`` overrides it); the terminate-then-kill grace period is half
    the margin, at most 10 s.
    """

    def __init__(self, wall_time_min: float, start_time: Optional[float] = None, margin_sec: Optional[float] = None) -> None:
        self.start_time = start_time if start_time is not None else time.time()
        self.wall_time_sec = max(0.0, float(wall_time_min) * 60.0)
        default_margin = min(120.0, max(1.0, 0.1 * self.wall_time_sec))
        self.margin_sec = margin_sec if margin_sec is not None else env_float("BALSAM_LAUNCHER_MARGIN_SEC", default_margin)
        self.deadline = self.start_time + self.wall_time_sec - self.margin_sec
        self.grace_sec = min(10.0, max(0.5, self.margin_sec / 2))
        #: The largest :meth:`remaining_min` answered (None: never asked in this process): the
        #: ``max_wall_time_min`` of this process's first acquire, the most it ever offered (an
        #: acquire asks for it first; later readings, a too-late check's, are smaller).
        self.offered_min: Optional[int] = None

    def remaining_sec(self) -> float:
        return self.deadline - time.time()

    def remaining_min(self) -> int:
        """Whole minutes left (the ``max_wall_time_min`` of an acquire)."""
        minutes = max(0, int(self.remaining_sec() // 60))
        if self.offered_min is None or minutes > self.offered_min:
            self.offered_min = minutes
        return minutes

    @property
    def expired(self) -> bool:
        return self.remaining_sec() <= 0


#: Runnable jobs an idle launcher reads as it ends, in one request, to say which of them it could
#: never run (serial mode: those of several ranks or nodes; every mode: those longer than its time).
RUNNABLE_SCAN_LIMIT = 500
#: How long the launcher waits for that request (an API that does not answer must not hold its exit).
RUNNABLE_NOTE_WAIT_SEC = 5.0


def runnable_jobs_page(client: Any, site_id: int, filter_tags: Optional[Mapping[str, str]] = None) -> tuple[list[dict], int]:
    """The site's first :data:`RUNNABLE_SCAN_LIMIT` runnable jobs (of ``filter_tags``) and how many
    there are in all: one request, not retried (a best-effort note as the launcher ends)."""
    params: dict[str, Any] = {"site_id": int(site_id), "state": sorted(str(getattr(s, "value", s)) for s in RUNNABLE_STATES),
                              "limit": RUNNABLE_SCAN_LIMIT}
    if filter_tags:
        # The listing's tag filter is KEY:VALUE cut at the first ':': a key holding one would count
        # and name other jobs (``a:b=c`` reads as ``a=b:c``). The acquire sends its tags as JSON and
        # is not affected; only this note is given up (its callers log the reason at INFO level).
        colon_keys = sorted(k for k in filter_tags if ":" in str(k))
        if colon_keys:
            raise ValueError(f"filter tag key(s) {', '.join(map(repr, colon_keys))} hold ':', which a tags filter cannot hold")
        params["tags"] = [f"{k}:{v}" for k, v in filter_tags.items()]
    # No retries: the launcher waits for it a few seconds only; a server gone by then must not print
    # a retry budget of minutes the launcher will not wait out.
    page = client.get("/jobs/", params=params, retry_count=0)
    rows = page.get("results", []) if isinstance(page, dict) else list(page or [])
    total = int(page.get("count", len(rows))) if isinstance(page, dict) else len(rows)
    return rows, total


def longest_offered_min(countdown: "Countdown") -> int:
    """The ``max_wall_time_min`` of the launcher's first acquire: the most wall time it ever offers.

    The largest one this process's acquires sent (:attr:`Countdown.offered_min`). A process that
    sent none (serial mode's launcher: its master process acquires) takes the most an acquire made
    any time after the launcher started can have sent: the whole minutes strictly below the wall
    time less the margin (``(wall - margin) // 60`` claimed one minute more at whole minutes, every
    whole ``-t`` of 20 or more: a job asking that minute was never leased, and the note said it fit)."""
    if countdown.offered_min is not None:
        return countdown.offered_min
    return max(0, math.ceil((countdown.wall_time_sec - countdown.margin_sec) / 60) - 1)


def too_long_note(rows: Sequence[Mapping[str, Any]], truncated: bool, offered_min: int, wall_time_min: float) -> Optional[str]:
    """Why some of ``rows`` (runnable jobs; ``truncated``: a first page of them) were never leased
    here: their ``wall_time_min`` is more than this launcher ever offered. None when there are none.
    A launcher that went idle with them left said only "0 started", and they waited, PREPROCESSED,
    for an allocation long enough."""
    asks = [int(r.get("wall_time_min") or 0) for r in rows]
    longer = [m for m in asks if m > offered_min]
    if not longer:
        return None
    count = f"at least {len(longer)}" if truncated else str(len(longer))
    one = len(longer) == 1
    asked = f"{longer[0]} min" if one else f"up to {max(longer)} min"
    return (f"{count} runnable {'job asks' if one else 'jobs ask'} for more wall time ({asked}) than this launcher offered "
            f"({offered_min} min: -t {wall_time_min:g} less its safety margin) and {'was' if one else 'were'} never "
            f"leased here: {'it needs' if one else 'they need'} a longer BatchJob (balsam queue submit -t) or a smaller "
            "wall_time_min")


class IdleTimer:
    """Says when the launcher has had nothing running or runnable for ``idle_ttl_sec``."""

    def __init__(self, idle_ttl_sec: float) -> None:
        self.idle_ttl_sec = float(idle_ttl_sec)
        self._idle_since: Optional[float] = time.monotonic()

    def busy(self) -> None:
        self._idle_since = None

    def idle(self) -> None:
        if self._idle_since is None:
            self._idle_since = time.monotonic()

    @property
    def expired(self) -> bool:
        return self._idle_since is not None and time.monotonic() - self._idle_since >= self.idle_ttl_sec


class StopConditions:
    """Why a launcher must stop now: a request (signal, refused credential, failed start), the wall
    time (:class:`Countdown`) or the idle timeout (:class:`IdleTimer`), in that order.

    One object for every job mode (the :class:`JobMode` base and the serial master and workers use
    it alike). :meth:`request` is safe from a signal handler and from any thread: it stores plain
    attributes and sets the Events (``event``; ``wake``, so a loop sleeping on it returns at once)
    from a helper thread, because an Event's lock may be held by the very code the signal
    interrupted. The other methods belong to the mode's loop thread.
    """

    def __init__(self, countdown: Countdown, idle_timer: IdleTimer, wake: Optional[threading.Event] = None) -> None:
        self.countdown = countdown
        self.idle_timer = idle_timer
        self.wake = wake
        self.event = threading.Event()
        self.reason = ""
        self._requested = False
        #: When the first request came (``time.time()``), or None: the moment from which a job
        #: mode counts an exit as the stop's doing (see :data:`~balsam.launcher.runner.STOP_WINDOW_SEC`).
        self.requested_at: Optional[float] = None
        #: Run (on the helper thread) at every request: see :meth:`when_requested`.
        self._on_request: list[Callable[[], None]] = []

    def when_requested(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when a stop is requested (at once, on a thread, if it was already): how
        a lease tells the server its Session is ending as soon as the batch system's SIGTERM comes
        (balsam.client.lease, "An announced end"), before the mode's loop has seen the stop. Runs on
        the request's helper thread, never in the signal handler; again at a later request, so it
        must be idempotent."""
        self._on_request.append(callback)
        if self._requested:
            threading.Thread(target=self._run_callbacks, args=([callback],), name="stop-request", daemon=True).start()

    @staticmethod
    def _run_callbacks(callbacks: "list[Callable[[], None]]") -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # the stop goes on whatever a callback met
                logger.warning("at the stop request: %s failed: %s", getattr(callback, "__name__", callback), exc)

    @classmethod
    def for_launcher(
        cls, wall_time_min: float, start_time: float, idle_ttl_sec: float, wake: Optional[threading.Event] = None
    ) -> "StopConditions":
        return cls(Countdown(wall_time_min, start_time=start_time), IdleTimer(idle_ttl_sec), wake)

    def request(self, reason: str) -> None:
        """Ask the loop to stop; the first reason given is kept."""
        if not self._requested:
            self.reason = reason
            self.requested_at = time.time()
            self._requested = True
        threading.Thread(target=self._set_events, name="stop-request", daemon=True).start()

    def _set_events(self) -> None:
        self.event.set()
        if self.wake is not None:
            self.wake.set()
        self._run_callbacks(list(self._on_request))

    @property
    def requested(self) -> bool:
        return self._requested

    def check(self) -> Optional[str]:
        """Why the loop must stop now, or None."""
        if self._requested:
            return self.reason or "signal"
        if self.countdown.expired:
            return "wall time"
        if self.idle_timer.expired:
            return "idle"
        return None

    def note_activity(self, busy: bool) -> None:
        """Tell the idle timer whether anything runs or waits to run."""
        if busy:
            self.idle_timer.busy()
        else:
            self.idle_timer.idle()


def announce_end(source: Any) -> None:
    """Tell the server that ``source``'s Session ends soon (:meth:`balsam.client.lease.JobLease.announce_end`),
    at a stop request: the batch system's SIGKILL follows its SIGTERM by its kill delay (Slurm's
    ``KillWait``), and a launcher killed before it reported its jobs left them RUNNING until its
    Session expired. A source without it (another job source, none opened yet) is left alone."""
    announce = getattr(source, "announce_end", None)
    if announce is not None:
        announce()


def launcher_stamp(now: Optional[dt.datetime] = None) -> str:
    """``<YYYY-mm-dd_HHMMSS>_<host>_<pid>``: the start time to the second does not tell launchers
    apart (several BatchJobs of a site often start in the same second, on a shared file system), the
    host and pid of a running process do."""
    import socket

    host = socket.gethostname().split(".")[0] or "host"
    return f"{(now or dt.datetime.now()):%Y-%m-%d_%H%M%S}_{host}_{os.getpid()}"


@attrs.define
class LauncherContext:
    """Everything a job mode needs to run one partition."""

    site_config: Any
    settings: Any
    site_id: int
    data_path: Path
    log_path: Path
    platform: Platform
    nodes: list[NodeInfo]
    wall_time_min: float
    filter_tags: dict[str, str] = attrs.Factory(dict)
    batch_job_id: Optional[int] = None
    job_mode: str = "mpi"
    partition_index: int = 0
    start_time: float = attrs.Factory(time.time)
    #: Names this launcher's files: unique per launcher process (see :func:`launcher_stamp`).
    timestamp: str = attrs.Factory(lambda: launcher_stamp())
    #: A Session the launcher began to open during its start-up (``balsam.launcher.service_calls.EarlyLease``).
    early_lease: Any = None

    def open_lease(self, sort_by: Optional[str] = None) -> Any:
        """The launcher's lease: the one opened early when it was opened for this site and
        BatchJob (given this launcher's filters), else a new one."""
        early, self.early_lease = self.early_lease, None
        if early is not None and early.matches(self.site_id, self.batch_job_id):
            return early.take(self.filter_tags, sort_by)
        if early is not None:
            early.discard()
        from .service_calls import open_lease

        return open_lease(self.site_id, self.batch_job_id, self.filter_tags, sort_by=sort_by)

    def setting(self, name: str) -> Any:
        return launcher_setting(self.settings, name)

    def allow_node_packing(self) -> bool:
        return allows_node_packing(self.settings, lambda: self.platform)

    @property
    def spool_path(self) -> Optional[Path]:
        """Where updates the API could not take at shutdown are kept for the agent to send."""
        path = getattr(self.site_config, "spool_path", None)
        return Path(path) if path is not None else None

    def log_file(self, suffix: str) -> Path:
        """``<site>/log/<mode>_mode_<stamp>.<partition>.<suffix>`` (``stamp``: :func:`launcher_stamp`)."""
        return self.log_path / f"{self.job_mode}_mode_{self.timestamp}.{self.partition_index}.{suffix}"


class JobMode(abc.ABC):
    """Base class of launcher job modes (entry-point group ``balsam.job_modes``)."""

    #: The ``-j`` name.
    name: ClassVar[str] = ""

    def __init__(self, context: LauncherContext) -> None:
        self.context = context
        #: Set by :meth:`request_stop` and by a job's exit (a mode whose pool reaps with it):
        #: the loop sleeps on it, so it reacts at once to either.
        self.wake = WakeEvent()
        self.stop = StopConditions.for_launcher(
            context.wall_time_min, context.start_time, context.setting("idle_ttl_sec"), wake=self.wake
        )
        self.countdown = self.stop.countdown
        self.idle_timer = self.stop.idle_timer

    @property
    def stop_event(self) -> threading.Event:
        return self.stop.event

    @property
    def stop_reason(self) -> str:
        return self.stop.reason

    @abc.abstractmethod
    def run(self) -> int:
        """Run jobs on ``context.nodes`` until wall time, idle timeout or :meth:`request_stop`; return an exit code."""

    def request_stop(self, reason: str = "signal") -> None:
        """Ask the mode to end its running jobs as RUN_TIMEOUT and return (safe from a signal handler)."""
        self.stop.request(reason)

    def should_stop(self) -> Optional[str]:
        """Why the mode must stop now, or None."""
        return self.stop.check()

    @contextlib.contextmanager
    def lease(self) -> Iterator[tuple[Any, Any]]:
        """A Session job source and a BulkStatusUpdater, flushed and closed in the right order.

        Updates are flushed *before* the Session is deleted: deleting it turns jobs still RUNNING
        into RUN_TIMEOUT, which would refuse a late RUN_DONE. For the same reason, when the updater
        gave up and spooled updates, the lease's close sends them once more first, and if the API
        still does not take them, leaves the Session to expire rather than delete it: the site
        agent replays the spool under the Session, which must still hold the jobs then
        (:meth:`balsam.client.lease.JobLease.close`).
        """
        from .service_calls import open_updater

        ctx = self.context
        source = ctx.open_lease(sort_by=ctx.setting("sort_by"))
        try:
            updater = open_updater(ctx.spool_path, source)  # updates sent under the source's Session
        except BaseException:
            # Nothing ran under the Session: deleted now, it gives back what it holds (the jobs of
            # an early first acquire) rather than keep them until it expires.
            source.close(retry_count=0)
            raise
        self.idle_timer.busy()  # idle time counts from here, not from the (slow, under load) start-up
        self.stop.when_requested(lambda: announce_end(source))
        try:
            yield source, updater
        finally:
            try:
                # A slow server's extra 30 s ends by the allocation's end less half the margin (the
                # lease's close and the exit): a short allocation's margin is under it.
                wall_left = self.countdown.remaining_sec() + self.countdown.margin_sec / 2
                updater.close(extra_until=time.monotonic() + wall_left)
            finally:
                # The updater found the API gone: do not keep the allocation waiting to say goodbye
                # (the server expires the session by itself). The close sends what the updater
                # spooled first, and does not delete the Session while that cannot be sent.
                source.close(retry_count=0) if updater.gave_up else source.close()
