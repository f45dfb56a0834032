"""Aurora and Sunspot (ALCF): HPE/Intel nodes with 2 x 52-core Xeon Max CPUs and six Intel Data
Center GPU Max 1550, each of two tiles; PBS Pro; PALS ``mpiexec``.

A Balsam "GPU" here is a tile (``0.0`` ... ``5.1``, GPU.tile), so ``gpus_per_rank=1`` places one rank
per tile and ``gpus_per_rank=2`` one rank per whole GPU (the nodes name each GPU's tiles as one
``NodeInfo.gpu_groups`` entry, so two tiles go to one free GPU even after single-tile jobs, and a
single tile goes to a half-used GPU first); with the option ``tiles_per_gpu=1`` a Balsam
GPU is a whole GPU (ids ``0`` ... ``5``). GPUs 0-2 sit on the first socket (cores 0-51), GPUs 3-5
on the second (52-103): a job gets cores of its tiles' socket (option ``gpu_cpus``). A job sees its tiles (or GPUs) through
``ZE_AFFINITY_MASK`` (with ``ZE_ENABLE_PCI_ID_DEVICE_ORDER=1`` so that the ids follow the PCI order
the mask refers to); CUDA variables mean nothing to Level Zero and are never set.

The launch line is the one Balsam 0.7 built (``mpiexec -n N --ppn R --hosts h1,h2 --cpu-bind B -d D
--envall CMD``), except that without a ``cpu_bind`` launch parameter the binding is computed from the
CPUs the launcher assigned (``list:0:1:...``) instead of ``none``, so packed jobs do not share cores.

Aurora's Slingshot fabric allows about 1,000 ``mpiexec`` launches per batch job (ALCF's Aurora guide);
the driver declares this limit (option ``max_mpiexec_per_batch_job``) and the mpi job mode stops
acquiring when it is reached.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

import attrs

from balsam.options import option
from balsam.platform import (
    LaunchLimit, LaunchSpec, NodeInfo, Platform, cpu_ids_errors, first_launch_param, gpu_cpu_map_errors,
    hardware_thread_ids, hosts_from_node_file, launch_param_args, leading_job_number, near_cpus_of,
    parse_gpu_cpu_map, parse_id_ranges, pick_cpu_binding,
)

#: launch_params keys that name the CPU binding (``--cpu-bind`` itself, or as users write it in 0.7).
CPU_BIND_KEYS = ("cpu_bind", "cpu-bind", "--cpu-bind")
#: launch_params keys that set the depth (``-d``).
DEPTH_KEYS = ("depth", "-d", "--depth")
#: Hardware threads per core of the Xeon Max 9470C (2 per core: 208 on 104 cores).
HARDWARE_THREADS_PER_CORE = 2


def tile_ids(num_gpus: int, tiles_per_gpu: int) -> tuple[str, ...]:
    """``("0.0", "0.1", "1.0", ...)``: the GPU.tile ids ``ZE_AFFINITY_MASK`` takes in composite mode.

    With one tile per GPU the ids are the plain GPU ids ``("0", "1", ...)``: in composite mode
    ``ZE_AFFINITY_MASK=0`` exposes the whole GPU (both tiles) while ``0.0`` would expose tile 0 only.
    """
    return tuple(tile for group in tile_groups(num_gpus, tiles_per_gpu) for tile in group)


def tile_groups(num_gpus: int, tiles_per_gpu: int) -> tuple[tuple[str, ...], ...]:
    """The ids of each GPU's tiles, one tuple per GPU (``NodeInfo.gpu_groups``: a request for a
    multiple of ``tiles_per_gpu`` tiles gets whole GPUs; one tile goes to a half-used GPU first)."""
    if tiles_per_gpu == 1:
        return tuple((str(gpu),) for gpu in range(num_gpus))
    return tuple(tuple(f"{gpu}.{tile}" for tile in range(tiles_per_gpu)) for gpu in range(num_gpus))


def _non_negative(_instance: Any, attribute: Any, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be 0 or more, got {value}")


@attrs.frozen
class AuroraOptions:
    cpu_ids: str = option(
        "0-103",
        "CPU (core) ids of one node that jobs are placed on, as ranges: 0-103 is every core of both "
        "sockets; 1-51,53-103 leaves the first core of each socket to the system.",
    )
    hyperthread_offset: int = option(
        104, "Id distance from a core to its second hardware thread (added to the binding when threads_per_core=2)."
    )
    gpus_per_node: int = option(6, "Intel GPUs per node.", validator=_non_negative)
    tiles_per_gpu: int = option(
        2,
        "Tiles per GPU (1 or more); every tile is one Balsam GPU id (GPU.tile: 0.0 0.1 1.0 ...); 1 makes "
        "every whole GPU one id (0 1 ... 5).",
    )
    gpu_cpus: str = option(
        "0,1,2:0-51 3,4,5:52-103",
        "The cores nearest each GPU (its socket), as GPU:ranges entries (a tile goes with its GPU): a "
        "GPU job gets cores near its tiles. Empty: cores first-fit in id order.",
    )
    cpu_bind: str = option(
        "",
        "mpiexec --cpu-bind for jobs whose launch_params set none: empty computes list:... from the "
        "CPUs the launcher assigned to the job; or none, core, depth, numa, list:...",
    )
    mpiexec: str = option("mpiexec", "The PALS mpiexec command.")
    max_mpiexec_per_batch_job: int = option(
        1000,
        "Most mpiexec launches one batch job makes (Slingshot limit of about 1,000 on Aurora); the "
        "launcher stops acquiring jobs when it is reached. 0: no limit.",
        validator=_non_negative,
    )

    def validate(self) -> dict[str, str]:
        errors = cpu_ids_errors(self.cpu_ids)
        errors.update(tiles_per_gpu_errors(self.tiles_per_gpu))
        errors.update(gpu_cpu_map_errors("gpu_cpus", self.gpu_cpus))
        return errors


def tiles_per_gpu_errors(value: int) -> dict[str, str]:
    # 0 would leave a node without GPU ids; 1 addresses whole GPUs.
    return {} if value >= 1 else {"tiles_per_gpu": f"must be 1 or more (1: whole GPUs), got {value}"}


class AuroraPlatform(Platform):
    """Aurora: PBS nodes from ``$PBS_NODEFILE``, 12 GPU tiles per node, PALS mpiexec."""

    name = "aurora"
    description = "ALCF Aurora: 104 cores and 6 Intel GPUs x 2 tiles per node, PBS, PALS mpiexec (ZE_AFFINITY_MASK)"
    default_scheduler = "pbs"
    mpirun_allows_node_packing = True
    options_schema = AuroraOptions
    #: ``-l system=`` and queues differ between the two machines; the rest is the same.
    system = "aurora"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.cpu_ids = parse_id_ranges(self.options.cpu_ids, where="launcher.platform_options.cpu_ids")
        for name, problem in tiles_per_gpu_errors(self.options.tiles_per_gpu).items():
            raise ValueError(f"launcher.platform_options.{name}: {problem}")
        self.gpu_ids = tile_ids(self.options.gpus_per_node, self.options.tiles_per_gpu)
        self.gpu_groups = tile_groups(self.options.gpus_per_node, self.options.tiles_per_gpu)
        gpu_cpu_map = parse_gpu_cpu_map(self.options.gpu_cpus, where="launcher.platform_options.gpu_cpus")
        self.gpu_cpus = near_cpus_of(self.gpu_ids, gpu_cpu_map, self.cpu_ids,
                                     {tile: tile.split(".")[0] for tile in self.gpu_ids})

    # -- inside an allocation -------------------------------------------------------------------
    def hostnames(self, env: Mapping[str, str]) -> list[str]:
        return hosts_from_node_file(env, "PBS_NODEFILE", inside="a PBS job")

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        return [
            NodeInfo(node_id=host, hostname=host, cpu_ids=self.cpu_ids, gpu_ids=self.gpu_ids,
                     gpu_groups=self.gpu_groups if self.options.tiles_per_gpu > 1 else (), gpu_cpus=self.gpu_cpus)
            for host in self.hostnames(env)
        ]

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        return leading_job_number(env.get("PBS_JOBID", ""))

    # -- MPI ------------------------------------------------------------------------------------
    def cpu_binding(self, spec: LaunchSpec) -> str:
        return pick_cpu_binding(spec, CPU_BIND_KEYS, self.options.cpu_bind, self.cpu_ids,
                                hyperthread_offset=self.options.hyperthread_offset)

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        params = dict(spec.launch_params)
        depth = first_launch_param(params, DEPTH_KEYS) or spec.threads_per_rank
        args = [
            *shlex.split(self.options.mpiexec),
            "-n", str(spec.num_ranks),
            "--ppn", str(max(1, spec.ranks_per_node)),
            "--hosts", ",".join(spec.hostnames),
            "--cpu-bind", self.cpu_binding(spec),
            "-d", str(depth),
            "--envall",
        ]
        return args + launch_param_args(params, skip=CPU_BIND_KEYS + DEPTH_KEYS)

    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        # The computed default binding (list:<every core>) would leave out the second hardware
        # threads the workers pin threads_per_core=2 tasks to.
        return {"cpu-bind": "none"}

    def task_cpu_ids(self, cpu_ids: Sequence[int], threads_per_core: int) -> tuple[int, ...]:
        # As the mpiexec binding does: a core's second hardware thread is core + hyperthread_offset.
        return tuple(hardware_thread_ids(cpu_ids, threads_per_core, self.options.hyperthread_offset,
                                         max_threads_per_core=HARDWARE_THREADS_PER_CORE))

    def gpu_environment(self, gpu_ids: Sequence[str]) -> dict[str, str]:
        if not gpu_ids:
            return {}
        return {"ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1", "ZE_AFFINITY_MASK": ",".join(map(str, gpu_ids))}

    def launch_limit(self) -> Optional[LaunchLimit]:
        limit = self.options.max_mpiexec_per_batch_job
        if not limit:
            return None
        return LaunchLimit(
            limit,
            f"{self.name} allows {limit} mpiexec launches per batch job (Slingshot; "
            "launcher.platform_options.max_mpiexec_per_batch_job)",
        )

    # -- site init ------------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, hostname: str, env: Mapping[str, str]) -> bool:
        # Login and compute nodes are named <node>.<...>.<system>.alcf.anl.gov (or <system>-uan-NNNN).
        return re.search(rf"(^|[.-]){cls.system}([.-]|$)", hostname.lower()) is not None

    def queues(self) -> dict[str, dict[str, int]]:
        return {
            "debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1},
            "debug-scaling": {"max_nodes": 31, "max_walltime": 60, "max_queued_jobs": 1},
            "prod": {"max_nodes": 2048, "max_walltime": 1080, "max_queued_jobs": 100},
        }

    def settings_defaults(self) -> dict[str, Any]:
        return {
            "launcher": {
                "platform": self.name,
                "mpirun_allows_node_packing": True,
                # The serial-mode workers pin their own tasks: leave them unbound.
                "serial_mode_startup_params": {"cpu-bind": "none"},
            },
            "scheduler": {
                "name": "pbs",
                "allowed_queues": self.queues(),
                "allowed_projects": ["Aurora_deployment"],
                "optional_batch_job_params": {"filesystems": "home:flare", "place": "scatter"},
            },
        }

    def job_template(self) -> Optional[str]:
        return resources.files(__package__).joinpath("job-template.sh").read_text().replace("@SYSTEM@", self.system)


class SunspotPlatform(AuroraPlatform):
    """Sunspot, Aurora's test and development system: the same nodes, its own PBS server and queue."""

    name = "sunspot"
    description = "ALCF Sunspot (Aurora test system): Aurora nodes, PBS queue workq, PALS mpiexec"
    system = "sunspot"

    def queues(self) -> dict[str, dict[str, int]]:
        return {"workq": {"max_nodes": 128, "max_walltime": 60, "max_queued_jobs": 100}}

    def settings_defaults(self) -> dict[str, Any]:
        defaults = super().settings_defaults()
        defaults["scheduler"]["optional_batch_job_params"] = {"filesystems": "home", "place": "scatter"}
        return defaults

