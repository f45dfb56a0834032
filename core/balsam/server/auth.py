"""Authentication: password hashing, login throttling, credentials and the tokens they sign.

Every token is a JWT (HS256) carrying the id of a row of the ``credentials`` table (``cid``), so
that any token can be revoked; a request is accepted only while that row exists, is not revoked
and has not expired (checked through :class:`CredentialCache`, which trusts a verdict for
``BALSAM_AUTH_REVOCATION_CACHE_SEC`` seconds). Kinds of credentials:

- ``login``: a plain password login (what a Balsam 0.7 client asks for): the token *is* the
  credential and expires with it (``BALSAM_AUTH_TOKEN_TTL_SEC``, 48 h);
- ``refresh``: asked for with ``scope=offline_access`` at login (our ``balsam login`` does):
  an opaque secret ``bsr1.<id>.<secret>`` (only its SHA-256 is stored) that ``POST /auth/token``
  exchanges for access tokens of ``BALSAM_AUTH_ACCESS_TTL_SEC``; each exchange slides its expiry
  to now + ``BALSAM_AUTH_REFRESH_TTL_SEC``, so an agent that keeps running keeps working;
- ``launcher``: minted by the site agent for one BatchJob, good only for that BatchJob's site
  (the token's ``site`` claim), renewed by the agent while the BatchJob lives;
- ``invitation``: a one-time code with which an invited user sets a password;
- ``dashboard``: one per dashboard login (password form or one-time link), carried by the session
  cookie and checked on every page (balsam.server.dashboard.session); it expires with the
  session's maximum age, logging out revokes it, and so does setting the user's password.

Password logins go through :func:`check_password_login` (or :func:`password_login`): one scrypt
computation whether the user exists or not (same time for unknown users), after
:class:`LoginThrottle` (failures per user name *from* a client address, per address and per user
name over all addresses, in a sliding window; 429 with ``Retry-After`` and no scrypt work). Other
login front ends (the dashboard's cookie login) call the same function with the app's throttle
(``app.state.login_throttle``). The client address is uvicorn's: ``X-Forwarded-For`` counts only
from ``BALSAM_TRUSTED_PROXIES`` (:func:`client_address`).
"""

from __future__ import annotations

import array
import base64
import collections
import contextvars
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jwt
import sqlalchemy as sa

from ..states import BATCH_JOB_TRANSITIONS
from .db import write_tx
from .errors import Forbidden, TooManyRequests, Unauthorized
from .settings import MAX_SCRYPT_N, scrypt_n_from_env
from .tables import batch_jobs, credentials, users

# scrypt parameters (RFC 7914 recommendation for interactive logins: N=2**14, r=8, p=1). N of new
# hashes is BALSAM_AUTH_SCRYPT_N (settings.scrypt_n_from_env, default 2**14); r and p are fixed.
_SCRYPT_R, _SCRYPT_P, _DKLEN = 8, 1, 32
ALGORITHM = "HS256"
REFRESH_PREFIX = "bsr1"
INVITATION_PREFIX = "bsi1"
CREDENTIAL_KINDS = ("login", "refresh", "launcher", "invitation", "dashboard")
LOGIN_FAILED = "Incorrect username or password"


def _scrypt_maxmem(n: int, r: int, p: int) -> int:
    # OpenSSL's own count (128*r*(N+2) for V, 128*r*p for B) plus slack; its default limit
    # (32 MiB) refused N=2**15 at r=8, so a larger configured N could never have been used.
    return 128 * r * (n + p + 2) + 1024 * 1024


#: The most memory one stored hash may make verify_password spend (the cap of BALSAM_AUTH_SCRYPT_N).
_MAX_VERIFY_MEM = _scrypt_maxmem(MAX_SCRYPT_N, _SCRYPT_R, _SCRYPT_P)


def hash_password(password: str, n: "int | None" = None) -> str:
    """A new scrypt hash of ``password`` at work factor ``n`` (default ``$BALSAM_AUTH_SCRYPT_N``,
    read at each call: the server validated it at its start, and ``balsam server user add`` hashes
    with the same setting as the server it administers)."""
    n = scrypt_n_from_env() if n is None else n
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_DKLEN,
                            maxmem=_scrypt_maxmem(n, _SCRYPT_R, _SCRYPT_P))
    b64 = base64.b64encode
    return f"scrypt${n}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: "str | None") -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        # The hash's own parameters, not the current setting: hashes made before a change of
        # BALSAM_AUTH_SCRYPT_N keep verifying. Memory is bounded by the setting's cap.
        maxmem = _scrypt_maxmem(int(n), int(r), int(p))
        if maxmem > _MAX_VERIFY_MEM:
            return False
        digest = hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected),
                                maxmem=maxmem)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


#: One dummy hash per work factor (the setting is read per call; a process sees one value).
_dummy_hash: "dict[int, str]" = {}


def _hash_for_timing() -> str:
    """A real scrypt hash to check against when there is no user (or no password): an unknown
    user name then costs the same scrypt work as a known one, so timing tells nothing. It is made
    at the configured ``BALSAM_AUTH_SCRYPT_N``, the N of every hash made since; a user whose hash
    predates a change of the setting costs its own N until the password is set again."""
    n = scrypt_n_from_env()
    if n not in _dummy_hash:
        _dummy_hash[n] = hash_password(secrets.token_urlsafe(16), n)
    return _dummy_hash[n]


def password_problem(password: Any, min_length: int) -> Optional[str]:
    """Why a new password is refused, or None."""
    if not isinstance(password, str) or not password:
        return "field required (a non-empty string)"
    if len(password) < min_length:
        return f"must have at least {min_length} characters"
    if len(password) > 1024:
        return "must have at most 1024 characters"
    return None


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthUser:
    id: int
    username: str
    #: The ``credentials`` row behind the token (None only for tokens built by hand in tests).
    credential_id: Optional[int] = None
    #: Set for site-scoped (launcher) credentials: the one site this token may touch.
    site_id: Optional[int] = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_token(user_id: int, username: str, secret: str, ttl_sec: "int | None" = None, *,
                 credential_id: Optional[int] = None, site_id: Optional[int] = None,
                 expires: "dt.datetime | None" = None) -> tuple[str, dt.datetime]:
    expiration = expires if expires is not None else utcnow() + dt.timedelta(seconds=ttl_sec or 0)
    payload: dict[str, Any] = {"sub": str(user_id), "username": username, "exp": int(expiration.timestamp())}
    if credential_id is not None:
        payload["cid"] = int(credential_id)
    if site_id is not None:
        payload["site"] = int(site_id)
    return jwt.encode(payload, secret, algorithm=ALGORITHM), expiration.replace(microsecond=0)


def decode_token(token: str, secret: str) -> AuthUser:
    try:
        payload = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
        site = payload.get("site")
        cid = payload.get("cid")
        return AuthUser(id=int(payload["sub"]), username=str(payload.get("username", "")),
                        credential_id=int(cid) if cid is not None else None,
                        site_id=int(site) if site is not None else None)
    except jwt.ExpiredSignatureError:
        raise Unauthorized("Token expired: log in again (`balsam login`)") from None
    except (jwt.InvalidTokenError, ValueError, KeyError, TypeError):
        raise Unauthorized("Invalid token: log in again (`balsam login`)") from None


def bearer_user(authorization: str, secret: str) -> AuthUser:
    """The user of an ``Authorization: Bearer`` header value (signature and expiry only)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Not authenticated: send 'Authorization: Bearer <token>' (log in with `balsam login`)")
    user = decode_token(token.strip(), secret)
    if user.credential_id is None:
        raise Unauthorized("Token without a credential id (issued before this server tracked credentials): "
                           "log in again (`balsam login`)")
    return user


#: The site a site-scoped credential is limited to, for the request being handled (set by the
#: route wrapper in the thread that runs the handler; read by the ownership checks).
SITE_SCOPE: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("balsam_site_scope", default=None)


def require_unscoped(user: AuthUser, what: str) -> None:
    if user.site_id is not None:
        raise Forbidden(f"This credential is limited to site {user.site_id} and cannot {what}")


# -- credentials -------------------------------------------------------------------------------


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


#: The longest label of a credential.
MAX_LABEL_CHARS = 200


def printable_label(label: str) -> str:
    """``label`` with every character that is not printable written out as its Python escape
    (``\\x1b``, ``\\r``, ``\\u202e``), at most :data:`MAX_LABEL_CHARS` characters. Labels come from
    any user (a login's ``label``, ``POST /auth/credentials``) and ``balsam server credentials``
    prints them to the administrator's terminal: an escape sequence there could clear the screen,
    rewrite the lines above (hide a credential), set the terminal's title or clipboard."""
    if not label.isprintable():
        label = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in label)
    return label[:MAX_LABEL_CHARS]


def issue_credential(conn: sa.Connection, user_id: int, kind: str, label: str, ttl_sec: float, *,
                     site_id: Optional[int] = None, batch_job_id: Optional[int] = None,
                     with_secret: bool = False) -> tuple[int, dt.datetime, Optional[str]]:
    """Insert a credential row; returns ``(id, expires, code)`` where ``code`` (refresh and
    invitation kinds) is the only copy of the secret, to hand to the client once."""
    assert kind in CREDENTIAL_KINDS
    label = printable_label(label)
    now = utcnow()
    expires = (now + dt.timedelta(seconds=ttl_sec)).replace(microsecond=0)
    secret = secrets.token_urlsafe(32) if with_secret else None
    cred_id = conn.execute(
        sa.insert(credentials).values(
            user_id=user_id, kind=kind, site_id=site_id, batch_job_id=batch_job_id, label=label,
            secret_hash=_secret_hash(secret) if secret else None, created=now, expires=expires,
        ).returning(credentials.c.id)
    ).scalar_one()
    code = None
    if secret is not None:
        prefix = INVITATION_PREFIX if kind == "invitation" else REFRESH_PREFIX
        code = f"{prefix}.{cred_id}.{secret}"
    return cred_id, expires, code


def redeem_code(conn: sa.Connection, code: Any, kind: str) -> sa.Row:
    """The live credential row of a refresh or invitation code (401 if unknown, wrong, revoked
    or expired). The comparison of the secret is constant-time."""
    prefix = INVITATION_PREFIX if kind == "invitation" else REFRESH_PREFIX
    what = "invitation" if kind == "invitation" else "refresh credential"
    parts = code.split(".", 2) if isinstance(code, str) else []
    if len(parts) != 3 or parts[0] != prefix or not parts[1].isdecimal() or len(parts[1]) > 12:
        raise Unauthorized(f"Invalid {what}: log in again (`balsam login`)")
    row = conn.execute(sa.select(credentials).where(credentials.c.id == int(parts[1]))).first()
    expected = row.secret_hash if row is not None and row.secret_hash else _secret_hash("")
    if not hmac.compare_digest(_secret_hash(parts[2]), expected) or row is None or row.kind != kind:
        raise Unauthorized(f"Invalid {what}: log in again (`balsam login`)")
    if row.revoked is not None:
        raise Unauthorized(f"This {what} was revoked: log in again (`balsam login`)")
    if row.expires <= utcnow():
        raise Unauthorized(f"This {what} expired: log in again (`balsam login`)")
    return row


#: The columns :func:`credential_problem` judges, of the credential ``b_cid``.
_CREDENTIAL_STATE = (sa.select(credentials.c.user_id, credentials.c.site_id, credentials.c.expires, credentials.c.revoked)
                     .where(credentials.c.id == sa.bindparam("b_cid")))
#: The same, held ``FOR SHARE`` (PostgreSQL) until the reading transaction ends: a revoke's UPDATE
#: of the row waits for it (see :func:`launcher_credential_problem`).
_CREDENTIAL_STATE_SHARED = _CREDENTIAL_STATE.with_for_update(read=True, of=credentials)


def credential_problem(conn: sa.Connection, user: AuthUser, *, share_lock: bool = False) -> Optional[str]:
    """Why the credential behind a token no longer authorizes anything, or None. ``share_lock``:
    the row is held ``FOR SHARE`` on PostgreSQL until ``conn``'s transaction ends."""
    stmt = _CREDENTIAL_STATE_SHARED if share_lock and conn.dialect.name == "postgresql" else _CREDENTIAL_STATE
    row = conn.execute(stmt, {"b_cid": user.credential_id}).first()
    if row is None or row.user_id != user.id or row.site_id != user.site_id:
        return "This credential no longer exists: log in again (`balsam login`)"
    if row.revoked is not None:
        return f"This credential was revoked at {row.revoked:%Y-%m-%d %H:%M} UTC: log in again (`balsam login`)"
    if row.expires <= utcnow():
        return "This credential expired: log in again (`balsam login`)"
    return None


def launcher_credential_problem(conn: sa.Connection, user: AuthUser, *, share_lock: bool = False) -> Optional[str]:
    """:func:`credential_problem` read inside the caller's write transaction, for a request of a
    launcher (site-scoped) credential that makes or keeps a lease: ``POST /sessions/``, the acquire
    and the tick. None without reading anything for other tokens (user tokens are never
    site-scoped: only ``launcher`` credentials carry a site).

    Why: :class:`CredentialCache` lets another process's revocation take effect only within
    ``ttl_sec``. For most requests that delay is harmless, but a revoked launcher would create
    sessions and lease jobs in it, after :func:`revoke_credentials` had ended its sessions: those
    jobs stayed leased to a launcher that can no longer report until the sessions expired (their
    RUNNING reports then became RUN_TIMEOUT and re-runs). One primary-key read per request, not
    per job; the cache still spares every other request of the launcher.

    Why it holds against a concurrent revoke (which UPDATEs the credential row, then ends the
    sessions of its BatchJob in a later statement, :func:`revoke_credentials`): SQLite runs one
    write transaction at a time, so the request either commits before the revoke starts (whose
    session-ending read then sees its session and leases) or reads the revocation. On PostgreSQL
    (READ COMMITTED, each statement sees what committed before it started):

    - a create (``share_lock``) holds the row ``FOR SHARE``, which the revoke's UPDATE waits for:
      either the create read the row first, and the revoke's session-ending statement starts
      after the create committed and so sees (and ends) the new session; or the revoke updated
      first, and the create's locking read waits for its commit and then reads the revoked row;
    - an acquire or a tick reads the row without a lock, but only after its heartbeat UPDATE
      locked its session (sessions_logic.acquire): if the revoke's ``FOR UPDATE`` of the sessions
      came first, the heartbeat waits for it and finds the session deleted (404); otherwise that
      read waits for the acquire's commit and the revoke then ends the session with the jobs just
      leased. A ``FOR SHARE`` read there would deadlock: a revoke holds the credential then waits
      for the sessions, while an acquire holds its session and would then wait for the credential.
      (A finishing or deleted BatchJob's update revokes its credentials before it ends their
      sessions, routes/batch_jobs.py: the revoke's own order.)
    """
    if user.site_id is None:
        return None
    return credential_problem(conn, user, share_lock=share_lock)


class CredentialCache:
    """Per-process memory of credentials found valid, so that a busy worker checks each one at
    most every ``ttl_sec`` seconds. Revocations made by this process take effect at once; those
    made by another worker (or ``balsam server revoke``) within ``ttl_sec``."""

    def __init__(self, ttl_sec: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_sec = ttl_sec
        self._clock = clock
        self._valid_until: dict[int, float] = {}
        self._lock = threading.Lock()

    def fresh(self, user: AuthUser) -> bool:
        """Whether :meth:`check` would pass from memory alone (no database read): one dict lookup,
        safe on the event loop. A revocation by this process has already removed the entry
        (:meth:`forget`); one by another process is seen within ``ttl_sec``, as by :meth:`check`."""
        cid = user.credential_id
        return cid is not None and self._valid_until.get(cid, 0.0) > self._clock()

    def check(self, conn_factory: Callable[[], Any], user: AuthUser) -> None:
        cid = user.credential_id
        if cid is None:
            raise Unauthorized("Token without a credential id: log in again (`balsam login`)")
        now = self._clock()
        if self._valid_until.get(cid, 0.0) > now:
            return
        with conn_factory() as conn:
            problem = credential_problem(conn, user)
        if problem is not None:
            self.forget([cid])
            raise Unauthorized(problem)
        with self._lock:
            if len(self._valid_until) > 100_000:
                self._valid_until = {k: v for k, v in self._valid_until.items() if v > now}
            self._valid_until[cid] = now + self.ttl_sec

    def forget(self, ids: "list[int]") -> None:
        with self._lock:
            for cid in ids:
                self._valid_until.pop(cid, None)


def revoke_credentials(conn: sa.Connection, where: sa.ColumnElement[bool]) -> list[sa.Row]:
    """Revoke the live credentials matching ``where``; launcher ones also end the sessions of
    their BatchJob (its RUNNING jobs become RUN_TIMEOUT and are run again): nothing stays leased
    to a launcher that can no longer report. The credentials first, their sessions in a later
    statement: a request of the launcher that another process's cache still trusts either
    commits before that statement (which then ends what it made) or reads the revocation
    (:func:`launcher_credential_problem`). Returns the revoked rows."""
    rows = list(conn.execute(
        sa.update(credentials).where(where, credentials.c.revoked.is_(None)).values(revoked=utcnow())
        .returning(credentials.c.id, credentials.c.kind, credentials.c.batch_job_id)
    ))
    batch_jobs = sorted({r.batch_job_id for r in rows if r.kind == "launcher" and r.batch_job_id is not None})
    if batch_jobs:
        # Imported here: the routes import this module.
        from .routes.batch_jobs import end_batch_job_sessions

        end_batch_job_sessions(conn, batch_jobs)
    return rows


# -- retention of ended credentials ---------------------------------------------------------------

#: Rows one statement of :func:`sweep_ended_credentials` deletes at most (one short transaction each).
CREDENTIAL_SWEEP_BATCH = 1000
#: Statements one background sweep runs at most: a backlog (a server upgraded after months) is
#: worked off over several sweeps, never in one long transaction.
CREDENTIAL_SWEEP_MAX_BATCHES = 20


#: BatchJob states with no way out (:data:`balsam.states.BATCH_JOB_TRANSITIONS`): no launcher of
#: theirs starts any more, so their launcher credentials are not kept past their expiry.
_ENDED_BATCH_JOB_STATES = sorted(state.value for state, after in BATCH_JOB_TRANSITIONS.items() if not after)


def _ended_batch(cutoff: dt.datetime, batch_rows: int) -> sa.Delete:
    """Delete up to ``batch_rows`` credentials that ended (revoked, or expired) before ``cutoff``.

    The rows are chosen ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite renders no lock clause and
    runs one write transaction at a time): a row some request holds is left to the next sweep.

    An unrevoked launcher credential of a BatchJob that exists and has not ended (a state with
    no way out: finished, submit_failed) never counts as ended, however long ago it expired: the
    agent renews it (an expired one too) while the BatchJob waits in the queue, and its launcher
    starts with it. Deleted, a BatchJob queued while its agent was down longer than its queue
    allowance plus the retention lost its allocation (the renewal answered 404, the launcher's
    token 401). Such a credential is revoked when its BatchJob finishes or is deleted
    (:func:`revoke_credentials`; a deleted one's ``batch_job_id`` is also set NULL), and is then
    swept as any other ended credential."""
    batch_job_live = sa.exists().where(batch_jobs.c.id == credentials.c.batch_job_id,
                                       batch_jobs.c.state.not_in(_ENDED_BATCH_JOB_STATES))
    kept_for_its_batch_job = sa.and_(credentials.c.kind == "launcher", credentials.c.revoked.is_(None),
                                     credentials.c.batch_job_id.is_not(None), batch_job_live)
    ended = sa.or_(credentials.c.revoked < cutoff,
                   sa.and_(credentials.c.expires < cutoff, sa.not_(kept_for_its_batch_job)))
    # OF credentials: the BatchJob is only read (its finish revokes the credential, which the
    # DELETE's re-check below then sees either way); locking it would put the sweep in the lock order.
    chosen = (sa.select(credentials.c.id).where(ended).order_by(credentials.c.id).limit(batch_rows)
              .with_for_update(skip_locked=True, of=credentials))
    # ``ended`` again in the DELETE: PostgreSQL re-checks it against a row changed after the
    # subquery read it (a renewal that committed in between keeps its row).
    return sa.delete(credentials).where(credentials.c.id.in_(chosen.scalar_subquery()), ended)


def sweep_ended_credentials(engine: sa.Engine, retention_sec: float, *, now: "dt.datetime | None" = None,
                            batch_rows: int = CREDENTIAL_SWEEP_BATCH, max_batches: "int | None" = None) -> int:
    """Delete the credentials that ended (revoked, or expired) more than ``retention_sec`` ago
    (``BALSAM_AUTH_CREDENTIAL_RETENTION_SEC``): up to ``batch_rows`` per statement, each statement
    its own write transaction, until fewer are left or ``max_batches`` statements ran. Returns the
    rows deleted. Until then an ended credential stays listed (``balsam server credentials --all``,
    ``GET /auth/credentials``) for audit. An unrevoked launcher credential of a BatchJob that has
    not finished is never deleted, expired or not (:func:`_ended_batch` says why).

    Why: one launcher credential per BatchJob and one per login, never deleted, were hundreds of
    thousands of rows after months at a busy site, every one of a user's visited by their listing
    of live credentials (``active=true``: ``user_id`` index, then the state of each row) and by a
    password reset's revoke (benchmarks/credential_retention.py).

    Why it is race-free with requests that use, renew or revoke a credential right then:

    - a token is accepted only while its row exists, is not revoked and has not expired
      (:func:`credential_problem`); a deleted row refuses the token as a revoked one does
      ("no longer exists"). The sweep deletes only rows that ended at least ``retention_sec``
      (an hour at the least, :mod:`balsam.server.settings`) before it started, so no request that
      read its credential live (expiry in the future) can have its row deleted under it: a
      request's transaction does not last an hour. A process's :class:`CredentialCache` trusts a
      verdict for seconds, and a JWT carries the credential's expiry: neither outlives the row.
    - the one write that makes an ended credential live again is a launcher credential's renewal
      (``POST /auth/credentials/{id}/renew``, which extends an expired one): it reads its row
      ``FOR UPDATE`` first (routes/auth.py). If the renewal holds the row, the sweep skips it
      (``SKIP LOCKED``) and the DELETE's own condition is re-checked against the renewed row
      anyway; if the sweep holds it, the renewal's read waits, then finds no row: 404, as for any
      credential deleted meanwhile. A refresh exchange and a revoke change only rows that are live
      (refresh) or not revoked yet (revoke: its ``UPDATE ... WHERE revoked IS NULL`` re-checks a
      row the sweep deleted and skips it).
    - the sweep never waits for a row (``SKIP LOCKED``) and locks nothing but credentials, in
      id order, one statement per transaction: no lock cycle with the transactions of the lock
      order in :mod:`balsam.server.sessions_logic` (BatchJobs, then credentials, then sessions).
    """
    cutoff = (now or utcnow()) - dt.timedelta(seconds=retention_sec)
    stmt = _ended_batch(cutoff, batch_rows)
    deleted = batches = 0
    while max_batches is None or batches < max_batches:
        with write_tx(engine) as conn:
            count = int(conn.execute(stmt).rowcount or 0)
        deleted += count
        batches += 1
        if count < batch_rows:
            break
    return deleted


# -- password logins -------------------------------------------------------------------------


class LoginThrottle:
    """Failed password logins in a sliding window of ``window_sec``, counted three ways.

    - per **user name and client address** (``max_per_user``): the pair that failed that often is
      refused (429) until its failures age out. Failures at another address never count here.
    - per **client address** over all user names (``max_per_address``): beyond it the address is
      *restricted*: a user name not known there (see below) gets one failed try per window from
      it; beyond ``ADDRESS_HARD_FACTOR`` x ``max_per_address`` failures, every user name not
      known there is refused outright, so one address never makes more than that many failing
      password checks per window, whatever the number of user names it sprays.
    - per **user name** over all addresses: beyond ``account_soft`` (default 5 x the per-user
      limit) every address not known for the user is restricted for it as above; beyond
      ``account_hard`` (default 20 x) only known addresses may try it.

    An address is *known* for a user once the user logged in there with the right password (or
    used a refresh credential there: :meth:`remember`) in the last ``known_address_sec``. Known
    addresses keep the per-user limit whatever the address's or the account's failures; this is
    the only guarantee against a third party: past ``account_hard`` failures (about 155 addresses
    at the defaults), the user is refused at every address not known for them. IPv6 addresses
    count per /64 prefix (one host usually has a whole /64).

    A limit of 0 switches off that limit only (the account limits then derive from the default
    per-user limit of 10). In memory, per server process: with N workers an attacker gets up to N
    times the limits, and known addresses are forgotten when the process restarts. At most
    ``MAX_KEYS`` counters (a few hundred bytes each) and ``MAX_KEYS`` known addresses are kept,
    the least recently used forgotten first.
    """

    #: Failed tries per window of a user name from an address not known for it, once the address
    #: or the account is over its (soft) limit.
    RESTRICTED_TRIES = 1
    #: An address refuses user names not known there beyond this many x ``max_per_address``.
    ADDRESS_HARD_FACTOR = 4
    #: The per-user limit the account limits derive from when ``max_per_user`` is 0.
    DEFAULT_PER_USER = 10
    #: Counters (and known addresses) kept at most.
    MAX_KEYS = 100_000
    #: The window is counted in this many slots: a failure is forgotten between ``window_sec``
    #: and ``window_sec * (1 + 1/SLOTS)`` after it happened.
    SLOTS = 10

    def __init__(self, max_per_user: int, max_per_address: int, window_sec: float,
                 clock: Callable[[], float] = time.monotonic, *, account_soft: Optional[int] = None,
                 account_hard: Optional[int] = None, known_address_sec: float = 30 * 24 * 3600) -> None:
        self.max_per_user = max(0, max_per_user)
        self.max_per_address = max(0, max_per_address)
        self.window_sec = window_sec
        base = self.max_per_user or self.DEFAULT_PER_USER
        self.account_soft = 5 * base if account_soft is None else max(0, account_soft)
        self.account_hard = 20 * base if account_hard is None else max(0, account_hard)
        self.address_hard = self.ADDRESS_HARD_FACTOR * self.max_per_address
        self.known_address_sec = known_address_sec
        self._clock = clock
        self._slot_sec = max(window_sec, 1e-9) / self.SLOTS
        # key -> array: [newest slot number, counts of slots newest-SLOTS .. newest in a ring].
        self._failures: "collections.OrderedDict[str, array.array]" = collections.OrderedDict()
        self._known: "collections.OrderedDict[str, float]" = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def address_key(address: str) -> str:
        """The throttle's key of a client address: IPv6 by its /64, IPv4-mapped IPv6 as IPv4."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    @staticmethod
    def _pair(username: str, address: str) -> str:
        return f"p:{address}\x00{username}"

    def _slot(self, now: float) -> int:
        return int(now // self._slot_sec)

    def _count(self, key: str, now: float) -> "tuple[int, list[int]]":
        """Failures of ``key`` still counted, and the counts per slot oldest first."""
        counts = self._failures.get(key)
        if counts is None:
            return 0, []
        slot, ring = self._slot(now), self.SLOTS + 1
        newest = counts[0]
        per_slot = [counts[1 + s % ring] if slot - self.SLOTS <= s <= newest else 0
                    for s in range(slot - self.SLOTS, slot + 1)]
        return sum(per_slot), per_slot

    def _wait(self, key: str, limit: int, now: float) -> float:
        """Seconds until fewer than ``limit`` failures of ``key`` are counted (0: already)."""
        if limit <= 0:
            return 0.0
        total, per_slot = self._count(key, now)
        if total < limit:
            return 0.0
        first = self._slot(now) - self.SLOTS
        for i, n in enumerate(per_slot):
            total -= n
            if total < limit:  # once slot first + i is forgotten: at the start of slot first+i+SLOTS+1
                return (first + i + self.SLOTS + 1) * self._slot_sec - now
        return self.window_sec  # not reached

    def _is_known(self, username: str, address: str, now: float) -> bool:
        seen = self._known.get(self._pair(username, address))
        return seen is not None and seen > now - self.known_address_sec

    def retry_after(self, username: str, address: str) -> Optional[float]:
        """Seconds until this user name may be tried from this address, or None if it may now."""
        now = self._clock()
        address = self.address_key(address)
        with self._lock:
            pair_key, address_key, account_key = self._pair(username, address), f"a:{address}", f"u:{username}"
            if self._is_known(username, address, now):
                wait = self._wait(pair_key, self.max_per_user, now)
            else:
                by_address, _ = self._count(address_key, now)
                by_account, _ = self._count(account_key, now)
                restricted = ((self.max_per_address > 0 and by_address >= self.max_per_address)
                              or (self.account_soft > 0 and by_account >= self.account_soft))
                limit = self.max_per_user
                if restricted:
                    limit = min(limit, self.RESTRICTED_TRIES) if limit > 0 else self.RESTRICTED_TRIES
                wait = max(self._wait(pair_key, limit, now),
                           self._wait(address_key, self.address_hard, now),
                           self._wait(account_key, self.account_hard, now))
        return wait if wait > 0 else None

    def record_failure(self, username: str, address: str) -> None:
        now = self._clock()
        address = self.address_key(address)
        slot, ring = self._slot(now), self.SLOTS + 1
        with self._lock:
            for key in (self._pair(username, address), f"a:{address}", f"u:{username}"):
                counts = self._failures.get(key)
                if counts is None:
                    counts = self._failures[key] = array.array("q", [slot] + [0] * ring)
                elif counts[0] < slot:  # clear the slots between the newest one and this one
                    for s in range(max(counts[0] + 1, slot - self.SLOTS), slot + 1):
                        counts[1 + s % ring] = 0
                    counts[0] = slot
                counts[1 + slot % ring] += 1
                self._failures.move_to_end(key)
            while len(self._failures) > self.MAX_KEYS:
                self._failures.popitem(last=False)

    def remember(self, username: str, address: str) -> None:
        """Remember ``address`` as one ``username`` uses (a right password, a refresh credential)."""
        now = self._clock()
        key = self._pair(username, self.address_key(address))
        with self._lock:
            self._known[key] = now
            self._known.move_to_end(key)
            while len(self._known) > self.MAX_KEYS:
                self._known.popitem(last=False)

    def record_success(self, username: str, address: str) -> None:
        """A right password: forget this user name's failures from this address, and remember it."""
        with self._lock:
            self._failures.pop(self._pair(username, self.address_key(address)), None)
        self.remember(username, address)


def refuse_if_throttled(throttle: LoginThrottle, username: str, address: str) -> None:
    """429 with Retry-After if :class:`LoginThrottle` says this user name may not be tried from
    this address for now (before any password is checked or the database is asked)."""
    wait = throttle.retry_after(username, address)
    if wait is not None:
        raise TooManyRequests(f"Too many failed logins; try again in {int(wait) + 1} s", wait)


def _check_login_row(row: Any, throttle: LoginThrottle, username: str, password: str, address: str,
                     only_user: Optional[str]) -> int:
    stored = row.hashed_password if row is not None and row.hashed_password else None
    ok = verify_password(password, stored or _hash_for_timing()) and stored is not None
    if ok and only_user is not None and username != only_user:
        ok = False
    if not ok:
        throttle.record_failure(username, address)
        raise Unauthorized(LOGIN_FAILED)
    throttle.record_success(username, address)
    return row.id


def _login_row(conn: sa.Connection, username: str) -> Any:
    return conn.execute(sa.select(users.c.id, users.c.hashed_password).where(users.c.username == username)).first()


def check_password_login(conn: sa.Connection, throttle: LoginThrottle, username: str, password: str,
                         address: str, *, only_user: Optional[str] = None) -> int:
    """The id of the user whose password this is; else 401 (wrong user name or password, said
    the same way), or 429 with Retry-After once :class:`LoginThrottle` says this user name may not
    be tried from this address for now. One scrypt computation in every case (but a 429, which
    costs none)."""
    refuse_if_throttled(throttle, username, address)
    return _check_login_row(_login_row(conn, username), throttle, username, password, address, only_user)


def password_login(open_read: Callable[[], Any], throttle: LoginThrottle, username: str, password: str,
                   address: str, *, only_user: Optional[str] = None) -> int:
    """:func:`check_password_login` that holds a database connection (``open_read()``, a context
    manager) only to read the user's hash, not during the scrypt check (~40 ms at the default N), and asks the
    database nothing for a throttled attempt."""
    refuse_if_throttled(throttle, username, address)
    with open_read() as conn:
        row = _login_row(conn, username)
    return _check_login_row(row, throttle, username, password, address, only_user)


def authenticate_password(conn: sa.Connection, username: str, password: str, *, throttle: LoginThrottle,
                          address: str, only_user: Optional[str] = None) -> AuthUser:
    """:func:`check_password_login` for login forms that want the user (the dashboard's)."""
    return AuthUser(id=check_password_login(conn, throttle, username, password, address, only_user=only_user),
                    username=username)


#: :func:`client_address` of a request whose address uvicorn took from ``X-Forwarded-For`` while
#: ``BALSAM_TRUSTED_PROXIES`` is unset: all such requests share this one address (and its limits).
UNVERIFIED_FORWARDED = "forwarded-unverified"


def _forwarded_hosts(values: "list[str]") -> "set[str]":
    """Every client address uvicorn may have taken from these ``X-Forwarded-For`` values: each
    item as it is (uvicorn keeps a value it cannot split into host and port whole, e.g.
    ``198.51.100.7:x1`` or ``[198.51.100.7]x1``), and its host without brackets or port."""
    hosts = set()
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            hosts.add(item)
            if item.startswith("["):
                hosts.add(item[1:].partition("]")[0])
            elif item.count(":") == 1:
                hosts.add(item.partition(":")[0])
    return hosts


def client_address(request: Any) -> str:
    """The client's address as uvicorn reports it.

    ``python -m balsam.server`` and the embedded server run uvicorn without proxy headers unless
    ``BALSAM_TRUSTED_PROXIES`` names the proxies (then uvicorn takes the client from their
    ``X-Forwarded-For``). uvicorn started by hand trusts ``X-Forwarded-For`` from 127.0.0.1 by
    default, which anybody on the host (or with an SSH tunnel) could forge: while
    ``BALSAM_TRUSTED_PROXIES`` is unset, an address that uvicorn took from that header is
    replaced by :data:`UNVERIFIED_FORWARDED`, one address for all such requests."""
    client = getattr(request, "client", None)
    host = getattr(client, "host", None) or "unknown"
    try:
        settings = request.app.state.settings
    except (AttributeError, KeyError):
        settings = None
    if not getattr(settings, "trusted_proxies", None):
        headers = getattr(request, "headers", None)
        forwarded = headers.getlist("x-forwarded-for") if headers is not None else []
        if forwarded and host in _forwarded_hosts(forwarded):
            return UNVERIFIED_FORWARDED
    return host
