"""Aurora and Sunspot (ALCF): HPE/Intel nodes with 2 x 52-core Xeon Max CPUs and six Intel Data
Center GPU Max 1550, each of two tiles; PBS Pro; PALS ``mpiexec``.

A Balsam "GPU" here is a tile (``0.0`` ... ``5.1``, GPU.tile), so ``gpus_per_rank=1`` places one rank
per tile and ``gpus_per_rank=2`` one rank per whole GPU (the nodes name each GPU's tiles as one
``NodeInfo.gpu_groups`` entry, so two tiles go to one free GPU even after single-tile jobs, and a
single tile goes to a half-used GPU first); with the option ``tiles_per_gpu=1`` a Balsam
GPU is a whole GPU (ids ``0`` ... ``5``). GPUs 0-2 sit on the first socket (cores 0-51), GPUs 3-5
on the second (52-103); cores 0 and 52 are left to the system (ALCF reserves them for system
services since 31 March 2025), so jobs get cores 1-51 and 53-103, those of their tiles' socket
(option ``gpu_cpus``).

A job sees its tiles (or GPUs) through ``ZE_AFFINITY_MASK``, whose ids depend on Level Zero's device
hierarchy (``ZE_FLAT_DEVICE_HIERARCHY``): in FLAT mode (Level Zero's default, and what ALCF's
``frameworks`` module sets) every tile is a device of its own, numbered 0 ... 11 (GPU g's tile t is
``g * 2 + t``, two tiles to a GPU in hardware whatever the option ``tiles_per_gpu``, 1 or 2); only in COMPOSITE mode does the mask take ``GPU.tile`` ids. The mode is
the launcher's own (option ``device_hierarchy: inherit``; unset means FLAT) or the option's, and is
always set next to the mask, so the two cannot disagree; the option's mode is set for jobs without
a mask too (CPU-only: ``job_environment``), and the launcher sets these variables again
after a job's shell preamble. A multi-node GPU job (whole nodes, no tiles assigned) gets the mask of
all of a node's tiles, the same on every node, as ``--env`` on its ``mpiexec`` line
(``whole_node_environment``), so per-rank wrappers that narrow the mask work there too. ``ZE_ENABLE_PCI_ID_DEVICE_ORDER=1`` makes the ids follow the PCI
order; CUDA variables mean nothing to Level Zero and are never set. ``threads_per_core`` above the
2 hardware threads of a core counts as 2 (``hardware_threads_per_core``).

The launch line is the one Balsam 0.7 built (``mpiexec -n N --ppn R --hosts h1,h2 --cpu-bind B -d D
--envall CMD``), except that without a ``cpu_bind`` launch parameter the binding is computed from the
CPUs the launcher assigned (``list:1:2:...``) instead of ``none``, so packed jobs do not share cores,
and a whole-node job's ranks are spread over both sockets with none spanning the two (a multi-node
GPU job's: each local rank on the socket of the tiles it takes from the whole-node mask,
``tile_rank_binding``). Launch params
naming ``-n``, ``--ppn`` or ``--hosts`` again are not passed (one warning per app and key), and
``envall`` is dropped: the line has it (``RESERVED_OPTIONS``, ``DUPLICATE_FLAGS``).

Aurora's Slingshot fabric allows about 1,000 ``mpiexec`` launches per batch job (ALCF's Aurora guide);
the driver declares this limit (option ``max_mpiexec_per_batch_job``) and the mpi job mode stops
acquiring when it is reached.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections import Counter
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

import attrs

from balsam.options import option
from balsam.platform import (
    PALS_RESERVED_OPTIONS, pals_binding_overlaps,
    LaunchLimit, LaunchSpec, NodeInfo, Platform, cpu_domains_of, cpu_ids_errors, first_launch_param,
    gpu_cpu_map_errors, hardware_thread_ids, hosts_from_node_file, job_cpu_bind, launch_param_args,
    launch_params_to_pass,
    capped_threads_per_core, format_id_ranges, leading_job_number, near_cpus_of, non_negative_errors,
    pals_cpu_bind_errors,
    pals_serial_startup_param_problems, parse_gpu_cpu_map, parse_id_ranges, pick_cpu_binding,
)
from balsam.util import first_warning

logger = logging.getLogger("balsam.platform.aurora")

#: launch_params keys that name the CPU binding (``--cpu-bind`` itself, or as users write it in 0.7).
CPU_BIND_KEYS = ("cpu_bind", "cpu-bind", "--cpu-bind")
#: launch_params keys that set the depth (``-d``; ``{"d": "8"}`` is ``-d 8`` too, see ``launch_option``).
DEPTH_KEYS = ("depth", "d", "-d", "--depth")
#: mpiexec options the line sets from balsam's placement (PALS's map, kept in balsam.platform: any
#: spelling of a launch_params key) -> the option of the line: a launch param naming one is not
#: passed (warned once per app and key), since the ranks would not run where balsam placed them.
RESERVED_OPTIONS = PALS_RESERVED_OPTIONS
#: Flags the line has already: a launch param naming one is dropped without a warning.
DUPLICATE_FLAGS = ("envall",)
#: Hardware threads per core of the Xeon Max 9470C (2 per core: 208 on 104 cores).
HARDWARE_THREADS_PER_CORE = 2
#: Tiles of one Intel Data Center GPU Max 1550: the flat devices one whole GPU is in FLAT mode.
HARDWARE_TILES_PER_GPU = 2
#: Level Zero's device hierarchy variable, and the modes it takes. FLAT (every tile a root device)
#: is its default on these GPUs (Intel's "Flattening GPU Tile Hierarchy", since late 2023) and
#: what ALCF's ``frameworks`` module sets; COMBINED numbers root devices as FLAT does.
HIERARCHY_VARIABLE = "ZE_FLAT_DEVICE_HIERARCHY"
HIERARCHIES = ("FLAT", "COMPOSITE", "COMBINED")
DEFAULT_HIERARCHY = "FLAT"
#: ``device_hierarchy`` option values: ``inherit`` takes the launcher's environment.
HIERARCHY_CHOICES = ("inherit", "flat", "composite", "combined")


def tile_ids(num_gpus: int, tiles_per_gpu: int) -> tuple[str, ...]:
    """``("0.0", "0.1", "1.0", ...)``: Balsam's ids of a node's tiles (GPU.tile, as in composite mode;
    :func:`affinity_mask` turns them into the mask of the job's device hierarchy).

    With one tile per GPU the ids are the plain GPU ids ``("0", "1", ...)``: each is a whole GPU
    (in composite mode ``ZE_AFFINITY_MASK=0`` exposes both tiles, ``0.0`` would expose tile 0 only).
    """
    return tuple(tile for group in tile_groups(num_gpus, tiles_per_gpu) for tile in group)


def tile_groups(num_gpus: int, tiles_per_gpu: int) -> tuple[tuple[str, ...], ...]:
    """The ids of each GPU's tiles, one tuple per GPU (``NodeInfo.gpu_groups``: a request for a
    multiple of ``tiles_per_gpu`` tiles gets whole GPUs; one tile goes to a half-used GPU first)."""
    if tiles_per_gpu == 1:
        return tuple((str(gpu),) for gpu in range(num_gpus))
    return tuple(tuple(f"{gpu}.{tile}" for tile in range(tiles_per_gpu)) for gpu in range(num_gpus))


def affinity_mask(gpu_ids: Sequence[str], hierarchy: str) -> str:
    """``ZE_AFFINITY_MASK`` for Balsam GPU ids under the device ``hierarchy`` (one of :data:`HIERARCHIES`).

    COMPOSITE: the ids as they are (``0.1`` is GPU 0's tile 1, ``0`` the whole GPU 0). FLAT and
    COMBINED: every tile is a device of its own, numbered in GPU order, so tile ``g.t`` is
    ``g * HARDWARE_TILES_PER_GPU + t`` (``0.1`` -> ``1``, ``5.1`` -> ``11``) and a whole GPU ``g``
    (``tiles_per_gpu=1``) is its :data:`HARDWARE_TILES_PER_GPU` tiles: Level Zero numbers the
    tiles the hardware has, not the ids Balsam hands out. In FLAT mode Level Zero reads ``0.1``
    as sub-device 1 of device 0, and a device has no sub-devices there, so the GPU.tile mask
    exposed nothing, or the wrong tile.
    """
    if hierarchy == "COMPOSITE":
        return ",".join(map(str, gpu_ids))
    flat: list[int] = []
    for gpu_id in gpu_ids:
        gpu, dot, tile = str(gpu_id).partition(".")
        try:
            if dot:
                if not 0 <= int(tile) < HARDWARE_TILES_PER_GPU:
                    raise ValueError(tile)
                flat.append(int(gpu) * HARDWARE_TILES_PER_GPU + int(tile))
            else:
                flat.extend(int(gpu) * HARDWARE_TILES_PER_GPU + t for t in range(HARDWARE_TILES_PER_GPU))
        except ValueError:
            raise ValueError(f"GPU id {gpu_id!r} is not an Aurora GPU (0 ... 5) or tile (0.0 ... 5.1) id") from None
    return ",".join(map(str, flat))


def hierarchy_from(choice: str, env: Mapping[str, str]) -> str:
    """The device hierarchy jobs run under: the option's (``flat``, ``composite``, ``combined``), or with
    ``inherit`` the ``ZE_FLAT_DEVICE_HIERARCHY`` of ``env`` (the environment the launcher's jobs
    start from), FLAT when it is unset or empty (Level Zero's default)."""
    chosen = choice.strip().lower()
    if chosen != "inherit":
        if chosen.upper() not in HIERARCHIES:
            raise ValueError(f"launcher.platform_options.device_hierarchy: {choice!r} is not one of "
                             f"{', '.join(HIERARCHY_CHOICES)}")
        return chosen.upper()
    value = env.get(HIERARCHY_VARIABLE, "").strip()
    if not value:
        return DEFAULT_HIERARCHY
    if value.upper() not in HIERARCHIES:
        raise ValueError(f"${HIERARCHY_VARIABLE}={value!r} in the launcher's environment is not one of "
                         f"{', '.join(HIERARCHIES)} (or set launcher.platform_options.device_hierarchy)")
    return value.upper()


def _non_negative(_instance: Any, attribute: Any, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be 0 or more, got {value}")


@attrs.frozen
class AuroraOptions:
    cpu_ids: str = option(
        "1-51,53-103",
        "CPU (core) ids of one node that jobs are placed on, as ranges: 1-51,53-103 leaves the first "
        "core of each socket (0 and 52) to the system services ALCF reserves them for; 0-103 is every core.",
    )
    hyperthread_offset: int = option(
        104, "Id distance from a core to its second hardware thread (added to the binding when threads_per_core=2)."
    )
    gpus_per_node: int = option(6, "Intel GPUs per node.", validator=_non_negative)
    tiles_per_gpu: int = option(
        2,
        "Tiles per GPU, 1 or 2 (a Max 1550 has 2); every tile is one Balsam GPU id (GPU.tile: 0.0 0.1 1.0 ...); 1 makes "
        "every whole GPU one id (0 1 ... 5).",
    )
    gpu_cpus: str = option(
        "0,1,2:1-51 3,4,5:53-103",
        "The cores nearest each GPU (its socket), as GPU:ranges entries (a tile goes with its GPU; only "
        "cores of cpu_ids count): a GPU job gets cores near its tiles, and a whole-node job's ranks are "
        "spread over the sockets (a multi-node GPU job's: rank r near the tiles it takes from the mask). "
        "Empty: cores first-fit in id order, cut in id order.",
    )
    device_hierarchy: str = option(
        "inherit",
        "Level Zero device hierarchy of the jobs (ZE_FLAT_DEVICE_HIERARCHY, set with their "
        "ZE_AFFINITY_MASK): inherit takes the launcher's environment (unset: FLAT, Level Zero's "
        "default); flat (tiles are devices 0 ... 11), composite (GPU.tile ids) or combined, set for "
        "every job (multi-node and CPU-only jobs too).",
    )
    cpu_bind: str = option(
        "",
        "mpiexec --cpu-bind for jobs whose launch_params set none: empty computes list:... from the "
        "CPUs the launcher assigned to the job; or none, core, depth, numa, socket, thread, list:...",
    )
    mpiexec: str = option("mpiexec", "The PALS mpiexec command.")
    max_mpiexec_per_batch_job: int = option(
        1000,
        "Most mpiexec launches one batch job makes (Slingshot limit of about 1,000 on Aurora); the "
        "launcher stops acquiring jobs when it is reached. 0: no limit.",
        validator=_non_negative,
    )

    def validate(self) -> dict[str, str]:
        errors = cpu_ids_errors(self.cpu_ids) or cpu_ids_thread_errors(self.cpu_ids, self.hyperthread_offset)
        errors.update(tiles_per_gpu_errors(self.tiles_per_gpu))
        errors.update(gpu_cpu_map_errors("gpu_cpus", self.gpu_cpus) or self._gpu_cpus_errors())
        # cpu_bind and hyperthread_offset go to mpiexec as they are: a value PALS refuses (or a
        # sibling thread below its core) failed every job at its start, not the settings check.
        errors.update(pals_cpu_bind_errors("cpu_bind", self.cpu_bind))
        errors.update(non_negative_errors(self, "hyperthread_offset"))
        if self.device_hierarchy.strip().lower() not in HIERARCHY_CHOICES:
            errors["device_hierarchy"] = f"{self.device_hierarchy!r} is not one of {', '.join(HIERARCHY_CHOICES)}"
        return errors

    def _gpu_cpus_errors(self) -> dict[str, str]:
        # An entry for a GPU (or tile) the node does not have places nothing: its cores were never
        # preferred for any job, without a word.
        known = {str(gpu) for gpu in range(self.gpus_per_node)}
        if self.tiles_per_gpu in (1, HARDWARE_TILES_PER_GPU):
            known.update(tile_ids(self.gpus_per_node, self.tiles_per_gpu))
        unknown = [g for gpus, _ in parse_gpu_cpu_map(self.gpu_cpus) for g in gpus if g not in known]
        if not unknown:
            return {}
        return {"gpu_cpus": f"GPU {', '.join(unknown)} is not one of the node's GPUs "
                            f"(0 ... {self.gpus_per_node - 1}: gpus_per_node is {self.gpus_per_node})"}


def cpu_ids_thread_errors(text: str, hyperthread_offset: int) -> dict[str, str]:
    """``{"cpu_ids": why}`` when ``cpu_ids`` names hardware threads (ids from ``hyperthread_offset``
    on): the ids are cores, whose second threads the binding adds at threads_per_core=2, so core 105
    would be bound to thread 209, which does not exist (``0-207``, the node's 208 CPUs, is the easy
    mistake)."""
    threads = [i for i in parse_id_ranges(text) if i >= hyperthread_offset > 0]
    if not threads:
        return {}
    return {"cpu_ids": f"{format_id_ranges(threads)} are hardware threads, not cores: the ids are cores "
                       f"0-{hyperthread_offset - 1} (the default 1-51,53-103 leaves cores 0 and 52 to the system "
                       "services ALCF's guide reserves them for)"}


def tiles_per_gpu_errors(value: int) -> dict[str, str]:
    # 1 addresses whole GPUs, 2 each tile. Other values name tiles the Max 1550 does not have (3)
    # or none at all (0), and ZE_AFFINITY_MASK numbers the hardware's 2 tiles per GPU regardless.
    if value in (1, HARDWARE_TILES_PER_GPU):
        return {}
    return {"tiles_per_gpu": f"must be 1 (whole GPUs) or {HARDWARE_TILES_PER_GPU} (tiles; a Max 1550 has "
                             f"{HARDWARE_TILES_PER_GPU}), got {value}"}


class AuroraPlatform(Platform):
    """Aurora: PBS nodes from ``$PBS_NODEFILE``, 12 GPU tiles per node, PALS mpiexec."""

    name = "aurora"
    description = "ALCF Aurora: 104 cores and 6 Intel GPUs x 2 tiles per node, PBS, PALS mpiexec (ZE_AFFINITY_MASK)"
    default_scheduler = "pbs"
    mpirun_allows_node_packing = True
    options_schema = AuroraOptions
    #: ``-l system=`` and queues differ between the two machines; the rest is the same.
    system = "aurora"
    #: A job's threads_per_core is capped at it (core count, binding, serial pinning).
    hardware_threads_per_core = HARDWARE_THREADS_PER_CORE

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.cpu_ids = parse_id_ranges(self.options.cpu_ids, where="launcher.platform_options.cpu_ids")
        for name, problem in cpu_ids_thread_errors(self.options.cpu_ids, self.options.hyperthread_offset).items():
            raise ValueError(f"launcher.platform_options.{name}: {problem}")
        for name, problem in tiles_per_gpu_errors(self.options.tiles_per_gpu).items():
            raise ValueError(f"launcher.platform_options.{name}: {problem}")
        self.gpu_ids = tile_ids(self.options.gpus_per_node, self.options.tiles_per_gpu)
        self.gpu_groups = tile_groups(self.options.gpus_per_node, self.options.tiles_per_gpu)
        gpu_cpu_map = parse_gpu_cpu_map(self.options.gpu_cpus, where="launcher.platform_options.gpu_cpus")
        self.gpu_cpus = near_cpus_of(self.gpu_ids, gpu_cpu_map, self.cpu_ids,
                                     {tile: tile.split(".")[0] for tile in self.gpu_ids})
        #: The sockets (cores near the same GPUs): whole-node jobs' ranks are spread over them.
        self.cpu_domains = cpu_domains_of(self.cpu_ids, self.gpu_cpus)
        #: The device hierarchy of the jobs, read once (the launcher's environment does not change).
        self._hierarchy: Optional[str] = None
        if self.options.device_hierarchy.strip().lower() != "inherit":
            self._hierarchy = hierarchy_from(self.options.device_hierarchy, {})

    # -- inside an allocation -------------------------------------------------------------------
    def hostnames(self, env: Mapping[str, str]) -> list[str]:
        return hosts_from_node_file(env, "PBS_NODEFILE", inside="a PBS job")

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        # A $ZE_FLAT_DEVICE_HIERARCHY Level Zero does not know stops the launcher here, in one line,
        # rather than failing every GPU job.
        self.device_hierarchy()
        return [
            NodeInfo(node_id=host, hostname=host, cpu_ids=self.cpu_ids, gpu_ids=self.gpu_ids,
                     gpu_groups=self.gpu_groups if self.options.tiles_per_gpu > 1 else (), gpu_cpus=self.gpu_cpus)
            for host in self.hostnames(env)
        ]

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        return leading_job_number(env.get("PBS_JOBID", ""))

    # -- MPI ------------------------------------------------------------------------------------
    def cpu_binding(self, spec: LaunchSpec) -> str:
        # The job's own (checked: a value PALS refuses fails the job in one line), else the option's
        # (a blank one is empty: the tiles' binding or the computed list).
        own = job_cpu_bind(spec, CPU_BIND_KEYS)
        if own is not None:
            return own
        if not self.options.cpu_bind.strip() and self.whole_node_environment(spec):
            near_tiles = self.tile_rank_binding(spec)
            if near_tiles:
                return near_tiles
        return pick_cpu_binding(spec, CPU_BIND_KEYS, self.options.cpu_bind, self.cpu_ids,
                                hyperthread_offset=self.options.hyperthread_offset, cpu_domains=self.cpu_domains,
                                max_threads_per_core=self.hardware_threads_per_core)

    def tile_rank_binding(self, spec: LaunchSpec) -> Optional[str]:
        """``list:...`` for a multi-node GPU job (whole nodes, the mask of all tiles): each local rank
        on cores of the socket of the tiles it takes from that mask as ``tile_per_rank.sh`` (and ALCF's
        ``gpu_tile_compact.sh``) take them: rank ``r`` from mask entry ``r * k`` on, ``k`` the entries of
        ``gpus_per_rank`` ids, modulo the mask. The ranks spread evenly over both sockets put a
        2-node ``ranks_per_node=4, gpus_per_rank=1`` job's local ranks 2 and 3 on the second socket
        while their tiles 2 and 3 (GPU 1) sit on the first. Each socket's cores are cut among its
        ranks, the same count to every rank (12 ranks of one tile: ALCF's ``list:1-8:...:93-100``,
        as before). None (the even spread stands) for a fractional or non-integer ``gpus_per_rank``
        (several ranks to a tile), a rank whose tiles are not all near one socket (``gpus_per_rank=12``;
        2 ranks of 4 tiles, tiles 4-7 being GPUs 2 and 3), or too few cores for the threads."""
        per_rank_gpus = float(spec.gpus_per_rank)
        if per_rank_gpus < 1 or not per_rank_gpus.is_integer() or not self.cpu_domains or not self.gpu_ids:
            return None
        mask = affinity_mask(self.gpu_ids, self.device_hierarchy()).split(",")
        entries_per_id = max(1, len(mask) // len(self.gpu_ids))  # 2: whole GPUs (tiles_per_gpu=1) in FLAT ids
        step = int(per_rank_gpus) * entries_per_id
        domain_of = {cpu: index for index, domain in enumerate(self.cpu_domains) for cpu in domain}
        near = dict(self.gpu_cpus)
        rank_domains = []
        for rank in range(max(1, spec.ranks_per_node)):
            # All the rank's tiles, not its first: a rank of 12 tiles (or of tiles 4-7, GPUs 2 and 3)
            # is near both sockets and keeps the even spread (1-51,53-103), not half the cores.
            first = rank * step
            rank_gpus = {self.gpu_ids[((first + e) % len(mask)) // entries_per_id] for e in range(step)}
            domains = {domain_of[cpu] for gpu_id in rank_gpus for cpu in near.get(gpu_id, ()) if cpu in domain_of}
            if len(domains) != 1:
                return None
            rank_domains.append(domains.pop())
        per_core = capped_threads_per_core(spec.threads_per_core, self.hardware_threads_per_core)
        cores_needed = max(1, -(-max(1, spec.threads_per_rank) // per_core))
        counts = Counter(rank_domains)
        per_rank = min(len(self.cpu_domains[d]) // n for d, n in counts.items())
        if per_rank < cores_needed:
            return None
        taken: Counter = Counter()
        parts = []
        for d in rank_domains:
            cores = self.cpu_domains[d][taken[d] * per_rank : (taken[d] + 1) * per_rank]
            taken[d] += 1
            parts.append(format_id_ranges(hardware_thread_ids(cores, per_core, self.options.hyperthread_offset)))
        return "list:" + ":".join(parts)

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        params = dict(spec.launch_params)
        depth = first_launch_param(params, DEPTH_KEYS) or spec.threads_per_rank
        bind = self.cpu_binding(spec)
        self._warn_relative_binding_on_a_shared_node(spec, bind)
        args = [
            *shlex.split(self.options.mpiexec),
            "-n", str(spec.num_ranks),
            "--ppn", str(max(1, spec.ranks_per_node)),
            "--hosts", ",".join(spec.hostnames),
            "--cpu-bind", bind,
            "-d", str(depth),
            "--envall",
        ]
        for name, value in self.whole_node_environment(spec).items():
            args += ["--env", f"{name}={value}"]
        passed = launch_params_to_pass(spec, args, RESERVED_OPTIONS, params=params, duplicates=DUPLICATE_FLAGS)
        return args + launch_param_args(passed, skip=CPU_BIND_KEYS + DEPTH_KEYS)

    def whole_node_environment(self, spec: LaunchSpec) -> dict[str, str]:
        """The mask of all of a node's tiles (and its hierarchy) for a multi-node GPU job, which the
        launcher gives no GPU ids (it owns whole nodes): without a mask, a wrapper that narrows
        Balsam's mask per rank (tile_per_rank.sh, docs/platforms/aurora.md) leaves every rank on all
        12 tiles. It is the same on every node, so it goes on the line as PALS ``--env``, which the
        ranks get over ``--envall`` and whatever the job's preamble exported. Nodes are not narrowed
        per allocation here (``discover_nodes`` gives every node all tiles), so it is all of them.
        The launcher asks for it too (``Platform.whole_node_environment``), to name an app's own
        ``ZE_AFFINITY_MASK`` it replaces in the ranks in its warning, as for a one-node job."""
        if len(spec.hostnames) < 2 or spec.gpus_per_rank <= 0 or any(spec.gpu_ids):
            return {}
        return self.gpu_environment(self.gpu_ids)

    def _warn_relative_binding_on_a_shared_node(self, spec: LaunchSpec, bind: str) -> None:
        """A job given part of a node (node packing) is bound to the cores it was assigned only by
        the computed ``list:...``: PALS lays ``depth`` and ``core`` out from core 0 of each node, so
        packed jobs with ``--cpu-bind depth -d 3`` (ALCF's usual line) all run on the same cores,
        reserved core 0 included. A job assigned exactly the node's first cores (on every node) is
        where PALS puts it: no warning. Once per app and binding (:func:`balsam.util.first_warning`)."""
        if not pals_binding_overlaps(spec, bind, self.cpu_ids):
            return
        kind = bind.split(":", 1)[0].strip().lower()
        assigned = set(spec.cpu_ids[0])
        if not first_warning((spec.app_id, "relative cpu-bind on a shared node", kind)):
            return
        of = "" if spec.job_id is None else f" of job {spec.job_id}"
        logger.warning("--cpu-bind %s%s (app %s) on a node it may share: PALS binds its ranks from core 0 of the node "
                       "(core 0 is reserved for the system), not to the cores balsam assigned it (%s), so jobs "
                       "packed on the node overlap; leave cpu-bind unset for a list:... of its own cores (warned "
                       "once per app)", bind, of, spec.app_id, format_id_ranges(sorted(assigned)))

    @staticmethod
    def serial_startup_param_problems(params: Mapping[str, Any]) -> dict[str, str]:
        # launcher.serial_mode_startup_params as check-settings warns of them (PALS mpiexec's options).
        return pals_serial_startup_param_problems(params, CPU_BIND_KEYS)

    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        # The computed default binding (list:<every core>) would leave out the second hardware
        # threads the workers pin threads_per_core=2 tasks to.
        return {"cpu-bind": "none"}

    #: CPU ids are cores: a job at threads_per_core N needs 1/N of its threads in ids (task_cpu_ids and
    #: the binding add the siblings).
    cpu_ids_are_cores = True

    def task_cpu_ids(self, cpu_ids: Sequence[int], threads_per_core: int) -> tuple[int, ...]:
        # As the mpiexec binding does: a core's second hardware thread is core + hyperthread_offset.
        return tuple(hardware_thread_ids(cpu_ids, threads_per_core, self.options.hyperthread_offset,
                                         max_threads_per_core=self.hardware_threads_per_core))

    def device_hierarchy(self) -> str:
        """The Level Zero device hierarchy the jobs run under (see :func:`hierarchy_from`). Jobs start
        from this process's environment (the mpi-mode launcher's, or the serial-mode worker's, which
        mpiexec --envall gave the launcher's), so with ``inherit`` that is where it is read."""
        if self._hierarchy is None:
            self._hierarchy = hierarchy_from(self.options.device_hierarchy, os.environ)
        return self._hierarchy

    def gpu_environment(self, gpu_ids: Sequence[str]) -> dict[str, str]:
        if not gpu_ids:
            return {}
        hierarchy = self.device_hierarchy()
        # The mode goes with the mask: a job's own or a module's ZE_FLAT_DEVICE_HIERARCHY could
        # otherwise read the mask in another numbering and expose other tiles, or none.
        return {
            "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
            HIERARCHY_VARIABLE: hierarchy,
            "ZE_AFFINITY_MASK": affinity_mask(gpu_ids, hierarchy),
        }

    def job_environment(self, gpu_ids: Sequence[str]) -> dict[str, str]:
        """The mask and its hierarchy for a job given tiles; for every other job (CPU-only, or
        multi-node: whole nodes, no tiles assigned) the hierarchy the option ``device_hierarchy``
        names, when it names one: "set it for every job". With ``inherit`` such a job keeps the
        launcher's. A multi-node GPU job's mask (every tile of a node) is on its mpiexec line
        (:meth:`whole_node_environment`, which needs the job's node count and GPUs per rank)."""
        if gpu_ids:
            return self.gpu_environment(gpu_ids)
        if self.options.device_hierarchy.strip().lower() == "inherit":
            return {}
        return {HIERARCHY_VARIABLE: self.device_hierarchy()}

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
                # qsub_flags: split and appended to qsub by the PBS driver (-x qsub_flags="-W depend=afterok:123")
                "optional_batch_job_params": {"filesystems": "home:flare", "place": "scatter", "qsub_flags": ""},
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
        defaults["scheduler"]["optional_batch_job_params"] = {"filesystems": "home", "place": "scatter", "qsub_flags": ""}
        return defaults

