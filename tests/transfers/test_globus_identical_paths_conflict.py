"""Globus refuses a submission whose paths an earlier task of the same user still writes: HTTP 409
``Conflict``, "A transfer with identical paths has not yet completed". It happens to the agent's own
retry of a task it cancelled at ``task_timeout_sec`` that Globus is still stopping (it cancels
asynchronously past 10 s: "CancelAccepted", the usual answer for a task hung on an unresponsive
endpoint), or beside a task started outside balsam. It was taken for a refusal of the files: each
such submission failed a try of every file of the batch, and with the default 3 tries a hung task's
files failed their jobs within minutes of its deadline, "Globus refused the request (HTTP 409 ...)".
Now the batch waits, journaled with its submission id, and is sent again until Globus takes it;
the location's other batches go on (the refusal is that batch's alone), and the wait is bounded by
the Globus deadline span of a task balsam submits (then its files each fail a try). An outdated
journaled batch (an item held again since) that gets the 409 leaves the journal: Globus started no
task of its submission id, and one started later would only be cancelled.
The fake is globus-sdk's testing fixtures (``responses``) with the real service's answer.
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

from balsam.site.modules.transfers import JOURNAL_NAME, TransfersModule, TransfersOptions
from balsam.transfer import TransferDirection, TransferError, TransferFile
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from transfer_test_utils import FakeAPI, one_stage_in_api

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
TASK_ID = OK_SUBMIT["task_id"]
TASK_DOC = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
CONFLICT = {"code": "Conflict", "message": "A transfer with identical paths has not yet completed",
            "request_id": "00gB7AnM3", "resource": "/v0.10/transfer"}
T0 = dt.datetime(2032, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def distinct_submission_ids() -> list[str]:
    """Globus's get_submission_id answering a new id at each call (the fixture's answers one id
    always, which cannot tell a batch sent again with its id from one sent under a new one): the
    list of the ids handed out so far."""
    given: list[str] = []

    def answer(request):
        given.append(f"5ab00000-0000-0000-0000-{len(given) + 1:012d}")
        return 200, {}, json.dumps({"value": given[-1]})

    responses.remove(responses.GET, f"{TRANSFER}/submission_id")
    responses.add_callback(responses.GET, f"{TRANSFER}/submission_id", callback=answer, content_type="application/json")
    return given


def posted_ids() -> list[str]:
    """The submission id of each transfer submitted so far, in order."""
    return [json.loads(c.request.body)["submission_id"] for c in responses.calls
            if c.request.method == "POST" and c.request.url.endswith("/transfer")]


def item_row(item_id: int, remote_path: str, direction: str = "in", local_path: str = "in.h5", **info) -> dict:
    return {"id": item_id, "job_id": item_id, "direction": direction, "location_alias": "aps",
            "remote_path": remote_path, "local_path": local_path, "recursive": False, "state": "pending",
            "task_id": "", "transfer_info": dict(info)}


def fake_module(tmp_path: Path, rows: list[dict], **options) -> tuple[TransfersModule, FakeAPI, list]:
    """The agent's transfers module on a FakeAPI of ``rows`` (job i in workdir ``job<i>``), its
    Globus backend on globus-sdk's test client, both on one clock (the returned [now]; the backend's
    monotonic clock follows it)."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True, exist_ok=True)
    api = FakeAPI(rows, [{"id": row["job_id"], "workdir": f"job{row['job_id']}", "state": "READY"} for row in rows])
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                              globus_endpoint_id=SITE_EP, **options), api)
    backend = make_backend(tmp_path, task_timeout_sec=module.options.task_timeout_sec,
                           max_concurrent_transfers=module.options.max_concurrent_transfers)
    backend.site_path = str(site)
    module.backends["globus"] = backend
    clock = [T0]
    module.now = backend.now = lambda: clock[0]
    backend.clock = lambda: (clock[0] - T0).total_seconds()
    return module, api, clock


def refuse_paths(conflicting: str, task_ids: list[str]):
    """Globus's POST /transfer: 409 "identical paths" for a batch with a source path ending in
    ``conflicting`` (a task still writes it), else a new task (its id appended to ``task_ids``)."""

    def answer(request):
        sources = [d["source_path"] for d in json.loads(request.body)["DATA"]]
        if any(src.endswith(conflicting) for src in sources):
            return 409, {}, json.dumps(CONFLICT)
        task_ids.append(f"33333333-3333-3333-3333-{len(task_ids) + 1:012d}")
        return 202, {}, json.dumps({**OK_SUBMIT, "task_id": task_ids[-1]})

    responses.add_callback(responses.POST, f"{TRANSFER}/transfer", callback=answer, content_type="application/json")


def test_a_batch_whose_paths_an_earlier_task_still_writes_waits_without_using_a_try(tmp_path: Path) -> None:
    site, api = one_stage_in_api(tmp_path)
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                              globus_endpoint_id=SITE_EP, max_attempts=1), api)
    module.backends["globus"] = make_backend(tmp_path)
    module.backends["globus"].site_path = str(site)
    clock = [T0]
    module.now = lambda: clock[0]
    given = distinct_submission_ids()
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=409, json=CONFLICT)

    module.run_cycle()
    item = api.items[1]
    assert item["state"] == "pending" and not item["transfer_info"].get("attempts")
    reason = item["transfer_info"]["reason"]
    assert "identical paths has not yet completed" in reason and "sent again each cycle" in reason
    assert api.jobs[1]["state"] == "READY"

    responses.replace(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    # The same batch, sent again with its own id (not under a new one: one id asked for in all).
    assert len(given) == 1 and posted_ids() == [given[0], given[0]]
    assert (api.items[1]["state"], api.items[1]["task_id"]) == ("active", f"globus:{TASK_ID}")


def test_a_hung_task_cancelled_slowly_does_not_fail_its_job_on_the_retries(balsam_env, tmp_path: Path) -> None:
    """The campaign on the live API: a task hangs past task_timeout_sec; Globus accepts its cancel
    but is still stopping it ("CancelAccepted"); the file fails the deadline's try and, at each retry,
    Globus answers 409 for its paths. The job stays (one try used), and the file goes once the old
    task has stopped."""
    from globus_test_utils import stage_in_site

    responses.add_passthru(balsam_env.url)
    client, site_path, site, job, item = stage_in_site(tmp_path, "conflict-site")
    module = TransfersModule(site, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                    globus_endpoint_id=SITE_EP, task_timeout_sec=60), client)
    module.backends["globus"] = make_backend(tmp_path)
    clock = [T0]
    module.now = lambda: clock[0]

    def row() -> dict:
        return client.get("/transfers/", params={"job_id": [job.id]})["results"][0]

    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    assert row()["task_id"] == f"globus:{TASK_ID}"
    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [{**base, "task_id": TASK_ID, "status": "ACTIVE", "nice_status": "OK", "is_paused": False,
                  "label": "balsam stage-in (1 file)"}],
        "DATA_TYPE": "task_list", "length": 1, "limit": 1, "offset": 0, "total": 1})
    cancel = responses.add(responses.POST, f"{TRANSFER}/task/{TASK_ID}/cancel", json={
        "DATA_TYPE": "result", "code": "CancelAccepted", "message": "The cancel request has been accepted",
        "request_id": "r", "resource": f"/task/{TASK_ID}/cancel"})
    clock[0] = T0 + dt.timedelta(seconds=120)
    module.run_cycle()  # past the deadline: cancelled, the file fails its first try
    assert cancel.call_count == 1
    after = row()
    assert after["state"] == "pending" and after["transfer_info"]["attempts"] == 1

    responses.replace(responses.POST, f"{TRANSFER}/transfer", status=409, json=CONFLICT)
    for minutes in (5, 10, 20):  # every retry past its backoff (30 s, 60 s): still being stopped
        clock[0] = T0 + dt.timedelta(minutes=minutes)
        module.run_cycle()
    after = row()
    assert after["state"] == "pending" and after["transfer_info"]["attempts"] == 1
    assert "identical paths has not yet completed" in after["transfer_info"]["reason"]
    assert client.get(f"/jobs/{job.id}")["state"] != "FAILED"

    responses.replace(responses.POST, f"{TRANSFER}/transfer",
                      json={**OK_SUBMIT, "task_id": "33333333-3333-3333-3333-333333333333"})
    clock[0] = T0 + dt.timedelta(minutes=25)
    module.run_cycle()
    assert (row()["state"], row()["task_id"]) == ("active", "globus:33333333-3333-3333-3333-333333333333")


def test_a_conflicting_batch_holds_back_no_other_batch_of_its_location(tmp_path: Path) -> None:
    """One batch a task still writes (item 1's) beside others of the same location, both directions:
    the others go at once and on later cycles, their reasons their own; item 1's waits alone.
    (Taken for the location's refusal, item 1's batch, sent first each cycle, kept items 2 to 4
    waiting as long as the other task ran, 'an earlier Globus task ... writes some of these paths'.)"""
    rows = [item_row(1, "/data/1.h5"), item_row(2, "/data/2.h5"), item_row(3, "/data/3.h5"),
            item_row(4, "/results/4.h5", direction="out", local_path="out.h5")]
    module, api, clock = fake_module(tmp_path, rows, transfer_batch_size=1, max_concurrent_transfers=10)
    given = distinct_submission_ids()
    tasks: list[str] = []
    refuse_paths("/data/1.h5", tasks)

    module.run_cycle()
    assert [api.items[i]["state"] for i in (2, 3, 4)] == ["active"] * 3 and len(tasks) == 3
    assert all("reason" not in api.items[i]["transfer_info"] for i in (2, 3, 4))
    assert api.items[1]["state"] == "pending" and "identical paths" in api.items[1]["transfer_info"]["reason"]

    api.items[5] = item_row(5, "/data/5.h5")  # a new job of the location, while item 1's batch waits
    api.jobs[5] = {"id": 5, "workdir": "job5", "state": "READY"}
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [], "DATA_TYPE": "task_list", "length": 0, "limit": 50, "offset": 0, "total": 0})
    for task_id in tasks:
        responses.add(responses.GET, f"{TRANSFER}/task/{task_id}", json={
            "DATA_TYPE": "task", "task_id": task_id, "status": "ACTIVE", "nice_status": "OK", "is_paused": False,
            "label": "balsam stage-in (1 file)"})
    clock[0] = T0 + dt.timedelta(minutes=1)
    module.run_cycle()
    assert api.items[5]["state"] == "active" and len(tasks) == 4
    assert api.items[1]["state"] == "pending" and not api.items[1]["transfer_info"].get("attempts")
    sent_for_1 = [sid for sid in posted_ids() if sid == given[0]]
    assert len(sent_for_1) == 2  # item 1's batch: sent again with its own id, once a cycle
    assert not module.blocked_aliases


def test_a_batch_refused_so_past_any_balsam_task_s_deadline_fails_a_try(tmp_path: Path) -> None:
    """A task started outside balsam holds the paths: the wait ends at the Globus deadline span of a
    task balsam submits (task_timeout_sec 60, 5 slots: 60 x 2 + 600 s = 12 min), counted from the
    first refusal; then the batch leaves the journal and its file fails a try (its job does not wait
    for ever with 'pending'); the retry goes under a new submission id, with a new bound."""
    module, api, clock = fake_module(tmp_path, [item_row(1, "/data/1.h5")], task_timeout_sec=60,
                                     max_attempts=3, retry_backoff_sec=30)
    given = distinct_submission_ids()
    refuse_paths("/data/1.h5", [])
    journal = tmp_path / "site" / JOURNAL_NAME

    for minutes in (0, 5, 11):
        clock[0] = T0 + dt.timedelta(minutes=minutes)
        module.run_cycle()
        info = api.items[1]["transfer_info"]
        assert api.items[1]["state"] == "pending" and not info.get("attempts"), minutes
        assert "12:12 UTC" in info["reason"]  # the bound, stable from cycle to cycle (one PATCH)
    assert given[0] in journal.read_text()

    clock[0] = T0 + dt.timedelta(minutes=12)
    module.run_cycle()
    info = api.items[1]["transfer_info"]
    assert api.items[1]["state"] == "pending" and info["attempts"] == 1 and info.get("retry_after")
    assert "identical paths" in info["error"] and "12 min" in info["error"]
    assert not journal.exists() or given[0] not in journal.read_text()

    clock[0] = T0 + dt.timedelta(minutes=14)  # past its backoff: a new batch, a new id, a new bound
    module.run_cycle()
    assert posted_ids() == [given[0]] * 4 + [given[1]]
    assert api.items[1]["transfer_info"]["attempts"] == 1 and "12:26 UTC" in api.items[1]["transfer_info"]["reason"]


def test_the_conflict_wait_is_measured_on_the_monotonic_clock(tmp_path: Path) -> None:
    """The wall clock set forward (NTP, a resumed VM: 7 h, then 13 h after the first refusal, while
    two minutes pass): the batch still waits (its bound, 12 h 10 min by default, is measured on the
    monotonic clock), its reason naming the same time. Its file used to fail a try then."""
    module, api, clock = fake_module(tmp_path, [item_row(1, "/data/1.h5")])
    backend = module.backends["globus"]
    ticks = [0.0]
    backend.clock = lambda: ticks[0]
    refuse_paths("/data/1.h5", [])
    module.run_cycle()
    reason = api.items[1]["transfer_info"]["reason"]
    assert "2032-05-02 00:10 UTC" in reason
    for hours, seconds in ((7, 60.0), (13, 120.0)):
        clock[0], ticks[0] = T0 + dt.timedelta(hours=hours), seconds
        module.run_cycle()
    info = api.items[1]["transfer_info"]
    assert api.items[1]["state"] == "pending" and not info.get("attempts") and info["reason"] == reason


def test_an_outdated_journaled_batch_refused_so_leaves_the_journal(tmp_path: Path) -> None:
    """A journaled batch whose item was held again and released since its id was journaled (the
    task of that id would copy files from before the parents' new run): Globus's 409 says it started
    no task of that id. It leaves the journal at once (it stayed, sent with its old id every cycle;
    once the conflict ended Globus started a task for it that the agent cancelled at once), and the
    item goes in a new batch under a new id."""
    row = item_row(1, "/data/1.h5", holds=1)
    module, api, clock = fake_module(tmp_path, [row])
    (tmp_path / "site" / "data" / "job1").mkdir(parents=True)
    journal = tmp_path / "site" / JOURNAL_NAME
    journal.write_text(json.dumps({"token": "stale-token", "alias": "aps", "direction": "in",
                                   "files": [[1, "/data/1.h5", str(tmp_path / "site/data/job1/in.h5"), False]],
                                   "holds": [0]}) + "\n")
    given = distinct_submission_ids()
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=409, json=CONFLICT)

    module.run_cycle()
    assert "stale-token" not in (journal.read_text() if journal.exists() else "")
    responses.replace(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    for minutes in (10, 20):
        clock[0] = T0 + dt.timedelta(minutes=minutes)
        module.run_cycle()
    assert posted_ids().count("stale-token") == 1
    assert not [c for c in responses.calls if c.request.url.endswith("/cancel")]
    assert (api.items[1]["state"], api.items[1]["task_id"]) == ("active", f"globus:{TASK_ID}")
    assert posted_ids()[-1] in given


def test_the_refusal_reads_well_when_its_body_is_not_json(tmp_path: Path) -> None:
    """A 409 whose body is text (a proxy, an older service): recognised, and its reason says what
    Globus answered, not '(HTTP 409 None): None'."""
    backend = make_backend(tmp_path)
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=409, content_type="text/plain",
                  body="Conflict: A transfer with identical paths has not yet completed")
    with pytest.raises(TransferError) as info:
        backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile(f"{tmp_path}/site/x", "/data/x", False)],
                       "tok")
    assert info.value.retryable and "None" not in str(info.value)
    assert "(HTTP 409): Conflict: A transfer with identical paths has not yet completed" in str(info.value)


def test_a_conflicting_batch_sent_again_takes_no_slot_the_location_s_new_batches_need(tmp_path: Path) -> None:
    """One free slot a cycle (max_concurrent_transfers 1): item 1's batch, refused for its paths,
    is sent again after the cycle's new batches for retry_backoff_sec (30 s), not first: item 2
    goes at the next cycle (it waited for the slot as long as the other task ran, item 1's batch
    taking it every cycle)."""
    rows = [item_row(1, "/data/1.h5"), item_row(2, "/data/2.h5")]
    module, api, clock = fake_module(tmp_path, rows, transfer_batch_size=1, max_concurrent_transfers=1)
    given = distinct_submission_ids()
    tasks: list[str] = []
    refuse_paths("/data/1.h5", tasks)

    module.run_cycle()  # item 1's first submission took the one slot
    assert api.items[2]["state"] == "pending" and "free transfer slot" in api.items[2]["transfer_info"]["reason"]
    clock[0] = T0 + dt.timedelta(seconds=10)
    module.run_cycle()
    assert api.items[2]["state"] == "active" and len(tasks) == 1
    assert api.items[1]["state"] == "pending" and given[0] in (tmp_path / "site" / JOURNAL_NAME).read_text()


def test_a_batch_refused_once_is_sent_in_its_turn_once_retry_backoff_sec_has_passed(tmp_path: Path) -> None:
    """One slot, a new job's stage-in arriving every cycle: item 1's batch, refused once for its
    paths (the other task then ends), goes after the new batches for retry_backoff_sec (30 s) only,
    then in its turn (journaled, first). It used to go last for as long as it stayed journaled:
    never sent again under the steady flow, its item 'waiting for a free transfer slot' for ever,
    and never reaching the wait's bound either (checked only when sent)."""
    module, api, clock = fake_module(tmp_path, [item_row(1, "/data/1.h5"), item_row(2, "/data/2.h5")],
                                     transfer_batch_size=1, max_concurrent_transfers=1)
    distinct_submission_ids()
    conflict, tasks = [True], []

    def submit(request):
        sources = [d["source_path"] for d in json.loads(request.body)["DATA"]]
        if conflict[0] and any(src.endswith("/data/1.h5") for src in sources):
            return 409, {}, json.dumps(CONFLICT)
        tasks.append((f"33333333-3333-3333-3333-{len(tasks) + 1:012d}", sources))
        return 202, {}, json.dumps({**OK_SUBMIT, "task_id": tasks[-1][0]})

    def task_list(request):
        ids = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)["filter"][0].partition(":")[2].split(",")
        docs = [{**TASK_DOC, "task_id": tid, "status": "SUCCEEDED", "files": 1, "files_transferred": 1,
                 "subtasks_skipped_errors": 0, "label": "balsam stage-in (1 file)"} for tid in ids]
        return 200, {}, json.dumps({"DATA": docs, "DATA_TYPE": "task_list", "length": len(docs), "limit": len(docs),
                                    "offset": 0, "total": len(docs)})

    responses.add_callback(responses.POST, f"{TRANSFER}/transfer", callback=submit, content_type="application/json")
    responses.add_callback(responses.GET, f"{TRANSFER}/task_list", callback=task_list, content_type="application/json")
    module.run_cycle()  # item 1 refused (its try took the one slot)
    assert api.items[1]["state"] == "pending" and not tasks
    conflict[0] = False  # the task writing its paths has ended
    for cycle in range(1, 9):  # cycles 5 s apart (service_period), one new stage-in each
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        new = cycle + 2
        api.items[new] = item_row(new, f"/data/{new}.h5")
        api.jobs[new] = {"id": new, "workdir": f"job{new}", "state": "READY"}
        module.run_cycle()
    sent = [sources[0].rpartition("/")[2] for _, sources in tasks]
    # New batches first while the refusal is recent (T0+5 s ... T0+25 s), then item 1's (T0+30 s).
    assert sent[:6] == ["2.h5", "3.h5", "4.h5", "5.h5", "6.h5", "1.h5"]
    assert api.items[1]["state"] in ("active", "done")
