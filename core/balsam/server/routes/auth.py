"""/auth: login methods, password login and registration, current user."""

from __future__ import annotations

import re
from urllib.parse import parse_qs

import orjson
import sqlalchemy as sa
from starlette.responses import Response

from ..auth import authenticate_password, create_token, hash_password
from ..errors import BadRequest, Unauthorized, ValidationFailed
from ..http import json_response, reject_nul
from ..jobs_logic import utcnow
from ..routing import Ctx, route
from ..tables import users

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,150}$")
MIN_PASSWORD_LEN = 1


def how(ctx: Ctx) -> Response:
    return json_response([f"LoginMethod.{m}" for m in ctx.settings.login_methods])


def _login_fields(ctx: Ctx) -> tuple[str, str]:
    """Form fields (0.7 clients send an OAuth2 password form); JSON bodies are accepted too."""
    content_type = ctx.request.headers.get("content-type", "")
    body = ctx.body or b""
    if "application/json" in content_type:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValidationFailed.field(["body"], "malformed JSON") from None
        if not isinstance(data, dict):
            raise ValidationFailed.field(["body"], "expected a JSON object with username and password")
    else:
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        data = {k: v[-1] for k, v in parsed.items()}
    missing = [name for name in ("username", "password") if not isinstance(data.get(name), str) or not data.get(name)]
    if missing:
        raise ValidationFailed((["body", name], "field required") for name in missing)
    reject_nul({"username": data["username"], "password": data["password"]}, ["body"])
    return data["username"], data["password"]


def login(ctx: Ctx) -> Response:
    if "password" not in ctx.settings.login_methods:
        raise BadRequest("password login is not enabled on this server")
    username, password = _login_fields(ctx)
    with ctx.read() as conn:
        user = authenticate_password(conn, username, password)
    token, expiration = create_token(user.id, user.username, ctx.settings.secret_key, ctx.settings.token_ttl_sec)
    return json_response({"access_token": token, "token_type": "bearer", "expiration": expiration})


def register(ctx: Ctx) -> Response:
    if "password" not in ctx.settings.login_methods:
        raise BadRequest("password registration is not enabled on this server")
    data = ctx.json()
    if not isinstance(data, dict):
        raise ValidationFailed.field(["body"], "expected a JSON object with username and password")
    errors = []
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        errors.append((["body", "username"], "required: 1-150 characters from letters, digits and _.@+-"))
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LEN:
        errors.append((["body", "password"], "field required (a non-empty string)"))
    extra = sorted(set(data) - {"username", "password"})
    errors.extend((["body", key], "unknown field") for key in extra)
    if errors:
        raise ValidationFailed(errors)
    hashed = hash_password(password)
    with ctx.write() as conn:
        exists = conn.execute(sa.select(users.c.id).where(users.c.username == username)).first()
        if exists is not None:
            raise BadRequest(f"Username {username!r} already taken")
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


routes = [
    route("/auth/how", {"GET": how}),
    route("/auth/password/login", {"POST": login}),
    route("/auth/password/register", {"POST": register}),
    route("/auth/password/me", {"GET": me}),
]
