"""/sites/: a user's sites (name unique per user)."""

from __future__ import annotations

from typing import Any, Callable

import sqlalchemy as sa
from starlette.responses import Response

from balsam.models import AllowedQueue, Site, site_name_problem, site_path_problem, writable_fields
from balsam.serialization import PayloadError, from_dict, to_dict
from balsam.states import JobState

from ..backlog import MAX_BACKLOG_TAG_CHARS, MAX_BACKLOG_TAGS, NodeShape, backlog_by_state, parse_gpu_bound
from ..db import count_and_page, where_in
from ..errors import APIError, Conflict, Forbidden, NotFound, Refusal, ValidationFailed, parse_partial, refusals_answered
from ..http import PAGINATION, json_response, no_content, pagination, wire_datetime
from ..idempotency import replay_one
from ..jobs_logic import contains_text, delete_jobs_of, site_owned_by, utcnow
from ..routing import Ctx, route
from ..tables import batch_jobs, credentials, sessions, sites

SITE_FIELDS = [f for f in ("id", "name", "path", "globus_endpoint_id", "backfill_windows", "queued_jobs",
                           "optional_batch_job_params", "allowed_projects", "allowed_queues", "transfer_locations",
                           "last_refresh", "creation_date")]
SITE_COLUMNS = [sites.c[f] for f in SITE_FIELDS]
WRITABLE = set(writable_fields(Site, on="update"))
#: What a launcher (site-scoped) credential may not change on its site: how the user and the agent
#: find the site. Its status fields (queued_jobs, backfill_windows, last_refresh) stay writable.
IDENTITY_FIELDS = ("name", "path")


def site_dict(row: Any) -> dict[str, Any]:
    out = dict(zip(SITE_FIELDS, row))
    out["last_refresh"], out["creation_date"] = wire_datetime(out["last_refresh"]), wire_datetime(out["creation_date"])
    return out


def _stored(values: dict[str, Any]) -> dict[str, Any]:
    """Structured model values -> JSON-ready column values (validated on the way in)."""
    out = {}
    for name, value in values.items():
        if name in ("backfill_windows", "queued_jobs", "allowed_queues"):
            out[name] = to_dict(Site(name="x", path="/x", **{name: value}))[name]
        elif name == "path":
            out[name] = str(value)
        else:
            out[name] = value
    return out


def _validate(values: dict[str, Any]) -> None:
    errors = []
    if "path" in values and site_path_problem(values["path"]):
        errors.append((["body", "path"], site_path_problem(values["path"])))
    if "name" in values and not str(values["name"]).strip():
        errors.append((["body", "name"], "must not be empty"))
    elif "name" in values and site_name_problem(str(values["name"])):
        errors.append((["body", "name"], site_name_problem(str(values["name"]))))
    for queue, limits in (values.get("allowed_queues") or {}).items():
        # The rule settings.yml is checked with: a queue of max_nodes 0 refuses every BatchJob.
        for field, problem in AllowedQueue(**limits).validate(cross_field=False).items():
            errors.append((["body", "allowed_queues", queue, field], problem))
    for alias, url in (values.get("transfer_locations") or {}).items():
        if "://" not in url:
            errors.append((["body", "transfer_locations", alias], f"expected a URL like globus://<endpoint-id>, got {url!r}"))
    if errors:
        raise ValidationFailed(errors)


def get_owned_site(conn: sa.Connection, user_id: int, site_id: int) -> sa.Row:
    row = conn.execute(sa.select(*SITE_COLUMNS).where(sites.c.id == site_id, site_owned_by(user_id))).first()
    if row is None:
        raise NotFound(f"Site {site_id} not found")
    return row


def _name_taken(ctx: Ctx, name: "str | None") -> "Callable[[Refusal], APIError | None]":
    """The answer of the name checks below when a concurrent create or rename took the name
    between the check and the write (PostgreSQL): the unique key refused it, answered with
    PostgreSQL's text. The same 409 as the check, read once this transaction has rolled back."""
    def answer(refusal: Refusal) -> "APIError | None":
        if refusal.kind != "duplicate" or refusal.table not in ("sites", None) or name is None:
            return None
        with ctx.read() as conn:
            dup = conn.execute(sa.select(sites.c.id).where(sites.c.owner_id == ctx.user.id, sites.c.name == name)).first()
        return Conflict(f"A site named {name!r} already exists" + (f" (id {dup.id})" if dup is not None else ""))
    return answer


def list_sites(ctx: Ctx) -> Response:
    q = ctx.query({"name", "path", "id", "last_refresh_after"} | PAGINATION)
    limit, offset = pagination(q)
    stmt = sa.select(*SITE_COLUMNS).where(site_owned_by(ctx.user.id))
    if q.str("name"):
        stmt = stmt.where(sites.c.name == q.str("name"))
    path = q.str("path")
    if path:
        stmt = stmt.where(contains_text(sites.c.path, path, ctx.engine.dialect.name))
    stmt = where_in(stmt, sites.c.id, q.int_list("id"))
    after = q.datetime("last_refresh_after")
    if after is not None:
        stmt = stmt.where(sites.c.last_refresh >= after)
    with ctx.read() as conn:
        count, rows = count_and_page(conn, stmt, [sites.c.id], limit, offset)
    return json_response({"count": count, "results": [site_dict(r) for r in rows]})


def create_site(ctx: Ctx) -> Response:
    data = ctx.json()
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in ("id", "last_refresh", "creation_date")}
    try:
        site = from_dict(Site, data)
    except PayloadError as exc:
        raise ValidationFailed.from_payload(exc) from None
    values = {k: v for k, v in to_dict(site).items() if k in WRITABLE}
    _validate(values)
    now = utcnow()
    with refusals_answered(_name_taken(ctx, values["name"])), ctx.write() as conn:
        earlier = ctx.idempotency.claim(conn)
        if earlier is not None:
            row = replay_one(earlier, "Site", lambda site_id: get_owned_site(conn, ctx.user.id, site_id))
            return json_response(site_dict(row), earlier.status_code)
        dup = conn.execute(
            sa.select(sites.c.id).where(sites.c.owner_id == ctx.user.id, sites.c.name == values["name"])
        ).first()
        if dup is not None:
            raise Conflict(f"A site named {values['name']!r} already exists (id {dup.id})")
        site_id = conn.execute(
            sa.insert(sites).values(owner_id=ctx.user.id, last_refresh=now, creation_date=now, **values).returning(sites.c.id)
        ).scalar_one()
        row = get_owned_site(conn, ctx.user.id, site_id)
        ctx.idempotency.record(conn, 201, "Site", [site_id])
        response = json_response(site_dict(row), 201)  # built before the commit, as jobs' (routes/jobs.py)
    return response


def read_site(ctx: Ctx) -> Response:
    with ctx.read() as conn:
        row = get_owned_site(conn, ctx.user.id, ctx.path_int("site_id"))
    return json_response(site_dict(row))


def update_site(ctx: Ctx) -> Response:
    site_id = ctx.path_int("site_id")
    data = ctx.json()
    if isinstance(data, dict):
        # Read-only fields sent back by clients that PUT a whole record are ignored.
        data = {k: v for k, v in data.items() if k not in ("id", "last_refresh", "creation_date")}
    values = _stored(parse_partial(Site, data, WRITABLE, ["body"]))
    # A whole record sent back may repeat a name stored before the rule (checked below).
    _validate({k: v for k, v in values.items() if k != "name" or not site_name_problem(str(v))})
    with refusals_answered(_name_taken(ctx, values.get("name"))), ctx.write() as conn:
        stored = get_owned_site(conn, ctx.user.id, site_id)
        if ctx.user.site_id is not None:
            # Sent back unchanged (a whole record) is fine; a change is the user's to make. Besides
            # the site's identity, that covers where its data goes: transfer_locations and the
            # Globus endpoint decide the far end of every stage-in and stage-out, so a launcher
            # credential (held by any process of the allocation) may not redirect them. Only the
            # site agent (the user's own login) pushes them, from settings.yml.
            locked = IDENTITY_FIELDS + ("transfer_locations", "globus_endpoint_id")
            changed = [f for f in locked if f in values and values[f] != getattr(stored, f)]
            if changed:
                raise Forbidden(f"This credential is limited to site {ctx.user.site_id} and cannot change "
                                f"the site's {changed[0]}")
        if "name" in values and values["name"] != stored.name and site_name_problem(str(values["name"])):
            raise ValidationFailed.field(["body", "name"], site_name_problem(str(values["name"])))
        if "name" in values:
            dup = conn.execute(
                sa.select(sites.c.id).where(
                    sites.c.owner_id == ctx.user.id, sites.c.name == values["name"], sites.c.id != site_id
                )
            ).first()
            if dup is not None:
                raise Conflict(f"A site named {values['name']!r} already exists (id {dup.id})")
        conn.execute(sa.update(sites).where(sites.c.id == site_id).values(last_refresh=utcnow(), **values))
        row = get_owned_site(conn, ctx.user.id, site_id)
    return json_response(site_dict(row))


def delete_site(ctx: Ctx) -> Response:
    site_id = ctx.path_int("site_id")
    with ctx.write() as conn:
        get_owned_site(conn, ctx.user.id, site_id)
        if conn.dialect.name == "postgresql":
            # The lock order (sessions_logic's module docstring): the site's BatchJobs first (id
            # order, as a bulk BatchJob update takes them), then its credentials, apps, jobs, and
            # the cascade's rows. A launcher's session create locks its BatchJob (the start_time
            # UPDATE, note_batch_job_start) and then its credential FOR SHARE; a BatchJob's delete
            # or finish locks it and then revokes its credentials. Taken by the cascade at the end,
            # after the credentials below, the BatchJob row was the second lock here and the first
            # there: each waited for the other (a deadlock, 503). NO KEY UPDATE, the lock those
            # take: the key-share locks of a lease, a session or a credential referring to the
            # BatchJob do not wait for it (the DELETE at the end does, as before).
            conn.execute(sa.select(batch_jobs.c.id).where(batch_jobs.c.site_id == site_id)
                         .order_by(batch_jobs.c.id).with_for_update(key_share=True, of=batch_jobs)).all()
        # The site's launcher credentials go with it: read their ids first, so that this process
        # stops trusting them now rather than when its credential cache would check again.
        # Locked before the site's row (PostgreSQL): a launcher's session create holds its
        # credential FOR SHARE and then checks its site (FOR KEY SHARE): deleting the site row
        # first, whose cascade then waited for that credential, took the two locks in the other
        # order (a deadlock, 503).
        cred_ids = list(conn.execute(sa.select(credentials.c.id).where(credentials.c.site_id == site_id)
                                     .order_by(credentials.c.id).with_for_update()).scalars())
        if conn.dialect.name == "postgresql":
            # Then its sessions (id order), before its jobs: a launcher's release, tick or session
            # delete and the expiry sweep lock a session and then its jobs. Reached only through
            # the site row's cascade, after delete_jobs_of below locked the jobs, a session was the
            # last lock here and the first there: each waited for the other (a deadlock, 503). A
            # request of a session held here waits, then finds it gone (404).
            conn.execute(sa.select(sessions.c.id).where(sessions.c.site_id == site_id)
                         .order_by(sessions.c.id).with_for_update(of=sessions)).all()
        # Its jobs first, as a job delete does: their waiting children on the user's other sites
        # are re-checked (the cascade alone left them waiting for ever).
        released: list[int] = []
        delete_jobs_of(conn, site_id=site_id, released=released)
        conn.execute(sa.delete(sites).where(sites.c.id == site_id))
    ctx.forget_credentials(cred_ids)
    if released:
        ctx.wake_acquires()  # children whose remaining parents had finished: READY / STAGED_IN
    return no_content()


#: The backlog route's node shape parameters (all optional; without them the footprint is 0.7's).
NODE_SHAPE_PARAMS = ("node_gpus", "node_cpus", "cpu_ids_are_cores", "hardware_threads_per_core")


def _node_shape(q: Any) -> "NodeShape | None":
    """The nodes' shape from the query: ``node_gpus`` (GPU ids per node, >= 1) and ``node_cpus`` (CPU
    ids per node, >= 1), either or both; ``cpu_ids_are_cores`` and ``hardware_threads_per_core``
    (>= 0, 0: no cap) say how a job's threads become CPU ids, so they need ``node_cpus``. None when
    no node size is given (the footprint of older clients)."""
    gpus = q.int("node_gpus", minimum=1)
    cpus = q.int("node_cpus", minimum=1)
    are_cores = q.bool("cpu_ids_are_cores")
    threads_per_core = q.int("hardware_threads_per_core", minimum=0)
    # cpu_ids_are_cores and hardware_threads_per_core qualify node_cpus: alone they count nothing.
    # Accepted all the same (not a 422): the API document cannot state a dependency between query
    # parameters, and a request it allows is never refused (docs/rest-api.md, the fuzz test).
    if gpus is None and cpus is None:
        return None
    return NodeShape(gpus=gpus, cpus=cpus, cpu_ids_are_cores=bool(are_cores),
                     hardware_threads_per_core=threads_per_core or 0)


def site_backlog(ctx: Ctx) -> Response:
    """The site's jobs in numbers per state (see balsam.server.backlog): what auto-scalers read.
    ``max_nodes_per_job``, ``serial_only`` and ``max_wall_time_min`` keep the jobs a launcher
    acquiring with them could lease; ``batch_job_id`` (repeated) those of the given BatchJobs;
    ``leased`` (true/false) only jobs a launcher session holds / none holds; ``max_gpus_per_node``
    (a number, 0 to 1e9: the acquire's GPU bound, 0 for a launcher on GPU-less nodes) only jobs asking
    at most that many GPUs per node. ``node_gpus``,
    ``node_cpus``, ``cpu_ids_are_cores`` and ``hardware_threads_per_core`` describe the nodes (see
    :func:`_node_shape`): the footprint then charges each job's GPUs and CPUs as the launcher does."""
    site_id = ctx.path_int("site_id")
    q = ctx.query({"state", "tags", "max_nodes_per_job", "serial_only", "max_wall_time_min", "batch_job_id", "leased",
                   "max_gpus_per_node", *NODE_SHAPE_PARAMS})
    states = q.enum_list("state", JobState)
    raw_tags = q.params.getlist("tags")
    if len(raw_tags) > MAX_BACKLOG_TAGS:
        raise ValidationFailed.field(["query", "tags"], f"at most {MAX_BACKLOG_TAGS} tags, got {len(raw_tags)}")
    if any(len(raw) > MAX_BACKLOG_TAG_CHARS for raw in raw_tags):
        raise ValidationFailed.field(["query", "tags"], f"a tag filter longer than {MAX_BACKLOG_TAG_CHARS} characters")
    tags = q.key_values("tags")
    max_nodes_per_job = q.int("max_nodes_per_job", minimum=1)
    serial_only = bool(q.bool("serial_only"))
    max_wall_time_min = q.int("max_wall_time_min", minimum=0)
    batch_job_ids = q.int_list("batch_job_id")
    leased = q.bool("leased")
    raw_gpus = q.str("max_gpus_per_node")
    max_gpus_per_node = None
    if raw_gpus is not None and raw_gpus != "":
        max_gpus_per_node = parse_gpu_bound(raw_gpus)  # ValidationFailed (422) naming it when bad
    node_shape = _node_shape(q)
    with ctx.read() as conn:
        get_owned_site(conn, ctx.user.id, site_id)
        by_state = backlog_by_state(conn, site_id, states, tags, max_nodes_per_job=max_nodes_per_job,
                                    serial_only=serial_only, max_wall_time_min=max_wall_time_min,
                                    batch_job_ids=batch_job_ids, leased=leased, node_shape=node_shape,
                                    max_gpus_per_node=max_gpus_per_node)
    return json_response({"site_id": site_id, "states": by_state})


routes = [
    route("/sites/", {"GET": list_sites, "POST": create_site}, not_for_site_scoped=("POST",)),
    route("/sites/{site_id}", {"GET": read_site, "PUT": update_site, "DELETE": delete_site},
          not_for_site_scoped=("DELETE",)),
    route("/sites/{site_id}/backlog", {"GET": site_backlog}),
]
