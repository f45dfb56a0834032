"""/auth: login methods, password login and registration, refresh, logout, credentials.

See :mod:`balsam.server.auth` for the kinds of credentials and how tokens are checked.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qs

import sqlalchemy as sa
from starlette.responses import Response

from balsam.states import BatchJobState

from ..auth import (
    CREDENTIAL_KINDS,
    client_address,
    create_token,
    hash_password,
    issue_credential,
    password_login,
    password_problem,
    redeem_code,
    revoke_credentials,
    utcnow,
)
from ..db import count_and_page
from ..errors import (APIError, BadRequest, Conflict, Forbidden, NotFound, Refusal, Unauthorized, ValidationFailed,
                      missing_answers, refusals_answered)
from ..http import PAGINATION, is_json_int, json_response, no_content, pagination, reject_nul, wire_datetime
from ..jobs_logic import site_owned_by
from ..routing import Ctx, route
from ..tables import batch_jobs, credentials, sites, users

#: A user name, matched with ``fullmatch`` (``$`` would also match before a final newline, and
#: "alice\n" would register beside "alice").
USERNAME_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,150}")
USERNAME_RULE = "1-150 characters from letters, digits and _.@+-"
#: Form/JSON fields of a login: 0.7 clients also send OAuth2's grant_type, client_id and client_secret.
LOGIN_FIELDS = {"username", "password", "grant_type", "scope", "client_id", "client_secret", "label"}
CREDENTIAL_FIELDS = ["id", "kind", "label", "site_id", "batch_job_id", "created", "expires", "last_used", "revoked"]


def how(ctx: Ctx) -> Response:
    return json_response([f"LoginMethod.{m}" for m in ctx.settings.login_methods])


def _form_or_json(ctx: Ctx, allowed: "set[str]") -> dict[str, Any]:
    """Form fields (0.7 clients send an OAuth2 password form); JSON bodies are accepted too."""
    content_type = ctx.request.headers.get("content-type", "")
    body = ctx.body or b""
    if "application/json" in content_type:
        data = ctx.json()
        if not isinstance(data, dict):
            raise ValidationFailed.field(["body"], "expected a JSON object")
    else:
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        data = {k: v[-1] for k, v in parsed.items()}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationFailed((["body", k], "unknown field") for k in unknown)
    wrong = sorted(k for k, v in data.items() if v is not None and not isinstance(v, str))
    if wrong:
        raise ValidationFailed((["body", k], "expected a string") for k in wrong)
    reject_nul(data, ["body"])
    return data


def _required(data: dict[str, Any], *names: str) -> None:
    missing = [name for name in names if not data.get(name)]
    if missing:
        raise ValidationFailed((["body", name], "field required") for name in missing)


def _token_response(ctx: Ctx, user_id: int, username: str, credential_id: int, expires: dt.datetime,
                    site_id: "int | None" = None) -> dict[str, Any]:
    token, expiration = create_token(user_id, username, ctx.settings.secret_key, credential_id=credential_id,
                                     site_id=site_id, expires=expires)
    return {"access_token": token, "token_type": "bearer", "expiration": wire_datetime(expiration)}


def login(ctx: Ctx) -> Response:
    """A password login. With ``scope=offline_access`` (our ``balsam login``) the answer also
    holds a refresh credential and the access token is short-lived; without (Balsam 0.7 clients)
    the access token itself lives ``BALSAM_AUTH_TOKEN_TTL_SEC``."""
    if "password" not in ctx.settings.login_methods:
        raise BadRequest("password login is not enabled on this server")
    data = _form_or_json(ctx, LOGIN_FIELDS)
    _required(data, "username", "password")
    username, password = data["username"], data["password"]
    address = client_address(ctx.request)
    settings = ctx.settings
    # A read transaction only to fetch the hash: no connection is held during the scrypt check,
    # nor for an attempt the throttle refuses.
    user_id = password_login(ctx.read, ctx.request.app.state.login_throttle, username, password, address,
                             only_user=settings.only_user)
    with ctx.write() as conn:
        label = (data.get("label") or f"password login from {address}")[:200]
        if "offline_access" in (data.get("scope") or "").split():
            refresh_id, refresh_expires, code = issue_credential(conn, user_id, "refresh", label,
                                                                 settings.refresh_ttl_sec, with_secret=True)
            access_expires = min(refresh_expires, utcnow() + dt.timedelta(seconds=settings.access_ttl_sec))
            body = _token_response(ctx, user_id, username, refresh_id, access_expires)
            body.update(refresh_token=code, refresh_expiration=wire_datetime(refresh_expires))
        else:
            cred_id, expires, _ = issue_credential(conn, user_id, "login", label, settings.token_ttl_sec)
            body = _token_response(ctx, user_id, username, cred_id, expires)
    return json_response(body)


def refresh(ctx: Ctx) -> Response:
    """``grant_type=refresh_token&refresh_token=bsr1...`` -> a fresh access token; the refresh
    credential's expiry slides to now + ``BALSAM_AUTH_REFRESH_TTL_SEC``."""
    data = _form_or_json(ctx, {"grant_type", "refresh_token", "scope", "client_id", "client_secret"})
    _required(data, "refresh_token")
    if data.get("grant_type") not in (None, "", "refresh_token"):
        raise ValidationFailed.field(["body", "grant_type"], "expected refresh_token")
    settings = ctx.settings
    with ctx.write() as conn:
        row = redeem_code(conn, data["refresh_token"], "refresh")
        user = conn.execute(sa.select(users.c.username).where(users.c.id == row.user_id)).first()
        if user is None or (settings.only_user is not None and user.username != settings.only_user):
            raise Unauthorized("This credential's user no longer exists")
        now = utcnow()
        expires = max(row.expires, (now + dt.timedelta(seconds=settings.refresh_ttl_sec)).replace(microsecond=0))
        conn.execute(sa.update(credentials).where(credentials.c.id == row.id).values(expires=expires, last_used=now))
    # The user works from this address: failed logins elsewhere do not lock them out of it.
    ctx.request.app.state.login_throttle.remember(user.username, client_address(ctx.request))
    access_expires = min(expires, now + dt.timedelta(seconds=settings.access_ttl_sec))
    body = _token_response(ctx, row.user_id, user.username, row.id, access_expires)
    body["refresh_expiration"] = wire_datetime(expires)
    return json_response(body)


def register(ctx: Ctx) -> Response:
    """Create a user (``BALSAM_AUTH_REGISTRATION=open``), or set the password of an invited one
    (``invitation`` code from ``balsam server user invite``, whatever the registration setting).
    Closed by default."""
    settings = ctx.settings
    if "password" not in settings.login_methods:
        raise BadRequest("password registration is not enabled on this server")
    data = ctx.json()
    invitation = data.get("invitation") if isinstance(data, dict) else None
    # An invitation is how an administrator adds accounts while registration is closed: only
    # registrations without one are refused.
    if settings.registration == "closed" and not invitation:
        raise Forbidden("Registration is closed on this server: ask its administrator for an account "
                        "(`balsam server user add` or `balsam server user invite`)")
    if not isinstance(data, dict):
        raise ValidationFailed.field(["body"], "expected a JSON object with username and password")
    errors = []
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        errors.append((["body", "username"], f"required: {USERNAME_RULE}"))
    problem = password_problem(password, settings.min_password_length)
    if problem:
        errors.append((["body", "password"], problem))
    if invitation is not None and not isinstance(invitation, str):
        errors.append((["body", "invitation"], "expected a string"))
    extra = sorted(set(data) - {"username", "password", "invitation"})
    errors.extend((["body", key], "unknown field") for key in extra)
    if errors:
        raise ValidationFailed(errors)
    if settings.only_user is not None and username != settings.only_user:
        raise Forbidden(f"This server serves only its local user {settings.only_user!r}")
    if settings.registration == "invitation" and not invitation:
        raise Forbidden("Registration needs an invitation on this server (`balsam register` asks for its code)")
    hashed = hash_password(password)

    def taken(refusal: Refusal) -> "APIError | None":
        # Registered by a concurrent request between the check below and the INSERT (PostgreSQL):
        # the answer of the check, not the unique key's text.
        return Conflict(f"Username {username!r} already taken") if refusal.kind == "duplicate" else None

    with refusals_answered(taken), ctx.write() as conn:
        if invitation:
            row = redeem_code(conn, invitation, "invitation")
            invited = conn.execute(sa.select(users.c.username).where(users.c.id == row.user_id)).scalar_one()
            if invited != username:
                raise Unauthorized("Invalid invitation: log in again (`balsam login`)")
            # An invitation sets a new user's first password, never replaces one: an older code
            # left unused must not take over the account. The condition is in the UPDATE so that
            # two redemptions at once cannot both set it.
            updated = conn.execute(
                sa.update(users).where(users.c.id == row.user_id,
                                       sa.or_(users.c.hashed_password.is_(None), users.c.hashed_password == ""))
                .values(hashed_password=hashed)
            ).rowcount
            if updated != 1:
                raise Conflict(f"User {username!r} already has a password: log in with it (`balsam login`)")
            # Used once: this code and any other pending invitation of the user.
            revoke_credentials(conn, sa.and_(credentials.c.user_id == row.user_id, credentials.c.kind == "invitation"))
            return json_response({"id": row.user_id, "username": username}, 201)
        exists = conn.execute(sa.select(users.c.id).where(users.c.username == username)).first()
        if exists is not None:
            raise Conflict(f"Username {username!r} already taken")
        user_id = conn.execute(
            sa.insert(users).values(username=username, hashed_password=hashed, date_joined=utcnow()).returning(users.c.id)
        ).scalar_one()
    return json_response({"id": user_id, "username": username}, 201)


def me(ctx: Ctx) -> Response:
    user = ctx.user
    with ctx.read() as conn:
        row = conn.execute(sa.select(users.c.id, users.c.username).where(users.c.id == user.id)).first()
    if row is None:
        raise Unauthorized("This token's user no longer exists")
    return json_response({"id": row.id, "username": row.username})


def logout(ctx: Ctx) -> Response:
    """Revoke the credential behind the calling token (all access tokens minted from it stop)."""
    user = ctx.user
    with ctx.write() as conn:
        revoke_credentials(conn, sa.and_(credentials.c.id == user.credential_id, credentials.c.user_id == user.id))
    ctx.forget_credentials([user.credential_id])
    return no_content()


def _credential_dict(row: Any) -> dict[str, Any]:
    out = {name: getattr(row, name) for name in CREDENTIAL_FIELDS}
    for name in ("created", "expires", "last_used", "revoked"):
        out[name] = wire_datetime(out[name])
    return out


def list_credentials(ctx: Ctx) -> Response:
    q = ctx.query({"kind", "site_id", "batch_job_id", "active"} | PAGINATION)
    limit, offset = pagination(q)
    stmt = sa.select(*[credentials.c[n] for n in CREDENTIAL_FIELDS]).where(credentials.c.user_id == ctx.user.id)
    if ctx.user.site_id is not None:
        stmt = stmt.where(credentials.c.id == ctx.user.credential_id)
    kind = q.choice("kind", list(CREDENTIAL_KINDS))
    if kind:
        stmt = stmt.where(credentials.c.kind == kind)
    for name in ("site_id", "batch_job_id"):
        value = q.int(name)
        if value is not None:
            stmt = stmt.where(credentials.c[name] == value)
    if q.bool("active"):
        stmt = stmt.where(credentials.c.revoked.is_(None), credentials.c.expires > utcnow())
    with ctx.read() as conn:
        count, rows = count_and_page(conn, stmt, [credentials.c.id], limit, offset)
    return json_response({"count": count, "results": [_credential_dict(r) for r in rows]})


def _parse_launcher_request(ctx: Ctx, data: Any, *, create: bool) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationFailed.field(["body"], "expected a JSON object")
    allowed = {"kind", "site_id", "batch_job_id", "ttl_sec", "label"} if create else {"ttl_sec"}
    errors = [(["body", k], "unknown field") for k in sorted(set(data) - allowed)]
    if create and data.get("kind", "launcher") != "launcher":
        errors.append((["body", "kind"], "only launcher credentials can be created here (log in for others)"))
    ints = {"site_id": create, "batch_job_id": False, "ttl_sec": True}
    for name, required in ints.items():
        if name not in allowed:
            continue
        value = data.get(name)
        if value is None and not required:
            continue
        if not is_json_int(value) or not 1 <= value <= 2**31 - 1:
            errors.append((["body", name], "required: a positive integer" if required else "expected a positive integer"))
        else:
            data[name] = int(value)
    if "label" in data and (not isinstance(data["label"], str) or len(data["label"]) > 200):
        errors.append((["body", "label"], "expected a string of at most 200 characters"))
    if errors:
        raise ValidationFailed(errors)
    if data["ttl_sec"] > ctx.settings.launcher_max_ttl_sec:
        raise ValidationFailed.field(["body", "ttl_sec"], f"must be <= {ctx.settings.launcher_max_ttl_sec} "
                                                          "(BALSAM_AUTH_LAUNCHER_MAX_TTL_SEC); renew it instead")
    return data


def create_credential(ctx: Ctx) -> Response:
    """A launcher credential: good only for ``site_id`` (and, with ``batch_job_id``, revoked when
    that BatchJob finishes or is deleted), for ``ttl_sec`` seconds."""
    data = _parse_launcher_request(ctx, ctx.json(), create=True)
    user = ctx.user
    site_id, bj_id = data["site_id"], data.get("batch_job_id")
    # Its site or BatchJob deleted by a request that committed after the checks below: 404, as
    # the checks answer (the INSERT's foreign key refused it, answered with PostgreSQL's text).
    gone = missing_answers({"sites": f"Site {site_id} not found",
                            "batch_jobs": f"BatchJob {bj_id} not found at site {site_id}"})
    with refusals_answered(gone), ctx.write() as conn:
        if conn.execute(sa.select(sites.c.id).where(sites.c.id == site_id, site_owned_by(user.id))).first() is None:
            raise NotFound(f"Site {site_id} not found")
        if bj_id is not None:
            # The BatchJob held FOR SHARE (PostgreSQL; SQLite runs one write transaction at a
            # time) before the credential is inserted, BatchJobs first in the lock order
            # (sessions_logic): its finish (FOR NO KEY UPDATE, then the revoke of its launcher
            # credentials) waits for this create and revokes the new credential too, or this
            # create waits for the finish and reads it. Read unlocked, a finish committed between
            # the read and the INSERT left a live credential for a finished BatchJob.
            bj = sa.select(batch_jobs.c.state).where(batch_jobs.c.id == bj_id, batch_jobs.c.site_id == site_id,
                                                     batch_jobs.c.site_id.in_(sa.select(sites.c.id).where(site_owned_by(user.id))))
            if conn.dialect.name == "postgresql":
                bj = bj.with_for_update(read=True, of=batch_jobs)
            state = conn.execute(bj).scalar()
            if state is None:
                raise NotFound(f"BatchJob {bj_id} not found at site {site_id}")
            if state == BatchJobState.finished.value:
                raise Conflict(f"BatchJob {bj_id} has finished: its launcher credentials are revoked, and no new one is issued")
        label = data.get("label") or (f"launcher of BatchJob {bj_id}" if bj_id else f"launcher at site {site_id}")
        cred_id, expires, _ = issue_credential(conn, user.id, "launcher", label, data["ttl_sec"], site_id=site_id,
                                               batch_job_id=bj_id)
        row = conn.execute(sa.select(credentials).where(credentials.c.id == cred_id)).one()
    body = {**_credential_dict(row), **_token_response(ctx, user.id, user.username, cred_id, expires, site_id)}
    return json_response(body, 201)


def _owned_credential(conn: sa.Connection, user_id: int, cred_id: int, *, lock: bool = False) -> sa.Row:
    stmt = sa.select(credentials).where(credentials.c.id == cred_id, credentials.c.user_id == user_id)
    row = conn.execute(stmt.with_for_update() if lock else stmt).first()
    if row is None:
        raise NotFound(f"Credential {cred_id} not found")
    return row


def renew_credential(ctx: Ctx) -> Response:
    """A launcher credential lives ``ttl_sec`` more seconds from now; answers a new token."""
    cred_id = ctx.path_int("credential_id")
    data = _parse_launcher_request(ctx, ctx.json(), create=False)
    user = ctx.user
    with ctx.write() as conn:
        # FOR UPDATE: a renewal makes an expired credential live again, and the retention sweep
        # must not delete it meanwhile (auth.sweep_ended_credentials says why this suffices).
        row = _owned_credential(conn, user.id, cred_id, lock=True)
        if row.kind != "launcher":
            raise Conflict(f"Credential {cred_id} is a {row.kind} credential; only launcher credentials are renewed here")
        if row.revoked is not None:
            raise Conflict(f"Credential {cred_id} was revoked; create a new one")
        expires = max(row.expires, (utcnow() + dt.timedelta(seconds=data["ttl_sec"])).replace(microsecond=0))
        conn.execute(sa.update(credentials).where(credentials.c.id == cred_id).values(expires=expires, last_used=utcnow()))
        row = conn.execute(sa.select(credentials).where(credentials.c.id == cred_id)).one()
    body = {**_credential_dict(row), **_token_response(ctx, user.id, user.username, cred_id, expires, row.site_id)}
    return json_response(body)


def revoke_credential(ctx: Ctx) -> Response:
    cred_id = ctx.path_int("credential_id")
    with ctx.write() as conn:
        _owned_credential(conn, ctx.user.id, cred_id)
        revoke_credentials(conn, credentials.c.id == cred_id)
    ctx.forget_credentials([cred_id])
    return no_content()


routes = [
    route("/auth/how", {"GET": how}, public=True),
    route("/auth/password/login", {"POST": login}, public=True),
    route("/auth/password/register", {"POST": register}, public=True),
    route("/auth/token", {"POST": refresh}, public=True),
    route("/auth/password/me", {"GET": me}),
    route("/auth/logout", {"POST": logout}),
    route("/auth/credentials", {"GET": list_credentials, "POST": create_credential}, not_for_site_scoped=("POST",)),
    route("/auth/credentials/{credential_id}", {"DELETE": revoke_credential}, not_for_site_scoped=("DELETE",)),
    route("/auth/credentials/{credential_id}/renew", {"POST": renew_credential}, not_for_site_scoped=("POST",)),
]
