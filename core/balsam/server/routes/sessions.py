"""/sessions/: launcher leases (create, acquire, tick, release of unstarted jobs, delete)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import SessionAcquire

from ..acquire_waits import WaitForJobs
from ..auth import launcher_credential_problem
from ..db import count_and_page, where_in
from ..errors import (APIError, Forbidden, NotFound, Refusal, Unauthorized, ValidationFailed, missing_answers,
                      refusals_answered)
from ..http import PAGINATION, check_int_fields, is_json_int, json_response, no_content, pagination, wire_datetime
from ..jobs_logic import SESSION_DELETED_MSG, owned_site_ids, site_owned_by, utcnow
from ..routing import Ctx, route
from ..idempotency import replay_one
from ..sessions_logic import (
    acquire, any_candidates, end_within, get_owned_session, gone_jobs, heartbeat, hold_batch_job, maybe_sweep,
    note_batch_job_start, note_held, parse_acquire, parse_ending, parse_release, parse_tick, reacquire, release_jobs,
    release_session_jobs, schedule_end_sweep, session_clock, session_dict,
)
from ..tables import batch_jobs, credentials, idempotency_keys, sessions, sites


def list_sessions(ctx: Ctx) -> Response:
    q = ctx.query({"id"} | PAGINATION)
    limit, offset = pagination(q)
    stmt = sa.select(sessions).where(sessions.c.site_id.in_(owned_site_ids(ctx.user.id)))
    stmt = where_in(stmt, sessions.c.id, q.int_list("id", bits=64))
    with ctx.read() as conn:
        count, rows = count_and_page(conn, stmt, [sessions.c.id], limit, offset)
    return json_response({"count": count, "results": [session_dict(r) for r in rows]})


def _refuse_dead_launcher(ctx: Ctx, conn: sa.Connection, *, share_lock: bool = False) -> None:
    """401 if the request's launcher credential was revoked or expired, read in this write
    transaction: another process's revocation may not have reached this process's credential
    cache yet, and a lease made meanwhile outlived the revoke (see
    auth.launcher_credential_problem for why this read is enough against a concurrent revoke)."""
    problem = launcher_credential_problem(conn, ctx.user, share_lock=share_lock)
    if problem is not None:
        ctx.forget_credentials([ctx.user.credential_id])  # the next request is refused before its body
        raise Unauthorized(problem)


def create_session(ctx: Ctx) -> Response:
    data = ctx.json()
    if not isinstance(data, dict):
        raise ValidationFailed.field(["body"], "expected a JSON object with site_id (and optionally batch_job_id)")
    errors = []
    unknown = sorted(set(data) - {"site_id", "batch_job_id", "id", "heartbeat"})
    errors.extend((["body", k], "unknown field") for k in unknown)
    site_id, batch_job_id = data.get("site_id"), data.get("batch_job_id")
    if not is_json_int(site_id):
        errors.append((["body", "site_id"], "field required (an integer)"))
    if batch_job_id is not None and not is_json_int(batch_job_id):
        errors.append((["body", "batch_job_id"], f"expected an integer or null, got {batch_job_id!r}"))
    if errors:
        raise ValidationFailed(errors)
    site_id, batch_job_id = int(site_id), None if batch_job_id is None else int(batch_job_id)
    data = {**data, "site_id": site_id, "batch_job_id": batch_job_id}
    check_int_fields(data, ["site_id", "batch_job_id"], ["body"])
    _sweep(ctx)
    # A site or BatchJob deleted by a request committed meanwhile: 404 naming it, as the checks
    # below answer (their locks make them see the delete, sessions_logic.hold_batch_job; this
    # answers whatever else the database refuses as one line, never its text).
    def gone(refusal: Refusal) -> "APIError | None":  # batch_job_id as the create leaves it (a launcher's own)
        return missing_answers({"sites": f"Site {site_id} not found",
                                "batch_jobs": f"BatchJob {batch_job_id} not found at site {site_id}"})(refusal)

    with refusals_answered(gone), ctx.write() as conn:
        own = None
        if ctx.user.site_id is not None and ctx.user.credential_id is not None:
            # A launcher credential opens sessions of its own BatchJob only: a revoke ends the
            # sessions of that BatchJob (auth.revoke_credentials), and one opened for none or
            # another would keep its leases until it expired. (Read unlocked: a credential's
            # BatchJob never changes; its revocation is read under the lock below.)
            own = conn.execute(sa.select(credentials.c.batch_job_id)
                               .where(credentials.c.id == ctx.user.credential_id)).scalar()
        started = batch_job_id if batch_job_id is not None else own
        if started is not None and (own is None or started == own):
            # Its allocation runs: start_time no later than now (sessions_logic, "A BatchJob's
            # start from its launcher's first Session"). The BatchJob first, before the credential
            # and any session or job (the lock order); rolled back with a refused create.
            note_batch_job_start(conn, ctx.user.id, site_id, int(started), utcnow())
            # FOR SHARE: its delete or finish waits for this create (the user's own BatchJob only).
            hold_batch_job(conn, int(started), user_id=ctx.user.id, site_id=site_id)
        # Then the credential (FOR SHARE) before any session: a revoke waits for this create and
        # then ends its session, or this create reads the revocation.
        _refuse_dead_launcher(ctx, conn, share_lock=True)
        if own is not None:
            if batch_job_id is None:
                batch_job_id = int(own)
            elif batch_job_id != own:
                raise Forbidden(f"this launcher credential is BatchJob {own}'s: it cannot open a session "
                                f"for BatchJob {batch_job_id}")
        site = sa.select(sites.c.id).where(sites.c.id == site_id, site_owned_by(ctx.user.id))
        if conn.dialect.name == "postgresql":
            # FOR KEY SHARE (the INSERT's foreign key takes it anyway), after the credential, as
            # the site delete takes them: a delete of the site committed meanwhile is seen here
            # (404), not by the INSERT's foreign key (409 with PostgreSQL's text); see hold_batch_job.
            site = site.with_for_update(read=True, key_share=True, of=sites)
        owned = conn.execute(site).first()
        if owned is None:
            raise NotFound(f"Site {site_id} not found")
        if batch_job_id is not None:
            bj = conn.execute(
                sa.select(batch_jobs.c.id).where(batch_jobs.c.id == batch_job_id, batch_jobs.c.site_id == site_id)
            ).first()
            if bj is None:
                raise NotFound(f"BatchJob {batch_job_id} not found at site {site_id}")
        earlier = ctx.idempotency.claim(conn)
        if earlier is not None:  # a retried create: the same session, not an orphan beside it
            row = replay_one(earlier, "Session", lambda sid: get_owned_session(conn, ctx.user.id, sid))
            return json_response(session_dict(row), earlier.status_code)
        row = conn.execute(
            sa.insert(sessions).values(site_id=site_id, batch_job_id=batch_job_id,
                                       heartbeat=session_clock(conn.dialect.name, utcnow())).returning(*sessions.c)
        ).one()
        ctx.idempotency.record(conn, 201, "Session", [row.id])
    return json_response(session_dict(row), 201)


def acquire_jobs(ctx: Ctx) -> "Response | WaitForJobs":
    session_id = ctx.path_int("session_id")
    spec = parse_acquire(ctx.json())
    deadline = ctx.acquire_deadline()
    waiting = deadline is not None and time.monotonic() < deadline
    if waiting:
        # Asked to wait (Prefer: wait=N): look first, without a write transaction or the key's
        # claim; if there is nothing (and its key is not recorded: a retry is replayed at once),
        # wait for a wake-up (see acquire_waits.py). The generation is
        # read before the look, so a write committing after the look is never missed.
        generation = ctx.acquire_waits().generation(ctx.user.id)
        with ctx.read() as conn:
            session = get_owned_session(conn, ctx.user.id, session_id)
            if not _key_recorded(ctx, conn) and not any_candidates(conn, session.site_id, spec):
                return WaitForJobs(generation, deadline)
    try:
        return _lease(ctx, session_id, spec, deadline if waiting else None)
    except _TakenFirst:
        # The look saw jobs that other acquires leased first (the waits a write wakes all look at
        # once): wait again, as when the look finds nothing. Answered at once, this request said
        # "nothing" seconds before its deadline, and its client asked again at once: one wake-up
        # of N waits made N - 1 such round trips (80 of 600 acquires with 200 waits). Nothing of
        # this look was kept (its key's claim and its heartbeat rolled back with it).
        return WaitForJobs(generation, deadline)


def _key_recorded(ctx: Ctx, conn: sa.Connection) -> bool:
    """Whether this request's Idempotency-Key is recorded (unexpired): a retry whose answer was
    lost, answered from the record by the lease at once. Its jobs are held by its Session, so the
    look finds none for it: waiting first held the replay (and the jobs, idle) for the whole wait."""
    key = ctx.idempotency.key
    if key is None:
        return False
    return conn.execute(_KEY_RECORDED, {"b_user": ctx.user.id, "b_key": key, "b_now": utcnow()}).first() is not None


#: Built once: every look of a waiting acquire with a key runs it (as the acquire's own statements,
#: sessions_logic._acquire_plan).
_KEY_RECORDED = sa.select(idempotency_keys.c.key).where(
    idempotency_keys.c.user_id == sa.bindparam("b_user"), idempotency_keys.c.key == sa.bindparam("b_key"),
    idempotency_keys.c.expires > sa.bindparam("b_now", type_=idempotency_keys.c.expires.type))


class _TakenFirst(Exception):
    """A waiting acquire's lease found nothing after its look found jobs (rolls its transaction back)."""


def _sweep(ctx: Ctx) -> int:
    """The request's expiry sweep (:func:`maybe_sweep`), committed before its write transaction
    begins: inside it, the stale sessions it locked came before the request's own session (see
    sessions_logic, "Lock order")."""
    swept = maybe_sweep(ctx.engine, ctx.settings, ctx.user.id)
    if swept:
        ctx.wake_acquires()  # expired sessions' jobs: RUN_TIMEOUT or leasable again
    return swept


def _lease(ctx: Ctx, session_id: int, spec: SessionAcquire, deadline: "float | None") -> Response:
    """The write of an acquire; ``deadline``: of a wait not over yet (:class:`_TakenFirst`)."""
    swept = _sweep(ctx)
    with ctx.write() as conn:
        session = get_owned_session(conn, ctx.user.id, session_id)
        earlier = ctx.idempotency.claim(conn)
        if earlier is not None:  # the answer was lost: the same jobs again (see sessions_logic)
            # A heartbeat, as every acquire: the launcher counts this answer as one sent when it
            # sent the request (lease._confirm); without it the session expired that much earlier
            # than the launcher reckoned, while it started the replayed jobs.
            heartbeat(conn, session.id, utcnow())
            _refuse_dead_launcher(ctx, conn)
            return json_response(reacquire(conn, session, earlier.ids))
        # Checked by acquire once its heartbeat holds the session, before the lease.
        result = acquire(conn, session, spec, check=lambda: _refuse_dead_launcher(ctx, conn))
        if not result and not swept and deadline is not None and time.monotonic() < deadline:
            raise _TakenFirst  # (after a sweep answered at once, as before: it freed jobs just now)
        ctx.idempotency.record(conn, 200, "acquire", [job["id"] for job in result])
    return json_response(result)


def tick(ctx: Ctx) -> Response:
    session_id = ctx.path_int("session_id")
    # Without a body, or without job_ids (Balsam 0.7 sends {}), the heartbeat alone, as before.
    body = ctx.json() if ctx.body else None
    job_ids = parse_tick(body) if ctx.body else None
    # A stopping launcher's time left (sessions_logic, "A launcher's announced end").
    ending_in = parse_ending(body)
    expire_sec = ctx.settings.session_expire_sec
    _sweep(ctx)
    with ctx.write() as conn:
        get_owned_session(conn, ctx.user.id, session_id)
        now = heartbeat(conn, session_id, utcnow())  # 404 if the sweep deleted the session meanwhile
        # After the heartbeat, as the acquire (the session locked first): a revoked launcher no
        # longer keeps its session alive, nor frees its jobs for leases (note_held).
        _refuse_dead_launcher(ctx, conn)
        gone = gone_jobs(conn, session_id, job_ids) if job_ids is not None else None
        # Jobs its user re-queued while this session ran them: leasable again once it no longer does.
        leasable_again = note_held(conn, session_id, job_ids)
        stored = now if ending_in is None else end_within(conn, session_id, now, ending_in, expire_sec)
    if leasable_again:
        ctx.wake_acquires()
    answer: dict = {"id": session_id, "heartbeat": wire_datetime(stored)}
    if gone is not None:
        answer["gone"] = gone
    if ending_in is not None:
        # Committed: the sweep comes at that moment, not at the next period (a minute by default).
        state = ctx.request.app.state
        schedule_end_sweep(ctx.engine, expire_sec, ending_in, lambda: _wake_everyone(state))
        # Said back: a server that does not know the field answers without it (the launcher logs that).
        answer["expires"] = wire_datetime(stored + dt.timedelta(seconds=expire_sec))
    return json_response(answer)


def _wake_everyone(state: Any) -> None:
    """After a sweep of announced ends: their RUNNING jobs are RUN_TIMEOUT (leasable again), as the
    periodic sweep's wake-up (app._sweep_once) says to every waiting acquire and server process."""
    state.acquire_waits.wake_all()
    if state.wake_bridge is not None:
        state.wake_bridge.publish(None)


def delete_session(ctx: Ctx) -> Response:
    session_id = ctx.path_int("session_id")
    with ctx.write() as conn:
        # The session locked before its jobs, as the expiry sweep locks them (sessions_logic, "Lock
        # order"): the jobs first deadlocked with a sweep that held the session and waited for the
        # jobs. A session the sweep is deleting is waited for, then not found (404).
        get_owned_session(conn, ctx.user.id, session_id, lock=True)
        release_session_jobs(conn, [session_id], utcnow(), SESSION_DELETED_MSG)
        conn.execute(sa.delete(sessions).where(sessions.c.id == session_id))
    ctx.wake_acquires()  # its RUNNING jobs are RUN_TIMEOUT, its other jobs leasable again
    return no_content()


def release(ctx: Ctx) -> Response:
    """Give back leased jobs the launcher has not started (sessions_logic, "giving back jobs")."""
    session_id = ctx.path_int("session_id")
    job_ids = parse_release(ctx.json())
    with ctx.write() as conn:
        get_owned_session(conn, ctx.user.id, session_id)
        earlier = ctx.idempotency.claim(conn)
        # Locks the session before its jobs; 404 if swept meanwhile. A replay heartbeats too, as a
        # replayed acquire does: the resend is a request of a live launcher, as the first one was.
        heartbeat(conn, session_id, utcnow())
        if earlier is not None:  # the answer was lost: what that request released, not applied again
            return json_response({"id": session_id, "released": list(earlier.ids)})
        released = release_jobs(conn, session_id, job_ids)
        ctx.idempotency.record(conn, 200, "release", released)
    if released:
        ctx.wake_acquires()
    return json_response({"id": session_id, "released": released})


routes = [
    route("/sessions/", {"GET": list_sessions, "POST": create_session}),
    route("/sessions/{session_id}", {"POST": acquire_jobs, "PUT": tick, "DELETE": delete_session}),
    route("/sessions/{session_id}/release", {"POST": release}),
]
