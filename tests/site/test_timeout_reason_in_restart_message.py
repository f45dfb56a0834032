"""The launcher's reason in the default handle_timeout's RESTART_READY message.

The launcher says why it ended a run (its stop signal, its wall time, its idle timeout) in the
RUN_TIMEOUT's ``state_data``; the jobs the processing module acquires carry no ``state_data``, so
the message never quoted it. The module now reads the reasons from the jobs' newest RUN_TIMEOUT
events, a few requests per batch (never one per job), and moves the jobs without them when that
read fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from balsam.client.rest import APIError
from balsam.site.modules.processing import ProcessingModule
from site_test_utils import events, job_rows, process_until

BASE = "re-queued by the default handle_timeout (RESTART_READY)"


def _echo_app(site_id: int):
    from balsam.api import ApplicationDefinition

    class TimeoutEcho(ApplicationDefinition):  # keeps every default hook
        site = site_id
        command_template = "echo {{ word }}"

    TimeoutEcho.sync()
    return TimeoutEcho


def _launcher_times_out(client, site_id: int, reasons: dict[int, str]) -> None:
    """What a launcher does to jobs its stop ended: acquire, RUNNING, RUN_TIMEOUT with its reason."""
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 100, "filter_tags": {}})
    got_ids = {j["id"] for j in (got if isinstance(got, list) else got["results"])}
    assert set(reasons) <= got_ids, f"could not acquire {set(reasons) - got_ids}"
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in reasons])
    client.patch("/jobs/", json=[{"id": i, "state": "RUN_TIMEOUT", "state_data": {"reason": r}} for i, r in reasons.items()])


def _restart_messages(client, ids: list[int]) -> dict[int, str]:
    """Each job's newest RESTART_READY message."""
    out: dict[int, str] = {}
    for event in events(client, job_id=ids, to_state="RESTART_READY"):
        out[event["job_id"]] = event["data"]["message"]
    return out


@pytest.fixture
def processing(make_site, client):
    site = make_site()
    module = ProcessingModule(site, site.settings.processing, client)
    yield site, module
    module.close()


def _preprocessed_jobs(site, module, client, count: int) -> list[int]:
    from balsam.api import Job

    app = _echo_app(site.site_id)
    ids = [j.id for j in Job.objects.bulk_create([Job(f"t/{i}", app, parameters={"word": "w"}) for i in range(count)])]
    process_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"})
    return ids


def test_the_restart_message_quotes_the_newest_launcher_reason_read_in_one_request(processing, client, monkeypatch) -> None:
    site, module = processing
    ids = _preprocessed_jobs(site, module, client, 3)
    # A first run ended by the wall time: its reason is quoted...
    _launcher_times_out(client, site.site_id, {i: "launcher reached its wall time" for i in ids})
    process_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"RESTART_READY"})
    assert set(_restart_messages(client, ids).values()) == {f"{BASE}: launcher reached its wall time"}

    # ...and the re-run, ended by a stop signal, quotes its own (the newest RUN_TIMEOUT), each job its own.
    event_gets: list[dict] = []
    real_get = client.get

    def counting_get(path, params=None, **kw):
        if path == "/events/":
            event_gets.append(dict(params or {}))
        return real_get(path, params=params, **kw)

    second = {ids[0]: "launcher stopped (signal 15)", ids[1]: "launcher stopped (signal 15)",
              ids[2]: "launcher idle for 60 s"}
    _launcher_times_out(client, site.site_id, second)
    monkeypatch.setattr(client, "get", counting_get)
    process_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"RESTART_READY"})
    monkeypatch.undo()
    assert _restart_messages(client, ids) == {i: f"{BASE}: {r}" for i, r in second.items()}
    # One request for the batch, not one per job (the three are acquired together).
    assert len(event_gets) == 1
    assert sorted(int(i) for i in str(event_gets[0]["job_id"]).split(",")) == sorted(ids)


def test_a_failing_events_read_still_moves_the_jobs_with_the_default_message(processing, client, monkeypatch,
                                                                             caplog) -> None:
    site, module = processing
    ids = _preprocessed_jobs(site, module, client, 2)
    _launcher_times_out(client, site.site_id, {i: "launcher stopped (signal 15)" for i in ids})
    real_get = client.get

    def failing_get(path, params=None, **kw):
        if path == "/events/":
            raise APIError("GET", "/events/", 503, "unavailable")
        return real_get(path, params=params, **kw)

    monkeypatch.setattr(client, "get", failing_get)
    with caplog.at_level(logging.WARNING):
        process_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"RESTART_READY"})
    monkeypatch.undo()
    messages = _restart_messages(client, ids)
    assert set(messages) == set(ids)
    assert all(m.startswith(BASE) and "signal 15" not in m and "allocation" in m for m in messages.values())
    assert any("RUN_TIMEOUT jobs could not be read" in r.getMessage() for r in caplog.records)
