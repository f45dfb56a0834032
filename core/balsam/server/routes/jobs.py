"""/jobs/: list with filters, bulk create, bulk PATCH, PUT by filter, DELETE by filter."""

from __future__ import annotations

from typing import Iterable

import orjson
import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import MAX_CHUNKS_PER_RESERVATION, MAX_ITEMS_PER_BULK_OP
from balsam.states import JobState
from balsam.util import paused_gc

from .. import jobs_logic as logic
from ..errors import BadRequest, NotFound, ValidationFailed
from ..http import MINIMAL_APPLIED, PAGINATION, dumps, is_json_int, json_response, no_content, pagination, require_list
from ..idempotency import HEADER as IDEMPOTENCY_HEADER, check_reservation_budget, reserve_job_keys
from ..limits import check_field_sizes
from ..routing import Ctx, route
from ..sessions_logic import sweep_expired
from ..tables import jobs


def list_jobs(ctx: Ctx) -> Response:
    q = ctx.query(logic.JOB_FILTERS | PAGINATION)
    limit, offset = pagination(q)
    if logic.COLUMNS_MEDIA_TYPE in ctx.request.headers.get("accept", ""):
        with ctx.read() as conn:
            count, columns = logic.list_job_columns(conn, ctx.user.id, q, limit, offset)
        body = {"count": count, "fields": logic.JOB_OUT_FIELDS, "columns": columns}
        return Response(dumps(body), media_type=logic.COLUMNS_MEDIA_TYPE)
    with ctx.read() as conn:
        count, results = logic.list_jobs_json(conn, ctx.user.id, q, limit, offset)
    return Response(dumps({"count": count, "results": orjson.Fragment(results)}), media_type="application/json")


def read_job(ctx: Ctx) -> Response:
    job_id = ctx.path_int("job_id")
    with ctx.read() as conn:
        owned = conn.execute(
            sa.select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.site_id.in_(logic.owned_site_ids(ctx.user.id)))
        ).first()
        if owned is None:
            raise NotFound(f"Job {job_id} not found")
        (job,) = logic.fetch_jobs(conn, [job_id])
    return json_response(job)


def bulk_create(ctx: Ctx) -> Response:
    # Thousands of jobs become dicts here: the collector would walk the server's whole heap for
    # them. It is back on once they are freed (the locals of _bulk_create), so that its first
    # collection does not walk them either.
    with paused_gc():
        return _bulk_create(ctx)


def _bulk_create(ctx: Ctx) -> Response:
    data = ctx.json(check_sizes=False)
    if not isinstance(data, list) or len(data) > MAX_ITEMS_PER_BULK_OP:
        check_field_sizes(data, len(ctx.body or b""))  # else parse_job_creates checks them, item by item
    payload = require_list(data, "jobs", MAX_ITEMS_PER_BULK_OP)
    specs = logic.parse_job_creates(payload)
    minimal = ctx.prefers_minimal()
    headers = {MINIMAL_APPLIED[0]: MINIMAL_APPLIED[1]} if minimal else None
    with ctx.write() as conn:
        earlier = ctx.idempotency.claim(conn, reservable=True)
        if earlier is not None:  # a retry of a create that was applied: the same jobs, not new ones
            replay = logic.fetch_created(conn, earlier.ids, minimal=minimal)
            return json_response(replay, earlier.status_code, headers=headers)
        reserved = ctx.idempotency.reserved_ids
        if reserved is not None and len(reserved) != len(specs):
            raise ValidationFailed.field(
                ["header", IDEMPOTENCY_HEADER], f"this key was reserved for {len(reserved)} jobs; the request has {len(specs)}")
        created = logic.bulk_create_jobs(conn, ctx.user.id, specs, minimal=minimal, ids=reserved)
        ctx.idempotency.record(conn, 201, "jobs", [job["id"] for job in created])
        # Serialized before the commit: an answer that cannot be built rolls the jobs back, so a
        # client retrying the failed request does not create them twice.
        response = json_response(created, 201, headers=headers)
    ctx.wake_acquires()
    return response


def reserve(ctx: Ctx) -> Response:
    """Idempotency keys for the chunks of one bulk create, each with its job ids allocated now, so
    that the client may send the chunks side by side and still get ids in the order of its list
    (see balsam.server.idempotency). ``parallel``: how many chunks to keep in flight; on SQLite it
    is 1 and nothing is reserved (one transaction writes at a time there). 429 beyond the user's
    budget of reserved ids not used yet (``check_reservation_budget``)."""
    data = ctx.json()
    sizes = data.get("sizes") if isinstance(data, dict) else None
    if (not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_CHUNKS_PER_RESERVATION
            or not all(is_json_int(n) and 1 <= n <= MAX_ITEMS_PER_BULK_OP for n in sizes)):
        raise ValidationFailed.field(["body", "sizes"], f"expected a list of 1 to {MAX_CHUNKS_PER_RESERVATION} "
                                                        f"chunk sizes, each 1 to {MAX_ITEMS_PER_BULK_OP}")
    extra = set(data) - {"sizes"}
    if extra:
        raise ValidationFailed.field(["body", sorted(extra)[0]], "extra fields not permitted")
    sizes = [int(n) for n in sizes]
    dialect = ctx.engine.dialect.name
    parallel = logic.CREATE_PARALLEL.get(dialect, 1)
    reservations: list[dict] = []
    if parallel > 1:
        with ctx.write() as conn:
            check_reservation_budget(conn, ctx.user.id, sizes)
            blocks = logic.reserve_job_ids(conn, sizes)
            keys = reserve_job_keys(conn, ctx.user.id, blocks, ctx.settings.idempotency_ttl_sec)
        reservations = [{"idempotency_key": key, "size": len(ids), "first_id": ids[0], "last_id": ids[-1]}
                        for key, ids in zip(keys, blocks)]
    return json_response({"parallel": parallel, "reservations": reservations})


def bulk_update(ctx: Ctx) -> Response:
    payload = require_list(ctx.json(), "job updates", MAX_ITEMS_PER_BULK_OP)
    # Several updates of one job are applied in the order they come (a short task's RUNNING and
    # RUN_DONE in one call: one row write, an event each).
    patches: dict[int, list[dict]] = {}
    items: list[dict] = []
    for index, item in enumerate(payload):
        patch = logic.parse_job_patch(item, ["body", index], allow_id=True)
        patches.setdefault(patch.pop("id"), []).append(patch)
        items.append(patch)
    with ctx.write() as conn:
        count = logic.update_jobs(conn, ctx.user.id, patches)
    _wake_if_states_moved(ctx, items)
    return json_response(count)


def query_update(ctx: Ctx) -> Response:
    q = ctx.query(logic.JOB_FILTERS)
    patch = logic.parse_job_patch(ctx.json(), ["body"], allow_id=False)
    with ctx.write() as conn:
        ids = logic.matching_job_ids(conn, ctx.user.id, q)
        if len(ids) > MAX_ITEMS_PER_BULK_OP:
            raise BadRequest(
                f"The filters match {len(ids)} jobs; update at most {MAX_ITEMS_PER_BULK_OP} per call (narrow the filters)"
            )
        count = logic.update_jobs(conn, ctx.user.id, {job_id: dict(patch) for job_id in ids})
    _wake_if_states_moved(ctx, [patch])
    return json_response(count)


def update_one(ctx: Ctx) -> Response:
    job_id = ctx.path_int("job_id")
    patch = logic.parse_job_patch(ctx.json(), ["body"], allow_id=False)
    with ctx.write() as conn:
        count = logic.update_jobs(conn, ctx.user.id, {job_id: patch})
    _wake_if_states_moved(ctx, [patch])
    return json_response(count)


def _wake_if_states_moved(ctx: Ctx, patches: Iterable[dict]) -> None:
    """Wake waiting acquires when a job may have become leasable: any state change but to
    RUNNING (a launcher's most frequent update, which makes nothing leasable; a finished parent
    releases its children)."""
    if any(patch.get("state") not in (None, JobState.running) for patch in patches):
        ctx.wake_acquires()


def delete_one(ctx: Ctx) -> Response:
    job_id = ctx.path_int("job_id")
    with ctx.write() as conn:
        sweep_expired(conn, ctx.settings.session_expire_sec, ctx.user.id)
        owned = conn.execute(
            sa.select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.site_id.in_(logic.owned_site_ids(ctx.user.id)))
        ).first()
        if owned is None:
            raise NotFound(f"Job {job_id} not found")
        # Leased or not, as in 0.7: libEnsemble's BalsamTask.kill() deletes its job by id. The
        # holding launcher learns at its next heartbeat that the job is gone and ends its run.
        released: list[int] = []
        logic.delete_jobs(conn, [job_id], skip_running=False, released=released)
    if released:
        ctx.wake_acquires()  # children whose remaining parents had finished: READY / STAGED_IN
    return no_content()


#: The header of a query delete's answer that left out matching jobs RUNNING in a launcher:
#: ``count=N; ids=I,J,...`` (the first :data:`SKIPPED_IDS_SHOWN` ids, in id order). The body stays
#: 0.7's, the count of deleted jobs; balsam.client.rest reads the header under the same name.
SKIPPED_RUNNING_HEADER = "Balsam-Skipped-Running"
SKIPPED_IDS_SHOWN = 50


def query_delete(ctx: Ctx) -> Response:
    """Every matching job but those RUNNING in a launcher (skipped, named in
    :data:`SKIPPED_RUNNING_HEADER`): see :func:`jobs_logic.delete_jobs`."""
    q = ctx.query(logic.JOB_FILTERS)
    with ctx.write() as conn:
        sweep_expired(conn, ctx.settings.session_expire_sec, ctx.user.id)
        ids = logic.matching_job_ids(conn, ctx.user.id, q)
        released: list[int] = []
        skipped: list[int] = []
        count = logic.delete_jobs(conn, ids, released=released, skipped=skipped)
    if released:
        ctx.wake_acquires()  # children whose remaining parents had finished: READY / STAGED_IN
    headers = None
    if skipped:
        shown = ",".join(str(i) for i in skipped[:SKIPPED_IDS_SHOWN])
        headers = {SKIPPED_RUNNING_HEADER: f"count={len(skipped)}; ids={shown}"}
    return json_response(count, headers=headers)


routes = [
    route("/jobs/", {"GET": list_jobs, "POST": bulk_create, "PATCH": bulk_update, "PUT": query_update,
                     "DELETE": query_delete}),
    route("/jobs/reservations", {"POST": reserve}),
    route("/jobs/{job_id}", {"GET": read_job, "PUT": update_one, "DELETE": delete_one}),
]
