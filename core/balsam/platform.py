"""The platform driver contract (entry-point group ``balsam.platforms``).

A platform describes one kind of machine: how a launcher finds the nodes of its allocation and
their CPU and GPU ids, how an MPI job's command line is built (``mpiexec``, ``srun``, ``aprun``...),
how GPUs are made visible to a process (``CUDA_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``...), and the
defaults that ``balsam site init`` writes into ``settings.yml`` for it. Supporting a new machine
means writing a platform plugin, never editing the core.
"""

from __future__ import annotations

import abc
import shlex
from typing import Any, ClassVar, Mapping, Optional, Sequence

import attrs

from .options import NoOptions, build_options


@attrs.frozen
class NodeInfo:
    """One compute node of the allocation, as the platform discovered it."""

    node_id: str
    hostname: str
    cpu_ids: tuple[int, ...] = attrs.field(converter=tuple)
    gpu_ids: tuple[str, ...] = attrs.field(converter=tuple, factory=tuple)


@attrs.frozen
class LaunchSpec:
    """What the launcher decided for one job run: where it goes and how it is laid out."""

    cmdline: str  #: the app's shell command line (already rendered and quoted)
    hostnames: tuple[str, ...] = attrs.field(converter=tuple)
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    threads_per_core: int = 1
    gpus_per_rank: float = 0.0
    #: CPU ids assigned on each node (empty tuples when whole nodes are assigned).
    cpu_ids: tuple[tuple[int, ...], ...] = attrs.field(converter=lambda v: tuple(tuple(x) for x in v), factory=tuple)
    #: GPU ids assigned on each node.
    gpu_ids: tuple[tuple[str, ...], ...] = attrs.field(converter=lambda v: tuple(tuple(x) for x in v), factory=tuple)
    launch_params: Mapping[str, str] = attrs.field(factory=dict)

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

    # -- on the login node (site init) --------------------------------------------------------
    def settings_defaults(self) -> dict[str, Any]:
        """Values that ``balsam site init`` writes into settings.yml over the generic defaults.

        A nested dict in settings.yml shape, e.g.
        ``{"scheduler": {"name": "pbs", "allowed_queues": {...}}, "launcher": {...}}``.
        """
        return {}

    def job_template(self) -> Optional[str]:
        """A job-template.sh (Jinja2) for this machine, or None to use the scheduler's default."""
        return None
