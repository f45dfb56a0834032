"""Resource accounting for the nodes of a launcher partition.

A node has an occupancy (0..1: each job takes ``1 / node_packing_count`` of it), a set of idle CPU
ids and a per-GPU free capacity (1.0 = whole GPU free; a job asking for ``gpus_per_rank=0.5`` takes half
of one GPU, so two such jobs share it). Single-node jobs are packed first-fit; multi-node jobs take
whole empty nodes, each of which must hold the job's per-node CPUs and GPUs. Where GPU ids are parts
of one device (``NodeInfo.gpu_groups``: Aurora's tiles), a job asking for a whole number of devices
gets whole free devices when there are any, and a smaller request goes to a half-used device first.

CPUs are taken first-fit in id order, unless the platform says which CPUs sit near which GPU
(``NodeInfo.gpu_cpus``: Polaris' NUMA domains, Aurora's sockets). Then a GPU job gets CPUs near its
GPUs (an equal share per rank, in rank order, near the first GPU of that rank: rank r's CPUs sit
near its GPU, also when a rank has several GPUs and one core), a free
GPU whose near CPUs are idle is chosen before one whose CPUs are taken, and the CPUs of a CPU-only
job (or those a GPU job needs beyond its GPUs' share) come first from near busy GPUs, keeping CPUs
near idle GPUs for the GPU jobs to come. Long campaigns free CPUs and GPUs in any order, so first-fit
alone soon puts a job's CPUs on another socket than its GPU. The mpi and serial job modes share this
code, so both pack the same way.

On a node with MIG instances (their ``MIG-...`` UUIDs among its GPU ids), a job whose ranks need
more than one GPU id each gets whole GPUs only: CUDA enumerates one MIG instance per process (NVIDIA's
MIG user guide, "CUDA Device Enumeration"), so a rank given two instances, or an instance and a whole
GPU, could use one device of them. A job that no node can give enough whole GPUs is refused as
:class:`UnsatisfiableJob`, with the reason.

A node can be taken out of the partition (:meth:`NodeManager.disable_node`): it gets no new job,
and its running jobs free it as usual. :class:`NodeFaults` decides when (mpi mode: a node that is
down, whose every launch fails at once).
"""

from __future__ import annotations

import functools
import math
from typing import AbstractSet, Iterable, Iterator, Optional, Sequence

import attrs

from balsam.platform import NodeInfo, capped_threads_per_core, is_mig_id

#: Float tolerance on occupancy sums (eight 1/8 jobs must fill a node exactly).
_EPS = 1e-3


class InsufficientResources(Exception):
    """The job does not fit on the currently free resources (try again later)."""


class UnsatisfiableJob(ValueError):
    """The job can never fit in this partition (asks for more nodes, CPUs or GPUs than exist)."""


@attrs.frozen
class Demand:
    """What one job asks of the partition."""

    num_nodes: int = 1
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    threads_per_core: int = 1
    gpus_per_rank: float = 0.0
    node_packing_count: int = 1

    @classmethod
    def of(cls, job: object) -> "Demand":
        raw = (getattr(job, "num_nodes", 1), getattr(job, "ranks_per_node", 1), getattr(job, "threads_per_rank", 1),
               getattr(job, "threads_per_core", 1), getattr(job, "gpus_per_rank", 0.0),
               getattr(job, "node_packing_count", 1))
        if cls is Demand:
            try:
                return _demand_of(raw)
            except TypeError:  # a value that cannot be hashed (never from the API): not cached
                pass
        return cls._build(raw)

    @classmethod
    def _build(cls, raw: tuple) -> "Demand":
        num_nodes, ranks_per_node, threads_per_rank, threads_per_core, gpus_per_rank, node_packing_count = raw
        return cls(
            num_nodes=max(1, int(num_nodes or 1)),
            ranks_per_node=max(1, int(ranks_per_node or 1)),
            threads_per_rank=max(1, int(threads_per_rank or 1)),
            threads_per_core=max(1, int(threads_per_core or 1)),
            gpus_per_rank=max(0.0, float(gpus_per_rank or 0.0)),
            node_packing_count=max(1, int(node_packing_count or 1)),
        )

    def cpu_ids_per_node(self, cpu_ids_are_cores: bool, max_threads_per_core: int = 0) -> int:
        """The CPU ids the job needs on each node. Where the ids are cores (``Platform.cpu_ids_are_cores``:
        its binding adds their sibling hardware threads), ``threads_per_core`` threads share one,
        capped at the cores' ``max_threads_per_core`` hardware threads when that is known (not 0),
        as the platform's binding and pinning cap it: 8 threads at 4 per core on 2-thread cores
        need 4 cores, not 2; where they are hardware threads already (the default platform's
        logical CPUs), each thread is one id: dividing there gave a 2-thread rank at 2 threads per
        core a single CPU."""
        threads = self.ranks_per_node * self.threads_per_rank
        if not cpu_ids_are_cores:
            return max(1, threads)
        per_core = capped_threads_per_core(self.threads_per_core, max_threads_per_core)
        # Rounded up: 3 one-thread ranks at 2 threads per core need 2 cores; rounded down they got
        # 1, and the third rank was bound to the first one's hardware thread.
        return max(1, -(-threads // per_core))

    @property
    def gpus_per_node(self) -> float:
        return self.ranks_per_node * self.gpus_per_rank

    @property
    def whole_gpus_only(self) -> bool:
        """Whether each rank needs more than one GPU id: then it may get no MIG instance (CUDA would
        show it only one of its devices)."""
        return self.gpus_per_rank > 1.0 + _EPS

    @property
    def footprint(self) -> float:
        """Nodes this job occupies (``num_nodes / node_packing_count``), as the server's acquire counts it."""
        return self.num_nodes / self.node_packing_count

    @property
    def occupied_nodes(self) -> float:
        """Nodes the placement really takes: a multi-node job whole nodes, whatever its
        ``node_packing_count`` (the footprint reads a 2-node job packing 4 as half a node)."""
        return float(self.num_nodes) if self.num_nodes > 1 else 1.0 / self.node_packing_count


@functools.lru_cache(maxsize=1024)
def _demand_of(raw: tuple) -> Demand:
    """One Demand per distinct set of values (frozen, so shared): a job's is built for every job a
    launcher prepares (thousands a second in serial mode), and nearly all of a launcher's jobs
    ask the same: 0.4 us found against 2 us built. The key is the values as the job holds them
    (1 and 1.0 are equal keys, and give equal Demands)."""
    return Demand._build(raw)


@attrs.frozen
class Usage:
    """What the running jobs take of the enabled nodes, summed (:meth:`NodeManager.usage`): ``jobs``
    counts a multi-node job once per node, as :attr:`ComputeNode.num_jobs` does."""

    jobs: int = 0
    occupancy: float = 0.0
    busy_cpus: int = 0
    busy_gpus: float = 0.0


@attrs.frozen
class Placement:
    """Where a job was put: node indexes and, per node, the CPU and GPU ids it may use."""

    job_id: int
    node_indexes: tuple[int, ...]
    hostnames: tuple[str, ...]
    cpu_ids: tuple[tuple[int, ...], ...]
    gpu_ids: tuple[tuple[str, ...], ...]
    occupancy: float
    #: GPU capacity taken on each node, gpu id -> fraction (for :meth:`NodeManager.free`).
    gpu_shares: tuple[tuple[tuple[str, float], ...], ...] = ()


@functools.lru_cache(maxsize=64)
def _cpu_domains(
    cpu_ids: tuple[int, ...], gpu_cpus: tuple[tuple[str, tuple[int, ...]], ...]
) -> tuple[dict[int, int], tuple[tuple[str, ...], ...]]:
    # Cached: the nodes of a partition (up to 10^4) nearly always share one layout. Read only.
    near = [(gpu, frozenset(cpus)) for gpu, cpus in gpu_cpus]
    domains: dict[tuple[str, ...], int] = {}
    domain_of_cpu: dict[int, int] = {}
    for cpu in cpu_ids:
        gpus = tuple(gpu for gpu, cpus in near if cpu in cpus)
        if gpus:
            domain_of_cpu[cpu] = domains.setdefault(gpus, len(domains))
    return domain_of_cpu, tuple(domains)


def _rank_segments(count: int, gpu_count: int, ranks: int) -> list[tuple[int, int, int]]:
    """How ``count`` CPUs of a job of ``ranks`` ranks over ``gpu_count`` GPU ids (rank ``r`` using
    those from ``r * gpu_count // ranks``) are grouped, in the order ``cpu_bind_list`` hands them
    to the ranks: (CPUs, first GPU index, end GPU index) per group. With at least one CPU per rank,
    rank ``r`` takes ``count // ranks`` (the last one the remainder, which the binding leaves
    unused); with fewer CPUs than ranks (ranks sharing a core's hardware threads), CPU ``k`` goes
    to the first rank bound to it, ``ceil(k * ranks / count)``. Shares per GPU id instead put all
    of a one-core-per-rank job's cores near its first GPUs (6 ranks of 2 Aurora tiles: every rank
    on socket 0, ranks 3-5 with their tiles on socket 1)."""
    ranks = max(1, ranks)

    def gpus_of(rank: int) -> tuple[int, int]:
        first = min(rank * gpu_count // ranks, gpu_count - 1)
        return first, max(first + 1, (rank + 1) * gpu_count // ranks)

    if count >= ranks:
        per = count // ranks
        return [(per + (count - per * ranks if r == ranks - 1 else 0), *gpus_of(r)) for r in range(ranks)]
    return [(1, *gpus_of(min(ranks - 1, -(-k * ranks // count)))) for k in range(count)]


class ComputeNode:
    """Occupancy, idle CPUs and GPU capacity of one node."""

    def __init__(self, info: NodeInfo) -> None:
        self.info = info
        self.occupancy = 0.0
        self.idle_cpus: list[int] = list(info.cpu_ids)
        self.gpu_free: dict[str, float] = {g: 1.0 for g in info.gpu_ids}
        #: GPU id -> its place in the node's order (the platform's preferred order).
        self.gpu_order: dict[str, int] = {g: i for i, g in enumerate(info.gpu_ids)}
        #: GPU id -> the ids of its device (itself alone when the platform names no groups).
        self.group_of: dict[str, tuple[str, ...]] = {g: (g,) for g in info.gpu_ids}
        for group in info.gpu_groups:
            for gpu in group:
                self.group_of[gpu] = group
        #: GPU id -> the CPUs nearest it; empty when the platform does not say (first-fit CPUs).
        self.near: dict[str, tuple[int, ...]] = dict(info.gpu_cpus)
        #: ``domain_of_cpu``: CPU id -> index into ``domain_gpus``, the GPUs that CPU is near (one
        #: NUMA domain or socket); CPUs near no GPU are not in it.
        self.domain_of_cpu, self.domain_gpus = _cpu_domains(info.cpu_ids, info.gpu_cpus)
        #: The GPU ids that are MIG instances, and the number of the others (whole GPUs).
        self.mig_ids = frozenset(g for g in info.gpu_ids if is_mig_id(g))
        self.whole_gpu_count = len(info.gpu_ids) - len(self.mig_ids)
        self.num_jobs = 0
        #: GPU capacity taken (the sum of the shares held: 1.0 = one whole GPU).
        self.gpu_busy = 0.0
        #: Taken out of the partition (NodeManager.disable_node): no new job is placed here.
        self.disabled = False

    @property
    def hostname(self) -> str:
        return self.info.hostname

    @property
    def is_empty(self) -> bool:
        """Idle and usable (a disabled node is never offered as empty)."""
        return self.num_jobs == 0 and not self.disabled

    def _is_free(self, gpu: str) -> bool:
        return self.gpu_free[gpu] >= 1.0 - _EPS

    def _free_in_group(self, gpu: str) -> int:
        return sum(1 for g in self.group_of[gpu] if self._is_free(g))

    def _lacks_near_cpus(self, gpu: str, cpus: int, idle: set[int]) -> int:
        """1 when ``gpu`` has fewer than ``cpus`` idle CPUs near it (0 without a near map: no preference)."""
        near = self.near.get(gpu)
        if not near or cpus <= 0:
            return 0
        return 0 if sum(1 for c in near if c in idle) >= cpus else 1

    def _pick_gpus(self, gpus: float, cpus: int = 0, whole_only: bool = False) -> Optional[list[tuple[str, float]]]:
        if gpus <= 0:
            return []
        order = self.gpu_order
        idle = set(self.idle_cpus) if self.near else set()
        if gpus < 1.0:
            # A fraction of one GPU: share the fullest GPU that still has room (keeps whole GPUs
            # free); among free ones, one of a half-used device first, then one with idle CPUs near it.
            candidates = [(free, self._free_in_group(g), self._lacks_near_cpus(g, cpus, idle), order[g], g)
                          for g, free in self.gpu_free.items() if free + _EPS >= gpus]
            if not candidates:
                return None
            return [(min(candidates)[4], gpus)]
        whole = math.ceil(gpus - _EPS)
        free_gpus = [g for g in self.gpu_free if self._is_free(g) and not (whole_only and g in self.mig_ids)]
        if len(free_gpus) < whole:
            return None
        per_gpu = -(-cpus // whole)
        chosen: list[str] = []
        # Whole free devices while the request still needs at least one device's worth (those with
        # idle CPUs near them first)...
        groups = list(dict.fromkeys(self.group_of[g] for g in free_gpus))
        if self.near:
            groups.sort(key=lambda group: self._lacks_near_cpus(group[0], per_gpu * len(group), idle))
        for group in groups:
            if len(group) <= whole - len(chosen) and all(self._is_free(g) for g in group):
                chosen.extend(group)
        # ...then the rest from the devices with the fewest free ids (half-used ones first), so a
        # single tile does not split a whole GPU while half of another is idle.
        rest = sorted((g for g in free_gpus if g not in chosen),
                      key=lambda g: (self._free_in_group(g), self._lacks_near_cpus(g, per_gpu, idle), order[g]))
        chosen.extend(rest[: whole - len(chosen)])
        return [(g, 1.0) for g in chosen]

    def _pick_cpus(self, count: int, gpus: Sequence[str], ranks: int = 0) -> tuple[int, ...]:
        """``count`` idle CPUs, grouped by rank in rank order (``cpu_bind_list`` cuts them so): each
        rank's share near its first GPU, then near its other GPUs, the rest of it near the busiest
        GPUs first (keeping CPUs near idle GPUs free), then by id. ``ranks``: the job's ranks per
        node (0: one per GPU id). Needs ``self.near``."""
        idle = set(self.idle_cpus)
        segments = _rank_segments(count, len(gpus), ranks or len(gpus)) if gpus else []
        groups: list[list[int]] = [[] for _ in segments]

        def fill(group: list[int], size: int, gpu: str) -> None:
            for cpu in self.near.get(gpu, ()):
                if len(group) >= size:
                    return
                if cpu in idle:
                    idle.discard(cpu)
                    group.append(cpu)

        # Every rank's first GPU before any rank's other GPUs: a rank of several GPUs taking CPUs
        # near its second one must not leave the next rank, whose first GPU that is, short.
        for group, (size, first, _last) in zip(groups, segments):
            fill(group, size, gpus[first])
        for group, (size, first, last) in zip(groups, segments):
            for gpu in gpus[first + 1 : last]:
                fill(group, size, gpu)
        short = count - sum(len(group) for group in groups)
        if short > 0:
            domain_free = [sum(self.gpu_free[g] for g in group) for group in self.domain_gpus]

            def key(cpu: int) -> tuple[float, int]:
                # CPUs near no GPU first (no GPU job wants them), then those near the busiest GPUs.
                domain = self.domain_of_cpu.get(cpu)
                return (-1.0 if domain is None else domain_free[domain], cpu)

            rest = iter(sorted(idle, key=key)[:short])
            # Into the ranks' own groups, not after them: appended at the end, they moved every
            # later rank's cut (cpu_bind_list) onto the CPUs picked for the rank before it.
            for group, (size, _first, _last) in zip(groups, segments):
                group.extend(cpu for _, cpu in zip(range(size - len(group)), rest))
            groups.append(list(rest))
        return tuple(cpu for group in groups for cpu in group)

    def could_hold(self, cpus: int, gpus: float, whole_only: bool = False) -> bool:
        """Whether the node, idle, has ``cpus`` CPUs and ``gpus`` GPUs (whole GPUs, no MIG instance,
        with ``whole_only``)."""
        gpu_count = self.whole_gpu_count if whole_only else len(self.info.gpu_ids)
        gpus_ok = gpus <= 0 or (gpus < 1 and gpu_count > 0) or math.ceil(gpus - _EPS) <= gpu_count
        return cpus <= len(self.info.cpu_ids) and gpus_ok

    def check_fit(self, cpus: int, gpus: float, occupancy: float,
                  whole_only: bool = False) -> Optional[list[tuple[str, float]]]:
        """The GPU shares the job would take, or None if it does not fit now."""
        if self.disabled or self.occupancy + occupancy > 1.0 + _EPS or cpus > len(self.idle_cpus):
            return None
        return self._pick_gpus(gpus, cpus, whole_only)

    def take(self, cpus: int, gpu_shares: Sequence[tuple[str, float]], occupancy: float,
             ranks: int = 0) -> tuple[int, ...]:
        for gpu, share in gpu_shares:
            self.gpu_free[gpu] -= share
            self.gpu_busy += share
        if self.near:
            cpu_ids = self._pick_cpus(cpus, [g for g, _ in gpu_shares], ranks)
            taken = set(cpu_ids)
            self.idle_cpus = [c for c in self.idle_cpus if c not in taken]
        else:
            cpu_ids = tuple(self.idle_cpus[:cpus])
            del self.idle_cpus[:cpus]
        self.occupancy += occupancy
        self.num_jobs += 1
        return cpu_ids

    def take_whole(self) -> None:
        self.occupancy = 1.0
        self.num_jobs += 1

    def release(self, cpu_ids: Iterable[int], gpu_shares: Sequence[tuple[str, float]], occupancy: float) -> None:
        self.idle_cpus.extend(cpu_ids)
        self.idle_cpus.sort()
        for gpu, share in gpu_shares:
            self.gpu_free[gpu] = min(1.0, self.gpu_free[gpu] + share)
        self.num_jobs -= 1
        busy = self.gpu_busy - sum(s for _, s in gpu_shares)
        # Fractional shares leave float residue (2.8e-17 after freeing 0.1 + 0.2): below _EPS is none,
        # or the node would count as running GPU work (free_room would skip GPU-less nodes for it).
        self.gpu_busy = 0.0 if self.num_jobs == 0 or busy < _EPS else busy
        self.occupancy = 0.0 if self.num_jobs == 0 else max(0.0, self.occupancy - occupancy)


class NodeManager:
    """Assigns jobs to the nodes of one partition and frees them when they end."""

    def __init__(self, nodes: Sequence[NodeInfo], *, allow_node_packing: bool = True,
                 cpu_ids_are_cores: bool = True, hardware_threads_per_core: int = 0) -> None:
        if not nodes:
            raise ValueError("a NodeManager needs at least one node")
        self.nodes = [ComputeNode(n) for n in nodes]
        self.allow_node_packing = allow_node_packing
        #: The platform's ``cpu_ids_are_cores`` (see :meth:`Demand.cpu_ids_per_node`).
        self.cpu_ids_are_cores = cpu_ids_are_cores
        #: The platform's ``hardware_threads_per_core`` (0: not known, no cap), passed in as
        #: ``cpu_ids_are_cores`` is: the cap on a job's ``threads_per_core`` when its cores are
        #: counted, the same one the platform's binding, the serial pinning and the launcher's
        #: warning read (one source: a platform that sets only its class attribute is capped here too).
        if int(hardware_threads_per_core or 0) < 0:
            raise ValueError(f"hardware_threads_per_core must be 0 or more, got {hardware_threads_per_core}")
        self.max_threads_per_core = int(hardware_threads_per_core or 0)
        self.placements: dict[int, Placement] = {}
        # Running totals over the enabled nodes and the nodes that may hold another job, kept where
        # a node changes (_recount): the serial master sizes the prefetcher's room on every turn of
        # its loop (serial_worker.free_room), and summing 10^4 nodes there cost milliseconds a turn.
        # jobs, occupancy, busy CPUs, busy GPUs (plain numbers: a frozen value per change cost more
        # than the placement itself)
        self._jobs, self._occupancy, self._busy_cpus, self._busy_gpus = 0, 0.0, 0, 0.0
        self._disabled = 0
        #: Enabled nodes with free occupancy and an idle CPU; enabled nodes with free GPU capacity.
        self._cpu_open: set[int] = set(range(len(self.nodes)))
        self._gpu_open: set[int] = {i for i, n in enumerate(self.nodes) if n.info.gpu_ids}

    def __len__(self) -> int:
        return len(self.nodes)

    # -- running totals ------------------------------------------------------------------------
    def _share(self, index: int) -> tuple[int, float, int, float]:
        """What node ``index`` adds to the totals: (jobs, occupancy, busy CPUs, busy GPUs)."""
        node = self.nodes[index]
        if node.disabled:
            return (0, 0.0, 0, 0.0)
        return (node.num_jobs, node.occupancy, len(node.info.cpu_ids) - len(node.idle_cpus), node.gpu_busy)

    def _recount(self, index: int, before: tuple[int, float, int, float]) -> None:
        """Node ``index`` changed from ``before`` (its :meth:`_share` then): update the totals and sets."""
        node = self.nodes[index]
        jobs, occupancy, busy_cpus, busy_gpus = self._share(index)
        self._jobs += jobs - before[0]
        self._busy_cpus += busy_cpus - before[2]
        if self._jobs:
            self._occupancy += occupancy - before[1]
            self._busy_gpus += busy_gpus - before[3]
        else:  # sums of floats drift: exact zeros once no job runs
            self._occupancy = self._busy_gpus = 0.0
        if not node.disabled and node.occupancy < 1.0 - _EPS and node.idle_cpus:
            self._cpu_open.add(index)
        else:
            self._cpu_open.discard(index)
        if not node.disabled and node.info.gpu_ids and node.gpu_busy < len(node.info.gpu_ids) - _EPS:
            self._gpu_open.add(index)
        else:
            self._gpu_open.discard(index)

    def usage(self) -> Usage:
        """What the running jobs take of the enabled nodes (O(1): kept as jobs are placed and freed)."""
        return Usage(self._jobs, self._occupancy, self._busy_cpus, self._busy_gpus)

    def open_nodes(self, gpus: bool = False) -> Iterator[int]:
        """Indexes of the enabled nodes with free occupancy and an idle CPU (``gpus``: that also have
        free GPU capacity), in no set order; O(the nodes yielded). Place or free no job meanwhile."""
        # An empty set is skipped without iterating it: a set keeps its table as it empties, and
        # iterating it scans every slot (10^4 nodes that all filled: 15 us a call for nothing).
        small, large = (self._cpu_open, self._cpu_open) if not gpus else sorted((self._cpu_open, self._gpu_open), key=len)
        if not small:
            return iter(())
        return iter(small) if small is large else (i for i in small if i in large)

    # -- queries used to size the next acquire -------------------------------------------------
    def count_empty_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.is_empty)

    def aggregate_free_nodes(self) -> float:
        return sum(max(0.0, 1.0 - n.occupancy) for n in self.nodes if not n.disabled)

    def disable_node(self, index: int) -> bool:
        """Take node ``index`` out: no job is placed on it from now on (the jobs on it free it as
        usual). Returns False (and does nothing) if it is already out or is the last node in: a
        partition without nodes would hold its leased jobs to the end for nothing."""
        node = self.nodes[index]
        if node.disabled or self.enabled_count() <= 1:
            return False
        before = self._share(index)
        node.disabled = True
        self._disabled += 1
        self._recount(index, before)
        return True

    def enabled_count(self) -> int:
        return len(self.nodes) - self._disabled

    def max_cpus_per_node(self) -> int:
        return max(len(n.info.cpu_ids) for n in self.nodes)

    def check_satisfiable(self, demand: Demand, in_service: bool = False) -> None:
        """Raise :class:`UnsatisfiableJob` if ``demand`` could never run here, even on idle nodes.

        Every node of a multi-node job runs ``ranks_per_node`` ranks: it needs ``num_nodes`` nodes
        that each hold the per-node CPUs and GPUs (a 2-node job of 8 one-GPU ranks per node does
        not fit 4-GPU nodes any better than a 1-node one).

        ``in_service``: count only the nodes not taken out (:meth:`disable_node`): whether the job
        could still start in this partition, all its running jobs gone (a drain for it could end)."""
        nodes = [n for n in self.nodes if not n.disabled] if in_service and self._disabled else self.nodes
        out = f" ({len(self.nodes) - len(nodes)} taken out)" if len(nodes) < len(self.nodes) else ""
        if demand.num_nodes > len(nodes):
            raise UnsatisfiableJob(f"job asks for {demand.num_nodes} nodes; this launcher has {len(nodes)}"
                                   + (f" in service{out}" if out else ""))
        cpus = demand.cpu_ids_per_node(self.cpu_ids_are_cores, self.max_threads_per_core)
        gpus, whole_only = demand.gpus_per_node, demand.whole_gpus_only
        fitting = 0
        for node in nodes:  # stops at the first nodes that do: called per job, over up to 10^4 nodes
            if node.could_hold(cpus, gpus, whole_only):
                fitting += 1
                if fitting >= demand.num_nodes:
                    return
        where = "one node" if demand.num_nodes == 1 else f"each of {demand.num_nodes} nodes"
        the_nodes = f"the nodes in service{out}" if out else "the nodes"
        if (whole_only and any(n.mig_ids for n in nodes)
                and sum(1 for n in nodes if n.could_hold(cpus, gpus)) >= demand.num_nodes):
            # It would fit if MIG instances counted: say why they do not.
            raise UnsatisfiableJob(
                f"job asks for {demand.gpus_per_rank:g} GPUs per rank ({gpus:g} on {where}): a rank needing more "
                f"than one GPU gets whole GPUs only, as CUDA shows a process one MIG instance at most; {the_nodes} "
                f"have at most {max(n.whole_gpu_count for n in nodes)} GPUs not split by MIG"
                + (f" ({fitting} of them hold that much)" if demand.num_nodes > 1 and fitting else "")
            )
        raise UnsatisfiableJob(
            f"job asks for {cpus} CPUs and {gpus:g} GPUs on {where}; "
            f"{the_nodes} have at most {max(len(n.info.cpu_ids) for n in nodes)} CPUs and "
            f"{max(len(n.info.gpu_ids) for n in nodes)} GPUs"
            + (f" ({fitting} of them hold that much)" if demand.num_nodes > 1 and fitting else "")
        )

    # -- assignment ----------------------------------------------------------------------------
    def assign(self, job_id: int, demand: Demand, exclude: AbstractSet[int] = frozenset()) -> Placement:
        """Place a job or raise :class:`InsufficientResources`. ``exclude``: indexes of nodes it may
        not go to (nodes held to drain for a larger job, :meth:`nodes_to_drain`)."""
        if job_id in self.placements:
            raise ValueError(f"job {job_id} is already placed")
        if demand.num_nodes > 1:
            # Only nodes that hold the per-node CPUs and GPUs (nodes may differ: MIG on some).
            cpus, gpus = demand.cpu_ids_per_node(self.cpu_ids_are_cores, self.max_threads_per_core), demand.gpus_per_node
            empty = [i for i, n in enumerate(self.nodes)
                     if n.is_empty and i not in exclude and n.could_hold(cpus, gpus, demand.whole_gpus_only)]
            if len(empty) < demand.num_nodes:
                raise InsufficientResources(f"{demand.num_nodes} empty nodes needed, {len(empty)} free")
            chosen = empty[: demand.num_nodes]
            for i in chosen:
                before = self._share(i)
                self.nodes[i].take_whole()
                self._recount(i, before)
            placement = Placement(
                job_id=job_id,
                node_indexes=tuple(chosen),
                hostnames=tuple(self.nodes[i].hostname for i in chosen),
                cpu_ids=tuple(() for _ in chosen),
                gpu_ids=tuple(() for _ in chosen),
                occupancy=1.0,
            )
        else:
            occupancy = 1.0 / demand.node_packing_count if self.allow_node_packing else 1.0
            cpus, gpus = demand.cpu_ids_per_node(self.cpu_ids_are_cores, self.max_threads_per_core), demand.gpus_per_node
            for i, node in enumerate(self.nodes):
                if exclude and i in exclude:
                    continue
                shares = node.check_fit(cpus, gpus, occupancy, demand.whole_gpus_only)
                if shares is None:
                    continue
                before = self._share(i)
                cpu_ids = node.take(cpus, shares, occupancy, demand.ranks_per_node)
                self._recount(i, before)
                placement = Placement(
                    job_id=job_id,
                    node_indexes=(i,),
                    hostnames=(node.hostname,),
                    cpu_ids=(cpu_ids,),
                    gpu_ids=(tuple(g for g, _ in shares),),
                    occupancy=occupancy,
                    gpu_shares=(tuple(shares),),
                )
                break
            else:
                raise InsufficientResources(f"no node has {cpus} idle CPUs, {gpus:g} GPUs and {occupancy:.3f} free occupancy")
        self.placements[job_id] = placement
        return placement

    def nodes_to_drain(self, demand: Demand) -> frozenset[int]:
        """The nodes a job that does not fit now is to get once they empty: the ``num_nodes`` enabled
        nodes that could hold it, least occupied first (soonest empty). New jobs go elsewhere
        meanwhile (``assign(exclude=...)``), so the other nodes keep working while these drain."""
        cpus, gpus = demand.cpu_ids_per_node(self.cpu_ids_are_cores, self.max_threads_per_core), demand.gpus_per_node
        fitting = [i for i, n in enumerate(self.nodes)
                   if not n.disabled and n.could_hold(cpus, gpus, demand.whole_gpus_only)]
        fitting.sort(key=lambda i: (self.nodes[i].occupancy, i))
        return frozenset(fitting[: demand.num_nodes])

    def hand_over(self, job_id: int, new_job_id: int) -> Optional[Placement]:
        """``new_job_id`` takes over ``job_id``'s resources as they are (it was started on them
        when ``job_id`` ended: same demand, same CPUs); returns its placement (None if ``job_id``
        held none)."""
        placement = self.placements.pop(job_id, None)
        if placement is None:
            return None
        if new_job_id in self.placements:
            raise ValueError(f"job {new_job_id} is already placed")
        # Built directly, not with attrs.evolve (0.6 us against 1.7: it runs for every job started
        # by a hand-over, nearly every job of a serial launcher with short jobs). Placement has no
        # converters or validators, so this is the same object evolve makes (test_h5_hot_path).
        moved = Placement(new_job_id, placement.node_indexes, placement.hostnames, placement.cpu_ids,
                          placement.gpu_ids, placement.occupancy, placement.gpu_shares)
        self.placements[new_job_id] = moved
        return moved

    def free(self, job_id: int) -> None:
        placement = self.placements.pop(job_id, None)
        if placement is None:
            return
        shares = placement.gpu_shares or tuple(() for _ in placement.node_indexes)
        for index, cpu_ids, gpu_shares in zip(placement.node_indexes, placement.cpu_ids, shares):
            before = self._share(index)
            self.nodes[index].release(cpu_ids, gpu_shares, placement.occupancy)
            self._recount(index, before)


#: What an MPI launcher or its remote shell prints when it could not start the ranks on a node
#: (hydra's proxy, Cray PALS, ssh), compared lower-case.
#: Specific on purpose: an app's own output ("connection refused" from its database client) must
#: not take a node out.
LAUNCH_FAULT_SIGNS = (
    "launch proxy failed", "ssh: ", "could not resolve hostname", "no route to host",
    "host key verification failed", "permission denied (publickey",
)


@attrs.frozen
class Exit:
    """A single-node job's exit, as :class:`NodeFaults` sees it (frozen values)."""

    job_id: int
    node: int
    returncode: int
    seconds_run: float
    tail: str
    #: When it ended (epoch seconds), for its report.
    ended: Optional[float] = None


@attrs.frozen
class FaultVerdict:
    """What to report for the exits :meth:`NodeFaults.note` settled: ``report`` as they are
    (RUN_DONE, RUN_ERROR), ``requeue`` as RUN_TIMEOUT (they failed on a node now taken out, which
    ``disabled`` names, or had been taken out before); exits held meanwhile are in neither."""

    report: tuple[Exit, ...] = ()
    requeue: tuple[Exit, ...] = ()
    disabled: Optional[int] = None


#: Longest a held quick failure waits for the next exit on its node (:meth:`NodeFaults.expire`):
#: a node that is down fails the launches placed there within milliseconds of each other, so the
#: verdict never needs more; a held exit that outlived this is reported as it is. Without a bound,
#: a held failure stayed unreported (its job RUNNING) until the next exit there, hours later behind
#: a long job, and was lost if the launcher was killed meanwhile.
HELD_EXIT_MAX_SEC = 5.0


def bears_launch_fault_sign(tail: str) -> bool:
    """Whether a job's output tail holds an MPI launcher's own message (:data:`LAUNCH_FAULT_SIGNS`)."""
    text = tail.lower()
    return any(sign in text for sign in LAUNCH_FAULT_SIGNS)


class NodeFaults:
    """Which node is down: pure accounting over exits (mpi mode).

    A node is taken out after ``threshold`` **quick failures** in a row of different jobs on it
    (non-zero, less than ``quick_sec`` after the start, single-node jobs), with no success or slow
    exit between them, every one of them bearing an MPI launcher's own fault message
    (:data:`LAUNCH_FAULT_SIGNS`: the ranks never started there). Quick failures of the app itself
    never count, even while other nodes succeed: campaigns where some parameter sets fail at once
    are common, and a few of those in a row on one node would have shrunk the allocation node by
    node. Their jobs are reported RUN_ERROR as they are, at once. The last node in is never taken out.

    Only a quick failure that could lead to a verdict is **held** (not reported): one bearing the
    launcher's message on a node that could still be taken out (fewer than ``node_count - 1`` out).
    If the node is taken out, the jobs of the streak did not fail, their node did, and they are
    re-queued (RUN_TIMEOUT). Everything else reports the held exits with it, as they are: an exit
    without the message (quick or not), a success, a slow exit, or a signed one when no node may go
    out any more. A held exit waits at most ``max_held_sec`` for the next exit on its node
    (:meth:`expire`, called by the mode's loop), and :meth:`flush` reports what is held at a stop.
    Exits on a node already out are re-queued (hand-overs that started there as it failed).
    """

    def __init__(self, node_count: int, *, threshold: int = 3, quick_sec: float = 5.0,
                 max_held_sec: float = HELD_EXIT_MAX_SEC) -> None:
        self.threshold = threshold
        self.quick_sec = quick_sec
        self.max_held_sec = max_held_sec
        self.held: dict[int, list[Exit]] = {}
        #: node -> when (the caller's clock) its last held exit was noted
        self._held_since: dict[int, float] = {}
        self.out: set[int] = set()
        self.node_count = node_count

    def _release(self, node: int) -> list[Exit]:
        self._held_since.pop(node, None)
        return self.held.pop(node, [])

    def note(self, exit: Exit, now: float) -> FaultVerdict:
        """Settle ``exit``; ``now`` is the caller's clock (monotonic: what :meth:`expire` is given)."""
        node = exit.node
        if node in self.out:
            return FaultVerdict(requeue=(exit,)) if exit.returncode != 0 else FaultVerdict(report=(exit,))
        if (exit.returncode != 0 and exit.seconds_run < self.quick_sec
                and len(self.out) < self.node_count - 1 and bears_launch_fault_sign(exit.tail)):
            streak = self.held.setdefault(node, [])
            streak.append(exit)
            self._held_since[node] = now
            if len(streak) < self.threshold:
                return FaultVerdict()
            self._release(node)
            self.out.add(node)
            return FaultVerdict(requeue=tuple(streak), disabled=node)
        return FaultVerdict(report=(*self._release(node), exit))

    def expire(self, now: float) -> tuple[Exit, ...]:
        """The held exits whose node saw no further exit for ``max_held_sec`` by ``now`` (the clock
        :meth:`note` was given), to report as they are."""
        if not self.held:
            return ()
        stale = [node for node, since in self._held_since.items() if now - since >= self.max_held_sec]
        return tuple(e for node in stale for e in self._release(node))

    def flush(self) -> tuple[Exit, ...]:
        """Every held exit (to report as it is: a stop came before the verdict)."""
        held = tuple(e for streak in self.held.values() for e in streak)
        self.held.clear()
        self._held_since.clear()
        return held

    def held_ids(self) -> list[int]:
        return [e.job_id for streak in self.held.values() for e in streak]
