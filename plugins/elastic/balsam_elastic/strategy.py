"""The scaling-strategy contract: a pure function from one cycle's snapshot to a decision.

The agent module (:mod:`balsam_elastic.module`) gathers a :class:`Snapshot` each cycle — this
site's BatchJobs in the submit queue, the backlog in numbers (one aggregate API query), the
scheduler's backfill windows and how long each queued BatchJob has waited — hands it to the
configured strategy's :meth:`Strategy.decide`, and carries out the :class:`Decision` (create
BatchJobs, mark stale ones ``pending_deletion``). Strategies do no I/O, so each is table-tested.

A strategy is a class listed under the entry-point group ``balsam.elastic_strategies``; settings.yml
picks it by name (``elastic_queue.strategy``) and passes ``elastic_queue.strategy_options``,
checked against the class's ``options_schema`` (see :mod:`balsam.options`).
"""

from __future__ import annotations

import abc
import importlib.metadata
import math
from typing import Any, ClassVar, Optional

import attrs

from balsam.launcher.job_mode import Countdown
from balsam.models import BackfillWindow
from balsam.options import NoOptions, build_options
from balsam.site.job_template import launcher_wall_time
from balsam.states import BatchJobState

__all__ = [
    "Backlog",
    "BatchJobView",
    "Decision",
    "LAUNCHER_START_UP_SEC",
    "STRATEGY_GROUP",
    "STRATEGY_SECTION_KEYS",
    "Snapshot",
    "Strategy",
    "StrategyError",
    "Submission",
    "available_strategies",
    "leased_up_to_min",
    "load_strategy",
    "never_starts_reason",
    "nodes_for",
    "not_started_newest_first",
    "request_min_for",
    "show_figure",
]

STRATEGY_GROUP = "balsam.elastic_strategies"

#: ``elastic_queue`` keys that only a strategy reads (the ``backfill`` strategy: Balsam 0.7's
#: keys); the module itself reads none of them. A strategy says which it reads
#: (:attr:`Strategy.reads_section_keys`), and settings.yml keys of this list it does not read, set
#: away from their defaults, draw a warning when the file is read.
STRATEGY_SECTION_KEYS = ("min_num_nodes", "max_num_nodes", "min_wall_time_min", "max_wall_time_min", "wall_time_pad_min",
                         "max_queue_wait_time_min", "regular_queue_after_min", "use_backfill")

#: BatchJob states that hold (or will hold) nodes: what 0.7 called "reserved".
RESERVING_STATES = frozenset({BatchJobState.pending_submission, BatchJobState.queued, BatchJobState.running})


class StrategyError(ValueError):
    """An unknown strategy name or strategy options that do not fit (one line, naming the key).

    ``key``: the ``strategy_options`` key at fault, when there is one; settings.yml's check then
    reports ``text`` on that key's line (``settings.yml:LINE elastic_queue.strategy_options.KEY: text``)."""

    def __init__(self, text: str, key: str = "") -> None:
        self.key, self.text = key, text
        super().__init__(f"elastic_queue.strategy_options.{key}: {text}" if key else text)


@attrs.frozen
class BatchJobView:
    """What a strategy needs to know about one of the module's BatchJobs."""

    id: int
    state: BatchJobState
    num_nodes: int
    wall_time_min: int
    #: Minutes it has waited in the scheduler's queue (None: not queued, or the scheduler did not say).
    queued_time_min: Optional[int] = None
    #: Submitted to wait in the regular queue (not fitted to a window): never cancelled as stale.
    regular_queue: bool = False
    #: Created by the elastic module (stamped ``status_info.elastic_request``). Only such BatchJobs
    #: are ever cancelled; others (made by hand, by queue_maintainer) in the same queue that can run
    #: the backlog (the site's filter_tags exactly, a job_mode that leases it, no partitions) count
    #: as reserved capacity, never more; the module leaves the rest out of the snapshot.
    owned: bool = True
    #: The state this cycle's status poll showed it in; None: the poll failed, or did not list it
    #: (just submitted: squeue and qstat list a job a moment after its submission). The API state
    #: lags the poll's: a BatchJob the API says is queued may already run.
    polled_state: Optional[BatchJobState] = None
    #: The scheduler's reason, when this cycle's poll says it can never start as submitted (it
    #: asks for more than its queue, partition, account or QOS allows; see the driver's
    #: ``never_starts``); "" when it may start. Such a BatchJob holds a place in the queue
    #: (``max_queued_jobs``) but no capacity: it is not counted as nodes coming.
    never_starts: str = ""
    #: Queued, and this cycle's poll says it waits for something other than free nodes (a hold, a
    #: dependency, a begin time, a limit: the driver's ``waits_for_other_than_nodes``; or, for one
    #: it did not make, its wait unknown: ``submit_time_unknown``): it takes no nodes that come
    #: free now, so it claims no backfill window.
    waits_for_other: bool = False
    #: The project it charges (the module's own all charge ``elastic_queue.submit_project``; one
    #: made by hand may charge another).
    project: str = ""
    #: Waiting for its submission and held back by the scheduler module: its words
    #: (``status_info.waiting``, e.g. "waiting: queue 'debug' is at a scheduler limit: ..."); "" otherwise.
    held: str = ""
    #: Whole minutes since the elastic module created it (its ``status_info.elastic_created`` stamp;
    #: for one without the stamp, since the module first saw it); None: not known, or not its own.
    age_min: Optional[int] = None
    #: Queued and withdrawn by an earlier cycle, waiting for the scheduler module to delete it if it
    #: still waits (``status_info.withdraw_if_queued``): like a pending_deletion one, it reserves
    #: nothing and is not cancelled again. One that started instead loses the mark and counts again.
    withdrawn: bool = False

    @property
    def cancellable(self) -> bool:
        """Ours and certainly not started: waiting for its submission, or queued per this cycle's
        status poll (the API state lags the scheduler: a BatchJob the poll did not report queued,
        or a cycle whose poll failed, may already run)."""
        return self.owned and not self.withdrawn and (
            self.state == BatchJobState.pending_submission
            or (self.state == BatchJobState.queued and self.queued_time_min is not None))

    @property
    def reserving(self) -> bool:
        """Waits or runs: holds a place among ``max_queued_jobs``."""
        return self.state in RESERVING_STATES and not self.withdrawn

    @property
    def capacity(self) -> bool:
        """Waits or runs, and may start: its nodes count as coming (or there)."""
        return self.reserving and not self.never_starts


@attrs.frozen
class Backlog:
    """The site's jobs (with the site's filter_tags) in numbers. Footprints are in nodes:
    ``num_nodes / node_packing_count`` summed, so they may be fractional.

    ``runnable_*`` count only the jobs no launcher holds yet (a job a launcher has acquired runs in
    its BatchJob) and that a BatchJob of this module could lease (not wider than the
    submit queue's ``max_nodes``, single-node single-rank under ``job_mode: serial``, shorter than
    the longest BatchJob it requests, needing no GPU where its nodes have none); the others are
    ``unfit_count``, ``unfit_reason`` says why.
    ``running_*`` count only the jobs running in the snapshot's BatchJobs (not those in BatchJobs
    of other queues, which hold no nodes of this one)."""

    runnable_count: int = 0
    runnable_footprint: float = 0.0
    #: Smallest and largest ``num_nodes`` of a runnable job (0 when there is none).
    min_runnable_nodes: int = 0
    max_runnable_nodes: int = 0
    #: Shortest ``wall_time_min`` of a runnable job (0: some job has none, it fits any BatchJob).
    min_runnable_wall_time_min: int = 0
    running_count: int = 0
    running_footprint: float = 0.0
    #: Minutes since the longest-waiting runnable job became runnable (its last state change).
    oldest_runnable_wait_min: float = 0.0
    #: Runnable jobs no BatchJob of this module could lease, and why (no counts: the words are stable).
    unfit_count: int = 0
    unfit_reason: str = ""

    def nothing_runnable(self) -> str:
        """The reason for a decision made without runnable jobs."""
        if self.unfit_count:
            return f"no runnable job fits its BatchJobs ({self.unfit_count} runnable: {self.unfit_reason})"
        return "no runnable jobs"


@attrs.frozen
class Snapshot:
    batch_jobs: tuple[BatchJobView, ...] = ()
    backlog: Backlog = Backlog()
    #: Backfill windows usable in the submit queue (None: the scheduler could not say, see windows_error).
    windows: Optional[tuple[BackfillWindow, ...]] = ()
    windows_error: str = ""
    #: The project the module's requests charge (``elastic_queue.submit_project``; they all go to
    #: the snapshot's queue, ``submit_queue``).
    project: str = ""
    #: Its own BatchJobs of ``submit_queue`` the scheduler refused for good, recently (state
    #: submit_failed without a scheduler id: nothing reached the queue; ``never_starts`` holds the
    #: scheduler's error). Like a BatchJob that can never start, each holds back the requests at least
    #: as large (:meth:`never_starting_as_large`); none counts as capacity or holds a place in the queue.
    #: The module reads them only in a cycle whose decision submits, then decides again with them.
    refused: tuple[BatchJobView, ...] = ()
    #: The submit queue's ``min_nodes`` (settings.yml ``scheduler.allowed_queues``; 1 when it sets
    #: none): the module raises every request to it (``fit_to_site_rules``), as Polaris's prod
    #: queue refuses jobs of fewer than 10 nodes.
    min_nodes: int = 1
    #: The user's other jobs waiting in the submit queue, submitted within ``max_queue_wait_time_min``
    #: (num_nodes x wall_time_min each): another site's (or agent's) elastic requests, jobs submitted
    #: by hand. The scheduler shows the window their nodes would take as idle until they start, as it
    #: does for the module's own requests. The module reads them only in a cycle whose decision
    #: submits a request fitted to a window, then decides again with them.
    others_waiting: tuple[BackfillWindow, ...] = ()

    @property
    def reserving(self) -> tuple[BatchJobView, ...]:
        return tuple(b for b in self.batch_jobs if b.reserving)

    @property
    def capacity(self) -> tuple[BatchJobView, ...]:
        return tuple(b for b in self.batch_jobs if b.capacity)

    def never_starting_as_large(self, num_nodes: int, wall_time_min: int) -> Optional[BatchJobView]:
        """One of the BatchJobs the scheduler says can never start that is no larger than a request
        of ``num_nodes`` x ``wall_time_min`` and charges the requests' project (its own or another's
        in the same queue; the lowest id), or None. The limit that keeps it waiting would hold such
        a request back as well: submitting it would only fill the queue with BatchJobs that never
        start, each cycle.

        Only "no larger": the driver's ``never_starts`` says whether, not why, and a smaller request
        may start under a size limit (a partition's nodes or minutes). So a minimal one (1 node, the
        shortest wall time) that never starts holds back every request, as any request is at least
        as large, but one denied for access (Slurm's ``InvalidAccount``, ``QOSNotAllowed``) holds
        back only the requests at least as large as it: the smaller ones are submitted, each held
        back in turn once its poll says it never starts, ``max_queued_jobs`` at most. A BatchJob of
        another project holds nothing back (an account's limits or access say nothing of another's).

        A BatchJob of :attr:`refused` (the scheduler refused it at submission, for good) holds back
        the requests at least as large the same way: submitted, each would be refused in turn, a
        new BatchJob and a scheduler call every cycle. A request is compared at the size it is
        submitted, raised to :attr:`min_nodes`; a refusal of a request below ``min_nodes`` (made
        before the queue's minimum was known: Polaris prod refuses 1 node, "Job violates queue
        and/or server resource limits") says nothing of larger ones and holds back only its own
        size (it held back every request for 24 h)."""
        size = max(num_nodes, self.min_nodes)

        def holds_back(b: BatchJobView, refusal: bool) -> bool:
            if b.project != self.project or b.wall_time_min > wall_time_min:
                return False
            return b.num_nodes == size if refusal and b.num_nodes < self.min_nodes else b.num_nodes <= size

        waiting = [b for b in self.batch_jobs if b.reserving and b.never_starts]
        return next((b for b in waiting if holds_back(b, False)), None) or \
            next((b for b in self.refused if holds_back(b, True)), None)


def not_started_newest_first(views: Any) -> list[BatchJobView]:
    """The BatchJobs of ``views`` a strategy may cancel (:attr:`BatchJobView.cancellable`: its own,
    certainly not started), newest first, less those the scheduler says can never start (they hold
    no nodes, and the module leaves them for a user to remove). The one mechanism by which the
    strategies shed requests nothing needs; the module reads each again just before its PATCH
    (``still_cancellable``) and keeps one whose state changed meanwhile."""
    return sorted((b for b in views if b.cancellable and not b.never_starts), key=lambda b: b.id, reverse=True)


def never_starts_reason(b: BatchJobView) -> str:
    """Why a decision does not request a BatchJob as large as ``b``, which never starts (or which
    the scheduler refused: a BatchJob of :attr:`Snapshot.refused`)."""
    if b.state == BatchJobState.submit_failed:
        return (f"BatchJob {b.id} ({b.num_nodes} nodes x {b.wall_time_min} min) was refused by the scheduler "
                f"({b.never_starts}): no BatchJob as large is requested again")
    return (f"BatchJob {b.id} ({b.num_nodes} nodes x {b.wall_time_min} min) can never start as submitted "
            f"(scheduler: {b.never_starts}): no BatchJob as large is requested again")


@attrs.frozen
class Submission:
    num_nodes: int
    wall_time_min: int
    #: Not fitted to a backfill window: it waits its turn in the regular queue.
    regular_queue: bool = False


def _clock_text(value: Any) -> tuple[str, ...]:
    """``Decision.clock_text`` as a tuple: a string is one part, not its characters."""
    if value is None:
        return ()
    parts = (value,) if isinstance(value, str) else tuple(value)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"Decision.clock_text: expected words of the reason (str), got {part!r} ({type(part).__name__})")
    return parts


@attrs.frozen
class Decision:
    """What to do this cycle. ``reason`` says why in words (why nothing, when nothing);
    ``numbers`` are the figures it was based on, in the order the log line shows them."""

    submit: tuple[Submission, ...] = ()
    cancel: tuple[int, ...] = ()
    reason: str = ""
    numbers: tuple[tuple[str, Any], ...] = ()
    #: Parts of ``reason`` that count elapsed time ("a runnable job has waited 61 min"): they change
    #: every cycle when nothing else does, so the module's log does not compare them (as it does not
    #: compare :attr:`Strategy.clock_figures`; :mod:`balsam_elastic.cycle_log`). One string is one
    #: part (``clock_text=(text)``, the tuple's comma forgotten, masked each character of it).
    clock_text: tuple[str, ...] = attrs.field(default=(), converter=_clock_text)

    @property
    def idle(self) -> bool:
        return not self.submit and not self.cancel

    def log_line(self, strategy: str) -> str:
        """One line: the action (or "nothing"), the reason, then every number as key=value."""
        actions = [f"submit {s.num_nodes} nodes x {s.wall_time_min} min" + (" (regular queue)" if s.regular_queue else "")
                   for s in self.submit]
        if self.cancel:
            actions.append(f"cancel BatchJob {', '.join(str(i) for i in self.cancel)}")
        action = "; ".join(actions) or "nothing"
        figures = " ".join(f"{key}={_show(value)}" for key, value in self.numbers)
        return f"[{strategy}] {action}: {self.reason} | {figures}".rstrip(" |")


#: Decimal places a float figure of the log line is rounded to (the float noise ``nodes_for`` ignores too).
FIGURE_DECIMALS = 9
#: How far from its :data:`FIGURE_DECIMALS` rounding a float is still float noise (a few ulps of a
#: sum of footprints); farther, it is a real figure (a footprint of 5/101 nodes), shown as it is.
FIGURE_NOISE = 1e-12


def show_figure(value: float) -> str:
    """A number as the decision line shows a float figure: 6 significant digits, float noise
    rounded off first. A footprint summed in another row order (a SQL SUM without ORDER BY) differs
    in its last bit, and an idle of 1 - 0.9999999999999999 showed as 1.11022e-16 in one cycle, 0 in
    the next: a changed line, logged at INFO (cycle_log). Only noise is snapped to the rounded
    value: rounded first, then to 6 digits, 0.04950495049504951 showed as 0.0495049 (two roundings),
    not 0.049505. "+ 0.0" shows -0.0 as 0."""
    value = float(value)
    rounded = round(value, FIGURE_DECIMALS)
    return f"{(rounded if abs(value - rounded) < FIGURE_NOISE else value) + 0.0:.6g}"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return show_figure(value)
    if isinstance(value, BackfillWindow):
        return f"{value.num_nodes}x{value.wall_time_min}min"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def nodes_for(footprint: float) -> int:
    """Whole nodes that hold a (possibly fractional) footprint. Balsam 0.7 truncated (2.5 -> 2),
    leaving half a node of work without a place; this rounds up, ignoring float noise."""
    return max(0, math.ceil(round(footprint, 9)))


#: Seconds from its batch script's start to a launcher's first acquire that :func:`leased_up_to_min`
#: allows for: the script's set-up (module loads, a MIG set-up, Python imports from a parallel
#: filesystem), then the launcher's own start-up. The acquire offers the whole minutes left when it
#: asks, so one at the script's start set a bound that a few seconds of start-up broke.
LAUNCHER_START_UP_SEC = 60.0


def leased_up_to_min(wall_time_min: int) -> int:
    """The longest ``wall_time_min`` of a job that a launcher in a BatchJob of ``wall_time_min``
    minutes leases, when its first acquire comes up to :data:`LAUNCHER_START_UP_SEC` after its
    batch script started. The script starts it with ``-t`` a little less than the BatchJob
    (:func:`balsam.site.job_template.launcher_wall_time`: 2 minutes less from 6 minutes on, 1 from
    3 to 5, none below), and an acquire offers the whole minutes left of that before its own safety
    margin (:class:`balsam.launcher.job_mode.Countdown`: 10 % of the wall time, 1 s to 120 s) when it
    asks: 25 minutes in a 30-minute BatchJob, ``wall_time_min - 5`` from 22 minutes on. Counted up
    to ``wall_time_min - 1``, jobs of 26 to 29 minutes got a 30-minute BatchJob each cycle that
    leased none of them, ran nothing and left. Counted at what the acquire offers at the script's
    start, the limit held for 6 to 54 s of start-up under 22 minutes (a 17-minute job in a
    21-minute BatchJob: 6 s; 7 s gave the same loop). ``$BALSAM_LAUNCHER_MARGIN_SEC`` is read here,
    in the agent's environment: a value given to the launchers only (the job template) is not seen."""
    countdown = Countdown(launcher_wall_time(wall_time_min), start_time=0.0)
    return max(0, int((countdown.deadline - LAUNCHER_START_UP_SEC) // 60))


def request_min_for(job_min: int) -> int:
    """The shortest BatchJob (minutes) whose launcher leases a job of ``job_min`` minutes
    (:func:`leased_up_to_min`); ``job_min`` 0 (no wall time) fits any."""
    if job_min <= 0:
        return 1
    request = job_min + 1
    # A few steps (the margins are 4 minutes at most, unless $BALSAM_LAUNCHER_MARGIN_SEC says more);
    # bounded so that an odd margin cannot loop for long.
    while leased_up_to_min(request) < job_min and request < job_min + 7 * 24 * 60:
        request += 1
    return request


class Strategy(abc.ABC):
    """A scaling policy. ``self.settings`` is the whole ``elastic_queue`` section (an
    :class:`~balsam_elastic.options.ElasticQueueOptions`); ``self.options`` the strategy's own
    ``strategy_options`` (an instance of :attr:`options_schema`)."""

    #: The name settings.yml uses (the entry-point name).
    name: ClassVar[str] = ""
    #: The attrs class of ``elastic_queue.strategy_options`` for this strategy (see balsam.options).
    options_schema: ClassVar[type] = NoOptions
    #: Whether :meth:`decide` reads ``snapshot.windows`` (else the scheduler is not asked for them).
    uses_backfill_windows: ClassVar[bool] = False
    #: The keys of :data:`STRATEGY_SECTION_KEYS` this strategy reads from ``self.settings``; None:
    #: it does not say (no warning about the others).
    reads_section_keys: ClassVar[Optional[frozenset[str]]] = None
    #: Of those, the keys it reads only with ``use_backfill: true`` (requests fitted to windows): set
    #: away from their defaults under ``use_backfill: false``, they draw a warning.
    window_only_keys: ClassVar[frozenset[str]] = frozenset()
    #: The ``elastic_queue`` key that sets :meth:`widest_request_nodes`, named in the message on jobs
    #: wider than that ("" when no key does).
    widest_request_key: ClassVar[str] = ""
    #: Names of the figures of its decisions' ``numbers`` that count elapsed time (minutes something
    #: has waited): not compared when the module decides whether a cycle's line changed (an idle
    #: cycle whose line is the same as the last one's is logged at DEBUG). ``oldest_wait_min`` is
    #: never compared, whatever this says; words of ``reason`` that count time go in
    #: :attr:`Decision.clock_text`. A set, tuple or list of names is taken (made a frozenset when the
    #: strategy is loaded: :func:`strategy_class`); anything else refuses the strategy.
    clock_figures: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: Any, options: Any = None) -> None:
        self.settings = settings
        try:
            self.options = build_options(self.options_schema, options, where="elastic_queue.strategy_options")
        except (TypeError, ValueError) as exc:
            raise StrategyError(str(exc)) from None

    @abc.abstractmethod
    def decide(self, snapshot: Snapshot) -> Decision:
        """The decision for this snapshot. Pure: no I/O, same snapshot -> same decision."""

    def queue_problem(self, queue: str, max_nodes: Optional[int], max_walltime: Optional[int]) -> Optional[str]:
        """Why this strategy's options cannot work in the submit queue (its limits), or None. Checked
        when settings.yml is loaded (reported on ``strategy_options``' line): a strategy that counts
        its requests at a fixed size must not be clamped to the queue's limits at run time."""
        return None

    def longest_request_min(self) -> Optional[int]:
        """The longest wall time (minutes) of a BatchJob this strategy may request, or None when it
        cannot say. The module then counts as runnable only jobs that a launcher in such a BatchJob
        leases (:func:`leased_up_to_min`: jobs that fit its time left before its safety margin)."""
        return None

    def widest_request_nodes(self) -> Optional[int]:
        """The most nodes of a BatchJob this strategy may request, or None when it cannot say. The
        module then counts as runnable only jobs no wider than that (nor than the submit queue's
        ``max_nodes``): a wider job runs in none of its BatchJobs, and counted, it inflated the
        requests with nodes that ran nothing."""
        return None


def available_strategies() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=STRATEGY_GROUP)}


def strategy_class(name: str) -> type[Strategy]:
    known = available_strategies()
    if name not in known:
        raise StrategyError(
            f"unknown strategy {name!r} (installed: {', '.join(sorted(known)) or 'none'}; "
            f"entry-point group {STRATEGY_GROUP})"
        )
    try:
        cls = known[name].load()
    except Exception as exc:
        raise StrategyError(f"strategy {name!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise StrategyError(f"strategy {name!r} ({known[name].value}) is not a balsam_elastic Strategy subclass")
    # Checked here, where settings.yml's check and the module load it: a tuple given where a
    # frozenset was meant made every cycle raise a bare TypeError in the decision log (the queue
    # stopped), and a plain string ("waited_min") would be taken as its letters.
    cls.clock_figures = _clock_figures(name, known[name].value, cls.clock_figures)
    return cls


def _clock_figures(name: str, where: str, figures: Any) -> frozenset[str]:
    """A strategy's ``clock_figures`` as a frozenset, or StrategyError naming the strategy."""
    if isinstance(figures, (set, frozenset, tuple, list)) and all(isinstance(f, str) for f in figures):
        return frozenset(figures)
    raise StrategyError(f"strategy {name!r} ({where}): clock_figures must be a set of figure names "
                        f"(e.g. frozenset({{'waited_min'}})), got {figures!r} ({type(figures).__name__})")


def load_strategy(settings: Any) -> Strategy:
    """The strategy the section names, built with its ``strategy_options`` (raises StrategyError)."""
    cls = strategy_class(settings.strategy)
    return cls(settings, settings.strategy_options)
