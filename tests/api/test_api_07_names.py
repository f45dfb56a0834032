"""Balsam 0.7 names that scripts and hooks import or catch: ``balsam.schemas``,
``JobState.job_finished``, ``SiteConfig().client``, ``Job.NoResult`` as a ValueError and
``ServerUnavailable`` as a TimeoutError."""

from __future__ import annotations

import pickle
import socket

import pytest


# ----------------------------------------------------------------------------------- balsam.schemas
#: What 0.7's ``balsam.schemas`` exported that has an equivalent here (its pydantic request and
#: response models have none; see balsam/schemas/__init__.py).
SCHEMAS_07_NAMES = [
    "AllowedQueue", "AppParameter", "TransferSlot", "BatchJobState", "BatchJobPartition", "JobMode",
    "SessionAcquire", "MAX_JOBS_PER_SESSION_ACQUIRE", "JobState", "JobTransferItem", "RUNNABLE_STATES",
    "DONE_STATES", "TransferItemState", "TransferDirection", "SchedulerBackfillWindow", "SchedulerJobStatus",
    "serialize", "deserialize", "serialize_exception", "raise_from_serialized", "get_source",
    "SerializeError", "DeserializeError", "EmptyPayload", "MAX_ITEMS_PER_BULK_OP",
]


def test_balsam_schemas_offers_the_07_names_that_exist_here() -> None:
    import balsam.api
    import balsam.schemas
    import balsam.states

    missing = [name for name in SCHEMAS_07_NAMES if not hasattr(balsam.schemas, name)]
    assert missing == []
    from balsam.schemas import DONE_STATES, RUNNABLE_STATES, BatchJobState, JobMode, JobState  # noqa: F401

    # The same objects as the rest of the API, not copies: a state from one compares to the other's.
    assert balsam.schemas.JobState is balsam.api.JobState is balsam.states.JobState
    assert balsam.schemas.JobTransferItem is balsam.api.JobTransferItem
    assert balsam.schemas.JobMode is balsam.api.JobMode
    assert RUNNABLE_STATES == {JobState.preprocessed, JobState.restart_ready}
    assert DONE_STATES == {JobState.job_finished, JobState.failed}


def test_balsam_schemas_serializer_round_trips_07_payloads() -> None:
    from balsam.schemas import EmptyPayload, deserialize, raise_from_serialized, serialize, serialize_exception
    from balsam.schemas.serializer import deserialize as deserialize_07_path

    assert deserialize(serialize({"x": [1, 2]})) == {"x": [1, 2]}
    assert deserialize_07_path is deserialize
    with pytest.raises(EmptyPayload):
        deserialize("")
    try:
        raise KeyError("lost")
    except KeyError as exc:
        payload = serialize_exception(exc)
    with pytest.raises(KeyError, match="lost"):
        raise_from_serialized(payload)


# ----------------------------------------------------------------------------------- JobState.job_finished
def test_job_finished_is_an_alias_that_leaves_the_state_lists_alone() -> None:
    from balsam.cli.job import _states
    from balsam.server.openapi import STATE_NAMES
    from balsam.states import JobState

    assert JobState.job_finished is JobState.finished
    assert JobState("JOB_FINISHED") is JobState.job_finished
    assert JobState.parse("JOB_FINISHED") is JobState.job_finished
    # Iteration skips aliases: every list built from JobState names each state once.
    assert len(list(JobState)) == len({s.value for s in JobState}) == 14
    assert STATE_NAMES.count("JOB_FINISHED") == 1
    assert _states().count("JOB_FINISHED") == 1


def test_a_filter_by_job_finished_finds_the_finished_jobs(site, run_jobs) -> None:
    from balsam.api import ApplicationDefinition, Job, JobState

    Echo = type("Echo", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ x }}"})
    done, waiting = Echo.submit("a", x=1), Echo.submit("b", x=2)
    run_jobs(site, [done])
    assert [j.id for j in Job.objects.filter(state=JobState.job_finished)] == [done.id]
    assert [j.id for j in Job.objects.filter(state={JobState.job_finished, JobState.failed})] == [done.id]
    assert [j.id for j in Job.objects.filter(state__ne=JobState.job_finished)] == [waiting.id]
    assert Job.objects.get(id=done.id).state == JobState.job_finished


# ----------------------------------------------------------------------------------- SiteConfig().client
def test_site_config_client_is_a_client_with_bound_models(site, monkeypatch) -> None:
    from balsam.client import RESTClient
    from balsam.config import SiteConfig

    (site.path / ".balsam-site").write_text(str(site.id))
    monkeypatch.setenv("BALSAM_SITE_PATH", str(site.path))
    config = SiteConfig()
    client = config.client
    assert isinstance(client, RESTClient)
    assert config.client is client  # made once per SiteConfig
    for name in ("Site", "App", "Job", "BatchJob", "Session", "TransferItem", "EventLog"):
        assert getattr(client, name)._client is client, name
    assert [s.id for s in client.Site.objects.filter(id=site.id)] == [site.id]
    assert client.Job.objects.count() == 0
    # A SiteConfig sent to a worker process travels without its client (locks, sockets).
    copy = pickle.loads(pickle.dumps(config))
    assert copy.site_path == config.site_path and copy._client is None
    assert isinstance(copy.client, RESTClient)


def test_client_settings_from_balsam_config_build_a_client_as_in_07(balsam_env, tmp_path) -> None:
    """0.7 scripts: ``from balsam.config import ClientSettings``; ``ClientSettings.load_from_file()
    .build_client()`` (an ImportError here before)."""
    from balsam.client import RESTClient
    from balsam.config import ClientSettings

    settings = ClientSettings.load_from_file()
    client = settings.build_client()
    assert isinstance(client, RESTClient) and client.whoami()["username"] == balsam_env.username
    copy = tmp_path / "copy.yml"
    settings.save_to_file(copy)
    assert ClientSettings.load_from_file(copy).build_client().whoami()["username"] == balsam_env.username
    with pytest.raises(AttributeError, match="no attribute 'ClientSetting'"):
        import balsam.config

        balsam.config.ClientSetting  # noqa: B018 - a misspelt name still fails


# ----------------------------------------------------------------------------------- errors
def test_no_result_is_a_value_error_as_in_07(site) -> None:
    from balsam.api import ApplicationDefinition, Job

    class Adder(ApplicationDefinition):
        site = 0

        def run(self, x, y):
            return x + y

    Adder.site = site.id
    job = Adder.submit("add/1", x=1, y=2)
    assert issubclass(Job.NoResult, ValueError)
    with pytest.raises(ValueError):
        job.result_nowait()  # not run yet: no result


def test_server_unavailable_is_a_timeout_error_as_in_07() -> None:
    from balsam.client import RESTClient, ServerUnavailable

    assert issubclass(ServerUnavailable, TimeoutError) and issubclass(ServerUnavailable, ConnectionError)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = RESTClient(f"http://127.0.0.1:{port}", token="t", retry_count=0)
    # 0.7's client raised TimeoutError("Exceeded max retries: ...") when it gave up.
    with pytest.raises(TimeoutError) as info:
        client.get("/jobs/")
    assert isinstance(info.value, ServerUnavailable)
