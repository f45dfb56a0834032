"""Theta (ALCF, Cobalt): the KNL partition and ThetaGPU.

- ``theta-knl``: Cray XC40 nodes with one 64-core Xeon Phi 7230 (4 hardware threads per core). The
  allocation's nodes are ``$COBALT_PARTNAME`` nid ranges (``1001-1005,1030``, hosts ``nid01001``...).
  Runs go through ALPS ``aprun -n -N -L <nids> -cc <affinity> -d -j``; ALPS gives every aprun whole
  nodes, so mpi mode never packs runs on a node.
- ``thetagpu``: NVIDIA DGX A100 nodes (2 x 64-core AMD EPYC 7742, 8 A100-SXM4-40GB) listed in
  ``$COBALT_NODEFILE``; Open MPI ``mpirun``. With ``-x mig_count=2|3|7`` the job template splits every
  GPU into MIG instances and records each node's ``nvidia-smi -L``; the MIG UUIDs then become the
  node's GPU ids (and ``CUDA_VISIBLE_DEVICES`` values). The launcher's own node is asked live
  (``nvidia-smi -L``) first; a record counts only if written after the allocation started
  (``$COBALT_NODEFILE``'s mtime), and the template removes the records of an earlier job when this
  one uses no MIG.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

import attrs

from balsam.options import OptionsError, option
from balsam.platform import (
    OPENMPI_RESERVED_OPTIONS,
    LaunchSpec, NodeInfo, Platform, capped_threads_per_core, cpu_ids_beyond_cores_errors, cpu_ids_errors,
    checked_launch_param, cuda_visible_only, file_mtime, first_launch_param, hardware_thread_ids, hosts_from_node_file,
    launch_option_name,
    launch_param_args, launch_params_to_pass, leading_job_number, nvidia_smi_list, parse_id_ranges,
    parse_nvidia_smi_list, read_fresh_gpu_list,
)

logger = logging.getLogger("balsam.platform.theta")

#: launch_params keys naming aprun's -cc (0.7 users wrote cpu_affinity).
AFFINITY_KEYS = ("cpu_affinity", "cc", "-cc")
#: launch_params keys naming aprun's -d (CPUs per rank) and -j (CPUs per compute unit, i.e. hardware
#: threads per core): the job's value replaces the computed one, never a second -d or -j.
DEPTH_KEYS = ("depth", "d", "-d", "cpus-per-pe", "--cpus-per-pe")
THREADS_PER_CORE_KEYS = ("j", "-j", "cpus-per-cu", "--cpus-per-cu")
#: aprun options the line sets from balsam's placement (names without dashes, any spelling of a
#: launch_params key) -> the option of the line: a launch param naming one is not passed (warned
#: once per app and key), since the ranks would not run where balsam placed them.
KNL_RESERVED_OPTIONS = {
    "n": "-n", "pes": "-n",
    "N": "-N", "pes-per-node": "-N",
    "L": "-L", "node-list": "-L", "l": "-L", "node-list-file": "-L",
}
#: The same for ThetaGPU's Open MPI mpirun (the launcher's map, kept in balsam.platform).
GPU_RESERVED_OPTIONS = OPENMPI_RESERVED_OPTIONS
#: launch_params keys naming mpirun's --bind-to: the job's value replaces ThetaGPU's ``none``.
BIND_TO_KEYS = ("bind-to", "--bind-to")
#: Flags ThetaGPU's line has already: a launch param naming one is dropped without a warning.
GPU_DUPLICATE_FLAGS = ("oversubscribe",)
#: Xeon Phi 7230: 64 cores of 4 hardware threads; core c's threads are c, c+64, c+128, c+192.
KNL_CORES, KNL_THREADS_PER_CORE = 64, 4
#: ALPS allows about 980 concurrent aprun per batch job on Theta (Balsam 0.7's Theta slides: "Max
#: ~980 concurrent aprun"); one past it fails to launch. mpi mode starts one aprun per job.
KNL_MAX_CONCURRENT_APRUNS = 980
#: DGX A100: 2 x 64 cores of 2 hardware threads; core c's second thread is c+128.
DGX_CORES, DGX_THREADS_PER_CORE = 128, 2


def expand_nid_ranges(text: str) -> list[int]:
    """``"1001-1003,1030"`` -> ``[1001, 1002, 1003, 1030]`` (``$COBALT_PARTNAME`` on Theta)."""
    nids: list[int] = []
    # Blanks around a part or a range end (a trailing newline of a value read from a file, a tab,
    # ", ") are no part of a nid; blanks inside one are: "3824\n3826" is two nids without their
    # comma, and joined up it read as nid 38243826, a node the allocation does not have.
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = (s.strip() for s in part.partition("-"))
        if not low.isdecimal() or (sep and not high.isdecimal()):
            raise ValueError(f"$COBALT_PARTNAME: {part!r} is not a nid or a nid range")
        if sep and int(high) < int(low):
            # range() of it is empty: the allocation's nodes would be dropped without a word
            raise ValueError(f"$COBALT_PARTNAME: nid range {part!r} runs backwards")
        nids.extend(range(int(low), int(high) + 1) if sep else [int(low)])
    return nids


def core_ids_errors(text: str, cores: int, threads_per_core: int) -> dict[str, str]:
    """``{"cpu_ids": why}`` when a ``cpu_ids`` option (core ids) names ids from ``cores`` on, which are
    hardware threads of cores ``0 ...``: the node's logical CPUs as ``lscpu`` lists them (KNL
    ``0-255``, DGX A100 ``0-255``) are the easy mistake. Counted as cores, every core was handed to
    several jobs at once and the pinning of a job at threads_per_core 2 or more named CPUs the node
    does not have (core "69" -> 69, 133, 197, 261 on a KNL). ``{}`` when none (or the text does not
    parse: :func:`cpu_ids_errors` says why)."""
    return cpu_ids_beyond_cores_errors(text, cores, threads_per_core)


def _check_core_ids(text: str, cores: int, threads_per_core: int) -> None:
    for name, problem in core_ids_errors(text, cores, threads_per_core).items():
        raise OptionsError(f"launcher.platform_options.{name}: {problem}")


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


# -- Theta KNL --------------------------------------------------------------------------------------


@attrs.frozen
class ThetaKNLOptions:
    cpu_ids: str = option("0-63", "CPU (core) ids of one KNL node, as ranges.")
    cpu_affinity: str = option(
        "depth",
        "aprun -cc for jobs whose launch_params set none (cpu_affinity): depth binds each rank to -d "
        "cores; none leaves placement to the kernel.",
    )
    aprun: str = option("aprun", "The ALPS aprun command.")

    def validate(self) -> dict[str, str]:
        # cpu_affinity goes to aprun -cc as it is: a value ALPS refuses failed every job at its start.
        problem = aprun_cc_problem(self.cpu_affinity)
        return {**(cpu_ids_errors(self.cpu_ids) or core_ids_errors(self.cpu_ids, KNL_CORES, KNL_THREADS_PER_CORE)),
                **({"cpu_affinity": problem} if problem else {})}


#: aprun -cc keywords (aprun(1)); otherwise a CPU list: ids, ranges and x (no binding), ',' between
#: a PE's CPUs and ':' between the PEs' lists.
APRUN_CC_KEYWORDS = ("cpu", "depth", "numa_node", "none")
_CC_ITEM = r"(\d+(-\d+)?|x)"
APRUN_CC_LIST = re.compile(rf"{_CC_ITEM}(,{_CC_ITEM})*(:{_CC_ITEM}(,{_CC_ITEM})*)*")


def aprun_cc_value(value: Any) -> str:
    """``value`` as aprun ``-cc`` takes it: without surrounding blanks (which the settings check
    allowed, then aprun refused ``' depth '``), a keyword in lower case (``None``, ``Depth``)."""
    text = str(value).strip()
    return text.lower() if text.lower() in APRUN_CC_KEYWORDS else text


def aprun_cc_problem(value: str) -> Optional[str]:
    """Why ``value`` is not an aprun ``-cc`` binding (None when it is one)."""
    text = aprun_cc_value(value)
    if text in APRUN_CC_KEYWORDS or APRUN_CC_LIST.fullmatch(text):
        return None
    return f"expected {', '.join(APRUN_CC_KEYWORDS)} or a CPU list like 0-3,8 (aprun -cc), got {value!r}"


class ThetaKNLPlatform(Platform):
    name = "theta-knl"
    description = "ALCF Theta KNL (retired): 64-core Xeon Phi nodes, Cobalt, ALPS aprun"
    default_scheduler = "cobalt"
    # ALPS gives each aprun whole nodes: two runs never share one.
    mpirun_allows_node_packing = False
    options_schema = ThetaKNLOptions
    #: A job's threads_per_core above 4 counts as 4, in its cores, its aprun -j and its serial
    #: pinning alike, with the launcher's warning (aprun refuses -j above 4: the run failed at
    #: launch, while serial mode capped the pinning without a word and counted too few cores).
    hardware_threads_per_core = KNL_THREADS_PER_CORE
    #: The GPU ids of one node: none on KNL. Said (not left unset) for the elastic queue, which reads
    #: an empty list as nodes without a GPU and counts the backlog as their launchers lease it
    #: (no job that needs a GPU); unset, it counted GPU jobs that no KNL launcher ever leases.
    gpu_ids: tuple[str, ...] = ()

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.cpu_ids = parse_id_ranges(self.options.cpu_ids, where="launcher.platform_options.cpu_ids")
        _check_core_ids(self.options.cpu_ids, KNL_CORES, KNL_THREADS_PER_CORE)

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        partition = env.get("COBALT_PARTNAME", "")
        if not partition.strip():
            raise RuntimeError("$COBALT_PARTNAME is not set: not inside a Cobalt job on Theta")
        return [NodeInfo(node_id=str(nid), hostname=f"nid{nid:05d}", cpu_ids=self.cpu_ids, gpu_ids=self.gpu_ids)
                for nid in expand_nid_ranges(partition)]

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        return leading_job_number(env.get("COBALT_JOBID", ""))

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        params = dict(spec.launch_params)
        # The check the option cpu_affinity gets in settings.yml: aprun refused the value at the
        # run's start, with its own message in job.out and nothing naming the launch param. The
        # error names the key the job used (cpu_affinity, cc or -cc), or the serial workers' setting.
        own = checked_launch_param(spec, AFFINITY_KEYS, aprun_cc_problem, "an aprun -cc")
        affinity = aprun_cc_value(own or self.options.cpu_affinity)
        # aprun -L takes node ids; the launcher knows hosts nid01001 ...: back to the numbers.
        nids = [str(int(h[3:])) if re.fullmatch(r"nid\d+", h) else h for h in spec.hostnames]
        args = [
            *shlex.split(self.options.aprun),
            "-n", str(spec.num_ranks),
            "-N", str(max(1, spec.ranks_per_node)),
            "-L", ",".join(nids),
            "-cc", str(affinity),
            "-d", str(first_launch_param(params, DEPTH_KEYS) or spec.threads_per_rank),
            "-j", str(first_launch_param(params, THREADS_PER_CORE_KEYS)
                      or capped_threads_per_core(spec.threads_per_core, KNL_THREADS_PER_CORE)),
        ]
        passed = launch_params_to_pass(spec, args, KNL_RESERVED_OPTIONS, params=params)
        # aprun's options are single-dash
        return args + launch_param_args(passed, skip=AFFINITY_KEYS + DEPTH_KEYS + THREADS_PER_CORE_KEYS, prefix="-")

    def gpu_environment(self, gpu_ids: Any) -> dict[str, str]:
        return {}

    @staticmethod
    def serial_startup_param_problems(params: Mapping[str, Any]) -> dict[str, str]:
        # launcher.serial_mode_startup_params as check-settings warns of them: cpu_affinity is aprun -cc.
        names = {launch_option_name(k) for k in AFFINITY_KEYS}
        found = {}
        for key, value in params.items():
            if launch_option_name(str(key)) not in names or (key == "cpu_affinity" and str(value).lower() == "none"):
                continue  # cpu_affinity: none (any case) is balsam's own: the workers get -cc none
            problem = aprun_cc_problem(str(value))
            if problem:
                found[str(key)] = problem
        return found

    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        # aprun binds every rank with -cc depth unless told: the worker would be confined to one core.
        return {"cc": "none"}

    #: CPU ids are cores: a job at threads_per_core N needs 1/N of its threads in ids (task_cpu_ids and
    #: the binding add the siblings).
    cpu_ids_are_cores = True

    def task_cpu_ids(self, cpu_ids: Sequence[int], threads_per_core: int) -> tuple[int, ...]:
        return tuple(hardware_thread_ids(cpu_ids, threads_per_core, KNL_CORES, max_threads_per_core=KNL_THREADS_PER_CORE))

    @classmethod
    def recognizes(cls, hostname: str, env: Mapping[str, str]) -> bool:
        host = hostname.lower()
        return host.startswith("thetalogin") or (host.startswith("nid") and ".theta" in host)

    def settings_defaults(self) -> dict[str, Any]:
        return {
            "launcher": {"platform": self.name, "mpirun_allows_node_packing": False,
                         # one worker per node, unbound: it pins its own tasks
                         "serial_mode_startup_params": {"cc": "none"},
                         # the generic 1000 is above what ALPS lets one batch job run at once
                         "max_concurrent_mpiruns": KNL_MAX_CONCURRENT_APRUNS},
            "scheduler": {
                "name": "cobalt",
                "allowed_queues": {
                    "debug-cache-quad": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 1},
                    "debug-flat-quad": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 1},
                    "default": {"max_nodes": 4010, "max_walltime": 1440, "max_queued_jobs": 20},
                },
                "allowed_projects": ["datascience"],
                # attrs: `#COBALT --attrs <value>` when not empty (e.g. -x attrs=mcdram=cache:numa=quad);
                # qsub_flags: split and appended to qsub by the Cobalt driver (-x qsub_flags="--dependencies 6")
                "optional_batch_job_params": {"singularity_prime_cache": "no", "attrs": "", "qsub_flags": ""},
            },
        }

    def job_template(self) -> Optional[str]:
        return _template("theta-knl-job-template.sh")


# -- ThetaGPU ---------------------------------------------------------------------------------------


@attrs.frozen
class ThetaGPUOptions:
    cpu_ids: str = option("0-127", "CPU (core) ids of one DGX A100 node, as ranges.")
    gpu_ids: str = option("0,1,2,3,4,5,6,7", "GPU ids of one node when MIG is off.")
    gpu_list_dir: str = option(
        "/var/tmp",
        "Where the job template records each node's `nvidia-smi -L` (balsam-<host>-gpulist.txt) after "
        "creating MIG instances, and where the launcher reads them (the template renders this value); "
        "records older than the allocation are ignored.",
    )
    discover_mig: bool = option(
        True, "Run `nvidia-smi -L` on the launcher's node to find MIG instances (it wins over that node's record)."
    )
    mpirun: str = option("mpirun", "The Open MPI mpirun command.")

    def validate(self) -> dict[str, str]:
        return cpu_ids_errors(self.cpu_ids) or core_ids_errors(self.cpu_ids, DGX_CORES, DGX_THREADS_PER_CORE)


class ThetaGPUPlatform(Platform):
    name = "thetagpu"
    description = "ALCF ThetaGPU (retired): DGX A100 nodes, 8 A100 (MIG: -x mig_count=2|3|7), Cobalt, Open MPI"
    default_scheduler = "cobalt"
    mpirun_allows_node_packing = True
    options_schema = ThetaGPUOptions
    #: A job's threads_per_core above 2 counts as 2 (cores, serial pinning), with the launcher's warning.
    hardware_threads_per_core = DGX_THREADS_PER_CORE

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.cpu_ids = parse_id_ranges(self.options.cpu_ids, where="launcher.platform_options.cpu_ids")
        _check_core_ids(self.options.cpu_ids, DGX_CORES, DGX_THREADS_PER_CORE)
        self.gpu_ids = tuple(g.strip() for g in self.options.gpu_ids.split(",") if g.strip())

    def _gpu_ids(self, host: str, local: bool = False,
                 not_before: Optional[float] = None) -> tuple[tuple[str, ...], dict[str, str]]:
        """MIG UUIDs (and whole GPUs beside them) when the node's GPUs are split, else ``gpu_ids``:
        from ``nvidia-smi -L`` on the launcher's own node (``local``), else from the node's record
        if written at or after ``not_before`` (the allocation's start; an older one is an earlier
        job's, its instances perhaps destroyed). With them, MIG UUID -> the index of its GPU."""
        text = nvidia_smi_list() if local and self.options.discover_mig else None
        if text is None:
            text = read_fresh_gpu_list(self.options.gpu_list_dir, (host,), not_before)
        if text:
            devices = parse_nvidia_smi_list(text)
            migs = devices.mig_ids(self.gpu_ids)
            if migs:
                logger.info("%s: %d GPU ids, MIG instances and whole GPUs", host, len(migs))
                return tuple(migs), {uuid: gpu for gpu, uuids in devices.migs.items() for uuid in uuids}
        return self.gpu_ids, {}

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        hosts = hosts_from_node_file(env, "COBALT_NODEFILE", inside="a Cobalt job on ThetaGPU")
        here = socket.gethostname().split(".")[0]
        started = file_mtime(env.get("COBALT_NODEFILE"))  # Cobalt writes it when the allocation starts
        nodes, parents = [], {}
        for host in hosts:
            gpu_ids, parent = self._gpu_ids(host, local=host.split(".")[0] == here, not_before=started)
            parents.update(parent)
            nodes.append(NodeInfo(node_id=host, hostname=host, cpu_ids=self.cpu_ids, gpu_ids=gpu_ids))
        # An allocation of part of a node (the single-gpu queue: Cobalt sets CUDA_VISIBLE_DEVICES to
        # the job's GPU) names its GPUs there: the other seven are not this job's to hand out.
        return cuda_visible_only(nodes, env, parents)

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        return leading_job_number(env.get("COBALT_JOBID", ""))

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        args = [*shlex.split(self.options.mpirun)]
        hostfile = os.environ.get("COBALT_NODEFILE")
        if hostfile:
            args += ["-hostfile", hostfile]
        bind_to = first_launch_param(spec.launch_params, BIND_TO_KEYS) or "none"
        args += ["--oversubscribe", "--bind-to", str(bind_to), "-n", str(spec.num_ranks),
                 "-npernode", str(max(1, spec.ranks_per_node))]
        # Open MPI starts remote ranks with its own environment: forward what the job was given.
        for name in spec.env_names:
            args += ["-x", name]
        args += ["--host", ",".join(spec.hostnames)]
        passed = launch_params_to_pass(spec, args, GPU_RESERVED_OPTIONS, duplicates=GPU_DUPLICATE_FLAGS)
        return args + launch_param_args(passed, skip=BIND_TO_KEYS)

    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        return {}  # the mpirun line has --bind-to none already

    #: CPU ids are cores: a job at threads_per_core N needs 1/N of its threads in ids (task_cpu_ids and
    #: the binding add the siblings).
    cpu_ids_are_cores = True

    def task_cpu_ids(self, cpu_ids: Sequence[int], threads_per_core: int) -> tuple[int, ...]:
        return tuple(hardware_thread_ids(cpu_ids, threads_per_core, DGX_CORES, max_threads_per_core=DGX_THREADS_PER_CORE))

    @classmethod
    def recognizes(cls, hostname: str, env: Mapping[str, str]) -> bool:
        return hostname.lower().startswith("thetagpu")

    def settings_defaults(self) -> dict[str, Any]:
        return {
            "launcher": {"platform": self.name, "mpirun_allows_node_packing": True,
                         "serial_mode_startup_params": {}},
            "scheduler": {
                "name": "cobalt",
                "allowed_queues": {
                    "full-node": {"max_nodes": 21, "max_walltime": 1440, "max_queued_jobs": 3},
                },
                "allowed_projects": ["datascience"],
                # qsub_flags: split and appended to qsub by the Cobalt driver
                "optional_batch_job_params": {"mig_count": "0", "qsub_flags": ""},
            },
        }

    def job_template(self) -> Optional[str]:
        return _template("thetagpu-job-template.sh")
