"""Job counts by state from the trigger-kept counters (migration 0003), at any number of jobs.

Why counters: counting a user's jobs by state is a ``GROUP BY`` over every job row (10^6 jobs:
about a second on SQLite), yet the dashboard shows these counts on every page view. Triggers on
``jobs`` keep ``job_counts`` (one row per app and state) in step with every insert, state change and
delete, whatever code path (or cascade) makes it, inside the same transaction.

- SQLite: row triggers update ``job_counts`` in place (SQLite serializes writers anyway).
- PostgreSQL: statement triggers append each statement's net change per (app, state) to
  ``job_count_deltas``; no counter row is updated by a writer, so concurrent bulk updates never wait
  on each other or deadlock. :func:`fold_deltas` (the server's background sweep) moves the deltas
  into ``job_counts``; a reader adds the counters and the deltas not yet folded, so a count is exact
  at every moment, in the reader's snapshot.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import sqlalchemy as sa

from .tables import job_count_deltas, job_counts, job_tag_count_deltas, job_tag_counts, sites


def fold_deltas(conn: sa.Connection) -> int:
    """Move the pending deltas into the counters (PostgreSQL; no-op elsewhere); returns rows moved.

    One statement: the deleted deltas are exactly those added to the counters. Rows committed
    meanwhile stay for the next fold; two servers folding at once each move their own rows."""
    if conn.dialect.name != "postgresql":
        return 0
    result = conn.exec_driver_sql(
        "WITH moved AS (DELETE FROM job_count_deltas RETURNING site_id, app_id, state, delta), "
        "summed AS (SELECT app_id, state, min(site_id) AS site_id, sum(delta) AS n FROM moved GROUP BY app_id, state) "
        "INSERT INTO job_counts (app_id, state, site_id, n) SELECT app_id, state, site_id, n FROM summed "
        "ORDER BY app_id, state "
        "ON CONFLICT (app_id, state) DO UPDATE SET n = job_counts.n + excluded.n"
    )
    moved = result.rowcount or 0
    # Counters of apps whose jobs are all gone (e.g. a deleted app or site) are dropped.
    conn.execute(sa.delete(job_counts).where(job_counts.c.n == 0))
    result = conn.exec_driver_sql(
        "WITH moved AS (DELETE FROM job_tag_count_deltas RETURNING site_id, app_id, tag_key, tag_value, state, delta), "
        "summed AS (SELECT app_id, tag_key, tag_value, state, min(site_id) AS site_id, sum(delta) AS n FROM moved "
        "GROUP BY app_id, tag_key, tag_value, state) "
        "INSERT INTO job_tag_counts (app_id, tag_key, tag_value, state, site_id, n) "
        "SELECT app_id, tag_key, tag_value, state, site_id, n FROM summed ORDER BY app_id, tag_key, tag_value, state "
        "ON CONFLICT (app_id, tag_key, tag_value, state) DO UPDATE SET n = job_tag_counts.n + excluded.n"
    )
    moved += result.rowcount or 0
    conn.execute(sa.delete(job_tag_counts).where(job_tag_counts.c.n == 0))
    return moved


def count_matching(conn: sa.Connection, owned: sa.Select, *, site_ids: Optional[list[int]] = None,
                   app_ids: Optional[list[int]] = None, states: Optional[list[str]] = None,
                   tag: Optional[tuple[str, str]] = None) -> int:
    """How many jobs of the sites ``owned`` selects (the caller's, within its credential's scope)
    match (sites, apps, states, one tag), from the counters: a few rows read at any number of jobs
    (exact: the deltas not yet folded are added)."""
    if tag is None:
        pairs = ((job_counts, job_counts.c.n), (job_count_deltas, job_count_deltas.c.delta))
    else:
        pairs = ((job_tag_counts, job_tag_counts.c.n), (job_tag_count_deltas, job_tag_count_deltas.c.delta))
    parts = []
    for table, amount in pairs:
        stmt = sa.select(amount.label("n")).where(table.c.site_id.in_(owned))
        if site_ids is not None:
            stmt = stmt.where(table.c.site_id.in_(site_ids))
        if app_ids is not None:
            stmt = stmt.where(table.c.app_id.in_(app_ids))
        if states is not None:
            stmt = stmt.where(table.c.state.in_(states))
        if tag is not None:
            stmt = stmt.where(table.c.tag_key == tag[0], table.c.tag_value == tag[1])
        parts.append(stmt)
    union = sa.union_all(*parts).subquery()
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(union.c.n), 0))).scalar_one())


def jobs_with_each_tag(conn: sa.Connection, tags: dict[str, str]) -> dict[tuple[str, str], int]:
    """``{(key, value): n}``: how many jobs carry each tag, in every site (the per-tag counters of
    migration 0005 and their deltas; a tag no job carries is absent). What a read of the tag index
    costs (it returns every such job, whoever owns it), not a count to show anyone."""
    if not tags:
        return {}
    wanted = sa.tuple_(job_tag_counts.c.tag_key, job_tag_counts.c.tag_value).in_(list(tags.items()))
    wanted_deltas = sa.tuple_(job_tag_count_deltas.c.tag_key, job_tag_count_deltas.c.tag_value).in_(list(tags.items()))
    union = sa.union_all(
        sa.select(job_tag_counts.c.tag_key, job_tag_counts.c.tag_value, job_tag_counts.c.n.label("n")).where(wanted),
        sa.select(job_tag_count_deltas.c.tag_key, job_tag_count_deltas.c.tag_value,
                  job_tag_count_deltas.c.delta.label("n")).where(wanted_deltas),
    ).subquery()
    totals = sa.select(union.c.tag_key, union.c.tag_value, sa.func.sum(union.c.n)).group_by(union.c.tag_key, union.c.tag_value)
    return {(key, value): int(n) for key, value, n in conn.execute(totals) if n}


def counts_by_site_app_state(conn: sa.Connection, user_id: int, *, site_ids: Optional[list[int]] = None,
                             app_ids: Optional[list[int]] = None,
                             tag: Optional[tuple[str, str]] = None) -> dict[tuple[int, int, str], int]:
    """``{(site_id, app_id, state): n}`` over the user's sites (optionally some sites / apps, and
    only the jobs carrying one tag ``(key, value)``: the per-tag counters of migration 0005)."""
    owned = sa.select(sites.c.id).where(sites.c.owner_id == user_id)
    if tag is None:
        pairs = ((job_counts, job_counts.c.n), (job_count_deltas, job_count_deltas.c.delta))
    else:
        pairs = ((job_tag_counts, job_tag_counts.c.n), (job_tag_count_deltas, job_tag_count_deltas.c.delta))
    parts = []
    for table, amount in pairs:
        stmt = sa.select(table.c.site_id, table.c.app_id, table.c.state, amount.label("n")).where(table.c.site_id.in_(owned))
        if site_ids is not None:
            stmt = stmt.where(table.c.site_id.in_(site_ids))
        if app_ids is not None:
            stmt = stmt.where(table.c.app_id.in_(app_ids))
        if tag is not None:
            stmt = stmt.where(table.c.tag_key == tag[0], table.c.tag_value == tag[1])
        parts.append(stmt)
    union = sa.union_all(*parts).subquery()
    totals = (sa.select(union.c.site_id, union.c.app_id, union.c.state, sa.func.sum(union.c.n))
              .group_by(union.c.site_id, union.c.app_id, union.c.state))
    return {(site_id, app_id, state): int(n) for site_id, app_id, state, n in conn.execute(totals) if n}


def counts_by_state(conn: sa.Connection, user_id: int, *, site_ids: Optional[list[int]] = None,
                    app_ids: Optional[list[int]] = None, tag: Optional[tuple[str, str]] = None) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for (_site, _app, state), n in counts_by_site_app_state(conn, user_id, site_ids=site_ids, app_ids=app_ids,
                                                            tag=tag).items():
        out[state] += n
    return {state: n for state, n in out.items() if n}


def counts_by_site_state(conn: sa.Connection, user_id: int) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (site, _app, state), n in counts_by_site_app_state(conn, user_id).items():
        out[site][state] += n
    return {site: {s: n for s, n in states.items() if n} for site, states in out.items()}
