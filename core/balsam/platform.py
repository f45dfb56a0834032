"""The platform driver contract (entry-point group ``balsam.platforms``).

A platform describes one kind of machine: how a launcher finds the nodes of its allocation and
their CPU and GPU ids, how an MPI job's command line is built (``mpiexec``, ``srun``, ``aprun``...),
how GPUs are made visible to a process (``CUDA_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``...), and the
defaults that ``balsam site init`` writes into ``settings.yml`` for it. Supporting a new machine
means writing a platform plugin, never editing the core.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence

import attrs

from .options import NoOptions, build_options
from .util import first_warning, to_tuple

__all__ = [
    "LaunchLimit", "LaunchSpec", "NodeInfo", "NvidiaDevices", "Platform", "capped_threads_per_core", "cpu_bind_list",
    "deliver_signal",
    "cpu_domains_of",
    "cpu_ids_beyond_cores_errors",
    "checked_launch_param",
    "cpu_ids_errors", "cuda_visible_only", "file_mtime", "first_launch_param", "format_id_ranges", "gpu_cpu_map_errors", "hardware_thread_ids",
    "hosts_from_node_file", "is_mig_id", "job_cpu_bind", "launch_option", "launch_option_name", "launch_param_args",
    "launch_param_owner",
    "launch_param_words",
    "launch_params_to_pass", "leading_job_number", "near_cpus_of",
    "nvidia_smi_list", "nvidia_smi_note", "parse_gpu_cpu_map", "parse_id_ranges", "parse_nvidia_smi_list", "pick_cpu_binding",
    "read_fresh_gpu_list", "read_node_file", "split_launch_params", "launch_param_value",
    "PALS_RESERVED_OPTIONS", "HYDRA_RESERVED_OPTIONS", "OPENMPI_RESERVED_OPTIONS",
]

logger = logging.getLogger("balsam.platform")


def _id_groups(value: Iterable[Iterable[Any]]) -> tuple[tuple[str, ...], ...]:
    # From JSON (the serial workers' config, BALSAM_LAUNCHER_NODELIST) the groups come back as lists.
    return tuple(tuple(str(g) for g in group) for group in value)


def _gpu_cpu_pairs(value: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # A mapping or (gpu, cpus) pairs; from JSON the pairs come back as lists.
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(gpu), tuple(int(c) for c in cpus)) for gpu, cpus in items)


@attrs.frozen
class NodeInfo:
    """One compute node of the allocation, as the platform discovered it."""

    node_id: str
    hostname: str
    cpu_ids: tuple[int, ...] = attrs.field(converter=to_tuple)
    gpu_ids: tuple[str, ...] = attrs.field(converter=to_tuple, factory=tuple)
    #: GPU ids that are parts of one physical device (Aurora: the two tiles of one GPU,
    #: ``(("0.0", "0.1"), ("1.0", "1.1"), ...)``); empty when every GPU id is a whole device. The
    #: node manager gives a request of a multiple of a group's size whole groups when it can, and
    #: a smaller one the free part of a half-used group first, so that whole devices stay free.
    gpu_groups: tuple[tuple[str, ...], ...] = attrs.field(converter=_id_groups, factory=tuple)

    @gpu_groups.validator
    def _check_groups(self, _attribute: Any, groups: tuple[tuple[str, ...], ...]) -> None:
        seen: set[str] = set()
        for group in groups:
            for gpu in group:
                if gpu not in self.gpu_ids:
                    raise ValueError(f"node {self.hostname}: gpu_groups names {gpu!r}, which is not one of its gpu_ids")
                if gpu in seen:
                    raise ValueError(f"node {self.hostname}: gpu_groups names {gpu!r} twice")
                seen.add(gpu)

    #: The CPU ids nearest each GPU id (its NUMA domain or socket), as ``(gpu id, cpu ids)`` pairs;
    #: empty when the platform does not know. The node manager then gives a GPU job CPUs near its
    #: GPUs, a job a GPU whose near CPUs are idle, and a CPU-only job CPUs away from idle GPUs.
    gpu_cpus: tuple[tuple[str, tuple[int, ...]], ...] = attrs.field(converter=_gpu_cpu_pairs, factory=tuple)

    @gpu_cpus.validator
    def _check_gpu_cpus(self, _attribute: Any, pairs: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
        seen: set[str] = set()
        for gpu, _cpus in pairs:
            if gpu not in self.gpu_ids:
                raise ValueError(f"node {self.hostname}: gpu_cpus names {gpu!r}, which is not one of its gpu_ids")
            if gpu in seen:
                raise ValueError(f"node {self.hostname}: gpu_cpus names {gpu!r} twice")
            seen.add(gpu)


@attrs.frozen
class LaunchSpec:
    """What the launcher decided for one job run: where it goes and how it is laid out."""

    cmdline: str  #: the app's shell command line (already rendered and quoted)
    hostnames: tuple[str, ...] = attrs.field(converter=to_tuple)
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    threads_per_core: int = 1
    gpus_per_rank: float = 0.0
    #: CPU ids assigned on each node (empty tuples when whole nodes are assigned).
    cpu_ids: tuple[tuple[int, ...], ...] = attrs.field(converter=lambda v: tuple(tuple(x) for x in v), factory=tuple)
    #: GPU ids assigned on each node.
    gpu_ids: tuple[tuple[str, ...], ...] = attrs.field(converter=lambda v: tuple(tuple(x) for x in v), factory=tuple)
    launch_params: Mapping[str, str] = attrs.field(factory=dict)
    #: Environment variables set for this job beyond those the launcher inherited (its GPU ids,
    #: OMP_NUM_THREADS, the app's variables), for MPI launchers that forward only what they are
    #: told to (Open MPI's ``-x NAME``). The job's process already has them in its environment.
    env_names: tuple[str, ...] = attrs.field(converter=to_tuple, factory=tuple)
    #: The job and its app, when the run is a job's (None for the serial-mode workers): named in the
    #: warnings about its launch params (:func:`launch_params_to_pass`), given once per app.
    job_id: Optional[int] = None
    app_id: Any = None
    #: The job has its nodes to itself (several nodes, or one it occupies whole: node_packing_count
    #: 1), whatever CPU ids it was given: a platform may spread its ranks over the whole node.
    whole_nodes: bool = False

    @property
    def num_nodes(self) -> int:
        return len(self.hostnames)

    @property
    def num_ranks(self) -> int:
        return self.ranks_per_node * max(1, len(self.hostnames))

    @property
    def cpus_per_rank(self) -> int:
        assigned = len(self.cpu_ids[0]) if self.cpu_ids and self.cpu_ids[0] else 0
        per_rank = assigned // max(1, self.ranks_per_node) if assigned else 0
        return max(per_rank, self.threads_per_rank // max(1, self.threads_per_core), 1)


class Platform(abc.ABC):
    """Base class of platform drivers."""

    #: Driver name used in settings.yml (``launcher: {platform: aurora}``) and ``site init --platform``.
    name: ClassVar[str] = ""
    #: One line shown by ``balsam site init`` when picking a platform.
    description: ClassVar[str] = ""
    #: Scheduler driver this machine uses unless settings.yml says otherwise.
    default_scheduler: ClassVar[str] = "local"
    #: Whether several MPI runs may share one node (mpi mode node packing).
    mpirun_allows_node_packing: ClassVar[bool] = True
    #: True when the launcher runs on a compute node of the allocation (not on a service node that
    #: must reach the compute nodes through an MPI launcher, like aprun on Theta): then serial mode
    #: on a one-node partition of the launcher's own node starts its master without MPI, inside
    #: the launcher process (faster start-up; no mpi4py needed). Other partitions start one worker
    #: per node with :meth:`mpi_command_line`, and serial mode checks it got exactly that.
    serial_workers_without_mpi: ClassVar[bool] = False
    #: The attrs class of this driver's options (``launcher.platform_options`` in settings.yml).
    options_schema: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = build_options(self.options_schema, options, where="launcher.platform_options")

    # -- inside an allocation -----------------------------------------------------------------
    @abc.abstractmethod
    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        """The nodes of the current allocation (from ``$PBS_NODEFILE``, ``$SLURM_NODELIST``...)."""

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        """The scheduler id of the allocation this process runs in, if the environment tells it."""
        return None

    @abc.abstractmethod
    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        """The MPI launcher's arguments that go in front of the app command (``mpiexec -n 4 ...``)."""

    def mpi_command_line(self, spec: LaunchSpec) -> str:
        """The full shell line that starts ``spec`` under MPI."""
        return f"{shlex.join(self.mpi_launch_args(spec))} {spec.cmdline}"

    def gpu_environment(self, gpu_ids: Sequence[str]) -> dict[str, str]:
        """Environment variables that make exactly ``gpu_ids`` visible to a process."""
        if not gpu_ids:
            return {}
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))}

    def job_environment(self, gpu_ids: Sequence[str]) -> dict[str, str]:
        """The variables this platform sets for a job that was given ``gpu_ids`` on its node (none: a
        CPU-only job, or a multi-node job, which owns whole nodes and sees every GPU).

        The default: :meth:`gpu_environment` of the ids, nothing without ids. A platform whose jobs
        must all run under some setting, GPUs or not (Aurora's Level Zero device hierarchy, option
        ``device_hierarchy``), returns it here for every job.

        What this returns are the job's GPU visibility variables: they replace the app's own
        variables of the same names (one warning per job names each replaced one), and a job with a
        shell preamble gets them set again after the preamble, which runs first in the same shell
        (a ``module load`` or an ``export`` there would otherwise change which devices the job, or
        the ``mpiexec --envall`` after it, sees)."""
        return self.gpu_environment(gpu_ids) if gpu_ids else {}

    def whole_node_environment(self, spec: LaunchSpec) -> dict[str, str]:
        """The GPU visibility variables of a job on whole nodes without GPU ids (a multi-node job
        asking for GPUs), which :meth:`job_environment` cannot tell from a CPU-only job: none by
        default (the job sees every GPU). A platform that sets some (Aurora: the mask of all of a
        node's tiles) puts them on the job's MPI launcher line itself (:meth:`mpi_launch_args`), so
        they hold in every rank; the launcher asks for them too (``spec`` without ``env_names``),
        to name the app's own variables they replace in its warning, as for :meth:`job_environment`."""
        return {}

    # -- on the login node (site init) --------------------------------------------------------
    @classmethod
    def recognizes(cls, hostname: str, env: Mapping[str, str]) -> bool:
        """Whether this is the machine the driver is for (``site init`` proposes it first)."""
        return False

    def settings_defaults(self) -> dict[str, Any]:
        """Values that ``balsam site init`` writes into settings.yml over the generic defaults.

        A nested dict in settings.yml shape, e.g.
        ``{"scheduler": {"name": "pbs", "allowed_queues": {...}}, "launcher": {...}}``.
        """
        return {}

    def job_template(self) -> Optional[str]:
        """A job-template.sh (Jinja2) for this machine, or None to use the scheduler's default."""
        return None

    # -- serial mode ----------------------------------------------------------------------------
    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        """Launch params that start the serial-mode workers (one rank per node) unbound, free to pin
        their tasks to any CPU of their node; ``{}`` when this MPI launcher binds nothing unless told.

        ``launcher.serial_mode_startup_params: {cpu_affinity: none}`` (the settings default, Balsam
        0.7's value) is replaced by these params. None (the default): the platform does not know;
        the key is then left out of the line, as before, and the launcher's own default binding
        applies (``aprun`` binds with ``-cc depth``, ``srun`` to ``--cpus-per-task``, Open MPI to
        a core).
        """
        return None

    #: Whether :class:`NodeInfo` ``cpu_ids`` are cores whose sibling hardware threads the binding adds
    #: (a job then needs ``threads / threads_per_core`` ids per node), rather than hardware threads
    #: (one id per thread: the default platform's logical CPUs). Goes with :meth:`task_cpu_ids`.
    cpu_ids_are_cores: ClassVar[bool] = False
    #: Hardware threads of one core, where ``cpu_ids_are_cores`` (0: not known, no cap). A job's
    #: ``threads_per_core`` above it (the API takes any positive value; Balsam 0.7 allowed up to 4,
    #: a KNL's) is capped at it in its core count, its MPI binding and its serial-mode pinning alike
    #: (:func:`capped_threads_per_core`), with one warning per app and value in each launcher
    #: process: uncapped, the binding named CPUs the node does not have and the job got too few
    #: cores. The launcher hands this attribute to its node manager (the one source of the cap).
    hardware_threads_per_core: ClassVar[int] = 0

    def task_cpu_ids(self, cpu_ids: Sequence[int], threads_per_core: int) -> tuple[int, ...]:
        """The CPU ids a serial-mode task is pinned to, given the ``cpu_ids`` (cores) it was
        assigned and its ``threads_per_core``: a platform whose CPU ids are cores adds their sibling
        hardware threads (see :func:`hardware_thread_ids`), as its MPI binding does. The default:
        ``cpu_ids`` as they are (CPU ids that are hardware threads already, as on the default
        platform)."""
        return tuple(cpu_ids)

    # -- limits of the machine ------------------------------------------------------------------
    def launch_limit(self) -> Optional["LaunchLimit"]:
        """The most MPI launches one batch job may make on this machine, or None for no limit.

        The mpi job mode stops acquiring jobs when it has started this many runs, lets the running
        ones finish and says why in its log and in the BatchJob's ``status_info``.
        """
        return None

    # -- ending runs ------------------------------------------------------------------------------
    def signal_runs(self, job_ids: Sequence[int], sig: int, timeout: Optional[float] = None) -> set[int]:
        """Deliver ``sig`` to the apps of these running mpi-mode jobs through the batch system, where
        signalling the MPI launcher's process group would not reach them as ``sig``; returns the job
        ids it was delivered to (the others are signalled as usual).

        At the launcher's own stop (wall time, idle, a stop request) mpi mode sends SIGTERM to each
        launch's process group, then SIGKILL after the grace. Slurm's ``srun`` does not forward that
        SIGTERM: it kills its step's tasks with SIGKILL at once, so an app never gets the SIGTERM
        that lets it save a checkpoint. A platform whose launcher behaves so delivers the signal here
        (Perlmutter: ``scancel --signal``); mpi mode then waits up to the grace for those runs to end
        before it signals the process groups of what is left. The default: delivered to none.

        Called on the launcher's loop thread at its stop: it must return within ``timeout`` seconds
        (the grace left: the batch system's kill does not wait; None: a few seconds), so every
        command it runs gets at most what is left of it, and should not raise (mpi mode logs what it
        raises as a warning and signals the process groups as before). Where runs outlive the grace,
        mpi mode calls it again with SIGKILL for those before it signals their groups."""
        return set()


def deliver_signal(platform: Any, job_ids: Sequence[int], sig: int, timeout: Optional[float] = None) -> set[int]:
    """``platform.signal_runs(job_ids, sig, timeout=timeout)`` as the launcher calls it: the job ids of
    ``job_ids`` it says it delivered ``sig`` to; none, with a warning, when it raised or returned
    something that is not a collection of ids (a platform object without the hook: none)."""
    hook = getattr(platform, "signal_runs", None)
    if hook is None or not job_ids:
        return set()
    try:
        delivered = hook(list(job_ids), sig, timeout=timeout)
        # Inside the try: a plugin returning True (not a set) must not raise into the launcher's stop.
        return set(delivered or ()) & set(job_ids)
    except Exception as exc:
        logger.warning("platform %s could not signal the runs (%s: %s); their process groups are signalled instead",
                       getattr(platform, "name", type(platform).__name__), type(exc).__name__, exc)
        return set()


@attrs.frozen
class LaunchLimit:
    """A machine's cap on MPI launches per batch job, and why it exists (shown to the user)."""

    max_launches: int
    reason: str



# -- helpers for platform drivers ---------------------------------------------------------------


def parse_id_ranges(text: str, *, where: str = "cpu_ids") -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> ``(0, 1, 2, 3, 8, 10, 11)`` (the notation of ``lscpu`` and cpusets)."""
    ids: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError(f"{where}: {part!r} is not a number or a range like 0-103") from None
        if last < first:
            raise ValueError(f"{where}: range {part!r} runs backwards")
        ids.extend(range(first, last + 1))
    if not ids:
        raise ValueError(f"{where}: no ids in {text!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: {text!r} names an id twice")
    return tuple(ids)


def parse_gpu_cpu_map(text: str, *, where: str = "gpu_cpus") -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    """``"3:0-7 2:8-15"`` or ``"0,1,2:0-51; 3,4,5:52-103"`` -> ``((("3",), (0, ..., 7)), ...)``: GPU ids
    and the CPU ids nearest them, entries separated by spaces or ``;``. Empty text: no entries."""
    entries: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    seen: set[str] = set()
    for entry in str(text).replace(";", " ").split():
        gpus_text, sep, cpus_text = entry.partition(":")
        gpus = tuple(g for g in gpus_text.split(",") if g)
        if not sep or not gpus or not cpus_text:
            raise ValueError(f"{where}: {entry!r} is not GPU ids:CPU ranges (like 3:0-7 or 0,1,2:0-51)")
        for gpu in gpus:
            if gpu in seen:
                raise ValueError(f"{where}: GPU {gpu!r} is named twice")
            seen.add(gpu)
        entries.append((gpus, parse_id_ranges(cpus_text, where=where)))
    return tuple(entries)


def gpu_cpu_map_errors(name: str, text: str) -> dict[str, str]:
    """An options ``validate()`` result for a :func:`parse_gpu_cpu_map` option."""
    try:
        parse_gpu_cpu_map(text)
    except ValueError as exc:
        return {name: str(exc)}
    return {}


def near_cpus_of(
    device_ids: Sequence[str],
    entries: Sequence[tuple[Sequence[str], Sequence[int]]],
    node_cpu_ids: Sequence[int],
    parent: Optional[Mapping[str, str]] = None,
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``NodeInfo.gpu_cpus`` for a node's device ids from :func:`parse_gpu_cpu_map` entries: a device
    named in an entry, or whose ``parent`` GPU is (a MIG instance, a tile), gets that entry's CPUs
    that jobs are placed on (``node_cpu_ids``). Devices no entry names get none."""
    placeable, parent = set(node_cpu_ids), parent or {}
    by_gpu = {gpu: tuple(c for c in cpus if c in placeable) for gpus, cpus in entries for gpu in gpus}
    pairs = []
    for device in device_ids:
        cpus = by_gpu.get(device, by_gpu.get(parent.get(device, device)))
        if cpus:
            pairs.append((device, cpus))
    return tuple(pairs)


def cuda_visible_only(
    nodes: Sequence[NodeInfo], env: Mapping[str, str], parent: Optional[Mapping[str, str]] = None
) -> list[NodeInfo]:
    """``nodes`` with only the GPU ids that ``CUDA_VISIBLE_DEVICES`` in the launcher's environment
    ``env`` lists (a MIG instance also when its ``parent`` GPU is listed), in the nodes' own order;
    their ``gpu_groups`` and ``gpu_cpus`` cut down to match. Unset: ``nodes`` as they are. Set (an
    allocation of part of a node: Slurm's ``--gpus=2``, a shared QOS), jobs must get only the GPUs
    it lists, which are all a job started from the launcher can see; ``""``, ``-1`` and
    ``NoDevFiles`` list none. Logged in one line when it sets anything; a value naming none of the
    nodes' ids (``GPU-<uuid>`` forms) leaves them as they are, with a warning.

    ``parent``: MIG UUID -> the index of the GPU it is part of, over all nodes (UUIDs are unique)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not any(node.gpu_ids for node in nodes):
        return list(nodes)
    listed = {g.strip() for g in visible.split(",")} - {"", "-1", "NoDevFiles"}
    parent = parent or {}
    known = {g for node in nodes for g in node.gpu_ids} | {parent.get(g) for node in nodes for g in node.gpu_ids}
    unknown = sorted(listed - known)
    if listed and len(unknown) == len(listed):
        # Another form (GPU-<uuid>): which of the nodes' ids it means is unknown; leaving every GPU
        # out would fail every GPU job as unsatisfiable.
        logger.warning("CUDA_VISIBLE_DEVICES=%s in the launcher's environment names none of the nodes' GPU ids (%s): "
                       "jobs get all of them", visible, ",".join(nodes[0].gpu_ids))
        return list(nodes)
    kept_nodes = []
    for node in nodes:
        kept = tuple(g for g in node.gpu_ids if g in listed or parent.get(g) in listed)
        if len(kept) != len(node.gpu_ids):
            groups = tuple(part for part in (tuple(g for g in group if g in kept) for group in node.gpu_groups) if part)
            node = attrs.evolve(node, gpu_ids=kept, gpu_groups=groups,
                                gpu_cpus=tuple((g, cpus) for g, cpus in node.gpu_cpus if g in kept))
        kept_nodes.append(node)
    logger.info(
        "CUDA_VISIBLE_DEVICES=%s in the launcher's environment: jobs get only the GPU ids it lists (%s: %s of %s)%s",
        visible, nodes[0].hostname, ",".join(kept_nodes[0].gpu_ids) or "none", ",".join(nodes[0].gpu_ids) or "none",
        f"; {','.join(unknown)} not among the nodes' GPU ids" if unknown else "",
    )
    return kept_nodes


def read_node_file(path: str) -> list[str]:
    """Host names of a PBS/Cobalt node file (one per line, or comma separated), each once, in order."""
    with open(path) as fh:
        # dict.fromkeys keeps the first of each in order in linear time: a list membership test per
        # host took about a second for a full-machine Aurora node file (10,624 hosts).
        return list(dict.fromkeys(fh.read().replace(",", " ").split()))


def cpu_ids_errors(text: str) -> dict[str, str]:
    """An options ``validate()`` result for a ``cpu_ids`` option: ``{}``, or ``{"cpu_ids": why}``."""
    try:
        parse_id_ranges(text)
    except ValueError as exc:
        return {"cpu_ids": str(exc)}
    return {}


def cpu_ids_beyond_cores_errors(text: str, cores: int, threads_per_core: int = 2) -> dict[str, str]:
    """``{"cpu_ids": why}`` when a ``cpu_ids`` option of core ids (``Platform.cpu_ids_are_cores``)
    names ids from ``cores`` on: those are the other hardware threads of cores ``0 ...`` (the
    node's logical CPUs, as ``lscpu`` lists them, are the easy mistake). Counted as cores, each
    physical core was handed to several jobs, and the binding at ``threads_per_core`` 2 or more
    named CPUs the node does not have. ``threads_per_core``: the node's hardware threads per core
    (2 on most nodes, 4 on a Xeon Phi). ``{}`` when ``cores`` is not known (0) or the text does not
    parse (see :func:`cpu_ids_errors`)."""
    try:
        threads = [i for i in parse_id_ranges(text) if i >= cores > 0]
    except ValueError:
        return {}
    if not threads:
        return {}
    if threads_per_core <= 2:
        added = f"core c's second hardware thread, c + {cores}, itself at threads_per_core=2"
    else:
        siblings = ", ".join(f"c + {cores * t}" for t in range(1, threads_per_core))
        added = f"core c's other hardware threads, {siblings}, itself by the job's threads_per_core"
    return {"cpu_ids": f"{format_id_ranges(threads)} are hardware threads, not cores: the ids are cores "
                       f"0-{cores - 1} (balsam adds {added})"}


def hosts_from_node_file(env: Mapping[str, str], variable: str, *, inside: str) -> list[str]:
    """Host names of the node file named by ``env[variable]`` (``PBS_NODEFILE``, ``COBALT_NODEFILE``).

    Raises ``RuntimeError`` when the variable is unset ("not inside ``inside``"), the file cannot be
    read, or it lists no nodes.
    """
    path = env.get(variable)
    if not path:
        raise RuntimeError(f"${variable} is not set: not inside {inside}")
    try:
        hosts = read_node_file(path)
    except OSError as exc:
        raise RuntimeError(f"cannot read ${variable} {path}: {exc.strerror or exc}") from None
    if not hosts:
        raise RuntimeError(f"${variable} {path} lists no nodes")
    return hosts


def leading_job_number(value: Optional[str]) -> Optional[int]:
    """The number a scheduler job id starts with (``"123.pbs-server"`` -> ``123``), else ``None``."""
    match = re.match(r"\s*(\d+)", value or "")
    return int(match.group(1)) if match else None


def first_launch_param(params: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """The value of the first of ``keys`` set (non-empty) in ``params``, else ``None``. Keys match in
    any spelling of their option (:func:`launch_option_name`: ``{"--depth=8": ""}`` is ``depth`` 8,
    see :func:`launch_param_value`), the rule :func:`launch_param_args` skips them by."""
    for name in dict.fromkeys(map(launch_option_name, keys)):
        for key, value in params.items():
            if launch_option_name(key) == name:
                value = launch_param_value(key, value)
                if value:
                    return value
    return None


def launch_param_owner(spec: "LaunchSpec", key: str) -> str:
    """Whose launch param ``key`` is, for a one-line error: ``launch param 'cpu_bind' of job 17 (app
    3)`` (the app's id: the spec has no name), or, for a spec of no job (the serial-mode workers'
    line), the setting it comes from: ``launcher.serial_mode_startup_params 'cpu-bind'`` (a job's
    words there read "(app None)" and named no setting)."""
    if spec.job_id is None:
        return f"launcher.serial_mode_startup_params {key!r}"
    app = "" if spec.app_id is None else f" (app {spec.app_id})"
    return f"launch param {key!r} of job {spec.job_id}{app}"


def checked_launch_param(spec: "LaunchSpec", keys: Sequence[str], problem_of: Callable[[str], Optional[str]],
                         what: str) -> Optional[str]:
    """The value of the first of ``keys`` (any spelling, in :func:`first_launch_param`'s order) the
    spec's launch params set, without the blanks around it (a blank value is not set, as for the
    platform option it overrides; nor is False, :func:`launch_param_words`' rule), or None. A value ``problem_of(value)`` finds a problem with raises
    ValueError in one line naming the key, its owner (:func:`launch_param_owner`), ``what`` it is not
    and the problem: the launcher fails that job (or its serial workers' start) instead of starting
    an MPI launcher that refuses the line at once, with its own message in job.out."""
    for name in dict.fromkeys(map(launch_option_name, keys)):
        for key, value in spec.launch_params.items():
            if launch_option_name(key) != name:
                continue
            value = launch_param_value(key, value)
            text = "" if value is None else str(value).strip()
            # False (the bool, or "false" in any case: how a job's False is stored) is not set, the
            # rule of launch_param_words (docs/launcher.md: {"opt": False} leaves the option out):
            # {"cpu_bind": False} failed the job ("got 'False'") where it had meant the default.
            # 0 is not: launch params reach a platform as strings, so a job's 0 is "0", which is a
            # binding for aprun -cc (CPU 0) and refused by name for a PALS --cpu-bind.
            if not text or text.lower() == "false":
                continue
            problem = problem_of(text)
            if problem:
                raise ValueError(f"{launch_param_owner(spec, key)} is not {what}: {problem}")
            return text
    return None


def launch_param_value(key: str, value: Any) -> Any:
    """The value a launch param gives its option: ``value``, or, when that is empty, the one written
    into the key (``{"--depth=8": ""}`` and ``{"--depth 8": ""}`` give ``"8"``)."""
    if value not in ("", None):
        return value
    parts = re.split(r"[=\s]", str(key).strip(), maxsplit=1)
    return parts[1].strip() if len(parts) == 2 else value


def launch_option(key: str, prefix: str = "--") -> str:
    """The option a ``launch_params`` key names: ``key`` as it is when it starts with ``-``, else
    ``-k`` for a single letter (``{"c": "8"}`` is ``-c 8``: short options take one dash with every
    launcher), else ``prefix`` + ``key``."""
    if key.startswith("-"):
        return key
    return f"-{key}" if len(key) == 1 else f"{prefix}{key}"


def launch_param_args(params: Mapping[str, Any], *, skip: Sequence[str] = (), prefix: str = "--") -> list[str]:
    """``launch_params`` as command-line options: ``key`` -> ``--key value`` (see :func:`launch_option`
    for the option's name); an empty or ``None`` value gives the option alone (a flag, such as
    ``{"exclusive": ""}`` -> ``--exclusive``), never an empty argument; a boolean gives a flag or
    nothing (:func:`launch_param_words`); ``skip`` keys left out, in any spelling of their option
    (:func:`launch_option_name`: ``skip=("depth",)`` leaves out ``"--depth"`` and ``"--depth=8"``
    too), the rule :func:`first_launch_param` finds them by."""
    skipped = {launch_option_name(k) for k in skip}
    args: list[str] = []
    for key, value in params.items():
        if skipped and launch_option_name(key) in skipped:
            continue
        args += launch_param_words(key, value, prefix)
    return args


def launch_param_words(key: str, value: Any, prefix: str = "--") -> list[str]:
    """The words one launch param puts on a launcher line (:func:`launch_param_args`): ``[option,
    value]``; ``[option]`` for an empty or ``None`` value and for True; ``[]`` for False (the flag
    is not given). ``{"verbose": True}`` was ``--verbose True``, which the launcher took for the
    program to run, or refused.

    True and False are recognised as they reach a platform: the bools, and the strings ``"True"``
    and ``"False"`` in any case, blanks around them ignored. launch_params is a map of strings, so a
    job's ``{"verbose": True}`` is stored as ``"True"`` (the client turns a number or a bool into its
    ``str``, as Balsam 0.7's pydantic did); ``balsam job create -lp verbose=true`` and a quoted
    ``"true"`` in settings.yml's ``serial_mode_startup_params`` give ``"true"``. No option of the
    launchers balsam drives (mpiexec, srun, aprun) takes a lone true or false as its value; one
    that did would be written whole in the key: ``{"--opt=true": ""}``."""
    word = value.strip().lower() if isinstance(value, str) else None
    if value is False or word == "false":
        return []
    option = launch_option(key, prefix)
    if value is True or word in ("true", "") or value is None:
        return [option]
    return [option, str(value)]


def launch_option_name(key: str) -> str:
    """The name of the option a ``launch_params`` key names, without its dashes or a value written
    into the key: every spelling :func:`launch_option` turns into that option (``"ppn"``, ``"-ppn"``,
    ``"--ppn"``, ``"--ppn=4"``) gives ``"ppn"``. Case is kept: ``srun -n`` and ``-N`` differ."""
    return re.split(r"[=\s]", str(key).strip().lstrip("-"), maxsplit=1)[0]


def split_launch_params(params: Mapping[str, Any], reserved: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(passed, refused)``: the ``params`` whose option (:func:`launch_option_name`, any spelling)
    is not one of the ``reserved`` option names (without dashes), and those whose option is."""
    names = set(reserved)
    passed: dict[str, Any] = {}
    refused: dict[str, Any] = {}
    for key, value in params.items():
        (refused if launch_option_name(key) in names else passed)[key] = value
    return passed, refused


#: PALS ``mpiexec --cpu-bind`` kinds taking no list: the keywords HPE documents, all of them (``cray
#: mpiexec --help``, "CPU BINDING": none; numa, socket, core, thread; depth; list; mask), which HPE's
#: own PALS launcher of Chapel also takes and no other (launch-pals.c refuses the rest as "not a valid
#: cpu assignment"); ``list:`` takes one CPU set per rank, colon-separated, ``mask:`` one hex mask per rank,
#: comma-separated as HPE documents it (colons taken too). ``verbose,``
#: may lead any of them (PALS reports the binding). ``thread`` (one hardware thread per rank) was
#: missing: the jobs of users who pass ``--cpu-bind thread`` failed.
PALS_CPU_BIND_KINDS = ("none", "core", "depth", "numa", "socket", "thread")
_CPU_RANGES = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_CPU_MASK = re.compile(r"(0x)?[0-9a-fA-F]+")


def pals_cpu_bind_problem(value: str) -> Optional[str]:
    """Why ``value`` is not a PALS ``--cpu-bind`` (None when it is one): ``none``, ``core``, ``depth``,
    ``numa``, ``socket``, ``thread``, ``list:<CPUs>:<CPUs>...`` (each rank's CPUs as comma-separated ids and
    ranges: ``list:1-8:9-16``, ``list:0-1,32-33:2-3,34-35``, what :func:`cpu_bind_list` builds) or
    ``mask:<hex>,<hex>...`` (one mask per rank). Checked when settings.yml is read: mpiexec refuses
    any other value, so every job of the launcher failed at its start.

    Masks: HPE's ``cray mpiexec`` (Cray-HPE/craycli, cray/modules/mpiexec/cli.py, "CPU BINDING")
    documents ``list`` as "colon-separated rangelists of CPUs" and ``mask`` as "comma-separated
    bitmasks of CPUs" (a mask holds no comma: a comma can only separate ranks); that
    ``mask:0xff,0xff00`` was refused here. Masks separated by ':', as list's ranks are, stay
    accepted: refusing a form PALS takes fails every job of the launcher, while a form it refuses
    still gets mpiexec's own error.

    ``verbose``: the same source gives the form as ``[verbose,]<keyword>[:arguments]`` and hands the
    text to the PALS service unparsed; no public source takes ``verbose`` alone (no keyword),
    after the keyword (``depth,verbose``) or twice (``verbose,verbose,depth``), nor a mask written
    ``0XFF`` (Chapel's launch-pals.c takes the bare keywords only): those stay refused."""
    text = str(value).strip()
    body = text[len("verbose,"):] if text.startswith("verbose,") else text
    kind, sep, sets = body.partition(":")
    forms = f"expected one of {', '.join(PALS_CPU_BIND_KINDS)}, list:<CPUs>[:<CPUs>...] or mask:<hex>[,<hex>...]"
    if not sep:
        if kind in PALS_CPU_BIND_KINDS:
            return None
        # A CPU id alone (a job's 0 arrives as "0"): PALS takes CPUs only after list:.
        hint = f" (CPUs are written list:{kind})" if kind.isdecimal() else ""
        return f"{forms}, got {value!r}{hint}"
    if kind == "list":
        parts, pattern, what, between = sets.split(":"), _CPU_RANGES, "CPU ids and ranges like 0-7,32-39", "':'"
    elif kind == "mask":
        parts, pattern, what, between = re.split(r"[,:]", sets), _CPU_MASK, "hex masks", "',' or ':'"
    else:
        return f"{forms}, got {value!r}"
    for index, part in enumerate(parts):
        if not pattern.fullmatch(part):
            return f"rank {index}'s CPUs {part!r} in {value!r} are not {what} (ranks separated by {between})"
        for low, _, high in (r.partition("-") for r in part.split(",") if kind == "list"):
            if high and int(high) < int(low):
                return f"range {low}-{high} in {value!r} runs backwards"
    return None


def pals_cpu_bind_errors(name: str, value: str, *, empty_ok: bool = True) -> dict[str, str]:
    """An options ``validate()`` result for a PALS ``--cpu-bind`` option (empty: the computed
    ``list:...``, when ``empty_ok``)."""
    if empty_ok and not str(value).strip():
        return {}
    problem = pals_cpu_bind_problem(value)
    return {name: problem} if problem else {}


def job_cpu_bind(spec: "LaunchSpec", keys: Sequence[str]) -> Optional[str]:
    """The job's own PALS ``--cpu-bind`` (its launch param, the first of ``keys`` in any spelling)
    without surrounding blanks (``' depth '`` went to mpiexec as one word, blanks and all), or None.
    A value PALS refuses (``depht``, ``Depth``, ``list:0-3:x``: the check the platforms' option
    ``cpu_bind`` gets in settings.yml) raises ValueError in one line naming the key, the job and its
    app (or the setting, for the serial workers' line) and the value: the launcher fails the job
    instead of starting an ``mpiexec`` that exits at once (on Aurora one of the ~1,000 launches a
    batch job has). Shared by the PALS platforms (Polaris, Aurora), through :func:`pick_cpu_binding`."""
    return checked_launch_param(spec, keys, pals_cpu_bind_problem, "a PALS --cpu-bind")


def non_negative_errors(options: Any, *names: str) -> dict[str, str]:
    """An options ``validate()`` result: ``{name: why}`` for each of ``names`` below 0 (an id
    offset or a count that mpiexec or the binding would get as it is)."""
    return {name: f"must be 0 or more, got {getattr(options, name)!r}"
            for name in names if getattr(options, name) < 0}


def serial_startup_param_warnings(platform: Any, params: Mapping[str, Any]) -> dict[str, str]:
    """``{key: why}`` for ``launcher.serial_mode_startup_params`` the serial workers' MPI launcher
    may not take (they go on its line as they are, ``cpu_affinity: none`` aside): the platform
    driver's own ``serial_startup_param_problems(params)`` where it has one, else a ``cpu_affinity``
    other than ``none``, which balsam passes on as ``--cpu_affinity``, an option the platform does
    not say its launcher has. For ``balsam site check-settings`` warnings: what a launcher takes is
    the machine's to say, so the file still loads."""
    own = getattr(platform, "serial_startup_param_problems", None)
    if callable(own):
        return dict(own(params) or {})
    value = params.get("cpu_affinity")
    if value is None or str(value).strip().lower() == "none":
        return {}
    return {"cpu_affinity": f"{value!r} goes to the serial workers' MPI launcher as --cpu_affinity {value}, an option "
                            f"platform {getattr(platform, 'name', '?')!r} does not document; none (the workers start "
                            "unbound and pin their own tasks) is the value balsam itself reads"}


def pals_serial_startup_param_problems(params: Mapping[str, Any], cpu_bind_keys: Sequence[str]) -> dict[str, str]:
    """:func:`serial_startup_param_warnings` for a PALS platform: its ``mpiexec`` has no
    ``--cpu_affinity`` (``none`` becomes its ``--cpu-bind none``), and a ``cpu-bind`` (any of
    ``cpu_bind_keys``) must be a PALS binding (:func:`pals_cpu_bind_problem`)."""
    found: dict[str, str] = {}
    affinity = params.get("cpu_affinity")
    if affinity is not None and str(affinity).strip().lower() != "none":
        found["cpu_affinity"] = (f"{affinity!r}: PALS mpiexec has no --cpu_affinity; none starts the workers "
                                 "unbound (--cpu-bind none), another binding is cpu-bind: <binding>")
    names = {launch_option_name(k) for k in cpu_bind_keys}
    for key, value in params.items():
        if launch_option_name(str(key)) in names:
            problem = pals_cpu_bind_problem(str(launch_param_value(str(key), value)))
            if problem:
                found[str(key)] = f"not a PALS --cpu-bind: {problem}"
    return found


#: The options an MPI launcher's line sets from balsam's placement, for
#: :func:`launch_params_to_pass`: the option names a launch param may spell them by (without dashes)
#: -> the option, per launcher (not per machine: every platform driving that launcher uses its map).
#: PALS ``mpiexec`` (HPE Cray PALS: Aurora, Sunspot, Polaris).
#: PALS ``--cpu-bind`` kinds laid out from core 0 of each node, whatever cores a job was assigned.
PALS_RELATIVE_BINDINGS = ("depth", "core")


def pals_binding_overlaps(spec: "LaunchSpec", bind: str, node_cpu_ids: Sequence[int]) -> bool:
    """Whether a job bound with PALS ``--cpu-bind`` ``bind`` runs elsewhere than on the cores it was
    assigned: a relative binding (depth, core) of a job given part of a node (node packing) that
    are not the node's first cores counted from core 0 (PALS does not know the cores a site left
    out of ``cpu_ids``): jobs packed on the node then overlap. Shared by the PALS platforms' warning."""
    assigned = set(spec.cpu_ids[0]) if spec.cpu_ids else set()
    if bind.split(":", 1)[0].strip().lower() not in PALS_RELATIVE_BINDINGS or not assigned:
        return False
    from_first_core = all(sorted(cores) == list(range(len(cores))) for cores in spec.cpu_ids)
    return not (assigned >= set(node_cpu_ids) or from_first_core)


PALS_RESERVED_OPTIONS: Mapping[str, str] = MappingProxyType({
    "n": "-n", "np": "-n", "ppn": "--ppn", "hosts": "--hosts", "host": "--hosts", "hostfile": "--hosts",
})
#: MPICH's hydra ``mpiexec``.
HYDRA_RESERVED_OPTIONS: Mapping[str, str] = MappingProxyType({
    "n": "-n", "np": "-n", "ppn": "-ppn",
    "hosts": "--hosts", "host": "--hosts", "f": "--hosts", "hostfile": "--hosts", "machinefile": "--hosts",
})
#: Open MPI's ``mpiexec``/``mpirun`` (the option is found on the line in any dash spelling:
#: ``-npernode`` as well as ``--npernode``).
OPENMPI_RESERVED_OPTIONS: Mapping[str, str] = MappingProxyType({
    "n": "-n", "np": "-n", "c": "-n", "npernode": "--npernode", "N": "--npernode",
    "host": "--host", "H": "--host", "hostfile": "--host", "machinefile": "--host", "default-hostfile": "--host",
})


def _option_value(args: Sequence[str], option: str) -> str:
    """``option value`` as it stands in ``args`` (a flag alone, or ``--option=value``; ``option`` in
    any dash spelling, :func:`launch_option_name`), clipped."""
    name = launch_option_name(option)
    for index, arg in enumerate(args[1:], start=1):
        if not arg.startswith("-") or launch_option_name(arg) != name:
            continue
        if "=" in arg:
            text = arg
        else:
            following = args[index + 1] if index + 1 < len(args) else ""
            text = f"{arg} {following}" if following and not following.startswith("-") else arg
        break
    else:
        return option
    return text if len(text) <= 120 else text[:117] + "..."


def launch_params_to_pass(
    spec: LaunchSpec, args: Sequence[str], reserved: Mapping[str, str], *,
    params: Optional[Mapping[str, Any]] = None, duplicates: Iterable[str] = (),
) -> dict[str, Any]:
    """The launch params a driver passes on after its own ``args`` (the launcher line it built from
    balsam's placement): ``params`` (default ``spec.launch_params``) without those that name one of
    its options, in any spelling (:func:`split_launch_params`).

    ``reserved``: the option names (without dashes) the driver sets from the placement (rank count,
    ranks per node, hosts or node list, node count) -> the option of ``args`` that sets it
    (``{"ppn": "--ppn", "n": "-n", "np": "-n", ...}``). Such a key is not passed: given twice,
    the launcher takes the last one or refuses the line, and either way the ranks do not run where
    balsam accounted for them (packed jobs on the same cores, a job on nodes given to another).
    Each is logged once per (app, key) in this process, naming the job, the key and balsam's own
    option and value (the launcher's warn-once record, as for the GPU variables a launch param
    would replace).

    ``duplicates``: option names of flags ``args`` has already (``envall``): dropped without a word,
    since passing them changes nothing but the line's length."""
    passed, refused = split_launch_params(params if params is not None else spec.launch_params, reserved)
    silent = set(duplicates)
    passed = {k: v for k, v in passed.items() if launch_option_name(k) not in silent}
    if refused:
        _warn_refused(spec, args, reserved, refused)
    return passed


def _warn_refused(
    spec: LaunchSpec, args: Sequence[str], reserved: Mapping[str, str], refused: Mapping[str, Any]
) -> None:
    launcher = os.path.basename(args[0]) if args else "the MPI launcher"
    of = "" if spec.job_id is None else f" of job {spec.job_id}"
    if spec.app_id is not None:
        of += f" (app {spec.app_id})"
    every = "its app" if spec.app_id is None else f"app {spec.app_id}"
    for key, value in refused.items():
        if not first_warning((spec.app_id, "reserved launch param", key)):
            continue
        option = reserved[launch_option_name(key)]
        logger.warning("launch param %r=%r%s not passed to %s: balsam sets %s itself, from the job's placement "
                       "(its num_nodes and ranks_per_node, on the nodes balsam gave it: set those on the job "
                       "instead); the same for every job of %s with launch param %r (warned once)",
                       key, value, of, launcher, _option_value(args, option), every, key)


def capped_threads_per_core(threads_per_core: int, max_threads_per_core: int = 0) -> int:
    """A job's ``threads_per_core`` (at least 1), at most ``max_threads_per_core`` when that is not 0:
    the hardware threads of a core that a job's binding, pinning and core count use."""
    threads = max(1, int(threads_per_core or 1))
    return min(threads, max_threads_per_core) if max_threads_per_core else threads


def hardware_thread_ids(cores: Sequence[int], threads_per_core: int, offset: int, *, max_threads_per_core: int = 0) -> list[int]:
    """``cores`` then their sibling hardware threads ``core + offset * t`` for ``t`` in
    ``1 .. threads_per_core - 1`` (at most ``max_threads_per_core`` threads per core when it is
    not 0): the CPUs of a rank or task that asked for ``threads_per_core`` threads per core, on a
    machine whose core ``c`` has the hardware threads ``c, c + offset, c + 2 * offset, ...``."""
    threads = capped_threads_per_core(threads_per_core, max_threads_per_core)
    ids = list(cores)
    if offset:
        ids += [c + offset * t for t in range(1, threads) for c in cores]
    return ids


def pick_cpu_binding(
    spec: LaunchSpec, keys: Sequence[str], configured: str, node_cpu_ids: Sequence[int], *, hyperthread_offset: int = 0,
    cpu_domains: Sequence[Sequence[int]] = (), max_threads_per_core: int = 0,
) -> str:
    """A PALS ``--cpu-bind``: the job's launch param (first of ``keys``, checked: :func:`job_cpu_bind`),
    else the ``configured`` option, else the ``list:...`` computed by :func:`cpu_bind_list` (over
    ``cpu_domains``, if any; at most ``max_threads_per_core`` hardware threads of a core when it is
    not 0). Both without the blanks around them: the option's check in settings.yml passes ``' depth
    '``, which went to mpiexec blanks and all, and a blank option is empty (the computed list)."""
    chosen = job_cpu_bind(spec, keys)
    if chosen is not None:
        return chosen
    if str(configured or "").strip():
        return str(configured).strip()
    return cpu_bind_list(spec, node_cpu_ids, hyperthread_offset=hyperthread_offset, cpu_domains=cpu_domains,
                         max_threads_per_core=max_threads_per_core)


def cpu_domains_of(
    node_cpu_ids: Sequence[int], gpu_cpus: Iterable[tuple[str, Sequence[int]]]
) -> tuple[tuple[int, ...], ...]:
    """The node's CPU domains (sockets, NUMA domains) as a platform declares them in
    ``NodeInfo.gpu_cpus``: the CPUs of ``node_cpu_ids`` near the same GPUs form one domain (the
    CPUs of a socket are near all of its GPUs' ids, tiles or MIG instances alike), domains in the
    order of their first CPU; CPUs near no GPU are in none. Empty without ``gpu_cpus``."""
    near = [(gpu, frozenset(cpus)) for gpu, cpus in gpu_cpus]
    domains: dict[tuple[str, ...], list[int]] = {}
    for cpu in node_cpu_ids:
        gpus = tuple(gpu for gpu, cpus in near if cpu in cpus)
        if gpus:
            domains.setdefault(gpus, []).append(cpu)
    return tuple(tuple(cpus) for cpus in domains.values())


def _cut_by_domain(assigned: Sequence[int], ranks: int, cores_needed: int,
                   domains: Sequence[Sequence[int]]) -> Optional[list[list[int]]]:
    """Each rank's cores when the ranks are spread evenly over the ``domains`` that the ``assigned``
    cores fall in and each domain's cores are cut on their own, so that no rank spans two domains
    (the first domains take one rank more when the ranks do not divide evenly; every rank gets the
    same number of cores). Domains come in the order of their first assigned core and keep the
    assigned order (the launcher lists a GPU job's cores near its GPU i first for rank i). None
    when this is not possible: fewer than two domains among the assigned cores, fewer ranks than
    domains (a rank would lose a whole domain), or a rank would get fewer cores than its threads
    need. Cores near no domain are left out."""
    domain_of = {cpu: index for index, domain in enumerate(domains) for cpu in domain}
    parts: dict[int, list[int]] = {}
    for cpu in assigned:
        if cpu in domain_of:
            parts.setdefault(domain_of[cpu], []).append(cpu)
    cut = list(parts.values())
    if len(cut) < 2 or ranks < len(cut):
        return None
    counts = [ranks // len(cut) + (1 if i < ranks % len(cut) else 0) for i in range(len(cut))]
    per_rank = min(len(part) // n for part, n in zip(cut, counts))
    if per_rank < max(1, cores_needed):
        return None
    return [part[k * per_rank : (k + 1) * per_rank] for part, n in zip(cut, counts) for k in range(n)]


def _spans_domains(cut: Sequence[Sequence[int]], domains: Sequence[Sequence[int]]) -> bool:
    """Whether a rank's cores in ``cut`` lie in two of the ``domains``."""
    domain_of = {cpu: index for index, domain in enumerate(domains) for cpu in domain}
    return any(len({domain_of[c] for c in cores if c in domain_of}) > 1 for cores in cut)


def cpu_bind_list(spec: LaunchSpec, node_cpu_ids: Sequence[int], *, hyperthread_offset: int = 0,
                  cpu_domains: Sequence[Sequence[int]] = (), max_threads_per_core: int = 0) -> str:
    """A ``list:a,b:c,d`` CPU binding: each rank gets ``cpus_per_rank`` consecutive CPUs.

    The CPUs are those the launcher assigned to the job on its node (single-node jobs), else all of
    ``node_cpu_ids`` (whole-node jobs). With ``threads_per_core > 1`` each rank also gets the sibling
    hardware threads (``cpu + hyperthread_offset``), as Balsam 0.7 built it for Polaris; with fewer
    cores than ranks, or a rank's threads not filling whole cores (odd ``threads_per_rank`` at 2 per
    core) where no rank's threads then leave the ``cpu_domains`` of its cores in the core cut, each
    rank gets ``threads_per_rank`` hardware threads of them instead.

    ``cpu_domains`` are the platform's sockets or NUMA domains (see :func:`cpu_domains_of`). Where
    the cut in id order would give a rank cores of two of them (12 ranks of 8 cores over Aurora's
    1-51,53-103 gave rank 6 cores 49-51 and 53-57, one rank on both sockets), the ranks are spread
    evenly over the domains and each domain is cut on its own (ranks 0-5 on 1-48, 6-11 on
    53-100), as ALCF's binding examples do. Without domains, or when the domain cut cannot give
    each rank the cores its threads need, the id-order cut stands.

    ``max_threads_per_core`` (the platform's hardware threads of a core; 0: no cap) caps
    ``threads_per_core``: at 4 threads per core on a 2-thread core the list named ``core + 2 *
    offset`` and ``core + 3 * offset``, CPUs the node does not have.
    """
    assigned = list(spec.cpu_ids[0]) if spec.cpu_ids and spec.cpu_ids[0] else list(node_cpu_ids)
    ranks = max(1, spec.ranks_per_node)
    per_core = capped_threads_per_core(spec.threads_per_core, max_threads_per_core)
    per_rank = max(1, len(assigned) // ranks)
    cut = []
    for rank in range(ranks):
        start = (rank * per_rank) % max(1, len(assigned))
        cut.append(assigned[start : start + per_rank])
    if cpu_domains and _spans_domains(cut, cpu_domains):
        cut = _cut_by_domain(assigned, ranks, spec.threads_per_rank // per_core, cpu_domains) or cut
    per_thread_rank = max(1, spec.threads_per_rank)
    by_core = [(core, t) for core in assigned for t in hardware_thread_ids([core], per_core, hyperthread_offset)]
    if ranks * per_thread_rank <= len(by_core):
        by_thread = [by_core[r * per_thread_rank : (r + 1) * per_thread_rank] for r in range(ranks)]
        # Fewer cores than ranks (3 one-thread ranks at 2 threads per core got 2 cores): each rank
        # gets its own hardware threads, core by core, rather than ranks wrapping onto one core.
        # Whole cores too few for a rank's threads (2 ranks of 3 threads at 2 per core are given 3
        # cores: the core cut gave each rank 1 core, 2 threads, and left the third core idle): the
        # same, but only where no rank's threads leave the domains of its share of the core cut.
        # The launcher lists a GPU job's cores near each rank's GPU in rank order, so the thread
        # cut's drift along that list put ranks 4 and 5 of a 12-tile job of 3 threads (cores 1-6
        # for tiles on socket 0, 53-64 for socket 1) on cores 53-55, the socket away from their
        # tiles; there the core cut, short a thread per rank but near the tiles, stands.
        if ranks > len(assigned) or (per_rank * per_core < per_thread_rank
                                     and not _leaves_domains(by_thread, cut, cpu_domains)):
            return "list:" + ":".join(format_id_ranges([t for _, t in part]) for part in by_thread)
    return "list:" + ":".join(
        format_id_ranges(hardware_thread_ids(cores, per_core, hyperthread_offset)) for cores in cut)


def _leaves_domains(by_thread: Sequence[Sequence[tuple[int, int]]], cut: Sequence[Sequence[int]],
                    domains: Sequence[Sequence[int]]) -> bool:
    """Whether a rank's hardware threads (``(core, thread)`` pairs, ``by_thread[r]``) lie on a core
    of a domain that none of its cores in ``cut[r]`` is in (cores of no domain count as one more)."""
    domain_of = {cpu: index for index, domain in enumerate(domains) for cpu in domain}
    return any({domain_of.get(core) for core, _ in mine} - {domain_of.get(core) for core in own}
               for mine, own in zip(by_thread, cut))


def format_id_ranges(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 104, 105]`` -> ``"0-2,5,104-105"`` (consecutive runs as ranges, order kept)."""
    parts: list[str] = []
    run: list[int] = []
    for value in ids:
        if run and value == run[-1] + 1:
            run.append(value)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [value]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def is_mig_id(gpu_id: str) -> bool:
    """Whether a GPU id is a MIG instance's UUID (``MIG-<uuid>``, or R450's ``MIG-GPU-<uuid>/gi/ci``),
    the form :meth:`NvidiaDevices.mig_ids` and ``CUDA_VISIBLE_DEVICES`` use for them."""
    return str(gpu_id).startswith("MIG-")


@attrs.frozen
class NvidiaDevices:
    """What ``nvidia-smi -L`` lists: GPU indexes, and the MIG instances of each GPU (UUIDs)."""

    gpus: tuple[str, ...] = ()
    #: GPU index -> UUIDs of its MIG devices, in the order listed.
    migs: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def mig_ids(self, gpu_order: Sequence[str] = ()) -> list[str]:
        """The node's GPU ids when MIG is on for any of its GPUs, else ``[]`` (then the platform's
        own GPU ids stand): each listed GPU in turn, those of ``gpu_order`` first (a machine's
        CPU-affinity order) then the others as listed, gives its MIG UUIDs, or its index when it is
        not split. A GPU left whole on a node where others are split is still a device jobs can get
        (``CUDA_VISIBLE_DEVICES`` takes indexes and MIG UUIDs alike); only the MIG UUIDs came back
        before, and the whole GPUs were never used."""
        if not self.migs:
            return []
        listed = list(self.gpus) + [g for g in self.migs if g not in self.gpus]
        order = [g for g in gpu_order if g in listed] + [g for g in listed if g not in gpu_order]
        return [device for gpu in order for device in self.migs.get(gpu, (gpu,))]


_NVSMI_GPU = re.compile(r"^GPU (\d+):")
_NVSMI_MIG = re.compile(r"^\s+MIG\b.*\(UUID:\s*(MIG-[^)\s]+)\)")


def parse_nvidia_smi_list(text: str) -> NvidiaDevices:
    """Parse ``nvidia-smi -L``: ``GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-...)`` lines, each followed by
    its ``  MIG 3g.20gb Device 0: (UUID: MIG-...)`` lines when MIG is on (R470+ ``MIG-<uuid>`` and
    R450 ``MIG-GPU-<uuid>/<gi>/<ci>`` forms; both are valid ``CUDA_VISIBLE_DEVICES`` values)."""
    gpus: list[str] = []
    migs: dict[str, list[str]] = {}
    for line in text.splitlines():
        gpu = _NVSMI_GPU.match(line)
        if gpu:
            gpus.append(gpu.group(1))
            continue
        mig = _NVSMI_MIG.match(line)
        if mig and gpus:
            migs.setdefault(gpus[-1], []).append(mig.group(1))
    return NvidiaDevices(tuple(gpus), {g: tuple(u) for g, u in migs.items()})


#: Why this process's last :func:`nvidia_smi_list` found no GPU ("" when it found some; None
#: before any call), for the launcher's line about GPU jobs left to other launchers.
_nvidia_smi_note: list[Optional[str]] = [None]
#: The empty or garbled answers :func:`nvidia_smi_list` warned about already (once per process each).
_nvidia_smi_warned: set[str] = set()


def _note_nvidia_smi(note: str, warn: str = "always") -> None:
    _nvidia_smi_note[0] = note
    if warn == "always" or (warn == "once" and note not in _nvidia_smi_warned):
        _nvidia_smi_warned.add(note)
        logger.warning("nvidia-smi -L %s", note)


def nvidia_smi_note() -> Optional[str]:
    """Why this process's last :func:`nvidia_smi_list` found no GPU (``not on PATH``, ``exited 6: No
    devices were found``...), "" when it found some, None when it was not called."""
    return _nvidia_smi_note[0]


def nvidia_smi_list() -> Optional[str]:
    """``nvidia-smi -L`` on this node, or None when there is no ``nvidia-smi`` or it failed (logged)."""
    program = shutil.which("nvidia-smi")
    if program is None:
        _note_nvidia_smi("not on PATH", warn="never")  # a CPU node: nothing to warn about
        return None
    try:
        out = subprocess.run([program, "-L"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _note_nvidia_smi(f"failed: {exc}")
        return None
    if out.returncode != 0:
        # "No devices were found" (exit 6) is printed on stdout, a driver error on stderr.
        _note_nvidia_smi(f"exited {out.returncode}: {((out.stderr or '').strip() or (out.stdout or '').strip())[:200]}")
        return None
    if not any(_NVSMI_GPU.match(line) for line in out.stdout.splitlines()):
        # Exit 0 yet no GPU listed (an empty or garbled answer): without this, 0 GPUs and no word.
        _note_nvidia_smi(f"exited 0 but listed no GPU (no 'GPU <n>:' line): {out.stdout.strip()[:200]!r}", warn="once")
        return out.stdout
    _nvidia_smi_note[0] = ""
    return out.stdout


def file_mtime(path: Optional[str]) -> Optional[float]:
    """The modification time of ``path``, or None (no path, or it cannot be read).

    The batch system writes an allocation's node file (``$PBS_NODEFILE``, ``$COBALT_NODEFILE``) when
    the allocation starts: its mtime is the allocation's start, by the same clock as files written
    on that node afterwards."""
    if not path:
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def read_fresh_gpu_list(directory: str, names: Iterable[str], not_before: Optional[float]) -> Optional[str]:
    """The first ``<directory>/balsam-<name>-gpulist.txt`` (an ``nvidia-smi -L`` recorded per node)
    that exists and was written at or after ``not_before`` (the allocation's start), else None.

    A record older than the allocation was left by an earlier job on that node (``/var/tmp``
    outlives a job): its MIG instances may be gone, and trusting it handed jobs MIG UUIDs that
    no longer exist. Such a record is ignored, with a warning naming it.
    """
    if not directory:
        return None
    for name in dict.fromkeys(names):
        path = Path(directory) / f"balsam-{name}-gpulist.txt"
        try:
            written = path.stat().st_mtime
            if not path.is_file():
                continue
            if not_before is not None and written < not_before:
                logger.warning("ignoring %s: written before this allocation started (a record of an earlier job)", path)
                continue
            return path.read_text()
        except OSError:
            continue
    return None
