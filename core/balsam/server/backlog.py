"""A site's backlog in numbers: jobs, node footprint and sizes per state, in one aggregate query.

What an auto-scaler needs each cycle (the elastic queue: how many nodes the runnable and running
jobs occupy, the smallest job it must fit) without listing the jobs: one ``GROUP BY state`` over
the site's jobs in the asked states (the ``(site_id, state)`` index), optionally only those whose
tags contain the given ones, only those a launcher could lease (``max_nodes_per_job``,
``serial_only``, ``max_wall_time_min``: the very conditions of a session acquire, see
:func:`balsam.server.sessions_logic.candidates`), and only those of given BatchJobs
(``batch_job_ids``: what runs in an auto-scaler's own BatchJobs), and optionally only jobs no
launcher session holds and an acquire could lease (``leased=False``: not a job re-queued while its
old run may still be running, see ``jobs.released_from_session_id``): a runnable job a launcher has already acquired (prefetched,
not started yet) is work some BatchJob will run, not demand for a new one. A job's footprint is
``num_nodes / node_packing_count`` nodes: a job that packs 4 to a node occupies a quarter of one;
``unpacked_footprint`` (Σ ``num_nodes``) is what the jobs occupy where MPI runs may not share a node
(``launcher.mpirun_allows_node_packing: false``).
"""

from __future__ import annotations

from typing import Any, Optional

import sqlalchemy as sa

from balsam.states import JobState

from .db import id_in
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


def backlog_by_state(conn: sa.Connection, site_id: int, states: Optional[list[str]] = None,
                     tags: Optional[dict[str, str]] = None, *, max_nodes_per_job: Optional[int] = None,
                     serial_only: bool = False, max_wall_time_min: Optional[int] = None,
                     batch_job_ids: Optional[list[int]] = None,
                     leased: Optional[bool] = None) -> dict[str, dict[str, Any]]:
    """``{state: {count, footprint, unpacked_footprint, min_num_nodes, max_num_nodes,
    min_wall_time_min, max_wall_time_min, oldest_last_update}}`` of the site's jobs in ``states``
    (default :data:`DEFAULT_BACKLOG_STATES`) whose tags contain ``tags``. ``oldest_last_update`` is the earliest state change among them (how
    long the longest-waiting runnable job has waited). States without jobs are absent.

    Only jobs a launcher acquiring with the same ``max_nodes_per_job``, ``serial_only`` and
    ``max_wall_time_min`` could lease are counted, with the acquire's conditions (``num_nodes <=``,
    ``num_nodes == 1 and ranks_per_node == 1``, ``wall_time_min <=``: a job of ``wall_time_min`` 0,
    the default, fits any); with ``batch_job_ids`` (None: no filter), only jobs of those BatchJobs;
    with ``leased`` (None: no filter), only jobs a session holds (True) or none does and an acquire could lease (False).
    ``min_wall_time_min`` is the shortest ``wall_time_min`` (0 when some job has none: it fits any
    BatchJob), what an auto-scaler needs to tell a window too short for every job."""
    wanted = list(states or DEFAULT_BACKLOG_STATES)
    footprint = sa.cast(jobs.c.num_nodes, sa.Float) / jobs.c.node_packing_count  # the server keeps it >= 1
    stmt = (
        sa.select(jobs.c.state, sa.func.count(), sa.func.sum(footprint), sa.func.sum(jobs.c.num_nodes),
                  sa.func.min(jobs.c.num_nodes), sa.func.max(jobs.c.num_nodes), sa.func.min(jobs.c.wall_time_min),
                  sa.func.max(jobs.c.wall_time_min), sa.func.min(jobs.c.last_update))
        .where(jobs.c.site_id == site_id, jobs.c.state.in_(wanted))
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
