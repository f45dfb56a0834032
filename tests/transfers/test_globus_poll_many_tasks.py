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
import logging
import re
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


def filtered_ids(request) -> list[str]:
    """The task ids a task_list request names in its ``task_id`` filter."""
    return urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)["filter"][0].partition(":")[2].split(",")


def task_list_answer(ids, status: str, files_transferred: int = 1, **fields) -> tuple[int, dict, str]:
    """Globus's answer to a task_list call: a document per task of ``ids`` (one file of a stage-in)
    with ``status``, ``files_transferred`` and ``fields``."""
    docs = [{**BASE, "task_id": tid, "status": status, "files": 1, "files_transferred": files_transferred,
             **fields, "label": "balsam stage-in (1 file)"} for tid in ids]
    return 200, {}, json.dumps({"DATA": docs, "DATA_TYPE": "task_list", "length": len(docs), "limit": len(docs),
                                "offset": 0, "total": len(docs)})


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
        return task_list_answer(ids, status, subtasks_skipped_errors=0)

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
        ids = filtered_ids(request)
        asked.append(len(ids))
        if len(asked) in failing:
            return (error.get("status", 502), error.get("headers", {}),
                    json.dumps({"code": "ExternalError", "message": "Globus is having trouble", "request_id": "r"}))
        return task_list_answer(ids, status, subtasks_skipped_errors=0)

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
    assert all(s.unread for s in unread) and not any(statuses[tid].unread for tid in ids[:50] + ids[100:])
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


def test_chunks_after_two_failed_calls_are_asked_once_a_call_answered(tmp_path: Path) -> None:
    """200 tasks, calls 2 and 3 fail, the first answered: call 4 is asked and its 50 tasks settle.
    The poll used to stop after any two failed calls in a row, reporting the tasks of the calls it
    never made as 'could not be polled ... HTTP 502' (each cycle, should those calls keep failing)."""
    backend = make_backend(tmp_path)
    ids = [f"task-{n:03d}" for n in range(200)]
    asked: list[int] = []
    chunks_failing({2, 3}, asked)
    statuses = backend.poll(ids)
    assert asked == [50, 50, 50, 50]
    assert {tid for tid in ids if statuses[tid].state == TaskState.done} == set(ids[:50] + ids[150:])
    assert all(statuses[tid].unread for tid in ids[50:150])


def unread_agent(tmp_path: Path, count: int, **info) -> tuple[TransfersModule, FakeAPI, list, list]:
    """The agent's transfers module with ``count`` Globus tasks in flight (t-000 ..., one item each,
    submitted at T0, ``info`` added to their transfer_info; task_timeout_sec 3600), its backend as
    freshly built (an agent just started); returns it, its API, its clock ([now]) and the URLs of
    the task cancels it makes."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    rows = [{"id": i, "job_id": i, "direction": "in", "location_alias": "aps", "remote_path": f"/data/{i}.h5",
             "local_path": "in.h5", "recursive": False, "state": "active", "task_id": f"globus:t-{i - 1:03d}",
             "transfer_info": {"submitted": T0.isoformat(), **info}} for i in range(1, count + 1)]
    api = FakeAPI(rows, [{"id": i, "workdir": f"job{i}", "state": "READY"} for i in range(1, count + 1)])
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                              globus_endpoint_id=SITE_EP, task_timeout_sec=3600,
                                              max_concurrent_transfers=count), api)
    backend = make_backend(tmp_path, task_timeout_sec=3600, max_concurrent_transfers=count)
    backend.site_path = str(site)
    module.backends["globus"] = backend
    clock = [T0]
    module.now = backend.now = lambda: clock[0]
    cancels: list[str] = []
    responses.add_callback(responses.POST, re.compile(rf"{TRANSFER}/task/.*/cancel"), content_type="application/json",
                           callback=lambda r: (cancels.append(r.url), (200, {}, json.dumps(
                               {"code": "Canceled", "message": "ok", "request_id": "r", "resource": "x"})))[1])
    return module, api, clock, cancels


def running_list(mode: list[str], failing_id: str = "t-050") -> None:
    """A task_list answering every task ACTIVE, ``Queued`` while mode[0] is 'queued', else running;
    while mode[0] is 'fail', the call naming ``failing_id`` answers 502 (the others answer Queued)."""

    def answer(request):
        ids = filtered_ids(request)
        if mode[0] == "fail" and failing_id in ids:
            return 502, {}, json.dumps({"code": "ExternalError", "message": "trouble", "request_id": "r"})
        return task_list_answer(ids, "ACTIVE", files_transferred=0, nice_status="OK" if mode[0] == "run" else "Queued",
                                is_paused=False)

    responses.add_callback(responses.GET, f"{TRANSFER}/task_list", callback=answer, content_type="application/json")


def test_a_queued_task_whose_call_fails_after_a_restart_is_not_taken_for_started(tmp_path: Path) -> None:
    """An agent just restarted (its backend remembers no task as queued); its items say queued; the
    call naming t-050 fails: that task is not written 'started' (its state is unknown), and once it
    really starts, two hours on, it gets its whole deadline. It was reported running, 'started'
    written at the failed read, and cancelled the cycle it really started."""
    module, api, clock, cancels = unread_agent(tmp_path, 51, queued=True)
    mode = ["fail"]
    running_list(mode)
    clock[0] = T0 + dt.timedelta(hours=1)
    module.run_cycle()
    info = api.items[51]["transfer_info"]
    assert info.get("queued") and "started" not in info and "could not be polled" in info["reason"]
    mode[0] = "queued"
    for minutes in (20, 60, 120):
        clock[0] = T0 + dt.timedelta(hours=1, minutes=minutes)
        module.run_cycle()
    mode[0] = "run"
    clock[0] = T0 + dt.timedelta(hours=3, minutes=1)
    module.run_cycle()
    assert not cancels and api.items[51]["state"] == "active"
    assert api.items[51]["transfer_info"]["started"] == clock[0].isoformat()


def test_a_queued_task_whose_call_keeps_failing_meets_its_deadline(tmp_path: Path) -> None:
    """A task last read queued whose task_list call then fails every cycle (the poll's other call
    answering): its deadline counts from the first failed read of the row (not from its
    submission: see test_globus_failed_read_deadline), and it is cancelled past it. It was reported
    queued from memory every cycle, its deadline never counting."""
    module, api, clock, cancels = unread_agent(tmp_path, 51)
    mode = ["queued"]
    running_list(mode)
    module.run_cycle()
    assert api.items[51]["transfer_info"].get("queued")
    mode[0] = "fail"
    clock[0] = T0 + dt.timedelta(minutes=30)
    module.run_cycle()
    assert not cancels and api.items[51]["state"] == "active"
    clock[0] = T0 + dt.timedelta(hours=1, minutes=29)
    module.run_cycle()
    assert not cancels and api.items[51]["state"] == "active"
    clock[0] = T0 + dt.timedelta(hours=1, minutes=31)
    module.run_cycle()
    assert [url.split("/task/")[1] for url in cancels] == ["t-050/cancel"]
    assert api.items[51]["state"] == "pending"
    assert "did not finish within 3600 s" in api.items[51]["transfer_info"]["error"]
    assert {api.items[i]["state"] for i in range(1, 51)} == {"active"}  # the others, read queued, go on


def test_a_failed_call_is_one_warning_not_one_per_task(tmp_path: Path, caplog) -> None:
    """One failed task_list call of 50 running tasks: one WARNING naming the call's error (it was 50
    'transfer task ... is not moving' lines), DEBUG when the same error comes again."""
    module, api, clock, cancels = unread_agent(tmp_path, 120)
    running_list(["fail"])
    with caplog.at_level(logging.WARNING):
        module.run_cycle()
        first = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        clock[0] = T0 + dt.timedelta(minutes=1)
        module.run_cycle()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(first) == 1 and "50 of 120 tasks not read this cycle" in first[0] and "HTTP 502" in first[0]
    assert warnings == first
    assert "could not be polled" in api.items[51]["transfer_info"]["reason"] and not cancels
