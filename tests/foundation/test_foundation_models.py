"""Every model: full round-trips through JSON-ready dicts, and bad payloads named field by field."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

import attrs
import pytest

from balsam import models
from balsam.serialization import PayloadError, from_dict, partial_from_dict, to_dict
from balsam.states import JobState

T0 = "2026-01-02T03:04:05+00:00"
T1 = "2026-01-02T04:05:06.250000+00:00"

# One payload per model with every field set to a non-default value (wire format).
PAYLOADS: dict[type, dict] = {
    models.User: {"id": 3, "username": "alice"},
    models.AllowedQueue: {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 2, "min_nodes": 2},
    models.BackfillWindow: {"num_nodes": 4, "wall_time_min": 30},
    models.SchedulerJobStatus: {
        "scheduler_id": 123, "state": "queued", "queue": "debug", "num_nodes": 2, "wall_time_min": 30,
        "project": "proj", "time_remaining_min": 30, "queued_time_min": 4, "message": "PartitionNodeLimit",
    },
    models.Site: {
        "id": 5, "name": "laptop", "path": "/home/alice/site", "globus_endpoint_id": "abc-123",
        "backfill_windows": {"debug": [{"num_nodes": 4, "wall_time_min": 30}]},
        "queued_jobs": {"123": {
            "scheduler_id": 123, "state": "running", "queue": "debug", "num_nodes": 2, "wall_time_min": 30,
            "project": "proj", "time_remaining_min": 12, "queued_time_min": 0,
        }},  # no message: 0.7's format, which is also how one without a message is sent
        "optional_batch_job_params": {"shout": "hi"},
        "allowed_projects": ["proj"],
        "allowed_queues": {"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 2}},
        "transfer_locations": {"dtn": "globus://abc"},
        "last_refresh": T0,
        "creation_date": T1,
    },
    models.AppParameter: {"required": False, "default": "x", "help": "a parameter"},
    models.TransferSlot: {"required": True, "direction": "in", "local_path": "in.dat", "description": "input",
                          "recursive": True},
    models.App: {
        "id": 9, "site_id": 5, "name": "hello.Hello", "serialized_class": "gASV", "source_code": "class Hello: ...",
        "description": "says hello",
        "parameters": {"name": {"required": True, "default": None, "help": ""}},
        "transfers": {"inp": {"required": True, "direction": "in", "local_path": "in.dat", "description": "",
                              "recursive": False}},
    },
    models.JobTransferItem: {"location_alias": "dtn", "path": "/data/in.dat"},
    models.Job: {
        "id": 11, "workdir": "runs/1", "app_id": 9, "tags": {"experiment": "xpcs"}, "serialized_parameters": "gASV",
        "data": {"score": 1.5, "nested": {"a": [1, 2]}}, "return_code": 0, "num_nodes": 2, "ranks_per_node": 4,
        "threads_per_rank": 2, "threads_per_core": 2, "launch_params": {"cpu_bind": "depth"}, "gpus_per_rank": 0.5,
        "node_packing_count": 2, "wall_time_min": 10, "parent_ids": [1, 2, 3],
        "transfers": {"inp": {"location_alias": "dtn", "path": "/data/in.dat"}}, "batch_job_id": 4,
        "state": "RUN_DONE", "state_timestamp": T0, "state_data": {"note": "done"}, "pending_file_cleanup": False,
        "serialized_return_value": "gASVret", "serialized_exception": "gASVexc", "last_update": T1,
    },
    models.BatchJobPartition: {"job_mode": "serial", "num_nodes": 1, "filter_tags": {"k": "v"}},
    models.BatchJob: {
        "id": 4, "site_id": 5, "project": "proj", "queue": "debug", "num_nodes": 2, "wall_time_min": 30,
        "job_mode": "mpi", "optional_params": {"shout": "hi"}, "filter_tags": {"k": "v"},
        "partitions": [{"job_mode": "serial", "num_nodes": 1, "filter_tags": {}},
                       {"job_mode": "mpi", "num_nodes": 1, "filter_tags": {"k": "v"}}],
        "scheduler_id": 123, "state": "running", "status_info": {"submit_time": T0}, "start_time": T0,
        "end_time": T1,
    },
    models.Session: {"id": 2, "site_id": 5, "batch_job_id": 4, "heartbeat": T0},
    models.SessionAcquire: {
        "max_num_jobs": 100, "filter_tags": {"k": "v"}, "max_wall_time_min": 30, "max_nodes_per_job": 2,
        "max_aggregate_nodes": 3.5, "max_gpus_per_node": 0.0, "serial_only": True, "sort_by": "long_large_first",
        "states": ["PREPROCESSED", "RESTART_READY"], "app_ids": [7, 9],
    },
    models.TransferItem: {
        "id": 1, "job_id": 11, "direction": "out", "local_path": "out.dat", "remote_path": "/remote/out.dat",
        "location_alias": "dtn", "recursive": False, "state": "active", "task_id": "task-1",
        "transfer_info": {"bytes": 10},
    },
    models.EventLog: {"id": 1, "job_id": 11, "timestamp": T0, "from_state": "RUNNING", "to_state": "RUN_DONE",
                      "data": {"message": "ok"}},
}

EVERY_MODEL = [
    models.AllowedQueue, models.BackfillWindow, models.SchedulerJobStatus, models.AppParameter, models.TransferSlot,
    models.JobTransferItem, models.BatchJobPartition, models.SessionAcquire, *models.ALL_MODELS,
]


def model_ids(values):
    return [m.__name__ for m in values]


def test_every_model_has_a_payload():
    assert set(EVERY_MODEL) <= set(PAYLOADS)


def normalize(cls, payload):
    """What the wire format of ``payload`` looks like after a round-trip (dict keys become strings)."""
    data = copy.deepcopy(payload)
    if cls is models.Site:
        data["queued_jobs"] = {str(k): v for k, v in data["queued_jobs"].items()}
    return data


@pytest.mark.parametrize("cls", EVERY_MODEL, ids=model_ids(EVERY_MODEL))
def test_round_trip(cls):
    payload = PAYLOADS[cls]
    obj = from_dict(cls, payload)
    # Every field was set away from its default, so the round-trip really covers all fields.
    for field in attrs.fields(cls):
        if field.default is not attrs.NOTHING and not isinstance(field.default, attrs.Factory):
            assert getattr(obj, field.name) != field.default or field.name in ("recursive", "default", "required"), (
                f"{cls.__name__}.{field.name} left at its default in the sample payload"
            )
    data = json.loads(json.dumps(to_dict(obj)))  # JSON-ready (int dict keys become strings)
    again = from_dict(cls, data)
    assert again == obj
    for key, value in normalize(cls, payload).items():
        if key in ("parent_ids", "app_ids", "states"):
            assert data[key] == sorted(value)
        else:
            assert data[key] == value, key


def test_types_after_structuring():
    job = from_dict(models.Job, PAYLOADS[models.Job])
    assert job.state is JobState.run_done
    assert job.workdir == Path("runs/1")
    assert job.parent_ids == {1, 2, 3}
    assert job.state_timestamp == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    site = from_dict(models.Site, PAYLOADS[models.Site])
    assert isinstance(site.queued_jobs[123], models.SchedulerJobStatus)
    assert site.allowed_queues["debug"].max_nodes == 8


def test_scheduler_job_status_without_message_is_the_07_format():
    """0.7 agents send queued_jobs without ``message``: still accepted, read as no message, and
    sent back in 0.7's format (a 0.7 client under pydantic's extra="allow" refuses the key)."""
    old = {k: v for k, v in PAYLOADS[models.SchedulerJobStatus].items() if k != "message"}
    status = from_dict(models.SchedulerJobStatus, old)
    assert status.message == ""
    assert to_dict(status) == old


def test_naive_datetimes_are_utc():
    session = from_dict(models.Session, {"site_id": 1, "heartbeat": "2026-01-02T03:04:05"})
    assert session.heartbeat.tzinfo == dt.timezone.utc
    assert to_dict(session)["heartbeat"] == T0


# A required field each model cannot do without, and a field with a wrong type.
REQUIRED = {
    models.User: "username", models.AllowedQueue: "max_nodes", models.BackfillWindow: "num_nodes",
    models.SchedulerJobStatus: "scheduler_id", models.Site: "name", models.AppParameter: "required",
    models.TransferSlot: "direction", models.App: "serialized_class", models.JobTransferItem: "path",
    models.Job: "app_id", models.BatchJobPartition: "job_mode", models.BatchJob: "wall_time_min",
    models.Session: "site_id", models.SessionAcquire: "max_num_jobs", models.TransferItem: "job_id",
    models.EventLog: "timestamp",
}
WRONG_TYPE = {
    models.User: ("username", 5, "expected a string"),
    models.AllowedQueue: ("max_walltime", "long", "expected an integer"),
    models.BackfillWindow: ("wall_time_min", [1], "expected an integer"),
    models.SchedulerJobStatus: ("state", "sleeping", "expected one of"),
    models.Site: ("allowed_projects", "proj", "expected a list, got 'proj'"),
    models.AppParameter: ("required", "yes", "expected true or false"),
    models.TransferSlot: ("direction", "sideways", "expected one of in, out"),
    models.App: ("site_id", "five", "expected an integer"),
    models.JobTransferItem: ("path", 3, "expected a path string"),
    models.Job: ("state", "DONE", "expected one of"),
    models.BatchJobPartition: ("num_nodes", "two", "expected an integer"),
    models.BatchJob: ("job_mode", "parallel", "expected one of serial, mpi"),
    models.Session: ("heartbeat", "yesterday", "expected an ISO-8601 datetime"),
    models.SessionAcquire: ("app_ids", "12", "expected a list, got '12'"),
    models.TransferItem: ("state", "lost", "expected one of"),
    models.EventLog: ("timestamp", "noon", "expected an ISO-8601 datetime"),
}


@pytest.mark.parametrize("cls", EVERY_MODEL, ids=model_ids(EVERY_MODEL))
def test_missing_required_field(cls):
    payload = copy.deepcopy(PAYLOADS[cls])
    del payload[REQUIRED[cls]]
    with pytest.raises(PayloadError) as info:
        from_dict(cls, payload)
    assert info.value.model == cls.__name__
    assert (REQUIRED[cls], "field required") in info.value.errors
    assert str(info.value).startswith(f"invalid {cls.__name__}: ")


@pytest.mark.parametrize("cls", EVERY_MODEL, ids=model_ids(EVERY_MODEL))
def test_wrong_type(cls):
    field, value, problem = WRONG_TYPE[cls]
    payload = copy.deepcopy(PAYLOADS[cls])
    payload[field] = value
    with pytest.raises(PayloadError) as info:
        from_dict(cls, payload)
    paths = [path for path, _ in info.value.errors]
    assert any(path == field or path.startswith(field) for path in paths), info.value.errors
    assert problem in str(info.value)


@pytest.mark.parametrize("cls", EVERY_MODEL, ids=model_ids(EVERY_MODEL))
def test_unknown_field(cls):
    payload = dict(PAYLOADS[cls], surprise=1)
    with pytest.raises(PayloadError) as info:
        from_dict(cls, payload)
    assert ("surprise", "unknown field") in info.value.errors


@pytest.mark.parametrize("cls", EVERY_MODEL, ids=model_ids(EVERY_MODEL))
def test_not_an_object(cls):
    with pytest.raises(PayloadError, match=f"invalid {cls.__name__}: expected a JSON object, got list"):
        from_dict(cls, [1, 2])


def test_nested_errors_name_the_path():
    payload = copy.deepcopy(PAYLOADS[models.BatchJob])
    payload["partitions"][1]["num_nodes"] = "many"
    with pytest.raises(PayloadError) as info:
        from_dict(models.BatchJob, payload)
    assert info.value.errors == [("partitions[1].num_nodes", "expected an integer, got 'many'")]


def test_partial_update():
    allowed = set(models.writable_fields(models.Job, on="update"))
    assert "state_data" in allowed and "id" not in allowed and "parent_ids" not in allowed
    values = partial_from_dict(models.Job, {"state": "RUNNING", "num_nodes": 3}, allowed=allowed)
    assert values == {"state": JobState.running, "num_nodes": 3}
    with pytest.raises(PayloadError) as info:
        partial_from_dict(models.Job, {"parent_ids": [1], "nope": 2, "num_nodes": "x"}, allowed=allowed)
    errors = dict(info.value.errors)
    assert errors["parent_ids"] == "cannot be changed"
    assert errors["nope"] == "unknown field"
    assert "expected an integer" in errors["num_nodes"]


def test_field_roles():
    assert models.writable_fields(models.Job, on="create").count("parent_ids") == 1
    assert "state_timestamp" not in models.writable_fields(models.Job, on="create")
    assert models.field_role(models.Job, "id") == "server"


def test_one_batch_job_rule_for_the_client_and_the_agent():
    """BatchJob.validate (client side) and the scheduler module (agent side) call one function."""
    import balsam._api.models as client_models
    import balsam.site.modules.scheduler as agent_module
    from balsam.batch_job_rules import BatchJobRefused, check_batch_job
    from balsam.models import AllowedQueue

    assert client_models.check_batch_job is check_batch_job and agent_module.check_batch_job is check_batch_job
    queues = {"debug": AllowedQueue(max_nodes=4, max_walltime=60, max_queued_jobs=1)}
    ok = {"queue": "debug", "project": "p", "num_nodes": 4, "wall_time_min": 60, "optional_params": {"mig": "1"},
          "partitions": [{"num_nodes": 1}, {"num_nodes": 3}]}
    check_batch_job(ok, queues, ["p"], {"mig": "0"})
    check_batch_job(ok, {"debug": {"max_nodes": 4, "max_walltime": 60}}, [], {"mig": "0"})  # [] projects: any
    cases = [
        ({}, {}, "queue 'debug' is not allowed: the site has no allowed_queues"),
        ({"queue": "prod"}, queues, "queue 'prod' is not in the site's allowed_queues (debug)"),
        ({"num_nodes": 0}, queues, "num_nodes 0 is outside 1..4 allowed in queue 'debug'"),
        ({"wall_time_min": 0}, queues, "wall_time_min 0 is outside 1..60 allowed in queue 'debug'"),
        ({"wall_time_min": 61}, queues, "wall_time_min 61 is outside 1..60 allowed in queue 'debug'"),
        ({"project": "q"}, queues, "project 'q' is not in the site's allowed_projects (p)"),
        ({"optional_params": {"x": "1"}}, queues, "unknown optional param(s) x (optional_batch_job_params: mig)"),
        ({"partitions": [{"num_nodes": 1}]}, queues, "the partitions' num_nodes add up to 1, not the BatchJob's num_nodes 4"),
    ]
    for change, allowed, message in cases:
        with pytest.raises(BatchJobRefused) as info:
            check_batch_job({**ok, **change}, allowed, ["p"], {"mig": "0"})
        assert str(info.value) == message
    # The client's model object goes through the same function: same refusal, same words.
    bj = client_models.BatchJob(site_id=1, num_nodes=2, wall_time_min=10, job_mode="mpi", queue="debug", project="p")
    with pytest.raises(ValueError, match="^queue 'debug' is not allowed: the site has no allowed_queues$"):
        bj.validate({}, ["p"], {})
    with pytest.raises(ValueError, match="^queue 'debug' is not allowed: the site has no allowed_queues$"):
        agent_module.validate_batch_job({"queue": "debug", "project": "p", "num_nodes": 2, "wall_time_min": 10},
                                        agent_module.SchedulerSettings(allowed_queues={}))
