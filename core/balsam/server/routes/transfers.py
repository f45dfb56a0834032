"""/transfers/: stage-in / stage-out items (created with their job); updates drive job states."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import MAX_ITEMS_PER_BULK_OP, TransferItem
from balsam.states import DONE_STATES, JobState, TransferDirection, TransferItemState

from ..db import count_and_page, update_rows_by_id, where_eq, where_gt, where_in
from ..errors import Conflict, NotFound, not_found_ids, parse_partial
from ..http import ID_AFTER, PAGINATION, json_response, pagination, parse_bulk_patches, require_list
from ..jobs_logic import EventBuffer, json_contains, owned_site_ids, set_states, utcnow
from ..routing import Ctx, route
from ..tables import jobs, transfer_items

TI_FIELDS = ["id", "job_id", "direction", "local_path", "remote_path", "location_alias", "recursive", "state",
             "task_id", "transfer_info"]
TI_COLUMNS = [transfer_items.c[f] for f in TI_FIELDS]
UPDATABLE = {"state", "task_id", "transfer_info"}
FILTERS = {"id", "site_id", "job_id", "state", "direction", "job_state", "tags", "ordering", ID_AFTER}
#: ``state`` lists in-flight items (active, inactive) before pending ones, so a site agent reading a
#: limited page always sees the transfers it must poll.
ORDERINGS = {"id": [transfer_items.c.id], "-id": [transfer_items.c.id.desc()],
             "state": [transfer_items.c.state, transfer_items.c.id],
             "-state": [transfer_items.c.state.desc(), transfer_items.c.id]}


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
        stmt = where_in(stmt, transfer_items.c.id, q.int_list("id", bits=64))
        stmt = where_gt(stmt, transfer_items.c.id, q.int(ID_AFTER, bits=64))
        stmt = where_in(stmt, jobs.c.site_id, q.int_list("site_id"))
        stmt = where_in(stmt, transfer_items.c.job_id, q.int_list("job_id", bits=64))
        stmt = where_in(stmt, transfer_items.c.state, q.enum_list("state", TransferItemState))
        stmt = where_eq(stmt, transfer_items.c.direction, q.enum("direction", TransferDirection))
        stmt = where_eq(stmt, jobs.c.state, q.enum("job_state", JobState))
        tags = q.key_values("tags")
        if tags:
            stmt = stmt.where(json_contains(jobs.c.tags, tags, conn.dialect.name))
        order = ORDERINGS[q.choice("ordering", list(ORDERINGS), default="id")]
        count, rows = count_and_page(conn, stmt, order, limit, offset)
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
    # Two plain lookups: the user's sites, then the items' sites by primary key. (One query with
    # both IN lists made SQLite scan the jobs of every owned site: 1 s for 2,000 items.)
    my_sites = set(conn.execute(owned_site_ids(user_id)).scalars())
    items = (
        sa.select(transfer_items.c.id, jobs.c.site_id)
        .join(jobs, jobs.c.id == transfer_items.c.job_id)
        .where(transfer_items.c.id.in_(ids))
    )
    if conn.dialect.name == "postgresql":
        # The items' jobs are locked first, in id order, before any item is written: a job's
        # delete locks the job and then (its cascade) the items, and this update used to write
        # the items and then lock the jobs (advance_jobs_after_transfers): a deadlock. Reading
        # ownership under the lock also settles a delete that committed meanwhile: its job's row
        # is skipped, so its items are not found (404, all or nothing) rather than an item that
        # vanished between this check and the answer (a 500 for PUT, an item silently left out
        # of a bulk PATCH's answer). Items go only with their job, so they stay while it is locked.
        # Only the user's own jobs are locked (the site condition in the locking statement): naming
        # another user's item ids used to lock that user's jobs FOR UPDATE before the ownership
        # check, and to wait for their writers, so that a 404 for a busy foreign item came late
        # (telling its owner's activity) while another user's writes waited for this request.
        items = items.where(jobs.c.site_id.in_(sorted(my_sites))).order_by(jobs.c.id).with_for_update(of=jobs)
    owned = {item_id for item_id, site_id in conn.execute(items) if site_id in my_sites}
    if set(ids) - owned:
        raise not_found_ids("TransferItem", set(ids) - owned, of_request=True)
    # A statement of its own, after the lock: a hold that committed while the lock was waited for
    # is seen (PostgreSQL re-checks only the locked rows, the jobs, in their new version; the items
    # joined to them would be read as they were before the hold).
    held = sorted(conn.execute(sa.select(transfer_items.c.id).where(
        transfer_items.c.id.in_(ids), transfer_items.c.direction == TransferDirection.stage_in.value,
        transfer_items.c.state == TransferItemState.awaiting_job.value)).scalars())
    if held:
        raise _held_conflict(held)
    update_rows_by_id(conn, transfer_items, patches)
    advance_jobs_after_transfers(conn, ids)
    rows = conn.execute(sa.select(*TI_COLUMNS).where(transfer_items.c.id.in_(ids)).order_by(transfer_items.c.id))
    return [ti_dict(r) for r in rows]


def _held_conflict(held: list[int]) -> Conflict:
    """The refusal of updates of stage-in items ``awaiting_job``: only the server starts such an item,
    when its job leaves AWAITING_PARENTS. An agent that read the item ``pending`` (or ``active``)
    before its job was re-run and sent back to wait for its parents (jobs_logic._hold_stage_ins)
    would otherwise record a copy made before the parents' new run (``active``, then ``done``: the
    job released straight to STAGED_IN on the stale file), put it back to ``pending`` (copied while
    the parents run), or fail the waiting job (``error``). Read under the jobs' locks (PostgreSQL)
    or the write lock (SQLite), as the hold writes it, so an update and a hold never cross. The
    transfers module takes this 409 for "held again": it cancels the task it submitted for such
    items, and they start with the job's release. (A stage-out never goes back to ``awaiting_job``
    once started, and the agent reads none that is: no update of one can be stale that way.)"""
    shown = ", ".join(str(i) for i in held[:10]) + (f" (+{len(held) - 10} more)" if len(held) > 10 else "")
    # Not "until its job leaves AWAITING_PARENTS": a job moved on from the wait by its user (FAILED,
    # STAGED_IN) keeps its items held until a re-run moves it to READY.
    return Conflict(f"TransferItem {shown}: stage-in held (awaiting_job): the server starts it when its job goes "
                    "to READY (release or re-run). Nothing was updated", refused_ids=held)


def advance_jobs_after_transfers(conn: sa.Connection, item_ids: list[int]) -> None:
    job_ids = sa.select(transfer_items.c.job_id).where(transfer_items.c.id.in_(item_ids))
    if conn.dialect.name == "postgresql":
        # Items of one job finishing in concurrent requests: lock the jobs first, so the later
        # transaction waits and then sees the other's items as done (no job left behind).
        # (update_items has locked them before writing the items: this finds them held.)
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
    _fail_jobs_of_failed_items(conn, item_ids)
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


def _fail_jobs_of_failed_items(conn: sa.Connection, item_ids: list[int]) -> None:
    """An item in ``error`` has used up its tries (the site agent retries before it says so): its job
    goes to FAILED with the item's error in the event, instead of waiting forever (Balsam 0.7 left it
    in READY or POSTPROCESSED)."""
    rows = conn.execute(
        sa.select(transfer_items.c.id, transfer_items.c.job_id, transfer_items.c.direction, transfer_items.c.remote_path,
                  transfer_items.c.local_path, transfer_items.c.location_alias, transfer_items.c.transfer_info,
                  jobs.c.state)
        .join(jobs, jobs.c.id == transfer_items.c.job_id)
        .where(
            transfer_items.c.id.in_(item_ids),
            transfer_items.c.state == TransferItemState.error.value,
            jobs.c.state.notin_([s.value for s in DONE_STATES]),
        )
        .order_by(transfer_items.c.id)
    ).all()
    failures: dict[int, tuple[str, dict[str, Any]]] = {}
    for row in rows:
        if row.job_id in failures:
            continue
        info = row.transfer_info or {}
        error = str(info.get("error") or "no error message recorded")
        if row.direction == TransferDirection.stage_in.value:
            what = f"stage-in of {row.location_alias}:{row.remote_path} to {row.local_path}"
        else:
            what = f"stage-out of {row.local_path} to {row.location_alias}:{row.remote_path}"
        data = {"message": f"Transfer failed: {what}: {error}", "transfer_item_id": row.id,
                "error": error, "attempts": info.get("attempts", 0)}
        failures[row.job_id] = (row.state, data)
    if not failures:
        return
    now = utcnow()
    conn.execute(
        sa.update(jobs).where(jobs.c.id.in_(list(failures)))
        .values(state=JobState.failed.value, last_update=now, session_id=None)
    )
    events = EventBuffer()
    for job_id, (from_state, data) in failures.items():
        events.add(job_id, from_state, JobState.failed.value, now, data)
    events.flush(conn)


def update_transfer(ctx: Ctx) -> Response:
    ti_id = ctx.path_int("transfer_id")
    values = _parse(ctx.json(), ["body"])
    with ctx.write() as conn:
        (row,) = update_items(conn, ctx.user.id, {ti_id: values})
    ctx.wake_acquires()  # a job whose last stage-in ended is STAGED_IN now
    return json_response(row)


def bulk_update(ctx: Ctx) -> Response:
    payload = require_list(ctx.json(), "transfer item updates", MAX_ITEMS_PER_BULK_OP)
    patches = parse_bulk_patches(payload, "transfer item", _parse, wide_id=True)
    with ctx.write() as conn:
        rows = update_items(conn, ctx.user.id, patches) if patches else []
    if patches:
        ctx.wake_acquires()  # as update_transfer
    return json_response(rows)


routes = [
    route("/transfers/", {"GET": list_transfers, "PATCH": bulk_update}),
    route("/transfers/{transfer_id}", {"GET": read_transfer, "PUT": update_transfer}),
]
