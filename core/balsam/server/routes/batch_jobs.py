"""/batch-jobs/: scheduler allocations (with the bulk PATCH the site agent sends each cycle, as in 0.7)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import MAX_ITEMS_PER_BULK_OP, BatchJob
from balsam.serialization import PayloadError, from_dict, to_dict
from balsam.states import BATCH_JOB_TRANSITIONS, BatchJobState

from ..auth import revoke_credentials
from ..db import count_and_page, update_rows_by_id, where_eq, where_gt, where_in
from ..errors import Conflict, NotFound, ValidationFailed, missing_answers, not_found_ids, parse_partial, refusals_answered
from ..http import (ID_AFTER, MAX_TAG_FILTERS, PAGINATION, QueryParams, check_int_fields, is_json_int, json_response,
                    no_content, pagination, parse_bulk_patches, require_list, wire_datetime)
from ..idempotency import replay_one
from ..jobs_logic import BATCH_JOB_ENDED_MSG, json_contains, owned_site_ids, site_owned_by, utcnow
from ..sessions_logic import release_session_jobs
from ..routing import Ctx, route
from ..tables import batch_jobs, credentials, sessions, sites

logger = logging.getLogger(__name__)

BJ_FIELDS = ["id", "site_id", "scheduler_id", "project", "queue", "optional_params", "num_nodes", "wall_time_min",
             "job_mode", "partitions", "filter_tags", "state", "status_info", "start_time", "end_time"]
BJ_COLUMNS = [batch_jobs.c[f] for f in BJ_FIELDS]
UPDATABLE = {"scheduler_id", "state", "status_info", "start_time", "end_time", "project", "queue", "optional_params",
             "num_nodes", "wall_time_min", "job_mode", "partitions", "filter_tags"}
FILTERS = {"id", "site_id", "state", "scheduler_id", "queue", "ordering", "start_time_before", "start_time_after",
           "end_time_before", "end_time_after", "filter_tags", ID_AFTER}
BJ = BatchJobState
#: What the scheduler took when the BatchJob was submitted. Once it has left pending_submission,
#: nothing applies a change of these to the scheduler (no resubmission, no scontrol/qalter): the
#: record would lie to whoever reads it (the elastic queue counts its nodes and minutes), so a
#: change is refused (409). The same value is accepted: a client that re-sends a whole object (0.7's
#: save() sends every field set since it was read, changed or not) keeps working.
FROZEN_AFTER_SUBMISSION = ("num_nodes", "wall_time_min", "queue", "project", "job_mode")
#: The extension field of a BatchJob update (an item of the bulk PATCH, the PUT's body): a merge of
#: ``status_info`` in the manner of RFC 7396 (a key set to a string is set, a key set to null is
#: removed, the keys not named are kept), applied to the stored status_info in the UPDATE that
#: applies the rest of the update, under the row's lock. ``status_info`` itself replaces the whole
#: object (the Balsam 0.7 contract, kept for 0.7 clients), so two writers of different keys (a
#: launcher's note, the site agent's scheduler cycle) each wiped the other's key, or put back a
#: stale one from the copy they had read; each sends only its own keys this way, and both stay.
STATUS_INFO_MERGE = "status_info_merge"


def bj_dict(row: Any) -> dict[str, Any]:
    out = dict(zip(BJ_FIELDS, row))
    out["start_time"], out["end_time"] = wire_datetime(out["start_time"]), wire_datetime(out["end_time"])
    return out


def _json_values(values: dict[str, Any]) -> dict[str, Any]:
    template = BatchJob(site_id=0, project="", queue="", num_nodes=1, wall_time_min=1, job_mode="mpi")
    out = {}
    for name, value in values.items():
        if name in ("state", "job_mode"):
            out[name] = value.value if hasattr(value, "value") else value
        elif name == "partitions" and value is not None:
            setattr(template, "partitions", value)
            out[name] = to_dict(template)["partitions"]
        else:
            out[name] = value
    return out


def _validate_numbers(values: dict[str, Any], loc: list[Any]) -> None:
    check_int_fields(values, ["site_id", "num_nodes", "wall_time_min"], loc, wide=("scheduler_id",))
    for index, part in enumerate(values.get("partitions") or []):
        number = part.get("num_nodes") if isinstance(part, dict) else getattr(part, "num_nodes", None)
        check_int_fields({"num_nodes": number}, ["num_nodes"], loc + ["partitions", index])
        # As the BatchJob's own (below): a partition of 0 or -1 nodes passed the site agent's
        # check when the sizes still added up ([2, -1] of 1 node), waited in the queue, and its
        # launcher refused it at the start ("needs at least 1 node"): the allocation was lost.
        if number is not None and number < 1:
            raise ValidationFailed.field(loc + ["partitions", index, "num_nodes"],
                                         f"must be a positive integer, got {number!r}")
    for name in ("num_nodes", "wall_time_min"):
        if name in values and (values[name] is None or values[name] < 1):
            raise ValidationFailed.field(loc + [name], f"must be a positive integer, got {values[name]!r}")
    # Its launchers send filter_tags in every acquire, a partition's merged with the BatchJob's (the
    # job script's --tag and --part), which takes at most MAX_TAG_FILTERS: refused here, not at
    # each acquire of a BatchJob that could never lease a job. (An update of one of the two is
    # checked alone; the launcher checks the merge again at its start.)
    own = dict(values.get("filter_tags") or {})
    tag_sets = [(loc + ["filter_tags"], own)]
    for index, part in enumerate(values.get("partitions") or []):
        tags = part.get("filter_tags") if isinstance(part, dict) else getattr(part, "filter_tags", None)
        tag_sets.append((loc + ["partitions", index, "filter_tags"], {**own, **dict(tags or {})}))
    for where, tags in tag_sets:
        if len(tags) > MAX_TAG_FILTERS:
            raise ValidationFailed.field(where, f"at most {MAX_TAG_FILTERS} tags (a partition's merged with the "
                                                f"BatchJob's), got {len(tags)}")


def batch_jobs_select(user_id: int, q: QueryParams, dialect: str) -> tuple[sa.Select, list[sa.ColumnElement]]:
    """The user's BatchJobs matching the query's filters, and their ordering (API and dashboard)."""
    stmt = sa.select(*BJ_COLUMNS).where(batch_jobs.c.site_id.in_(owned_site_ids(user_id)))
    stmt = where_in(stmt, batch_jobs.c.id, q.int_list("id"))
    stmt = where_gt(stmt, batch_jobs.c.id, q.int(ID_AFTER))  # 32-bit ids, as the id filter's
    stmt = where_in(stmt, batch_jobs.c.site_id, q.int_list("site_id"))
    stmt = where_in(stmt, batch_jobs.c.state, q.enum_list("state", BatchJobState))
    stmt = where_eq(stmt, batch_jobs.c.scheduler_id, q.int("scheduler_id", bits=64))
    if q.str("queue"):
        stmt = stmt.where(batch_jobs.c.queue == q.str("queue"))
    for name, op in (("start_time_before", "le"), ("start_time_after", "ge"), ("end_time_before", "le"),
                     ("end_time_after", "ge")):
        value = q.datetime(name)
        if value is not None:
            col = batch_jobs.c[name.rsplit("_", 1)[0]]
            stmt = stmt.where(col <= value if op == "le" else col >= value)
    tags = q.key_values("filter_tags")
    if tags:
        stmt = stmt.where(json_contains(batch_jobs.c.filter_tags, tags, dialect))
    ordering = q.choice("ordering", ["start_time", "-start_time", "id", "-id"])
    order: list[sa.ColumnElement] = [batch_jobs.c.id]
    if ordering == "-id":
        order = [batch_jobs.c.id.desc()]
    elif ordering in ("start_time", "-start_time"):
        # Never-started BatchJobs (no start_time) last, latest first when reversed: Balsam 0.7's
        # order on PostgreSQL, where that is the default. SQLite's default puts NULLs first
        # ascending, so the two backends listed them at opposite ends; said on both.
        start = batch_jobs.c.start_time
        order = [start.desc().nulls_first() if ordering.startswith("-") else start.asc().nulls_last(), batch_jobs.c.id]
    return stmt, order


def list_batch_jobs(ctx: Ctx) -> Response:
    q = ctx.query(FILTERS | PAGINATION)
    limit, offset = pagination(q)
    with ctx.read() as conn:
        stmt, order = batch_jobs_select(ctx.user.id, q, conn.dialect.name)
        count, rows = count_and_page(conn, stmt, order, limit, offset)
    return json_response({"count": count, "results": [bj_dict(r) for r in rows]})


def create_batch_job(ctx: Ctx) -> Response:
    data = ctx.json()
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "id"}
    try:
        bj = from_dict(BatchJob, data)
    except PayloadError as exc:
        raise ValidationFailed.from_payload(exc) from None
    values = to_dict(bj)
    values.pop("id", None)
    values["start_time"], values["end_time"] = bj.start_time, bj.end_time  # datetimes, not their text
    _validate_numbers(values, ["body"])
    # The server decides the initial state (as Balsam 0.7 did).
    values["state"] = BJ.pending_submission.value
    # Its site deleted by a request that committed after the check below: 404, as the check (the
    # INSERT's foreign key refused it, answered with PostgreSQL's text).
    with refusals_answered(missing_answers({"sites": f"Site {values['site_id']} not found"})), ctx.write() as conn:
        earlier = ctx.idempotency.claim(conn)
        if earlier is not None:  # a retried create: the same allocation, never a second one
            row = replay_one(earlier, "BatchJob", lambda bj_id: _get_owned(conn, ctx.user.id, bj_id))
            return json_response(bj_dict(row), earlier.status_code)
        if conn.execute(sa.select(sites.c.id).where(sites.c.id == values["site_id"], site_owned_by(ctx.user.id))).first() is None:
            raise NotFound(f"Site {values['site_id']} not found")
        new_id = conn.execute(sa.insert(batch_jobs).values(**values).returning(batch_jobs.c.id)).scalar_one()
        row = conn.execute(sa.select(*BJ_COLUMNS).where(batch_jobs.c.id == new_id)).one()
        ctx.idempotency.record(conn, 201, "BatchJob", [new_id])
        # Built before the commit, as jobs' (routes/jobs.py): an answer that cannot be built rolls
        # the BatchJob back, so a client retrying without a key does not ask for a second allocation.
        response = json_response(bj_dict(row), 201)
    return response


def _get_owned(conn: sa.Connection, user_id: int, bj_id: int, *, lock: bool = False) -> sa.Row:
    stmt = sa.select(*BJ_COLUMNS).where(batch_jobs.c.id == bj_id, batch_jobs.c.site_id.in_(owned_site_ids(user_id)))
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(key_share=True, of=batch_jobs)
    row = conn.execute(stmt).first()
    if row is None:
        raise NotFound(f"BatchJob {bj_id} not found")
    return row


def read_batch_job(ctx: Ctx) -> Response:
    with ctx.read() as conn:
        row = _get_owned(conn, ctx.user.id, ctx.path_int("batch_job_id"))
    return json_response(bj_dict(row))


def _parse_merge(data: dict[str, Any], loc: list[Any]) -> dict[str, Optional[str]]:
    """``data``'s :data:`STATUS_INFO_MERGE`, checked: an object of strings and nulls, never beside
    ``status_info`` (which of the two would the stored object be?)."""
    merge = data[STATUS_INFO_MERGE]
    if "status_info" in data:
        raise ValidationFailed.field(loc + [STATUS_INFO_MERGE], "cannot be sent with status_info (status_info "
                                     "replaces the whole object, status_info_merge changes the keys it names): "
                                     "send one of them")
    if not isinstance(merge, dict):
        raise ValidationFailed.field(loc + [STATUS_INFO_MERGE], f"must be an object of strings (a null removes its "
                                     f"key), got {type(merge).__name__}")
    bad = [(loc + [STATUS_INFO_MERGE, key], f"must be a string (or null: removes the key), got {type(value).__name__}")
           for key, value in merge.items() if value is not None and not isinstance(value, str)]
    if bad:
        raise ValidationFailed(bad)
    return merge


def _parse_patch(data: Any, loc: list[Any]) -> dict[str, Any]:
    merge = None
    if isinstance(data, dict) and STATUS_INFO_MERGE in data:
        merge = _parse_merge(data, loc)
        data = {k: v for k, v in data.items() if k != STATUS_INFO_MERGE}
    values = parse_partial(BatchJob, data, UPDATABLE, loc)
    _validate_numbers(values, loc)
    out = _json_values(values)
    if merge is not None:
        out[STATUS_INFO_MERGE] = merge
    return out


def _merge_status_info(stored: dict[str, Any], merge: dict[str, Optional[str]]) -> dict[str, Any]:
    """``stored`` with ``merge`` applied (:data:`STATUS_INFO_MERGE`): a null removes its key."""
    out = dict(stored or {})
    for key, value in merge.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _apply_state_rules(current: dict[int, str], patches: dict[int, dict[str, Any]]) -> None:
    """Validate BatchJob transitions; once pending_deletion, only ``finished`` applies (0.7 rule:
    other state values are dropped, other fields still update)."""
    problems = []
    for bj_id, patch in patches.items():
        if "state" not in patch:
            continue
        old, new = BJ(current[bj_id]), BJ(patch["state"])
        if old == new:
            continue
        if old == BJ.pending_deletion and new != BJ.finished:
            patch.pop("state")
            continue
        if new == BJ.pending_deletion and old in (BJ.finished, BJ.submit_failed):
            # Revoking an allocation that already ended (libEnsemble's revoke_allocation after the
            # launcher left on its own) is already done: keep the final state, as Balsam 0.7 did.
            patch.pop("state")
            continue
        if new not in BATCH_JOB_TRANSITIONS[old]:
            allowed = ", ".join(sorted(s.value for s in BATCH_JOB_TRANSITIONS[old])) or "none"
            problems.append(f"batch job {bj_id}: state cannot change from {old.value} to {new.value} (allowed: {allowed})")
    if problems:
        raise Conflict("Invalid state change, nothing was updated: " + "; ".join(problems[:10]))


def _check_frozen_fields(current: dict[int, Any], patches: dict[int, dict[str, Any]]) -> None:
    """Refuse (409, nothing updated) a change of a :data:`FROZEN_AFTER_SUBMISSION` field of a
    BatchJob whose stored state is not pending_submission; ``current``: the stored rows by id."""
    problems, refused = [], []
    for bj_id, patch in patches.items():
        row = current[bj_id]
        if row.state == BJ.pending_submission.value:
            continue
        changed = [f"{name} {row._mapping[name]!r} -> {patch[name]!r}" for name in FROZEN_AFTER_SUBMISSION
                   if name in patch and patch[name] != row._mapping[name]]
        if changed:
            refused.append(bj_id)
            problems.append(f"batch job {bj_id}: {', '.join(changed)} while {row.state} "
                            f"(these fields change only while pending_submission)")
    if problems:
        raise Conflict("Submitted BatchJob fields cannot change, nothing was updated: " + "; ".join(problems[:10]),
                       refused_ids=refused)


#: Whether this process logged a start_time not stored at INFO yet (:func:`_keep_earliest_start`).
_start_kept_logged = False


def _keep_earliest_start(current: dict[int, Any], patches: dict[int, dict[str, Any]]) -> None:
    """A sent start_time is stored only where the stored one is NULL or later: start_time is the
    allocation's first start, and each writer knows it no earlier than it happened (the agent's
    sighting, up to a sync period late; the scheduler's start; a launcher's first Session,
    sessions_logic.note_batch_job_start), so the earliest is the truest. Without this the agent's
    sighting, PATCHed because its copy read before the Session had none, overwrote the Session's
    earlier start (sessions_logic says why it is race-free: ``current`` was read under the rows'
    lock). The server cannot tell that PATCH from a user's (the same Balsam 0.7 request, the same
    token), so a later start_time is not stored from anyone, and a sent null (a client re-sending a
    copy read before the start was known) keeps the stored one; the answer shows what is stored.
    An earlier one is stored (the scheduler's history once the BatchJob ended). A wrong stored one
    (a typo's early date) is replaced or cleared by the server's administrator, on the database:
    ``balsam server set-start-time`` (admin.Admin.set_batch_job_start). A later one not stored is
    also logged: the first per server process at INFO (the agent's late sighting makes most of
    them: logged each, the log would fill with the expected case), the others at DEBUG."""
    global _start_kept_logged
    for bj_id, patch in patches.items():
        if "start_time" not in patch:
            continue
        stored, sent = current[bj_id].start_time, patch["start_time"]
        # Both aware: the parser reads a time without a zone as UTC, tables.UTCDateTime returns UTC.
        if stored is not None and (sent is None or sent >= stored):
            del patch["start_time"]
            if sent is not None and sent != stored:
                first, _start_kept_logged = not _start_kept_logged, True
                logger.log(logging.INFO if first else logging.DEBUG,
                           "BatchJob %s: start_time %s sent, %s kept: a stored start_time only moves earlier "
                           "(the site agent's sighting of a job its launcher's Session already started is such "
                           "a case); `balsam server set-start-time` replaces a wrong one%s", bj_id,
                           sent.isoformat(), stored.isoformat(),
                           " (further such cases are logged at DEBUG)" if first else "")


def _update_many(conn: sa.Connection, user_id: int,
                 patches: dict[int, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The updated BatchJobs, and the ids of the launcher credentials revoked because theirs finished
    (for the caller to forget in the credential cache once committed)."""
    ids = list(patches)
    # Read (and, on PostgreSQL, locked) with the rows below: applied to the stored status_info
    # under that lock, a merge is atomic with every other writer's update of the row.
    merges = {bj_id: patch.pop(STATUS_INFO_MERGE) for bj_id, patch in patches.items() if STATUS_INFO_MERGE in patch}
    frozen = [batch_jobs.c[name] for name in FROZEN_AFTER_SUBMISSION]
    stmt = sa.select(batch_jobs.c.id, batch_jobs.c.state, batch_jobs.c.start_time, batch_jobs.c.status_info,
                     *frozen).where(
        batch_jobs.c.id.in_(ids), batch_jobs.c.site_id.in_(owned_site_ids(user_id))
    )
    if conn.dialect.name == "postgresql":
        # Each transition is validated against the state it really changes: unlocked, two
        # concurrent updates both read the old state, and the later write won (a finished
        # allocation became pending_deletion; a user's cancel was overwritten by the agent's
        # queued). Rows in id order (two bulk updates cannot deadlock); NO KEY UPDATE, the lock
        # the UPDATE below takes anyway, so a session or a lease referring to the BatchJob (a
        # key-share lock) does not wait. The lock order of this path: BatchJobs, then their
        # credentials (a finish revokes them), sessions, then jobs (see sessions_logic). (SQLite
        # serializes writers.)
        stmt = stmt.order_by(batch_jobs.c.id).with_for_update(key_share=True, of=batch_jobs)
    stored = {row.id: row for row in conn.execute(stmt)}
    missing = set(ids) - stored.keys()
    if missing:
        raise not_found_ids("BatchJob", missing, of_request=True)
    _check_frozen_fields(stored, patches)
    current = {bj_id: row.state for bj_id, row in stored.items()}
    _apply_state_rules(current, patches)
    _keep_earliest_start(stored, patches)
    for bj_id, merge in merges.items():
        if merge:
            patches[bj_id]["status_info"] = _merge_status_info(stored[bj_id].status_info, merge)
    update_rows_by_id(conn, batch_jobs, patches)
    finished = [bj_id for bj_id, values in patches.items()
                if values.get("state") == BJ.finished.value and current[bj_id] != BJ.finished.value]
    revoked: list[int] = []
    if finished:
        # Launcher credentials end with their allocation, and its sessions: the credentials first,
        # as a revoke alone (DELETE /auth/credentials/{id}, `balsam server revoke`) takes them
        # before the sessions it ends (auth.revoke_credentials, which ends those of the launcher
        # credentials' BatchJobs here too). Sessions first, then the credentials, this and a
        # concurrent revoke each held what the other waited for (a deadlock, 503). The rest (a
        # user's sessions naming the BatchJob) after.
        revoked = [r.id for r in revoke_credentials(conn, credentials.c.batch_job_id.in_(finished))]
        end_batch_job_sessions(conn, finished)
    rows = conn.execute(sa.select(*BJ_COLUMNS).where(batch_jobs.c.id.in_(ids)).order_by(batch_jobs.c.id))
    return [bj_dict(r) for r in rows], revoked


def end_batch_job_sessions(conn: sa.Connection, bj_ids: list[int]) -> None:
    """A finished allocation has no live launcher: end its sessions now (RUNNING -> RUN_TIMEOUT)."""
    stmt = sa.select(sessions.c.id).where(sessions.c.batch_job_id.in_(bj_ids))
    if conn.dialect.name == "postgresql":
        # The sessions before their jobs, as the expiry sweep and every other path lock them
        # (sessions_logic's module docstring): locking the jobs first deadlocked with a sweep that
        # held the session and waited for the jobs. A session the sweep holds is waited for, then
        # found deleted (a locking read skips it).
        stmt = stmt.order_by(sessions.c.id).with_for_update(of=sessions)
    session_ids = list(conn.execute(stmt).scalars())
    if session_ids:
        release_session_jobs(conn, session_ids, utcnow(), BATCH_JOB_ENDED_MSG)
        conn.execute(sa.delete(sessions).where(sessions.c.id.in_(session_ids)))


def update_batch_job(ctx: Ctx) -> Response:
    bj_id = ctx.path_int("batch_job_id")
    data = ctx.json()
    site_id = None
    if isinstance(data, dict):
        site_id = data.get("site_id")
        data = {k: v for k, v in data.items() if k not in ("id", "site_id")}
    patch = _parse_patch(data, ["body"])
    with ctx.write() as conn:
        # A BatchJob stays at its site: another site_id is refused as the bulk PATCH refuses it (it
        # was dropped silently, answering 200); the same one is accepted, sent by a client that
        # re-sends the object it read.
        if site_id is not None:
            stored = _get_owned(conn, ctx.user.id, bj_id).site_id
            if not (is_json_int(site_id) and site_id == stored):
                raise ValidationFailed.field(["body", "site_id"], "cannot be changed")
        (row,), revoked = _update_many(conn, ctx.user.id, {bj_id: patch})
    # This process stops trusting them now, not when its cache would check again.
    ctx.forget_credentials(revoked)
    ctx.wake_acquires()  # a finished BatchJob ends its sessions: their jobs may be leasable now
    return json_response(row)


def bulk_update(ctx: Ctx) -> Response:
    payload = require_list(ctx.json(), "batch job updates", MAX_ITEMS_PER_BULK_OP)
    patches = parse_bulk_patches(payload, "batch job", _parse_patch, fixed=("site_id",))
    with ctx.write() as conn:
        rows, revoked = _update_many(conn, ctx.user.id, patches) if patches else ([], [])
    ctx.forget_credentials(revoked)  # as update_batch_job
    if patches:
        ctx.wake_acquires()  # as update_batch_job
    return json_response(rows)


def delete_batch_job(ctx: Ctx) -> Response:
    bj_id = ctx.path_int("batch_job_id")
    with ctx.write() as conn:
        # Locked first, as an update of it locks it first (the lock order BatchJob, credentials,
        # sessions, jobs): a concurrent update (its finish) and this delete take their turns
        # instead of each holding what the other waits for. NO KEY UPDATE, as the update takes: a lease of a job
        # to one of its sessions (a key-share lock on it) goes on; the DELETE below waits for it.
        _get_owned(conn, ctx.user.id, bj_id, lock=True)
        # As when it finishes: its launcher can no longer report, so its credentials stop and its
        # sessions end now (RUNNING jobs -> RUN_TIMEOUT, the others freed) rather than keep their
        # jobs leased; the credentials first, as there. Their rows go with the BatchJob: their ids
        # are read first.
        revoke_credentials(conn, credentials.c.batch_job_id == bj_id)
        end_batch_job_sessions(conn, [bj_id])
        cred_ids = list(conn.execute(sa.select(credentials.c.id).where(credentials.c.batch_job_id == bj_id)).scalars())
        conn.execute(sa.delete(batch_jobs).where(batch_jobs.c.id == bj_id))
    ctx.forget_credentials(cred_ids)
    ctx.wake_acquires()  # the ended sessions' jobs may be leasable now
    return no_content()


routes = [
    route("/batch-jobs/", {"GET": list_batch_jobs, "POST": create_batch_job, "PATCH": bulk_update}),
    route("/batch-jobs/{batch_job_id}", {"GET": read_batch_job, "PUT": update_batch_job, "DELETE": delete_batch_job}),
]
