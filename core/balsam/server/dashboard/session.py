"""Dashboard sessions: a signed, expiring cookie per browser login, CSRF tokens bound to it.

Each login (the password form or a one-time link) makes a ``dashboard`` credential (a row of
``credentials``, like every token the server hands out: see :mod:`balsam.server.auth`), whose id the
cookie carries (``cid``); every page checks it through the server's credential cache, as the API
checks a bearer token. So revoking it (``balsam server revoke --user``, ``--id``, ``DELETE
/auth/credentials/{id}``), a new password (``balsam server set-password``, which revokes the user's
dashboard credentials) or logging out ends the session within ``BALSAM_AUTH_REVOCATION_CACHE_SEC``
(at once in the worker that revoked it); a cookie without a ``cid`` (made before this) is refused.
The credential expires with the session's maximum age.

The session cookie is a JWT (HS256, the server's signing key) with the audience
``balsam-dashboard``: an API bearer token (no audience) is refused as a cookie, and a session cookie
(with an audience) is refused as a bearer token by :func:`balsam.server.auth.decode_token`, so neither
can stand in for the other. The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Lax`` (not sent
with cross-site POSTs) and ``Secure`` when the request came over HTTPS.

Every form POST carries a CSRF token: an HMAC of the session's random id (``sid``) under the signing
key, compared in constant time. The login form, which has no session yet, uses a signed random nonce
that is both a cookie and a hidden field (double submit). One-time login links (``balsam dashboard``)
carry a ticket: a JWT with the audience ``balsam-dashboard-ticket`` valid for two minutes, and a
random nonce that :func:`redeem_ticket` accepts once (a row in ``dashboard_tickets``, so that the
link works once across all the server's worker processes, not once per process).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Optional

import jwt
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..auth import ALGORITHM, AuthUser
from ..tables import UTCDateTime, dashboard_tickets

SESSION_COOKIE = "balsam_dashboard"
LOGIN_COOKIE = "balsam_dashboard_login"
SESSION_AUDIENCE = "balsam-dashboard"
TICKET_AUDIENCE = "balsam-dashboard-ticket"
TICKET_TTL_SEC = 120
#: The width of ``dashboard_tickets.nonce``; the server's nonces have 22 characters.
NONCE_MAX_CHARS = 64


@dataclass(frozen=True)
class DashboardSession:
    user: AuthUser
    sid: str
    expires: int  # unix time
    login_time: int  # unix time of the login: renewals never carry the session past login + max age

    @property
    def credential_id(self) -> Optional[int]:
        """The id of the session's ``dashboard`` credential (None: a cookie no page accepts)."""
        return self.user.credential_id

    def csrf_token(self, secret: str) -> str:
        return _mac(secret, f"csrf|{self.sid}")


def _mac(secret: str, message: str) -> str:
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _now() -> int:
    return int(dt.datetime.now(dt.timezone.utc).timestamp())


def issue_session(user: AuthUser, secret: str, ttl_sec: int) -> tuple[str, DashboardSession]:
    """A new session for ``user`` (its ``credential_id``: the session's ``dashboard`` credential):
    the cookie value and the session it encodes."""
    now = _now()
    session = DashboardSession(user=user, sid=secrets.token_urlsafe(16), expires=now + ttl_sec, login_time=now)
    return _encode(session, secret), session


def renew_session(session: DashboardSession, secret: str, ttl_sec: int, max_age_sec: int) -> Optional[str]:
    """A fresh cookie (same sid, so open forms stay valid) once half the lifetime has passed, never
    valid past ``login_time + max_age_sec``: a cookie kept in use (or stolen and kept in use) still
    ends, and its user logs in again."""
    now = _now()
    if session.expires - now > ttl_sec / 2:
        return None
    expires = min(now + ttl_sec, session.login_time + max_age_sec)
    if expires <= session.expires:
        return None
    return _encode(DashboardSession(session.user, session.sid, expires, session.login_time), secret)


def _encode(session: DashboardSession, secret: str) -> str:
    payload: dict[str, Any] = {"sub": str(session.user.id), "username": session.user.username, "sid": session.sid,
                               "exp": session.expires, "aud": SESSION_AUDIENCE, "auth_time": session.login_time}
    if session.user.credential_id is not None:
        payload["cid"] = int(session.user.credential_id)
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def read_session(cookie: Optional[str], secret: str) -> Optional[DashboardSession]:
    """The session in a cookie value, or None when absent, forged, expired or not a session cookie."""
    if not cookie:
        return None
    try:
        payload = jwt.decode(cookie, secret, algorithms=[ALGORITHM], audience=SESSION_AUDIENCE,
                             options={"require": ["exp", "sub", "aud", "sid", "auth_time"]})
        cid = payload.get("cid")
        user = AuthUser(id=int(payload["sub"]), username=str(payload.get("username", "")),
                        credential_id=int(cid) if cid is not None else None)
        return DashboardSession(user=user, sid=str(payload["sid"]), expires=int(payload["exp"]),
                                login_time=int(payload["auth_time"]))
    except (jwt.InvalidTokenError, ValueError, KeyError, TypeError):
        return None


def check_csrf(session: DashboardSession, secret: str, submitted: Optional[str]) -> bool:
    return bool(submitted) and hmac.compare_digest(session.csrf_token(secret), str(submitted))


def new_login_nonce(secret: str) -> str:
    """The login form's anti-CSRF value: a random nonce and its MAC (cookie and hidden field)."""
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{_mac(secret, 'login|' + nonce)}"


def check_login_nonce(secret: str, cookie: Optional[str], submitted: Optional[str]) -> bool:
    if not cookie or not submitted or not hmac.compare_digest(cookie, submitted):
        return False
    nonce, _, mac = cookie.partition(".")
    return bool(nonce) and hmac.compare_digest(mac, _mac(secret, "login|" + nonce))


@dataclass(frozen=True)
class Ticket:
    """A valid (signed, unexpired) login ticket; :func:`redeem_ticket` says whether it is still unused."""

    user: AuthUser
    nonce: str
    expires: int  # unix time


def issue_ticket(user: AuthUser, secret: str) -> str:
    """A short-lived login ticket for a one-time link (``balsam dashboard``)."""
    payload = {"sub": str(user.id), "username": user.username, "exp": _now() + TICKET_TTL_SEC,
               "aud": TICKET_AUDIENCE, "nonce": secrets.token_urlsafe(16)}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def read_ticket(ticket: Optional[str], secret: str) -> Optional[Ticket]:
    """The ticket in a link, or None when absent, forged, expired or not a ticket."""
    if not ticket:
        return None
    try:
        payload = jwt.decode(ticket, secret, algorithms=[ALGORITHM], audience=TICKET_AUDIENCE,
                             options={"require": ["exp", "sub", "aud", "nonce"]})
        user = AuthUser(id=int(payload["sub"]), username=str(payload.get("username", "")))
        nonce = payload["nonce"]
        if not isinstance(nonce, str) or not 1 <= len(nonce) <= NONCE_MAX_CHARS:
            return None
        return Ticket(user=user, nonce=nonce, expires=int(payload["exp"]))
    except (jwt.InvalidTokenError, ValueError, KeyError, TypeError):
        return None


def _redeem_stmt(insert: Any) -> Any:
    return (insert(dashboard_tickets)
            .values(nonce=sa.bindparam("b_nonce"), expires=sa.bindparam("b_expires", type_=UTCDateTime()))
            .on_conflict_do_nothing(index_elements=["nonce"]))


_REDEEM = {"postgresql": _redeem_stmt(postgresql.insert), "sqlite": _redeem_stmt(sqlite.insert)}


def redeem_ticket(conn: sa.Connection, ticket: Ticket) -> bool:
    """True the first time ``ticket`` is redeemed, False ever after (call in a write transaction).

    The nonce's insert does nothing when the row exists: a second use finds it whichever server
    process the link reaches (on PostgreSQL a concurrent second insert waits for the first
    transaction and then does nothing; SQLite serializes write transactions). Rows of tickets past
    their expiry are deleted here, on the way: ``read_ticket`` refuses those tickets anyway. A
    ticket whose expiry has come is refused here too, so that purging its row can never make it
    usable again.
    """
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    expires = dt.datetime.fromtimestamp(ticket.expires, dt.timezone.utc)
    if expires <= now:
        return False
    conn.execute(sa.delete(dashboard_tickets).where(dashboard_tickets.c.expires <= now))
    inserted = conn.execute(_REDEEM["postgresql" if conn.dialect.name == "postgresql" else "sqlite"],
                            {"b_nonce": ticket.nonce, "b_expires": expires}).rowcount
    return bool(inserted)
