"""Glue between Starlette and the synchronous handlers (which run in the thread pool).

Order of every request (so that nobody learns anything without a valid token):

1. authenticate: the bearer token's signature and expiry (on the event loop), then its credential
   row (revoked? expired? - in the thread pool, cached per process), both before the body is read;
   public routes (login, the login methods, the OpenAPI document) skip this;
2. read the body, at most ``BALSAM_MAX_BODY_BYTES`` (a public route's: :data:`PUBLIC_BODY_LIMIT_BYTES`;
   413 beyond, before reading it when the client announces its length);
3. the handler, which validates its input and answers. An acquire that asked to wait for jobs
   (``Prefer: wait=N``) may instead say "nothing yet": the request then waits on the event loop
   for a wake-up, and the handler runs again (see acquire_waits.py). An update or delete with an
   ``Idempotency-Key`` is answered from its record if the key is recorded, else its transaction
   commits only once the handler has answered, with the answer recorded in it (``Ctx.write``;
   see idempotency.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Union

import orjson
import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .acquire_waits import AcquireWaits, WaitForJobs, requested_wait
from .auth import SITE_SCOPE, AuthUser, bearer_user, require_unscoped
from .db import read_tx, write_tx
from .errors import PayloadTooLarge, Unauthorized, ValidationFailed
from .http import QueryParams, path_int, preferences, reject_nul
from .idempotency import HEADER as IDEMPOTENCY_HEADER, NOT_REPLAYED, REPLAYED_METHODS, IdempotentRequest, Replay
from .limits import MAX_JSON_DEPTH, check_depth, check_field_sizes


#: The body limit of the public routes (password login, registration, token refresh): a few short
#: fields, read from anybody before any credential is checked, so bounded far below the API's
#: bulk-sized ``BALSAM_MAX_BODY_BYTES`` (anonymous 60 MB logins each cost the worker a gigabyte
#: of memory to decode and parse). The dashboard's forms share it.
PUBLIC_BODY_LIMIT_BYTES = 64 * 1024
#: Methods whose request body is read (and handed to the handler as ``Ctx.body``).
BODY_METHODS = ("POST", "PUT", "PATCH")


class Ctx:
    """What a handler needs: the request, its raw body, the authenticated user and the database."""

    def __init__(self, request: Request, body: "bytes | None", user: "AuthUser | None" = None, *,
                 replayed: bool = False) -> None:
        self.request = request
        self.body = body
        self._user = user
        self._idempotency: "IdempotentRequest | None" = None
        #: An update or delete whose ``Idempotency-Key`` the routing layer claims and records (``write``).
        self.replayed = replayed
        #: Its write transaction, from the end of the handler's ``with ctx.write()`` to the answer.
        self._held: "tuple[sa.Connection, sa.RootTransaction] | None" = None
        self._after_commit: list[Callable[[], None]] = []
        #: Set by :meth:`wake_acquires`.
        self.woke = False
        self.settings = request.app.state.settings
        self.engine: sa.Engine = request.app.state.engine

    @property
    def user(self) -> AuthUser:
        if self._user is None:  # only public routes get here: they have no user
            raise Unauthorized("Not authenticated: send 'Authorization: Bearer <token>' (log in with `balsam login`)")
        return self._user

    @property
    def idempotency(self) -> IdempotentRequest:
        """The request's ``Idempotency-Key`` (creating routes claim and record it; ``write`` does
        for updates and deletes)."""
        if self._idempotency is None:
            self._idempotency = IdempotentRequest(self)
        return self._idempotency

    def json(self, *, check_sizes: bool = True) -> Any:
        """The parsed body. ``check_sizes=False``: the handler checks the size limits itself (the
        bulk create does, while it parses the items: see jobs_logic.parse_job_creates)."""
        if not self.body:
            raise ValidationFailed.field(["body"], "request body is empty; expected JSON")
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ValidationFailed.field(["body"], f"malformed JSON: {exc}") from None
        # First: the NUL and size checks below, the handlers and orjson.dumps all recurse.
        if isinstance(data, (dict, list)) and self.body.count(b"[") + self.body.count(b"{") > MAX_JSON_DEPTH:
            check_depth(data)
        if b"\\u0000" in self.body:
            reject_nul(data, ["body"])
        if check_sizes:
            check_field_sizes(data, len(self.body))
        return data

    def wake_acquires(self) -> None:
        """This request's write may have made jobs leasable: once it has committed, wake the
        user's acquires that wait (``Prefer: wait=N``; see acquire_waits.py)."""
        self.woke = True

    def acquire_deadline(self) -> "float | None":
        """When this request's wait for jobs ends (``time.monotonic()``), if it asked to wait
        (``Prefer: wait=N``); fixed at the first call, so the retries after wake-ups keep it."""
        state = self.request.state
        if not hasattr(state, "acquire_deadline"):
            seconds = requested_wait(self.request.headers.get("prefer", ""))
            state.acquire_deadline = None if seconds is None else time.monotonic() + seconds
        return state.acquire_deadline

    def acquire_waits(self) -> AcquireWaits:
        return self.request.app.state.acquire_waits

    def prefers_minimal(self) -> bool:
        """The client sent ``Prefer: return=minimal`` (RFC 7240): it needs only what the server
        decided (ids, states), not the records it sent echoed back."""
        return preferences(self.request.headers.get("prefer", "")).get("return", "").lower() == "minimal"

    def query(self, allowed: "set[str] | None" = None) -> QueryParams:
        return QueryParams(self.request, allowed)

    def path_int(self, name: str) -> int:
        return path_int(self.request, name)

    def write(self):
        """A write transaction. For an update or delete with an ``Idempotency-Key``: its first
        statement claims the key (a recorded key raises :class:`Replay`, answered by the routing
        layer), and it commits once the handler has answered, with the answer recorded (see
        :meth:`finish`); a second ``write`` in the same request joins it."""
        if self._held is not None:
            return nullcontext(self._held[0])
        if self.replayed and IDEMPOTENCY_HEADER in self.request.headers:
            return self._claimed_write()
        return write_tx(self.engine)

    @contextmanager
    def _claimed_write(self) -> Iterator[sa.Connection]:
        conn = self.engine.connect().execution_options(balsam_write=True)
        tx = conn.begin()
        try:
            earlier = self.idempotency.claim(conn)
            if earlier is not None:
                raise Replay(earlier)
            yield conn
        except BaseException:
            try:
                tx.rollback()
            except Exception:  # the connection is gone: the original error says why
                pass
            conn.close()
            raise
        self._held = (conn, tx)

    def finish(self, response: "Response | WaitForJobs") -> None:
        """Record the answer of a held transaction (``write``) in it, and commit."""
        if self._held is None:
            return
        assert isinstance(response, Response), "an update or delete answers"
        conn, tx = self._held
        self.idempotency.record_answer(conn, response)
        tx.commit()
        self.release()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def release(self) -> None:
        """Roll back a held transaction the handler did not answer (it raised), and close it."""
        held, self._held = self._held, None
        if held is not None:
            conn, tx = held
            try:
                if tx.is_active:
                    tx.rollback()
            finally:
                conn.close()

    def forget_credentials(self, ids: "list[int]") -> None:
        """This process stops trusting these (revoked or deleted) credentials now; again once a
        held transaction commits (a request checking one meanwhile still read it as valid)."""
        cache = self.request.app.state.credential_cache
        cache.forget(ids)
        if self._held is not None:
            self._after_commit.append(lambda: cache.forget(ids))

    def read(self):
        return read_tx(self.engine)


#: A handler answers, or (the acquire, asked to wait) says to call it again after a wake-up.
Handler = Callable[[Ctx], Union[Response, WaitForJobs]]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` bytes without buffering it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_credential(request: Request, user: AuthUser) -> None:
    """Runs in the thread pool: the token's credential is live (not revoked, not expired; cached
    per process) and its user is one this server serves; 401 otherwise."""
    state = request.app.state
    state.credential_cache.check(lambda: read_tx(state.engine), user)
    _check_only_user(request, user)


def _check_only_user(request: Request, user: AuthUser) -> None:
    only_user = request.app.state.settings.only_user
    if only_user is not None and user.username != only_user:
        raise Unauthorized(f"This server serves only its local user {only_user!r}")


async def _check_credential_before_body(request: Request, user: AuthUser) -> None:
    """:func:`_check_credential` before a body is read: on the event loop when the credential
    cache vouches for it (a dict lookup), in the thread pool (a database read) only on a miss.
    As revocation-safe as the pool's check: on a hit that check answers from the same cache
    entry, which this process's revocations remove at once (forget) and other processes' leave
    valid for at most the cache's ttl_sec; staleness is bounded by the cache either way."""
    if request.app.state.credential_cache.fresh(user):
        _check_only_user(request, user)
    else:
        await run_in_threadpool(_check_credential, request, user)


def _authenticated_call(handler: Handler, ctx: Ctx) -> "Response | WaitForJobs":
    """Runs in the thread pool: the credential check, then the handler with the site scope set."""
    user = ctx._user
    if user is None:
        return handler(ctx)
    state = ctx.request.app.state
    # Checked again for a request with a body (checked before reading it): from the cache, unless
    # reading the body outlasted it; and an acquire's retries after a wait are checked again.
    _check_credential(ctx.request, user)
    token = SITE_SCOPE.set(user.site_id)
    try:
        response = handler(ctx)
        ctx.finish(response)  # an update's or delete's held transaction: its answer recorded, committed
    except Replay as replay:  # ... or its key was recorded: the same answer again, nothing applied
        response = replay.response()
    finally:
        ctx.release()
        SITE_SCOPE.reset(token)
        # Also when the handler then failed: a write committed before its error (a request's own
        # expiry sweep) freed jobs all the same.
        bridge = state.wake_bridge
        if ctx.woke and bridge is not None:  # committed: tell the other server processes (acquire_notify.py)
            bridge.publish(user.id)
    return response


def route(path: str, methods: dict[str, Handler], *, public: bool = False,
          not_for_site_scoped: "tuple[str, ...]" = ()) -> Route:
    """A route whose handlers run in the thread pool. ``public``: no token needed (login, login
    methods, the OpenAPI document). ``not_for_site_scoped``: methods refused (403) to site-scoped
    launcher credentials (creating or deleting sites, managing credentials); every other route
    limits them to their site's records through the ownership checks (``SITE_SCOPE``)."""

    replayed = {m for m in methods if m in REPLAYED_METHODS and (m, path) not in NOT_REPLAYED}

    async def endpoint(request: Request) -> Response:
        handler = methods[request.method if request.method != "HEAD" else "GET"]
        user = None
        if not public:
            user = bearer_user(request.headers.get("authorization", ""), request.app.state.settings.secret_key)
            if request.method in not_for_site_scoped:
                require_unscoped(user, f"use {request.method} {path}")
        body = None
        if request.method in BODY_METHODS:
            settings = request.app.state.settings
            if user is not None:
                # A revoked or expired credential is refused before its body (up to
                # BALSAM_MAX_BODY_BYTES) is read: its signature alone does not entitle it to that.
                await _check_credential_before_body(request, user)
                limit = settings.max_body_bytes
            else:
                limit = min(PUBLIC_BODY_LIMIT_BYTES, settings.max_body_bytes)
            body = await read_body(request, limit)
        while True:
            ctx = Ctx(request, body, user, replayed=request.method in replayed)
            try:
                response = await run_in_threadpool(_authenticated_call, handler, ctx)
            finally:  # also after an error answer (see _authenticated_call)
                if ctx.woke and user is not None:
                    request.app.state.acquire_waits.wake(user.id)
            if not isinstance(response, WaitForJobs):
                return response
            # Nothing to lease yet: wait on the event loop (no thread held, no transaction open),
            # then look again; the handler answers for good once its deadline has passed.
            await request.app.state.acquire_waits.wait(user.id, response.generation, response.deadline)

    endpoint.__name__ = path.strip("/").replace("/", "_").replace("{", "").replace("}", "") or "root"
    return Route(path, endpoint, methods=list(methods))
