"""Migration 0023_hold_waiting_stage_ins: the stage-in items of the jobs waiting for their parents
when it runs are held (``awaiting_job``, the holds of pending and in-flight ones counted) as the server now creates them, so that the site agent does
not copy their inputs before the parents made them; the downgrade makes every held stage-in
``pending`` again (the code before it never starts one). On SQLite and PostgreSQL, from the revision
before it with rows written as the server wrote them."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import command

from balsam.server.db import create_db_engine
from balsam.server.migrate import alembic_config, head_revision, load_migration, upgrade
from scratch_db import scratch_database

MIGRATION = load_migration("0023_hold_waiting_stage_ins.py")
BEFORE = MIGRATION.down_revision


def _seed(conn: sa.Connection) -> dict[str, int]:
    """A user, site and app; a parent RUNNING, its waiting child with stage-in items in every state
    and a stage-out, and a READY job's pending stage-in. {name: item id}."""
    user = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES ('m', '2026-12-01') RETURNING id")).scalar()
    site = conn.execute(sa.text(
        "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
        "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
        "(:u, 's', '/s', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01') RETURNING id"), {"u": user}).scalar()
    app = conn.execute(sa.text(
        "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
        "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site}).scalar()

    def job(workdir: str, state: str, parents: list[int]) -> int:
        return conn.execute(sa.text(
            "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
            "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
            "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
            "VALUES (:s, :a, :w, '{}', '', '{}', 1, 1, 1, 1, '{}', 0, 1, 0, :p, :st, true, '', '', "
            "'2026-12-01 00:00:00') RETURNING id"), {"s": site, "a": app, "w": workdir, "p": json.dumps(parents), "st": state}
        ).scalar()

    parent = job("p", "RUNNING", [])
    child = job("c", "AWAITING_PARENTS", [parent])
    ready = job("r", "READY", [])
    conn.execute(sa.text("INSERT INTO job_parents (child_id, parent_id) VALUES (:c, :p)"), {"c": child, "p": parent})

    def item(job_id: int, direction: str, state: str, task_id: str = "", info: Any = None) -> int:
        return conn.execute(sa.text(
            "INSERT INTO transfer_items (job_id, direction, local_path, remote_path, location_alias, recursive, state, "
            "task_id, transfer_info) VALUES (:j, :d, 'in.dat', '/r', 'aps', false, :s, :t, :i) RETURNING id"),
            {"j": job_id, "d": direction, "s": state, "t": task_id, "i": json.dumps(info or {})}).scalar()

    return {
        "untried": item(child, "in", "pending"),
        "retrying": item(child, "in", "pending", info={"attempts": 1, "error": "no such file", "retry_after": "x", "bytes": 3,
                                                       "holds": 2}),
        "copied": item(child, "in", "done", "local:t1", {"bytes": 3, "dest": "/w/in.dat"}),
        "submitted": item(child, "in", "pending", "local:t2"),
        "active": item(child, "in", "active", "local:t3", {"dest": "/w/in.dat", "submitted": "x", "queued": True,
                                                          "started": "y", "task": {"files": 1}, "bytes": 3}),
        "stage_out": item(child, "out", "awaiting_job"),
        "ready_in": item(ready, "in", "pending"),
    }


def _items(conn: sa.Connection) -> dict[int, tuple[str, str, dict]]:
    rows = conn.execute(sa.text("SELECT id, state, task_id, transfer_info FROM transfer_items")
                        .columns(transfer_info=sa.JSON)).all()
    return {r.id: (r.state, r.task_id, r.transfer_info) for r in rows}


def test_migration_holds_the_stage_in_of_waiting_jobs(database_url: str, tmp_path) -> None:
    with scratch_database(database_url, tmp_path, "holdin") as url:
        assert upgrade(url, BEFORE) == BEFORE
        engine = create_db_engine(url)
        try:
            with engine.begin() as conn:
                ids = _seed(conn)
                before = _items(conn)
            assert upgrade(url) == head_revision()
            with engine.begin() as conn:
                after = _items(conn)
            assert {name: after[i] for name, i in ids.items()} == {
                # Pending or in flight: the hold is counted (transfer_info.holds one up), as the
                # server counts a re-run's, so that an agent's journal line of a task from before it
                # is not re-attached; a done item's is not (the server's does not either).
                "untried": ("awaiting_job", "", {"holds": 1}),
                "retrying": ("awaiting_job", "", {"bytes": 3, "holds": 3}),
                "copied": ("awaiting_job", "", {"bytes": 3}),
                # In flight: held too, as the server holds a re-run's (its task copies the same
                # stale file), without its task id or the task's clock.
                "submitted": ("awaiting_job", "", {"holds": 1}),
                "active": ("awaiting_job", "", {"bytes": 3, "holds": 1}),
                "stage_out": before[ids["stage_out"]],
                "ready_in": before[ids["ready_in"]],  # not waiting
            }
            command.downgrade(alembic_config(url), BEFORE)
            with engine.begin() as conn:
                down = _items(conn)
            assert {name: down[i][0] for name, i in ids.items()} == {
                "untried": "pending", "retrying": "pending", "copied": "pending", "submitted": "pending",
                "active": "pending", "stage_out": "awaiting_job", "ready_in": "pending"}
            assert upgrade(url) == head_revision()
        finally:
            engine.dispose()
