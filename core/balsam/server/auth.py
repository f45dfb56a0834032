"""Password hashing (scrypt KDF) and signed, expiring access tokens (JWT, HS256)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass

import jwt
import sqlalchemy as sa

from .errors import Unauthorized
from .tables import users

# scrypt parameters (RFC 7914 recommendation for interactive logins: N=2**14, r=8, p=1).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _DKLEN = 2**14, 8, 1, 32
ALGORITHM = "HS256"


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_DKLEN)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: "str | None") -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True)
class AuthUser:
    id: int
    username: str


def authenticate_password(conn: sa.Connection, username: str, password: str) -> AuthUser:
    """The server's one password check, shared by the API login and the dashboard's login form.

    Raises :class:`Unauthorized` (one message for an unknown user and a wrong password)."""
    row = conn.execute(sa.select(users.c.id, users.c.hashed_password).where(users.c.username == username)).first()
    if row is None or not verify_password(password, row.hashed_password):
        raise Unauthorized("Incorrect username or password")
    return AuthUser(id=row.id, username=username)


def create_token(user_id: int, username: str, secret: str, ttl_sec: int) -> tuple[str, dt.datetime]:
    expiration = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=ttl_sec)
    payload = {"sub": str(user_id), "username": username, "exp": int(expiration.timestamp())}
    return jwt.encode(payload, secret, algorithm=ALGORITHM), expiration.replace(microsecond=0)


def decode_token(token: str, secret: str) -> AuthUser:
    try:
        payload = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
        return AuthUser(id=int(payload["sub"]), username=str(payload.get("username", "")))
    except jwt.ExpiredSignatureError:
        raise Unauthorized("Token expired: log in again (`balsam login`)") from None
    except (jwt.InvalidTokenError, ValueError, KeyError):
        raise Unauthorized("Invalid token: log in again (`balsam login`)") from None
