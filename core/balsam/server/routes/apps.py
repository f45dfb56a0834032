"""/apps/: serialized ApplicationDefinitions, unique by (site_id, name)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Callable

import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import MAX_SERIALIZED_CLASS_CHARS, App, writable_fields
from balsam.serialization import PayloadError, from_dict, to_dict

from ..db import count_and_page, where_in
from ..errors import APIError, Conflict, NotFound, Refusal, ValidationFailed, parse_partial, refusals_answered
from ..idempotency import replay_one
from ..http import PAGINATION, check_int_fields, json_response, no_content, pagination
from ..jobs_logic import contains_text, delete_jobs_of, site_owned_by
from ..routing import Ctx, route
from ..tables import apps, sites

APP_FIELDS = ["id", "site_id", "name", "description", "parameters", "transfers", "serialized_class", "source_code"]
APP_COLUMNS = [apps.c[f] for f in APP_FIELDS]
WRITABLE = set(writable_fields(App, on="update"))


def app_dict(row: Any) -> dict[str, Any]:
    return dict(zip(APP_FIELDS, row))


def local_path_problem(local_path: str) -> "str | None":
    """Why ``local_path`` cannot be a transfer slot's, or None: relative, without a ``..`` part, as
    the agent's item_transfer_paths requires at stage time (it also refuses a stage-in that a
    symbolic link in the workdir leads out of: only the workdir can tell). Such a path was taken
    here and its jobs created, each then failed at stage time. ``..`` is refused even where it
    stays inside (``ok/../in.txt``): the agent, the server's same-destination check and the
    waiting-destination keys compare paths as written. An app stored before this check keeps
    working: its jobs are created and such an item fails at stage time, as it did. The error's
    ``loc`` names the slot (``transfers.<slot>.local_path``)."""
    if local_path.startswith("/"):
        return f"{local_path!r} is absolute: a transfer slot's local_path is relative to the job's workdir"
    if ".." in PurePosixPath(local_path).parts:
        return f"{local_path!r} has a '..' part: a transfer slot's local_path stays inside the job's workdir, written without '..'"
    return None


def _validate(values: dict[str, Any]) -> None:
    errors = []
    name = values.get("name")
    if name is not None and not str(name).isidentifier():
        errors.append((["body", "name"], f"must be a Python identifier (the class name), got {name!r}"))
    if len(values.get("serialized_class") or "") > MAX_SERIALIZED_CLASS_CHARS:
        errors.append((["body", "serialized_class"], f"longer than {MAX_SERIALIZED_CLASS_CHARS} characters"))
    for pname, param in (values.get("parameters") or {}).items():
        if not str(pname).isidentifier():
            errors.append((["body", "parameters", pname], "parameter names must be Python identifiers"))
    for slot, spec in (values.get("transfers") or {}).items():
        problem = local_path_problem(str(spec.get("local_path", "")))
        if problem:
            errors.append((["body", "transfers", slot, "local_path"], problem))
    if errors:
        raise ValidationFailed(errors)


def _json_values(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for name in ("parameters", "transfers"):
        if name in out:
            out[name] = to_dict(App(site_id=0, name="x", serialized_class="", source_code="", **{name: out[name]}))[name]
    return out


def get_owned_app(conn: sa.Connection, user_id: int, app_id: int) -> sa.Row:
    row = conn.execute(
        sa.select(*APP_COLUMNS).join(sites, sites.c.id == apps.c.site_id).where(apps.c.id == app_id, site_owned_by(user_id))
    ).first()
    if row is None:
        raise NotFound(f"App {app_id} not found")
    return row


def _check_site(conn: sa.Connection, user_id: int, site_id: int) -> None:
    if conn.execute(sa.select(sites.c.id).where(sites.c.id == site_id, site_owned_by(user_id))).first() is None:
        raise NotFound(f"Site {site_id} not found")


_DUPLICATE_NAME = "An app with this site_id and name already exists"


def _check_unique(conn: sa.Connection, site_id: int, name: str, exclude_id: "int | None" = None) -> None:
    stmt = sa.select(apps.c.id).where(apps.c.site_id == site_id, apps.c.name == name)
    if exclude_id is not None:
        stmt = stmt.where(apps.c.id != exclude_id)
    if conn.execute(stmt).first() is not None:
        raise Conflict(_DUPLICATE_NAME)


def _refused(site_id: "int | None") -> "Callable[[Refusal], APIError | None]":
    """The answers of the checks above to what the database refused (PostgreSQL: a request
    committed between a check and the write): the app's site deleted meanwhile (404), its name
    taken meanwhile by a concurrent create or rename (409)."""
    def answer(refusal: Refusal) -> "APIError | None":
        if refusal.kind == "missing" and site_id is not None and refusal.table in ("sites", None):
            return NotFound(f"Site {site_id} not found")
        if refusal.kind == "duplicate" and refusal.table in ("apps", None):
            return Conflict(_DUPLICATE_NAME)
        return None
    return answer


def list_apps(ctx: Ctx) -> Response:
    q = ctx.query({"site_id", "id", "name", "site_path", "site_name"} | PAGINATION)
    limit, offset = pagination(q)
    stmt = sa.select(*APP_COLUMNS).join(sites, sites.c.id == apps.c.site_id).where(site_owned_by(ctx.user.id))
    stmt = where_in(stmt, apps.c.site_id, q.int_list("site_id"))
    stmt = where_in(stmt, apps.c.id, q.int_list("id"))
    if q.str("name"):
        stmt = stmt.where(apps.c.name == q.str("name"))
    site_path = q.str("site_path")
    if site_path:
        stmt = stmt.where(contains_text(sites.c.path, site_path, ctx.engine.dialect.name))
    if q.str("site_name"):
        stmt = stmt.where(sites.c.name == q.str("site_name"))
    with ctx.read() as conn:
        count, rows = count_and_page(conn, stmt, [apps.c.id], limit, offset)
    return json_response({"count": count, "results": [app_dict(r) for r in rows]})


def create_app_record(ctx: Ctx) -> Response:
    data = ctx.json()
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "id"}
    try:
        app = from_dict(App, data)
    except PayloadError as exc:
        raise ValidationFailed.from_payload(exc) from None
    values = {k: v for k, v in to_dict(app).items() if k in WRITABLE}
    check_int_fields(values, ["site_id"], ["body"])
    _validate(values)
    with refusals_answered(_refused(values["site_id"])), ctx.write() as conn:
        earlier = ctx.idempotency.claim(conn)
        if earlier is not None:
            row = replay_one(earlier, "App", lambda app_id: get_owned_app(conn, ctx.user.id, app_id))
            return json_response(app_dict(row), earlier.status_code)
        _check_site(conn, ctx.user.id, values["site_id"])
        _check_unique(conn, values["site_id"], values["name"])
        app_id = conn.execute(sa.insert(apps).values(**values).returning(apps.c.id)).scalar_one()
        row = get_owned_app(conn, ctx.user.id, app_id)
        ctx.idempotency.record(conn, 201, "App", [app_id])
        response = json_response(app_dict(row), 201)  # built before the commit, as jobs' (routes/jobs.py)
    return response


def read_app(ctx: Ctx) -> Response:
    with ctx.read() as conn:
        row = get_owned_app(conn, ctx.user.id, ctx.path_int("app_id"))
    return json_response(app_dict(row))


def update_app(ctx: Ctx) -> Response:
    app_id = ctx.path_int("app_id")
    data = ctx.json()
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "id"}
    values = _json_values(parse_partial(App, data, WRITABLE, ["body"]))
    check_int_fields(values, ["site_id"], ["body"])
    _validate(values)
    with refusals_answered(_refused(None)), ctx.write() as conn:
        current = get_owned_app(conn, ctx.user.id, app_id)
        if "site_id" in values and values["site_id"] != current.site_id:
            raise ValidationFailed.field(["body", "site_id"], "an app cannot move to another site (create a new one)")
        if "name" in values:
            _check_unique(conn, current.site_id, values["name"], exclude_id=app_id)
        values.pop("site_id", None)
        if values:
            conn.execute(sa.update(apps).where(apps.c.id == app_id).values(**values))
        row = get_owned_app(conn, ctx.user.id, app_id)
    return json_response(app_dict(row))


def delete_app(ctx: Ctx) -> Response:
    app_id = ctx.path_int("app_id")
    released: list[int] = []
    with ctx.write() as conn:
        get_owned_app(conn, ctx.user.id, app_id)
        # Its jobs first, as a job delete does: their waiting children in other apps are re-checked
        # (the cascade alone left them waiting for ever).
        delete_jobs_of(conn, app_id=app_id, released=released)
        conn.execute(sa.delete(apps).where(apps.c.id == app_id))
    if released:
        ctx.wake_acquires()  # children whose remaining parents had finished: READY / STAGED_IN
    return no_content()


routes = [
    route("/apps/", {"GET": list_apps, "POST": create_app_record}),
    route("/apps/{app_id}", {"GET": read_app, "PUT": update_app, "DELETE": delete_app}),
]
