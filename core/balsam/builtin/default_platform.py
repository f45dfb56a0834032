"""The ``default`` platform: any Linux machine or generic cluster, with MPICH or Open MPI ``mpiexec``.

Nodes come from the allocation's environment (``SLURM_JOB_NODELIST``, ``PBS_NODEFILE``,
``COBALT_NODEFILE``) or, outside an allocation, the local host. CPU ids are this process's affinity
(``os.sched_getaffinity``: the standard library, so that a launcher's start does not import psutil);
GPU ids from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L`` (MIG instances by UUID when a GPU is
split, a whole GPU beside them by index). Every node is assumed to look like the one the launcher
runs on.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
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

logger = logging.getLogger(__name__)


class HostlistError(ValueError):
    """A text that is not a Slurm host list: ``text`` (as given), ``problem`` (why, one line) and
    ``shown`` (the text, or :data:`SHOWN_CHARS` characters of it around the fault with ``...`` for
    the rest: a list of 9,000 entries is 63,000 characters, too long for one line)."""

    def __init__(self, text: str, problem: str, at: int = 0) -> None:
        self.text = text
        self.problem = problem
        self.shown = _excerpt(text, at, SHOWN_CHARS)
        super().__init__(f"{self.shown!r} is not a Slurm host list: {problem}")

    def in_variable(self, variable: str) -> str:
        """The one line for this text as the value of ``$variable`` (the launcher's error)."""
        return f"${variable}={self.shown!r} is not a Slurm host list: {self.problem}"


#: The most hosts one bracketed range may name: Slurm's own limit (hostlist.c ``MAX_RANGE``,
#: ``Too many hosts in range``); beyond it the text is garbage, not an allocation.
MAX_HOSTS_IN_RANGE = 64 * 1024
#: The most hosts a whole host list may name: 2**20 (1,048,576). An allocation is at most a whole
#: machine: that is about a hundred times Frontier (9,408 nodes) or Aurora (about 10,624), and six
#: times Fugaku, the machine of the most nodes (158,976). A text past it is garbage
#: (``a[0-65535]b[0-65535]``, 20 characters, named 2**32 hosts and ran out of memory after a minute
#: at 3 GB), refused before any host is made; a list at the limit is about 70 MB of names.
MAX_HOSTS = 2**20
#: The most digits of one number in brackets, zero padding included: 18, so that every number fits
#: a 64-bit integer (balsam's own bound: scontrol takes 19 digits too); node numbers have 4 to 6. A longer one is no node (4,000 digits
#: of padding made 65,536 hosts of 4 KB; over 4,300 digits int() raised its own ValueError).
MAX_NUMBER_DIGITS = 18
#: The longest host name: 255 characters, a DNS name's limit (RFC 1035, 2.3.4). Checked before any
#: host is made (65,536 copies of a 4,000-character prefix were 256 MB).
MAX_HOST_NAME = 255
#: The most characters of a host list an error quotes (``...`` marks the rest).
SHOWN_CHARS = 80
#: What separates the items of a host list at the top level (outside brackets): Slurm takes commas
#: and blanks alike and skips empty items (``scontrol show hostnames 'a,,b c'`` gives a, b, c).
_HOSTLIST_SEPARATORS = frozenset(", \t\n\r")
#: One entry between brackets: a number, or a range of numbers ``low-high`` (ASCII digits: ``\d``
#: would take other scripts' digits, which Slurm refuses).
_BRACKET_ENTRY = re.compile(r"([0-9]+)(?:-([0-9]+))?")
#: A bracket group of an item (brackets are balanced once _hostlist_items has read the text).
_BRACKET_GROUP = re.compile(r"\[([^\]]*)\]")


def _excerpt(text: str, at: int, width: int) -> str:
    """``text``, or ``width`` characters of it around index ``at``, ``...`` marking what is cut."""
    if len(text) <= width:
        return text
    start = max(0, min(at - width // 2, len(text) - width))
    end = start + width
    return ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")


def expand_hostlist(text: str) -> list[str]:
    """The hosts of a Slurm host list, in its order, as ``scontrol show hostnames`` gives them.

    Items are separated by commas or blanks; each is name parts and bracketed lists of numbers and
    ranges, the numbers as written (zero padding kept: ``nid[0008-0010,0012]``). Several bracket
    groups give every combination in Slurm's order (hostlist.c takes the groups apart from the
    right): the last group varies fastest, then the first, the second ..., the one before the last
    slowest. With two groups, the first varies slowest (``rack[1-2]n[01-02]`` -> rack1n01,
    rack1n02, rack2n01, rack2n02); with three, ``a[1-2]b[3-4]c[5-6]`` -> a1b3c5, a1b3c6, a2b3c5,
    a2b3c6, a1b4c5 ... A name after the last bracket (``node[1-3]-ib``), which Slurm itself does
    not allow in slurm.conf and so never writes, is expanded the same way, since it can be read
    only one way.

    Anything else raises :class:`HostlistError` (a ValueError) naming the text (the part around the
    fault, when it is long) and what is wrong with it: a ``[`` not closed (a cut-off ``nid[001-``),
    a ``]`` or ``[`` out of place, an entry in brackets that is not a number or a range (``00a-3``,
    ``1-2-3``, empty), a number of more than :data:`MAX_NUMBER_DIGITS` digits, a range running
    backwards (``003-001``) or naming more hosts than Slurm allows in one range, a host name longer
    than :data:`MAX_HOST_NAME`, more than :data:`MAX_HOSTS` hosts in all, or no host at all. The
    whole text is read and its hosts counted before any is made. Where Slurm's own parser reads
    such a text at all, it reads it wrong (``nid[001-`` gives one host ``nid]``)."""
    items = [_parse_hostlist_item(text, start, item) for start, item in _hostlist_items(text)]
    total = 0
    for start, _names, _groups, count in items:
        total += count
        if total > MAX_HOSTS:
            raise HostlistError(text, f"it names more than {MAX_HOSTS} hosts, more than any allocation has (the item "
                                      f"at character {start + 1} passes the limit)", start)
    if not total:
        raise HostlistError(text, "it names no host")
    hosts: list[str] = []
    for _start, names, groups, _count in items:
        hosts.extend(_expand_hostlist_item(names, groups))
    return hosts


def _hostlist_items(text: str) -> list[tuple[int, str]]:
    """The items of ``text`` with where each starts, split at separators outside brackets (commas
    within them are the bracket's own: ``nid[1,3-5],gpu2`` is two items)."""
    items: list[tuple[int, str]] = []
    start, opened = 0, -1  # opened: where the bracket being read began (-1: none)
    for index, char in enumerate(text):
        if char == "[":
            if opened >= 0:
                raise HostlistError(text, f"a '[' inside brackets, at character {index + 1}", index)
            opened = index
        elif char == "]":
            if opened < 0:
                raise HostlistError(text, f"a ']' without its '[', at character {index + 1}", index)
            opened = -1
        elif opened < 0 and char in _HOSTLIST_SEPARATORS:
            items.append((start, text[start:index]))
            start = index + 1
    if opened >= 0:
        raise HostlistError(text, f"the '[' at character {opened + 1} is not closed (a cut-off list?)", opened)
    items.append((start, text[start:]))
    return [(start, item) for start, item in items if item]


#: A bracket group read: its numbers as (first, last, width) ranges (a single number is a range of
#: one), and how many hosts they name.
_Group = tuple[list[tuple[int, int, int]], int]


def _parse_hostlist_item(text: str, start: int, item: str) -> tuple[int, list[str], list[_Group], int]:
    """``item`` (at ``start`` in ``text``) read: its name parts (one more than its groups), its bracket
    groups, and how many hosts it names (the product of the groups' counts), nothing expanded yet."""
    names: list[str] = []
    groups: list[_Group] = []
    count, longest, end = 1, 0, 0
    for match in _BRACKET_GROUP.finditer(item):
        names.append(item[end:match.start()])
        group = _bracket_ranges(text, start + match.start(1), match.group(1))
        groups.append(group)
        count *= group[1]
        # Widest number of the group: a range's numbers are padded to its first one's width, and
        # grow to its last one's.
        longest += max(max(width, len(str(last))) for _first, last, width in group[0])
        end = match.end()
        if count > MAX_HOSTS:  # stop multiplying: the total is past the limit already
            break
    names.append(item[end:])
    longest += sum(map(len, names))
    if longest > MAX_HOST_NAME and count <= MAX_HOSTS:
        raise HostlistError(text, f"a host of {_excerpt(item, 0, 40)!r} would be {longest} characters long, more than "
                                  f"the {MAX_HOST_NAME} of a host name", start)
    return start, names, groups, count


def _bracket_ranges(text: str, at: int, body: str) -> _Group:
    """The ranges of numbers a bracket body (at ``at`` in ``text``) names, and how many numbers
    they are. A range's numbers are padded to the width of its first (``08-11`` -> 08 09 10 11;
    ``8-11`` -> 8 9 10 11), a single number is as written."""
    ranges: list[tuple[int, int, int]] = []
    count, offset = 0, 0
    for entry in body.split(","):
        where = at + offset
        offset += len(entry) + 1
        match = _BRACKET_ENTRY.fullmatch(entry)
        if match is None:
            raise HostlistError(text, f"{_entry_in(entry, body, where - at)} is not a number or a range of numbers "
                                      "like 1-3", where)
        low, high = match.groups()
        widest = max(len(low), len(high or ""))
        if widest > MAX_NUMBER_DIGITS:
            # Before int(): past 4,300 digits it raises a ValueError of its own.
            raise HostlistError(text, f"{_entry_in(entry, body, where - at)} has a number of {widest} digits, more "
                                      f"than the {MAX_NUMBER_DIGITS} of a node number", where)
        first, last = int(low), int(high if high is not None else low)
        if last < first:
            raise HostlistError(text, f"the range {entry} runs backwards", where)
        if last - first + 1 > MAX_HOSTS_IN_RANGE:
            raise HostlistError(text, f"the range {entry} names more than {MAX_HOSTS_IN_RANGE} hosts, Slurm's limit",
                                where)
        ranges.append((first, last, len(low)))
        count += last - first + 1
    return ranges, count


def _entry_in(entry: str, body: str, offset: int) -> str:
    """``'entry' in [body]`` for an error, each cut to 40 characters around the entry."""
    return f"{_excerpt(entry, 0, 40)!r} in [{_excerpt(body, offset, 40)}]"


def _group_numbers(group: _Group) -> list[str]:
    return [f"{number:0{width}d}" for first, last, width in group[0] for number in range(first, last + 1)]


def _expand_hostlist_item(names: list[str], groups: list[_Group]) -> list[str]:
    """The hosts of an item in Slurm's order. hostlist.c takes the groups apart from the right: the
    last one is the innermost loop; the text before it is expanded by the same rule, the group
    before the last in the outer loop and the text left of that inside it."""
    if not groups:
        return names
    *left, last = [_group_numbers(group) for group in groups]
    prefixes = [names[0]]  # the text up to group len(left), expanded
    for index, numbers in enumerate(left):
        prefixes = [f"{prefix}{number}{names[index + 1]}" for number in numbers for prefix in prefixes]
    return [f"{prefix}{number}{names[-1]}" for prefix in prefixes for number in last]


def _hosts_of_variable(env: Mapping[str, str], variable: str) -> list[str]:
    """The hosts of the host list in ``$variable``, each once (a host named twice would be two nodes
    to the launcher, and get twice the jobs: one WARNING names the repeated ones); a one-line
    RuntimeError naming the variable and its value when it is not a host list."""
    try:
        hosts = expand_hostlist(env[variable])
    except HostlistError as exc:
        raise RuntimeError(exc.in_variable(variable)) from None
    times = Counter(hosts)  # in the order of first appearance
    if len(times) < len(hosts):
        repeated = [host for host, n in times.items() if n > 1]
        shown = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        logger.warning("$%s names %d host(s) more than once (%s): each is one node", variable, len(repeated), shown)
    return list(times)


#: ``$COBALT_PARTNAME`` in Cobalt's format on a Cray XC (Theta KNL): node ids (nids) and ranges of
#: them, ``1001-1003,1030``: digits, dashes, commas and blanks (a cut-off ``1001-`` too). The job
#: script runs on a shared service (MOM) node there, and the nodes are reached only through aprun:
#: the default platform's mpiexec cannot start anything on them. Read as host names, the nids were
#: hosts ``1001-1003`` and ``1030``; a lone nid gave the MOM node, where every job then ran.
_CRAY_NID_CHARS = frozenset("0123456789-, \t\n\r")
_CRAY_NIDS_PROBLEM = (
    "$COBALT_PARTNAME={value!r} names Cray node ids (nids, Cobalt on a Cray XC such as Theta), which the default "
    "platform cannot launch on (its mpiexec does not reach them; aprun does): set launcher.platform to the "
    "machine's platform (see `balsam plugins ls`)"
)


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
        value when the one read is not a host list (the launcher stops with that line), or when
        ``$COBALT_PARTNAME`` names Cray nids (:data:`_CRAY_NIDS_PROBLEM`)."""
        for variable in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if env.get(variable):
                return _hosts_of_variable(env, variable)
        for variable in ("PBS_NODEFILE", "COBALT_NODEFILE"):
            path = env.get(variable)
            if path and Path(path).is_file():
                hosts = _read_nodefile(path)
                if hosts:
                    return hosts
        cobalt_partition = env.get("COBALT_PARTNAME", "")
        if set(cobalt_partition) <= _CRAY_NID_CHARS and any(char.isdecimal() for char in cobalt_partition):
            raise RuntimeError(_CRAY_NIDS_PROBLEM.format(value=_excerpt(cobalt_partition, 0, SHOWN_CHARS)))
        if cobalt_partition.strip():
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
