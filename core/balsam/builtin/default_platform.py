"""The ``default`` platform: any Linux machine or generic cluster, with MPICH or Open MPI ``mpiexec``.

Nodes come from the allocation's environment (``SLURM_JOB_NODELIST``, ``PBS_NODEFILE``,
``COBALT_NODEFILE``) or, outside an allocation, the local host. CPU ids are this process's affinity
(``os.sched_getaffinity``: the standard library, so that a launcher's start does not import psutil);
GPU ids from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L`` (MIG instances by UUID when a GPU is
split, a whole GPU beside them by index). Every node is assumed to look like the one the launcher
runs on.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from balsam.platform import (
    HYDRA_RESERVED_OPTIONS, OPENMPI_RESERVED_OPTIONS, LaunchSpec, NodeInfo, Platform, launch_option,
    launch_params_to_pass, nvidia_smi_list, parse_nvidia_smi_list,
)

__all__ = ["DefaultPlatform", "detect_mpi_flavor", "expand_hostlist", "parse_mpi_flavor"]

MPICH, OPENMPI = "mpich", "openmpi"
FLAVOR_PARAM = "mpi_flavor"
FLAVOR_ENV = "BALSAM_MPI_FLAVOR"

#: mpiexec options the line sets from balsam's placement, per MPI flavour (the launcher's map, kept
#: in balsam.platform): a launch param naming one, in any spelling, is not passed (warned once per
#: app and key), since the ranks would not run where balsam placed them.
RESERVED_OPTIONS = {MPICH: HYDRA_RESERVED_OPTIONS, OPENMPI: OPENMPI_RESERVED_OPTIONS}

#: How users write each flavour (``mpi_flavor`` launch param, ``DefaultPlatform(mpi_flavor=...)``,
#: ``BALSAM_MPI_FLAVOR``), compared after :func:`_flavor_key` (case, whitespace, ``-``, ``_``, ``.``
#: dropped): MPICH's own launcher is hydra, and Intel MPI and MVAPICH use it too; Open MPI's runtime
#: is OpenRTE (PRRTE since 5.0).
FLAVOR_ALIASES: Mapping[str, str] = {
    **dict.fromkeys(("mpich", "mpich2", "mpich3", "mpich4", "hydra", "intelmpi", "impi", "mvapich", "mvapich2"), MPICH),
    **dict.fromkeys(("openmpi", "ompi", "openrte", "orte", "prrte"), OPENMPI),
}

_flavor_cache: dict[str, str] = {}
#: PATH -> the mpiexec found on it (see find_mpiexec).
_mpiexec_found: dict[str, str] = {}


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list: ``node[01-03,7],gpu5`` -> ``node01 node02 node03 node7 gpu5``."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", text.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item] if item else []
    prefix, suffix = item[: match.start()], item[match.end() :]
    results = []
    for part in match.group(1).split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            width = len(low)
            for number in range(int(low), int(high) + 1):
                results.extend(_expand_one(f"{prefix}{number:0{width}d}{suffix}"))
        elif part:
            results.extend(_expand_one(f"{prefix}{part}{suffix}"))
    return results


def _read_nodefile(path: str) -> list[str]:
    hosts: list[str] = []
    for line in Path(path).read_text().splitlines():
        host = line.strip()
        if host and host not in hosts:
            hosts.append(host)
    return hosts


def find_mpiexec() -> str:
    """``mpiexec`` from PATH, else the one installed next to this Python (the ``mpich`` wheel).

    Found once per value of PATH: an mpi-mode launcher renders every job's line with it, and
    ``shutil.which`` stats PATH's directories each time (about 1 % of the launcher's CPU per job).
    What was not found is looked for again next time (it may be installed while a launcher runs)."""
    path = os.environ.get("PATH", os.defpath)
    found = _mpiexec_found.get(path)
    if found is None:
        found = shutil.which("mpiexec", path=path)
        if not found:
            beside = Path(sys.executable).parent / "mpiexec"
            return str(beside) if beside.exists() else "mpiexec"
        _mpiexec_found[path] = found
    return found


def detect_mpi_flavor(mpiexec: str) -> str:
    """``openmpi`` when ``mpiexec --version`` says Open MPI / OpenRTE / PRRTE, else ``mpich``."""
    if mpiexec in _flavor_cache:
        return _flavor_cache[mpiexec]
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
        )
        text = (out.stdout + out.stderr).lower()
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    flavor = OPENMPI if ("open mpi" in text or "openrte" in text or "prrte" in text) else MPICH
    _flavor_cache[mpiexec] = flavor
    return flavor


def _flavor_key(value: str) -> str:
    return re.sub(r"[\s_.\-]+", "", value).lower()


def parse_mpi_flavor(value: Any) -> str:
    """``mpich`` or ``openmpi`` for a flavour as users write it (``"MPICH"``, ``" mpich\n"``,
    ``"hydra"``, ``"Open MPI"``, ``"open-mpi"``, ``"ompi"``: :data:`FLAVOR_ALIASES`); a one-line
    ValueError naming the value and the accepted ones otherwise."""
    flavor = FLAVOR_ALIASES.get(_flavor_key(value)) if isinstance(value, str) else None
    if flavor is not None:
        return flavor
    shown = value.strip() if isinstance(value, str) else value
    # PALS (Cray's mpiexec) takes other options than hydra's: its machines have their own platforms.
    pals = isinstance(value, str) and "pals" in _flavor_key(value)
    # A core module names no plugin: which are installed is `balsam plugins ls`'s to say.
    where = " (Cray PALS mpiexec needs a platform plugin whose MPI launcher is PALS: see `balsam plugins ls`)" if pals else ""
    raise ValueError(f"unknown MPI flavour {shown!r} for the default platform{where}: accepted mpich (or hydra, intel mpi, "
                     f"mvapich) and openmpi (or open mpi, ompi), in any case")


def _local_cpu_ids() -> list[int]:
    try:
        ids = os.sched_getaffinity(0)
        if ids:
            return sorted(ids)
    except (AttributeError, OSError):  # no affinity support on this OS (macOS)
        pass
    return list(range(os.cpu_count() or 1))


def _local_gpu_ids(env: Mapping[str, str]) -> list[str]:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() not in ("-1", "NoDevFiles")]
    text = nvidia_smi_list()
    if not text:
        return []
    devices = parse_nvidia_smi_list(text)
    # With MIG on, a split GPU's index is not a device a job can use alone: its instances are.
    return devices.mig_ids() or list(devices.gpus)


class DefaultPlatform(Platform):
    """A Linux node (this process's CPUs); MPICH or Open MPI mpiexec."""

    name = "default"
    description = "Any Linux machine or generic cluster (CPUs from this process's affinity; MPICH or Open MPI mpiexec)"
    default_scheduler = "local"
    mpirun_allows_node_packing = True
    # The job script (and so the launcher) runs on the first node of the allocation, or locally.
    serial_workers_without_mpi = True

    def __init__(self, mpi_flavor: Optional[str] = None, mpiexec: Optional[str] = None, *, options: Any = None) -> None:
        super().__init__(options)
        self._mpi_flavor = mpi_flavor
        self._mpiexec = mpiexec

    # -- inside an allocation -------------------------------------------------------------------
    def hostnames(self, env: Mapping[str, str]) -> list[str]:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            return expand_hostlist(nodelist)
        for variable in ("PBS_NODEFILE", "COBALT_NODEFILE"):
            path = env.get(variable)
            if path and Path(path).is_file():
                hosts = _read_nodefile(path)
                if hosts:
                    return hosts
        cobalt_partition = env.get("COBALT_PARTNAME")
        if cobalt_partition and not cobalt_partition.isdecimal():
            return expand_hostlist(cobalt_partition)
        return [socket.gethostname()]

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        cpu_ids = _local_cpu_ids()
        gpu_ids = _local_gpu_ids(env)
        return [
            NodeInfo(node_id=str(index), hostname=host, cpu_ids=cpu_ids, gpu_ids=gpu_ids)
            for index, host in enumerate(self.hostnames(env))
        ]

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        for variable in ("BALSAM_LOCAL_JOB_ID", "SLURM_JOB_ID", "SLURM_JOBID", "PBS_JOBID", "COBALT_JOBID"):
            value = env.get(variable, "").strip()
            match = re.match(r"(\d+)", value)
            if match:
                return int(match.group(1))
        return None

    # -- MPI ------------------------------------------------------------------------------------
    def mpiexec(self) -> str:
        return self._mpiexec or find_mpiexec()

    def mpi_flavor(self, spec: Optional[LaunchSpec] = None) -> str:
        # The job's launch param, else the platform's, else the environment's; a blank one is unset.
        for wanted in (spec.launch_params.get(FLAVOR_PARAM) if spec is not None else None, self._mpi_flavor,
                       os.environ.get(FLAVOR_ENV)):
            if wanted and not (isinstance(wanted, str) and not wanted.strip()):
                return parse_mpi_flavor(wanted)
        return detect_mpi_flavor(self.mpiexec())

    @staticmethod
    def _extra_args(params: Mapping[str, Any]) -> list[str]:
        """Launch params other than ``mpi_flavor`` as ``--key value`` (``-k value`` for a one-letter key;
        an empty value: just the option)."""
        args: list[str] = []
        for key, value in params.items():
            if key == FLAVOR_PARAM:
                continue
            args.append(launch_option(key))
            if value not in (None, "", True):
                args.append(str(value))
        return args

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        hosts = list(spec.hostnames) or [socket.gethostname()]
        ranks_per_node = max(1, spec.ranks_per_node)
        total = ranks_per_node * len(hosts)
        flavor = self.mpi_flavor(spec)
        if flavor == OPENMPI:
            args = [
                self.mpiexec(),
                "-n",
                str(total),
                "--npernode",
                str(ranks_per_node),
                "--host",
                ",".join(f"{h}:{ranks_per_node}" for h in hosts),
            ]
            # Open MPI starts remote ranks with the environment of their node's daemon, not the
            # job's: each variable the launcher set for the job (GPU ids, OMP_NUM_THREADS, the
            # app's) is forwarded by name, as Balsam 0.7's OpenMPIRun did (MPICH's hydra passes
            # the whole environment by default). One the job's launch_params forward already
            # ({"-x": NAME}) is not repeated.
            forwarded = {str(spec.launch_params.get("-x"))}
            for name in spec.env_names:
                if name not in forwarded:
                    args += ["-x", name]
        else:
            args = [self.mpiexec(), "-n", str(total), "-ppn", str(ranks_per_node), "--hosts", ",".join(hosts)]
        return args + self._extra_args(launch_params_to_pass(spec, args, RESERVED_OPTIONS[flavor]))

    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        # Open MPI binds each rank to a core (or a package) unless told; MPICH's hydra binds none.
        return {"bind-to": "none"} if self.mpi_flavor() == OPENMPI else {}

    # -- site init ------------------------------------------------------------------------------
    def settings_defaults(self) -> dict[str, Any]:
        return {"launcher": {"platform": self.name}, "scheduler": {"name": self.default_scheduler}}
