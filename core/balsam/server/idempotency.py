"""Exactly-once requests: the ``Idempotency-Key`` request header.

The client sends one key per logical request (a fresh UUID), the same key on every retry of that
request. A creating route (jobs, apps, sites, BatchJobs, sessions, job acquisition) *claims* the key
at the start of its write transaction and *records* what it made (the ids) before the transaction
commits; a request whose key is already recorded is answered from the record (the records as they
are now) instead of being applied again.

Updates and deletes (``PUT``, ``PATCH``, ``DELETE``) get the same from the routing layer, with no
code in their routes (routing.py, ``Ctx.write``): the request's first write transaction claims the
key as its first statement, and is kept open after the route's ``with ctx.write()`` block until
the route has answered; then its answer (status, body, media type and the route's own ``Balsam-*`` headers) is
recorded in the same transaction, which commits. A replay gets that answer again, byte for byte: the
count of a bulk PATCH, the 204 of a DELETE, the record a PUT answered (as it was then), a query
delete's ``Balsam-Skipped-Running`` (without it the client that resent the delete, its first answer
lost, no longer warned about the jobs left RUNNING; records written before migration 0022 have no
headers and are replayed without). Without the record, a
retried state change answered 409 (the job had moved on: ``POSTPROCESSED`` -> ``JOB_FINISHED``)
and a retried delete 404 or a count of 0, for changes that had been applied. The session heartbeat
(``PUT /sessions/{id}``, naturally idempotent and the most frequent write) ignores the header, and so
does a site agent's status refresh (a ``PUT /sites/{id}`` naming only ``queued_jobs`` and
``backfill_windows``: :data:`SITE_STATUS_FIELDS`).
The cost: one row inserted and updated per request, whatever its size (never per job).

Why nothing is applied twice:

- the claim and the records are written in one transaction, so a commit makes both visible at once
  and a crash or rollback removes both: there is no moment where records exist without their key;
- the claim is an ``INSERT ... ON CONFLICT DO NOTHING`` on the primary key ``(user_id, key)``. On
  PostgreSQL a second transaction claiming a key that an open transaction has just inserted waits on
  the unique index until that transaction ends: if it committed, the insert does nothing and the
  following SELECT (a new snapshot under READ COMMITTED) reads the record; if it rolled back, the
  second claim succeeds and applies the request itself. On SQLite every write transaction starts
  with ``BEGIN IMMEDIATE``, so claims are serialized and the second one sees the first's commit.
  A retry that arrives while the original is still running (the client's read timeout fired) is
  therefore answered once the original has committed, never applied beside it.
- a key is bound to its request (sha256 of method, path, query and body): the same key on a
  different request is refused (422) rather than answered with an unrelated record. It is bound to
  the scope of the credential that sent it too (``scope``, migration 0024): a launcher credential,
  limited to one site, is refused (422) a key its user recorded with their own credential or another
  site's launcher did (those records may lie outside its site); the user's own credential replays
  the records of any of their scopes, and a launcher those of its site, whichever credential of it
  (renewed, or a new one) sends the retry. Records written before migration 0024 (no scope) are
  replayed to a launcher only when what they made or changed lies within its site.
- an expired record not swept yet is taken over by the next request with its key (a new life),
  with an ``UPDATE ... WHERE expires <= now``: two requests that both read it expired both reach
  that UPDATE, and on PostgreSQL the second waits for the first's row lock, then re-checks the
  condition against the first's commit (renewed: no longer expired) and changes nothing; it then
  reads the record the first committed and is answered from it. (Without the condition both took
  the key and the request was applied twice.) A record swept between the claim and its read is
  claimed anew.

Reserved keys (``POST /jobs/reservations``, PostgreSQL only): the server issues keys for the
chunks of one large bulk create, each row recording the job ids allocated to it in advance (the
chunks' ids in the order of the client's list) with an empty ``request_hash``. The bulk-create
route's claim of such a key takes the reservation with an ``UPDATE ... WHERE request_hash = ''``
that sets the request's fingerprint: the update holds the row's lock until its transaction ends,
so a second request with the same key waits, then finds the fingerprint (and the record, if the
first committed) and is answered as a retry; a rollback leaves the reservation as it was. The ids
are the key's own: a retry stores the chunk with the same ids. No other route takes a reserved
key (its empty hash matches no request: 422).

The reserved ids come from the job id sequence that every user shares, and an unused reservation
burns its ids. So each user has a budget (:func:`check_reservation_budget`): their reserved keys not
taken yet and unexpired may hold at most ``MAX_RESERVED_IDS_PER_USER`` ids (two full reservations:
1,000,000) in at most ``MAX_RESERVED_KEYS_PER_USER`` keys (200); a reservation that would pass
either is refused with 429 and a ``Retry-After`` of when enough of them expire (taking them frees
them at once). Clients then send the chunks one after the other, without reservation (balsam's
``bulk_create`` does). Without the budget one user's reservations (500,000 ids a request) used up
the 32-bit sequence in ~4,300 requests, and every user's creates failed from then on.

Records expire after ``BALSAM_IDEMPOTENCY_TTL_SEC`` (default 24 h; a client retries for minutes) and
are swept by the server's background task. An acquire that leased nothing leaves no record
(``KEPT_ONLY_IF_MADE``: its claim is deleted in the acquire's transaction; idle agents poll every second).
Requests without the header behave as before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from typing import TYPE_CHECKING, Any, Callable, Container, Optional

import attrs
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from starlette.responses import Response

from balsam.models import MAX_CHUNKS_PER_RESERVATION, MAX_ITEMS_PER_BULK_OP

from .errors import Conflict, TooManyRequests, ValidationFailed
from .tables import apps, batch_jobs, idempotency_keys, jobs, sessions, sites

if TYPE_CHECKING:  # pragma: no cover
    from .routing import Ctx

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 128
#: The request_hash of a reserved key not yet taken (a real fingerprint is 64 hex digits).
RESERVED_HASH = ""
#: The ``scope`` of a record made with the user's own credential (every site of theirs); a launcher
#: credential's is ``site:<id>`` (:func:`credential_scope`).
ALL_SITES = "all"


def credential_scope(site_id: "int | None") -> str:
    """The ``scope`` column's value for a credential limited to ``site_id`` (None: not limited)."""
    return ALL_SITES if site_id is None else f"site:{int(site_id)}"


#: Methods made exactly-once by the routing layer (``Ctx.write``); POST routes claim their keys themselves.
REPLAYED_METHODS = frozenset({"PUT", "PATCH", "DELETE"})
#: (method, route path) that ignore the header: applying them twice is harmless, and they are frequent.
NOT_REPLAYED = frozenset({("PUT", "/sessions/{session_id}")})
#: ``resource`` of records kept only when the request leased something. An acquire that leased
#: nothing changed nothing but its session's heartbeat, so its resend may be answered afresh (it
#: leases what is there then, and its client, which resends only a request whose answer it lost,
#: gets that answer); one that leased jobs is kept, so that its resend gets those jobs again and none
#: stays leased to a session that never heard of it. Idle, an agent's processing module acquires
#: once a second (a 1 s long poll) and every launcher once a cycle: kept, their empty answers were
#: 86,400 rows a day per idle agent for ``BALSAM_IDEMPOTENCY_TTL_SEC`` (24 h), written and swept
#: for nothing (benchmarks/soak_idle_records.py).
KEPT_ONLY_IF_MADE = frozenset({"acquire"})
#: The fields of a ``PUT /sites/{id}`` that only report the site's status, which its agent sends
#: whole every cycle (the scheduler module: ``queued_jobs`` and ``backfill_windows`` every
#: ``sync_period``, 10 s by default; the agent's liveness check: an empty body), with the read-only
#: fields a client may send back (ignored by the route). Such a PUT is not recorded
#: (:func:`is_status_refresh`): recorded, each was a row holding the whole site record (the whole
#: queue's ``queued_jobs`` on a busy cluster) for ``BALSAM_IDEMPOTENCY_TTL_SEC`` (24 h): 8,640 rows
#: a day per agent from the scheduler module alone (benchmarks/site_refresh_records.py). Applying it
#: twice is harmless: a resend carries the same snapshot and sets the same values (and
#: ``last_refresh`` to its own time, which is what a refresh is), and the answer of a resend is
#: the record as it is then, which is what the agent wants. A late resend of an older refresh
#: (its first try's answer lost, the next cycle's refresh applied meanwhile) does overwrite the
#: newer ``queued_jobs``/``backfill_windows`` with its older snapshot until the agent's next refresh
#: (one ``sync_period``): they are only shown (the site record, ``GET /sites``), and nothing on
#: the server decides anything on them. A PUT with any other field (a user's
#: ``allowed_projects``, ``name``, ``path``, ...) is recorded and replayed as before: its resend
#: answers the record as it was and never undoes a later change.
SITE_STATUS_FIELDS = frozenset({"queued_jobs", "backfill_windows", "id", "last_refresh", "creation_date"})


def is_status_refresh(method: str, path: str, body: "bytes | None") -> bool:
    """Whether a request is a ``PUT /sites/{id}`` whose body names only :data:`SITE_STATUS_FIELDS`
    (an empty object too): such a request's ``Idempotency-Key`` is ignored."""
    segments = [part for part in path.split("/") if part]
    if method != "PUT" or len(segments) != 2 or segments[0] != "sites" or not segments[1].isdecimal():
        return False
    try:
        data = orjson.loads(body or b"")  # as Ctx.json: orjson refuses a deep nesting (a ValueError)
    except ValueError:
        return False
    return isinstance(data, dict) and set(data) <= SITE_STATUS_FIELDS


#: ``resource`` of a record that holds the answer itself (``answer``, ``answer_type``).
ANSWER = "answer"


@attrs.frozen
class Recorded:
    """What an earlier request with the same key answered: its status and the ids it made (a
    create), or the answer itself (an update or delete: ``resource == ANSWER``)."""

    status_code: int
    resource: str
    ids: list[int]
    answer: "bytes | None" = None
    answer_type: "str | None" = None
    #: The answer's other headers, ``[[name, value], ...]`` (:func:`answer_headers`), or None.
    answer_headers: "list[list[str]] | None" = None


class Replay(Exception):
    """Raised by ``Ctx.write`` when an update's or delete's key is already recorded: the routing
    layer answers ``response()`` instead of running the route."""

    def __init__(self, recorded: Recorded) -> None:
        super().__init__(recorded.status_code)
        self.recorded = recorded

    def response(self) -> Response:
        recorded = self.recorded
        if recorded.resource != ANSWER or not recorded.status_code:
            raise Conflict(f"the request with this {HEADER} left no answer to replay; send a new key for a new request")
        response = Response(recorded.answer or b"", status_code=recorded.status_code, media_type=recorded.answer_type)
        for name, value in recorded.answer_headers or ():
            if _replayable(name):  # a record from before the filter below could hold others
                response.headers.append(name, value)
        return response


#: The prefix of the only headers of an answer that are recorded and replayed: Balsam's own (a
#: query delete's ``Balsam-Skipped-Running``). Others are not the answer's content: a route's (or a
#: middleware's) ``Set-Cookie`` or ``Retry-After`` replayed to a later retry would set an old
#: cookie again or ask it to wait for a moment long past; the content type and length are set again
#: by the replay's own body.
_RECORDED_PREFIX = "balsam-"


def _replayable(name: str) -> bool:
    return name.lower().startswith(_RECORDED_PREFIX)


def answer_headers(response: Response) -> "list[list[str]] | None":
    """The ``Balsam-*`` headers a route set on its answer, in order, or None."""
    pairs = [[name, value] for name, value in response.headers.items() if _replayable(name)]
    return pairs or None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def request_fingerprint(method: str, path: str, query: str, body: "bytes | None") -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode(), body or b""):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _claim_stmt(insert: Callable[..., Any]) -> Any:
    return (
        insert(idempotency_keys)
        .values(user_id=sa.bindparam("b_user"), key=sa.bindparam("b_key"), request_hash=sa.bindparam("b_hash"),
                scope=sa.bindparam("b_scope"), status_code=0,
                resource="", resource_ids=[], created=sa.bindparam("b_now", type_=idempotency_keys.c.created.type),
                expires=sa.bindparam("b_expires", type_=idempotency_keys.c.expires.type))
        .on_conflict_do_nothing(index_elements=["user_id", "key"])
    )


# Built once and executed with parameters (every POST, PUT, PATCH and DELETE from our clients
# carries a key: the build cost more than the statement; see jobs_logic.owned_sites_clause).
_CLAIM = {"postgresql": _claim_stmt(postgresql.insert), "sqlite": _claim_stmt(sqlite.insert)}
_RECORD = (
    sa.update(idempotency_keys)
    .where(idempotency_keys.c.user_id == sa.bindparam("b_user"), idempotency_keys.c.key == sa.bindparam("b_key"))
    .values(status_code=sa.bindparam("b_status"), resource=sa.bindparam("b_resource"),
            resource_ids=sa.bindparam("b_ids", type_=idempotency_keys.c.resource_ids.type))
)

#: Drop a claim whose request leaves nothing to replay (``record``).
_FORGET = sa.delete(idempotency_keys).where(idempotency_keys.c.user_id == sa.bindparam("b_user"),
                                            idempotency_keys.c.key == sa.bindparam("b_key"))

_RECORD_ANSWER = (
    sa.update(idempotency_keys)
    .where(idempotency_keys.c.user_id == sa.bindparam("b_user"), idempotency_keys.c.key == sa.bindparam("b_key"))
    .values(status_code=sa.bindparam("b_status"), resource=ANSWER, answer=sa.bindparam("b_answer"),
            answer_type=sa.bindparam("b_type"),
            answer_headers=sa.bindparam("b_headers", type_=idempotency_keys.c.answer_headers.type))
)


class IdempotentRequest:
    """The idempotency key of one request (inactive when the request has none)."""

    def __init__(self, ctx: "Ctx") -> None:
        request = ctx.request
        key = request.headers.get(HEADER)
        self.key: Optional[str] = key.strip() if key is not None else None
        if self.key is not None and not 1 <= len(self.key) <= MAX_KEY_CHARS:
            raise ValidationFailed.field(["header", HEADER], f"must be 1 to {MAX_KEY_CHARS} characters")
        if self.key is not None and is_status_refresh(request.method, request.url.path, ctx.body):
            self.key = None  # applied again if resent, never recorded (SITE_STATUS_FIELDS says why)
        self.ctx = ctx
        self.ttl = dt.timedelta(seconds=int(getattr(ctx.settings, "idempotency_ttl_sec", 86400)))
        self._fingerprint = ""
        self._claimed = False
        #: The job ids reserved for this request's key (``claim(reservable=True)``), else None.
        self.reserved_ids: "list[int] | None" = None

    @property
    def claimed(self) -> bool:
        """Whether ``claim`` took the key for this request: only then may the request change the
        key's row (record its answer; a query delete's lease, renewal or drop)."""
        return self._claimed

    def claim(self, conn: sa.Connection, *, reservable: bool = False) -> Optional[Recorded]:
        """Claim the key for this transaction; the earlier answer if the key is already recorded
        (None, the key not claimed: ``claimed`` is False, for a delete by id recorded before
        migration 0024 that is answered afresh: ``_recorded``).
        ``reservable``: a key reserved by ``reserve_job_keys`` is taken, and its ids are left in
        ``reserved_ids`` (the bulk create of jobs).

        Call first thing in the write transaction that creates the records.
        """
        if self.key is None:
            return None
        request = self.ctx.request
        self._fingerprint = request_fingerprint(request.method, request.url.path, request.url.query, self.ctx.body)
        user_id = self.ctx.user.id
        # Keys are per user, but a launcher credential is limited to one site: the record keeps the
        # scope of the credential that made it, and is replayed only within it (``_recorded``).
        params = {"b_user": user_id, "b_key": self.key, "b_hash": self._fingerprint,
                  "b_scope": credential_scope(self.ctx.user.site_id)}
        # Each pass ends in a claim or an answer, except when another transaction changed the key's
        # row under us (see the two ``continue``): then the next pass reads what it committed. A
        # third pass would need the key to expire again or be swept again in between: not within
        # a request's time (the TTL is hours), so the loop is bounded for safety only.
        for _attempt in range(3):
            now = _utcnow()
            claimed = conn.execute(
                _CLAIM["postgresql" if conn.dialect.name == "postgresql" else "sqlite"],
                {**params, "b_now": now, "b_expires": now + self.ttl},
            ).rowcount
            if claimed:
                self._claimed = True
                return None
            if reservable:
                taken = conn.execute(_TAKE_RESERVED, {**params, "b_now": now}).first()
                if taken is not None:
                    self._claimed = True
                    self.reserved_ids = [i for first, last in taken.resource_ids
                                         for i in range(int(first), int(last) + 1)]
                    return None
            row = conn.execute(sa.select(idempotency_keys).where(
                idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == self.key)).first()
            if row is None:  # expired and swept after the claim saw it: claim it anew
                continue
            if row.expires <= now:
                # Expired but not swept yet: the key starts a new life with this request. Only if it
                # is still expired when this UPDATE holds its row: a concurrent request with the key
                # may have read it expired too and renewed it first (on PostgreSQL this UPDATE waits
                # for that transaction, then re-checks the condition against its commit). Without
                # the condition both took the key and the request was applied twice; now the later
                # one changes no row and reads the record the other committed (its answer).
                renewed = conn.execute(_RENEW, {**params, "b_now": now, "b_expires": now + self.ttl}).rowcount
                if renewed:
                    self._claimed = True
                    return None
                continue
            # None: a legacy delete by id answered afresh, the key not ours (``claimed`` stays False).
            return self._recorded(conn, row)
        raise Conflict(f"this {HEADER} kept changing under concurrent requests with the same key; retry")

    def _recorded(self, conn: sa.Connection, row: sa.Row) -> Optional[Recorded]:
        """The earlier request's record (422 if the key was used for a different request, or by a
        credential whose scope this one's does not hold); None for a delete by id recorded before
        migration 0024 that this launcher credential is answered afresh (see below)."""
        site_id = self.ctx.user.site_id
        if row.scope is not None:  # the same request, made within this credential's scope
            same = row.request_hash == self._fingerprint and (site_id is None or row.scope == credential_scope(site_id))
        elif site_id is None:  # recorded before migration 0024, replayed to the user's own credential as then
            same = row.request_hash == self._fingerprint
        else:
            # Recorded before migration 0024, without its scope: the same request, made within
            # this site (what it made or changed lies there).
            same = row.request_hash == self._fingerprint and self._legacy_within_scope(conn, row, site_id)
            if not same and row.request_hash == self._fingerprint and self.ctx.request.method == "DELETE":
                # The same DELETE, sent by the same user (keys are per user) with the same key, method,
                # path, query and body: a launcher's retry across the upgrade to 0024 (its session's
                # DELETE at shutdown, a job script's ``job.delete()`` or query delete). What it deleted
                # is gone, and nothing left proves that it lay in this launcher's site: the record
                # holds the answer only (a 204's empty body, a query delete's count), the path an id
                # at most, and the rows that named the site (the record, its events, its transfers)
                # went with it. A 422 ("a different request") is false, and the client gives up on it
                # (a launcher warns that it could not delete its session, which then holds its jobs
                # until it expires). A claim not answered yet (status 0: a query delete that may still
                # be running on a server beside this one) is answered as in progress (503 and
                # Retry-After: ``routes.jobs.query_delete``) until it lapses, then taken.
                if int(row.status_code) == 0:
                    same = True
                elif self._names_one_record():
                    # A delete by id is answered as a fresh request, within this credential's site
                    # like any other, unclaimed: the key's record stays as it is (the user's own
                    # credential still replays it) and nothing is recorded over it. Safe only because
                    # the path names the row: ids are never reused (the tables' ids are AUTOINCREMENT
                    # and sequences), so it names the deleted row, which is in no site now, and the
                    # fresh delete answers 404 and deletes nothing. (The launcher's Session close,
                    # client/lease.py, takes that 404 as "already gone"; the Python API's
                    # ``Model.delete()`` raises it, as for any record deleted meanwhile.)
                    return None
                else:
                    return self._legacy_query_delete(row)
        if not same:
            raise ValidationFailed.field(
                ["header", HEADER],
                f"this key was already used for a different request (at {row.created:%Y-%m-%d %H:%M:%S} UTC); "
                f"send a new key for a new request",
            )
        return Recorded(int(row.status_code), str(row.resource), [int(i) for i in row.resource_ids],
                        None if row.answer is None else bytes(row.answer), row.answer_type,
                        row.answer_headers or None)

    def _names_one_record(self) -> bool:
        """Whether this request's path names a record by its id (``/jobs/7``), not a query (``/jobs/``)."""
        segments = [part for part in self.ctx.request.url.path.split("/") if part]
        return len(segments) >= 2 and segments[1].isdecimal()

    def _legacy_query_delete(self, row: sa.Row) -> Recorded:
        """A launcher's query delete recorded before migration 0024 and answered since: its recorded
        count again, or 409 when the answer named jobs left RUNNING (``_recorded``).

        Never run again (a fresh delete would also delete the matching jobs made since: the key
        promises that a retry deletes nothing). The count is replayed: it names no record (what a
        record's scope keeps from a launcher is another site's records). Its recorded
        ``Balsam-*`` header (``Balsam-Skipped-Running``, the jobs left RUNNING) cannot be: its ids
        may be another site's jobs (nothing proves which credential sent the request), and the
        answer without the header is not true either (our client warns of the jobs left RUNNING
        only from it: its user would take every matching job for deleted). So such a record is
        answered 409, nothing deleted; a resend with a new key is a new request (it deletes what
        matches then)."""
        if any(_replayable(name) for name, _value in row.answer_headers or ()):
            raise Conflict(f"this {HEADER} was recorded before the server's upgrade (at {row.created:%Y-%m-%d %H:%M:%S} "
                           f"UTC) and its answer cannot be replayed to a launcher; resend with a new key")
        return Recorded(int(row.status_code), str(row.resource), [], None if row.answer is None else bytes(row.answer),
                        row.answer_type, None)

    def _legacy_within_scope(self, conn: sa.Connection, row: sa.Row, site_id: int) -> bool:
        """Whether every record a request recorded before migration 0024 made (its ids) or changed
        (the id in its path, the ids of a bulk update's items) is of site ``site_id``, and there is
        at least one: what a launcher of that site may be answered. A record whose rows cannot all
        be found (deleted since) or named (a query update) is not."""
        wanted: "dict[sa.Table, set[int]]" = {}
        made = _RECORDED_TABLES.get(str(row.resource))
        if made is not None:
            wanted.setdefault(made, set()).update(int(i) for i in row.resource_ids)
        elif row.resource != ANSWER:
            return False
        request = self.ctx.request
        segments = [part for part in request.url.path.split("/") if part]
        table = _PATH_TABLES.get(segments[0]) if segments else None
        if table is None:
            return False
        if len(segments) >= 2 and segments[1].isdecimal():
            wanted.setdefault(table, set()).add(int(segments[1]))
        elif row.resource == ANSWER:
            items = _body_items(self.ctx.body) if request.method == "PATCH" and len(segments) == 1 else None
            if not items or request.url.query:
                return False
            wanted.setdefault(table, set()).update(items)
        if not any(wanted.values()):
            return False
        for table, ids in wanted.items():
            if not ids:
                continue
            column = table.c.id if table is sites else table.c.site_id
            found = conn.execute(sa.select(sa.func.count()).select_from(table).where(
                table.c.id.in_(sorted(ids)), column == site_id)).scalar_one()
            if found != len(ids):
                return False
        return True

    def record(self, conn: sa.Connection, status_code: int, resource: str, ids: "list[int]") -> None:
        """Store what this request made (same transaction as the records themselves). An acquire
        that leased nothing is not kept (:data:`KEPT_ONLY_IF_MADE`): its claim is dropped in the
        same transaction."""
        if not self._claimed:
            return
        if resource in KEPT_ONLY_IF_MADE and not ids:
            conn.execute(_FORGET, {"b_user": self.ctx.user.id, "b_key": self.key})
            return
        conn.execute(_RECORD, {"b_user": self.ctx.user.id, "b_key": self.key, "b_status": status_code,
                               "b_resource": resource, "b_ids": list(ids)})

    def record_answer(self, conn: sa.Connection, response: Response) -> None:
        """Store an update's or delete's answer, replayed as it is (same transaction as the change)."""
        if not self._claimed:
            return
        conn.execute(_RECORD_ANSWER, {"b_user": self.ctx.user.id, "b_key": self.key, "b_status": response.status_code,
                                      "b_answer": bytes(response.body) or None, "b_type": response.media_type,
                                      "b_headers": answer_headers(response)})


#: Renew an expired key for a new request, only while it is still expired (see ``claim``).
_RENEW = (
    sa.update(idempotency_keys)
    .where(idempotency_keys.c.user_id == sa.bindparam("b_user"), idempotency_keys.c.key == sa.bindparam("b_key"),
           idempotency_keys.c.expires <= sa.bindparam("b_now", type_=idempotency_keys.c.expires.type))
    .values(request_hash=sa.bindparam("b_hash"), scope=sa.bindparam("b_scope"), status_code=0, resource="", resource_ids=[],
            created=sa.bindparam("b_now", type_=idempotency_keys.c.created.type),
            expires=sa.bindparam("b_expires", type_=idempotency_keys.c.expires.type), answer=None, answer_type=None,
            answer_headers=sa.null())
)

_TAKE_RESERVED = (
    sa.update(idempotency_keys)
    .where(idempotency_keys.c.user_id == sa.bindparam("b_user"), idempotency_keys.c.key == sa.bindparam("b_key"),
           idempotency_keys.c.request_hash == RESERVED_HASH, idempotency_keys.c.status_code == 0,
           idempotency_keys.c.expires > sa.bindparam("b_now", type_=idempotency_keys.c.expires.type))
    .values(request_hash=sa.bindparam("b_hash"), scope=sa.bindparam("b_scope"))
    .returning(idempotency_keys.c.resource_ids)
)

#: The table of the rows a create's record names (its ``resource``), for records without scope.
_RECORDED_TABLES = {"jobs": jobs, "acquire": jobs, "release": jobs, "Session": sessions, "BatchJob": batch_jobs,
                    "App": apps, "Site": sites}
#: The table of the rows a route path's first segment names (``/jobs/7``, a bulk ``PATCH /jobs/``).
_PATH_TABLES = {"jobs": jobs, "batch-jobs": batch_jobs, "sessions": sessions, "apps": apps, "sites": sites}


def _body_items(body: "bytes | None") -> "set[int] | None":
    """The ``id`` of every item of a bulk update's JSON list, or None if it is not one."""
    try:
        items = json.loads(body or b"")
    except ValueError:
        return None
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        return None
    ids = [item.get("id") for item in items]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return set(ids)


def id_ranges(ids: "list[int]") -> "list[list[int]]":
    """Increasing ids as ``[[first, last], ...]`` runs (a reservation's ids are one run unless other
    creates took ids from the sequence meanwhile): a few numbers to store instead of thousands."""
    runs: "list[list[int]]" = []
    for i in ids:
        if runs and runs[-1][1] + 1 == i:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def reserve_job_keys(conn: sa.Connection, user_id: int, id_blocks: "list[list[int]]", ttl_sec: float) -> list[str]:
    """A new key per block of job ids, each row holding its block as runs (``id_ranges``; see the
    module docstring); returns the keys in the order of the blocks."""
    now = _utcnow()
    expires = now + dt.timedelta(seconds=ttl_sec)
    keys = [f"reserved-{uuid.uuid4().hex}" for _ in id_blocks]
    conn.execute(sa.insert(idempotency_keys), [
        {"user_id": user_id, "key": key, "request_hash": RESERVED_HASH, "status_code": 0, "resource": "jobs",
         "resource_ids": id_ranges(ids), "created": now, "expires": expires}
        for key, ids in zip(keys, id_blocks)])
    return keys


#: The most job ids one user's reserved keys (not taken yet, unexpired) may hold, and the most such
#: keys: twice what one full reservation takes (see the module docstring).
MAX_RESERVED_IDS_PER_USER = 2 * MAX_CHUNKS_PER_RESERVATION * MAX_ITEMS_PER_BULK_OP
MAX_RESERVED_KEYS_PER_USER = 2 * MAX_CHUNKS_PER_RESERVATION
#: The class of the transaction-level advisory lock (with the user's id) that makes one user's
#: reservations check the budget one at a time (PostgreSQL; "bres").
RESERVATION_LOCK_CLASS = 0x62726573

#: A user's reserved keys not taken yet and unexpired, with the number of ids each holds (its runs,
#: ``id_ranges``). ``request_hash = ''`` is written out (not bound): the partial index
#: ``ix_idempotency_keys_reserved`` has this predicate.
_OUTSTANDING = """WITH outstanding AS (
    SELECT k.expires, (SELECT coalesce(sum((r ->> 1)::bigint - (r ->> 0)::bigint + 1), 0)
                       FROM jsonb_array_elements(k.resource_ids) AS r) AS n
    FROM idempotency_keys AS k
    WHERE k.user_id = :user AND k.request_hash = '' AND k.status_code = 0 AND k.expires > :now
)"""
_BUDGET_USE = sa.text(_OUTSTANDING + " SELECT count(*), coalesce(sum(n), 0) FROM outstanding")
#: When enough of them have expired that ``need_keys`` keys and ``need_ids`` ids are free again.
_FREED_AT = sa.text(_OUTSTANDING + """, freed AS (
    SELECT expires, count(*) OVER w AS keys, sum(n) OVER w AS ids FROM outstanding
    WINDOW w AS (ORDER BY expires ROWS UNBOUNDED PRECEDING)
) SELECT min(expires) FROM freed WHERE keys >= :need_keys AND ids >= :need_ids""")


def check_reservation_budget(conn: sa.Connection, user_id: int, sizes: "list[int]") -> None:
    """429 when reserving ``sizes`` (one key per chunk) would leave the user more reserved ids or
    keys not taken yet than the budget allows (PostgreSQL, where ids are reserved; call in the
    reservation's write transaction, before it reserves: the user's reservations wait for each
    other here, so two of them cannot both pass on the same room)."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:cls, :user)"), {"cls": RESERVATION_LOCK_CLASS, "user": user_id})
    now = _utcnow()
    keys, ids = conn.execute(_BUDGET_USE, {"user": user_id, "now": now}).one()
    keys, ids, asked = int(keys), int(ids), sum(sizes)
    need_keys = keys + len(sizes) - MAX_RESERVED_KEYS_PER_USER
    need_ids = ids + asked - MAX_RESERVED_IDS_PER_USER
    if need_keys <= 0 and need_ids <= 0:
        return
    freed_at = conn.execute(_FREED_AT, {"user": user_id, "now": now, "need_keys": max(need_keys, 0),
                                        "need_ids": max(need_ids, 0)}).scalar()
    wait = (freed_at - now).total_seconds() if freed_at is not None else 1.0
    raise TooManyRequests(
        f"Reservation refused: your reserved job ids not used yet ({ids:,} ids in {keys} keys) and this request's "
        f"({asked:,} ids in {len(sizes)} keys) would pass the per-user budget of {MAX_RESERVED_IDS_PER_USER:,} ids in "
        f"{MAX_RESERVED_KEYS_PER_USER} keys; send the chunks one after the other without a reservation, or retry once "
        f"earlier reservations are used or expire", wait)


def sweep_expired_keys(conn: sa.Connection, now: "dt.datetime | None" = None) -> int:
    """Delete expired records (the server's background task calls this every sweep period)."""
    result = conn.execute(sa.delete(idempotency_keys).where(idempotency_keys.c.expires <= (now or _utcnow())))
    return int(result.rowcount or 0)


def replay_one(recorded: Recorded, resource: str, fetch: Callable[[int], Any]) -> Any:
    """The single record an earlier create made (``fetch(id)`` raises NotFound once it is deleted)."""
    from .errors import Conflict, NotFound

    try:
        return fetch(recorded.ids[0])
    except (NotFound, IndexError):
        raise Conflict(
            f"the request with this {HEADER} created {resource} {recorded.ids[0] if recorded.ids else '?'}, "
            f"which has been deleted since"
        ) from None


def require_all_replayed(recorded_ids: "list[int]", found: "Container[int]", resource: str) -> None:
    """409 when a replay finds fewer records than the earlier create made (``found``: the ids still
    there), as ``replay_one`` does for a single record: a shorter answer would no longer line up with
    the request's items, which clients pair with the answer by position. ``resource``: singular."""
    missing = [i for i in recorded_ids if i not in found]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        which = f"{resource} {shown} has" if len(missing) == 1 else f"{resource}s {shown} have"
        raise Conflict(f"the request with this {HEADER} created {len(recorded_ids)} {resource}s, of which "
                       f"{which} been deleted since")
