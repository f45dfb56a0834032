"""Our own OpenAPI description (``GET /openapi.json``), generated from the models and routes."""

from __future__ import annotations

import datetime as dt
import enum
import typing
from pathlib import Path
from typing import Any

import attrs

import balsam
from balsam import models
from balsam.states import JobState

from .http import JSONResponse
from .routing import route

_SCALARS = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"},
            Path: {"type": "string", "format": "path"}, dt.datetime: {"type": "string", "format": "date-time"}}


def _schema_for(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    if tp is Any or tp is typing.Any:
        return {}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        defs.setdefault(tp.__name__, {"type": "string", "enum": [str(m.value) for m in tp]})
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    if attrs.has(tp):
        _model_schema(tp, defs)
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        non_null = [a for a in args if a is not type(None)]
        inner = _schema_for(non_null[0], defs) if len(non_null) == 1 else {"anyOf": [_schema_for(a, defs) for a in non_null]}
        return {**inner, "nullable": True} if "$ref" not in inner else {"allOf": [inner], "nullable": True}
    if origin in (list, set, frozenset):
        out = {"type": "array", "items": _schema_for(args[0], defs)}
        if origin is not list:
            out["uniqueItems"] = True
        return out
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_for(args[1], defs)}
    return {}


def _model_schema(cls: type, defs: dict[str, Any]) -> None:
    if cls.__name__ in defs:
        return
    defs[cls.__name__] = {}
    props, required = {}, []
    for field in attrs.fields(cls):
        schema = _schema_for(field.type, defs)
        role = field.metadata.get("role")
        if role:
            schema["description"] = {"server": "set by the server", "create": "create only", "update": "update only"}[role]
        props[field.name] = schema
        if field.default is attrs.NOTHING:
            required.append(field.name)
    defs[cls.__name__] = {"type": "object", "properties": props, **({"required": required} if required else {})}


def _paginated(name: str) -> dict[str, Any]:
    return {"type": "object", "required": ["count", "results"],
            "properties": {"count": {"type": "integer"}, "results": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}}}


# (method, path, summary, request body schema name or raw schema, status, response schema)
_ROUTES: list[tuple[str, str, str, Any, int, Any]] = [
    ("get", "/auth/how", "List the login methods", None, 200, {"type": "array", "items": {"type": "string"}}),
    ("post", "/auth/password/login", "Password login (form fields username, password)", "form", 200, "Token"),
    ("post", "/auth/password/register", "Register a user", "UserCreate", 201, "User"),
    ("get", "/auth/password/me", "The current user", None, 200, "User"),
    ("get", "/sites/", "List sites", None, 200, _paginated("Site")),
    ("post", "/sites/", "Create a site", "Site", 201, "Site"),
    ("get", "/sites/{site_id}", "Read a site", None, 200, "Site"),
    ("put", "/sites/{site_id}", "Update a site (sets last_refresh)", "Site", 200, "Site"),
    ("delete", "/sites/{site_id}", "Delete a site and everything in it", None, 204, None),
    ("get", "/apps/", "List apps", None, 200, _paginated("App")),
    ("post", "/apps/", "Create an app", "App", 201, "App"),
    ("get", "/apps/{app_id}", "Read an app", None, 200, "App"),
    ("put", "/apps/{app_id}", "Update an app", "App", 200, "App"),
    ("delete", "/apps/{app_id}", "Delete an app and its jobs", None, 204, None),
    ("get", "/jobs/", "List jobs (filters, ordering, pagination)", None, 200, _paginated("Job")),
    ("post", "/jobs/", "Bulk-create jobs (max 5,000)", {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}, 201,
     {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}),
    ("patch", "/jobs/", "Bulk-update jobs by id; returns the count", {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}, 200, {"type": "integer"}),
    ("put", "/jobs/", "Apply one update to the jobs matching the filters; returns the count", "Job", 200, {"type": "integer"}),
    ("delete", "/jobs/", "Delete the jobs matching the filters (all or nothing); returns the count", None, 200, {"type": "integer"}),
    ("get", "/jobs/{job_id}", "Read a job", None, 200, "Job"),
    ("put", "/jobs/{job_id}", "Update a job; returns 1", "Job", 200, {"type": "integer"}),
    ("delete", "/jobs/{job_id}", "Delete a job", None, 204, None),
    ("get", "/batch-jobs/", "List batch jobs", None, 200, _paginated("BatchJob")),
    ("post", "/batch-jobs/", "Create a batch job", "BatchJob", 201, "BatchJob"),
    ("patch", "/batch-jobs/", "Bulk-update batch jobs", {"type": "array", "items": {"$ref": "#/components/schemas/BatchJob"}}, 200,
     {"type": "array", "items": {"$ref": "#/components/schemas/BatchJob"}}),
    ("get", "/batch-jobs/{batch_job_id}", "Read a batch job", None, 200, "BatchJob"),
    ("put", "/batch-jobs/{batch_job_id}", "Update a batch job", "BatchJob", 200, "BatchJob"),
    ("delete", "/batch-jobs/{batch_job_id}", "Delete a batch job", None, 204, None),
    ("get", "/sessions/", "List sessions", None, 200, _paginated("Session")),
    ("post", "/sessions/", "Create a session", "Session", 201, "Session"),
    ("post", "/sessions/{session_id}", "Acquire jobs", "SessionAcquire", 200, {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}),
    ("put", "/sessions/{session_id}", "Heartbeat", None, 200, {"type": "object"}),
    ("delete", "/sessions/{session_id}", "End a session (RUNNING jobs become RUN_TIMEOUT)", None, 204, None),
    ("get", "/transfers/", "List transfer items", None, 200, _paginated("TransferItem")),
    ("patch", "/transfers/", "Bulk-update transfer items", {"type": "array", "items": {"$ref": "#/components/schemas/TransferItem"}}, 200,
     {"type": "array", "items": {"$ref": "#/components/schemas/TransferItem"}}),
    ("get", "/transfers/{transfer_id}", "Read a transfer item", None, 200, "TransferItem"),
    ("put", "/transfers/{transfer_id}", "Update a transfer item", "TransferItem", 200, "TransferItem"),
    ("get", "/events/", "List job state events", None, 200, _paginated("EventLog")),
]


def _query_params(path: str, method: str) -> list[dict[str, Any]]:
    from .jobs_logic import JOB_FILTERS
    from .routes import batch_jobs, events, transfers

    names: set[str] = set()
    if method == "get" and not path.endswith("}") and not path.startswith("/auth"):
        names |= {"limit", "offset"}
    table = {"/jobs/": JOB_FILTERS, "/batch-jobs/": batch_jobs.FILTERS, "/events/": events.FILTERS,
             "/transfers/": transfers.FILTERS, "/sites/": {"name", "path", "id", "last_refresh_after"},
             "/apps/": {"site_id", "id", "name", "site_path", "site_name"}, "/sessions/": {"id"}}
    if path in table and (method == "get" or (path == "/jobs/" and method in ("put", "delete"))):
        names |= table[path]
    return [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in sorted(names)]


def build_openapi() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for cls in (*models.ALL_MODELS, models.SessionAcquire):
        _model_schema(cls, defs)
    _schema_for(JobState, defs)
    defs["Token"] = {"type": "object", "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string"},
                                                      "expiration": {"type": "string", "format": "date-time"}}}
    defs["UserCreate"] = {"type": "object", "required": ["username", "password"],
                          "properties": {"username": {"type": "string"}, "password": {"type": "string"}}}
    defs["Error"] = {"type": "object", "properties": {"detail": {}}}
    paths: dict[str, Any] = {}
    for method, path, summary, body, status, response in _ROUTES:
        op: dict[str, Any] = {"summary": summary, "parameters": _query_params(path, method)}
        for part in path.split("/"):
            if part.startswith("{"):
                op["parameters"].append({"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "integer"}})
        if method == "post" and not path.startswith("/auth"):
            op["parameters"].append({
                "name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                "description": "one per logical request, resent unchanged on retries: applied once (docs/reliability.md)",
            })
        if body == "form":
            op["requestBody"] = {"content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["username", "password"],
                "properties": {"username": {"type": "string"}, "password": {"type": "string"}}}}}}
        elif body is not None:
            schema = {"$ref": f"#/components/schemas/{body}"} if isinstance(body, str) else body
            op["requestBody"] = {"content": {"application/json": {"schema": schema}}}
        responses: dict[str, Any] = {}
        if response is None:
            responses[str(status)] = {"description": "No content"}
        else:
            schema = {"$ref": f"#/components/schemas/{response}"} if isinstance(response, str) else response
            responses[str(status)] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        for code, text in (("400", "Bad request"), ("401", "Not authenticated"), ("404", "Not found"),
                           ("409", "Conflict"), ("422", "Invalid input (field and reason)"),
                           ("503", "Database unavailable: retry after the Retry-After header's seconds")):
            responses[code] = {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        op["responses"] = responses
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.0.3", "info": {"title": "Balsam API", "version": balsam.__version__}, "paths": paths,
            "components": {"schemas": defs,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
            "security": [{"bearer": []}]}


_CACHE: dict[str, Any] = {}


def openapi_route():
    def handler(ctx):
        if "doc" not in _CACHE:
            _CACHE["doc"] = build_openapi()
        return JSONResponse(_CACHE["doc"])

    return route("/openapi.json", {"GET": handler})
