"""The ``default`` platform: any Linux machine or generic cluster, with MPICH or Open MPI ``mpiexec``.

Nodes come from the allocation's environment (``SLURM_JOB_NODELIST``, ``PBS_NODEFILE``,
``COBALT_NODEFILE``) or, outside an allocation, the local host. CPU ids are this process's affinity
(``os.sched_getaffinity``: the standard library, so that a launcher's start does not import psutil);
GPU ids from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L`` (MIG instances by UUID when a GPU is
split, a whole GPU beside them by index). Every node is assumed to look like the one the launcher
runs on.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from balsam.platform import (
    HYDRA_RESERVED_OPTIONS, OPENMPI_RESERVED_OPTIONS, LaunchSpec, NodeInfo, Platform, launch_param_args,
    launch_params_to_pass, nvidia_smi_list, parse_nvidia_smi_list,
)

__all__ = ["DefaultPlatform", "HostlistError", "detect_mpi_flavor", "expand_hostlist", "parse_mpi_flavor"]

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


class HostlistError(ValueError):
    """A text that is not a Slurm host list: ``text`` (as given) and ``problem`` (why, one line)."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"{text!r} is not a Slurm host list: {problem}")
        self.text = text
        self.problem = problem


#: The most hosts one bracketed range may name: Slurm's own limit (hostlist.c ``MAX_RANGE``,
#: ``Too many hosts in range``); beyond it the text is garbage, not an allocation.
MAX_HOSTS_IN_RANGE = 64 * 1024
#: What separates the items of a host list at the top level (outside brackets): Slurm takes commas
#: and blanks alike and skips empty items (``scontrol show hostnames 'a,,b c'`` gives a, b, c).
_HOSTLIST_SEPARATORS = frozenset(", \t\n\r")
#: One entry between brackets: a number, or a range of numbers ``low-high`` (ASCII digits: ``\d``
#: would take other scripts' digits, which Slurm refuses).
_BRACKET_ENTRY = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_hostlist(text: str) -> list[str]:
    """The hosts of a Slurm host list, in its order, as ``scontrol show hostnames`` gives them.

    Items are separated by commas or blanks; each is name parts and bracketed lists of numbers and
    ranges, the numbers as written (zero padding kept: ``nid[0008-0010,0012]``); several bracket
    groups give every combination, the first varying slowest (``rack[1-2]n[01-02]`` -> rack1n01,
    rack1n02, rack2n01, rack2n02). A name after the last bracket (``node[1-3]-ib``), which Slurm
    itself does not allow in slurm.conf and so never writes, is expanded the same way, since it
    can be read only one way.

    Anything else raises :class:`HostlistError` (a ValueError) naming the text and what is wrong
    with it: a ``[`` not closed (a cut-off ``nid[001-``), a ``]`` or ``[`` out of place, an entry in
    brackets that is not a number or a range (``00a-3``, ``1-2-3``, empty), a range running
    backwards (``003-001``) or naming more hosts than Slurm allows in one range, or no host at all.
    Where Slurm's own parser reads such a text at all, it reads it wrong (``nid[001-`` gives one host
    ``nid]``)."""
    hosts: list[str] = []
    for item in _hostlist_items(text):
        hosts.extend(_expand_hostlist_item(text, item))
    if not hosts:
        raise HostlistError(text, "it names no host")
    return hosts


def _hostlist_items(text: str) -> list[str]:
    """The items of ``text``, split at separators outside brackets (commas within them are the
    bracket's own: ``nid[1,3-5],gpu2`` is two items)."""
    items: list[str] = []
    start, opened = 0, -1  # opened: where the bracket being read began (-1: none)
    for index, char in enumerate(text):
        if char == "[":
            if opened >= 0:
                raise HostlistError(text, f"a '[' inside brackets, at character {index + 1}")
            opened = index
        elif char == "]":
            if opened < 0:
                raise HostlistError(text, f"a ']' without its '[', at character {index + 1}")
            opened = -1
        elif opened < 0 and char in _HOSTLIST_SEPARATORS:
            items.append(text[start:index])
            start = index + 1
    if opened >= 0:
        raise HostlistError(text, f"the '[' at character {opened + 1} is not closed (a cut-off list?)")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_hostlist_item(text: str, item: str) -> list[str]:
    # "a[1-2]b[3]" -> ["a", "1-2", "b", "3", ""]: names at even places, bracket bodies at odd ones.
    parts = re.split(r"\[([^\]]*)\]", item)
    choices = [[part] if index % 2 == 0 else _bracket_numbers(text, part) for index, part in enumerate(parts)]
    return ["".join(pieces) for pieces in itertools.product(*choices)]


def _bracket_numbers(text: str, body: str) -> list[str]:
    """The numbers a bracket body names, as strings: each range's numbers padded to the width of its
    first (``08-11`` -> 08 09 10 11; ``8-11`` -> 8 9 10 11), a single number as written."""
    numbers: list[str] = []
    for entry in body.split(","):
        match = _BRACKET_ENTRY.fullmatch(entry)
        if match is None:
            raise HostlistError(text, f"{entry!r} in [{body}] is not a number or a range of numbers like 1-3")
        low, high = match.groups()
        if high is None:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise HostlistError(text, f"the range {entry} runs backwards")
        if int(high) - int(low) + 1 > MAX_HOSTS_IN_RANGE:
            raise HostlistError(text, f"the range {entry} names more than {MAX_HOSTS_IN_RANGE} hosts, Slurm's limit")
        numbers.extend(f"{number:0{len(low)}d}" for number in range(int(low), int(high) + 1))
    return numbers


def _hosts_of_variable(env: Mapping[str, str], variable: str) -> list[str]:
    """The hosts of the host list in ``$variable``, each once (a host named twice would be two nodes
    to the launcher, and get twice the jobs); a one-line RuntimeError naming the variable and its
    value when it is not a host list."""
    try:
        return list(dict.fromkeys(expand_hostlist(env[variable])))
    except HostlistError as exc:
        raise RuntimeError(f"${variable}={exc.text!r} is not a Slurm host list: {exc.problem}") from None


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
        """The allocation's hosts, each once, in order; a RuntimeError naming the variable and its
        value when the one read is not a host list (the launcher stops with that line)."""
        for variable in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if env.get(variable):
                return _hosts_of_variable(env, variable)
        for variable in ("PBS_NODEFILE", "COBALT_NODEFILE"):
            path = env.get(variable)
            if path and Path(path).is_file():
                hosts = _read_nodefile(path)
                if hosts:
                    return hosts
        cobalt_partition = env.get("COBALT_PARTNAME")
        if cobalt_partition and not cobalt_partition.isdecimal():
            return _hosts_of_variable(env, "COBALT_PARTNAME")
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
        """Launch params other than ``mpi_flavor`` as every platform passes them
        (:func:`balsam.platform.launch_param_args`: ``--key value``, ``-k value`` for a one-letter
        key, the option alone for an empty value or True, nothing for False)."""
        return launch_param_args({key: value for key, value in params.items() if key != FLAVOR_PARAM})

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
