"""/transfers/: stage-in / stage-out items (created with their job); updates drive job states."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import MAX_ITEMS_PER_BULK_OP, TransferItem
from balsam.states import JobState, TransferDirection, TransferItemState

from ..db import count_and_page, update_rows_by_id, where_eq, where_in
from ..errors import NotFound, not_found_ids, parse_partial
from ..http import PAGINATION, json_response, pagination, parse_bulk_patches, require_list
from ..jobs_logic import json_contains, owned_site_ids, set_states, utcnow
from ..routing import Ctx, route
from ..tables import jobs, transfer_items

TI_FIELDS = ["id", "job_id", "direction", "local_path", "remote_path", "location_alias", "recursive", "state",
             "task_id", "transfer_info"]
TI_COLUMNS = [transfer_items.c[f] for f in TI_FIELDS]
UPDATABLE = {"state", "task_id", "transfer_info"}
FILTERS = {"id", "site_id", "job_id", "state", "direction", "job_state", "tags"}


def ti_dict(row: Any) -> dict[str, Any]:
    return dict(zip(TI_FIELDS, row))


def _owned_items():
    return sa.select(*TI_COLUMNS).join(jobs, jobs.c.id == transfer_items.c.job_id)


def list_transfers(ctx: Ctx) -> Response:
    q = ctx.query(FILTERS | PAGINATION)
    limit, offset = pagination(q)
    stmt = _owned_items()
    with ctx.read() as conn:
        stmt = stmt.where(jobs.c.site_id.in_(owned_site_ids(ctx.user.id)))
        stmt = where_in(stmt, transfer_items.c.id, q.int_list("id"))
        stmt = where_in(stmt, jobs.c.site_id, q.int_list("site_id"))
        stmt = where_in(stmt, transfer_items.c.job_id, q.int_list("job_id"))
        stmt = where_in(stmt, transfer_items.c.state, q.enum_list("state", TransferItemState))
        stmt = where_eq(stmt, transfer_items.c.direction, q.enum("direction", TransferDirection))
        stmt = where_eq(stmt, jobs.c.state, q.enum("job_state", JobState))
        tags = q.key_values("tags")
        if tags:
            stmt = stmt.where(json_contains(jobs.c.tags, tags, conn.dialect.name))
        count, rows = count_and_page(conn, stmt, [transfer_items.c.id], limit, offset)
    return json_response({"count": count, "results": [ti_dict(r) for r in rows]})


def read_transfer(ctx: Ctx) -> Response:
    ti_id = ctx.path_int("transfer_id")
    with ctx.read() as conn:
        row = conn.execute(
            _owned_items().where(transfer_items.c.id == ti_id, jobs.c.site_id.in_(owned_site_ids(ctx.user.id)))
        ).first()
    if row is None:
        raise NotFound(f"TransferItem {ti_id} not found")
    return json_response(ti_dict(row))


def _parse(data: Any, loc: list[Any]) -> dict[str, Any]:
    values = parse_partial(TransferItem, data, UPDATABLE, loc)
    if "state" in values:
        values["state"] = values["state"].value
    return values


def update_items(conn: sa.Connection, user_id: int, patches: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Update items, then advance their jobs: READY -> STAGED_IN when every stage-in is done,
    POSTPROCESSED -> JOB_FINISHED when every stage-out is done (and release the children)."""
    ids = list(patches)
    owned = set(
        conn.execute(
            sa.select(transfer_items.c.id)
            .join(jobs, jobs.c.id == transfer_items.c.job_id)
            .where(transfer_items.c.id.in_(ids), jobs.c.site_id.in_(owned_site_ids(user_id)))
        ).scalars()
    )
    if set(ids) - owned:
        raise not_found_ids("TransferItem", set(ids) - owned)
    update_rows_by_id(conn, transfer_items, patches)
    advance_jobs_after_transfers(conn, ids)
    rows = conn.execute(sa.select(*TI_COLUMNS).where(transfer_items.c.id.in_(ids)).order_by(transfer_items.c.id))
    return [ti_dict(r) for r in rows]


def advance_jobs_after_transfers(conn: sa.Connection, item_ids: list[int]) -> None:
    job_ids = sa.select(transfer_items.c.job_id).where(transfer_items.c.id.in_(item_ids))
    if conn.dialect.name == "postgresql":
        # Items of one job finishing in concurrent requests: lock the jobs first, so the later
        # transaction waits and then sees the other's items as done (no job left behind).
        conn.execute(sa.select(jobs.c.id).where(jobs.c.id.in_(job_ids)).order_by(jobs.c.id).with_for_update())
    not_done = (
        sa.select(sa.literal(1))
        .where(
            transfer_items.c.job_id == jobs.c.id,
            transfer_items.c.direction == sa.bindparam("direction"),
            transfer_items.c.state != TransferItemState.done.value,
        )
        .exists()
    )
    moves: dict[int, tuple[str, JobState]] = {}
    for state, direction, target in (
        (JobState.ready, TransferDirection.stage_in, JobState.staged_in),
        (JobState.postprocessed, TransferDirection.stage_out, JobState.finished),
    ):
        ready = conn.execute(
            sa.select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.state == state.value, ~not_done),
            {"direction": direction.value},
        ).scalars()
        for jid in ready:
            moves[jid] = (state.value, target)
    if moves:
        set_states(conn, moves, utcnow(), {"message": "Transfers done"})


def update_transfer(ctx: Ctx) -> Response:
    ti_id = ctx.path_int("transfer_id")
    values = _parse(ctx.json(), ["body"])
    with ctx.write() as conn:
        (row,) = update_items(conn, ctx.user.id, {ti_id: values})
    return json_response(row)


def bulk_update(ctx: Ctx) -> Response:
    payload = require_list(ctx.json(), "transfer item updates", MAX_ITEMS_PER_BULK_OP)
    patches = parse_bulk_patches(payload, "transfer item", _parse)
    with ctx.write() as conn:
        rows = update_items(conn, ctx.user.id, patches) if patches else []
    return json_response(rows)


routes = [
    route("/transfers/", {"GET": list_transfers, "PATCH": bulk_update}),
    route("/transfers/{transfer_id}", {"GET": read_transfer, "PUT": update_transfer}),
]
