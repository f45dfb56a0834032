"""/jobs/: list with filters, bulk create, bulk PATCH, PUT by filter, DELETE by filter."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Iterable

import orjson
import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import MAX_CHUNKS_PER_RESERVATION, MAX_ITEMS_PER_BULK_OP
from balsam.states import JobState
from balsam.util import paused_gc

from .. import jobs_logic as logic
from ..db import read_tx, write_tx
from ..errors import APIError, BadRequest, NotFound, ValidationFailed, refusals_answered
from ..http import (MINIMAL_APPLIED, PAGINATION, QueryParams, dumps, is_json_int, json_response, no_content, pagination,
                    require_list)
from ..idempotency import HEADER as IDEMPOTENCY_HEADER, Replay, check_reservation_budget, reserve_job_keys
from ..limits import check_field_sizes
from ..routing import Ctx, route
from ..sessions_logic import sweep_expired
from ..tables import idempotency_keys, jobs

logger = logging.getLogger(__name__)


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
    # them, so it is paused while the body is parsed (CPU only). Not across ctx.write(): the
    # collector is off for every thread of the server while it is paused, and the write may wait
    # (SQLite's write lock; on PostgreSQL the parents' row locks, FOR SHARE, the app's KEY SHARE
    # under a delete, a concurrent claim of the same Idempotency-Key) for as long as another
    # transaction holds them.
    with paused_gc():
        data = ctx.json(check_sizes=False)
        if not isinstance(data, list) or len(data) > MAX_ITEMS_PER_BULK_OP:
            check_field_sizes(data, len(ctx.body or b""))  # else parse_job_creates checks them, item by item
        payload = require_list(data, "jobs", MAX_ITEMS_PER_BULK_OP)
        specs = logic.parse_job_creates(payload)
    minimal = ctx.prefers_minimal()
    headers = {MINIMAL_APPLIED[0]: MINIMAL_APPLIED[1]} if minimal else None
    # An app or BatchJob the checks found, deleted by a request committed before the INSERT's
    # foreign key check (PostgreSQL): 404 naming it, as the check answers (not the database's text).
    with refusals_answered(), ctx.write() as conn:
        earlier = ctx.idempotency.claim(conn, reservable=True)
        if earlier is not None:  # a retry of a create that was applied: the same jobs, not new ones
            replay = logic.fetch_created(conn, earlier.ids, minimal=minimal)
            return json_response(replay, earlier.status_code, headers=headers)
        reserved = ctx.idempotency.reserved_ids
        if reserved is not None and len(reserved) != len(specs):
            raise ValidationFailed.field(
                ["header", IDEMPOTENCY_HEADER], f"this key was reserved for {len(reserved)} jobs; the request has {len(specs)}")
        with _paused_gc_under_lock(conn):
            created = logic.bulk_create_jobs(conn, ctx.user.id, specs, minimal=minimal, ids=reserved)
            ctx.idempotency.record(conn, 201, "jobs", [job["id"] for job in created])
            # Serialized before the commit: an answer that cannot be built rolls the jobs back, so a
            # client retrying the failed request does not create them twice. CPU only: paused.
            with paused_gc():
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
    # Thousands of updates become dicts here: as for a bulk create, the collector is paused while
    # the body is parsed (CPU only), and not across ctx.write(), whose row locks (FOR UPDATE, no
    # lock timeout) or SQLite write lock may be waited for as long as another transaction holds
    # them: the collector would be off for every thread of the server all that time.
    with paused_gc():
        # The size limits of a list's items are checked with them (parse_job_patches); of any
        # other body here, as ctx.json() checks them, before the list is required.
        payload = ctx.json(check_sizes=False)
        if not isinstance(payload, list) or len(payload) > MAX_ITEMS_PER_BULK_OP:
            check_field_sizes(payload, len(ctx.body or b""))
            require_list(payload, "job updates", MAX_ITEMS_PER_BULK_OP)
        patches, items = logic.parse_job_patches(payload)
    # A batch_job_id deleted after its check (PostgreSQL): 404 naming it, as bulk_create.
    with refusals_answered(), ctx.write() as conn, _paused_gc_under_lock(conn):
        count = logic.update_jobs(conn, ctx.user.id, patches)
    _wake_if_states_moved(ctx, items)
    return json_response(count)


def _paused_gc_under_lock(conn: sa.Connection) -> "AbstractContextManager[None]":
    """The collector paused for the rest of a SQLite write transaction (its statements build rows
    for thousands of jobs: each collection walked them, a full one every few requests): there,
    once BEGIN IMMEDIATE has returned, the write lock is held and no statement of the transaction
    waits for another (WAL: readers do not block it), so the pause lasts as long as its CPU work.
    On PostgreSQL a statement may still wait for row locks (children released, foreign keys): only
    update_jobs' pure-Python loops pause it there."""
    return paused_gc() if conn.dialect.name == "sqlite" else nullcontext()


def query_update(ctx: Ctx) -> Response:
    """Apply one update to the jobs the filters match when it is applied: checked under the update's
    row locks (PostgreSQL) or its write lock (SQLite), so a job a launcher started (RUNNING) or
    acquired (``leased=false``) meanwhile is left alone (see _update_matching)."""
    q = ctx.query(logic.UPDATE_FILTERS)
    logic.check_job_filters(q, ctx.engine.dialect.name)
    patch = logic.parse_job_patch(ctx.json(), ["body"], allow_id=False)
    with refusals_answered(), ctx.write() as conn:  # as bulk_update
        ids = logic.matching_job_ids(conn, ctx.user.id, q)
        if len(ids) > MAX_ITEMS_PER_BULK_OP:
            raise BadRequest(
                f"The filters match {len(ids)} jobs; update at most {MAX_ITEMS_PER_BULK_OP} per call (narrow the filters)"
            )
        count = _update_matching(conn, ctx.user.id, ids, patch, q)
    _wake_if_states_moved(ctx, [patch])
    return json_response(count)


def _update_matching(conn: sa.Connection, user_id: int, ids: list[int], patch: dict, q: QueryParams) -> int:
    """update_jobs of the jobs a query matched. The ids were read unlocked (PostgreSQL, READ
    COMMITTED): a change committed before update_jobs locked them may leave some that no longer
    match (a launcher's RUNNING or acquire, under ``state=...`` or ``leased=false``: the update,
    without a session, overrode its run), so update_jobs checks the filters again under its locks
    and leaves those out. On SQLite the write transaction began (BEGIN IMMEDIATE) before the ids
    were read: nothing changed since, no second read. A delete that committed before the locks
    leaves some gone, and the client named none of them, so they are dropped (they no longer
    match) rather than refusing the whole update with 404 (the re-check leaves them out on
    PostgreSQL). update_jobs checks that every job exists before it writes anything (it has only
    locked rows then), so trying again with the rest in the same transaction is safe."""
    recheck = (lambda locked: logic.matching_job_ids(conn, user_id, q, among=locked)) \
        if conn.dialect.name == "postgresql" else None
    while True:
        try:
            return logic.update_jobs(conn, user_id, {job_id: dict(patch) for job_id in ids}, still_matching=recheck)
        except NotFound as exc:
            gone = set(exc.refused_ids or ())
            if not gone or not gone <= set(ids):
                raise  # another record (a BatchJob named by the patch) is missing
            ids = [job_id for job_id in ids if job_id not in gone]


def update_one(ctx: Ctx) -> Response:
    job_id = ctx.path_int("job_id")
    patch = logic.parse_job_patch(ctx.json(), ["body"], allow_id=False)
    with refusals_answered(), ctx.write() as conn:  # as bulk_update
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


#: How long a query delete's claim of its ``Idempotency-Key`` stands for it while it runs, renewed
#: before each batch (a batch takes well under a second): a request with the key meanwhile is
#: answered :func:`_in_progress`; a delete cut off midway (the server stopped) leaves the claim to
#: lapse, after which a retry with the key takes it and deletes the rest. Short, so that our
#: client's retries (10, each waiting the Retry-After up to its 30 s backoff cap) outlast a claim
#: left by a crash: with 60 s and a Retry-After of 1 s, they gave up after 10 s ("still deleting").
QUERY_DELETE_KEY_LEASE_SEC = 15.0

_DELETE_KEY = sa.and_(idempotency_keys.c.user_id == sa.bindparam("b_user"),
                      idempotency_keys.c.key == sa.bindparam("b_key"), idempotency_keys.c.status_code == 0)
#: The claim's expiry (status 0: not answered yet).
_DELETE_KEY_EXPIRES = sa.select(idempotency_keys.c.expires).where(_DELETE_KEY)
#: The claim, only while it is still ours: its expiry is the one this request wrote last
#: (``b_mine``). A claim that lapsed while a batch waited (a lock held longer than the lease) may
#: have been taken by a retry with the key, which wrote its own expiry: then nothing changes.
_OURS = sa.and_(_DELETE_KEY, idempotency_keys.c.expires == sa.bindparam("b_mine", type_=idempotency_keys.c.expires.type))
_RENEW_DELETE_KEY = sa.update(idempotency_keys).where(_OURS).values(
    expires=sa.bindparam("b_expires", type_=idempotency_keys.c.expires.type))
#: A delete that failed gives its key up: a resend is applied afresh, as after any refused request.
_DROP_DELETE_KEY = sa.delete(idempotency_keys).where(_OURS)


def _in_progress(conn: sa.Connection, ctx: Ctx) -> APIError:
    """503 with a Retry-After of the seconds left on the running delete's claim (at least 1): our
    client retries then, when the delete has answered (a replay) or its claim has lapsed."""
    expires = conn.execute(_DELETE_KEY_EXPIRES, {"b_user": ctx.user.id, "b_key": ctx.idempotency.key}).scalar()
    left = 1 if expires is None else math.ceil((expires - dt.datetime.now(dt.timezone.utc)).total_seconds())
    error = APIError(f"a DELETE with this {IDEMPOTENCY_HEADER} is still deleting; retry to get its answer", 503)
    error.headers = {"Retry-After": str(max(1, left))}
    return error


class _Claim:
    """This request's claim of its key while the delete runs: the expiry it wrote last, renewed
    only while the row still holds it (:data:`_OURS`); ``lost`` once another request took it."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.mine: "dt.datetime | None" = None
        self.lost = False

    def params(self, expires_in: float) -> dict:
        return {"b_user": self.ctx.user.id, "b_key": self.ctx.idempotency.key, "b_mine": self.mine,
                "b_expires": dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expires_in)}

    def take(self, conn: sa.Connection) -> None:
        """Right after ``ctx.idempotency.claim`` took the key (same transaction): the lease."""
        row = self.params(QUERY_DELETE_KEY_LEASE_SEC)
        conn.execute(sa.update(idempotency_keys).where(_DELETE_KEY).values(expires=row["b_expires"]), row)
        self.mine = row["b_expires"]

    def renew(self, conn: sa.Connection, expires_in: float) -> bool:
        """Extend the claim by ``expires_in`` seconds from now; False (and a warning, once) when it
        is no longer ours."""
        if self.lost:
            return False
        row = self.params(expires_in)
        if conn.execute(_RENEW_DELETE_KEY, row).rowcount:
            self.mine = row["b_expires"]
            return True
        self.lost = True
        logger.warning("DELETE /jobs/: the claim of %s %r lapsed and another request took it; this one "
                       "records nothing and answers its own count", IDEMPOTENCY_HEADER, self.ctx.idempotency.key)
        return False

    def drop(self, conn: sa.Connection) -> None:
        if not self.lost:
            conn.execute(_DROP_DELETE_KEY, self.params(0))


def query_delete(ctx: Ctx) -> Response:
    """Every matching job but those RUNNING in a launcher (skipped, named in
    :data:`SKIPPED_RUNNING_HEADER`): see :func:`jobs_logic.delete_jobs`.

    In batches of :data:`jobs_logic.QUERY_DELETE_BATCH` jobs (descending ids: see below), each in its own short transaction, so
    that launchers' acquires, heartbeats and updates are not held up for the whole delete (see
    docs/rest-api.md); the answer is the same: every batch's count, every skipped job. The ids
    come first, from one short read (:func:`jobs_logic.matching_ids`: jobs made meanwhile are left),
    and no connection is held beside a batch's. A child is created after its parents, so going down
    the ids deletes matched children before (or with) their parents: a delete cut off midway leaves
    no matched child waiting on a deleted parent, and none is released before its own batch (a
    child made with ids reserved before its parents' goes with them: ``deleted_later``).

    The ``Idempotency-Key`` is claimed first, in its own transaction that commits (the routing
    layer's claim holds its transaction until the answer: that would hold SQLite's write lock, or a
    second connection, across the batches): a request with the key while the delete runs is
    answered 503 with a Retry-After (:func:`_in_progress`), never deleting beside it; once the
    answer is recorded (with the key's full expiry), a retry replays it and deletes nothing (a job
    made since that matches stays). The claim lapses after :data:`QUERY_DELETE_KEY_LEASE_SEC`
    without a batch (the server stopped midway: the committed batches stay, a retry with the key
    deletes and counts the rest); a delete that fails gives its key up. One whose claim was taken
    over meanwhile (a batch waited longer than the lease) records nothing and answers its own count
    (:class:`_Claim`)."""
    q = ctx.query(logic.JOB_FILTERS)
    logic.check_job_filters(q, ctx.engine.dialect.name)
    started = time.monotonic()
    keyed = ctx.idempotency.key is not None
    sqlite = ctx.engine.dialect.name == "sqlite"
    released: list[int] = []
    skipped: list[int] = []
    count = 0
    claim = _Claim(ctx)
    with write_tx(ctx.engine) as conn:
        if keyed:
            earlier = ctx.idempotency.claim(conn)
            if earlier is not None:
                if earlier.status_code == 0:  # claimed by a delete that has not answered yet
                    raise _in_progress(conn, ctx)
                raise Replay(earlier)
            # Only a request that took the key leases, renews, drops or records it: the key's row
            # is another request's otherwise (renewing it failed, and warned of a lapse that was not).
            keyed = ctx.idempotency.claimed
            if keyed:
                claim.take(conn)
        sweep_expired(conn, ctx.settings.session_expire_sec, ctx.user.id)
    try:
        with read_tx(ctx.engine) as reader:
            ids = logic.matching_ids(reader, ctx.user.id, q)
        # Descending: the last batch of ids first (see above).
        ends = range(len(ids), 0, -logic.QUERY_DELETE_BATCH)
        for end in ends:
            if end != len(ids) and sqlite:
                # SQLite queues no writer: one waiting for the lock retries every 100 ms (its busy
                # handler, once it has waited ~0.3 s), and the next batch's BEGIN IMMEDIATE, sent at
                # once, took it first every time (a launcher waited out the whole delete anyway).
                pause = logic.sqlite_writers_turn(started, time.monotonic())
                if pause:
                    time.sleep(pause)
            if keyed and not claim.lost:
                # In its own transaction: renewed in the batch's, the key's row stayed locked
                # (PostgreSQL) while the batch waited, and a request with the key waited with it.
                with write_tx(ctx.engine) as conn:
                    claim.renew(conn, QUERY_DELETE_KEY_LEASE_SEC)
            with write_tx(ctx.engine) as conn:
                batch = ids[max(0, end - logic.QUERY_DELETE_BATCH):end].tolist()
                count += logic.delete_jobs(conn, batch, released=released, skipped=skipped, deleted_later=ids)
        skipped.sort()  # the header names the first ids
        response = _query_delete_answer(count, skipped)
        if keyed:
            with write_tx(ctx.engine) as conn:
                # The key's full life from now (its answer replayed for that long), then the answer;
                # neither if another request took the claim (its answer is the one replayed).
                if claim.renew(conn, ctx.idempotency.ttl.total_seconds()):
                    ctx.idempotency.record_answer(conn, response)
    except BaseException:
        if keyed:
            try:
                with write_tx(ctx.engine) as conn:
                    claim.drop(conn)
            except Exception:  # the database is gone: the claim lapses (QUERY_DELETE_KEY_LEASE_SEC)
                pass
        raise
    if released:
        ctx.wake_acquires()  # children whose remaining parents had finished: READY / STAGED_IN
    return response


def _query_delete_answer(count: int, skipped: list[int]) -> Response:
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
