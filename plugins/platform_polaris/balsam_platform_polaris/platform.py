"""Polaris (ALCF): HPE Apollo 6500 nodes with one 32-core AMD EPYC 7543P (64 hardware threads) and
four NVIDIA A100 GPUs; PBS Pro; PALS ``mpiexec``.

GPU ids are handed out in the order ``3, 2, 1, 0`` (Balsam 0.7's ``PolarisNode``): on Polaris GPU 3
sits closest to cores 0-7, GPU 2 to cores 8-15 and so on (option ``gpu_cpus``). A GPU job gets
cores of its GPUs' NUMA domains (four one-core one-GPU jobs: GPU 3 with core 0, GPU 2 with core 8,
GPU 1 with 16, GPU 0 with 24), a free GPU whose domain has idle cores is taken before one whose
cores are busy, and CPU-only jobs take cores near busy GPUs first (the node manager's rules).

MIG: when a node's GPUs are split into MIG instances, the instances (their ``MIG-...`` UUIDs) become
the node's GPU ids and ``CUDA_VISIBLE_DEVICES`` names them; a GPU left whole beside them keeps its
index. For the node the launcher runs on they come from ``nvidia-smi -L`` itself (option
``discover_mig``); for the others, and when that cannot run, from
``<gpu_list_dir>/balsam-<host>-gpulist.txt`` (``nvidia-smi -L`` output recorded per node, Balsam
0.7's convention), if it was written after the allocation started (``$PBS_NODEFILE``'s mtime): an
older record is an earlier job's, its MIG instances perhaps gone.

When the launcher's environment sets ``CUDA_VISIBLE_DEVICES`` (an allocation of part of a node),
jobs get only the GPU ids it lists (and the MIG instances of the GPUs it lists).
"""

from __future__ import annotations

import logging
import re
import shlex
import socket
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

import attrs

from balsam.options import OptionsError, option
from balsam.platform import (
    PALS_RESERVED_OPTIONS, pals_binding_overlaps,
    LaunchSpec, NodeInfo, Platform, cpu_ids_beyond_cores_errors, cpu_ids_errors, cuda_visible_only, file_mtime,
    first_launch_param, format_id_ranges,
    gpu_cpu_map_errors, hardware_thread_ids, hosts_from_node_file, is_mig_id, launch_param_args,
    launch_params_to_pass, leading_job_number, near_cpus_of, non_negative_errors, nvidia_smi_list,
    pals_cpu_bind_errors,
    pals_serial_startup_param_problems, parse_gpu_cpu_map, parse_id_ranges, parse_nvidia_smi_list, pick_cpu_binding,
    read_fresh_gpu_list,
)
from balsam.util import first_warning

logger = logging.getLogger("balsam.platform.polaris")

CPU_BIND_KEYS = ("cpu_bind", "cpu-bind", "--cpu-bind")
#: ``{"d": "8"}`` is ``-d 8`` too (see ``launch_option``): it replaces the computed depth, never a second ``-d``.
DEPTH_KEYS = ("depth", "d", "-d", "--depth")
#: mpiexec options the line sets from balsam's placement (PALS's map, kept in balsam.platform: any
#: spelling of a launch_params key) -> the option of the line: a launch param naming one is not
#: passed (warned once per app and key), since the ranks would not run where balsam placed them.
RESERVED_OPTIONS = PALS_RESERVED_OPTIONS
#: Hardware threads per core of the EPYC 7543P (SMT 2).
HARDWARE_THREADS_PER_CORE = 2


@attrs.frozen
class PolarisOptions:
    cpu_ids: str = option("0-31", "CPU (core) ids of one node that jobs are placed on, as ranges.")
    hyperthread_offset: int = option(
        32, "Id distance from a core to its second hardware thread (added to the binding when threads_per_core=2)."
    )
    gpu_ids: str = option(
        "3,2,1,0", "GPU ids of one node in the order jobs get them (Polaris: GPU 3 is closest to cores 0-7)."
    )
    gpu_cpus: str = option(
        "3:0-7 2:8-15 1:16-23 0:24-31",
        "The cores nearest each GPU (its NUMA domain), as GPU:ranges entries: a GPU job gets cores near "
        "its GPUs, and a MIG instance those of its GPU. Empty: cores first-fit in id order.",
    )
    cpu_bind: str = option(
        "",
        "mpiexec --cpu-bind for jobs whose launch_params set none: empty computes list:... from the "
        "CPUs the launcher assigned to the job; or none, core, depth, numa, socket, thread, list:...",
    )
    mpiexec: str = option("mpiexec", "The PALS mpiexec command.")
    gpu_list_dir: str = option(
        "/var/tmp",
        "Directory of per-node `nvidia-smi -L` records (balsam-<host>-gpulist.txt); MIG instances listed "
        "there become the node's GPU ids (records older than the allocation are ignored). Empty: only "
        "the launcher's own node is asked.",
    )
    discover_mig: bool = option(
        True, "Run `nvidia-smi -L` on the launcher's node to find MIG instances (it wins over that node's record)."
    )

    def validate(self) -> dict[str, str]:
        # cpu_bind and hyperthread_offset go to mpiexec as they are: a value PALS refuses (or a
        # sibling thread below its core) failed every job at its start, not the settings check.
        errors = {**(cpu_ids_errors(self.cpu_ids)
                     or cpu_ids_beyond_cores_errors(self.cpu_ids, self.hyperthread_offset)),
                  **pals_cpu_bind_errors("cpu_bind", self.cpu_bind), **non_negative_errors(self, "hyperthread_offset")}
        errors.update(gpu_cpu_map_errors("gpu_cpus", self.gpu_cpus) or self._gpu_cpus_errors())
        return errors

    def _gpu_cpus_errors(self) -> dict[str, str]:
        # An entry for a GPU that gpu_ids does not name places nothing: its cores were never
        # preferred for any job, without a word.
        gpu_ids = [g.strip() for g in self.gpu_ids.split(",") if g.strip()]
        unknown = [g for gpus, _ in parse_gpu_cpu_map(self.gpu_cpus) for g in gpus if g not in gpu_ids]
        if not unknown:
            return {}
        return {"gpu_cpus": f"GPU {', '.join(unknown)} is not in gpu_ids ({', '.join(gpu_ids) or 'none'})"}


def _short(host: str) -> str:
    return host.split(".")[0]


class PolarisPlatform(Platform):
    name = "polaris"
    description = "ALCF Polaris: 32 cores and 4 NVIDIA A100 per node (MIG aware), PBS, PALS mpiexec"
    default_scheduler = "pbs"
    mpirun_allows_node_packing = True
    options_schema = PolarisOptions
    #: A job's threads_per_core is capped at it (core count, binding, serial pinning).
    hardware_threads_per_core = HARDWARE_THREADS_PER_CORE

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.cpu_ids = parse_id_ranges(self.options.cpu_ids, where="launcher.platform_options.cpu_ids")
        # 0-63 (the node's 64 logical CPUs) counted every core twice: jobs packed on a core and its
        # second thread, and bindings naming CPUs 64-95 the node does not have.
        for name, problem in cpu_ids_beyond_cores_errors(self.options.cpu_ids, self.options.hyperthread_offset).items():
            raise OptionsError(f"launcher.platform_options.{name}: {problem}")
        self.gpu_ids = tuple(g.strip() for g in self.options.gpu_ids.split(",") if g.strip())
        self.gpu_cpu_map = parse_gpu_cpu_map(self.options.gpu_cpus, where="launcher.platform_options.gpu_cpus")

    # -- inside an allocation -------------------------------------------------------------------
    def hostnames(self, env: Mapping[str, str]) -> list[str]:
        return hosts_from_node_file(env, "PBS_NODEFILE", inside="a PBS job")

    def _local_list(self) -> Optional[str]:
        return nvidia_smi_list() if self.options.discover_mig else None

    def node_gpus(
        self, host: str, local: bool, not_before: Optional[float] = None
    ) -> tuple[tuple[str, ...], dict[str, str]]:
        """The node's GPU ids (MIG UUIDs when its GPUs are split, GPUs in affinity order, else
        ``gpu_ids``) and, for each MIG instance, the GPU it is part of.

        The launcher's own node (``local``) is asked live first: a record there may be an earlier
        job's. A record (this node's when ``nvidia-smi`` cannot run, the others') counts only if
        written at or after ``not_before`` (the allocation's start)."""
        return self._gpus_of(host, self._gpu_list(host, local, not_before))

    def _gpu_list(self, host: str, local: bool, not_before: Optional[float]) -> Optional[str]:
        """The node's ``nvidia-smi -L``: live on the launcher's own node (``local``), else its fresh
        record; None when neither is there (its layout is not known)."""
        text = self._local_list() if local else None
        if text is None:
            text = read_fresh_gpu_list(self.options.gpu_list_dir, (host, _short(host)), not_before)
        return text

    def _gpus_of(self, host: str, text: Optional[str]) -> tuple[tuple[str, ...], dict[str, str]]:
        if text:
            devices = parse_nvidia_smi_list(text)
            migs = devices.mig_ids(self.gpu_ids)
            if migs:
                logger.info("%s: %d GPU ids (MIG instances and whole GPUs): %s", host, len(migs), ", ".join(migs))
                parent = {uuid: gpu for gpu, uuids in devices.migs.items() for uuid in uuids}
                return tuple(migs), parent
        return self.gpu_ids, {}

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        here = _short(socket.gethostname())
        hosts = self.hostnames(env)
        started = file_mtime(env.get("PBS_NODEFILE"))  # PBS writes it when the allocation starts
        nodes, parents, unknown = [], {}, []
        for host in hosts:
            text = self._gpu_list(host, _short(host) == here or len(hosts) == 1, started)
            if text is None:
                unknown.append(host)
            gpu_ids, parent = self._gpus_of(host, text)
            parents.update(parent)
            nodes.append(NodeInfo(node_id=host, hostname=host, cpu_ids=self.cpu_ids, gpu_ids=gpu_ids,
                                  gpu_cpus=near_cpus_of(gpu_ids, self.gpu_cpu_map, self.cpu_ids, parent)))
        split = [node.hostname for node in nodes if any(is_mig_id(g) for g in node.gpu_ids)]
        if split and unknown:
            # A MIG layout is usually the whole allocation's (one mig_config), yet a node whose list
            # was not found (the default /var/tmp is each node's own) keeps whole-GPU ids: its jobs
            # got the index of a split GPU, not an instance of their own, and no line said so.
            logger.warning(
                "MIG instances on %s but no nvidia-smi -L of %d other nodes (%s%s) in gpu_list_dir %s written "
                "since the allocation started: their GPUs are taken as whole GPUs %s; if they are split too, "
                "record every node's list in a shared launcher.platform_options.gpu_list_dir "
                "(docs/platforms/polaris.md, MIG)",
                split[0], len(unknown), ", ".join(unknown[:3]), ", ..." if len(unknown) > 3 else "",
                self.options.gpu_list_dir or "(none)", ",".join(self.gpu_ids))
        # A partial-node allocation names its GPUs there (MIG instances go with their GPU's index).
        return cuda_visible_only(nodes, env, parents)

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        return leading_job_number(env.get("PBS_JOBID", ""))

    # -- MPI ------------------------------------------------------------------------------------
    def cpu_binding(self, spec: LaunchSpec) -> str:
        # The job's own (checked: a value PALS refuses fails the job in one line), else the option's.
        return pick_cpu_binding(spec, CPU_BIND_KEYS, self.options.cpu_bind, self.cpu_ids,
                                hyperthread_offset=self.options.hyperthread_offset,
                                max_threads_per_core=self.hardware_threads_per_core)

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        params = dict(spec.launch_params)
        bind = self.cpu_binding(spec)
        self._warn_relative_binding_on_a_shared_node(spec, bind)
        depth = first_launch_param(params, DEPTH_KEYS)
        if depth is None:
            # 0.7: the depth is the threads per rank, or the cores per rank with --cpu-bind core.
            depth = spec.cpus_per_rank if bind == "core" else spec.threads_per_rank
        args = [
            *shlex.split(self.options.mpiexec),
            "-n", str(spec.num_ranks),
            "--ppn", str(max(1, spec.ranks_per_node)),
            "--hosts", ",".join(spec.hostnames),
            "--cpu-bind", bind,
            "-d", str(depth),
        ]
        passed = launch_params_to_pass(spec, args, RESERVED_OPTIONS, params=params)
        return args + launch_param_args(passed, skip=CPU_BIND_KEYS + DEPTH_KEYS)

    def _warn_relative_binding_on_a_shared_node(self, spec: LaunchSpec, bind: str) -> None:
        """A job given part of a node (node packing) is bound to the cores it was assigned only by
        the computed ``list:...``: PALS lays ``depth`` and ``core`` out from core 0, so two jobs
        packed on cores 0-15 and 16-31 with ``--cpu-bind depth -d 8`` both run on cores 0-15. A job
        assigned exactly the node's first cores, counted from core 0 (on every node), is where PALS
        puts it: no warning (the job packed beside it, on other cores, gets one). From core 0, not
        from the first of ``cpu_ids``: PALS does not know which cores a site left out."""
        if not pals_binding_overlaps(spec, bind, self.cpu_ids):
            return
        assigned = set(spec.cpu_ids[0])
        if not first_warning((spec.app_id, "relative cpu-bind on a shared node")):
            return
        of = "" if spec.job_id is None else f" of job {spec.job_id}"
        logger.warning("--cpu-bind %s%s (app %s) on a node it may share: PALS binds its ranks from core 0, not to "
                       "the cores balsam assigned it (%s), so jobs packed on the node overlap; leave cpu-bind "
                       "unset for a list:... of its own cores (warned once per app)",
                       bind, of, spec.app_id, format_id_ranges(sorted(assigned)))

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

    # gpu_environment: the base class's CUDA_DEVICE_ORDER=PCI_BUS_ID + CUDA_VISIBLE_DEVICES (MIG
    # UUIDs included).

    # -- site init ------------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, hostname: str, env: Mapping[str, str]) -> bool:
        return re.search(r"(^|[.-])polaris([.-]|$)", hostname.lower()) is not None

    def settings_defaults(self) -> dict[str, Any]:
        return {
            "launcher": {
                "platform": self.name,
                "mpirun_allows_node_packing": True,
                "serial_mode_startup_params": {"cpu-bind": "none"},
            },
            "scheduler": {
                "name": "pbs",
                "allowed_queues": {
                    "debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 100},
                    "debug-scaling": {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 1},
                    # prod routes 10-496 nodes (fewer: "Job violates queue and/or server resource limits").
                    "prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10},
                    "preemptable": {"max_nodes": 10, "max_walltime": 4320, "max_queued_jobs": 20},
                },
                "allowed_projects": ["datascience"],
                # qsub_flags: split and appended to qsub by the PBS driver (-x qsub_flags="-W depend=afterok:123")
                "optional_batch_job_params": {"filesystems": "home:eagle", "place": "scatter", "qsub_flags": ""},
            },
        }

    def job_template(self) -> Optional[str]:
        return resources.files(__package__).joinpath("job-template.sh").read_text()
