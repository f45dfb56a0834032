"""Our OpenAPI description (``GET /openapi.json``): what the server enforces, operation by operation.

Request schemas say exactly what the server accepts (types, 32-bit ranges, minimums, patterns,
required fields and bodies, ``additionalProperties: false``, size limits, no NUL characters);
fields the server sets are ``readOnly`` (clients may send them back; they are ignored). Response
schemas say what comes back: datetimes are UTC without offset, as Balsam 0.7 sent them. Rules no
schema can state (a state change the job's current state does not allow, a duplicate name, a
transfer slot the app does not define) are refused with 409 or 422 and documented per route in
docs/rest-api.md. ``tests/server/test_openapi.py`` runs schemathesis against this document.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import balsam
from balsam.models import (MAX_CHUNKS_PER_RESERVATION, MAX_ITEMS_PER_BULK_OP, MAX_JOB_IDS_PER_SESSION_TICK,
                           MAX_JOBS_PER_SESSION_ACQUIRE, MAX_PAGE_SIZE, SITE_SELECTOR_WORDS)
from balsam.states import BatchJobMode, BatchJobState, JobState, TransferDirection, TransferItemState

from .auth import CREDENTIAL_KINDS
from .http import INT64_MAX, INT64_MIN, INT_MAX, INT_MIN, MAX_TAG_FILTERS, JSONResponse
from .idempotency import NOT_REPLAYED
from .limits import (FIELD_CHARS, MAX_KEY_CHARS, MAX_PATH_CHARS, MAX_QUERY_VALUE_CHARS, MAX_TAG_VALUE_CHARS,
                     MAX_TEXT_CHARS)
from .backlog import MAX_BACKLOG_TAG_CHARS, MAX_BACKLOG_TAGS, MAX_GPU_BOUND_CHARS
from .routing import route

NO_NUL = "^[^\\x00]*$"
#: The characters Python's ``str.isspace`` (hence ``str.strip``) treats as whitespace, as a regex
#: class body: the server's "not blank" checks (models.workdir_problem, a site's name) use strip(),
#: which also drops the ASCII separators \x1c-\x1f that a JSON Schema ``\s`` does not match.
PY_SPACE = "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
#: Datetimes in responses: naive UTC ISO-8601 (Balsam 0.7's wire format).
#: The backlog's ``max_gpus_per_node`` in plain decimal, 0 to 1e9 (up to 9 digits before a '.', or
#: 1e9 itself): what backlog.parse_gpu_bound takes (it also takes leading zeros past 9 digits).
GPU_BOUND_PATTERN = r"^(?:[0-9]{1,9}(?:\.[0-9]*)?|[0-9]{0,9}\.[0-9]+|1000000000(?:\.0*)?)$"
WIRE_DATETIME = {"type": "string", "pattern": "^\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d(\\.\\d+)?$",
                 "description": "UTC, without offset"}
IDENTIFIER = "^[A-Za-z_][A-Za-z0-9_]*$"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def text(max_length: int = MAX_TEXT_CHARS, *, pattern: str = NO_NUL, min_length: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "maxLength": max_length, "pattern": pattern}
    if min_length:
        out["minLength"] = min_length
    return out


def int32(minimum: int = INT_MIN, maximum: int = INT_MAX) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def int64() -> dict[str, Any]:
    """The ids of jobs, events, transfer items and sessions (64-bit columns)."""
    return {"type": "integer", "format": "int64", "minimum": INT64_MIN, "maximum": INT64_MAX}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def str_map(value: Optional[dict[str, Any]] = None, *, key_pattern: str = NO_NUL) -> dict[str, Any]:
    return {"type": "object", "propertyNames": {"maxLength": MAX_KEY_CHARS, "pattern": key_pattern},
            "additionalProperties": value if value is not None else text()}


def obj(props: dict[str, Any], required: "list[str] | None" = None, *, read_only: "dict[str, Any] | None" = None,
        closed: bool = True) -> dict[str, Any]:
    properties = dict(props)
    for name, schema in (read_only or {}).items():
        properties[name] = {**schema, "readOnly": True}
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if closed:
        out["additionalProperties"] = False
    return out


def array(items: dict[str, Any], max_items: Optional[int] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": items}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


def enum(values: "list[str]") -> dict[str, Any]:
    return {"type": "string", "enum": values}


#: Any JSON value the server stores: no NUL in strings or keys, integers within 64 bits.
JSON_VALUE = {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "number", "minimum": -9.2e18, "maximum": 9.2e18},
                        {"type": "string", "maxLength": MAX_TEXT_CHARS, "pattern": NO_NUL},
                        {"type": "array", "items": _ref("JsonValue")},
                        {"type": "object", "propertyNames": {"maxLength": MAX_KEY_CHARS, "pattern": NO_NUL},
                         "additionalProperties": _ref("JsonValue")}]}
JSON_OBJECT = {"type": "object", "propertyNames": {"maxLength": MAX_KEY_CHARS, "pattern": NO_NUL},
               "additionalProperties": _ref("JsonValue")}
TAGS = str_map(text(MAX_TAG_VALUE_CHARS))
#: Tags an acquire filters on (a BatchJob's and its partitions' are sent in its launchers' acquires).
FILTER_TAGS = {**TAGS, "maxProperties": MAX_TAG_FILTERS}
REQUEST_DATETIME = {"type": "string", "format": "date-time"}
STATE_NAMES = [s.value for s in JobState]


def _field_text(name: str) -> dict[str, Any]:
    return text(FIELD_CHARS.get(name, MAX_TEXT_CHARS))


# -- request bodies ------------------------------------------------------------------------------

SITE_FIELDS = {
    # What ``--site NAME`` could never select is refused (balsam.models.site_name_problem): all
    # digits (an id), a comma (several selectors), all/active/this (selectors of their own).
    "name": {**text(pattern=f"^[^\\x00]*[^{PY_SPACE}\\x00][^\\x00]*$", min_length=1), "allOf": [
        {"not": {"pattern": f"^[{PY_SPACE}]*\\d+[{PY_SPACE}]*$"}}, {"not": {"pattern": ","}},
        {"not": {"pattern": f"^[{PY_SPACE}]*({'|'.join(sorted(SITE_SELECTOR_WORDS))})[{PY_SPACE}]*$"}}]},
    "path": text(MAX_PATH_CHARS, pattern="^/[^\\x00]*$"),
    "globus_endpoint_id": nullable(text()),
    "backfill_windows": str_map(array(_ref("BackfillWindow"))),
    "queued_jobs": str_map(_ref("SchedulerJobStatus"), key_pattern="^[0-9]{1,9}$"),
    "optional_batch_job_params": str_map(),
    "allowed_projects": array(text()),
    "allowed_queues": str_map(_ref("AllowedQueue")),
    "transfer_locations": str_map(text(pattern="^[^\\x00]*://[^\\x00]*$")),
}
SITE_SERVER = {"id": {}, "last_refresh": {}, "creation_date": {}}

APP_FIELDS = {
    "site_id": int32(),
    "name": text(200, pattern=IDENTIFIER),
    "description": text(),
    "serialized_class": _field_text("serialized_class"),
    "source_code": _field_text("source_code"),
    "parameters": str_map(_ref("AppParameter"), key_pattern=IDENTIFIER),
    "transfers": str_map(_ref("TransferSlot")),
}

#: A path relative to the site's data/ directory that stays inside it (models.workdir_problem).
WORKDIR = {**text(MAX_PATH_CHARS, pattern="^[^/\\x00][^\\x00]*$"), "allOf": [
    {"pattern": f"[^{PY_SPACE}\\x00]"}, {"not": {"pattern": "(^|/)\\.\\.(/|$)"}}, {"not": {"pattern": "^[./]*$"}}]}
JOB_COMMON = {
    "workdir": WORKDIR,
    "tags": TAGS,
    "serialized_parameters": _field_text("serialized_parameters"),
    "data": JSON_OBJECT,
    "return_code": nullable(int32()),
    "num_nodes": int32(1),
    "ranks_per_node": int32(1),
    "threads_per_rank": int32(1),
    "threads_per_core": int32(1),
    "launch_params": str_map(),
    "gpus_per_rank": {"type": "number", "minimum": 0, "maximum": 1e9},
    "node_packing_count": int32(1),
    "wall_time_min": int32(0),
    "batch_job_id": nullable(int32()),
    "pending_file_cleanup": {"type": "boolean"},
    "serialized_return_value": _field_text("serialized_return_value"),
    "serialized_exception": _field_text("serialized_exception"),
}
JOB_CREATE = obj(
    {**JOB_COMMON, "app_id": int32(), "parent_ids": array(int64()),
     "transfers": str_map({"anyOf": [_ref("JobTransferItem"), text(pattern="^[^\\x00:]+:/[^\\x00]*$")]})},
    ["workdir", "app_id"],
    read_only={"id": {}, "state": {}, "last_update": {}, "state_timestamp": {}, "state_data": {}},
)
JOB_UPDATE_FIELDS = {
    **JOB_COMMON,
    "state": enum([s for s in STATE_NAMES if s != "CREATED"]),
    "state_timestamp": nullable(REQUEST_DATETIME),
    "state_data": JSON_OBJECT,
    # Not a job field: the update was sent under this session's lease (a launcher, the processing
    # module). Applied only while that session holds the job, state change checked strictly;
    # else 409 with the job in refused_ids. Never stored.
    "session_id": {**int64(), "description": "Sent under this session's lease: applied only while the session "
                   "holds the job (state change checked strictly), else 409 with the job's id in refused_ids"},
}
JOB_UPDATE = obj(JOB_UPDATE_FIELDS)
JOB_PATCH = obj({"id": int64(), **JOB_UPDATE_FIELDS}, ["id"])

BATCH_JOB_FIELDS = {
    "project": text(),
    "queue": text(),
    "num_nodes": int32(1),
    "wall_time_min": int32(1),
    "job_mode": _ref("BatchJobMode"),
    "optional_params": str_map(),
    "filter_tags": FILTER_TAGS,
    "partitions": nullable(array(_ref("BatchJobPartition"))),
    "scheduler_id": nullable(int32()),
    "status_info": str_map(),
    "start_time": nullable(REQUEST_DATETIME),
    "end_time": nullable(REQUEST_DATETIME),
}
BATCH_JOB_CREATE = obj({**BATCH_JOB_FIELDS, "site_id": int32()},
                       ["site_id", "project", "queue", "num_nodes", "wall_time_min", "job_mode"],
                       read_only={"id": {}, "state": {}})
#: An extension of Balsam 0.7's update (routes/batch_jobs.STATUS_INFO_MERGE): changes only the
#: status_info keys it names, atomically on the server; never with status_info in the same update.
STATUS_INFO_MERGE = {**str_map(nullable(text())), "description": (
    "Balsam extension: an RFC 7396-style merge into the stored status_info, applied under the row's "
    "lock: a key set to a string is set, a key set to null is removed, every other key is kept (status_info "
    "replaces the whole object, as in Balsam 0.7). Refused (422) beside status_info")}
NOT_BOTH_STATUS_INFO = {"not": {"required": ["status_info", "status_info_merge"]}}
BATCH_JOB_UPDATE = {**obj({**BATCH_JOB_FIELDS, "status_info_merge": STATUS_INFO_MERGE, "state": _ref("BatchJobState")},
                          read_only={"id": {}, "site_id": {}}), **NOT_BOTH_STATUS_INFO}
BATCH_JOB_PATCH = {**obj({"id": int32(), **BATCH_JOB_FIELDS, "status_info_merge": STATUS_INFO_MERGE,
                          "state": _ref("BatchJobState")}, ["id"]), **NOT_BOTH_STATUS_INFO}

TRANSFER_FIELDS = {"state": _ref("TransferItemState"), "task_id": text(), "transfer_info": JSON_OBJECT}

REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "SiteCreate": obj(SITE_FIELDS, ["name", "path"], read_only=SITE_SERVER),
    "SiteUpdate": obj(SITE_FIELDS, read_only=SITE_SERVER),
    "AppCreate": obj(APP_FIELDS, ["site_id", "name", "serialized_class", "source_code"], read_only={"id": {}}),
    "AppUpdate": obj({k: v for k, v in APP_FIELDS.items() if k != "site_id"}, read_only={"id": {}, "site_id": {}}),
    "JobCreate": JOB_CREATE,
    "JobUpdate": JOB_UPDATE,
    "JobPatch": JOB_PATCH,
    "BatchJobCreate": BATCH_JOB_CREATE,
    "BatchJobUpdate": BATCH_JOB_UPDATE,
    "BatchJobPatch": BATCH_JOB_PATCH,
    "SessionCreate": obj({"site_id": int32(), "batch_job_id": nullable(int32())}, ["site_id"],
                         read_only={"id": {}, "heartbeat": {}}),
    "SessionAcquire": obj({
        "max_num_jobs": int32(1, MAX_JOBS_PER_SESSION_ACQUIRE),
        "filter_tags": FILTER_TAGS,
        "max_wall_time_min": nullable(int32()),
        "max_nodes_per_job": nullable(int32()),
        "max_aggregate_nodes": nullable({"type": "number", "minimum": 0, "maximum": 1e9}),
        "max_gpus_per_node": nullable({"type": "number", "minimum": 0, "maximum": 1e9}),
        "serial_only": {"type": "boolean"},
        "sort_by": nullable(enum(["long_large_first"])),
        "states": array(_ref("JobState")),
        "app_ids": array(int32()),
    }, ["max_num_jobs"]),
    # The jobs a launcher runs or has prefetched: the answer names those the session no longer holds.
    # ending_in_sec: a stopping launcher's time left; the Session then expires that much later
    # (balsam.server.sessions_logic, "A launcher's announced end").
    "SessionTick": obj({"job_ids": array(int64(),
                                         MAX_JOB_IDS_PER_SESSION_TICK),
                        "ending_in_sec": nullable({"type": "number", "minimum": 0, "maximum": 86400})}),
    # Leased jobs a launcher gives back unstarted (balsam.server.sessions_logic, "giving back jobs").
    "SessionRelease": obj({"job_ids": array(int64(), MAX_JOBS_PER_SESSION_ACQUIRE)}, ["job_ids"]),
    "TransferUpdate": obj(TRANSFER_FIELDS),
    "TransferPatch": obj({"id": int64(), **TRANSFER_FIELDS}, ["id"]),
    # The server refuses limits that refuse every BatchJob (balsam.models.AllowedQueue.validate).
    "AllowedQueue": obj({"max_nodes": int32(1), "max_walltime": int32(1), "max_queued_jobs": int32(0),
                         "min_nodes": int32(1)},
                        ["max_nodes", "max_walltime", "max_queued_jobs"]),
    "BackfillWindow": obj({"num_nodes": int32(), "wall_time_min": int32()}, ["num_nodes", "wall_time_min"]),
    "SchedulerJobStatus": obj({
        "scheduler_id": int32(), "state": _ref("BatchJobState"), "queue": text(), "num_nodes": int32(),
        "wall_time_min": int32(), "project": text(), "time_remaining_min": int32(), "queued_time_min": int32(),
        "message": text()}, ["scheduler_id", "state", "queue", "num_nodes", "wall_time_min", "project",
                             "time_remaining_min", "queued_time_min"]),
    "AppParameter": obj({"required": {"type": "boolean"}, "default": nullable(text()), "help": text()}, ["required"]),
    "TransferSlot": obj({"required": {"type": "boolean"}, "direction": _ref("TransferDirection"),
                         "local_path": text(MAX_PATH_CHARS, pattern="^(?!/)[^\\x00]*$"), "description": text(),
                         "recursive": {"type": "boolean"}}, ["required", "direction", "local_path"]),
    "JobTransferItem": obj({"location_alias": text(), "path": text(MAX_PATH_CHARS, pattern="^/[^\\x00]*$")},
                           ["location_alias", "path"]),
    "BatchJobPartition": obj({"job_mode": _ref("BatchJobMode"), "num_nodes": int32(1), "filter_tags": FILTER_TAGS},
                             ["job_mode", "num_nodes"]),
}

# -- responses -----------------------------------------------------------------------------------

ANY_INT = {"type": "integer"}
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Site": obj({"id": ANY_INT, "name": {"type": "string"}, "path": {"type": "string"},
                 "globus_endpoint_id": nullable({"type": "string"}), "backfill_windows": {"type": "object"},
                 "queued_jobs": {"type": "object"}, "optional_batch_job_params": {"type": "object"},
                 "allowed_projects": {"type": "array", "items": {"type": "string"}},
                 "allowed_queues": {"type": "object"}, "transfer_locations": {"type": "object"},
                 "last_refresh": WIRE_DATETIME, "creation_date": WIRE_DATETIME},
                required=["id", "name", "path", "globus_endpoint_id", "backfill_windows", "queued_jobs",
                          "optional_batch_job_params", "allowed_projects", "allowed_queues", "transfer_locations",
                          "last_refresh", "creation_date"]),
    "BacklogState": obj({"count": ANY_INT, "footprint": {"type": "number"}, "unpacked_footprint": ANY_INT,
                         "min_num_nodes": ANY_INT, "max_num_nodes": ANY_INT, "min_wall_time_min": ANY_INT,
                         "max_wall_time_min": ANY_INT, "oldest_last_update": WIRE_DATETIME},
                        ["count", "footprint", "unpacked_footprint", "min_num_nodes", "max_num_nodes",
                         "min_wall_time_min", "max_wall_time_min", "oldest_last_update"]),
    "Backlog": obj({"site_id": ANY_INT, "states": {"type": "object", "additionalProperties": _ref("BacklogState")}},
                   ["site_id", "states"]),
    "App": obj({"id": ANY_INT, "site_id": ANY_INT, "name": {"type": "string"}, "description": {"type": "string"},
                "parameters": {"type": "object"}, "transfers": {"type": "object"},
                "serialized_class": {"type": "string"}, "source_code": {"type": "string"}},
               required=["id", "site_id", "name", "description", "parameters", "transfers", "serialized_class",
                         "source_code"]),
    "Job": obj({"id": ANY_INT, "workdir": {"type": "string"}, "app_id": ANY_INT, "tags": {"type": "object"},
                "serialized_parameters": {"type": "string"}, "data": {"type": "object"},
                "return_code": nullable(ANY_INT), "num_nodes": ANY_INT, "ranks_per_node": ANY_INT,
                "threads_per_rank": ANY_INT, "threads_per_core": ANY_INT, "launch_params": {"type": "object"},
                "gpus_per_rank": {"type": "number"}, "node_packing_count": ANY_INT, "wall_time_min": ANY_INT,
                "parent_ids": {"type": "array", "items": ANY_INT}, "batch_job_id": nullable(ANY_INT),
                "state": _ref("JobState"), "pending_file_cleanup": {"type": "boolean"},
                "serialized_return_value": {"type": "string"}, "serialized_exception": {"type": "string"},
                "last_update": WIRE_DATETIME},
               required=["id", "workdir", "app_id", "tags", "serialized_parameters", "data", "return_code",
                         "num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core", "launch_params",
                         "gpus_per_rank", "node_packing_count", "wall_time_min", "parent_ids", "batch_job_id",
                         "state", "pending_file_cleanup", "serialized_return_value", "serialized_exception",
                         "last_update"]),
    "BatchJob": obj({"id": ANY_INT, "site_id": ANY_INT, "scheduler_id": nullable(ANY_INT),
                     "project": {"type": "string"}, "queue": {"type": "string"}, "optional_params": {"type": "object"},
                     "num_nodes": ANY_INT, "wall_time_min": ANY_INT, "job_mode": _ref("BatchJobMode"),
                     "partitions": nullable({"type": "array"}), "filter_tags": {"type": "object"},
                     "state": _ref("BatchJobState"), "status_info": {"type": "object"},
                     "start_time": nullable(WIRE_DATETIME), "end_time": nullable(WIRE_DATETIME)},
                    required=["id", "site_id", "scheduler_id", "project", "queue", "optional_params", "num_nodes",
                              "wall_time_min", "job_mode", "partitions", "filter_tags", "state", "status_info",
                              "start_time", "end_time"]),
    "Session": obj({"id": ANY_INT, "site_id": ANY_INT, "batch_job_id": nullable(ANY_INT), "heartbeat": WIRE_DATETIME},
                   required=["id", "site_id", "batch_job_id", "heartbeat"]),
    "Heartbeat": obj({"id": ANY_INT, "heartbeat": WIRE_DATETIME, "gone": array(ANY_INT), "expires": WIRE_DATETIME},
                     ["id", "heartbeat"]),
    "Released": obj({"id": ANY_INT, "released": array(ANY_INT)}, ["id", "released"]),
    "TransferItem": obj({"id": ANY_INT, "job_id": ANY_INT, "direction": _ref("TransferDirection"),
                         "local_path": {"type": "string"}, "remote_path": {"type": "string"},
                         "location_alias": {"type": "string"}, "recursive": {"type": "boolean"},
                         "state": _ref("TransferItemState"), "task_id": {"type": "string"},
                         "transfer_info": {"type": "object"}},
                        required=["id", "job_id", "direction", "local_path", "remote_path", "location_alias",
                                  "recursive", "state", "task_id", "transfer_info"]),
    "EventLog": obj({"id": ANY_INT, "job_id": ANY_INT, "timestamp": WIRE_DATETIME, "from_state": _ref("JobState"),
                     "to_state": _ref("JobState"), "data": {"type": "object"}},
                    required=["id", "job_id", "timestamp", "from_state", "to_state", "data"]),
    "User": obj({"id": ANY_INT, "username": {"type": "string"}}, ["id", "username"]),
    "Token": obj({"access_token": {"type": "string"}, "token_type": enum(["bearer"]), "expiration": WIRE_DATETIME,
                  "refresh_token": {"type": "string"}, "refresh_expiration": WIRE_DATETIME},
                 ["access_token", "token_type", "expiration"]),
    "Credential": obj({"id": ANY_INT, "kind": enum(list(CREDENTIAL_KINDS)),
                       "label": {"type": "string"}, "site_id": nullable(ANY_INT), "batch_job_id": nullable(ANY_INT),
                       "created": WIRE_DATETIME, "expires": WIRE_DATETIME, "last_used": nullable(WIRE_DATETIME),
                       "revoked": nullable(WIRE_DATETIME), "access_token": {"type": "string"},
                       "token_type": enum(["bearer"]), "expiration": WIRE_DATETIME},
                      ["id", "kind", "label", "site_id", "batch_job_id", "created", "expires", "last_used",
                       "revoked"]),
    "Error": {"type": "object", "required": ["detail"], "properties": {
        "detail": {},
        # A bulk request refused as a whole: every record that caused it (detail shows a few).
        "refused_ids": {"type": "array", "items": {"type": "integer"}}}},
    "JsonValue": JSON_VALUE,
    "JobState": enum(STATE_NAMES),
    "BatchJobState": enum([s.value for s in BatchJobState]),
    "BatchJobMode": enum([s.value for s in BatchJobMode]),
    "TransferItemState": enum([s.value for s in TransferItemState]),
    "TransferDirection": enum([s.value for s in TransferDirection]),
}


def _page(name: str) -> dict[str, Any]:
    return obj({"count": ANY_INT, "results": array(_ref(name))}, ["count", "results"])


# -- query parameters ---------------------------------------------------------------------------

#: Filters are bounded so that every query string the document allows fits the HTTP server's limit
#: (uvicorn on h11: 16 KiB for the request line and headers together) even when each character is
#: percent-encoded 4-byte UTF-8 (12 URL characters): at most QUERY_BUDGET characters of query string
#: per operation (tests/server/test_openapi.py computes each operation's worst case). The server
#: itself accepts more (any number of values, each up to MAX_QUERY_VALUE_CHARS characters) as long
#: as the URL gets through; a URL the HTTP server refuses never reaches it (400, text/plain).
QUERY_BUDGET = 14 * 1024
MAX_QUERY_IDS = 32
MAX_QUERY_TEXT_CHARS = 256
MAX_QUERY_TAGS, MAX_QUERY_TAG_CHARS = 8, 64
#: How every list parameter of ids or states is read (http.QueryParams._items): OpenAPI's
#: ``explode`` names one form; the server takes both.
LIST_FORMS = ("repeated (name=a&name=b, as Balsam 0.7's clients send it) or comma-separated (name=a,b), or both "
              "mixed; blanks around the commas are dropped; an empty value (name= or name=,) is refused (422)")


def q_list(items: dict[str, Any], max_items: int) -> dict[str, Any]:
    """A list query parameter of ids or states: repeated and/or comma-separated (LIST_FORMS)."""
    return {**array(items, max_items), "description": LIST_FORMS}


Q_INT_LIST = q_list(int32(), MAX_QUERY_IDS)
#: 64-bit ids are longer (up to 20 characters): a list of them holds fewer within the budget.
MAX_QUERY_IDS_64 = 30
Q_ID64_LIST = q_list(int64(), MAX_QUERY_IDS_64)
Q_KEY_VALUE = {**array(text(min(MAX_QUERY_TAG_CHARS, MAX_QUERY_VALUE_CHARS), pattern="^[^\\x00:]+:[^\\x00]*$"),
                       MAX_QUERY_TAGS),
               # JSON Schema cannot say "unique by the part before the colon" (http.QueryParams.key_values).
               "description": "KEY:VALUE, repeated for more keys; a key given twice with different values is "
                              "refused (422): a tag has one value"}
#: Text filters (http.TEXT_FILTERS): a client sends one non-empty. (Given empty, a listing reads no
#: filter, as Balsam 0.7 did; an update or delete by filter refuses it: docs/rest-api.md.)
#: The events' site and BatchJob id lists and key/value filters (two of each kind: fewer of each).
MAX_EVENT_QUERY_IDS, MAX_EVENT_QUERY_TAGS = 8, 7
Q_TEXT = text(min(MAX_QUERY_TEXT_CHARS, MAX_QUERY_VALUE_CHARS), min_length=1)
Q_DATETIME = REQUEST_DATETIME
PAGE_PARAMS = {"limit": int32(0, MAX_PAGE_SIZE), "offset": int32(0)}
QUERIES: dict[str, dict[str, Any]] = {
    "sites": {"name": Q_TEXT, "path": Q_TEXT, "id": Q_INT_LIST, "last_refresh_after": Q_DATETIME},
    "apps": {"site_id": Q_INT_LIST, "id": Q_INT_LIST, "name": Q_TEXT, "site_path": Q_TEXT, "site_name": Q_TEXT},
    "jobs": {"id": Q_ID64_LIST, "parent_id": Q_ID64_LIST, "app_id": int32(), "site_id": Q_INT_LIST,
             "batch_job_id": int32(), "last_update_before": Q_DATETIME, "last_update_after": Q_DATETIME,
             "workdir__contains": Q_TEXT, "state__ne": _ref("JobState"), "state": q_list(_ref("JobState"), len(JobState)),
             "tags": Q_KEY_VALUE, "pending_file_cleanup": {"type": "boolean"},
             "ordering": enum(["last_update", "-last_update", "id", "-id", "state", "-state", "workdir", "-workdir"]),
             "id__gt": int64()},
    "batch-jobs": {"id": Q_INT_LIST, "site_id": Q_INT_LIST,
                   "state": q_list(_ref("BatchJobState"), len(BatchJobState)),
                   "scheduler_id": int32(), "queue": Q_TEXT,
                   "ordering": enum(["start_time", "-start_time", "id", "-id"]),
                   "start_time_before": Q_DATETIME, "start_time_after": Q_DATETIME, "end_time_before": Q_DATETIME,
                   "end_time_after": Q_DATETIME, "filter_tags": Q_KEY_VALUE, "id__gt": int32()},
    "backlog": {"state": q_list(_ref("JobState"), len(JobState)),
                "tags": array(text(MAX_BACKLOG_TAG_CHARS, pattern="^[^\\x00:]+:[^\\x00]*$"), MAX_BACKLOG_TAGS),
                # What a launcher acquiring with the same limits could lease (the acquire's rules),
                # and the jobs of given BatchJobs (an auto-scaler's own: its running footprint).
                "max_nodes_per_job": int32(1), "serial_only": {"type": "boolean"}, "max_wall_time_min": int32(0),
                "batch_job_id": Q_INT_LIST,
                # Only jobs a launcher session holds (true) or none holds (false: still unmet demand).
                "leased": {"type": "boolean"},
                # The acquire's GPU bound (0: what a launcher on GPU-less nodes leases), in plain
                # decimal as the route reads it (backlog.parse_gpu_bound: no sign, exponent or
                # other digits), 0 to 1e9; maxLength: its text, which the route bounds.
                "max_gpus_per_node": {"type": "string", "maxLength": MAX_GPU_BOUND_CHARS,
                                      "pattern": GPU_BOUND_PATTERN},
                # The nodes' shape: each job's footprint counts its GPUs and CPU ids (docs/elastic.md).
                "node_gpus": int32(1), "node_cpus": int32(1), "cpu_ids_are_cores": {"type": "boolean"},
                "hardware_threads_per_core": int32(0)},
    "sessions": {"id": Q_ID64_LIST},
    "transfers": {"id": Q_ID64_LIST, "site_id": Q_INT_LIST, "job_id": Q_ID64_LIST,
                  "state": q_list(_ref("TransferItemState"), len(TransferItemState)),
                  "direction": _ref("TransferDirection"),
                  "job_state": _ref("JobState"), "tags": Q_KEY_VALUE,
                  "ordering": enum(["id", "-id", "state", "-state"]), "id__gt": int64()},
    # site_id and batch_job_id are lists (the route's int_list), bounded with the key/value filters
    # so that the events' worst query string stays within QUERY_BUDGET.
    "events": {"id": Q_ID64_LIST, "job_id": Q_ID64_LIST, "site_id": q_list(int32(), MAX_EVENT_QUERY_IDS),
               "batch_job_id": q_list(int32(), MAX_EVENT_QUERY_IDS), "scheduler_id": int32(),
               "tags": {**Q_KEY_VALUE, "maxItems": MAX_EVENT_QUERY_TAGS},
               "data": {**Q_KEY_VALUE, "maxItems": MAX_EVENT_QUERY_TAGS}, "timestamp_before": Q_DATETIME,
               "timestamp_after": Q_DATETIME, "from_state": _ref("JobState"), "to_state": _ref("JobState"),
               "ordering": enum(["timestamp", "-timestamp"]), "id__gt": int64()},
    "credentials": {"kind": enum(list(CREDENTIAL_KINDS)), "site_id": int32(),
                    "batch_job_id": int32(), "active": {"type": "boolean"}},
}
#: ``PUT /jobs/`` by filter only (jobs_logic.UPDATE_FILTERS): not a Balsam 0.7 filter.
JOB_UPDATE_QUERY: dict[str, Any] = {
    "leased": {"type": "boolean", "description": "true: only jobs a session (a launcher's lease) holds; false: only "
                                                 "jobs none holds. Checked with the other filters under the update's "
                                                 "row locks"},
}


def _params(query: "dict[str, Any]", page: bool = False) -> list[dict[str, Any]]:
    params = {**query, **(PAGE_PARAMS if page else {})}
    return [{"name": n, "in": "query", "required": False, "schema": s, **({"explode": True} if s.get("type") == "array" else {})}
            for n, s in sorted(params.items())]


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "integer", "format": "int64", "minimum": INT64_MIN, "maximum": INT64_MAX}}


# -- operations ----------------------------------------------------------------------------------

#: Creating requests (POST outside /auth), updates and deletes (PUT, PATCH, DELETE but the session
#: heartbeat) may carry one; see docs/reliability.md.
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]([ -~]*[!-~])?$"},
    "description": "one per logical request, resent unchanged on retries: applied once (docs/reliability.md)",
}

ERRORS = {"400": "Bad request (e.g. more than 5,000 items)", "401": "Not authenticated",
          "403": "Not allowed (closed registration, a site-scoped credential)", "404": "Not found",
          "409": "Conflicts with the current data (duplicate name, state change not allowed now)",
          "413": "Request body too large", "422": "Invalid input (field and reason)",
          "429": "Too many failed logins (Retry-After)",
          "503": "Database unavailable: retry after the Retry-After header's seconds"}
FORM = "application/x-www-form-urlencoded"


def _op(summary: str, *, body: Any = None, status: int = 200, response: Any = None, params: "list | None" = None,
        public: bool = False, form: bool = False, errors: "dict[str, str] | None" = None) -> dict[str, Any]:
    """An operation; ``errors``: descriptions of error statuses that say more than ``ERRORS``."""
    op: dict[str, Any] = {"summary": summary, "parameters": list(params or [])}
    if body is not None:
        schema = _ref(body) if isinstance(body, str) else body
        op["requestBody"] = {"required": True, "content": {FORM if form else "application/json": {"schema": schema}}}
    responses: dict[str, Any] = {}
    if response is None:
        responses[str(status)] = {"description": "No content"}
    else:
        schema = _ref(response) if isinstance(response, str) else response
        responses[str(status)] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
    for code, what in {**ERRORS, **(errors or {})}.items():
        responses[code] = {"description": what, "content": {"application/json": {"schema": _ref("Error")}}}
    op["responses"] = responses
    if public:
        op["security"] = []
    return op


def build_openapi(settings: Any = None) -> dict[str, Any]:
    min_password = getattr(settings, "min_password_length", 12)
    max_ttl = getattr(settings, "launcher_max_ttl_sec", 30 * 24 * 3600)
    defs: dict[str, Any] = {**copy.deepcopy(REQUEST_SCHEMAS), **copy.deepcopy(RESPONSE_SCHEMAS)}
    login_fields = {name: text(1024) for name in ("grant_type", "scope", "client_id", "client_secret")}
    defs["LoginForm"] = obj({"username": text(1024, min_length=1), "password": text(1024, min_length=1),
                             **login_fields, "label": text(1024)}, ["username", "password"])
    defs["RefreshForm"] = obj({"refresh_token": text(1024, min_length=1), "grant_type": enum(["refresh_token"]),
                               "scope": text(1024), "client_id": text(1024), "client_secret": text(1024)},
                              ["refresh_token"])
    defs["UserCreate"] = obj({"username": {"type": "string", "pattern": "^[A-Za-z0-9_.@+-]{1,150}$"},
                              "password": text(1024, min_length=min_password),
                              "invitation": text(1024)}, ["username", "password"])
    defs["CredentialCreate"] = obj({"kind": enum(["launcher"]), "site_id": int32(1), "batch_job_id": nullable(int32(1)),
                                    "ttl_sec": int32(1, max_ttl), "label": text(200)}, ["site_id", "ttl_sec"])
    defs["CredentialRenew"] = obj({"ttl_sec": int32(1, max_ttl)}, ["ttl_sec"])
    jobs_list = array(_ref("Job"))
    q = QUERIES
    paths: dict[str, dict[str, Any]] = {
        "/auth/how": {"get": _op("List the login methods", response=array({"type": "string"}), public=True)},
        "/auth/password/login": {"post": _op("Password login (form fields; scope=offline_access adds a refresh "
                                             "credential)", body="LoginForm", form=True, response="Token", public=True)},
        "/auth/password/register": {"post": _op("Register a user (when the server allows it)", body="UserCreate",
                                                status=201, response="User", public=True)},
        "/auth/token": {"post": _op("Exchange a refresh credential for an access token", body="RefreshForm",
                                    form=True, response="Token", public=True)},
        "/auth/password/me": {"get": _op("The current user", response="User")},
        "/auth/logout": {"post": _op("Revoke the calling credential", status=204)},
        "/auth/credentials": {
            "get": _op("List your credentials", response=_page("Credential"), params=_params(q["credentials"], True)),
            "post": _op("Create a site-scoped launcher credential", body="CredentialCreate", status=201,
                        response="Credential")},
        "/auth/credentials/{credential_id}": {"delete": _op("Revoke a credential", status=204,
                                                            params=[_path_id("credential_id")])},
        "/auth/credentials/{credential_id}/renew": {"post": _op("Extend a launcher credential", body="CredentialRenew",
                                                                response="Credential",
                                                                params=[_path_id("credential_id")])},
        "/sites/": {"get": _op("List sites", response=_page("Site"), params=_params(q["sites"], True)),
                    "post": _op("Create a site", body="SiteCreate", status=201, response="Site")},
        "/sites/{site_id}": {"get": _op("Read a site", response="Site", params=[_path_id("site_id")]),
                             "put": _op("Update a site (sets last_refresh)", body="SiteUpdate", response="Site",
                                        params=[_path_id("site_id")]),
                             "delete": _op("Delete a site and everything in it", status=204,
                                           params=[_path_id("site_id")])},
        "/sites/{site_id}/backlog": {"get": _op("A site's jobs per state: count, node footprint, sizes (auto-scalers)",
                                                response="Backlog",
                                                params=[_path_id("site_id"), *_params(q["backlog"])])},
        "/apps/": {"get": _op("List apps", response=_page("App"), params=_params(q["apps"], True)),
                   "post": _op("Create an app", body="AppCreate", status=201, response="App")},
        "/apps/{app_id}": {"get": _op("Read an app", response="App", params=[_path_id("app_id")]),
                           "put": _op("Update an app", body="AppUpdate", response="App", params=[_path_id("app_id")]),
                           "delete": _op("Delete an app and its jobs", status=204, params=[_path_id("app_id")])},
        "/jobs/": {
            "get": _op("List jobs (filters, ordering, pagination)", response=_page("Job"), params=_params(q["jobs"], True)),
            "post": _op("Bulk-create jobs", body=array(_ref("JobCreate"), MAX_ITEMS_PER_BULK_OP), status=201,
                        response=jobs_list),
            "patch": _op("Bulk-update jobs by id; returns the count", body=array(_ref("JobPatch"), MAX_ITEMS_PER_BULK_OP),
                         response=ANY_INT),
            "put": _op("Apply one update to the jobs matching the filters; returns the count", body="JobUpdate",
                       response=ANY_INT, params=_params({**q["jobs"], **JOB_UPDATE_QUERY})),
            "delete": _op("Delete the jobs matching the filters; returns the count", response=ANY_INT,
                          params=_params(q["jobs"]))},
        "/jobs/reservations": {"post": _op(
            "Reserve Idempotency-Keys with job ids for the chunks of one bulk create (sent side by side, ids in order)",
            body=obj({"sizes": array({"type": "integer", "minimum": 1, "maximum": MAX_ITEMS_PER_BULK_OP},
                                     MAX_CHUNKS_PER_RESERVATION) | {"minItems": 1}}, required=["sizes"]),
            response=obj({"parallel": {"type": "integer", "minimum": 1},
                          "reservations": array(obj({"idempotency_key": {"type": "string"}, "size": ANY_INT,
                                                     "first_id": ANY_INT, "last_id": ANY_INT},
                                                    required=["idempotency_key", "size", "first_id", "last_id"]))},
                         required=["parallel", "reservations"]),
            errors={"429": "The user's reserved ids not used yet, with these, would pass the per-user budget "
                           "(Retry-After: when enough of them expire); send the chunks one after the other "
                           "without reservation"})},
        "/jobs/{job_id}": {"get": _op("Read a job", response="Job", params=[_path_id("job_id")]),
                           "put": _op("Update a job; returns 1", body="JobUpdate", response=ANY_INT,
                                      params=[_path_id("job_id")]),
                           "delete": _op("Delete a job", status=204, params=[_path_id("job_id")])},
        "/batch-jobs/": {
            "get": _op("List batch jobs", response=_page("BatchJob"), params=_params(q["batch-jobs"], True)),
            "post": _op("Create a batch job", body="BatchJobCreate", status=201, response="BatchJob"),
            "patch": _op("Bulk-update batch jobs", body=array(_ref("BatchJobPatch"), MAX_ITEMS_PER_BULK_OP),
                         response=array(_ref("BatchJob")))},
        "/batch-jobs/{batch_job_id}": {
            "get": _op("Read a batch job", response="BatchJob", params=[_path_id("batch_job_id")]),
            "put": _op("Update a batch job", body="BatchJobUpdate", response="BatchJob", params=[_path_id("batch_job_id")]),
            "delete": _op("Delete a batch job", status=204, params=[_path_id("batch_job_id")])},
        "/sessions/": {"get": _op("List sessions", response=_page("Session"), params=_params(q["sessions"], True)),
                       "post": _op("Create a session", body="SessionCreate", status=201, response="Session")},
        "/sessions/{session_id}": {
            "post": _op("Acquire jobs", body="SessionAcquire", response=jobs_list, params=[_path_id("session_id")]),
            "put": _op("Heartbeat; with job_ids, answers in gone those of them the session no longer holds",
                       body="SessionTick", response="Heartbeat", params=[_path_id("session_id")]),
            "delete": _op("End a session (RUNNING jobs become RUN_TIMEOUT)", status=204, params=[_path_id("session_id")])},
        "/sessions/{session_id}/release": {
            "post": _op("Give back leased jobs not started (those the session holds in a runnable state are "
                        "leasable again at once); answers the ids given back", body="SessionRelease",
                        response="Released", params=[_path_id("session_id")])},
        "/transfers/": {
            "get": _op("List transfer items", response=_page("TransferItem"), params=_params(q["transfers"], True)),
            "patch": _op("Bulk-update transfer items", body=array(_ref("TransferPatch"), MAX_ITEMS_PER_BULK_OP),
                         response=array(_ref("TransferItem")))},
        "/transfers/{transfer_id}": {
            "get": _op("Read a transfer item", response="TransferItem", params=[_path_id("transfer_id")]),
            "put": _op("Update a transfer item", body="TransferUpdate", response="TransferItem",
                       params=[_path_id("transfer_id")])},
        "/events/": {"get": _op("List job state events", response=_page("EventLog"), params=_params(q["events"], True))},
    }
    # A rule JSON Schema cannot state (uniqueItems compares whole items, not their ids).
    paths["/jobs/"]["patch"]["description"] = (
        "A job named more than once has its updates applied in the order they come, each state change "
        "validated from the state the one before it left and recorded as its own event; the answer counts the jobs.")
    for path, ops in paths.items():
        if "post" in ops and not path.startswith("/auth") and path != "/jobs/reservations":
            ops["post"]["parameters"].append(IDEMPOTENCY_KEY)
        # Updates and deletes: the routing layer claims and records the key (except the heartbeat).
        for method in ("put", "patch", "delete"):
            if method in ops and (method.upper(), path) not in NOT_REPLAYED:
                ops[method]["parameters"].append(IDEMPOTENCY_KEY)
    return {"openapi": "3.1.0", "info": {"title": "Balsam API", "version": balsam.__version__}, "paths": paths,
            "components": {"schemas": defs,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
            "security": [{"bearer": []}]}


def openapi_route():
    def handler(ctx):
        state = ctx.request.app.state
        if getattr(state, "openapi", None) is None:
            state.openapi = build_openapi(ctx.settings)
        return JSONResponse(state.openapi)

    return route("/openapi.json", {"GET": handler}, public=True)
