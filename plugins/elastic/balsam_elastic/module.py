"""The ``elastic_queue`` agent module: BatchJobs created and cancelled as the backlog asks.

Each cycle (``elastic_queue.service_period`` seconds) it reads, in bulk:

- this site's BatchJobs whose ``filter_tags`` contain the site's (one GET), of which it keeps those
  of ``submit_queue`` that are its own or can run its backlog (:meth:`runs_the_backlog`), and its
  own left in another queue by an earlier ``submit_queue``, withdrawn unless started (:meth:`left_over`);
- the backlog in numbers, ``GET /sites/{id}/backlog`` with the site's ``filter_tags`` and
  ``leased=false`` (one aggregate query on the server, whatever the number of jobs): a job a running
  launcher already holds is not unmet demand. Only jobs its BatchJobs could lease count as
  runnable (see :meth:`ElasticQueueModule.job_limits`): when the runnable jobs are not all within
  the limits (and always under ``job_mode: serial``), a second request with the route's lease
  filters (``max_nodes_per_job``, ``serial_only``, ``max_wall_time_min``, and ``max_gpus_per_node``
  0 where its nodes have no GPU: the acquire's own conditions) counts those that are, and rarely a
  third says why the others are not;
- the jobs running in those BatchJobs: one more backlog request, ``state=RUNNING&batch_job_id=…``
  with the ids of its queued and running BatchJobs (:data:`MAX_IDS_PER_REQUEST` a request);
- every backlog request carries the shape of the site's nodes (:meth:`ElasticQueueModule.node_shape`:
  GPU and CPU ids per node from the launcher's platform), so that the footprint charges each job's
  GPUs and CPUs as the launcher places it (Polaris jobs packed 4 to a node that need 2 of its 4
  GPUs each take half a node, not a quarter);
- from the site's scheduler driver (``settings.yml`` ``scheduler:`` name and options): one status poll
  (how long each queued BatchJob has waited, whether it already runs, whether the scheduler says it
  can never start as submitted) and, for strategies that use them, the backfill windows
  of ``submit_queue`` (plus those a driver reports for any queue, key ``*``, as PBS does for nodes
  not tied to a queue);
- only in a cycle whose decision submits: its BatchJobs the scheduler refused lately (the newest
  submit_failed ones of ``submit_queue``, one GET, see :meth:`ElasticQueueModule.read_refused`); the
  strategy then decides again, and requests nothing at least as large as one of them. The same
  rows give a backoff: after submissions of its own that failed without a refusal (the scheduler
  unreachable), nothing is submitted for a while (:meth:`ElasticQueueModule.submit_backoff`); nor
  while the scheduler module holds a BatchJob of the queue and project back at a queue limit
  (:meth:`ElasticQueueModule.held_in_queue`); nor while its BatchJobs keep ending having leased no
  job for an unchanged backlog (the churn guard, :meth:`ElasticQueueModule.churn_backoff`, shown the
  backlog's numbers every cycle: its ended BatchJobs, one GET, and whether they leased any job, one
  aggregate request, read only after one of its BatchJobs ended);
- only in a cycle whose decision submits for a backfill window: the user's other jobs waiting in
  ``submit_queue`` (another site's requests, jobs by hand), from the status poll, which claim the
  windows as its own requests do (:meth:`ElasticQueueModule.read_others_waiting`); the strategy then
  decides again.

The strategy (:mod:`balsam_elastic.strategy`) turns that snapshot into a decision; the module creates
the BatchJobs it asks for (carrying the site's ``filter_tags``, so the launchers run only this site's
matching jobs, ``status_info.elastic_request``, the stamp that makes them its own, and
``status_info.elastic_created``, when, from which one held back in pending_submission is timed) and
withdraws the cancelled ones in one bulk PATCH, after reading them again in one GET (one whose state
changed since the snapshot read it, submitted or started meanwhile, is left alone): one waiting for
its submission goes ``pending_deletion``; a queued one is marked ``status_info.withdraw_if_queued``,
and the scheduler module deletes it only if its own poll shows it still waiting (a request that
started since this cycle's poll keeps its launcher running). It never cancels a BatchJob without its stamp, whatever a strategy asks. Every
cycle logs one line: the action or "nothing", the reason, and the numbers it was based on (and
``poll=failed`` when its status poll failed, the BatchJobs the scheduler module holds back at a
queue limit, in its words); at INFO when it
submits or cancels or differs from the last cycle's, else at DEBUG, with one INFO "still" line an
hour while it stays the same (:mod:`balsam_elastic.cycle_log`).
Launchers release their nodes themselves after ``launcher.idle_ttl_sec`` without work.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from balsam.batch_job_rules import BatchJobRefused, check_batch_job
from balsam.client.status_updater import refused_as_unknown
from balsam.config.drivers import site_platform
from balsam.launcher.job_mode import allows_node_packing
from balsam.models import SUBMITTED_BY_KEY, BackfillWindow
from balsam.options import build_options
from balsam.scheduler import ANY_QUEUE, REFUSED_FOR_GOOD
from balsam.serialization import parse_datetime
from balsam.site.service_client import bulk_patch, list_all, utcnow
from balsam.site.module import AgentModule
from balsam.site.modules.scheduler import WITHDRAW_IF_QUEUED
from balsam.states import BatchJobState, JobState

from .churn import CHURN_BACKOFF_MAX_S, ChurnGuard, backlog_key
from .cycle_log import CycleLog
from .options import ElasticQueueOptions
from .strategy import Backlog, BatchJobView, Decision, Snapshot, leased_up_to_min, load_strategy, never_starts_reason

#: BatchJob states the module reads (finished ones no longer matter).
READ_STATES = [s.value for s in (BatchJobState.pending_submission, BatchJobState.queued, BatchJobState.running,
                                 BatchJobState.pending_deletion)]
RUNNABLE = (JobState.preprocessed.value, JobState.restart_ready.value)
RUNNING = JobState.running.value
#: Most BatchJob ids in one backlog request (the API document's bound of a list filter, which keeps
#: the URL short): more ids take more requests, a handful at most, whatever the number of jobs.
MAX_IDS_PER_REQUEST = 32
#: status_info key stamped on every BatchJob the module creates: the strategy's name, or
#: REGULAR_QUEUE for one submitted to wait in the regular queue (never cancelled as stale).
REQUEST_KIND, REGULAR_QUEUE = "elastic_request", "regular_queue"
#: BatchJob states in which a launcher may run jobs (the API's state lags the scheduler's).
LAUNCHED_STATES = (BatchJobState.queued.value, BatchJobState.running.value)
#: status_info key stamped beside REQUEST_KIND: when the module created the BatchJob (ISO 8601, UTC),
#: from which a request held back in pending_submission is timed.
CREATED_AT = "elastic_created"
#: Its name in the BatchJobs it creates, under the core's status_info.submitted_by (``queue ls``).
SUBMITTED_BY = "elastic_queue"
#: What to do about a BatchJob the scheduler refused for good. A SchedulerError says only whether a
#: refusal is for good (``permanent``), not why: a queue the scheduler does not have (Slurm's "Invalid
#: partition name specified") and a size or time limit (QOSMaxNodePerJobLimit) look alike here, and
#: this module does not read any scheduler's wording. The scheduler's words, quoted before, tell which.
REFUSAL_ADVICE = ("If the scheduler does not know the queue, or the project may not use it: check elastic_queue."
                  "submit_queue and submit_project (and the queues of settings.yml scheduler.allowed_queues). If the "
                  "request exceeds a limit: make elastic_queue.max_num_nodes and max_wall_time_min (or the strategy's "
                  "block) fit the scheduler's limits. Then restart the agent")
#: How far back a refusal of the scheduler holds back requests as large (minutes): its own
#: submit_failed BatchJobs refused since the module started and at most this long ago count.
REFUSAL_MEMORY_MIN = 24 * 60
#: Most recent submit_failed BatchJobs of submit_queue read (one request, newest first).
REFUSED_READ_LIMIT = 20
#: The backlog route's node shape parameters (:meth:`ElasticQueueModule.node_shape`).
NODE_SHAPE_PARAMS = ("node_gpus", "node_cpus", "cpu_ids_are_cores", "hardware_threads_per_core")
#: The backlog route's (and the acquire's) GPU bound: 0 keeps the jobs a launcher on GPU-less nodes leases.
GPU_BOUND_PARAM = "max_gpus_per_node"
#: Most of its ended BatchJobs read per check of the churn guard (:meth:`ElasticQueueModule.churn_backoff`).
CHURN_READ_LIMIT = MAX_IDS_PER_REQUEST
#: Every job state: a job a BatchJob's launcher leased keeps its ``batch_job_id`` in all of them.
ALL_JOB_STATES = [s.value for s in JobState]
#: Longest wait (seconds) after submissions that failed without a refusal (the scheduler unreachable):
#: the wait starts at service_period and doubles with each such failure in a row, up to this.
SUBMIT_BACKOFF_MAX_S = 30 * 60


def as_options(config: Any) -> ElasticQueueOptions:
    """The section as an :class:`ElasticQueueOptions` (the settings loader builds one; a dict or
    another attrs section with the same keys is converted, unknown keys refused)."""
    if isinstance(config, ElasticQueueOptions):
        return config
    if config is None:
        return ElasticQueueOptions()
    if not isinstance(config, dict):
        config = attrs.asdict(config, recurse=False)
    options = build_options(ElasticQueueOptions, config, where="elastic_queue")
    problems = options.validate()
    if problems:
        key, text = next(iter(problems.items()))
        raise ValueError(f"elastic_queue.{key}: {text}")
    return options


class ElasticQueueModule(AgentModule):
    section = "elastic_queue"
    default_period = 60.0
    period_fields = ("service_period",)
    options_schema = ElasticQueueOptions
    section_comment = ("Submits BatchJobs sized to the runnable backlog (strategy backfill: fitted to the scheduler's "
                       "backfill windows; simple: fixed blocks). null disables it. See docs/elastic.md.")
    enabled_by_default = False

    def __init__(self, site_config: Any, config: Any, client: Any, *, scheduler: Any = None) -> None:
        options = as_options(config)
        super().__init__(site_config, options, client)
        self.last_decision: Optional[Decision] = None
        #: The BatchJobs its last cycle marked pending_deletion (the decision's, less those not its own
        #: and those whose state changed since the snapshot read them: see :meth:`still_cancellable`).
        self.last_cancelled: tuple[int, ...] = ()
        #: Its own BatchJobs of other queues that have not started, read by the last snapshot
        #: ({id: state}; see :meth:`left_over`): withdrawn by the cycle.
        self.left_over_ids: dict[int, BatchJobState] = {}
        #: The rows :meth:`still_cancellable` read again last (their state for :meth:`withdrawal`).
        self._reread: dict[int, dict] = {}
        #: The last snapshot's status poll (None: not read, or it failed; see _polled), and the
        #: scheduler ids of the site's BatchJobs it read (for :meth:`read_others_waiting`).
        self._poll: Optional[dict[int, Any]] = None
        self._polled = False
        #: Whether the last snapshot's status poll failed (its decision line says so: see cycle_note).
        self.poll_failed = False
        #: The node pools the driver gave with that poll (``StatusPoll.node_pools``), and those the
        #: last windows read are in (None: the driver does not say): see read_others_waiting.
        self._poll_pools: Mapping[int, tuple[str, ...]] = {}
        self._window_pools: Optional[frozenset[str]] = None
        self._site_scheduler_ids: set[int] = set()
        #: The scheduler ids of the last snapshot's BatchJobs of submit_queue (see read_others_waiting).
        self._queue_ids: set[int] = set()
        #: Refusals of the scheduler older than this are forgotten (a restart lifts them all).
        self.started_at = utcnow()
        #: When it first saw each of its BatchJobs that carry no CREATED_AT stamp (made by an earlier version).
        self._first_seen: dict[int, Any] = {}
        #: The newest of its BatchJobs seen with a scheduler id (a submission that succeeded): the
        #: submit failures older than it no longer lengthen the backoff (:meth:`submit_backoff`).
        self._newest_submitted = 0
        #: Clamp and refusal messages already logged: each is logged once, not every cycle.
        self._reported: set[tuple[bool, str]] = set()
        queue_cap = self.queue_limit("max_queued_jobs") or 0  # 0: the queue sets no limit
        capped = options.queue_cap_warning(queue_cap)
        if capped:
            # More would wait in pending_submission (the scheduler module holds them back), reserving
            # nodes that are not coming and never cancelled as stale. Said here only for the key left
            # at its default: set in the file, it is a settings warning (warnings_with), which the
            # agent logs at its start with the section's others.
            if options.max_queued_jobs == attrs.fields(type(options)).max_queued_jobs.default:
                self.logger.warning("%s", capped)
            options = attrs.evolve(options, max_queued_jobs=queue_cap)
        self.strategy = load_strategy(options)
        self._scheduler = scheduler
        #: The launcher's platform driver, loaded once when first needed (see :meth:`platform`).
        self._platform: Any = None
        self._platform_loaded = False
        #: The backlog answer's footprint field it reads (see :meth:`footprint_key`).
        self.footprint_field = self.footprint_key()
        #: Why its BatchJobs' nodes have no GPU ("" when they may: see :meth:`node_shape`); then
        #: the runnable backlog is read with the launchers' GPU bound (:data:`GPU_BOUND_PARAM` 0).
        self.gpuless_source = ""
        #: The nodes' shape sent with every backlog request ({} when unknown, or the server is
        #: older and refused the parameters: the footprint is then num_nodes / node_packing_count).
        self.node_shape_params = self.node_shape()
        #: Its BatchJobs that ended having leased no job for the same backlog (see balsam_elastic.churn).
        self.churn = ChurnGuard()
        #: Its own BatchJobs last seen waiting or running (or just created), and whether one of them
        #: has left those states since its ended BatchJobs were last read (:meth:`churn_backoff`
        #: reads them only then: nothing new to count otherwise).
        self._own_active: set[int] = set()
        self._own_ended_since_read = False
        #: Seconds, monotonic, that time the decision line's hourly INFO "still" line (a test sets
        #: its own clock, so that hours of cycles pass without sleeping). See balsam_elastic.cycle_log.
        self.clock = time.monotonic
        self.cycle_log = CycleLog(self.logger, clock=lambda: self.clock())
        self.warn_about_queue_maintainer()

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        if self._scheduler is None:
            self._scheduler = self.site_scheduler()
        return self._scheduler

    def footprint_key(self) -> str:
        """``footprint`` (Σ num_nodes / node_packing_count), or ``unpacked_footprint`` (Σ num_nodes)
        under job_mode mpi where MPI runs may not share a node (``launcher.mpirun_allows_node_packing``
        false, or null on a platform whose default is false, as Theta's): each job then holds whole
        nodes, and the packed footprint undercounted the nodes by node_packing_count."""
        if self.options.job_mode != "mpi":
            return "footprint"  # the serial launcher packs node_packing_count jobs per node itself
        settings = getattr(self.site_config, "settings", None)

        def platform() -> Any:
            driver = self.platform()
            if driver is None:
                self.logger.warning("launcher platform not loaded: assuming MPI runs may share a node")
            return driver

        return "footprint" if allows_node_packing(settings, platform) else "unpacked_footprint"

    def platform(self) -> Any:
        """The launcher's platform driver (settings.yml ``launcher.platform``), None when it does not
        load (logged once: an unloadable platform fails the launcher, not this module)."""
        if not self._platform_loaded:
            self._platform_loaded = True
            try:
                self._platform = site_platform(getattr(self.site_config, "settings", None))
            except Exception as exc:
                self.logger.warning("launcher platform not loaded (%s)", exc)
        return self._platform

    def node_shape(self) -> dict[str, Any]:
        """The backlog route's node shape parameters for this site's compute nodes, as the launcher's
        node manager counts them: ``node_gpus`` and ``node_cpus``, the GPU and CPU ids of one node
        that the platform driver hands the launcher (its ``gpu_ids`` and ``cpu_ids``, from
        ``launcher.platform_options``), and its ``cpu_ids_are_cores`` and
        ``hardware_threads_per_core``; ``elastic_queue.node_gpus`` and ``node_cpus``, where set, instead
        of the driver's ids. Empty where neither names them (the default platform finds its ids only
        inside an allocation): the footprint is then 0.7's. The nominal
        node: GPUs split into MIG instances at run time are counted as the whole GPUs named."""
        driver = self.platform()
        params: dict[str, Any] = {}
        gpu_ids = getattr(driver, "gpu_ids", None)
        if isinstance(gpu_ids, (tuple, list)):
            # Empty: the platform's nodes have no GPU (a CPU partition), as its launcher finds them.
            params["node_gpus"] = len(gpu_ids)
        cpu_ids = getattr(driver, "cpu_ids", None)
        if isinstance(cpu_ids, (tuple, list)) and cpu_ids:
            params["node_cpus"] = len(cpu_ids)
        # elastic_queue.node_gpus / node_cpus, where set, say it for a platform that cannot (the
        # default platform's GPUs and CPUs are known only inside an allocation: its GPU jobs were
        # charged no GPUs, and 8 jobs packed 4 to a 4-GPU node needing 2 GPUs each got 2 nodes, not 4).
        for key in ("node_gpus", "node_cpus"):
            value = getattr(self.options, key, None)
            if value is not None:
                params[key] = int(value)
        if "node_cpus" in params:
            params["cpu_ids_are_cores"] = "true" if getattr(driver, "cpu_ids_are_cores", False) else "false"
            params["hardware_threads_per_core"] = int(getattr(driver, "hardware_threads_per_core", 0) or 0)
        if params.get("node_gpus") == 0:
            # Nodes without a GPU: their launchers acquire with max_gpus_per_node 0
            # (job_mode.gpuless_acquire_filter) and never lease a job that needs one; the backlog
            # is read with the same bound (lease_filters). Counted, such jobs got BatchJob after
            # BatchJob that ran nothing. No GPU to charge in the footprint.
            del params["node_gpus"]
            self.gpuless_source = ("elastic_queue.node_gpus 0" if getattr(self.options, "node_gpus", None) == 0
                                   else f"platform {getattr(driver, 'name', '') or type(driver).__name__!r} lists none")
        if params or self.gpuless_source:
            shown = ", ".join([f"{k}={v}" for k, v in params.items()] + (["no GPU"] if self.gpuless_source else []))
            self.logger.info("sizing the backlog for nodes of %s", shown)
        return params

    def filter_tags(self) -> dict[str, str]:
        return dict(getattr(getattr(self.site_config, "settings", None), "filter_tags", None) or {})

    def _tag_params(self) -> list[str]:
        return [f"{k}:{v}" for k, v in sorted(self.filter_tags().items())]

    def queue_limit(self, name: str) -> Optional[int]:
        """``max_nodes``, ``max_walltime`` or ``max_queued_jobs`` of the submit queue in settings.yml
        ``scheduler.allowed_queues`` (None: no scheduler section, or the queue is not listed)."""
        rules = getattr(getattr(self.site_config, "settings", None), "scheduler", None)
        limits = (getattr(rules, "allowed_queues", None) or {}).get(self.options.submit_queue) if rules is not None else None
        if limits is None:
            return None
        value = limits.get(name) if isinstance(limits, Mapping) else getattr(limits, name, None)
        return None if value is None else int(value)

    def warn_about_queue_maintainer(self) -> None:
        """queue_maintainer filling the same queue: its BatchJobs carry the same filter_tags, so they
        count here as reserved capacity (and it counts ours); neither cancels the other's, but each
        submits less than configured. Say so once, at load."""
        sections = getattr(getattr(self.site_config, "settings", None), "sections", None) or {}
        maintainer = sections.get("queue_maintainer") if isinstance(sections, Mapping) else None
        if maintainer is not None and getattr(maintainer, "submit_queue", None) == self.options.submit_queue:
            self.logger.warning("queue_maintainer also submits to queue %r: its BatchJobs count as reserved capacity "
                                "here and are never cancelled, and it counts ours (settings.yml queue_maintainer: and "
                                "elastic_queue: submit_queue; set one of them to null or to another queue)",
                                self.options.submit_queue)

    def job_limits(self) -> tuple[Optional[int], bool, Optional[int]]:
        """What a launcher in one of its BatchJobs leases: (most nodes of a job, serial-only, its
        longest BatchJob in minutes); None where there is no limit. A job fits when it is not wider
        than the submit queue allows nor than the widest BatchJob the strategy requests
        (``Strategy.widest_request_nodes``), single-node and single-rank under job_mode serial (the serial
        launcher's ``serial_only`` lease), and no longer than a launcher in its longest BatchJob
        leases (``leased_up_to_min``: its batch script's ``-t`` less its safety margin, in whole minutes,
        as its first acquire offers them up to a minute after the script's start; 5 fewer than the
        BatchJob's wall time from 22 minutes on). :meth:`lease_filters` asks the server for those."""
        serial = self.options.job_mode == "serial"
        # Nor wider than its widest request (max_num_nodes, nodes_per_block): such a job ran in none
        # of its BatchJobs, and counted, it inflated the requests.
        widths = [w for w in (self.queue_limit("max_nodes"), self.strategy.widest_request_nodes()) if w is not None]
        max_nodes = 1 if serial else (min(widths) if widths else None)
        walls = [w for w in (self.strategy.longest_request_min(), self.queue_limit("max_walltime")) if w is not None]
        return max_nodes, serial, min(walls) if walls else None

    def lease_filters(self, limits: tuple[Optional[int], bool, Optional[int]]) -> Optional[dict[str, Any]]:
        """The backlog route's parameters that keep the jobs a launcher in one of its BatchJobs could
        lease (``limits`` of :meth:`job_limits`); None when no job could be (a limit below 1)."""
        max_nodes, serial, max_wall = limits
        params: dict[str, Any] = {}
        if self.gpuless_source:
            params[GPU_BOUND_PARAM] = 0  # what its launchers, on nodes without a GPU, acquire with
        if serial:
            params["serial_only"] = "true"  # 1 node and 1 rank per node, as the serial launcher acquires
        elif max_nodes is not None:
            if max_nodes < 1:
                return None
            params["max_nodes_per_job"] = max_nodes
        if max_wall is not None:
            # What a launcher in its longest BatchJob leases (its minutes left before its safety
            # margin, leased_up_to_min): the route keeps wall_time_min <= the value.
            if max_wall < 1:
                return None
            params["max_wall_time_min"] = leased_up_to_min(max_wall)
        return params

    def unfit_reason(self, everything: list[Mapping], params: dict[str, Any],
                     limits: tuple[Optional[int], bool, Optional[int]]) -> str:
        """Why some runnable jobs cannot run in its BatchJobs, in words without counts (the same
        words each cycle, so each distinct reason is reported once). ``everything``: the runnable
        jobs' aggregate rows (``params``: the request that read them), of which some do not fit."""
        max_nodes, serial, max_wall = limits
        widest = max(int(r["max_num_nodes"]) for r in everything)
        leased = leased_up_to_min(max_wall) if max_wall is not None else None
        too_long = leased is not None and max(int(r.get("max_wall_time_min") or 0) for r in everything) > leased
        why = []
        if serial:
            # A job that does not fit and is not too long has more than 1 node or rank. With single-node
            # jobs only, some of them too long, the aggregate cannot tell: one more request does.
            not_serial = widest > 1 or not too_long
            if not not_serial:
                serial_shaped = self._read_backlog_rows({**params, "serial_only": "true"})
                not_serial = _count(serial_shaped) < _count(everything)
            if not_serial:
                why.append("more than 1 node or 1 rank per node "
                           "(job_mode serial leases only single-node single-rank jobs)")
        elif max_nodes is not None and widest > max_nodes:
            queue_max = self.queue_limit("max_nodes")
            if queue_max is not None and queue_max <= max_nodes:
                why.append(f"more nodes than queue {self.options.submit_queue!r}'s max_nodes {max_nodes} "
                           f"(settings.yml scheduler.allowed_queues)")
            elif self.strategy.widest_request_key:
                why.append(f"more nodes than elastic_queue.{self.strategy.widest_request_key} {max_nodes}, "
                           f"the most nodes its BatchJobs have (settings.yml)")
            else:
                why.append(f"more nodes than strategy {self.strategy.name!r}'s widest BatchJob ({max_nodes} nodes)")
        if self.gpuless_source:
            # Which jobs the GPU bound leaves out the aggregate cannot tell: one more request does.
            gpu_free = self._read_backlog_rows({**params, GPU_BOUND_PARAM: 0})
            if self.gpuless_source and _count(gpu_free) < _count(everything):  # (cleared: an older server)
                why.append(f"GPUs (ranks_per_node x gpus_per_rank > 0), and its BatchJobs' nodes have none "
                           f"({self.gpuless_source}): their launchers lease no job that needs a GPU; submit those "
                           f"jobs to a site whose nodes have GPUs, or set gpus_per_rank 0")
        if too_long:
            why.append(f"wall_time_min of more than {leased}, and its BatchJobs last at most {max_wall} min (a launcher "
                       f"leases only jobs that end before its safety margin: {leased} min in a {max_wall}-min BatchJob)")
        return "; ".join(why)

    def _read_backlog(self, params: dict[str, Any]) -> dict[str, dict]:
        """``GET /sites/{id}/backlog`` with ``params`` and the nodes' shape: ``{state: numbers}`` (one
        aggregate query). A server older than the shape parameters refuses them as unknown (422):
        they are dropped for good, with one warning, and the request is sent again without them."""
        path = f"/sites/{self.site_id}/backlog"
        try:
            answer = self.client.get(path, params={**params, **self.node_shape_params})
        except Exception as exc:
            # A bad value of a known parameter is raised as it is.
            if GPU_BOUND_PARAM in params and refused_as_unknown(exc, [GPU_BOUND_PARAM]):
                # A server older than the GPU bound: the GPU jobs are counted as before (and the
                # churn guard holds back what their BatchJobs then run: nothing).
                self.logger.warning("the server does not know the backlog's %s (%s): jobs that need a GPU are counted "
                                    "although its BatchJobs' nodes have none (%s)", GPU_BOUND_PARAM, exc,
                                    self.gpuless_source)
                self.gpuless_source = ""
                return self._read_backlog({k: v for k, v in params.items() if k != GPU_BOUND_PARAM})
            if not self.node_shape_params or not refused_as_unknown(exc, NODE_SHAPE_PARAMS):
                raise
            self.logger.warning("the server does not know the backlog's node shape parameters (%s): sizing "
                                "BatchJobs by num_nodes / node_packing_count, GPUs and CPUs not counted", exc)
            self.node_shape_params = {}
            return self._read_backlog(params)
        return (answer or {}).get("states") or {}

    def _read_backlog_rows(self, params: dict[str, Any]) -> list[dict]:
        states = self._read_backlog(params)
        return [states[s] for s in RUNNABLE if s in states]

    def read_backlog(self) -> Backlog:
        """The runnable jobs its BatchJobs could lease, in numbers (``running_*`` are filled by
        :meth:`snapshot`, from its BatchJobs): one aggregate request when all runnable jobs fit,
        two when some do not (and under job_mode serial), three in one case (see :meth:`unfit_reason`)."""
        # leased=false: a runnable job a launcher already holds (prefetched, not started) will run in
        # that launcher's BatchJob; counting it would submit BatchJobs that find nothing to lease.
        # Launchers lease only what they can start soon (a serial one: its free slots plus a short
        # lookahead), so what they cannot start yet stays here, as backlog.
        params: dict[str, Any] = {"state": list(RUNNABLE), "leased": "false"}
        if self.filter_tags():
            params["tags"] = self._tag_params()
        everything = self._read_backlog_rows(params)
        if not everything:
            return Backlog()
        limits = max_nodes, serial, max_wall = self.job_limits()
        widest = max(int(r["max_num_nodes"]) for r in everything)
        longest = max(int(r.get("max_wall_time_min") or 0) for r in everything)
        leased = leased_up_to_min(max_wall) if max_wall is not None else None
        if (not serial and not self.gpuless_source and (max_nodes is None or widest <= max_nodes)
                and (leased is None or longest <= leased)):
            return _runnable_backlog(everything, self.footprint_field)
        # Some runnable jobs may be beyond a limit: the route counts those within (the acquire's filters).
        filters = self.lease_filters(limits)
        fit = self._read_backlog_rows({**params, **filters}) if filters is not None else []
        backlog = _runnable_backlog(fit, self.footprint_field)
        unfit_count = _count(everything) - backlog.runnable_count
        reason = self.unfit_reason(everything, params, limits) if unfit_count > 0 else ""
        if not reason:  # all fit (jobs may also have changed between the two requests)
            return backlog
        return attrs.evolve(backlog, unfit_count=unfit_count, unfit_reason=reason)

    def read_running(self, rows: list[dict]) -> tuple[int, float]:
        """(count, node footprint) of the jobs running in ``rows``' queued and running BatchJobs: only
        those hold nodes of its reservation (jobs running in other queues' BatchJobs do not). One
        backlog request per :data:`MAX_IDS_PER_REQUEST` BatchJobs, none without such a BatchJob."""
        ids = sorted(int(r["id"]) for r in rows if r["state"] in LAUNCHED_STATES)
        count, footprint = 0, 0.0
        for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
            running = self._read_backlog({"state": RUNNING, "batch_job_id": ids[start:start + MAX_IDS_PER_REQUEST]})
            if RUNNING in running:
                count += int(running[RUNNING]["count"])
                footprint += float(running[RUNNING][self.footprint_field])
        return count, footprint

    def read_batch_jobs(self) -> tuple[list[dict], list[dict]]:
        """Its BatchJobs in submit_queue, and those made by others that can run its backlog (see
        :meth:`runs_the_backlog`): the capacity the strategy counts; and, from the same request (the
        site's BatchJobs of every queue), its own in other queues (:meth:`left_over`)."""
        params: dict[str, Any] = {"site_id": self.site_id, "state": READ_STATES}
        if self.filter_tags():
            params["filter_tags"] = self._tag_params()
        rows = list_all(self.client, "/batch-jobs/", params)
        queue = self.options.submit_queue
        return ([r for r in rows if r.get("queue") == queue and (self.own(r) or self.runs_the_backlog(r))],
                [r for r in rows if r.get("queue") != queue and REQUEST_KIND in (r.get("status_info") or {})])

    def left_over(self, row: Mapping, poll: Optional[dict[int, Any]]) -> bool:
        """Whether ``row``, one of its own BatchJobs in a queue other than submit_queue (requested
        before settings.yml's ``elastic_queue.submit_queue`` was changed and the agent restarted),
        is withdrawn: it has the site's filter_tags exactly and has certainly not started (waiting
        for its submission, or queued per this cycle's status poll). Read only per submit_queue,
        such a request was neither counted nor ever cancelled: it doubled the new queue's requests
        for the same backlog, and started hours later for a backlog long gone. One that runs is left
        to drain (``launcher.idle_ttl_sec``); one with other filter_tags may be another agent's."""
        if dict(row.get("filter_tags") or {}) != self.filter_tags() or _withdrawn(row):
            return False
        if row["state"] == BatchJobState.pending_submission.value:
            return True
        status = (poll or {}).get(int(row["scheduler_id"])) if row.get("scheduler_id") is not None else None
        return row["state"] == BatchJobState.queued.value and _polled_state(status) is BatchJobState.queued

    def own(self, row: Mapping) -> bool:
        """Whether ``row`` is one of its own requests: stamped ``status_info.elastic_request``, with
        the site's filter_tags exactly. The server's filter keeps the BatchJobs whose tags contain the
        site's (all of them for an agent with none): another agent's request in the same queue was
        read as its own, and withdrawn as unneeded."""
        return (REQUEST_KIND in (row.get("status_info") or {})
                and dict(row.get("filter_tags") or {}) == self.filter_tags())

    def runs_the_backlog(self, row: Mapping) -> bool:
        """Whether a BatchJob it did not create (by hand, queue_maintainer's) could run any of the
        jobs it counts as runnable, so that it counts as reserved capacity: the site's filter_tags
        exactly (the server's filter keeps those containing them; more tags lease only some of the
        jobs), no ``partitions`` (each partition has its own job_mode and filter_tags), and a
        job_mode whose launcher leases the backlog: the module's own, or mpi (whose launcher runs
        any job; a serial launcher leases only single-node single-rank jobs). Other BatchJobs hold
        nodes that run none of these jobs: counting them withheld the BatchJobs the backlog needed."""
        if row.get("partitions") or REQUEST_KIND in (row.get("status_info") or {}):
            return False  # another agent's request (see own) runs that agent's backlog
        if dict(row.get("filter_tags") or {}) != self.filter_tags():
            return False
        return row.get("job_mode") in (self.options.job_mode, "mpi")

    def read_poll(self) -> Optional[dict[int, Any]]:
        """This cycle's status poll: scheduler id -> the driver's status of each job still in the
        queue; None when the poll failed (nothing is then cancelled, and the queued BatchJobs keep
        the windows they were sized for: a failed poll does not say they started)."""
        try:
            statuses = self.scheduler.get_statuses()
        except Exception as exc:  # the drivers raise SchedulerError only; never let a cycle die of it
            self.logger.warning("scheduler status poll failed: %s (no stale BatchJob is cancelled this cycle)", exc)
            return None
        self._poll_pools = self.node_pools_of_poll()
        return {int(sid): st for sid, st in (statuses or {}).items()}

    def node_pools_of_poll(self) -> Mapping[int, tuple[str, ...]]:
        """The node pools of each job of the poll just read (``StatusPoll.node_pools`` of the
        driver's last poll; empty where the driver gives none)."""
        pools = getattr(getattr(self.scheduler, "last_poll", None), "node_pools", None) or {}
        try:
            return {int(sid): tuple(str(p) for p in names) for sid, names in pools.items()}
        except (AttributeError, TypeError, ValueError):  # a driver's odd value: matched by queue alone
            return {}

    def view(self, row: Mapping, poll: Optional[dict[int, Any]]) -> BatchJobView:
        """One BatchJob as the strategy sees it: the API's record, and what this cycle's poll said
        of it (nothing when the poll failed or does not list it)."""
        status = (poll or {}).get(int(row["scheduler_id"])) if row.get("scheduler_id") is not None else None
        polled = _polled_state(status)
        queued = polled is BatchJobState.queued
        info = row.get("status_info") or {}
        pending = row["state"] == BatchJobState.pending_submission.value
        return BatchJobView(
            id=int(row["id"]), state=BatchJobState(row["state"]), num_nodes=int(row["num_nodes"]),
            wall_time_min=int(row["wall_time_min"]),
            queued_time_min=int(getattr(status, "queued_time_min", 0) or 0) if queued else None,
            regular_queue=info.get(REQUEST_KIND) == REGULAR_QUEUE,
            owned=self.own(row),
            polled_state=polled, never_starts=self.never_starts(status) if queued else "",
            waits_for_other=queued and (self.waits_for_other(status)
                                        or (not self.own(row) and self.submit_time_unknown(status))),
            project=str(row.get("project") or ""),
            held=str(info.get("waiting") or "") if pending else "",
            age_min=self.age_min(row) if self.own(row) else None,
            withdrawn=_withdrawn(row),
        )

    def age_min(self, row: Mapping) -> Optional[int]:
        """Whole minutes since it created ``row`` (its CREATED_AT stamp; one without the stamp,
        made by an earlier version, is timed from the cycle that first saw it)."""
        created = None
        stamp = (row.get("status_info") or {}).get(CREATED_AT)
        if stamp:
            try:
                created = parse_datetime(stamp)
            except (TypeError, ValueError):
                created = None
        if created is None:
            created = self._first_seen.setdefault(int(row["id"]), utcnow())
        return int(_minutes_since(created))

    def read_submit_failed(self) -> list[dict]:
        """The :data:`REFUSED_READ_LIMIT` newest submit_failed BatchJobs of submit_queue (one GET)."""
        params: dict[str, Any] = {"site_id": self.site_id, "queue": self.options.submit_queue,
                                  "state": BatchJobState.submit_failed.value, "ordering": "-id",
                                  "limit": REFUSED_READ_LIMIT}
        if self.filter_tags():
            params["filter_tags"] = self._tag_params()
        return (self.client.get("/batch-jobs/", params=params) or {}).get("results") or []

    def submit_backoff(self, failed: list[dict]) -> Optional[str]:
        """Why no BatchJob is submitted this cycle, or None: its newest BatchJobs failed their
        submission without a refusal (the scheduler module tried 3 times and the command kept
        failing: the server unreachable, ``qsub: cannot connect to server``), newer than its last
        submission that succeeded. Without this a new submit_failed BatchJob was created every
        cycle of an outage (about 60 BatchJobs and 180 qsub calls an hour). The wait after the
        newest failure (its ``end_time``, else ``status_info.error_time``) is service_period,
        doubled for each such failure in a row, at most :data:`SUBMIT_BACKOFF_MAX_S`; a submission
        that succeeds (a BatchJob of its own seen with a scheduler id) ends the run."""
        streak, newest = 0, None
        for row in sorted(failed, key=lambda r: -int(r["id"])):
            info = row.get("status_info") or {}
            if REQUEST_KIND not in info:
                continue  # not its own
            if (int(row["id"]) <= self._newest_submitted or row.get("scheduler_id") is not None
                    or info.get(REFUSED_FOR_GOOD) == "true"):
                break  # a submission that reached the queue, or a refusal (read_refused's): the run ends
            if newest is None:
                newest = row
            streak += 1
        if newest is None:
            return None
        info = newest.get("status_info") or {}
        when = newest.get("end_time") or info.get("error_time")
        try:
            failed_at = parse_datetime(when) if when else None
        except (TypeError, ValueError):
            failed_at = None
        if failed_at is None:
            return None
        wait = min(self.period * 2 ** min(streak - 1, 30), SUBMIT_BACKOFF_MAX_S)
        until = failed_at + dt.timedelta(seconds=wait)
        if utcnow() >= until:
            return None
        return (f"backing off after {streak} failed submission(s) in a row (BatchJob {newest['id']}: "
                f"{info.get('error') or 'no reason given'}): nothing submitted until {until:%Y-%m-%d %H:%M:%S} UTC "
                f"({wait:.0f} s after the last failure)")

    def read_ended(self) -> list[dict]:
        """Its own BatchJobs of submit_queue that started and finished since the module started,
        of the :data:`CHURN_READ_LIMIT` newest that finished (one GET). One that never started (withdrawn
        while queued, deleted by hand) had no launcher to lease anything: not counted."""
        params: dict[str, Any] = {"site_id": self.site_id, "queue": self.options.submit_queue,
                                  "state": BatchJobState.finished.value, "end_time_after": self.started_at.isoformat(),
                                  "ordering": "-id", "limit": CHURN_READ_LIMIT}
        if self.filter_tags():
            params["filter_tags"] = self._tag_params()
        rows = (self.client.get("/batch-jobs/", params=params) or {}).get("results") or []
        return [r for r in rows if self.own(r) and r.get("start_time")]

    def leased_any(self, batch_job_ids: list[int]) -> bool:
        """Whether a launcher of any of these BatchJobs leased a job (a leased job keeps its
        ``batch_job_id``, in every state): one backlog request per :data:`MAX_IDS_PER_REQUEST` ids."""
        for start in range(0, len(batch_job_ids), MAX_IDS_PER_REQUEST):
            if self._read_backlog({"state": ALL_JOB_STATES, "batch_job_id": batch_job_ids[start:start + MAX_IDS_PER_REQUEST]}):
                return True
        return False

    def churn_backoff(self, snapshot: Snapshot) -> Optional[str]:
        """Why nothing is submitted this cycle, or None: its BatchJobs keep ending having leased no
        job while the backlog they were sized for stays the same in every cycle
        (:mod:`balsam_elastic.churn`, whose numbers :meth:`run_cycle` shows it each cycle): its
        launchers likely refuse the jobs for a reason this module cannot see. Read in a cycle whose
        decision submits: its ended BatchJobs (one GET) and, for those not seen before, whether
        they leased any job (one aggregate request). Said once per streak at ERROR."""
        rows: list[dict] = []
        if self._own_ended_since_read:
            rows, self._own_ended_since_read = self.read_ended(), False
        ended, started = [], {}
        for row in rows:
            try:
                when = parse_datetime(row.get("end_time")) if row.get("end_time") else utcnow()
            except (TypeError, ValueError):
                when = utcnow()
            ended.append((int(row["id"]), when))
            try:
                started[int(row["id"])] = parse_datetime(row["start_time"])
            except (TypeError, ValueError):
                pass  # a start time it cannot read: not counted (it may have lived under another backlog)
        new = self.churn.unseen(ended)
        leased = bool(new) and self.leased_any([i for i, _ in new])
        listed = {i for i, _ in ended} if rows else None  # not read this cycle: keep what it counted
        key = backlog_key(snapshot.backlog)
        if self.churn.update(key, new, leased, still_listed=listed, started=started):
            notes = {int(r["id"]): r.get("status_info") or {} for r in rows}
            said = next((f" BatchJob {i}'s status_info: {quoted}." for i in reversed(self.churn.streak)
                         for quoted in [_ending_notes(notes.get(i, {}))] if quoted), "")
            self.logger.error(
                "BatchJobs %s ended without leasing any of the %d runnable job(s) they were submitted for, and the "
                "backlog has not changed.%s Likely causes: their launchers refuse these jobs (the jobs ask for what "
                "the nodes lack: GPUs on nodes without one, set elastic_queue.node_gpus 0; more CPUs or GPUs than a "
                "node has; or a filter of the launchers' acquire: settings.yml filter_tags, the jobs' tags or app), a "
                "launcher that fails at its start, or nodes or allocations that fail (balsam queue ls -v, the "
                "scheduler's record of the jobs, and the launcher logs in the site's log/). Until a BatchJob runs a "
                "job or the backlog changes, submissions are spaced out (service_period doubled for each such "
                "BatchJob, at most %d min)", ", ".join(map(str, self.churn.streak)),
                snapshot.backlog.runnable_count, said, CHURN_BACKOFF_MAX_S // 60)
        until = self.churn.blocked_until(self.period, utcnow())
        if until is None:
            return None
        return (f"backing off after {len(self.churn.streak)} BatchJob(s) in a row ended having leased no job for this "
                f"backlog: nothing submitted until {until:%Y-%m-%d %H:%M:%S} UTC")

    def held_in_queue(self, snapshot: Snapshot, decision: Decision) -> Optional[str]:
        """Why nothing is submitted this cycle, or None: a BatchJob of the submit queue and project
        is held back by the scheduler module (the queue at a scheduler limit, e.g. PBS's "would
        exceed queue prod's per-user limit"). Another one would wait behind it, and the limit
        counted only against max_queued_jobs let the module add one each cycle up to it."""
        held = [b for b in snapshot.batch_jobs if b.held and b.project == snapshot.project and b.id not in decision.cancel]
        if not held:
            return None
        return (f"BatchJob {held[0].id} of queue {self.options.submit_queue!r} (project {snapshot.project!r}) is held "
                f"back ({held[0].held}): nothing more is submitted to the queue until it is")

    def read_refused(self, rows: Optional[list[dict]] = None) -> tuple[BatchJobView, ...]:
        """Its own BatchJobs of submit_queue that the scheduler refused for good (submit_failed
        without a scheduler id, marked ``status_info[REFUSED_FOR_GOOD]`` by the scheduler module:
        nothing reached the queue, and the scheduler's words are in ``status_info.error``), refused since the module started and within
        :data:`REFUSAL_MEMORY_MIN`: one request, the :data:`REFUSED_READ_LIMIT` newest submit_failed
        BatchJobs of the queue (``rows``, when read already). Read only in a cycle whose decision submits."""
        if rows is None:
            rows = self.read_submit_failed()
        since = max(self.started_at, utcnow() - dt.timedelta(minutes=REFUSAL_MEMORY_MIN))
        refused = []
        for row in rows:
            info = row.get("status_info") or {}
            if REQUEST_KIND not in info or row.get("scheduler_id") is not None:
                continue  # not its own, or it reached the queue (and failed there later)
            if info.get(REFUSED_FOR_GOOD) != "true":
                continue  # failed after retries of a failing command (a daemon down), not refused: may go again
            when = info.get("error_time") or row.get("end_time")
            try:
                failed = parse_datetime(when) if when else None
            except (TypeError, ValueError):
                failed = None
            if failed is None or failed < since:
                continue
            refused.append(BatchJobView(
                id=int(row["id"]), state=BatchJobState.submit_failed, num_nodes=int(row["num_nodes"]),
                wall_time_min=int(row["wall_time_min"]), regular_queue=info.get(REQUEST_KIND) == REGULAR_QUEUE,
                never_starts=str(info.get("error") or "no reason given"), project=str(row.get("project") or ""),
            ))
        return tuple(sorted(refused, key=lambda b: b.id))

    def read_others_waiting(self, snapshot: Snapshot) -> tuple[BackfillWindow, ...]:
        """The user's jobs waiting in submit_queue that are not this site's BatchJobs, submitted
        within ``max_queue_wait_time_min`` (:attr:`Snapshot.others_waiting`), from this cycle's
        status poll (polled now when the snapshot had no queued BatchJob to poll for: one more
        scheduler command, only in a cycle that would submit for a window). The drivers poll all of
        the user's jobs, another site's too. A job waiting longer waits for reasons of its own (its
        size, a limit) and is left out, as is one held, waiting for a dependency or a begin time, or
        of unknown wait (the driver's ``waits_for_other_than_nodes``), one that never starts, and
        one of another queue (by its status's ``queue``, which the driver gives in the names a
        BatchJob's queue has, Slurm's QOS under ``queue_flag: --qos``, and by the names this poll
        shows for the site's jobs of submit_queue; also where the windows include nodes usable
        from any queue: a window does not say which queues may use it, and a job of another queue
        or partition, counted there, claimed nodes it can never take: the window stayed claimed,
        never requested). Where the driver gives each job's node pools (``StatusPoll.node_pools``,
        Slurm's partition under ``--qos``) the pool decides instead: a job in a pool the site's own
        jobs of submit_queue are listed in and the windows came from, whatever its queue; before one
        is listed, a job of those names in a pool the windows came from. A failed poll gives none.

        One of its own requests that the snapshot read waiting for its submission claims its window
        already (``unclaimed_windows``); the scheduler module may have submitted it since, and the
        poll then lists a job whose id no BatchJob the snapshot read carries. A job of that size,
        submitted a minute ago at most, is taken for it (one per such request): counted again, it
        made the window look taken twice, and the cycle requested nothing."""
        poll = self._poll
        if not self._polled:
            try:
                poll = {int(sid): st for sid, st in (self.scheduler.get_statuses() or {}).items()}
            except Exception as exc:  # the windows are then shared as before: never let a cycle die of it
                self.logger.debug("status poll for the user's other waiting jobs failed: %s", exc)
                return ()
            self._poll, self._polled = poll, True
            self._poll_pools = self.node_pools_of_poll()
        unsubmitted = Counter((b.num_nodes, b.wall_time_min) for b in snapshot.batch_jobs
                              if b.owned and not b.regular_queue and b.state == BatchJobState.pending_submission)
        # The names the scheduler shows for jobs of submit_queue: its own, and those the site's
        # BatchJobs of submit_queue show in this poll (a PBS routing queue's jobs show the execution
        # queue they were routed to, Polaris prod's small/medium/large; a Slurm site's job_submit
        # plugin may set another QOS than the one asked for). Compared by submit_queue alone, the
        # user's other jobs were never counted there. The driver reports a job's queue in the names
        # a BatchJob's queue has (Slurm's QOS, not its partition, under queue_flag --qos), so that
        # another site's request is counted before any of this site's jobs is listed.
        names = {self.options.submit_queue} | {str(getattr(poll[sid], "queue", "") or "")
                                               for sid in self._queue_ids if sid in (poll or {})}
        names.discard("")
        # Where the driver says which node pools a job takes nodes from (StatusPoll.node_pools:
        # Slurm's partition under queue_flag --qos, where one QOS reaches several partitions and
        # the windows of every partition are one list), the pool decides: a job waiting in a
        # partition the site's own jobs of submit_queue are listed in takes those idle nodes,
        # whatever its QOS, if one of those shared partitions is one the windows came from; one of
        # the same QOS waiting in another partition never does (counted, it claimed windows of
        # nodes it can never take, and they were never requested). Until an own job is listed, a
        # job of those names claims if it waits in a partition the windows came from. A driver
        # that gives no pools: by the names alone.
        own_pools = {p for sid in self._queue_ids for p in self._poll_pools.get(sid, ())}
        found = []
        for sid, status in sorted((poll or {}).items()):
            if sid in self._site_scheduler_ids or _polled_state(status) is not BatchJobState.queued:
                continue
            pools = self._poll_pools.get(sid)
            if own_pools and pools is not None:
                # Shared pools only count where a window lies: a job the site's own request shares
                # gpu with (`-p cpu,gpu`) never takes the idle cpu nodes, counted there it claimed
                # them, and they were never requested.
                shared = own_pools.intersection(pools)
                if not shared or (self._window_pools is not None and self._window_pools.isdisjoint(shared)):
                    continue
            elif str(getattr(status, "queue", "") or "") not in names:
                continue
            elif self._window_pools is not None and pools is not None and self._window_pools.isdisjoint(pools):
                continue
            if self.never_starts(status) or self.waits_for_other(status) or self.submit_time_unknown(status):
                continue  # takes no nodes that come free now (a hold, a dependency, a limit), or unknown
            try:
                waited = int(getattr(status, "queued_time_min", 0) or 0)
                size = (int(status.num_nodes), int(status.wall_time_min))
            except (AttributeError, TypeError, ValueError):
                continue  # a record without a size claims nothing
            if waited <= 1 and unsubmitted[size] > 0:
                unsubmitted[size] -= 1  # its own request, submitted since the snapshot read it
                continue
            if waited <= self.options.max_queue_wait_time_min:
                found.append(BackfillWindow(num_nodes=size[0], wall_time_min=size[1]))
        return tuple(found)

    def waits_for_other(self, status: Any) -> bool:
        """Whether its driver says this queued job waits for something other than free nodes (a
        hold, a dependency, a begin time, an unknown wait: ``Scheduler.waits_for_other_than_nodes``)."""
        hook = getattr(self.scheduler, "waits_for_other_than_nodes", None)
        if hook is None:  # a scheduler object not derived from balsam.scheduler.Scheduler
            return False
        try:
            return bool(hook(status))
        except Exception as exc:  # a driver's fault must not stop the cycle: the job then may take nodes
            self._report_once(f"scheduler driver's waits_for_other_than_nodes failed: {type(exc).__name__}: {exc}")
            return False

    def submit_time_unknown(self, status: Any) -> bool:
        """Whether its driver says the scheduler did not give this queued job's submit time
        (``Scheduler.submit_time_unknown``): its queued_time_min 0 means unknown. Asked of jobs it
        did not make only: it knows the age of its own requests (``age_min``); one of them taken
        for unknown claimed no window, and the same window was requested again."""
        hook = getattr(self.scheduler, "submit_time_unknown", None)
        if hook is None:  # a scheduler object not derived from balsam.scheduler.Scheduler
            return False
        try:
            return bool(hook(status))
        except Exception as exc:  # a driver's fault must not stop the cycle
            self._report_once(f"scheduler driver's submit_time_unknown failed: {type(exc).__name__}: {exc}")
            return False

    def never_starts(self, status: Any) -> str:
        """The scheduler's reason when its driver says this queued job can never start as
        submitted (``Scheduler.never_starts``), else ""."""
        try:
            never = bool(self.scheduler.never_starts(status))
        except Exception as exc:  # a driver's fault must not stop the cycle: the job then may start
            self._report_once(f"scheduler driver's never_starts failed: {type(exc).__name__}: {exc}")
            return ""
        return (str(getattr(status, "message", "") or "") or "no reason given") if never else ""

    def read_windows(self) -> tuple[Optional[tuple[BackfillWindow, ...]], str]:
        self._window_pools = None
        if not self.options.use_backfill or not self.strategy.uses_backfill_windows:
            return (), ""
        try:
            windows = self.scheduler.get_backfill_windows() or {}
        except Exception as exc:
            return None, str(exc)
        # A driver may say which node pools the windows' nodes are in (a ``node_pools`` attribute
        # of the mapping: Slurm's partitions under queue_flag --qos), for read_others_waiting.
        pools = getattr(windows, "node_pools", None)
        if isinstance(pools, (tuple, list, set, frozenset)):
            self._window_pools = frozenset(str(p) for p in pools)
        found: list[BackfillWindow] = []
        # A driver may name its "usable from any queue" key (PBS's any_queue_key option).
        any_queue = str(getattr(getattr(self.scheduler, "options", None), "any_queue_key", ANY_QUEUE) or ANY_QUEUE)
        for key in dict.fromkeys((self.options.submit_queue, any_queue, ANY_QUEUE)):
            for w in windows.get(key, ()):
                found.append(w if isinstance(w, BackfillWindow) else
                             BackfillWindow(num_nodes=int(w["num_nodes"]), wall_time_min=int(w["wall_time_min"])))
        return tuple(found), ""

    def snapshot(self) -> Snapshot:
        rows, others = self.read_batch_jobs()
        running_count, running_footprint = self.read_running(rows)
        backlog = attrs.evolve(self.read_backlog(), running_count=running_count, running_footprint=running_footprint)
        queued = BatchJobState.queued.value
        self._polled = any(r["state"] == queued for r in rows + others)
        poll = self._poll = self.read_poll() if self._polled else None
        self.poll_failed = self._polled and poll is None  # read_poll's None: it failed (and warned)
        self._site_scheduler_ids = {int(r["scheduler_id"]) for r in rows + others if r.get("scheduler_id") is not None}
        self.left_over_ids = {int(r["id"]): BatchJobState(r["state"]) for r in others if self.left_over(r, poll)}
        windows, error = self.read_windows()
        submitted = [int(r["id"]) for r in rows if r.get("scheduler_id") is not None and self.own(r)]
        self._queue_ids = {int(r["scheduler_id"]) for r in rows if r.get("scheduler_id") is not None}
        self._newest_submitted = max([self._newest_submitted, *submitted])
        active = {int(r["id"]) for r in rows if self.own(r)}
        if self._own_active - active:
            self._own_ended_since_read = True
        self._own_active = active
        views = tuple(self.view(r, poll) for r in sorted(rows, key=lambda r: r["id"]))
        seen = {v.id for v in views}
        for gone in [i for i in self._first_seen if i not in seen]:
            del self._first_seen[gone]
        return Snapshot(batch_jobs=views, backlog=backlog, windows=windows, windows_error=error,
                        project=self.options.submit_project, min_nodes=max(1, self.queue_limit("min_nodes") or 1))

    # -- one cycle ---------------------------------------------------------------------------------
    def run_cycle(self) -> Optional[float]:
        snapshot = self.snapshot()
        # Every cycle, submitting or not: a backlog that went 2 -> 0 -> 2 identical jobs between two
        # submitting cycles is a new one (its jobs were run), not the same. Whole seconds: the
        # start times it is compared with (a scheduler's) have no fraction, and a launcher started
        # in that second acquires seconds later, under these numbers.
        self.churn.observe(backlog_key(snapshot.backlog), utcnow().replace(microsecond=0))
        decision = self.strategy.decide(snapshot)
        if any(not request.regular_queue for request in decision.submit) and self.strategy.uses_backfill_windows:
            # Another site of the user (or a job by hand) may wait for the same window: read only now.
            others = self.read_others_waiting(snapshot)
            if others:
                snapshot = attrs.evolve(snapshot, others_waiting=others)
                decision = self.strategy.decide(snapshot)
        if decision.submit:
            # Requests the scheduler refused for good (a QOS's per-job node limit) would be refused
            # again: a new submit_failed BatchJob and a scheduler call every cycle. Read only now.
            failed = self.read_submit_failed()
            refused = self.read_refused(failed)
            if refused:
                snapshot = attrs.evolve(snapshot, refused=refused)
                decision = self.strategy.decide(snapshot)
                self.report_refused(snapshot)
            if decision.submit:
                why = (self.held_in_queue(snapshot, decision) or self.submit_backoff(failed)
                       or self.churn_backoff(snapshot))
                if why:
                    decision = attrs.evolve(decision, submit=(), reason=f"{decision.reason}; {why}")
        self.last_decision = decision
        # At INFO when it acts or differs from the last cycle's, else at DEBUG with an hourly INFO
        # "still" line: an idle agent wrote 1,440 identical INFO lines a day at service_period 60.
        self.cycle_log.log(self.strategy.name, decision, self.cycle_note(snapshot),
                           clock_figures=self.strategy.clock_figures)
        backlog = snapshot.backlog
        if backlog.unfit_count:
            # Logged once per distinct reason: at ERROR when nothing runnable fits (no BatchJob is
            # submitted for those jobs until settings.yml or the jobs change).
            self._report_once(f"runnable jobs its BatchJobs can never run: {backlog.unfit_reason}",
                              error=not backlog.runnable_count)
        for b in snapshot.batch_jobs:
            if b.reserving and b.never_starts:
                # Once per BatchJob (and reason); it is left queued: a user or an administrator
                # decides (a limit may be raised), and the module never deletes what it did not
                # cancel as stale.
                queue = self.options.submit_queue
                held = (", and no BatchJob as large is requested while it waits" if b.project == snapshot.project
                        else f" (project {b.project!r}: the elastic queue's, {snapshot.project!r}, is not held back)")
                self._report_once(
                    f"BatchJob {b.id} ({b.num_nodes} nodes x {b.wall_time_min} min in queue {queue!r}) can never start: "
                    f"the scheduler says {b.never_starts!r}. It is not counted as capacity{held}. Make settings.yml scheduler.allowed_queues.{queue}.max_nodes and "
                    f"max_walltime (and elastic_queue.max_num_nodes, max_wall_time_min) no larger than the "
                    f"partition's limits, check the project may use the queue, then remove it: "
                    f"balsam queue term --id {b.id}")
        owned = {b.id for b in snapshot.batch_jobs if b.owned}
        foreign = [i for i in decision.cancel if i not in owned]
        if foreign:
            self._report_once(f"strategy {self.strategy.name!r} asked to cancel BatchJob(s) the elastic queue did not "
                              f"create ({', '.join(map(str, foreign))}): left alone")
        # Its requests left in a former submit_queue go in the same read-again and PATCH.
        was = {**{b.id: b.state for b in snapshot.batch_jobs}, **self.left_over_ids}
        # One withdrawn by an earlier cycle is the scheduler module's to delete now: not withdrawn again.
        withdrawn = {b.id for b in snapshot.batch_jobs if b.withdrawn}
        cancel = self.still_cancellable(snapshot, [i for i in decision.cancel if i in owned and i not in withdrawn]
                                        + list(self.left_over_ids), was=was)
        for i in (i for i in cancel if i in self.left_over_ids):
            self.logger.warning("BatchJob %s, requested by the elastic queue in another queue than submit_queue %r "
                                "(settings.yml elastic_queue.submit_queue changed since), had not started: "
                                "withdrawn", i, self.options.submit_queue)
        self.last_cancelled = tuple(cancel)
        if cancel:
            bulk_patch(self.client, "/batch-jobs/", [self.withdrawal(i) for i in cancel])
        for request in decision.submit:
            blocked = snapshot.never_starting_as_large(request.num_nodes, request.wall_time_min)
            if blocked is not None:  # a strategy that does not check it (the built-in ones do)
                self._report_once(f"strategy {self.strategy.name!r} requested {request.num_nodes} nodes x "
                                  f"{request.wall_time_min} min: not created, {never_starts_reason(blocked)}")
                continue
            body = {
                "site_id": self.site_id,
                "project": self.options.submit_project,
                "queue": self.options.submit_queue,
                "num_nodes": request.num_nodes,
                "wall_time_min": request.wall_time_min,
                "job_mode": self.options.job_mode,
                "filter_tags": self.filter_tags(),
                "status_info": {REQUEST_KIND: REGULAR_QUEUE if request.regular_queue else self.strategy.name,
                                CREATED_AT: utcnow().isoformat(), SUBMITTED_BY_KEY: SUBMITTED_BY},
            }
            refused = self.fit_to_site_rules(body)
            if refused:
                self._report_once(f"no BatchJob created: {refused} (settings.yml scheduler: / elastic_queue:)", error=True)
                continue
            created = self.client.post("/batch-jobs/", json=body)
            if (created or {}).get("id") is not None:
                self._own_active.add(int(created["id"]))  # ended before the next snapshot: still read
            self.logger.info("created BatchJob %s (%d nodes x %d min in %s%s)", (created or {}).get("id"),
                             body["num_nodes"], body["wall_time_min"], self.options.submit_queue,
                             ", regular queue" if request.regular_queue else "")
        return None

    def withdrawal(self, batch_job_id: int) -> dict[str, Any]:
        """The PATCH that withdraws one of :meth:`still_cancellable`'s BatchJobs. One waiting for its
        submission goes pending_deletion (no job of it is in the scheduler). A queued one only gets
        ``status_info[WITHDRAW_IF_QUEUED]``, sent as ``status_info_merge`` (the server adds the key
        under the row's lock and keeps the others: the whole status_info re-sent from the copy read
        again just before lost the keys a launcher or the scheduler module wrote in between): the
        scheduler module deletes it only if its own status poll, in its next cycle, shows it still
        waiting. Marked pending_deletion from this cycle's poll, a request that started before then
        (up to sync_period later) was deleted with its launcher and the jobs it had leased: a
        BatchJob once pending_deletion can only finish."""
        row = self._reread.get(batch_job_id) or {}
        if row.get("state") != BatchJobState.queued.value:
            return {"id": batch_job_id, "state": BatchJobState.pending_deletion.value}
        return {"id": batch_job_id, "status_info_merge": {WITHDRAW_IF_QUEUED: f"{utcnow().isoformat()} by {SUBMITTED_BY}"}}

    def still_cancellable(self, snapshot: Snapshot, cancel: list[int],
                          was: Optional[Mapping[int, BatchJobState]] = None) -> list[int]:
        """Of ``cancel``, those still in the state the snapshot read them in, read again just before
        the PATCH (one ``GET /batch-jobs/?id=…`` per :data:`MAX_IDS_PER_REQUEST`, one in practice).
        The snapshot's BatchJobs were read before the status poll and the backfill windows (seconds
        of scheduler commands): meanwhile the scheduler module may have submitted one that waited in
        pending_submission (a hold lifted, or its normal submission), or a launcher started one that
        was queued. The server lets such a BatchJob move to pending_deletion, and the scheduler
        module then deleted an allocation that was queued, or running. Those are kept, and said so.
        ``was``: the states the snapshot read (default: its BatchJobs')."""
        if not cancel:
            return []
        was = dict(was) if was is not None else {b.id: b.state for b in snapshot.batch_jobs}
        now: dict[int, str] = {}
        self._reread = {}
        for start in range(0, len(cancel), MAX_IDS_PER_REQUEST):
            ids = cancel[start:start + MAX_IDS_PER_REQUEST]
            rows = (self.client.get("/batch-jobs/", params={"id": ids, "limit": len(ids)}) or {}).get("results") or []
            now.update({int(r["id"]): r["state"] for r in rows})
            self._reread.update({int(r["id"]): r for r in rows})
        kept = []
        for i in cancel:
            before = was[i].value
            if now.get(i) == before:
                kept.append(i)
            else:
                self.logger.info("BatchJob %s not cancelled: it was %s when this cycle read it, and is %s now "
                                 "(it may have been submitted or started since)", i, before, now.get(i, "gone"))
        return kept

    def report_refused(self, snapshot: Snapshot) -> None:
        """One ERROR line per BatchJob of its project the scheduler refused, with the scheduler's words."""
        queue = self.options.submit_queue
        for b in snapshot.refused:
            if b.project != snapshot.project:
                continue  # another project (submit_project changed since): holds nothing back
            self._report_once(
                f"BatchJob {b.id} ({b.num_nodes} nodes x {b.wall_time_min} min in queue {queue!r}, project "
                f"{b.project!r}) was refused by the scheduler: {b.never_starts}. No BatchJob at least as large is "
                f"requested for this project and queue while the agent runs (for {REFUSAL_MEMORY_MIN // 60} h at "
                f"most); smaller ones still are. {REFUSAL_ADVICE}", error=True)

    def cycle_note(self, snapshot: Snapshot) -> str:
        """What the cycle's decision line ends with: `` | poll=failed`` when this cycle's status
        poll failed (its WARNING says why), then :meth:`held_note`. Part of the line compared
        (cycle_log), so that the first cycle whose poll fails and the first whose poll works again
        are logged at INFO: without it a recovery changed no figure, and the line stayed at DEBUG
        after the warnings stopped."""
        return (" | poll=failed" if self.poll_failed else "") + self.held_note(snapshot)

    def held_note(self, snapshot: Snapshot) -> str:
        """For the cycle's INFO line: the BatchJobs the scheduler module holds back in
        pending_submission (a queue at a scheduler limit), which count as capacity but are not
        coming yet, and the scheduler module's words for the first."""
        held = [b for b in snapshot.batch_jobs if b.held]
        if not held:
            return ""
        return f" | held={len(held)} (BatchJob {held[0].id}: {held[0].held})"

    def _report_once(self, message: str, error: bool = False) -> None:
        # Keyed by level too: a reason first logged as a warning is logged again when it turns fatal.
        if (error, message) not in self._reported:
            self._reported.add((error, message))
            (self.logger.error if error else self.logger.warning)("%s", message)

    def fit_to_site_rules(self, body: dict) -> Optional[str]:
        """Clamp ``body`` to the submit queue's ``max_nodes`` / ``max_walltime`` (the most the site
        allows, which a user who set larger elastic limits would take), raise it to the queue's
        ``min_nodes`` where one is set (optional: read when the queue's limits carry it), then check it with the
        scheduler module's rules; the reason it would be refused, or None. A refused BatchJob is
        not created: the scheduler module would mark it submit_failed, and the next cycle would
        create another."""
        rules = getattr(getattr(self.site_config, "settings", None), "scheduler", None)
        if rules is None:
            return None  # no scheduler section: no rules to check against (nothing submits them either)
        allowed_queues = getattr(rules, "allowed_queues", None) or {}
        limits = allowed_queues.get(body["queue"])
        if limits is not None:
            for field, limit_name in (("num_nodes", "max_nodes"), ("wall_time_min", "max_walltime")):
                limit = int(limits[limit_name] if isinstance(limits, Mapping) else getattr(limits, limit_name))
                if body[field] > limit:
                    self._report_once(f"{field} {body[field]} clamped to the {limit_name} {limit} of queue {body['queue']!r} "
                                      f"(settings.yml scheduler.allowed_queues)")
                    body[field] = limit
            # A queue's minimum (Polaris prod: 10 nodes; optional, 1 when not set): the scheduler
            # refuses a smaller job, so the request is raised to it.
            low = limits.get("min_nodes") if isinstance(limits, Mapping) else getattr(limits, "min_nodes", None)
            if low is not None and body["num_nodes"] < int(low):
                self._report_once(f"num_nodes {body['num_nodes']} raised to the min_nodes {int(low)} of queue "
                                  f"{body['queue']!r} (settings.yml scheduler.allowed_queues)")
                body["num_nodes"] = int(low)
        try:
            check_batch_job(body, allowed_queues, getattr(rules, "allowed_projects", None) or [],
                            getattr(rules, "optional_batch_job_params", None) or {})
        except BatchJobRefused as exc:
            return str(exc)
        return None

    def describe(self) -> str:
        return f"{self.name} (strategy {self.strategy.name}, every {self.period:g} s)"


def _polled_state(status: Any) -> Optional[BatchJobState]:
    """The state a driver's status record gives (None: no record, or a state it does not know)."""
    state = getattr(status, "state", None)
    try:
        return BatchJobState(getattr(state, "value", state)) if state is not None else None
    except ValueError:
        return None


def _withdrawn(row: Mapping) -> bool:
    """A queued BatchJob withdrawn by an earlier cycle, not yet deleted nor seen started by the
    scheduler module (see :meth:`ElasticQueueModule.withdrawal`)."""
    return row.get("state") == BatchJobState.queued.value and WITHDRAW_IF_QUEUED in (row.get("status_info") or {})


#: status_info keys that say why a BatchJob ended, quoted by the churn guard's ERROR: the
#: launcher's notes (``error``, ``launcher``, ``nodes_out``), the launcher's last Error line and the
#: scheduler's end state and words (``launcher_error``, ``scheduler_state``, ``scheduler_message``,
#: written by the scheduler module: a node failure shows there).
ENDING_NOTE_KEYS = ("error", "launcher_error", "launcher", "nodes_out", "scheduler_state", "scheduler_message")


def _ending_notes(info: Mapping) -> str:
    """``info``'s :data:`ENDING_NOTE_KEYS` that are set, as ``key 'value'; ...`` ("" when none)."""
    return "; ".join(f"{key} {str(info[key])!r}" for key in ENDING_NOTE_KEYS if info.get(key))


def _count(rows: list[Mapping]) -> int:
    return sum(int(r["count"]) for r in rows)


def _runnable_backlog(rows: list[Mapping], footprint: str) -> Backlog:
    """The runnable numbers of a backlog answer's runnable states' rows (``footprint``: the field
    of the node footprint, see :meth:`ElasticQueueModule.footprint_key`)."""
    if not rows:
        return Backlog()
    oldest = min((parse_datetime(r["oldest_last_update"]) for r in rows if r.get("oldest_last_update")), default=None)
    return Backlog(
        runnable_count=_count(rows),
        runnable_footprint=sum(float(r[footprint]) for r in rows),
        min_runnable_nodes=min(int(r["min_num_nodes"]) for r in rows),
        max_runnable_nodes=max(int(r["max_num_nodes"]) for r in rows),
        min_runnable_wall_time_min=min(int(r.get("min_wall_time_min") or 0) for r in rows),
        oldest_runnable_wait_min=_minutes_since(oldest),
    )


def _minutes_since(when: Any) -> float:
    return max(0.0, (utcnow() - when).total_seconds() / 60) if when is not None else 0.0
