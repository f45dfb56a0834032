"""A site's backlog in numbers: jobs, node footprint and sizes per state, in one aggregate query.

What an auto-scaler needs each cycle (the elastic queue: how many nodes the runnable and running
jobs occupy, the smallest job it must fit) without listing the jobs: one ``GROUP BY state`` over
the site's jobs in the asked states (the ``(site_id, state)`` index), optionally only those whose
tags contain the given ones, only those a launcher could lease (``max_nodes_per_job``,
``serial_only``, ``max_wall_time_min``, ``max_gpus_per_node``: the very conditions of a session acquire, see
:func:`balsam.server.sessions_logic.candidates`), and only those of given BatchJobs
(``batch_job_ids``: what runs in an auto-scaler's own BatchJobs), and optionally only jobs no
launcher session holds and an acquire could lease (``leased=False``: not a job re-queued while its
old run may still be running, see ``jobs.released_from_session_id``): a runnable job a launcher has already acquired (prefetched,
not started yet) is work some BatchJob will run, not demand for a new one. A job's footprint is
``num_nodes / node_packing_count`` nodes: a job that packs 4 to a node occupies a quarter of one;
``unpacked_footprint`` (Σ ``num_nodes``) is what the jobs occupy where MPI runs may not share a node
(``launcher.mpirun_allows_node_packing: false``).

Given the shape of the nodes (:class:`NodeShape`: GPU and CPU ids per node, and how the launcher
counts CPU ids), the footprint charges what the launcher's node manager takes when it places a job
(:mod:`balsam.launcher.node_manager`): a single-node job takes the largest of its packing share
``1 / node_packing_count``, its GPUs per node over the node's GPUs and its CPU ids per node over the
node's CPU ids (at most the whole node), and a multi-node job takes its ``num_nodes`` whole nodes.
Jobs packed 4 to a node that each need 2 of a node's 4 GPUs then count half a node each, not a
quarter. ``unpacked_footprint`` keeps its meaning: every job holding its ``num_nodes`` whole nodes.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import sqlalchemy as sa

from balsam.states import DONE_STATES, JobState

from .db import id_in
from .errors import ValidationFailed
from .http import wire_datetime
from .jobs_logic import json_contains
from .tables import jobs

#: Most ``tags`` filters one request may carry, and their most characters each (``key:value``): a
#: site's filter_tags are a handful of short words, and the URL stays under the HTTP server's
#: request-line limit (16 KiB) even when every character is percent-encoded.
MAX_BACKLOG_TAGS = 8
MAX_BACKLOG_TAG_CHARS = 128
#: States asked for when the request names none: what a launcher can start now, and what runs.
DEFAULT_BACKLOG_STATES = (JobState.preprocessed.value, JobState.restart_ready.value, JobState.running.value)
#: Largest ``max_gpus_per_node`` accepted, as the acquire's (``sessions_logic.parse_acquire``).
MAX_GPUS_PER_NODE_BOUND = 1e9
#: Most characters of its text (a float's shortest text has 24 at most: the URL stays bounded).
MAX_GPU_BOUND_CHARS = 32
#: Added to ``max_gpus_per_node`` in the comparison, as the acquire does (``b_gpus``): a job's
#: ``ranks_per_node * gpus_per_rank`` computed in floating point is not refused for its last bit.
_GPU_BOUND_SLACK = 1e-9
#: The node manager's float tolerance (``node_manager._EPS``): a job asking 1.0005 GPUs takes one whole GPU there.
_GPU_EPS = 1e-3


@attrs.frozen
class NodeShape:
    """One compute node as the launcher's node manager counts it: ``gpus`` GPU ids and ``cpus`` CPU
    ids (None: that resource is not charged), and the platform's ``cpu_ids_are_cores`` and
    ``hardware_threads_per_core`` (0: no cap), which turn a job's threads into CPU ids
    (``Demand.cpu_ids_per_node``)."""

    gpus: Optional[int] = None
    cpus: Optional[int] = None
    cpu_ids_are_cores: bool = False
    hardware_threads_per_core: int = 0


def parse_gpu_bound(raw: str) -> float:
    """The backlog route's ``max_gpus_per_node``: a number from 0 to :data:`MAX_GPUS_PER_NODE_BOUND`
    (the acquire's bound) in plain decimal, ASCII digits with at most one ``.`` (``0``, ``2``,
    ``0.5``), in at most :data:`MAX_GPU_BOUND_CHARS` characters, as the route's integers are read
    (``http.int_from_text``). ValidationFailed naming the parameter otherwise: ``float()`` also took
    ``1_0``, `` 2 ``, ``+1``, ``-0``, ``1e0`` and other scripts' digits (``١``), and the route's one
    message called a number that was only too long "not between 0 and 1e9"."""
    loc = ["query", "max_gpus_per_node"]
    if len(raw) > MAX_GPU_BOUND_CHARS:
        raise ValidationFailed.field(loc, f"at most {MAX_GPU_BOUND_CHARS} characters, got {len(raw)}")
    parts = raw.split(".")
    if len(parts) > 2 or not any(parts) or not all(p == "" or (p.isascii() and p.isdecimal()) for p in parts):
        raise ValidationFailed.field(loc, f"expected a number between 0 and {MAX_GPUS_PER_NODE_BOUND:g} in plain "
                                          f"decimal (digits, at most one '.'), got {raw!r}")
    value = float(raw)
    if value > MAX_GPUS_PER_NODE_BOUND:
        raise ValidationFailed.field(loc, f"must be between 0 and {MAX_GPUS_PER_NODE_BOUND:g}, got {raw!r}")
    return value


def _greatest(dialect: str, *terms: Any) -> Any:
    # GREATEST on PostgreSQL; SQLite's max() with several arguments is the same scalar function.
    # (A nested CASE repeated each term once per comparison: the statement grew 8-fold.)
    return sa.func.greatest(*terms) if dialect == "postgresql" else sa.func.max(*terms)


def _least(dialect: str, *terms: Any) -> Any:
    return sa.func.least(*terms) if dialect == "postgresql" else sa.func.min(*terms)


def _ceil(x: Any) -> Any:
    """ceil(x) of a non-negative float on SQLite and PostgreSQL alike, without their math functions
    (SQLite's are a compile-time option): CAST truncates on SQLite and rounds on PostgreSQL, and
    either way the integer found is ceil(x) when it is not below x, floor(x) (one less) when it is."""
    whole = sa.cast(x, sa.BigInteger)  # 64-bit: x may pass 2^31 (2^30 ranks x 4 GPUs); PostgreSQL's integer overflows
    return sa.case((x > whole, whole + 1), else_=whole)


def job_footprint(shape: Optional[NodeShape] = None, dialect: str = "sqlite") -> Any:
    """The SQL expression of one job's footprint in nodes: ``num_nodes / node_packing_count``
    without ``shape`` (0.7's figure); with it, what the launcher's node manager takes (see the
    module doc), term by term as ``NodeManager.assign`` checks the job's fit. ``dialect``: the
    database's (``conn.dialect.name``)."""
    if shape is None:
        return sa.cast(jobs.c.num_nodes, sa.Float) / jobs.c.node_packing_count  # the server keeps it >= 1
    terms: list[Any] = [1.0 / sa.cast(jobs.c.node_packing_count, sa.Float)]
    if shape.gpus:
        gpus = jobs.c.ranks_per_node * jobs.c.gpus_per_rank
        # Below one GPU the job takes that share of one; from one on, whole GPUs (1.5 takes 2).
        taken = sa.case((gpus < 1.0, gpus), else_=_ceil(gpus - _GPU_EPS))
        terms.append(sa.cast(taken, sa.Float) / float(shape.gpus))
    if shape.cpus:
        # In 64 bits: two 32-bit columns' product overflows PostgreSQL's integer (an error, a 500 on
        # every elastic cycle) where SQLite's integers are 64-bit anyway.
        threads = sa.cast(jobs.c.ranks_per_node, sa.BigInteger) * jobs.c.threads_per_rank
        if shape.cpu_ids_are_cores:
            # Cores: threads_per_core threads share one id (capped at the core's hardware threads),
            # rounded up in integers: (a + b - 1) // b (integer division on both databases).
            per_core: Any = jobs.c.threads_per_core
            if shape.hardware_threads_per_core:
                per_core = _least(dialect, jobs.c.threads_per_core, shape.hardware_threads_per_core)
            ids = (threads + per_core - 1) // per_core
        else:
            ids = threads  # hardware threads: one id each
        terms.append(sa.cast(ids, sa.Float) / float(shape.cpus))
    # A job asking more than a node has never runs here (the launcher refuses it): a whole node at
    # most, so the footprint stays within unpacked_footprint.
    single = _least(dialect, _greatest(dialect, *terms), 1.0) if len(terms) > 1 else terms[0]
    # A multi-node job takes whole empty nodes (NodeManager.assign), whatever its packing count.
    return sa.case((jobs.c.num_nodes > 1, sa.cast(jobs.c.num_nodes, sa.Float)), else_=single)


def backlog_by_state(conn: sa.Connection, site_id: int, states: Optional[list[str]] = None,
                     tags: Optional[dict[str, str]] = None, *, max_nodes_per_job: Optional[int] = None,
                     serial_only: bool = False, max_wall_time_min: Optional[int] = None,
                     batch_job_ids: Optional[list[int]] = None,
                     leased: Optional[bool] = None,
                     node_shape: Optional[NodeShape] = None,
                     max_gpus_per_node: Optional[float] = None) -> dict[str, dict[str, Any]]:
    """``{state: {count, footprint, unpacked_footprint, min_num_nodes, max_num_nodes,
    min_wall_time_min, max_wall_time_min, oldest_last_update}}`` of the site's jobs in ``states``
    (default :data:`DEFAULT_BACKLOG_STATES`) whose tags contain ``tags``. ``oldest_last_update`` is the earliest state change among them (how
    long the longest-waiting runnable job has waited). States without jobs are absent.

    Only jobs a launcher acquiring with the same ``max_nodes_per_job``, ``serial_only``,
    ``max_wall_time_min`` and ``max_gpus_per_node`` could lease are counted, with the acquire's
    conditions (``num_nodes <=``, ``num_nodes == 1 and ranks_per_node == 1``, ``wall_time_min <=``:
    a job of ``wall_time_min`` 0, the default, fits any; ``ranks_per_node * gpus_per_rank <=``: a
    launcher whose nodes have no GPU acquires with 0, ``job_mode.gpuless_acquire_filter``); with ``batch_job_ids`` (None: no filter), only jobs of those BatchJobs;
    with ``leased`` (None: no filter), only jobs a session holds (True) or none does and an acquire could lease (False).
    ``min_wall_time_min`` is the shortest ``wall_time_min`` (0 when some job has none: it fits any
    BatchJob), what an auto-scaler needs to tell a window too short for every job. With
    ``node_shape``, ``footprint`` charges each job's GPUs and CPUs as the launcher does
    (:func:`job_footprint`), in the same single query."""
    wanted = list(states or DEFAULT_BACKLOG_STATES)
    footprint = job_footprint(node_shape, conn.dialect.name)
    site_col: Any = jobs.c.site_id
    state_col: Any = jobs.c.state
    done = {s.value for s in DONE_STATES}
    if batch_job_ids is not None and conn.dialect.name == "sqlite" and done.intersection(wanted):
        # The jobs of given BatchJobs in finished states too (the elastic queue's "did its launcher
        # lease anything"): read from the batch_job_id index, not (site_id, state), which SQLite's
        # planner, without statistics, took and read every finished job of the site. The unary +
        # keeps those terms off every index (as sessions_logic writes its acquire).
        site_col = sa.literal_column("+jobs.site_id", sa.Integer)
        state_col = sa.literal_column("+jobs.state", jobs.c.state.type)
    stmt = (
        sa.select(jobs.c.state, sa.func.count(), sa.func.sum(footprint), sa.func.sum(jobs.c.num_nodes),
                  sa.func.min(jobs.c.num_nodes), sa.func.max(jobs.c.num_nodes), sa.func.min(jobs.c.wall_time_min),
                  sa.func.max(jobs.c.wall_time_min), sa.func.min(jobs.c.last_update))
        .where(site_col == site_id, state_col.in_(wanted))
        .group_by(jobs.c.state)
    )
    if tags:
        # Tested on the jobs of the (site_id, state) index, not with the GIN index (PostgreSQL),
        # which reads every job of the tag, finished ones included (10^6 jobs: 0.04 -> 13 ms).
        stmt = stmt.where(json_contains(jobs.c.tags, tags, conn.dialect.name, indexable=False))
    # The acquire's filters, written as sessions_logic.candidates writes them.
    if max_wall_time_min is not None:
        stmt = stmt.where(jobs.c.wall_time_min <= max_wall_time_min)
    if max_nodes_per_job is not None:
        stmt = stmt.where(jobs.c.num_nodes <= max_nodes_per_job)
    if serial_only:
        stmt = stmt.where(jobs.c.num_nodes == 1, jobs.c.ranks_per_node == 1)
    if max_gpus_per_node is not None:
        # As the acquire compares it (sessions_logic._build_acquire_plan): without it, an auto-scaler
        # counted the GPU jobs a GPU-less launcher never leases, and requested BatchJobs for them.
        stmt = stmt.where(jobs.c.ranks_per_node * jobs.c.gpus_per_rank <= max_gpus_per_node + _GPU_BOUND_SLACK)
    if batch_job_ids is not None:
        stmt = stmt.where(id_in(jobs.c.batch_job_id, batch_job_ids, conn.dialect.name))
    if leased is not None:
        # leased=True: jobs a session holds (session_id IS NOT NULL). leased=False: the acquire's
        # own leasable condition, session_id IS NULL AND released_from_session_id IS NULL: a job its
        # user re-queued while its old run may still be running (the mark, migration 0018) is
        # neither held nor leasable until the holder's heartbeat clears the mark, so it is no
        # demand for a new BatchJob yet. Both are tested on the rows the (site_id, state) index
        # already gives.
        if leased:
            stmt = stmt.where(jobs.c.session_id.is_not(None))
        else:
            stmt = stmt.where(jobs.c.session_id.is_(None), jobs.c.released_from_session_id.is_(None))
    out: dict[str, dict[str, Any]] = {}
    for state, count, total, unpacked, smallest, largest, shortest, longest, oldest in conn.execute(stmt):
        out[state] = {"count": int(count), "footprint": float(total or 0.0), "unpacked_footprint": int(unpacked or 0),
                      "min_num_nodes": int(smallest),
                      "max_num_nodes": int(largest), "min_wall_time_min": int(shortest or 0),
                      "max_wall_time_min": int(longest or 0),
                      "oldest_last_update": wire_datetime(oldest)}
    return out
