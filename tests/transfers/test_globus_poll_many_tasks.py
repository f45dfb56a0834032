"""A poll of more Globus tasks than one ``task_list`` filter may name.

Globus Transfer's task list takes at most 50 ids in its ``task_id`` filter ("comma separated list
of task ids, limit 50"; more is a 400). The backend asked for every in-flight task in one call (up
to 1,000 ids): with ``max_concurrent_transfers`` above 50 every poll was refused, every task's items
showed "cannot poll its task: Globus refused the request (HTTP 400 ...)", and nothing finished until
each task's deadline (6 h by default) cancelled it and its files failed a try. The fake below is
globus-sdk's testing fixtures (``responses``) with that limit of the real service.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.transfer import TaskState
from globus_test_utils import REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from transfer_test_utils import FakeAPI

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
#: Globus Transfer's limit on the ids of one task_list task_id filter.
GLOBUS_FILTER_IDS = 50
T0 = dt.datetime(2032, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def globus_task_list(status: str, asked: list[int]):
    """A task_list answering each filtered id with ``status``, refusing more than 50 ids as Globus does;
    ``asked`` gets the number of ids of each call."""

    def answer(request):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)
        field, _, ids = query["filter"][0].partition(":")
        assert field == "task_id"
        ids = ids.split(",")
        asked.append(len(ids))
        if len(ids) > GLOBUS_FILTER_IDS:
            return 400, {}, json.dumps({"code": "BadRequest", "request_id": "r", "message":
                                        f"Too many task_id values in filter (max {GLOBUS_FILTER_IDS})"})
        docs = [{**BASE, "task_id": tid, "status": status, "files": 1, "files_transferred": 1,
                 "subtasks_skipped_errors": 0, "label": "balsam stage-in (1 file)"} for tid in ids]
        return 200, {}, json.dumps({"DATA": docs, "DATA_TYPE": "task_list", "length": len(docs), "limit": len(docs),
                                    "offset": 0, "total": len(docs)})

    responses.add_callback(responses.GET, f"{TRANSFER}/task_list", callback=answer, content_type="application/json")


def test_a_poll_of_120_tasks_asks_50_ids_at_most_per_call(tmp_path: Path) -> None:
    asked: list[int] = []
    globus_task_list("SUCCEEDED", asked)
    ids = [f"task-{n:03d}" for n in range(120)]
    statuses = make_backend(tmp_path).poll(ids)
    assert asked == [50, 50, 20]
    assert {tid: statuses[tid].state for tid in ids} == {tid: TaskState.done for tid in ids}


def test_an_agent_with_60_tasks_in_flight_sees_them_finish(tmp_path: Path) -> None:
    """The agent's transfers module, max_concurrent_transfers 60, one file a task: the 60 tasks it
    submitted finish at the next cycle, each submitted once."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    count = 60
    rows = [{"id": i, "job_id": i, "direction": "in", "location_alias": "aps", "remote_path": f"/data/{i}.h5",
             "local_path": "in.h5", "recursive": False, "state": "pending", "task_id": "", "transfer_info": {}}
            for i in range(1, count + 1)]
    api = FakeAPI(rows, [{"id": i, "workdir": f"job{i}", "state": "READY"} for i in range(1, count + 1)])
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP,
                                              max_concurrent_transfers=count, transfer_batch_size=1), api)
    module.backends["globus"] = make_backend(tmp_path)
    module.backends["globus"].site_path = str(site)
    clock = [T0]
    module.now = lambda: clock[0]
    submitted = iter(range(1, count + 1))
    responses.add_callback(responses.POST, f"{TRANSFER}/transfer", content_type="application/json", callback=lambda request: (
        202, {}, json.dumps({**OK_SUBMIT, "task_id": f"task-{next(submitted):03d}"})))

    module.run_cycle()
    tasks = {item["task_id"] for item in api.items.values()}
    assert len(tasks) == count and all(item["state"] == "active" for item in api.items.values())

    asked: list[int] = []
    globus_task_list("SUCCEEDED", asked)
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    assert max(asked) <= GLOBUS_FILTER_IDS
    assert {item["state"] for item in api.items.values()} == {"done"}
    assert sum(1 for c in responses.calls if c.request.method == "POST") == count  # none sent twice


def chunks_failing(failing: set[int], asked: list[int], status: str = "SUCCEEDED", **error) -> None:
    """The task list of globus_task_list, its calls numbered ``failing`` (from 1) answered 502 (or
    ``error``: status, body, headers)."""

    def answer(request):
        ids = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)["filter"][0].partition(":")[2].split(",")
        asked.append(len(ids))
        if len(asked) in failing:
            return (error.get("status", 502), error.get("headers", {}),
                    json.dumps({"code": "ExternalError", "message": "Globus is having trouble", "request_id": "r"}))
        docs = [{**BASE, "task_id": tid, "status": status, "files": 1, "files_transferred": 1,
                 "subtasks_skipped_errors": 0, "label": "balsam stage-in (1 file)"} for tid in ids]
        return 200, {}, json.dumps({"DATA": docs, "DATA_TYPE": "task_list", "length": len(docs), "limit": len(docs),
                                    "offset": 0, "total": len(docs)})

    responses.add_callback(responses.GET, f"{TRANSFER}/task_list", callback=answer, content_type="application/json")


def test_one_failing_task_list_call_costs_its_own_tasks_only(tmp_path: Path) -> None:
    """120 tasks, the second of three calls fails: the other 70 settle (the poll used to raise,
    discarding what the other calls read); the 50 of the failed call stay in flight with the reason,
    queued as the last poll found them (their deadline must not start with a failed read)."""
    backend = make_backend(tmp_path)
    ids = [f"task-{n:03d}" for n in range(120)]
    backend._queued = {"task-060": True}  # the last poll found it queued
    asked: list[int] = []
    chunks_failing({2}, asked)
    statuses = backend.poll(ids)
    assert asked == [50, 50, 20]
    assert {tid for tid in ids if statuses[tid].state == TaskState.done} == set(ids[:50] + ids[100:])
    unread = [statuses[tid] for tid in ids[50:100]]
    assert {s.state for s in unread} == {TaskState.active}
    assert "could not be polled" in unread[0].reason and "HTTP 502" in unread[0].reason
    assert statuses["task-060"].queued and not statuses["task-061"].queued


def test_a_poll_whose_calls_all_fail_raises_and_stops_asking(tmp_path: Path) -> None:
    """Globus down: the poll raises (it says nothing about the tasks) after two calls, not one per
    50 tasks each with its retries; a rate limit in any call raises at once (the agent holds off)."""
    from balsam.transfer import TransferError

    backend = make_backend(tmp_path)
    ids = [f"task-{n:03d}" for n in range(300)]
    asked: list[int] = []
    chunks_failing(set(range(1, 10)), asked)
    with pytest.raises(TransferError, match="HTTP 502"):
        backend.poll(ids)
    assert asked == [50, 50]

    responses.reset()
    asked.clear()
    chunks_failing({2}, asked, status=429, headers={"Retry-After": "120"})
    with pytest.raises(TransferError) as info:
        backend.poll(ids)
    assert info.value.retry_after_sec == 120 and asked == [50, 50]
